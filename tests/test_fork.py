"""Fork (engine/fork.py): N running sandboxes from one internal snapshot of a running parent.

Real sandboxes, a real daemon, E2B's own SDK. Memory is not copied (the API says so); files are.
"""

from __future__ import annotations

import time

import httpx
import pytest

from shoal.engine.fork import fork
from shoal.engine.keys import e2b_form
from shoal.errors import InvalidRequest, NotFound


def test_fork_ten_of_a_sandbox_with_100_mb(engine, new_sandbox) -> None:  # noqa: ANN001
    parent = new_sandbox(env={"FROM_PARENT": "yes"}, metadata={"who": "parent"}, memory_mb=256, disk_mb=512,
                         timeout=900)
    engine.agent(parent).run(["sh", "-c", "mkdir /data; for i in 0 1 2 3 4 5 6 7 8 9; do"
                                          " head -c 10485760 /dev/urandom > /data/$i; done; md5sum /data/* > /sums"],
                             timeout=120)
    started = time.perf_counter()
    children = fork(engine, parent, 10)
    took = time.perf_counter() - started
    print(f"\nfork x10 of 100 MB: {took * 1000:.0f} ms ({took * 100:.0f} ms per child)")
    ids = [c.id for c in children]
    try:
        assert all(not isinstance(c, Exception) for c in children), children
        assert len(set(ids)) == 10 and parent not in ids
        snap_id = children[0].snapshot
        assert snap_id and all(c.snapshot == snap_id for c in children)
        assert engine.snapshots.list() == [] or all(s.id != snap_id for s in engine.snapshots.list())  # internal
        for c in children:
            assert (c.template, c.memory_mb, c.disk_mb, c.env, c.metadata) == (
                "minimal", 256, 512, {"FROM_PARENT": "yes"}, {"who": "parent"})
            assert c.expires_at is not None
            r = engine.agent(c.id).run(["sh", "-c", "md5sum -c /sums >/dev/null && echo ok; echo $FROM_PARENT"])
            assert r.stdout_bytes == b"ok\nyes\n", r
        assert engine.agent(parent).run(["true"]).exit_code == 0  # the parent keeps running
        engine.agent(ids[0]).run(["sh", "-c", "rm /data/0"])
        assert engine.agent(parent).run(["test", "-e", "/data/0"]).exit_code == 0
    finally:
        for sid in ids:
            engine.destroy(sid)
    # the internal snapshot went with the last fork
    with pytest.raises(NotFound):
        engine.snapshots.get(snap_id, internal=True)
    assert not engine.snapshots.images.path(snap_id).exists()


def test_fork_refuses_bad_counts_and_unknown_sandboxes(engine, new_sandbox) -> None:  # noqa: ANN001
    parent = new_sandbox()
    for bad in (0, 101, -1, True, "2"):
        with pytest.raises(InvalidRequest):
            fork(engine, parent, bad)  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        fork(engine, "nosuchsandbox", 1)


def test_rest_fork(daemon, minimal_template) -> None:  # noqa: ANN001
    with httpx.Client(base_url=daemon.url, headers=daemon.headers, timeout=120) as c:
        sid = c.post("/v1/sandboxes", json={"template": "minimal", "internet": False}).json()["id"]
        made: list[str] = []
        try:
            c.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": ["sh", "-c", "echo state > /root/s"]})
            r = c.post(f"/v1/sandboxes/{sid}/fork", json={"count": 3})
            assert r.status_code == 201, r.text
            body = r.json()
            assert body["memory_copied"] is False and len(body["forks"]) == 3
            made = [f["sandbox"]["id"] for f in body["forks"]]
            for f in body["forks"]:
                assert f["error"] is None and f["sandbox"]["state"] == "running"
                assert f["sandbox"]["internet"] is False  # the parent's setting
                r = c.post(f"/v1/sandboxes/{f['sandbox']['id']}/exec", json={"cmd": ["cat", "/root/s"]})
                assert r.json()["stdout"] == "state\n"
            for bad in ({"count": 0}, {"count": 101}, {"count": "x"}, {"nope": 1}):
                r = c.post(f"/v1/sandboxes/{sid}/fork", json=bad)
                assert r.status_code in (400, 422) and "code" in r.json(), (bad, r.text)
            r = c.post("/v1/sandboxes/nosuchbox/fork", json={"count": 1})
            assert r.status_code == 404 and r.json()["code"] == "not_found"
        finally:
            for x in [*made, sid]:
                c.delete(f"/v1/sandboxes/{x}")


def test_e2b_sdk_fork(daemon, base_template, monkeypatch) -> None:  # noqa: ANN001
    e2b = pytest.importorskip("e2b")
    for k, v in {"E2B_API_KEY": e2b_form(daemon.key), "E2B_API_URL": daemon.url,
                 "E2B_SANDBOX_URL": daemon.url}.items():
        monkeypatch.setenv(k, v)
    sb = e2b.Sandbox.create("base", timeout=600)
    try:
        sb.files.write("/home/user/state.txt", "state before fork")
        forks = sb.fork(count=2, timeout=120)
        assert len(forks) == 2 and all(isinstance(f, e2b.Sandbox) for f in forks), forks
        try:
            for f in forks:
                assert f.sandbox_id != sb.sandbox_id and f.is_running()
                assert f.files.read("/home/user/state.txt") == "state before fork"
            forks[0].files.write("/home/user/state.txt", "modified in fork")
            assert sb.files.read("/home/user/state.txt") == "state before fork"
            assert sb.is_running()
        finally:
            for f in forks:
                f.kill()
        with pytest.raises(e2b.exceptions.InvalidArgumentException):
            e2b.Sandbox.fork(sb.sandbox_id, count=0)
    finally:
        sb.kill()
    with pytest.raises(e2b.SandboxNotFoundException):
        e2b.Sandbox.fork(sb.sandbox_id)


def test_cli_and_sdk_snapshot_and_fork(daemon, minimal_template) -> None:  # noqa: ANN001
    import os
    import subprocess

    from shoal.client import Sandbox

    env = {**os.environ, "SHOAL_URL": daemon.url, "SHOAL_API_KEY": daemon.key}

    def shoal(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["/opt/shoal/venv/bin/shoal", *args], env=env, capture_output=True, text=True,
                              timeout=120)

    sb = Sandbox.create("minimal", url=daemon.url, api_key=daemon.key)
    made: list[str] = []
    try:
        sb.commands.run("echo cli > /root/c")
        snap = shoal("snapshot", "create", sb.id, "--name", "cli-snap")
        assert snap.returncode == 0, snap.stderr
        snap_id = snap.stdout.strip()
        assert snap_id.startswith("snap") and "\n" not in snap_id
        assert "cli-snap" in shoal("snapshot", "ls").stdout
        child = shoal("create", "--snapshot", "cli-snap")
        assert child.returncode == 0, child.stderr
        made.append(child.stdout.strip())
        first = Sandbox.connect(made[0], url=daemon.url, api_key=daemon.key)
        assert first.commands.run("cat /root/c").stdout == "cli\n"
        first.close()
        busy = shoal("snapshot", "rm", snap_id)
        assert busy.returncode != 0 and busy.stderr.count("\n") == 1 and "in use" in busy.stderr
        forked = shoal("fork", sb.id, "-n", "2")
        assert forked.returncode == 0, forked.stderr
        ids = forked.stdout.split()
        made += ids
        assert len(ids) == 2 and all(len(i) == 12 for i in ids)
        bad = shoal("fork", sb.id, "-n", "0")
        assert bad.returncode != 0 and bad.stderr.startswith("shoal: ") and bad.stderr.count("\n") == 1
        # the SDK directly
        kids = sb.fork(1)
        made += [k.id for k in kids]
        assert kids[0].commands.run("cat /root/c").stdout == "cli\n"
        info = sb.create_snapshot()
        assert any(s["id"] == info["id"] for s in Sandbox.list_snapshots(sb.id, url=daemon.url, api_key=daemon.key))
        assert Sandbox.delete_snapshot(info["id"], url=daemon.url, api_key=daemon.key) is True
        assert Sandbox.delete_snapshot(info["id"], url=daemon.url, api_key=daemon.key) is False
    finally:
        for x in made:
            Sandbox.kill(x, url=daemon.url, api_key=daemon.key)
        sb.kill()
    assert shoal("snapshot", "rm", "cli-snap").returncode == 0
