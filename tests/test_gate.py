"""The one gate (issue 8): every surface reaches a sandbox's agent through ``server/gate.py`` and says
the same thing when it cannot: a paused, failed or deleted sandbox is refused alike by REST, the exec
fast path, MCP, the PTY WebSocket, E2B's envd and the port proxy."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest
import websockets.sync.client as ws_client
from websockets.exceptions import ConnectionClosed

SERVER = Path(__file__).resolve().parent.parent / "src" / "shoal" / "server"


def test_no_server_code_reaches_an_agent_but_the_gate():
    """Static: an agent client made anywhere in ``server/`` but the gate would bypass its checks."""
    offenders = []
    for path in SERVER.rglob("*.py"):
        if path.name == "gate.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"AsyncAgentClient\(|AgentClient\(|\.agent_socket\(", line):
                offenders.append(f"{path.relative_to(SERVER)}:{n}: {line.strip()}")
    # The code interpreter's launcher starts the in-sandbox server on the engine's own events (not
    # on a request): it uses Engine.agent, which applies the same state rule.
    assert offenders == [], "\n".join(offenders)


@pytest.fixture
def api(daemon):
    with httpx.Client(base_url=daemon.url, headers=daemon.headers, timeout=30) as client:
        yield client


def _mcp_call(api: httpx.Client, tool: str, arguments: dict) -> dict:
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": arguments}}
    r = api.post("/mcp", headers={"Accept": "application/json, text/event-stream"}, json=call)
    assert r.status_code == 200, r.text
    return r.json()["result"]


def _refusals(daemon, api: httpx.Client, sid: str, envd_token: str) -> dict[str, str]:
    """What each surface answers for ``sid``: the message of its refusal (or "OK")."""
    out: dict[str, str] = {}
    r = api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": ["true"]})           # the fast path
    out["exec"] = "OK" if r.status_code == 200 else f"{r.status_code} {r.json()['message']}"
    r = api.get(f"/v1/sandboxes/{sid}/files", params={"path": "/etc/hostname"})  # a FastAPI route
    out["files"] = "OK" if r.status_code == 200 else f"{r.status_code} {r.json()['message']}"
    res = _mcp_call(api, "run_command", {"sandbox_id": sid, "command": "true"})
    out["mcp"] = "OK" if not res.get("isError") else res["content"][0]["text"]
    url = daemon.url.replace("http", "ws") + f"/v1/sandboxes/{sid}/process"
    with ws_client.connect(url, additional_headers=daemon.headers) as ws:
        try:  # a refused socket gets its error and is closed (4000 + status) before reading our request
            ws.send(json.dumps({"cmd": ["true"]}))
        except ConnectionClosed:
            pass
        first = json.loads(ws.recv(timeout=20))
    out["websocket"] = "OK" if first["type"] == "start" else first["message"]
    r = httpx.post(f"{daemon.url}/process.Process/List", json={}, timeout=30,
                   headers={"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49983", "X-Access-Token": envd_token,
                            "Content-Type": "application/json"})
    out["envd"] = "OK" if r.status_code == 200 else f"{r.status_code} {r.json()['message']}"
    r = httpx.get(f"{daemon.url}/", headers={"Host": f"8000-{sid}.localhost", **daemon.headers}, timeout=30)
    message = r.json()["message"]  # nothing listens on 8000: a running sandbox says so
    out["port"] = "OK" if "nothing listens" in message else f"{r.status_code} {message}"
    return out


def _envd_token(daemon, sid: str) -> str:
    from shoal.server.e2b.security import Tokens
    from shoal.settings import Settings
    return Tokens(Settings().state_dir).envd(sid)


def test_every_surface_refuses_a_paused_sandbox_alike(daemon, api):
    sid = api.post("/v1/sandboxes", json={"template": "minimal", "timeout": 600}).json()["id"]
    token = _envd_token(daemon, sid)
    try:
        assert set(_refusals(daemon, api, sid, token).values()) == {"OK"}
        assert api.post(f"/v1/sandboxes/{sid}/pause").status_code == 200
        refusals = _refusals(daemon, api, sid, token)
        for surface, message in refusals.items():
            assert "paused" in message and sid in message, (surface, message)
        assert refusals["exec"].startswith("409") and refusals["files"].startswith("409")
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


def test_every_surface_refuses_a_failed_sandbox_alike(daemon, api, engine):
    sid = api.post("/v1/sandboxes", json={"template": "minimal", "timeout": 600, "layer": "ram"}).json()["id"]
    token = _envd_token(daemon, sid)
    try:
        os.kill(engine.runtime.init_pid(sid), signal.SIGKILL)
        deadline = time.monotonic() + 15
        while api.get(f"/v1/sandboxes/{sid}").json()["state"] != "error" and time.monotonic() < deadline:
            time.sleep(0.05)
        for surface, message in _refusals(daemon, api, sid, token).items():
            assert "failed" in message and "agent" in message, (surface, message)
    finally:
        api.delete(f"/v1/sandboxes/{sid}")


def test_the_exec_fast_path_answers_an_unexpected_failure_with_json(engine, new_sandbox, monkeypatch):
    """The fast path sits in front of FastAPI (``app.create_asgi``), outside the app's handler of last
    resort: a bug on its path must still be a JSON 500 ``internal``, never a traceback or a bare text 500."""
    import asyncio

    from shoal.server.app import create_asgi
    from shoal.server.daemon import ensure_local_key

    sid = new_sandbox()
    asgi = create_asgi(engine)
    key = ensure_local_key(engine)
    gate = asgi.app.gate  # the fast path's gate: the app's one

    def broken(*_args, **_kwargs):  # noqa: ANN002, ANN003, ANN202
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(gate, "agent", broken)

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=asgi)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return await client.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": ["true"]},
                                     headers={"Authorization": f"Bearer {key}"})
    r = asyncio.run(call())
    assert r.status_code == 500, r.text
    assert r.json() == {"code": "internal", "message": "internal error: ZeroDivisionError"}
