"""Standby and wake: an idle sandbox freezes itself, any request through the gate wakes it, a sandbox its
user paused stays paused, an open stream keeps it awake, and a longer idleness pauses it to its files.

Real sandboxes and the real daemon. Standby is put in place either by the daemon's own loop (a sandbox
created with ``standby_after``) or, to test every surface alike without waiting, by the same engine call
the loop makes (``Engine.pause(reason=STANDBY)``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import websockets.sync.client as ws_client

import test_gate
from shoal.engine.engine import Engine
from shoal.engine.models import PauseMode, SandboxState
from shoal.engine.standby import STANDBY, Standby, wakes_on_traffic
from shoal.server.gate import Gate
from test_gate import _envd_token, _refusals

TIMEOUT = httpx.Timeout(60.0, connect=10.0)


def wait_for(predicate: Callable[[], object], timeout: float = 30.0) -> object:
    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


@pytest.fixture
def api(daemon) -> Iterator[httpx.Client]:  # noqa: ANN001
    with httpx.Client(base_url=daemon.url, headers=daemon.headers, timeout=TIMEOUT) as client:
        made: list[str] = []
        client.made = made  # type: ignore[attr-defined]
        yield client
        for sid in made:
            client.delete(f"/v1/sandboxes/{sid}")


def _create(api: httpx.Client, **extra: object) -> str:
    r = api.post("/v1/sandboxes", json={"template": "minimal", "timeout": 600, **extra})
    assert r.status_code == 201, r.text
    api.made.append(r.json()["id"])  # type: ignore[attr-defined]
    return r.json()["id"]


def _state(api: httpx.Client, sid: str) -> dict:
    return api.get(f"/v1/sandboxes/{sid}").json()  # a read of the record: not traffic, never wakes it


def test_idle_sandbox_goes_to_standby_by_itself_and_exec_wakes_it(api: httpx.Client):
    sid = _create(api, standby_after=1)
    r = api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": ["sh", "-c", "echo 41 > /tmp/n"]})
    assert r.status_code == 200 and r.json()["exit_code"] == 0
    boot = _state(api, sid)["boot_id"]
    info = wait_for(lambda: (s := _state(api, sid))["state"] == "paused" and s)
    assert info and info["pause_mode"] == "memory" and info["reason"].startswith("standby:"), _state(api, sid)
    r = api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": ["cat", "/tmp/n"]})  # the first request wakes it
    assert r.status_code == 200 and r.json()["stdout"] == "41\n", r.text
    after = _state(api, sid)
    assert after["state"] == "running" and after["reason"] is None and after["boot_id"] == boot  # memory kept


def test_every_surface_wakes_a_sandbox_in_standby(daemon, api: httpx.Client, engine: Engine):  # noqa: ANN001
    """exec (fast path), files, MCP, process WebSocket, envd, port proxy: each one, as the first request
    after a standby, wakes the sandbox through the gate and is answered."""
    sid = _create(api)
    token = _envd_token(daemon, sid)
    assert set(_refusals(daemon, api, sid, token).values()) == {"OK"}
    for surface in SURFACES:
        engine.pause(sid, reason=STANDBY)
        assert _state(api, sid)["state"] == "paused"
        assert _probe(daemon, api, sid, token, surface) == "OK", surface
        assert _state(api, sid)["state"] == "running", surface


SURFACES = ("exec", "files", "mcp", "websocket", "envd", "port")


def _probe(daemon, api: httpx.Client, sid: str, token: str, surface: str) -> str:  # noqa: ANN001
    """One request on one surface: "OK" or what it answered."""
    if surface == "exec":
        r = api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": ["true"]})
        return "OK" if r.status_code == 200 else r.text
    if surface == "files":
        r = api.get(f"/v1/sandboxes/{sid}/files", params={"path": "/etc/hostname"})
        return "OK" if r.status_code == 200 else r.text
    if surface == "mcp":
        res = test_gate._mcp_call(api, "run_command", {"sandbox_id": sid, "command": "true"})
        return "OK" if not res.get("isError") else str(res)
    if surface == "envd":
        r = httpx.post(f"{daemon.url}/process.Process/List", json={}, timeout=30,
                       headers={"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49983", "X-Access-Token": token,
                                "Content-Type": "application/json"})
        return "OK" if r.status_code == 200 else r.text
    if surface == "port":
        r = httpx.get(f"{daemon.url}/", headers={"Host": f"8000-{sid}.localhost", **daemon.headers}, timeout=30)
        return "OK" if "nothing listens" in r.json()["message"] else r.text
    url = daemon.url.replace("http", "ws") + f"/v1/sandboxes/{sid}/process"
    with ws_client.connect(url, additional_headers=daemon.headers) as ws:
        ws.send(json.dumps({"cmd": ["true"]}))
        first = json.loads(ws.recv(timeout=20))
    return "OK" if first["type"] == "start" else str(first)


def test_a_sandbox_the_user_paused_is_not_woken_by_traffic(api: httpx.Client, engine: Engine):
    sid = _create(api, standby_after=1)
    assert api.post(f"/v1/sandboxes/{sid}/pause").status_code == 200
    r = api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": ["true"]})
    assert r.status_code == 409 and "paused" in r.json()["message"], r.text
    assert _state(api, sid)["state"] == "paused" and _state(api, sid)["reason"] is None
    # a sandbox in standby that its user then pauses is the user's to resume
    assert api.post(f"/v1/sandboxes/{sid}/resume").status_code == 200
    assert wait_for(lambda: _state(api, sid)["state"] == "paused")
    assert api.post(f"/v1/sandboxes/{sid}/pause").status_code == 200
    assert not wakes_on_traffic(engine.get(sid))
    assert api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": ["true"]}).status_code == 409


def test_an_open_stream_keeps_it_awake(api: httpx.Client):
    """A request that lasts longer than ``standby_after`` is not frozen under itself: were it frozen, no
    new request would come to thaw it and this exec would never finish."""
    sid = _create(api, standby_after=1)
    r = api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": ["sh", "-c", "sleep 3; echo done"]})
    assert r.status_code == 200 and r.json()["stdout"] == "done\n", r.text


def test_standby_after_is_validated(api: httpx.Client):
    assert _state(api, _create(api, standby_after=0))["standby_after"] == 0  # 0: never
    for bad in (-1, "soon", 10**9):
        r = api.post("/v1/sandboxes", json={"template": "minimal", "standby_after": bad})
        assert r.status_code == 400 and set(r.json()) == {"code", "message"}, r.text


def test_longer_idleness_pauses_to_the_filesystem_and_a_request_boots_it_again(engine: Engine, new_sandbox):  # noqa: ANN001
    """The loop's decisions, driven with a clock of our own (no waiting): freeze after ``standby_after``,
    filesystem after ``SHOAL_STANDBY_FILESYSTEM_AFTER``; a request through the gate starts it again from
    its files. ``standby_after`` is an hour so that the test daemon's own loop stays out of it."""
    sid = new_sandbox(standby_after=3600)
    assert engine.run(sid, ["sh", "-c", "echo kept > /root/f"]).exit_code == 0
    boot = engine.get(sid).boot_id
    standby = Standby(engine, after=0, filesystem_after=7200)
    t0 = time.monotonic()
    standby.tick(t0)
    assert (sid, "memory") not in standby.tick(t0 + 1800)
    assert (sid, "memory") in standby.tick(t0 + 3601)
    rec = engine.get(sid)
    assert rec.state is SandboxState.PAUSED and rec.pause_mode == PauseMode.MEMORY.value and wakes_on_traffic(rec)
    assert (sid, "filesystem") in standby.tick(t0 + 7201)
    rec = engine.get(sid)
    assert rec.pause_mode == PauseMode.FILESYSTEM.value and wakes_on_traffic(rec)
    gate = Gate(engine, standby)
    assert gate.usable(sid, None).state is SandboxState.RUNNING  # type: ignore[arg-type]
    rec = engine.get(sid)
    assert rec.boot_id != boot and rec.reason is None
    assert engine.run(sid, ["cat", "/root/f"]).stdout_bytes == b"kept\n"


def test_e2b_auto_pause_with_auto_resume_wakes_on_traffic(daemon, base_template):  # noqa: ANN001
    """E2B's ``lifecycle={"on_timeout": "pause", "auto_resume": True}``: paused at its timeout, woken by the
    next command (no ``connect``); without ``auto_resume`` it stays paused (test_e2b covers connect)."""
    pytest.importorskip("e2b")
    import os
    from datetime import UTC, datetime

    from e2b import Sandbox, SandboxState

    from shoal.engine.keys import e2b_form

    env = {"E2B_API_KEY": e2b_form(daemon.key), "E2B_API_URL": daemon.url, "E2B_SANDBOX_URL": daemon.url}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    made = []
    try:
        woken = Sandbox.create("base", timeout=3, lifecycle={"on_timeout": "pause", "auto_resume": True})
        made.append(woken)
        kept = Sandbox.create("base", timeout=3, lifecycle={"on_timeout": "pause"})
        made.append(kept)
        woken.files.write("/tmp/n", "7")
        assert wait_for(lambda: woken.get_info().state == SandboxState.PAUSED
                        and kept.get_info().state == SandboxState.PAUSED)
        assert woken.commands.run("cat /tmp/n").stdout == "7"  # the first request woke it
        info = woken.get_info()
        assert info.state == SandboxState.RUNNING
        assert (info.end_at - datetime.now(UTC)).total_seconds() > 200  # not reaped right after waking
        with pytest.raises(Exception):  # noqa: B017 - whatever the SDK raises: it is refused
            kept.commands.run("true")
        assert kept.get_info().state == SandboxState.PAUSED
    finally:
        for sb in made:
            Sandbox.kill(sb.sandbox_id)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
