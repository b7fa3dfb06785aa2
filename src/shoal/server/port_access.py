"""Who may reach a TCP port of a sandbox through the port proxy, and which ports are public.

A port of a sandbox is private unless its owner made it public. A private port opens only to
one of these credentials, each tied to the one sandbox (or its owner):

* the owner's API key (``Authorization: Bearer <key>`` or ``X-API-Key``); another tenant's
  key is 403, even on a public port, so a key never opens what it does not own;
* the sandbox's traffic token (``e2b-traffic-access-token``, as E2B sends it);
* the sandbox's envd access token (``X-Access-Token``), as the E2B SDKs send it.

A credential that is sent must be right, public port or not (a wrong one is refused, never
ignored), and the answer never depends on whether the sandbox exists (no probing). Traffic routed
by the ``E2b-Sandbox-Id`` header always needs a credential; traffic routed by
``Host: <port>-<id>.<domain>`` passes without one only to a public port.

Public settings live in the daemon's one per-sandbox options store (``sandbox_options``):
``public`` (every port) and ``public_ports``. Native sandboxes default to private; E2B sandboxes
get what E2B's spec says (``network.allowPublicTraffic``, true unless the client says false).
A sandbox without options (made in-process, by MCP, or before this existed) is private.

Credentials are never passed on to the sandbox: its code is not trusted with its owner's key.

Nothing here imports the E2B wing: the per-sandbox tokens come in through ``SandboxTokens`` (the
daemon passes the E2B wing's ``Tokens``), so the port proxy serves native sandboxes on its own terms.
"""

from __future__ import annotations

from typing import Protocol

from shoal.engine import Engine
from shoal.engine.keys import looks_like_key
from shoal.errors import Forbidden, InvalidRequest, NotFound, Unauthorized
from shoal.server.asgi import header
from shoal.server.sandbox_options import SandboxOptions
from shoal.server.sandbox_routing import HOST

MAX_PUBLIC_PORTS = 64


class SandboxTokens(Protocol):
    """The per-sandbox capabilities a request may carry instead of an API key."""

    def traffic(self, sandbox_id: str) -> str: ...

    def check_envd(self, sandbox_id: str, token: str | None) -> bool: ...

    def check_traffic(self, sandbox_id: str, token: str | None) -> bool: ...


def clean_ports(ports: list[int]) -> list[int]:
    """Sorted distinct ports, each a valid TCP port; a clear error otherwise."""
    if len(ports) > MAX_PUBLIC_PORTS:
        raise InvalidRequest(f"at most {MAX_PUBLIC_PORTS} public ports")
    for p in ports:
        if isinstance(p, bool) or not isinstance(p, int) or not 0 < p < 65536:
            raise InvalidRequest(f"invalid port {p!r}: must be 1-65535")
    return sorted(set(ports))


def api_key_header(name: bytes, value: bytes) -> bool:
    """Whether this request header carries a Shoal API key (then it is a credential for the proxy
    and is never forwarded into the sandbox). Other ``Authorization`` values belong to the service."""
    text = value.decode("latin-1").strip()
    if name == b"x-api-key":
        return looks_like_key(text)
    if name == b"authorization" and text[:7].lower() == "bearer ":
        return looks_like_key(text[7:].strip())
    return False


class PortAccess:
    """Made once by the daemon (``app.state.port_access``) with its one tokens and options store."""

    def __init__(self, engine: Engine, tokens: SandboxTokens, options: SandboxOptions) -> None:
        self.engine, self.tokens, self.options = engine, tokens, options

    # --- the owner's settings ----------------------------------------------------------------------
    def publicity(self, sandbox_id: str) -> tuple[bool, list[int]]:
        """(every port public, the ports public one by one)."""
        opts = self.options.get(sandbox_id)
        ports = opts.get("public_ports") or []
        return bool(opts.get("public", False)), [p for p in ports if isinstance(p, int)]

    def set_public(self, sandbox_id: str, public_traffic: bool, public_ports: list[int]) -> None:
        """Record who may reach the ports of ``sandbox_id`` without a credential (other options kept)."""
        self.options.update(sandbox_id, public=bool(public_traffic), public_ports=clean_ports(public_ports))

    # --- a request ----------------------------------------------------------------------------------
    def check(self, scope: dict) -> None:
        """Raise ``Unauthorized``/``Forbidden`` unless this request may reach its sandbox port."""
        sid, port = scope["shoal.sandbox_id"], scope["shoal.port"]
        presented = False
        access = header(scope, b"x-access-token")
        traffic = header(scope, b"e2b-traffic-access-token")
        if access is not None or traffic is not None:
            presented = True
            if not (self.tokens.check_envd(sid, access) or self.tokens.check_traffic(sid, traffic)):
                raise Unauthorized("invalid access or traffic token for this sandbox")
        for name, value in scope.get("headers", ()):
            if api_key_header(name, value):
                presented = True
                self._check_key(sid, value.decode("latin-1").strip())
        if presented:
            return
        if scope.get("shoal.via") == HOST:
            every, ports = self.publicity(sid)
            if every or port in ports:
                return
        raise Unauthorized("this sandbox port is private: send the owner's API key (Authorization: Bearer <key>) "
                           "or the sandbox's traffic token (e2b-traffic-access-token)")

    def _check_key(self, sid: str, raw: str) -> None:
        if raw[:7].lower() == "bearer ":
            raw = raw[7:].strip()
        key = self.engine.keys.verify(raw)
        if key is None:
            raise Unauthorized("invalid or revoked API key")
        try:
            self.engine.get(sid, key)
        except NotFound:
            raise Forbidden(f"this API key may not reach sandbox {sid}") from None
