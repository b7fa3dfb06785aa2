"""WebSocket process I/O: ``/v1/sandboxes/{id}/pty`` (a terminal) and ``/process`` (pipes).

Protocol: the client's first message is JSON ``{"cmd": [...], "cols", "rows", "env", "cwd", "user"}``.
Then binary messages are input; text messages are JSON controls (``resize`` with cols/rows,
``signal``, ``close_stdin``). The server sends ``{"type": "start", "pid"}``, binary output frames
(first byte 1 = stdout/pty, 2 = stderr), and ``{"type": "end", "exit_code", ...}`` before closing.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from shoal.errors import ShoalError
from shoal.server.auth import key_from_headers

router = APIRouter(tags=["processes"])
_CHANNEL = {"stdout": 1, "pty": 1, "stderr": 2}


async def _serve(ws: WebSocket, sandbox_id: str, pty: bool) -> None:
    await ws.accept()
    try:
        key = key_from_headers(ws.headers, ws.app.state.engine)
        agent = ws.app.state.gate.agent(sandbox_id, key)
        cfg = json.loads(await ws.receive_text())
        default = ["/bin/sh", "-l"] if pty else None
        cmd = cfg.get("cmd") or default
        if not cmd:
            raise ValueError("cmd is required")
        req: dict = {"cmd": cmd, "env": cfg.get("env") or {}, "stdin": True}
        for field in ("cwd", "user", "timeout"):
            if cfg.get(field) is not None:
                req[field] = cfg[field]
        if pty:
            req["pty"] = {"size": {"cols": int(cfg.get("cols", 80)), "rows": int(cfg.get("rows", 24))}}
        stream = await agent.start(req)
    except ShoalError as exc:
        await ws.send_text(json.dumps({"type": "error", **exc.to_dict()}))
        await ws.close(code=4000 + min(exc.status, 999) % 1000)
        return
    except (ValueError, KeyError, TypeError) as exc:
        await ws.send_text(json.dumps({"type": "error", "code": "invalid_request", "message": str(exc)}))
        await ws.close(code=4400)
        return
    await ws.send_text(json.dumps({"type": "start", "pid": stream.pid}))

    async def pump_in() -> None:
        try:
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                if msg.get("bytes") is not None:
                    await stream.send_stdin(msg["bytes"])
                elif msg.get("text"):
                    ctl = json.loads(msg["text"])
                    op = ctl.get("type") or ctl.get("op")
                    if op == "resize":
                        await stream.control({"op": "resize", "cols": int(ctl["cols"]), "rows": int(ctl["rows"])})
                    elif op == "signal":
                        await stream.control({"op": "signal", "signal": int(ctl.get("signal", 9))})
                    elif op == "close_stdin":
                        await stream.control({"op": "close_stdin"})
                    elif op == "stdin":
                        await stream.send_stdin(str(ctl.get("data", "")).encode())
        except (WebSocketDisconnect, ShoalError, ValueError, KeyError):
            pass
        await hang_up()

    hung_up = False

    async def hang_up() -> None:
        """The client is gone: hang up like a terminal does (SIGHUP to a PTY's session, EOF on a pipe),
        so an abandoned shell does not run forever. Either loop may notice the client leave first."""
        nonlocal hung_up
        if hung_up or stream.end is not None:
            return
        hung_up = True
        try:
            await stream.control({"op": "signal", "signal": 1} if pty else {"op": "close_stdin"})
        except (ShoalError, OSError):
            pass

    reader = asyncio.create_task(pump_in())
    try:
        async for kind, data in stream.events():
            if kind == "end":
                await ws.send_text(json.dumps({"type": "end", "exit_code": data["exit_code"],  # type: ignore[index]
                                               "signal": data.get("signal"), "timed_out": data.get("timed_out")}))  # type: ignore[union-attr]
                break
            await ws.send_bytes(bytes([_CHANNEL.get(kind, 1)]) + data)  # type: ignore[operator]
        await ws.close()
    except (WebSocketDisconnect, RuntimeError):
        pass
    except ShoalError as exc:
        try:
            await ws.send_text(json.dumps({"type": "error", **exc.to_dict()}))
            await ws.close()
        except (WebSocketDisconnect, RuntimeError):
            pass
    finally:
        reader.cancel()
        await hang_up()  # sending output failed first: the reader was cancelled before it could
        stream.close()


@router.websocket("/v1/sandboxes/{sandbox_id}/pty")
async def pty_socket(ws: WebSocket, sandbox_id: str) -> None:
    await _serve(ws, sandbox_id, pty=True)


@router.websocket("/v1/sandboxes/{sandbox_id}/process")
async def process_socket(ws: WebSocket, sandbox_id: str) -> None:
    await _serve(ws, sandbox_id, pty=False)
