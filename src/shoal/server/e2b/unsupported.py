"""E2B routes Shoal does not serve answer 501 "not supported by this server: <what>", in E2B's shape.

A plain 404 would be read by E2B's SDKs as "sandbox ... not found" (or "template not found"), which
sends a user looking for the wrong problem. The answer is given only where no route of the daemon
matched at all (``install`` wraps the router's not-found fallback), so it never shadows a route that
this wing, another wing or a later feature adds, whatever the order they were included in.
"""

from __future__ import annotations

import re

from starlette.routing import Router

from shoal.server.asgi import ASGIApp, Receive, Scope, Send, send_json

#: Control-plane paths of E2B's API (``e2b/api/client/api/`` of the SDK) → the feature they belong to.
FEATURES: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), what) for p, what in (
    (r"^/sandboxes/[^/]+/snapshots$", "sandbox snapshots"),
    (r"^/snapshots(/|$)", "sandbox snapshots"),
    (r"^/sandboxes/[^/]+/fork$", "forking a sandbox"),
    (r"^/sandboxes/[^/]+/network$", "changing a sandbox's network rules"),
    (r"^/(v2/)?sandboxes/[^/]+/logs$", "sandbox logs"),
    (r"^/sandboxes/metrics$", "metrics of several sandboxes at once"),
    (r"^/(v[23]/)?templates(/|$)", "building and managing templates through the E2B API"),
    (r"^/volumes(/|$)", "volumes"),
    (r"^/secrets(/|$)", "secrets"),
    (r"^/(v2/)?sandboxes(/[^/]+(/[a-z-]+)?)?/?$", "this sandbox call"),  # E2B's shapes, not any depth
    (r"^/teams(/|$)", "teams"),
    (r"^/access-tokens(/|$)|^/api-keys(/|$)", "managing keys through the E2B API"),
))


def feature(path: str) -> str | None:
    """What an unserved E2B control-plane path asks for, or None if the path is not E2B's (a path with an
    empty segment, such as ``/sandboxes//pause``, names no sandbox: that stays the router's 404)."""
    if "//" in path:
        return None
    for pattern, what in FEATURES:
        if pattern.search(path):
            return what
    return None


def message(method: str, path: str, what: str) -> str:
    return f"not supported by this server: {what} ({method} {path})"


def install(router: Router) -> None:
    """Answer 501 for E2B control-plane paths no route serves; everything else keeps the router's
    own not-found answer."""
    fallback: ASGIApp = router.default

    async def not_found(scope: Scope, receive: Receive, send: Send) -> None:
        what = feature(scope.get("path", "")) if scope.get("type") == "http" else None
        if what is None:
            await fallback(scope, receive, send)
            return
        await send_json(send, 501, {"code": 501, "message": message(scope["method"], scope["path"], what)})

    router.default = not_found  # type: ignore[assignment]
