"""Reverse proxy to a TCP port inside a sandbox: what ``Host: <port>-<id>.<domain>`` (E2B's
``get_host(port)``) reaches, for native and E2B sandboxes alike.

``SandboxRouting`` sends here traffic addressed to a sandbox port that no wing serves itself (the
E2B wing serves envd's and the code interpreter's), with ``scope["shoal.sandbox_id"]`` and
``scope["shoal.port"]``. Each request gets its own connection into the sandbox
(``AsyncAgentClient.open_port``: a raw byte stream relayed by the agent); the request is written in
HTTP/1.1 and the answer parsed with h11, both streamed.
WebSockets are relayed message by message (``websockets``' sans-I/O client on the same stream).

Who may pass is ``shoal.server.port_access``'s call: the owner's API key, the sandbox's traffic
or access token, or nothing at all for a port its owner made public. Public means: anyone who can
reach the daemon's address (loopback unless ``shoal serve --host`` says otherwise) and knows the
sandbox id. A refusal is 401/403 ``{"code": <status>, "message": ...}`` before any byte reaches the
sandbox (for a WebSocket, the same as the HTTP answer to its handshake). The credentials are
removed from what the service receives. Nothing here imports ``server/e2b``: native sandboxes'
ports are served the same with or without the E2B wing.

Nothing listening on the port: 502 ``{"code": 502, "message": "... port is not open ..."}`` (the
phrase the SDK looks for).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse

import h11

from shoal.errors import NotFound, ShoalError
from shoal.server.asgi import encode, error, header
from shoal.server.gate import Gate
from shoal.server.port_access import PortAccess, api_key_header
from shoal.server.sandbox_routing import traffic_agent

log = logging.getLogger("shoal.portproxy")
READ_SIZE = 256 * 1024
_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization", b"te",
        b"trailer", b"transfer-encoding", b"upgrade"}
_PRIVATE = {b"e2b-sandbox-id", b"e2b-sandbox-port", b"x-access-token", b"e2b-traffic-access-token"}


async def _refuse(scope: dict, send, exc: ShoalError) -> None:  # noqa: ANN001
    """A 401/403 JSON answer; for a WebSocket as the answer to its handshake when the server can
    (the ASGI denial-response extension), else a close code 4000+status."""
    if scope["type"] != "websocket":
        return await error(send, exc.status, exc.message)
    if "websocket.http.response" not in scope.get("extensions", {}):
        return await send({"type": "websocket.close", "code": 4000 + exc.status})
    body = encode({"code": exc.status, "message": exc.message})
    await send({"type": "websocket.http.response.start", "status": exc.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "websocket.http.response.body", "body": body})


def _forwarded(name: bytes, value: bytes) -> bool:
    """Whether a client header may go on to the service: hop-by-hop headers, routing headers and
    credentials (tokens, Shoal API keys) stay here."""
    return name not in _HOP and name not in _PRIVATE and not api_key_header(name, value)


class PortProxy:
    def __init__(self, gate: Gate, access: PortAccess) -> None:
        self.gate, self.engine, self.access = gate, gate.engine, access

    async def __call__(self, scope: dict, receive, send) -> None:  # noqa: ANN001
        sid, port = scope["shoal.sandbox_id"], scope["shoal.port"]
        ws = scope["type"] == "websocket"
        try:
            self.access.check(scope)
        except ShoalError as exc:
            return await _refuse(scope, send, exc)
        if not 0 < port < 65536:
            if ws:
                await send({"type": "websocket.close", "code": 4400})
            else:
                await error(send, 400, f"invalid port {port}")
            return
        agent, problem = traffic_agent(self.gate, sid)  # access was decided above: owner, token or public
        if agent is not None:
            try:
                reader, writer = await agent.open_port(port)
            except NotFound:
                problem = f"The sandbox {sid} is running but port is not open: nothing listens on port {port}"
            except ShoalError as exc:
                problem = f"cannot reach port {port} of sandbox {sid}: {exc.message}"
        if problem is not None:
            if ws:
                await send({"type": "websocket.close", "code": 1011, "reason": problem[:120]})
            else:
                await error(send, 502, problem)
            return
        try:
            if ws:
                await self._websocket(scope, receive, send, reader, writer)
            else:
                await self._http(scope, receive, send, reader, writer)
        finally:
            writer.close()

    # --- HTTP --------------------------------------------------------------------------------------
    @staticmethod
    def _request(scope: dict) -> tuple[h11.Request, bool]:
        headers: list[tuple[bytes, bytes]] = []
        has_length = chunked = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                has_length = True
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            if _forwarded(name, value):
                headers.append((name, value))
        if chunked and not has_length:
            headers.append((b"transfer-encoding", b"chunked"))
        client = scope.get("client")
        if client:
            headers.append((b"x-forwarded-for", str(client[0]).encode()))
        headers.append((b"x-forwarded-proto", scope.get("scheme", "http").encode()))
        headers.append((b"connection", b"close"))
        if not any(n == b"host" for n, _ in headers):
            headers.append((b"host", f"127.0.0.1:{scope['shoal.port']}".encode()))
        target = scope.get("raw_path") or urllib.parse.quote(scope["path"]).encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        return h11.Request(method=scope["method"], target=target, headers=headers), has_length or chunked

    async def _http(self, scope: dict, receive, send, reader: asyncio.StreamReader,  # noqa: ANN001
                    writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.CLIENT)
        request, has_body = self._request(scope)
        writer.write(conn.send(request))
        gone = asyncio.Event()

        async def pump_body() -> None:
            try:
                if has_body:
                    while True:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            gone.set()
                            writer.close()
                            return
                        data = message.get("body", b"")
                        if data and conn.our_state is h11.SEND_BODY:
                            writer.write(conn.send(h11.Data(data=data)))
                            await writer.drain()
                        if not message.get("more_body", False):
                            break
                if conn.our_state is h11.SEND_BODY:
                    writer.write(conn.send(h11.EndOfMessage()))
                    await writer.drain()
                while True:  # afterwards: notice a client that leaves mid-answer
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        gone.set()
                        writer.close()
                        return
            except (ConnectionError, OSError, h11.LocalProtocolError):
                return

        pumping = asyncio.create_task(pump_body())
        started = False
        try:
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    if not started:
                        await error(send, 502, f"invalid HTTP answer from port {scope['shoal.port']}: {exc}")
                        started = True
                    break
                if event is h11.NEED_DATA:
                    try:
                        data = await reader.read(READ_SIZE)
                    except (ConnectionError, OSError):
                        data = b""
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.InformationalResponse):
                    continue
                if isinstance(event, h11.Response):
                    out = [(n, v) for n, v in event.headers if n not in _HOP]
                    await send({"type": "http.response.start", "status": event.status_code, "headers": out})
                    started = True
                elif isinstance(event, h11.Data):
                    if not gone.is_set():
                        await send({"type": "http.response.body", "body": bytes(event.data), "more_body": True})
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    if not started:
                        await error(send, 502, f"port {scope['shoal.port']} closed the connection without an answer")
                        started = True
                    else:
                        await send({"type": "http.response.body", "body": b"", "more_body": False})
                    break
        finally:
            pumping.cancel()
            with contextlib.suppress(BaseException):
                await pumping

    # --- WebSocket ---------------------------------------------------------------------------------
    async def _websocket(self, scope: dict, receive, send, reader: asyncio.StreamReader,  # noqa: ANN001
                         writer: asyncio.StreamWriter) -> None:
        from websockets.client import ClientProtocol
        from websockets.frames import Opcode
        from websockets.http11 import Response
        from websockets.uri import parse_uri

        first = await receive()
        if first["type"] != "websocket.connect":
            return
        path = scope.get("raw_path") or urllib.parse.quote(scope["path"]).encode()
        if scope.get("query_string"):
            path += b"?" + scope["query_string"]
        proto = ClientProtocol(parse_uri(f"ws://127.0.0.1:{scope['shoal.port']}{path.decode('latin-1')}"),
                               subprotocols=scope.get("subprotocols") or None, max_size=None)
        request = proto.connect()
        for name, value in scope["headers"]:
            lname = name.decode("latin-1")
            if not _forwarded(name, value) or lname.startswith("sec-websocket-") or name == b"host":
                continue
            request.headers[lname] = value.decode("latin-1")
        host = header(scope, b"host")
        if host:
            del request.headers["Host"]
            request.headers["Host"] = host
        proto.send_request(request)

        def flush() -> None:
            for chunk in proto.data_to_send():
                if chunk:
                    writer.write(chunk)

        flush()
        handshake = None
        early: list = []  # frames that came in the same read as the handshake answer
        while handshake is None:
            data = await reader.read(READ_SIZE)
            proto.receive_data(data)
            for ev in proto.events_received():
                if isinstance(ev, Response):
                    handshake = ev
                else:
                    early.append(ev)
            if not data and handshake is None:
                break
        if handshake is None or proto.handshake_exc is not None:
            await send({"type": "websocket.close", "code": 1011})
            return
        await send({"type": "websocket.accept", "subprotocol": proto.subprotocol})

        async def client_to_sandbox() -> None:
            while True:
                msg = await receive()
                if msg["type"] == "websocket.disconnect":
                    with contextlib.suppress(Exception):
                        proto.send_close(msg.get("code", 1000))
                        flush()
                    return
                if msg.get("bytes") is not None:
                    proto.send_binary(msg["bytes"])
                elif msg.get("text") is not None:
                    proto.send_text(msg["text"].encode())
                flush()
                await writer.drain()

        async def sandbox_to_client() -> None:
            parts: list[bytes] = []
            kind = None
            data = b"-"
            while True:
                if early:
                    frames, early[:] = list(early), []
                else:
                    data = await reader.read(READ_SIZE)
                    proto.receive_data(data)
                    frames = proto.events_received()
                for frame in frames:
                    if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
                        kind, parts = frame.opcode, [frame.data]
                    elif frame.opcode is Opcode.CONT:
                        parts.append(frame.data)
                    elif frame.opcode is Opcode.CLOSE:
                        code = proto.close_rcvd.code if proto.close_rcvd else 1000
                        code = 1000 if code in (1005, 1006, 1015) else code  # reserved: never sent
                        flush()
                        await send({"type": "websocket.close", "code": code})
                        return
                    else:
                        continue
                    if frame.fin:
                        payload = b"".join(parts)
                        if kind is Opcode.TEXT:
                            await send({"type": "websocket.send", "text": payload.decode("utf-8", "replace")})
                        else:
                            await send({"type": "websocket.send", "bytes": payload})
                flush()
                if not data:
                    await send({"type": "websocket.close", "code": 1001})
                    return

        tasks = [asyncio.create_task(client_to_sandbox()), asyncio.create_task(sandbox_to_client())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*tasks, return_exceptions=True)
