"""A sandbox whose agent died says so (issue 7, item 10): a ``died`` event, calls that fail at once with a
clear error, and the reason in the API. A ``ram`` sandbox lost its files with it: state ``error`` and no host
resource left but the record. A ``disk`` sandbox keeps its files: paused to its filesystem, and resume
starts it again with them (issue 10: no lost data)."""

from __future__ import annotations

import os
import signal
import time

import httpx

from shoal.engine import SandboxEvent, SandboxState
from shoal.errors import InvalidTransition


def _kill_agent(engine, sid: str) -> int:
    pid = engine.runtime.init_pid(sid)
    assert pid
    os.kill(pid, signal.SIGKILL)  # from the host: what an OOM kill or a crash of PID 1 amounts to
    return pid


def _kill_and_notice(engine, sid: str) -> tuple[int, list[dict]]:
    """Kill the agent from the host and run the health check until it notices; its pid and the events."""
    events: list[dict] = []
    unsubscribe = engine.subscribe(events.append)
    try:
        pid = _kill_agent(engine, sid)
        deadline = time.monotonic() + 10
        failed: list[str] = []
        while sid not in failed and time.monotonic() < deadline:
            failed = engine.check_health()
        assert sid in failed
    finally:
        unsubscribe()
    return pid, [e["type"] for e in events if e["sandbox"]["id"] == sid]


def test_engine_notices_a_dead_agent(engine, new_sandbox, leftovers):
    sid = new_sandbox(layer="ram")
    assert sid not in engine.check_health()  # a healthy sandbox is left alone
    pid, events = _kill_and_notice(engine, sid)
    rec = engine.get(sid)
    assert rec.state is SandboxState.ERROR and "agent" in (rec.reason or "")
    assert events == [SandboxEvent.DIED.value]
    try:
        engine.agent(sid)
        raise AssertionError("a failed sandbox must not hand out an agent")
    except InvalidTransition as exc:
        assert "failed" in str(exc) and "agent" in str(exc)
    assert leftovers(sid, [pid]) == ["store record"]  # everything else was freed at once
    engine.destroy(sid)
    assert leftovers(sid) == []


def test_daemon_reports_a_dead_agent(daemon, engine):
    api = httpx.Client(base_url=daemon.url, headers=daemon.headers, timeout=30)
    sid = api.post("/v1/sandboxes", json={"template": "minimal", "timeout": 120, "layer": "ram"}).json()["id"]
    try:
        assert api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": ["true"]}).status_code == 200
        _kill_agent(engine, sid)
        deadline = time.monotonic() + 15
        state = "running"
        while state == "running" and time.monotonic() < deadline:
            body = api.get(f"/v1/sandboxes/{sid}").json()
            state = body["state"]
            time.sleep(0.05)
        assert state == "error" and "agent" in body["reason"], body
        r = api.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": ["true"]})
        assert r.status_code == 409 and "failed" in r.json()["message"], r.text
    finally:
        assert api.delete(f"/v1/sandboxes/{sid}").status_code in (200, 204)


def test_a_disk_sandbox_whose_agent_died_keeps_its_files(engine, new_sandbox):
    sid = new_sandbox()  # the default layer: on the host's disk
    engine.agent(sid).run(["sh", "-c", "echo kept > /root/data"])
    _, events = _kill_and_notice(engine, sid)
    rec = engine.get(sid)
    assert (rec.state, rec.pause_mode) == (SandboxState.PAUSED, "filesystem"), rec
    assert "agent" in rec.reason and "resume" in rec.reason
    assert events == [SandboxEvent.DIED.value]
    try:
        engine.agent(sid)
        raise AssertionError("a paused sandbox must not hand out an agent")
    except InvalidTransition as exc:
        assert "paused" in str(exc)
    engine.resume(sid)
    assert engine.agent(sid).run(["cat", "/root/data"]).stdout == "kept\n"
