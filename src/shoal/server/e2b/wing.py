"""The E2B wing: everything E2B-shaped the daemon serves, made once per daemon, in one object.

``E2B(gate, tokens, options, port_access)`` holds the per-sandbox tokens (``security.Tokens``), auto-pause
(``autopause.AutoPause``), envd (port 49983), the code interpreter (port 49999) and the signed-URL
``/files`` route. ``app.create_app`` makes it and ``install``s it on the FastAPI app
(``app.state.e2b``, which the control-plane router reads); ``SandboxRouting`` asks it, through
``SandboxAddressing``, which requests its headers address and which ports it serves itself.

Nothing is hung on the engine and nothing is cached per process: two daemons (or two test apps)
on one engine or one state dir each have their own wing. The options store and the port access it
is given are the daemon's own (shared with the native API); the wing adds only ``autoPause`` to them.
"""

from __future__ import annotations

from fastapi import FastAPI

from shoal.server.asgi import ASGIApp, Scope
from shoal.server.e2b import ENVD_PORT
from shoal.server.e2b.autopause import AutoPause
from shoal.server.e2b.envd import EnvdApp, SignedFiles
from shoal.server.e2b.interpreter import PORT as INTERPRETER_PORT
from shoal.server.e2b.interpreter import InterpreterApp
from shoal.server.e2b.metrics import MetricSamples
from shoal.server.e2b.security import Tokens
from shoal.server.gate import Gate
from shoal.server.port_access import PortAccess
from shoal.server.sandbox_options import SandboxOptions

#: Where E2B's SDKs say which sandbox and port a request is for (``E2B_SANDBOX_URL`` mode).
SANDBOX_HEADER, PORT_HEADER = b"e2b-sandbox-id", b"e2b-sandbox-port"


class E2B:
    name = "e2b"

    def __init__(self, gate: Gate, tokens: Tokens, options: SandboxOptions, port_access: PortAccess) -> None:
        self.gate, self.engine, self.tokens = gate, gate.engine, tokens
        self.options, self.port_access = options, port_access
        self.autopause = AutoPause(gate.engine, options)
        self.envd = EnvdApp(gate, self.tokens)
        self.interpreter = InterpreterApp(gate, self.tokens)
        self.signed_files = SignedFiles(self.envd)
        self.metrics = MetricSamples(gate.engine)
        self._services: dict[int, ASGIApp] = {ENVD_PORT: self.envd, INTERPRETER_PORT: self.interpreter}
        from shoal.server.e2b.templates import TemplateBuilds
        self.templates = TemplateBuilds(gate.engine, tokens._secret)  # E2B's template build API

    def install(self, app: FastAPI) -> None:
        """The control-plane router and the ``/files`` route for signed URLs; ``app.state.e2b``.
        Native routes never pass through anything of the wing's."""
        from shoal.server.e2b import control, unsupported
        app.state.e2b = self
        app.include_router(control.router)
        from shoal.server.e2b import templates  # E2B's template build API; before snapshots: DELETE /templates
        app.include_router(templates.router)  # of a snapshot is handed on to snapshots.delete_snapshot
        from shoal.server.e2b import snapshots  # snapshots and fork (E2B's shapes)
        app.include_router(snapshots.router)
        from shoal.server.e2b import volumes  # E2B's volumes API (engine/volumes.py)
        app.include_router(volumes.router)
        app.add_route("/files", self.signed_files, methods=["GET", "POST"], include_in_schema=False)
        unsupported.install(app.router)  # E2B paths no route serves: 501, not "sandbox not found"

    def start(self) -> None:
        """At daemon start: auto-pause watches again over sandboxes that asked for it."""
        self.autopause.resume_watch()

    # --- SandboxAddressing (server/sandbox_routing.py) ------------------------------------------------
    def address(self, scope: Scope) -> tuple[str, int] | None:
        """(sandbox id, port) from ``E2b-Sandbox-Id`` / ``E2b-Sandbox-Port`` (default envd's port;
        a port that is not a number becomes -1, which the port proxy refuses with 400)."""
        sandbox_id = port = None
        for name, value in scope["headers"]:
            if name == SANDBOX_HEADER:
                sandbox_id = value.decode("latin-1")
            elif name == PORT_HEADER:
                port = value
        if sandbox_id is None:
            return None
        try:
            return sandbox_id, int(port) if port is not None else ENVD_PORT
        except ValueError:
            return sandbox_id, -1

    def service(self, port: int) -> ASGIApp | None:
        return self._services.get(port)
