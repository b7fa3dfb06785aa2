"""What the sync and async clients share: error translation, request bodies, event decoding."""

from __future__ import annotations

import base64
import codecs
import json
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

import httpx

from shoal.client._config import CONNECT_TIMEOUT, start_hint
from shoal.client.models import CommandResult, Output
from shoal.errors import (
    AgentUnavailable,
    CapacityExceeded,
    Conflict,
    DaemonUnreachable,
    Forbidden,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    RuntimeFailure,
    ShoalError,
    Unauthorized,
)

_BY_STATUS: dict[int, type[ShoalError]] = {400: InvalidRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound,
                                           409: Conflict, 429: QuotaExceeded, 503: CapacityExceeded}
_BY_CODE: dict[str, type[ShoalError]] = {"invalid_request": InvalidRequest, "unauthorized": Unauthorized,
                                         "forbidden": Forbidden, "not_found": NotFound, "conflict": Conflict,
                                         "quota_exceeded": QuotaExceeded, "capacity": CapacityExceeded,
                                         "runtime_failure": RuntimeFailure, "agent_unavailable": AgentUnavailable}
CHUNK = 64 * 1024
#: Streams (exec, files, watch) wait as long as the data takes; only connecting is bounded.
STREAM_TIMEOUT = httpx.Timeout(None, connect=CONNECT_TIMEOUT)
#: Options of the process/PTY WebSocket, the same for websockets' sync and asyncio clients.
WS_OPTIONS: dict[str, Any] = {"compression": None, "max_size": 16 * 2**20, "open_timeout": CONNECT_TIMEOUT + 5,
                              "close_timeout": 2}

TextCallback = Callable[[str], Any]


def make_error(cls: type[ShoalError], message: str) -> ShoalError:
    err = ShoalError.__new__(cls)
    ShoalError.__init__(err, message)  # skip subclasses' own signatures (InvalidTransition, RuntimeFailure)
    return err


def error_from_body(status: int, body: bytes | str) -> ShoalError:
    """An HTTP error answer (``{"code", "message"}``) as the matching ``shoal.errors`` class."""
    code, message = "", ""
    try:
        data = json.loads(body)
        if isinstance(data, dict):
            code, message = str(data.get("code") or ""), str(data.get("message") or data.get("detail") or "")
    except (ValueError, TypeError):
        pass
    if not message:
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        message = text.strip()[:500] or f"HTTP {status}"
    cls = AgentUnavailable if code == "agent_unavailable" else _BY_STATUS.get(status) or _BY_CODE.get(code)
    return make_error(cls or RuntimeFailure, message)


def error_from_ws(msg: dict) -> ShoalError:
    code = str(msg.get("code") or "")
    return make_error(_BY_CODE.get(code, RuntimeFailure), str(msg.get("message") or code or "error"))


def unreachable(url: str, exc: BaseException | None = None) -> DaemonUnreachable:
    why = f" ({exc})" if exc is not None and str(exc) else ""
    return DaemonUnreachable(f"the Shoal daemon is not running at {url}{why}; {start_hint(url)}")


def lost(url: str, exc: BaseException) -> RuntimeFailure:
    return make_error(RuntimeFailure, f"lost the connection to the Shoal daemon at {url}: {exc or type(exc).__name__}")


def list_params(state: str | Iterable[str] | None, metadata: dict[str, str] | None) -> list[tuple[str, str]]:
    """Query parameters of ``GET /v1/sandboxes``: ``state`` and ``metadata=k=v`` may repeat."""
    params: list[tuple[str, str]] = []
    if state:
        for s in [state] if isinstance(state, str) else state:
            params.append(("state", str(s)))
    for k, v in (metadata or {}).items():
        params.append(("metadata", f"{k}={v}"))
    return params


def argv(cmd: str | list[str]) -> list[str]:
    if isinstance(cmd, str):
        return ["/bin/sh", "-c", cmd]
    out = [str(a) for a in cmd]
    if not out:
        raise InvalidRequest("cmd must not be empty")
    return out


def exec_body(cmd: str | list[str], env: dict[str, str] | None, cwd: str | None, user: str | None,
              timeout: float | None, tag: str | None = None) -> dict:
    body: dict = {"cmd": cmd if isinstance(cmd, str) else argv(cmd), "env": dict(env or {})}
    for name, value in (("cwd", cwd), ("user", user), ("timeout", timeout), ("tag", tag)):
        if value is not None:
            body[name] = value
    return body


def ws_start(cmd: str | list[str] | None, env: dict[str, str] | None, cwd: str | None, user: str | None,
             timeout: float | None, cols: int | None = None, rows: int | None = None) -> str:
    cfg: dict = {"cmd": argv(cmd) if cmd is not None else None, "env": dict(env or {})}
    for name, value in (("cwd", cwd), ("user", user), ("timeout", timeout), ("cols", cols), ("rows", rows)):
        if value is not None:
            cfg[name] = value
    return json.dumps(cfg)


def decode_event(line: bytes | str) -> dict:
    """One NDJSON event; output events get their raw bytes in ``bytes``."""
    ev = json.loads(line)
    if "data" in ev and ev.get("type") in ("stdout", "stderr", "pty"):
        ev["bytes"] = base64.b64decode(ev["data"])
    return ev


def ws_output(message: bytes) -> Output:
    """A binary WebSocket message: first byte 1 = stdout/pty, 2 = stderr; the rest is the output."""
    return Output("stderr" if message[:1] == b"\x02" else "stdout", bytes(message[1:]))


def stdin_chunks(data: bytes | str) -> list[bytes]:
    raw = data.encode() if isinstance(data, str) else bytes(data)
    return [raw[i:i + CHUNK] for i in range(0, len(raw), CHUNK)]


def file_chunks(f: Any) -> Any:
    """A binary file object as an iterator of chunks, each returned as soon as it is available.

    The process' own stdin is read with ``os.read`` on its descriptor: a thread blocked in its
    buffered reader would make the interpreter abort at exit ("could not acquire lock ...")."""
    if f in (sys.stdin, sys.stdin.buffer if sys.stdin else None, sys.__stdin__) and f is not None:
        fd = f.fileno()
        return iter(lambda: os.read(fd, CHUNK), b"")
    read = getattr(f, "read1", None) or f.read
    return iter(lambda: read(CHUNK), b"")


class Collector:
    """Gathers a command's output and end; feeds text callbacks (decoded incrementally as UTF-8)."""

    def __init__(self, on_stdout: TextCallback | None = None, on_stderr: TextCallback | None = None) -> None:
        self.out, self.err = bytearray(), bytearray()
        self.end: dict | None = None
        self.pid = 0
        self._cb = {"stdout": on_stdout, "stderr": on_stderr}
        self._dec = {name: codecs.getincrementaldecoder("utf-8")("replace") for name in self._cb}

    def output(self, out: Output) -> None:
        (self.err if out.stream == "stderr" else self.out).extend(out.data)
        name = "stderr" if out.stream == "stderr" else "stdout"
        cb = self._cb[name]
        if cb is not None:
            text = self._dec[name].decode(out.data)
            if text:
                cb(text)

    def finish(self, end: dict) -> None:
        self.end = end
        for name, cb in self._cb.items():
            if cb is not None:
                rest = self._dec[name].decode(b"", final=True)
                if rest:
                    cb(rest)

    def result(self) -> CommandResult:
        assert self.end is not None
        return CommandResult(exit_code=int(self.end.get("exit_code", -1)), stdout_bytes=bytes(self.out),
                             stderr_bytes=bytes(self.err), signal=self.end.get("signal"),
                             timed_out=bool(self.end.get("timed_out")), pid=self.pid)


def result_from_json(d: dict) -> CommandResult:
    return CommandResult(exit_code=int(d["exit_code"]), stdout_bytes=str(d.get("stdout") or "").encode(),
                         stderr_bytes=str(d.get("stderr") or "").encode(), signal=d.get("signal"),
                         timed_out=bool(d.get("timed_out")), pid=int(d.get("pid") or 0),
                         stdout_truncated=bool(d.get("stdout_truncated")),
                         stderr_truncated=bool(d.get("stderr_truncated")),
                         oom_killed=bool(d.get("oom_killed")))


def ended_early() -> RuntimeFailure:
    return make_error(RuntimeFailure, "the process stream ended before the process did "
                                      "(the sandbox was deleted, or the daemon stopped)")
