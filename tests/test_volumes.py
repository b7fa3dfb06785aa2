"""Named volumes: shared between sandboxes, read-only or read-write, size-limited by the kernel, outliving
their sandboxes, per API key, and never a way for a sandbox to make the host follow its symlinks.

Real sandboxes and a real daemon (``daemon`` fixture); a second API key is made in the same store.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shoal.engine.engine import Engine
from shoal.engine.models import PauseMode
from shoal.runtime.linux import mounts
from shoal.storage.layers import loop_backing

TIMEOUT = httpx.Timeout(120.0, connect=10.0)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text[:400]}"
    body = r.json()
    assert set(body) == {"code", "message"} and body["message"], body
    assert "Traceback" not in r.text
    return body


class Api:
    """The daemon as one API key sees it; deletes what it made."""

    def __init__(self, url: str, secret: str) -> None:
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {secret}"}, timeout=TIMEOUT)
        self.sandboxes: list[str] = []
        self.volumes: list[str] = []

    def volume(self, size_mb: int = 64) -> str:
        name = f"vol-{secrets.token_hex(4)}"
        r = self.http.post("/v1/volumes", json={"name": name, "size_mb": size_mb})
        assert r.status_code == 201, r.text
        self.volumes.append(name)
        return name

    def sandbox(self, volumes: list[dict], **extra: object) -> str:
        r = self.http.post("/v1/sandboxes", json={"template": "minimal", "volumes": volumes, **extra})
        assert r.status_code == 201, r.text
        self.sandboxes.append(r.json()["id"])
        return r.json()["id"]

    def sh(self, sid: str, script: str) -> dict:
        r = self.http.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": ["sh", "-c", script]})
        assert r.status_code == 200, r.text
        return r.json()

    def delete(self, sid: str) -> None:
        assert self.http.delete(f"/v1/sandboxes/{sid}").status_code in (204, 404)

    def close(self) -> None:
        for sid in self.sandboxes:
            self.delete(sid)
        for name in self.volumes:
            self.http.delete(f"/v1/volumes/{name}")
        self.http.close()


@pytest.fixture
def api(daemon) -> Iterator[Api]:  # noqa: ANN001
    a = Api(daemon.url, daemon.key)
    yield a
    a.close()


@pytest.fixture
def other_api(daemon, engine: Engine) -> Iterator[Api]:  # noqa: ANN001
    key, secret = engine.keys.create(f"test-volumes-{secrets.token_hex(3)}")
    a = Api(daemon.url, secret)
    yield a
    a.close()
    engine.keys.revoke(key.id)


def test_volume_shared_by_two_sandboxes_outlives_them(api: Api, engine: Engine):
    name = api.volume()
    a = api.sandbox([{"name": name, "path": "/data"}])
    b = api.sandbox([{"name": name, "path": "/srv/shared"}])
    assert api.sh(a, "echo from-a > /data/note && ls -ldn /data")["exit_code"] == 0
    out = api.sh(b, "cat /srv/shared/note; stat -c %u /srv/shared")
    assert out["stdout"].split() == ["from-a", "0"], out  # the volume's root belongs to sandbox root
    vol = api.http.get(f"/v1/volumes/{name}").json()
    assert sorted(vol["sandboxes"]) == sorted([a, b]) and vol["total_bytes"] > 0, vol
    vid = vol["id"]
    api.delete(a)
    api.delete(b)
    images = engine.volumes.images
    assert not images.is_mounted(vid), "the host mount goes with the last sandbox that used it"
    c = api.sandbox([{"name": name, "path": "/data"}])
    assert api.sh(c, "cat /data/note")["stdout"] == "from-a\n"
    assert api.http.get(f"/v1/volumes/{name}").json()["sandboxes"] == [c]


def test_read_only_mount_refuses_writes(api: Api):
    name = api.volume()
    rw = api.sandbox([{"name": name, "path": "/data"}])
    ro = api.sandbox([{"name": name, "path": "/data", "read_only": True}])
    api.sh(rw, "echo kept > /data/f")
    out = api.sh(ro, "cat /data/f; echo x > /data/f; echo y > /data/new; mount -o remount,rw /data; "
                     "echo z > /data/f; cat /data/f")
    assert "Read-only file system" in out["stderr"], out
    assert out["stdout"] == "kept\nkept\n", out
    assert api.sh(rw, "ls /data")["stdout"].split() == ["f", "lost+found"]


def test_full_volume_is_enospc_and_the_sandbox_lives_on(api: Api):
    name = api.volume(size_mb=32)
    sid = api.sandbox([{"name": name, "path": "/data"}])
    out = api.sh(sid, "dd if=/dev/zero of=/data/big bs=1M count=100 2>&1; echo rc=$?")
    assert "No space left on device" in out["stdout"] and "rc=1" in out["stdout"], out
    assert api.sh(sid, "echo alive")["stdout"] == "alive\n"
    size = int(api.sh(sid, "stat -c %s /data/big")["stdout"])
    assert size < 32 * 1024 * 1024, size


def test_rm_refused_while_in_use_then_gone(api: Api):
    name = api.volume()
    sid = api.sandbox([{"name": name, "path": "/data"}])
    body = _error(api.http.delete(f"/v1/volumes/{name}"), 409)
    assert sid in body["message"]
    api.http.post(f"/v1/sandboxes/{sid}/pause")  # paused: still in use
    _error(api.http.delete(f"/v1/volumes/{name}"), 409)
    api.delete(sid)
    assert api.http.delete(f"/v1/volumes/{name}").status_code == 204
    _error(api.http.get(f"/v1/volumes/{name}"), 404)
    _error(api.http.post("/v1/sandboxes", json={"template": "minimal",
                                                 "volumes": [{"name": name, "path": "/data"}]}), 404)


def test_another_key_cannot_see_or_mount_a_volume(api: Api, other_api: Api):
    name = api.volume()
    assert name not in [v["name"] for v in other_api.http.get("/v1/volumes").json()]
    _error(other_api.http.get(f"/v1/volumes/{name}"), 404)
    vid = api.http.get(f"/v1/volumes/{name}").json()["id"]
    _error(other_api.http.get(f"/v1/volumes/{vid}"), 404)  # not by its id either
    _error(other_api.http.delete(f"/v1/volumes/{name}"), 404)
    for ref in (name, vid):
        _error(other_api.http.post("/v1/sandboxes", json={"template": "minimal",
                                                          "volumes": [{"name": ref, "path": "/data"}]}), 404)
    # the same name is free for the other key, and is its own volume
    r = other_api.http.post("/v1/volumes", json={"name": name, "size_mb": 16})
    assert r.status_code == 201 and r.json()["id"] != vid, r.text
    other_api.volumes.append(name)
    assert api.http.get(f"/v1/volumes/{name}").json()["id"] == vid


@pytest.mark.parametrize("path", ["data", "/", "/proc", "/proc/x", "/sys", "/dev/shm", "/.shoal", "/.shoal/y",
                                  "/a/../proc", "/a/..", "/x\u0000y"])
def test_mount_path_is_checked(api: Api, path: str):
    name = api.volume(size_mb=16) if not api.volumes else api.volumes[0]
    _error(api.http.post("/v1/sandboxes", json={"template": "minimal",
                                                 "volumes": [{"name": name, "path": path}]}), 400)


def test_bad_names_sizes_and_overlaps_are_400(api: Api):
    for body in ({"name": "../x"}, {"name": "a/b"}, {"name": ""}, {"name": "-x"}, {"name": "x" * 64},
                 {"name": "ok", "size_mb": 1}, {"name": "ok", "size_mb": "big"}):
        _error(api.http.post("/v1/volumes", json=body), 400)
    name = api.volume(size_mb=16)
    _error(api.http.post("/v1/volumes", json={"name": name}), 409)
    _error(api.http.post("/v1/sandboxes", json={"template": "minimal", "volumes": [
        {"name": name, "path": "/data"}, {"name": name, "path": "/data/inner"}]}), 400)


def test_symlinks_a_sandbox_leaves_in_a_volume_do_nothing_on_host(api: Api, engine: Engine, host_marker: Path):
    """The sandbox points names in the volume at host paths; every host-side volume operation (usage,
    unmount, delete, reconcile) leaves those host paths alone."""
    name = api.volume(size_mb=16)
    target_dir = Path(f"/var/tmp/shoal-vol-symlink-{secrets.token_hex(3)}")
    sid = api.sandbox([{"name": name, "path": "/data"}])
    out = api.sh(sid, f"ln -s {host_marker} /data/marker && ln -s / /data/root && ln -s {target_dir} /data/dir && "
                      "mkdir /data/d && ln -s /etc/shadow /data/d/shadow && ls -l /data")
    assert out["exit_code"] == 0, out
    before = host_marker.read_bytes()
    vol = api.http.get(f"/v1/volumes/{name}").json()
    api.delete(sid)
    engine.reconcile()
    assert api.http.delete(f"/v1/volumes/{name}").status_code == 204
    api.volumes.remove(name)
    assert host_marker.read_bytes() == before
    assert not target_dir.exists()
    assert not engine.volumes.images.image(vol["id"]).exists()


def test_volume_comes_back_after_pause_to_filesystem(engine: Engine, new_sandbox):  # noqa: ANN001
    """A reboot-like stop: the sandbox's processes and the volume's host mount go; resume mounts it again."""
    vol = engine.volumes.create(f"fs-{secrets.token_hex(3)}", 16)
    try:
        sid = new_sandbox(volumes=[{"name": vol.name, "path": "/data"}])
        assert engine.run(sid, ["sh", "-c", "echo durable > /data/f"]).exit_code == 0
        engine.pause(sid, mode=PauseMode.FILESYSTEM)
        assert not engine.volumes.images.is_mounted(vol.id)
        engine.resume(sid)
        assert engine.run(sid, ["cat", "/data/f"]).stdout_bytes == b"durable\n"
        engine.destroy(sid)
    finally:
        engine.volumes.remove(vol.name)


def test_reconcile_cleans_what_a_killed_volume_operation_left(engine: Engine):
    """SIGKILL in the middle of create (image made, no record; a half-made temporary) or of rm (record gone,
    image and mount left): reconcile removes every trace, and leaves live volumes alone."""
    images = engine.volumes.images
    live = engine.volumes.create(f"live-{secrets.token_hex(3)}", 16)
    orphan = "v" + secrets.token_hex(8)
    images.create(orphan, 16)  # create killed before its record
    images.mount(orphan)  # rm killed after the record, before the unmount
    unused = engine.volumes.create(f"unused-{secrets.token_hex(3)}", 16)
    images.mount(unused.id)  # a mount nobody uses (the last user's release was cut short)
    dead_tmp = images.dir / f".{images.resource('v' + secrets.token_hex(8))}.ext4.999999999.tmp"
    dead_tmp.write_bytes(b"half")
    try:
        engine.reconcile()
        assert not images.image(orphan).exists() and not mounts.is_mounted(images.mount_point(orphan))
        assert not loop_backing(images.image(orphan))
        assert not images.is_mounted(unused.id) and images.image(unused.id).exists()
        assert images.image(live.id).exists()
        assert not dead_tmp.exists()
        assert orphan not in images.existing()
    finally:
        for v in (live, unused):
            engine.volumes.remove(v.name)
    assert not any(n.startswith(images.resource("")) for n in os.listdir(images.dir)
                   if n.endswith(tuple([f"{live.id}.ext4", f"{unused.id}.ext4"])))


# --- E2B's volumes API, through the official SDK -----------------------------------------------------

@pytest.fixture
def e2b_env(daemon, base_template) -> Iterator[None]:  # noqa: ANN001
    pytest.importorskip("e2b")
    from shoal.engine.keys import e2b_form

    env = {"E2B_API_KEY": e2b_form(daemon.key), "E2B_API_URL": daemon.url, "E2B_SANDBOX_URL": daemon.url}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_e2b_sdk_volumes(e2b_env):  # noqa: ANN001
    from e2b import Sandbox, Volume

    name = f"e2b-{secrets.token_hex(4)}"
    vol = Volume.create(name)
    sandboxes = []
    try:
        assert vol.name == name and vol.volume_id
        assert name in [v.name for v in Volume.list()]
        assert Volume.get_info(vol.volume_id).name == name
        a = Sandbox.create("base", volume_mounts={"/data": vol}, timeout=600)
        sandboxes.append(a)
        b = Sandbox.create("base", volume_mounts={"/mnt/shared": name}, timeout=600)
        sandboxes.append(b)
        a.commands.run("echo via-e2b > /data/f", user="root")
        assert b.commands.run("cat /mnt/shared/f", user="root").stdout == "via-e2b\n"
        with pytest.raises(Exception) as err:  # in use
            Volume.destroy(vol.volume_id)
        assert "in use" in str(err.value), err.value
    finally:
        for sb in sandboxes:
            sb.kill()
    assert Volume.destroy(vol.volume_id) in (True, None)
    assert name not in [v.name for v in Volume.list()]


# --- the CLI and the SDK ---------------------------------------------------------------------------

def _shoal(daemon, *args: str) -> tuple[int, str, str]:  # noqa: ANN001
    import subprocess

    env = {**os.environ, "SHOAL_URL": daemon.url, "SHOAL_API_KEY": daemon.key}
    p = subprocess.run(["/opt/shoal/venv/bin/shoal", *args], capture_output=True, text=True, timeout=120, env=env)
    return p.returncode, p.stdout, p.stderr


def test_cli_volume_verbs_and_create_volume(daemon):  # noqa: ANN001
    name = f"cli-{secrets.token_hex(4)}"
    assert _shoal(daemon, "volume", "create", name, "--size", "32")[:2] == (0, name + "\n")
    code, out, _ = _shoal(daemon, "volume", "ls")
    assert code == 0 and name in out
    code, sid, err = _shoal(daemon, "create", "--volume", f"{name}:/data", "--volume", f"{name}:/ro:ro")
    assert code == 0, err
    sid = sid.strip()
    try:
        code, out, err = _shoal(daemon, "exec", sid, "--", "sh", "-c", "echo x > /data/f; cat /ro/f; echo y > /ro/g")
        assert code != 0 and out == "x\n" and "Read-only" in err, (code, out, err)
        code, out, err = _shoal(daemon, "volume", "rm", name)
        assert code != 0 and err.count("\n") == 1 and "in use" in err and "Traceback" not in err, err
    finally:
        _shoal(daemon, "rm", sid)
    assert _shoal(daemon, "volume", "rm", name)[0] == 0
    for bad in ("nopath", f"{name}:", ":/data"):
        code, _, err = _shoal(daemon, "create", "--volume", bad)
        assert code != 0 and err.startswith("shoal:") and err.count("\n") == 1, err


def test_sdk_volumes(daemon):  # noqa: ANN001
    from shoal.client import Sandbox

    kw = {"url": daemon.url, "api_key": daemon.key}
    name = f"sdk-{secrets.token_hex(4)}"
    assert Sandbox.create_volume(name, 16, **kw)["name"] == name
    sb = Sandbox.create(volumes=[{"name": name, "path": "/v"}], **kw)
    try:
        sb.files.write("/v/hello", "world")
        assert [v["sandboxes"] for v in Sandbox.list_volumes(**kw) if v["name"] == name] == [[sb.id]]
    finally:
        sb.kill()
        sb.close()
    Sandbox.delete_volume(name, **kw)
    assert name not in [v["name"] for v in Sandbox.list_volumes(**kw)]


def test_mcp_volumes(daemon):  # noqa: ANN001
    def call(tool: str, arguments: dict) -> dict:
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": arguments}}
        r = httpx.post(f"{daemon.url}/mcp", json=body, timeout=TIMEOUT,
                       headers={**daemon.headers, "Accept": "application/json, text/event-stream"})
        assert r.status_code == 200, r.text
        return r.json()["result"]

    name = f"mcp-{secrets.token_hex(4)}"
    assert call("create_volume", {"name": name, "size_mb": 16})["structuredContent"]["name"] == name
    sb = call("create_sandbox", {"volumes": [{"name": name, "path": "/m", "read_only": True}]})["structuredContent"]
    try:
        out = call("run_command", {"sandbox_id": sb["id"], "command": "touch /m/x"})
        assert "Read-only" in json.dumps(out), out
        refused = call("delete_volume", {"name": name})
        assert refused.get("isError") and "in use" in refused["content"][0]["text"], refused
    finally:
        call("delete_sandbox", {"sandbox_id": sb["id"]})
    left = call("delete_volume", {"name": name})["structuredContent"]["volumes"]
    assert name not in [v["name"] for v in left]


_CHURN = """
import sys
from shoal.engine.engine import Engine
e = Engine()
i = 0
while True:
    name = f"churn-{sys.argv[1]}-{i}"
    v = e.volumes.create(name, 16)
    with e.volumes.lock():
        e.volumes.images.mount(v.id)
    print(i, flush=True)
    e.volumes.release()
    e.volumes.remove(name)
    i += 1
"""


def test_sigkill_mid_volume_operations_leaks_nothing(engine: Engine):
    """A process creating, mounting, unmounting and removing volumes in a loop is SIGKILLed at several
    points; after reconcile no image, mount or loop device is left that no volume record explains, and
    no volume record is left without its image."""
    import signal
    import subprocess
    import sys
    import time

    tag = secrets.token_hex(3)
    images = engine.volumes.images
    before = images.existing()  # an earlier test's leftover would show here (see the assertion's message)
    for delay in (0.0, 0.05, 0.13, 0.31):
        p = subprocess.Popen([sys.executable, "-c", _CHURN, tag], stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdout.readline(), "the churn process did not start"
        time.sleep(delay)  # somewhere in the middle of some operation: where exactly does not matter
        p.send_signal(signal.SIGKILL)
        p.wait()
        engine.reconcile()
        mine = [v for v in engine.volumes.list() if v.name.startswith(f"churn-{tag}-")]
        recorded = {v.id for v in engine.volumes.list()}
        for vid in images.existing():
            assert vid in recorded, f"volume {vid}: host resources without a record ({_where(images, vid, before)})"
            assert not images.is_mounted(vid) or engine.volumes.users(vid), f"volume {vid} mounted, unused"
        for v in mine:
            assert images.image(v.id).is_file(), f"record {v.name} without its image"
            engine.volumes.remove(v.name)
        assert not [n for n in os.listdir(images.dir) if n.endswith(".tmp")]
    assert not [d for d in loop_backing_all() if d.startswith(str(images.dir))]


def _where(images, vid: str, before: set[str]) -> str:  # noqa: ANN001
    """Where an orphan's parts stand, for the failure message (whose it is, and what held it)."""
    from shoal.runtime.linux import mounts
    from shoal.storage.layers import loop_backing
    img, point = images.image(vid), images.mount_point(vid)
    mounted = point.exists() and mounts.is_mounted(point)
    return (f"there before the test {vid in before}, image {img.exists()}, mount point {point.exists()}, "
            f"mounted {mounted}, loops {loop_backing(img)}")


def loop_backing_all() -> list[str]:
    out = []
    for e in os.scandir("/sys/block"):
        try:
            with open(f"/sys/block/{e.name}/loop/backing_file") as f:
                out.append(f.read().strip().removesuffix(" (deleted)"))
        except OSError:
            pass
    return out


def test_removal_does_not_wait_forever_on_a_loop_device_on_its_way_out(engine: Engine):
    """A removed volume's image goes even while a loop device still holds it (a sandbox being torn down,
    or the kernel's detach after the last unmount, which takes seconds under heavy I/O): the removal
    used to answer Conflict *after* deleting the record, leaving an image no record explained and an
    API caller told to retry a removal that had happened. The device lets go by itself afterwards."""
    from shoal.storage.layers import attach_loop

    name = f"held-{secrets.token_hex(3)}"
    vol = engine.volumes.create(name, 16)
    image = engine.volumes.images.image(vol.id)
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        device, dev_fd = attach_loop(fd)  # a holder on its way out: auto-clear, gone at its last close
    finally:
        os.close(fd)
    try:
        assert loop_backing(image) == [device]
        engine.volumes.remove(name)  # no Conflict
        assert not image.exists()
        assert name not in [v.name for v in engine.volumes.list()]
        assert vol.id not in engine.volumes.images.existing()
    finally:
        os.close(dev_fd)
    deadline = time.monotonic() + 10
    while loop_backing(image) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not loop_backing(image), "the loop device outlived its last holder"
