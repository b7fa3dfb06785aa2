"""Snapshots (engine/snapshots.py, storage/snapshots.py): real sandboxes, a real daemon, E2B's own SDK.

A snapshot is a frozen sandbox's writable layer made into an EROFS image; sandboxes created from it
stack it on their template (several overlay lowers). These tests check what a new sandbox sees
(files, deletions, opaque directories, stacked snapshots), that the image is one instant of a tree
being written, the REST/E2B surfaces, and that a daemon SIGKILLed mid-snapshot leaves nothing.
"""

from __future__ import annotations

import os
import signal
import stat
import time
from pathlib import Path

import httpx
import pytest

from conftest import start_daemon, stop_daemon
from shoal.engine.keys import e2b_form
from shoal.errors import Conflict, NotFound


def sh(engine, sid: str, script: str) -> str:  # noqa: ANN001
    r = engine.agent(sid).run(["sh", "-c", script], timeout=60)
    assert r.exit_code == 0, r
    return r.stdout_bytes.decode()


def freezer_state(engine, sid: str) -> str:  # noqa: ANN001
    path = Path("/sys/fs/cgroup/freezer") / engine.runtime.container(sid) / "freezer.state"
    if not path.exists():
        path = Path("/sys/fs/cgroup") / engine.runtime.container(sid) / "cgroup.freeze"
    return path.read_text().strip()


def test_new_sandbox_sees_files_deletions_opaque_dirs_and_links(engine, new_sandbox) -> None:  # noqa: ANN001
    src = new_sandbox()
    sh(engine, src, "echo kept > /root/kept; rm /bin/ed; rm -rf /sbin && mkdir /sbin && echo only > /sbin/only;"
                    " ln -s /etc/shadow /root/host-link; mkdir -p /opt/deep/er && echo d > /opt/deep/er/f")
    snap = engine.snapshots.create(src, "files-case")
    # the image holds overlayfs's own markers: a whiteout (char 0/0) and an opaque directory
    point = engine.snapshots.images.mount(snap.id)
    st = os.lstat(point / "bin/ed")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(point / "sbin", "trusted.overlay.opaque") == b"y"
    child = new_sandbox(snapshot="files-case")
    assert engine.get(child).snapshot == snap.id
    out = sh(engine, child, "cat /root/kept; ls /bin/ed 2>&1; ls /sbin; readlink /root/host-link; cat /opt/deep/er/f;"
                            " ls /bin/cat")
    assert out.splitlines() == ["kept", "ls: /bin/ed: No such file or directory", "only", "/etc/shadow", "d",
                                "/bin/cat"]
    # the link resolves inside the sandbox, never on the host: /etc/shadow is the template's (absent here)
    assert engine.agent(child).run(["cat", "/root/host-link"]).exit_code != 0
    # the child writes on its own layer: the source is untouched
    sh(engine, child, "echo changed > /root/kept")
    assert sh(engine, src, "cat /root/kept") == "kept\n"
    # its overlay names the layers relative to its bundle (no host state path), snapshot first
    opts = sh(engine, child, "grep ' / / ' /proc/self/mountinfo")
    assert f"lowerdir=../../snapshots/{snap.id}:../../templates/" in opts
    assert str(engine.settings.state_dir) not in opts


def test_stacked_snapshots_and_delete_refused_while_used(engine, new_sandbox) -> None:  # noqa: ANN001
    a = new_sandbox()
    sh(engine, a, "echo one > /root/one; echo two > /root/two")
    s1 = engine.snapshots.create(a)
    b = new_sandbox(snapshot=s1.id)
    sh(engine, b, "rm /root/one; echo three > /root/three; echo 2b > /root/two")
    s2 = engine.snapshots.create(b, "stacked")
    assert s2.parent == s1.id
    c = new_sandbox(snapshot=s2.id)
    assert sh(engine, c, "ls /root; cat /root/two") == "three\ntwo\n2b\n"
    opts = sh(engine, c, "grep ' / / ' /proc/self/mountinfo")
    assert f"lowerdir=../../snapshots/{s2.id}:../../snapshots/{s1.id}:../../templates/" in opts
    with pytest.raises(Conflict):
        engine.snapshots.delete(s1.id)  # b uses it, and s2 stacks on it
    with pytest.raises(Conflict):
        engine.snapshots.delete("stacked")  # c uses it
    engine.destroy(c)
    engine.snapshots.delete("stacked")
    with pytest.raises(Conflict):
        engine.snapshots.delete(s1.id)  # b still does
    engine.destroy(b)
    engine.snapshots.delete(s1.id)
    with pytest.raises(NotFound):
        engine.snapshots.get(s1.id)
    assert not engine.snapshots.images.path(s1.id).exists()
    assert not engine.snapshots.images.mount_point(s1.id).exists()


def test_snapshot_is_one_instant_of_a_tree_being_written(engine, new_sandbox) -> None:  # noqa: ANN001
    """A writer makes files f1, f2, ... in order, each written to a temp name and renamed, as fast as it
    can. The snapshot's files are all whole and exactly f1..fN (the sandbox was frozen, not copied while
    it moved), and the source keeps writing afterwards."""
    src = new_sandbox()
    writer = engine.agent(src).start(["sh", "-c", "i=0; while true; do i=$((i+1));"
                                      " echo $i > /tmp/f.tmp; head -c 65536 /dev/zero | tr '\\0' x >> /tmp/f.tmp;"
                                      " mv /tmp/f.tmp /root/f$i; done"])
    try:
        deadline = time.monotonic() + 30
        while engine.agent(src).run(["test", "-e", "/root/f20"]).exit_code != 0:
            assert time.monotonic() < deadline, "the writer never got going"
            time.sleep(0.05)
        snap = engine.snapshots.create(src)
        assert freezer_state(engine, src) in ("THAWED", "0")  # thawed again: the writer goes on
        child = new_sandbox(snapshot=snap.id)
        out = sh(engine, child, "n=0; max=0; for f in /root/f*; do n=$((n+1)); i=${f#/root/f};"
                                " [ $i -gt $max ] && max=$i;"
                                " [ $(wc -c < $f) -eq $((65536 + ${#i} + 1)) ] || echo BAD $f;"
                                " [ \"$(head -n 1 $f)\" = $i ] || echo BAD $f; done; echo $n $max")
        assert "BAD" not in out, out
        count, top = map(int, out.split())
        assert count == top >= 20, out  # f1..fN, nothing missing in between
        deadline = time.monotonic() + 30
        while engine.agent(src).run(["test", "-e", f"/root/f{top + 5}"]).exit_code != 0:
            assert time.monotonic() < deadline, "the source stopped writing after the snapshot"
            time.sleep(0.05)
    finally:
        writer.close()


def test_rest_snapshot_api(daemon, minimal_template) -> None:  # noqa: ANN001
    with httpx.Client(base_url=daemon.url, headers=daemon.headers, timeout=60) as c:
        sid = c.post("/v1/sandboxes", json={"template": "minimal"}).json()["id"]
        try:
            r = c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": ["sh", "-c", "echo rest > /root/r"]})
            assert r.status_code == 200, r.text
            r = c.post(f"/v1/sandboxes/{sid}/snapshots", json={"name": "rest-snap"})
            assert r.status_code == 201, r.text
            snap = r.json()
            assert snap["name"] == "rest-snap" and snap["template"] == "minimal" and snap["source_sandbox"] == sid
            assert c.post(f"/v1/sandboxes/{sid}/snapshots", json={"name": "rest-snap"}).status_code == 409
            r = c.post(f"/v1/sandboxes/{sid}/snapshots", json={"name": "../x"})
            assert r.status_code == 400 and r.json()["code"] == "invalid_request"
            assert c.get("/v1/snapshots/rest-snap").json()["id"] == snap["id"]
            assert [s["id"] for s in c.get("/v1/snapshots", params={"sandbox": sid}).json()] == [snap["id"]]
            child = c.post("/v1/sandboxes", json={"snapshot": "rest-snap"}).json()
            assert child["snapshot"] == snap["id"] and child["template"] == "minimal"
            r = c.post(f"/v1/sandboxes/{child['id']}/exec", json={"cmd": ["cat", "/root/r"]})
            assert r.json()["stdout"] == "rest\n"
            r = c.delete(f"/v1/snapshots/{snap['id']}")
            assert r.status_code == 409 and r.json()["code"] == "conflict" and child["id"] in r.json()["message"]
            assert c.delete(f"/v1/sandboxes/{child['id']}").status_code == 204
            assert c.delete(f"/v1/snapshots/{snap['id']}").status_code == 204
            r = c.delete(f"/v1/snapshots/{snap['id']}")
            assert r.status_code == 404 and r.json()["code"] == "not_found"
            r = c.post("/v1/sandboxes", json={"snapshot": snap["id"]})
            assert r.status_code == 404 and r.json()["code"] == "not_found"
            assert c.post("/v1/sandboxes/nosuchbox/snapshots").status_code == 404
        finally:
            c.delete(f"/v1/sandboxes/{sid}")


def test_e2b_sdk_snapshot_api(daemon, base_template, monkeypatch) -> None:  # noqa: ANN001
    e2b = pytest.importorskip("e2b")
    for k, v in {"E2B_API_KEY": e2b_form(daemon.key), "E2B_API_URL": daemon.url,
                 "E2B_SANDBOX_URL": daemon.url}.items():
        monkeypatch.setenv(k, v)
    sb = e2b.Sandbox.create("base", timeout=600)
    try:
        sb.files.write("/home/user/test.txt", "from the original")
        snap = sb.create_snapshot(name="e2b-named")
        assert snap.snapshot_id and any("e2b-named" in n for n in snap.names)
        assert any(s.snapshot_id == snap.snapshot_id for s in e2b.Sandbox.list_snapshots().next_items())
        assert any(s.snapshot_id == snap.snapshot_id
                   for s in e2b.Sandbox.list_snapshots(sandbox_id=sb.sandbox_id).next_items())
        assert e2b.Sandbox.list_snapshots(name="e2b-named-does-not-exist").next_items() == []
        child = e2b.Sandbox.create(snap.snapshot_id)
        try:
            assert child.files.read("/home/user/test.txt") == "from the original"
            child.files.write("/home/user/test.txt", "in the child")
            assert sb.files.read("/home/user/test.txt") == "from the original"
        finally:
            child.kill()
        again = e2b.Sandbox.create_snapshot(sb.sandbox_id, name="e2b-named")  # E2B: the name moves on
        assert again.snapshot_id != snap.snapshot_id
        assert e2b.Sandbox.delete_snapshot(snap.snapshot_id) is True
        assert e2b.Sandbox.delete_snapshot(snap.snapshot_id) is False
        assert e2b.Sandbox.delete_snapshot(again.snapshot_id) is True
    finally:
        sb.kill()


def test_daemon_sigkill_mid_snapshot_leaves_no_frozen_sandbox_and_no_half_snapshot(
        engine, minimal_template, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """mkfs.erofs is made slow (a wrapper first in the daemon's PATH that waits for a file) so the daemon
    is surely mid-snapshot, its sandbox frozen, when it is SIGKILLed; the next daemon must thaw it and
    leave no snapshot, temp directory or row behind."""
    real = "/usr/bin/mkfs.erofs"
    go = tmp_path / "go"
    started = tmp_path / "started"
    wrapper = tmp_path / "bin" / "mkfs.erofs"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\necho $$ > {started}\nwhile [ ! -e {go} ]; do sleep 0.05; done\n"
                       f"exec {real} \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}:{os.environ['PATH']}")
    d = start_daemon()
    sid = None
    try:
        with httpx.Client(base_url=d.url, headers=d.headers, timeout=60) as c:
            sid = c.post("/v1/sandboxes", json={"template": "minimal"}).json()["id"]
            c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": ["sh", "-c", "echo x > /root/x"]})
            with pytest.raises(httpx.HTTPError):
                c.post(f"/v1/sandboxes/{sid}/snapshots", json={"name": "killed"}, timeout=2)
            deadline = time.monotonic() + 30
            while not started.exists():
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert freezer_state(engine, sid) in ("FROZEN", "1")
            assert any(p.name.startswith(".tmp-") for p in engine.snapshots.images.dir.iterdir())
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait(10)
            mkfs_pid = int(started.read_text())
            os.kill(mkfs_pid, signal.SIGKILL)  # the orphaned (still waiting) wrapper: ours
    finally:
        go.touch()
        stop_daemon(d)
    monkeypatch.setenv("PATH", os.environ["PATH"].split(":", 1)[1])
    d2 = start_daemon()  # reconciles at start
    try:
        assert freezer_state(engine, sid) in ("THAWED", "0")
        assert engine.agent(sid).run(["cat", "/root/x"]).stdout_bytes == b"x\n"
        assert not [p for p in engine.snapshots.images.dir.iterdir() if p.name.startswith(".tmp-")]
        assert engine.snapshots.list(name="killed") == []
        with httpx.Client(base_url=d2.url, headers=d2.headers, timeout=60) as c:
            assert c.get("/v1/snapshots/killed").status_code == 404
            r = c.post(f"/v1/sandboxes/{sid}/snapshots", json={"name": "killed"})  # works again
            assert r.status_code == 201, r.text
            assert c.delete(f"/v1/snapshots/{r.json()['id']}").status_code == 204
    finally:
        stop_daemon(d2)
        if sid:
            engine.destroy(sid)


def test_snapshot_becomes_a_template(engine, new_sandbox, daemon) -> None:  # noqa: ANN001
    """Flattened: the template holds the merged files (deletions applied) and outlives the snapshot."""
    src = new_sandbox()
    sh(engine, src, "echo templ > /root/t; rm /bin/ed")
    snap = engine.snapshots.create(src)
    name = f"from-snap-{snap.id[-6:]}"
    try:
        with httpx.Client(base_url=daemon.url, headers=daemon.headers, timeout=120) as c:
            r = c.post(f"/v1/snapshots/{snap.id}/template", json={"name": name})
            assert r.status_code == 201, r.text
            assert r.json()["source"] == f"snapshot:{snap.id}"
            assert c.post(f"/v1/snapshots/{snap.id}/template", json={"name": name}).status_code == 409
        engine.snapshots.delete(snap.id)
        child = new_sandbox(template=name)
        assert engine.get(child).snapshot is None
        assert sh(engine, child, "cat /root/t; ls /bin/ed 2>&1; ls /bin/cat") == (
            "templ\nls: /bin/ed: No such file or directory\n/bin/cat\n")
        engine.destroy(child)
    finally:
        try:
            engine.templates.remove(name)
        except NotFound:
            pass


def test_snapshot_compresses_only_what_pays(engine, new_sandbox) -> None:  # noqa: ANN001
    """Random bytes are stored as they are (lz4 would cost ~10x the freeze time for nothing); text is
    compressed. Read back whole either way."""
    src = new_sandbox()
    sh(engine, src, "head -c 8388608 /dev/urandom > /root/random; sha256sum /root/random > /root/sum")
    plain = engine.snapshots.create(src)
    assert plain.size_bytes > 8 * 1024 * 1024  # not compressed: the image holds the bytes as they are
    sh(engine, src, "rm /root/random /root/sum; i=0; while [ $i -lt 4000 ]; do "
                    "echo \"line $i of a very repetitive log file, the kind agents write all day\"; i=$((i+1)); "
                    "done > /root/log; for n in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do "
                    "cat /root/log; done > /root/big.log")
    packed = engine.snapshots.create(src)
    log_size = int(sh(engine, src, "stat -c %s /root/big.log"))
    assert log_size > 5 * 1024 * 1024 and packed.size_bytes < log_size // 2  # compressed
    child = new_sandbox(snapshot=plain.id)
    assert sh(engine, child, "sha256sum -c /root/sum") == "/root/random: OK\n"
    child2 = new_sandbox(snapshot=packed.id)
    assert int(sh(engine, child2, "stat -c %s /root/big.log")) == log_size


def test_survey_of_a_hostile_tree_never_blocks_or_follows(tmp_path) -> None:  # noqa: ANN001
    """The compressibility sample reads the sandbox's files from the host: a FIFO must not block it, a
    symlink must not lead it out of the tree, a sparse file must not make it read terabytes."""
    from shoal.storage.snapshots import survey
    tree = tmp_path / "upper"
    tree.mkdir()
    os.mkfifo(tree / "fifo")
    outside = tmp_path / "outside"
    outside.write_bytes(b"x" * (4 << 20))  # compressible: a followed link would sway the sample
    (tree / "link").symlink_to(outside)
    (tree / "random").write_bytes(os.urandom(8 << 20))
    with open(tree / "sparse", "wb") as f:
        f.truncate(1 << 40)
    fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    try:
        bounded = survey(fd, 256 << 20)
        assert bounded.size > 256 << 20  # stopped at the bound: the sparse file is not read
        os.unlink(tree / "sparse")
        full = survey(fd, 256 << 20)  # a 1 MiB stride: 8 samples of the random file
    finally:
        os.close(fd)
    assert full.size == 8 << 20 and full.raw == 8 * 16384 and not full.compressible() and full.mkfs_flags() == []


def _images(tmp_path: Path):  # noqa: ANN202
    from types import SimpleNamespace

    from shoal.storage.snapshots import SnapshotImages
    return SnapshotImages(SimpleNamespace(state_dir=tmp_path / "state", run_dir=tmp_path / "run"))  # type: ignore[arg-type]


def test_a_failing_or_hanging_mkfs_leaves_no_snapshot_and_no_process(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """mkfs.erofs runs beside the writeback of its output: its failure is reported with its last line, a
    run past the timeout is killed (no process left), and neither leaves a snapshot directory."""
    import shoal.storage.snapshots as snapshots
    from shoal.errors import RuntimeFailure
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "f").write_text("x")
    images = _images(tmp_path)
    failing = tmp_path / "mkfs-fails"
    failing.write_text("#!/bin/sh\necho 'first line'\necho 'disk on fire' >&2\nexit 3\n")
    failing.chmod(0o755)
    with pytest.raises(RuntimeFailure, match="exit code 3: disk on fire"):
        images.write(upper, "s1", {}, mkfs=str(failing))
    pid_file = tmp_path / "pid"
    hanging = tmp_path / "mkfs-hangs"
    hanging.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 60\n")
    hanging.chmod(0o755)
    monkeypatch.setattr(snapshots, "MKFS_TIMEOUT", 0.5)
    with pytest.raises(RuntimeFailure, match="longer than"):
        images.write(upper, "s2", {}, mkfs=str(hanging))
    pid = int(pid_file.read_text())
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    assert sorted(os.listdir(images.dir)) == []  # no snapshot, no temp directory


def test_snapshot_image_is_written_whole(tmp_path) -> None:  # noqa: ANN001
    """The image mkfs.erofs writes while its writeback runs is the same as one written without it."""
    import shutil
    import subprocess
    upper = tmp_path / "upper"
    (upper / "d").mkdir(parents=True)
    (upper / "d" / "random").write_bytes(os.urandom(6 << 20))
    (upper / "text").write_text("hello\n" * 200000)
    images = _images(tmp_path)
    images.write(upper, "s1", {"template": "t"})
    image = images.image("s1")
    fsck = shutil.which("fsck.erofs")
    if fsck:
        subprocess.run([fsck, "--extract=" + str(tmp_path / "out"), str(image)], check=True, capture_output=True)
        assert (tmp_path / "out" / "d" / "random").read_bytes() == (upper / "d" / "random").read_bytes()
        assert (tmp_path / "out" / "text").read_text() == "hello\n" * 200000
    assert '"size_bytes"' in (images.path("s1") / "meta.json").read_text()
