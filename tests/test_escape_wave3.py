"""Red team of wave 3's surfaces, as an attacker: sandbox root, a second API key, a hostile HTTP client.

Each test is one attack and asserts the SAFE behaviour, so it fails while the hole exists. Real
sandboxes, the real egress proxy and a real daemon on loopback; traffic only to loopback and to the
test host namespace that ``test_net_isolation.test_host`` makes. Attacks covered: the egress proxy
starved by one sandbox (slowloris before the per-sandbox cap), another key's private template used
as a base or a sandbox template, volumes without a count quota, a volume mount point that sandbox
root turned into a symlink (snapshot), cross-key snapshots/fork/volumes/exposed ports, hostile names
and xattrs in a snapshot, signed upload links of another key.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import httpx
import pytest

from shoal.engine.engine import Engine
from shoal.engine.keys import KeyStore, e2b_form
from test_net_isolation import TEST_HOST4, sh, test_host  # noqa: F401 - test_host is a fixture

TIMEOUT = httpx.Timeout(180.0, connect=10.0)
DOMAIN_POLICY = {"deny_out": ["0.0.0.0/0", "::/0"], "allow_out": ["allowed.example"]}


def _until(predicate, timeout: float = 60.0, what: str = "condition") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _refused(r: httpx.Response, *statuses: int) -> dict:
    assert r.status_code in statuses, f"expected {statuses}, got {r.status_code}: {r.text[:400]}"
    body = r.json()
    assert {"code", "message"} <= set(body) and "Traceback" not in r.text, body
    return body


class Key:
    """One API key of the daemon, native and E2B headers; deletes what it made."""

    def __init__(self, engine: Engine, url: str, name: str) -> None:
        self.store = KeyStore(engine.settings.db_path)
        self.record, self.secret = self.store.create(f"{name}-{secrets.token_hex(3)}")
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {self.secret}"}, timeout=TIMEOUT)
        self.e2b = httpx.Client(base_url=url, headers={"X-API-KEY": e2b_form(self.secret)}, timeout=TIMEOUT)
        self.sandboxes: list[str] = []

    def sandbox(self, **body: object) -> str:
        r = self.http.post("/v1/sandboxes", json={"template": "minimal", **body})
        assert r.status_code == 201, r.text
        self.sandboxes.append(r.json()["id"])
        return r.json()["id"]

    def sh(self, sid: str, script: str) -> dict:
        r = self.http.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": ["sh", "-c", script]})
        assert r.status_code == 200, r.text
        return r.json()

    def close(self) -> None:
        for sid in self.sandboxes:
            self.http.delete(f"/v1/sandboxes/{sid}")
        self.http.close()
        self.e2b.close()
        self.store.revoke(self.record.id)


@pytest.fixture(scope="module")
def keys(engine: Engine, daemon) -> Iterator:  # noqa: ANN001
    made: list[Key] = []

    def make(name: str) -> Key:
        made.append(Key(engine, daemon.url, name))
        return made[-1]
    yield make
    for k in made:
        k.close()


# --- egress proxy ---------------------------------------------------------------------------------
# First in the file: the daemon fixture (started by later tests) binds the same proxy port with
# SO_REUSEPORT, which would share the flood between two processes.

SLOWLORIS = r"""
import socket, sys, time
held = []
for _ in range(int(sys.argv[2])):
    try:
        s = socket.create_connection((sys.argv[1], 80), timeout=5)
        s.sendall(b"G")
        held.append(s)
    except OSError:
        pass
open("/tmp/held", "w").write(str(len(held)))
for _ in range(60):  # one byte every 3 s each: a head that never ends, never idle for HEAD_TIMEOUT
    time.sleep(3)
    for s in held:
        try:
            s.sendall(b"E")
        except OSError:
            pass
"""


def test_egress_proxy_one_sandbox_cannot_starve_the_others(engine: Engine, base_template: str,
                                                          test_host: str) -> None:  # noqa: F811
    """Sandbox A opens 600 connections to a port 80 the proxy checks and dribbles their heads; sandbox B
    (another tenant) must still get the proxy's answer (403 for a name its policy refuses)."""
    a = engine.create(base_template, wait=True, egress=DOMAIN_POLICY)
    b = engine.create("minimal", wait=True, egress=DOMAIN_POLICY)
    try:
        agent = engine.agent(a.id)
        agent.write_file("/tmp/slowloris.py", SLOWLORIS.encode())
        engine.run(a.id, ["sh", "-c", f"python3 /tmp/slowloris.py {TEST_HOST4} 600 >/dev/null 2>&1 &"], timeout=10)
        _until(lambda: agent.exists("/tmp/held"), 120, "the attacker's connections")
        request = "printf 'GET / HTTP/1.0\\r\\nHost: other.example\\r\\n\\r\\n'"
        code, out = sh(engine, b.id, f"{request} | nc -w 5 {TEST_HOST4} 80")
        assert "403" in out and "not an allowed name" in out, f"B got no answer from the proxy: {out!r}"
    finally:
        for rec in (a, b):
            engine.destroy(rec.id)


# --- templates built through E2B's API belong to their key ------------------------------------------

def _e2b_build(key: Key, name: str, body: dict) -> dict:
    """Request, trigger and wait for an E2B template build; the final status answer."""
    r = key.e2b.post("/v3/templates", json={"name": name})
    assert r.status_code == 202, r.text
    build = r.json()["buildID"]
    r = key.e2b.post(f"/v2/templates/{name}/builds/{build}", json=body)
    if r.status_code != 202:
        return {"status": "refused", "http": r.status_code, "body": r.json()}
    answer: dict = {}

    def done() -> bool:
        answer.update(key.e2b.get(f"/templates/{name}/builds/{build}/status").json())
        return answer["status"] in ("ready", "error")
    _until(done, 300, f"build of {name}")
    return answer


@pytest.fixture(scope="module")
def private_template(keys) -> Iterator[tuple[Key, str]]:  # noqa: ANN001
    """Key A's template, built through E2B's template API, with a secret baked in."""
    a = keys("tmpl-owner")
    name = f"w3-private-{secrets.token_hex(3)}"
    status = _e2b_build(a, name, {"fromTemplate": "minimal",
                                  "steps": [{"type": "RUN", "args": ["echo a-build-secret > /secret"]}]})
    assert status["status"] == "ready", status
    yield a, name
    a.e2b.delete(f"/templates/{name}")


def test_another_key_cannot_start_a_sandbox_from_a_private_template(keys, private_template) -> None:  # noqa: ANN001
    """Key B must not boot A's private template (its files are A's), natively nor through E2B."""
    a, name = private_template
    b = keys("tmpl-thief")
    r = b.http.post("/v1/sandboxes", json={"template": name})
    if r.status_code == 201:
        b.sandboxes.append(r.json()["id"])
    _refused(r, 403, 404)
    r = b.e2b.post("/sandboxes", json={"templateID": name, "timeout": 60})
    if r.status_code == 201:
        b.http.delete(f"/v1/sandboxes/{r.json()['sandboxID']}")
    assert r.status_code in (403, 404), r.text
    # the owner still can
    sid = a.sandbox(template=name)
    assert a.sh(sid, "cat /secret")["stdout"] == "a-build-secret\n"


def test_another_key_cannot_build_from_a_private_template(keys, private_template) -> None:  # noqa: ANN001
    """FROM A's private template in B's build would copy A's files into B's template."""
    _, name = private_template
    b = keys("tmpl-builder")
    mine = f"w3-steal-{secrets.token_hex(3)}"
    status = _e2b_build(b, mine, {"fromTemplate": name, "steps": [{"type": "RUN", "args": ["cat /secret"]}]})
    try:
        assert status["status"] in ("refused", "error"), status
        assert "a-build-secret" not in str(status)
    finally:
        b.e2b.delete(f"/templates/{mine}")


# --- volumes --------------------------------------------------------------------------------------

def test_a_key_cannot_make_unbounded_volumes(keys) -> None:  # noqa: ANN001
    """Each volume is an ext4 image on the host's disk (16 MiB of metadata for a 1 TiB one, made in 0.1 s):
    without a count quota one key fills the host's disk without writing a byte."""
    k = keys("vol-hoarder")
    made: list[str] = []
    try:
        refused = None
        for n in range(150):
            r = k.http.post("/v1/volumes", json={"name": f"v{n}", "size_mb": 16})
            if r.status_code != 201:
                refused = r
                break
            made.append(f"v{n}")
        assert refused is not None, "150 volumes made by one key, no quota"
        _refused(refused, 429, 403, 409, 507)
    finally:
        for name in made:
            k.http.delete(f"/v1/volumes/{name}")


def test_volume_mount_point_that_sandbox_root_made_a_symlink(engine: Engine, new_sandbox) -> None:  # noqa: ANN001
    """Sandbox root replaces /data by a symlink to /.shoal (the agent runtime, where no volume may go) and
    snapshots; a sandbox from that snapshot with a volume at /data must not get the volume over /.shoal."""
    sid = new_sandbox()
    assert engine.run(sid, ["sh", "-c", "ln -s /.shoal /data && ln -s /proc /data2"]).exit_code == 0
    snap = engine.snapshots.create(sid)
    vol = engine.volumes.create(f"w3-{secrets.token_hex(3)}", 16)
    child = None
    try:
        for path in ("/data", "/data2"):
            try:
                child = new_sandbox(snapshot=snap.id, volumes=[{"name": vol.name, "path": path}])
            except Exception as exc:  # noqa: BLE001 - a refusal is safe; say what it was
                assert "symlink" in str(exc) or "link" in str(exc), f"create failed oddly: {exc}"
                continue
            res = engine.run(child, ["sh", "-c", "ls /.shoal | head -3; test -e /proc/self/status && echo PROC"])
            assert "PROC" in res.stdout, res
            assert engine.run(child, ["sh", "-c", "grep -c ' /.shoal ' /proc/self/mountinfo"]).stdout.strip() == "1"
            engine.destroy(child)
    finally:
        for rec in engine.list():
            if rec.snapshot == snap.id:
                engine.destroy(rec.id)
        engine.volumes.remove(vol.name)
        engine.snapshots.delete(snap.id)


# --- cross-key: snapshots, fork, volumes, exposed ports, upload links (held) ----------------------

def test_second_key_cannot_touch_the_first_keys_snapshots_forks_volumes_or_ports(keys) -> None:  # noqa: ANN001
    a, b = keys("owner"), keys("intruder")
    sid = a.sandbox()
    a.sh(sid, "echo a-secret > /root/secret")
    r = a.http.post(f"/v1/sandboxes/{sid}/snapshots", json={"name": "mine"})
    assert r.status_code == 201, r.text
    snap = r.json()["id"]
    vol = f"vol-{secrets.token_hex(3)}"
    r = a.http.post("/v1/volumes", json={"name": vol, "size_mb": 16})
    assert r.status_code == 201, r.text
    vol_id = r.json()["id"]
    try:
        for ref in (snap, "mine"):  # by id and by name
            _refused(b.http.get(f"/v1/snapshots/{ref}"), 404)
            _refused(b.http.delete(f"/v1/snapshots/{ref}"), 404)
            _refused(b.http.post("/v1/sandboxes", json={"template": "minimal", "snapshot": ref}), 404)
            _refused(b.http.post(f"/v1/snapshots/{ref}/template", json={"name": f"t{secrets.token_hex(3)}"}),
                     403, 404)
            assert b.e2b.post("/sandboxes", json={"templateID": ref}).status_code in (400, 403, 404)
            assert b.e2b.delete(f"/templates/{ref}").status_code == 404
        assert b.http.get("/v1/snapshots").json() == []
        assert b.e2b.get("/snapshots").json() == []
        _refused(b.http.post(f"/v1/sandboxes/{sid}/snapshots", json={}), 404)
        _refused(b.http.post(f"/v1/sandboxes/{sid}/fork", json={"count": 1}), 404)
        assert b.e2b.post(f"/sandboxes/{sid}/fork", json={"count": 1}).status_code == 404
        for ref in (vol, vol_id):
            _refused(b.http.post("/v1/sandboxes", json={"template": "minimal",
                                                        "volumes": [{"name": ref, "path": "/v"}]}), 404)
            assert b.e2b.get(f"/volumes/{ref}").status_code == 404
            assert b.e2b.delete(f"/volumes/{ref}").status_code == 404
        _refused(b.http.post(f"/v1/sandboxes/{sid}/exposed-ports", json={"port": 8000}), 404)
        _refused(b.http.get(f"/v1/sandboxes/{sid}/exposed-ports"), 404)
        # the default bind of an exposure is loopback, and no port below 1024
        r = a.http.post(f"/v1/sandboxes/{sid}/exposed-ports", json={"port": 8000})
        assert r.status_code == 201 and r.json()["bind"] == "127.0.0.1", r.text
        _refused(a.http.post(f"/v1/sandboxes/{sid}/exposed-ports", json={"port": 8001, "host_port": 80}), 400, 422)
    finally:
        a.http.delete(f"/v1/sandboxes/{sid}")
        a.sandboxes.remove(sid)
        a.http.delete(f"/v1/snapshots/{snap}")
        a.http.delete(f"/v1/volumes/{vol}")


def test_upload_link_of_one_key_is_not_another_keys(keys) -> None:  # noqa: ANN001
    """A signed template-upload URL names its key, hash and expiry: changing any of them is refused, and
    an expiry far in the future is refused even if signed."""
    a, b = keys("uploader"), keys("forger")
    digest = secrets.token_hex(32)
    r = a.e2b.get(f"/templates/whatever/files/{digest}")
    assert r.status_code == 201 and r.json()["present"] is False, r.text
    url = httpx.URL(r.json()["url"])
    path, q = url.path, dict(url.params)
    b_path = path.replace(a.record.id, b.record.id)
    other = secrets.token_hex(32)
    later, far = str(int(q["expires"]) + 1), str(int(time.time()) + 10**9)
    for p, params in ((b_path, q), (path.replace(digest, other), q), (path, {**q, "expires": later}),
                      (path, {**q, "expires": far})):
        r = b.http.put(p, params=params, content=b"x" * 10)
        assert r.status_code in (403, 404), (p, r.status_code, r.text)
    assert b.e2b.get(f"/templates/whatever/files/{digest}").json()["present"] is False


# --- snapshots: hostile trees -----------------------------------------------------------------------

def test_snapshot_of_hostile_names_xattrs_and_a_deep_tree(engine: Engine, new_sandbox, base_template) -> None:  # noqa: ANN001
    """Names with newlines and ``..``-like bytes, a maximal xattr, a 200-deep tree, a fifo and a symlink
    to a host path: mkfs.erofs packs them as data (the host follows nothing) and a new sandbox sees them."""
    sid = new_sandbox(base_template)
    script = r"""
import os
os.makedirs("/w3", exist_ok=True)
open("/w3/a\nb", "w").write("newline")
open("/w3/..\x01..", "w").write("dots")
os.symlink("/etc/shadow", "/w3/hostlink")
os.mkfifo("/w3/fifo")
p = "/w3/deep"
for i in range(200):
    p += "/d"
os.makedirs(p)
open(p + "/leaf", "w").write("leaf")
os.setxattr("/w3/a\nb", "user.big", b"x" * 3000)
print("ok")
"""
    res = engine.run(sid, ["python3", "-c", script])
    assert res.stdout.strip() == "ok", res
    snap = engine.snapshots.create(sid)
    try:
        child = new_sandbox(snapshot=snap.id)
        check = r"""
import os
p = "/w3/deep" + "/d" * 200 + "/leaf"
print(open("/w3/a\nb").read(), open("/w3/..\x01..").read(), os.readlink("/w3/hostlink"), open(p).read(),
      len(os.getxattr("/w3/a\nb", "user.big")))
"""
        out = engine.run(child, ["python3", "-c", check])
        assert out.stdout.split() == ["newline", "dots", "/etc/shadow", "leaf", "3000"], out
        engine.destroy(child)
    finally:
        engine.snapshots.delete(snap.id)


def test_volume_mount_point_made_a_symlink_before_a_restart(engine: Engine, new_sandbox) -> None:  # noqa: ANN001
    from shoal.engine.models import PauseMode
    vol = engine.volumes.create(f"w3-{secrets.token_hex(3)}", 16)
    try:
        sid = new_sandbox(volumes=[{"name": vol.name, "path": "/x/lib"}])
        assert engine.run(sid, ["sh", "-c", "mv /x /y && ln -s /.shoal /x"]).exit_code == 0
        engine.pause(sid, mode=PauseMode.FILESYSTEM)
        try:
            engine.resume(sid)
        except Exception as exc:  # noqa: BLE001 - a clear refusal is safe
            assert "symlink" in str(exc), f"resume failed oddly: {exc}"
            return
        engine.agent(sid).wait_ready()
        assert engine.run(sid, ["sh", "-c", "grep -c ' /.shoal' /proc/self/mountinfo"]).stdout.strip() == "1"
    finally:
        for rec in engine.list():
            if any(m["id"] == vol.id for m in rec.volumes):
                engine.destroy(rec.id)
        engine.volumes.remove(vol.name)


def test_a_sparse_file_cannot_freeze_a_sandbox_through_a_snapshot(engine: Engine, new_sandbox) -> None:  # noqa: ANN001
    """Sandbox root makes a 1 TiB sparse file (a few KiB on disk): a snapshot would read a terabyte of zeros
    with the sandbox frozen and a daemon thread held. It is refused at once, nothing is left, the sandbox
    runs on."""
    from shoal.errors import Conflict

    sid = new_sandbox()
    tib = 1 << 40
    made = engine.run(sid, ["sh", "-c", f"truncate -s {tib} /root/sparse && ln /root/sparse /root/again"])
    assert made.exit_code == 0
    before = {s.id for s in engine.snapshots.list()}
    with pytest.raises(Conflict, match="sparse"):
        engine.snapshots.create(sid)
    assert {s.id for s in engine.snapshots.list()} == before
    assert engine.get(sid).state.value == "running"
    assert engine.run(sid, ["echo", "alive"]).stdout == "alive\n"
    assert engine.run(sid, ["rm", "/root/sparse", "/root/again"]).exit_code == 0
    snap = engine.snapshots.create(sid)  # once the sandbox removed it, a snapshot works
    engine.snapshots.delete(snap.id)
