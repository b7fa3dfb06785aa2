"""A template's start command and readiness check: started in every new sandbox, waited for at create.

A template's ``meta.json`` may hold ``start_cmd`` (a shell command line) and ``ready`` (one of
``{"cmd": "..."}`` (exit 0 means ready), ``{"port": N}`` (something accepts TCP on N inside the
sandbox) or ``{"port": N, "path": "/health"}`` (an HTTP GET there answers 2xx/3xx), with an optional
``"timeout"`` in seconds). ``Engine.create`` calls ``start_and_wait`` once the sandbox runs, so a create
returns a sandbox whose service is up (E2B's ``set_start_cmd``/``ReadyCmd``; Docker's CMD run for you).

Why the waits look the way they do: everything the sandbox says is hostile (its root can impersonate
the agent), so each probe has its own timeout, the whole wait has a deadline, and an HTTP answer is
read only up to its status line (bounded). A sandbox that never gets ready costs the caller at most
the deadline; the engine then removes it and reports why.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shoal.errors import InvalidRequest, RuntimeFailure, ShoalError
from shoal.runtime.agent_client import AgentClient

if TYPE_CHECKING:
    from shoal.engine.engine import Engine

DEFAULT_TIMEOUT = 60.0
MAX_TIMEOUT = 600.0
PROBE_INTERVAL = 0.1
#: The process tag of the start command (``process.connect`` by tag finds it).
START_TAG = "start"
_MAX_STATUS_LINE = 4096


@dataclass(frozen=True)
class StartSpec:
    """What a template starts in each sandbox and how to tell it is ready."""

    cmd: str
    ready: dict[str, object] | None = None

    @property
    def timeout(self) -> float:
        raw = (self.ready or {}).get("timeout", DEFAULT_TIMEOUT)
        return float(raw) if isinstance(raw, (int, float)) else DEFAULT_TIMEOUT


def parse_ready(ready: object) -> dict[str, object] | None:
    """Check a readiness spec (from meta, the CLI or the E2B API); InvalidRequest if malformed.

    The CLI form is a string: ``port:8080``, ``url:8080/health``, ``cmd:test -f /ready`` or a bare command."""
    if ready is None or ready == "":
        return None
    if isinstance(ready, str):
        kind, sep, rest = ready.partition(":")
        if sep and kind == "port":
            ready = {"port": _port(rest)}
        elif sep and kind == "url":
            port, slash, path = rest.partition("/")
            ready = {"port": _port(port), "path": "/" + path}
        elif sep and kind == "cmd":
            ready = {"cmd": rest}
        else:
            ready = {"cmd": ready}
    if not isinstance(ready, Mapping):
        raise InvalidRequest("ready must be a command, port:N or url:N/path")
    out: dict[str, object] = {}
    if "cmd" in ready:
        if not isinstance(ready["cmd"], str) or not ready["cmd"].strip() or "\0" in ready["cmd"]:
            raise InvalidRequest("ready.cmd must be a non-empty command line")
        out["cmd"] = ready["cmd"]
    elif "port" in ready:
        out["port"] = _port(ready["port"])
        if ready.get("path") is not None:
            path = ready["path"]
            if not isinstance(path, str) or not path.startswith("/") or any(c in path for c in "\r\n\0 "):
                raise InvalidRequest("ready.path must be a URL path starting with /")
            out["path"] = path
    else:
        raise InvalidRequest("ready needs a cmd or a port")
    if "timeout" in ready:
        t = ready["timeout"]
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 < t <= MAX_TIMEOUT:
            raise InvalidRequest(f"ready.timeout must be a number of seconds in (0, {MAX_TIMEOUT:g}]")
        out["timeout"] = float(t)
    return out


def _port(value: object) -> int:
    try:
        port = int(str(value))
    except ValueError:
        raise InvalidRequest(f"invalid port {value!r}") from None
    if not 0 < port < 65536:
        raise InvalidRequest(f"invalid port {port}: 1-65535")
    return port


def spec_from_meta(meta: Mapping[str, object] | None) -> StartSpec | None:
    """The start command of a template's metadata, or None (most templates start nothing)."""
    if not meta or not isinstance(meta.get("start_cmd"), str) or not meta["start_cmd"]:
        return None
    ready = meta.get("ready")
    return StartSpec(str(meta["start_cmd"]), ready if isinstance(ready, dict) else None)


def start_and_wait(agent: AgentClient, spec: StartSpec) -> None:
    """Start ``spec.cmd`` as a background process the agent owns, then wait until it is ready.

    Raises RuntimeFailure naming the check when the deadline passes (the caller removes the sandbox)."""
    stream = agent.start(["/bin/sh", "-c", spec.cmd], tag=START_TAG)
    stream.close()  # the process outlives this connection: the agent owns it
    if spec.ready is None:
        return
    deadline = time.monotonic() + spec.timeout
    last = "not checked yet"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeFailure(f"the template's start command was not ready within {spec.timeout:g} s "
                                 f"({describe(spec.ready)}: {last})", step="start command")
        try:
            ok, last = _probe(agent, spec.ready, min(left, 10.0))
        except ShoalError as err:
            ok, last = False, str(err)
        if ok:
            return
        time.sleep(min(PROBE_INTERVAL, max(0.0, deadline - time.monotonic())))


def describe(ready: Mapping[str, object]) -> str:
    if "cmd" in ready:
        return f"ready command {ready['cmd']!r}"
    if "path" in ready:
        return f"GET http://localhost:{ready['port']}{ready['path']}"
    return f"port {ready['port']}"


def _probe(agent: AgentClient, ready: Mapping[str, object], timeout: float) -> tuple[bool, str]:
    if "cmd" in ready:
        result = agent.run(["/bin/sh", "-c", str(ready["cmd"])], timeout=max(1.0, timeout))
        return result.exit_code == 0, f"exit code {result.exit_code}"
    port = int(ready["port"])  # type: ignore[call-overload]
    with agent.connect(timeout) as conn:
        conn.send({"op": "port.connect", "port": port, "host": "127.0.0.1"})
        conn.read_msg()
        if "path" not in ready:
            return True, "accepting"
        conn.sock.sendall(f"GET {ready['path']} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
        head = b""
        while b"\n" not in head and len(head) < _MAX_STATUS_LINE:
            chunk = conn.sock.recv(_MAX_STATUS_LINE - len(head))
            if not chunk:
                break
            head += chunk
    parts = head.split(b"\n", 1)[0].split()
    status = int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0
    return 200 <= status < 400, f"HTTP status {status or 'none'}"


def start_template_process(engine: Engine, sandbox_id: str, meta: Mapping[str, object] | None) -> None:
    """``Engine.create``'s hook: start the template's command in the new sandbox and wait until it is
    ready; on any failure the sandbox is removed (a half-started service is no sandbox to hand out)."""
    spec = spec_from_meta(meta)
    if spec is None:
        return
    try:
        agent = engine.agent(sandbox_id)
        agent.wait_ready()
        start_and_wait(agent, spec)
    except BaseException:
        try:
            engine.destroy(sandbox_id)
        except ShoalError:
            pass  # reconcile finishes it; the caller learns why the create failed
        raise
