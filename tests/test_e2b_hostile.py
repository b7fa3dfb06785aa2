"""The E2B facade and envd against hostile callers (issue 7, items 12-14), on a real daemon.

* uploads: a gzip bomb costs the daemon no memory; a body over the sandbox's free space or the
  configured maximum is refused while it is still arriving (nothing spooled on the host);
* signed file URLs: bound to their user and path whatever headers ride along, and never unbounded
  in time (``SHOAL_E2B_URL_MAX_LIFETIME``);
* bad JSON (100k deep, wrong types) is a 4xx JSON error on the control plane and every envd method.

A second daemon (its own state and run directories, so its own instance) runs with a 3 s URL
lifetime and a 64 MiB upload maximum, the settings under test; it deletes what it made at the end.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import TEST_ROOT, USER_STATE_DIR, _seed_templates, free_port
from shoal.engine.keys import e2b_form

e2b = pytest.importorskip("e2b")
from e2b.sandbox.signature import get_signature  # noqa: E402

ENVD = 49983
SHOAL = "/opt/shoal/venv/bin/shoal"
URL_LIFETIME = 3
MAX_UPLOAD = 64 * 1024 * 1024
DEEP = 100_000


class Daemon:
    """A ``shoal serve`` of its own instance: ``url``, ``key`` (its local key), ``proc``."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        for d in (root, root / "state", root / "run"):
            d.mkdir(exist_ok=True)
            os.chmod(d, 0o711)
        _seed_templates(USER_STATE_DIR / "templates", root / "state" / "templates")
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.env = {**os.environ, "SHOAL_STATE_DIR": str(root / "state"), "SHOAL_RUN_DIR": str(root / "run"), **env}
        self.log = open(root / "daemon.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([SHOAL, "serve", "--port", str(port)], env=self.env, stdout=self.log,
                                     stderr=self.log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, (root / "daemon.log").read_text()[-2000:]
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the second daemon did not come up"
            time.sleep(0.05)
        self.key = (root / "state" / "local.key").read_text().strip()

    def stop(self) -> None:
        """Delete its sandboxes, stop it, unmount and remove its directories."""
        from shoal.runtime.linux import mounts

        try:
            h = {"Authorization": f"Bearer {self.key}"}
            for sb in httpx.get(self.url + "/v1/sandboxes", headers=h, timeout=30).json():
                httpx.delete(f"{self.url}/v1/sandboxes/{sb['id']}", headers=h, timeout=60)
        finally:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.log.close()
            mounts.umount_tree(self.root)
            shutil.rmtree(self.root, ignore_errors=True)

    def peak_rss(self) -> int:
        """The daemon's peak resident memory so far (VmHWM), in bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def strict() -> Iterator[Daemon]:
    d = Daemon(TEST_ROOT / "e2b-hostile", {"SHOAL_E2B_URL_MAX_LIFETIME": str(URL_LIFETIME),
                                           "SHOAL_E2B_MAX_UPLOAD": str(MAX_UPLOAD)})
    try:
        yield d
    finally:
        d.stop()


class Box:
    """An E2B sandbox on a daemon, driven over plain HTTP as the SDK would."""

    def __init__(self, url: str, key: str, body: dict | None = None, sid: str | None = None) -> None:
        self.url, self.api = url, {"X-API-KEY": e2b_form(key)}
        if sid is None:
            r = httpx.post(url + "/sandboxes", headers=self.api, json=body or {"templateID": "base"}, timeout=60)
        else:
            r = httpx.post(f"{url}/sandboxes/{sid}/connect", headers=self.api, json={}, timeout=60)
        assert r.status_code in (200, 201), r.text
        self.id, self.token = r.json()["sandboxID"], r.json()["envdAccessToken"]
        self.envd = {"E2b-Sandbox-Id": self.id, "E2b-Sandbox-Port": str(ENVD)}

    def auth(self, **extra: str) -> dict[str, str]:
        return {**self.envd, "X-Access-Token": self.token, **extra}

    def write(self, path: str, data: bytes, user: str = "root") -> None:
        r = httpx.post(self.url + "/files", params={"path": path, "username": user}, content=data,
                       headers=self.auth(**{"Content-Type": "application/octet-stream"}), timeout=30)
        assert r.status_code == 200, r.text

    def run(self, cmd: str, user: str = "root") -> str:
        body = json.dumps({"process": {"cmd": "/bin/sh", "args": ["-c", cmd]}}).encode()
        basic = "Basic " + base64.b64encode(f"{user}:".encode()).decode()
        r = httpx.post(self.url + "/process.Process/Start", content=b"\0" + len(body).to_bytes(4, "big") + body,
                       headers=self.auth(**{"Content-Type": "application/connect+json", "Authorization": basic}),
                       timeout=30)
        out = b""
        data = r.content
        while data:
            flags, n = data[0], int.from_bytes(data[1:5], "big")
            msg = json.loads(data[5:5 + n])
            data = data[5 + n:]
            out += base64.b64decode(((msg.get("event") or {}).get("data") or {}).get("stdout", ""))
            assert not (flags & 2 and msg.get("error")), msg
        return out.decode()

    def kill(self) -> None:
        httpx.delete(f"{self.url}/sandboxes/{self.id}", headers=self.api, timeout=60)


@pytest.fixture(scope="module")
def box(daemon, base_template) -> Iterator[Box]:  # noqa: ANN001
    b = Box(daemon.url, daemon.key)
    try:
        yield b
    finally:
        b.kill()


def _error(r: httpx.Response, *statuses: int) -> dict:
    assert r.status_code in statuses, (r.status_code, r.text[:500])
    body = r.json()
    assert set(body) >= {"code", "message"} and "Traceback" not in r.text, body
    return body


# --- item 12: uploads -----------------------------------------------------------------------------

def _bomb(size: int) -> bytes:
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b"\0" * (1024 * 1024)
    return b"".join(comp.compress(block) for _ in range(size // len(block))) + comp.flush()


def test_gzip_bomb_costs_the_daemon_no_memory(strict: Daemon, base_template: str) -> None:
    """Three ~1 MiB bodies that inflate to 1 GiB each: refused at the maximum, daemon memory flat."""
    b = Box(strict.url, strict.key)
    bomb = _bomb(1024 * 1024 * 1024)
    assert len(bomb) < 2 * 1024 * 1024
    before = strict.peak_rss()
    for i in range(3):
        r = httpx.post(strict.url + "/files", params={"path": f"/tmp/bomb{i}"}, content=bomb, timeout=120,
                       headers=b.auth(**{"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"}))
        assert "larger than the daemon's maximum" in _error(r, 400)["message"]
    grown = strict.peak_rss() - before
    assert grown < 128 * 1024 * 1024, f"the daemon grew by {grown >> 20} MiB"
    assert b.run("ls /tmp").split().count("bomb0") == 0  # the abandoned write left nothing
    # a small gzip body still works, and so does the SDK's own gzip upload path
    r = httpx.post(strict.url + "/files", params={"path": "/tmp/small"}, content=gzip.compress(b"hello" * 1000),
                   headers=b.auth(**{"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"}))
    assert r.status_code == 200 and b.run("wc -c < /tmp/small").strip() == "5000"


def _open_ended_upload(url: str, headers: dict[str, str], multipart: bool, size: int) -> bytes:
    """POST ``size`` bytes of a body that never ends (chunked, no last chunk), then wait for the answer.
    An implementation that needs the whole body before answering never answers: the read times out."""
    host, port = url.removeprefix("http://").split(":")
    boundary = "hostileboundary"
    head = ["POST /files?path=/tmp/big HTTP/1.1", f"Host: {host}:{port}", "Transfer-Encoding: chunked",
            f"Content-Type: {'multipart/form-data; boundary=' + boundary if multipart else 'application/octet-stream'}",
            *(f"{k}: {v}" for k, v in headers.items())]
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        if multipart:
            part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big\"\r\n"
                    "Content-Type: application/octet-stream\r\n\r\n").encode()
            s.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        chunk = b"x" * (1024 * 1024)
        sent = 0
        try:
            while sent < size:
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon answered and closed: read what it said
        s.settimeout(30)
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = s.recv(65536)
            if not data:
                break
            answer += data
        return answer


@pytest.mark.parametrize("multipart", [True, False], ids=["multipart", "octet-stream"])
def test_upload_over_free_space_refused_while_streaming(daemon, base_template: str, multipart: bool) -> None:  # noqa: ANN001
    """A 16 MiB sandbox disk; 48 MiB sent of a body that never ends: 507 (envd's "not enough space")."""
    r = httpx.post(daemon.url + "/v1/sandboxes", headers=daemon.headers, timeout=60,
                   json={"template": "base", "disk_mb": 16})
    assert r.status_code == 201, r.text
    b = Box(daemon.url, daemon.key, sid=r.json()["id"])
    try:
        answer = _open_ended_upload(daemon.url, b.auth(), multipart, 48 * 1024 * 1024)
        assert answer.startswith(b"HTTP/1.1 507"), answer[:300]
    finally:
        b.kill()


def test_upload_over_configured_maximum_refused_while_streaming(strict: Daemon, base_template: str) -> None:
    b = Box(strict.url, strict.key)
    answer = _open_ended_upload(strict.url, b.auth(), True, MAX_UPLOAD + 8 * 1024 * 1024)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
    assert b"SHOAL_E2B_MAX_UPLOAD" in answer or b"maximum" in answer  # the head may come without the body


# --- item 13: signed file URLs --------------------------------------------------------------------

def _signed(box: Box, path: str, op: str, user: str | None = None, expires_in: int | None = None) -> str:
    sig = get_signature(path, op, user, box.token, expires_in)
    q = {"path": path, **({"username": user} if user else {}), "signature": sig["signature"]}
    if sig["expiration"]:
        q["signature_expiration"] = str(sig["expiration"])
    return box.url + "/files?" + httpx.QueryParams(q).__str__()


def test_signed_url_is_bound_to_its_user(box: Box) -> None:
    box.write("/root/secret.txt", b"root only")
    box.run("chmod 600 /root/secret.txt; chmod 700 /root")
    url = _signed(box, "/root/secret.txt", "read")  # signed for the default user
    r = httpx.get(url, headers={"Authorization": "Basic " + base64.b64encode(b"root:").decode()}, timeout=10)
    assert r.status_code != 200 and b"root only" not in r.content, r.status_code
    _error(r, 403, 404)
    ok = httpx.get(_signed(box, "/root/secret.txt", "read", user="root"), timeout=10)  # signed for root: fine
    assert ok.status_code == 200 and ok.content == b"root only"


def test_signed_upload_writes_its_path_only(box: Box) -> None:
    url = _signed(box, "/tmp/signed-target", "write")
    files = [("file", ("/tmp/smuggled-a", b"a")), ("file", ("/tmp/smuggled-b", b"b"))]
    r = httpx.post(url, files=files, timeout=10)
    assert r.status_code != 200, r.text
    _error(r, 400)
    assert "smuggled" not in box.run("ls /tmp")
    r = httpx.post(url, files={"file": ("/tmp/elsewhere", b"one")}, timeout=10)  # filename does not redirect it
    assert r.status_code == 200, r.text
    assert box.run("cat /tmp/signed-target") == "one" and "elsewhere" not in box.run("ls /tmp")


def test_signed_url_lifetime_is_capped(box: Box) -> None:
    far = _signed(box, "/tmp/x", "read", expires_in=10 * 24 * 3600)
    assert "expires more than" in _error(httpx.get(far, timeout=10), 401)["message"]
    box.write("/tmp/x", b"x")
    assert httpx.get(_signed(box, "/tmp/x", "read", expires_in=600), timeout=10).content == b"x"
    gone = _signed(box, "/tmp/x", "read", expires_in=-5)
    assert _error(httpx.get(gone, timeout=10), 401) == {"code": 401, "message": "signature is already expired"}


def test_unexpiring_url_expires_after_the_maximum_lifetime(strict: Daemon, base_template: str) -> None:
    b = Box(strict.url, strict.key)
    b.write("/tmp/u", b"u")
    url = _signed(b, "/tmp/u", "read")
    deadline = time.monotonic() + 60
    first = httpx.get(url, timeout=10)
    assert first.status_code in (200, 401)  # 200 unless the sandbox is already older than the lifetime
    while (r := httpx.get(url, timeout=10)).status_code == 200:
        assert time.monotonic() < deadline, "a URL without expiration is still honoured"
        time.sleep(0.2)
    assert "sign it with an expiration" in _error(r, 401)["message"]
    fresh = _signed(b, "/tmp/u", "read", expires_in=URL_LIFETIME)  # an expiring one still works
    assert httpx.get(fresh, timeout=10).content == b"u"


# --- item 14: bad JSON ------------------------------------------------------------------------------

NESTED = b"[" * DEEP + b"]" * DEEP
NESTED_OBJ = b'{"a":' * DEEP + b"1" + b"}" * DEEP


@pytest.mark.parametrize("body", [NESTED, NESTED_OBJ, b'{"timeout": NaN}', b'{"timeout": 1e999}'],
                         ids=["array", "object", "nan", "inf"])
def test_control_plane_refuses_hostile_json(daemon, body: bytes) -> None:  # noqa: ANN001
    api = {"X-API-KEY": e2b_form(daemon.key), "Content-Type": "application/json"}
    for path in ("/sandboxes", "/v2/sandboxes", "/sandboxes/nosuch/timeout", "/sandboxes/nosuch/connect"):
        _error(httpx.post(daemon.url + path, headers=api, content=body, timeout=30), 400, 404)
    token = base64.urlsafe_b64encode(NESTED[:2000]).decode()
    _error(httpx.get(daemon.url + "/v2/sandboxes", params={"nextToken": token}, headers=api, timeout=30), 400)


UNARY = ["process.Process/List", "process.Process/SendInput", "process.Process/SendSignal",
         "process.Process/CloseStdin", "process.Process/Update", "filesystem.Filesystem/Stat",
         "filesystem.Filesystem/MakeDir", "filesystem.Filesystem/Move", "filesystem.Filesystem/ListDir",
         "filesystem.Filesystem/Remove", "filesystem.Filesystem/CreateWatcher",
         "filesystem.Filesystem/GetWatcherEvents", "filesystem.Filesystem/RemoveWatcher"]
STREAMS = ["process.Process/Start", "process.Process/Connect", "process.Process/StreamInput",
           "filesystem.Filesystem/WatchDir"]


def _stream_end(r: httpx.Response) -> dict:
    """The end envelope's error of a Connect stream (asserting the stream is well formed)."""
    assert r.status_code == 200 and r.headers["content-type"] == "application/connect+json", r.text[:300]
    data, last = r.content, None
    while data:
        flags, n = data[0], int.from_bytes(data[1:5], "big")
        last = (flags, json.loads(data[5:5 + n]))
        data = data[5 + n:]
    assert last is not None and last[0] & 2, r.content[:300]
    return last[1].get("error") or {}


@pytest.mark.parametrize("method", UNARY + STREAMS)
def test_envd_refuses_nested_json(box: Box, method: str) -> None:
    for body in (NESTED, NESTED_OBJ):
        if method in STREAMS:
            r = httpx.post(f"{box.url}/{method}", content=b"\0" + len(body).to_bytes(4, "big") + body, timeout=30,
                           headers=box.auth(**{"Content-Type": "application/connect+json"}))
            assert _stream_end(r).get("code") == "invalid_argument"
        else:
            r = httpx.post(f"{box.url}/{method}", content=body, timeout=30,
                           headers=box.auth(**{"Content-Type": "application/json"}))
            assert _error(r, 400)["code"] == "invalid_argument"


WRONG_TYPES = [
    ("process.Process/SendInput", {"process": 5}),
    ("process.Process/SendInput", {"process": {"pid": 1}, "input": "x"}),
    ("process.Process/SendInput", {"process": {"pid": 1}, "input": {"stdin": 7}}),
    ("process.Process/SendInput", {"process": {"pid": [1]}}),
    ("process.Process/SendSignal", {"process": "x", "signal": "SIGNAL_SIGKILL"}),
    ("process.Process/SendSignal", {"process": {"pid": 1}, "signal": True}),
    ("process.Process/SendSignal", {"process": {"pid": 1e300}, "signal": 9}),
    ("process.Process/Update", {"process": {"pid": 1}, "pty": {"size": {"cols": "wide"}}}),
    ("process.Process/Update", {"process": {"pid": 1}, "pty": 3}),
    ("process.Process/CloseStdin", {"process": {"pid": -1}}),
    ("filesystem.Filesystem/ListDir", {"path": "/", "depth": "x"}),
    ("filesystem.Filesystem/ListDir", {"path": "/", "depth": -3}),
    ("filesystem.Filesystem/Stat", {"path": "\ud800"}),
    ("filesystem.Filesystem/CreateWatcher", {"path": "/tmp", "recursive": {"a": 1}}),
]


@pytest.mark.parametrize(("method", "body"), WRONG_TYPES)
def test_envd_refuses_wrong_types(box: Box, method: str, body: dict) -> None:
    r = httpx.post(f"{box.url}/{method}", content=json.dumps(body), timeout=30,
                   headers=box.auth(**{"Content-Type": "application/json"}))
    assert _error(r, 400)["code"] == "invalid_argument"


def test_envd_stream_refuses_wrong_types(box: Box) -> None:
    for body in ({"process": {"cmd": "true"}, "pty": {"size": {"rows": "tall"}}},
                 {"process": {"cmd": "true"}, "pty": 4}, {"process": []}, {"process": {"cmd": "true"}, "stdin": "y"}):
        raw = json.dumps(body).encode()
        r = httpx.post(f"{box.url}/process.Process/Start", content=b"\0" + len(raw).to_bytes(4, "big") + raw,
                       headers=box.auth(**{"Content-Type": "application/connect+json"}), timeout=30)
        assert _stream_end(r).get("code") == "invalid_argument", body
