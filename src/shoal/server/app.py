"""The ASGI app: native REST under /v1, health, metrics, events, the MCP endpoint at /mcp, and the
E2B wing (control plane /sandboxes, /v2/sandboxes, signed-URL /files); ``create_asgi`` adds the
sandbox traffic routing (sandbox ports; the E2B wing's envd and code interpreter) in front of it.

This is where the daemon's single instances are made and wired: the gate, the per-sandbox options
store, the sandbox tokens, port access and the E2B wing. Nothing else makes them, nothing caches
them per process or on the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from shoal import __version__
from shoal.engine import Engine
from shoal.server import errors
from shoal.server.e2b.security import Tokens
from shoal.server.e2b.wing import E2B
from shoal.server.exposed_ports import ExposedPorts
from shoal.server.fastpath import ExecFastPath
from shoal.server.gate import Gate
from shoal.server.metrics import Metrics
from shoal.server.port_access import PortAccess
from shoal.server.portproxy import PortProxy
from shoal.server.routes import files, processes, pty, sandboxes, system, volumes
from shoal.server.sandbox_options import SandboxOptions
from shoal.server.sandbox_routing import SandboxRouting

log = logging.getLogger("shoal.server")
REAPER_INTERVAL = 1.0


async def _reaper(engine: Engine) -> None:
    """Once a second: delete expired sandboxes, and fail those whose agent died (``Engine.check_health``)."""
    while True:
        await asyncio.sleep(REAPER_INTERVAL)
        try:
            gone = await run_in_threadpool(engine.expire)
            for sid in gone:
                log.info("sandbox expired", extra={"sandbox": sid})
            for sid in await run_in_threadpool(engine.check_health):
                log.warning("sandbox agent died", extra={"sandbox": sid})
        except Exception:  # noqa: BLE001 - the reaper must outlive any single failure
            log.exception("reaper failed")


def create_app(engine: Engine) -> FastAPI:
    extra_lifespans: list = []

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_reaper(engine))
        app.state.gate.standby.start()  # idle sandboxes go to standby (engine/standby.py)
        async with contextlib.AsyncExitStack() as stack:
            for ctx in extra_lifespans:
                await stack.enter_async_context(ctx(app))
            try:
                yield
            finally:
                task.cancel()
                app.state.gate.standby.stop()

    app = FastAPI(title="Shoal", version=__version__, lifespan=lifespan,
                  description="Sandboxes for AI agents: native REST API. Authenticate with "
                              "`Authorization: Bearer <key>` (see `shoal keys create`).")
    app.state.engine = engine
    gate = app.state.gate = Gate(engine)  # the only way from (sandbox, credential) to an agent: server/gate.py
    app.state.metrics = Metrics(engine)
    options = SandboxOptions(engine.settings.state_dir)
    options.follow(engine)
    tokens = Tokens(engine.settings.state_dir)
    app.state.port_access = PortAccess(engine, tokens, options)
    errors.install(app)
    for module in (system, sandboxes, processes, files, pty, volumes):
        app.include_router(module.router)
    from shoal.server.routes import networks, ports, snapshots  # private networks; ports; snapshots and fork
    for module in (networks, ports, snapshots):
        app.include_router(module.router)
    app.state.exposed_ports = ExposedPorts(gate)  # sandbox ports on host ports, listened again at start
    extra_lifespans.append(app.state.exposed_ports.lifespan)
    wing = E2B(gate, tokens, options, app.state.port_access)
    wing.install(app)
    wing.start()
    try:
        from shoal.server import mcp_endpoint
    except ImportError:  # pragma: no cover - the endpoint ships with the daemon
        mcp_endpoint = None  # type: ignore[assignment]
    if mcp_endpoint is not None:
        extra_lifespans.append(mcp_endpoint.mount(app, engine))
    return app


def create_asgi(engine: Engine) -> SandboxRouting:
    """What the daemon serves: ``create_app`` behind the exec fast path (``fastpath.py``, in front of
    FastAPI's own middleware, which a plain exec does not need) behind ``SandboxRouting``, which sends
    traffic addressed to a sandbox (``Host: <port>-<id>.<domain>``, or the E2B wing's headers) to the
    wing's envd or code interpreter, or to the port proxy; everything else reaches the app untouched.
    All share ``engine``, so a sandbox is the same through every API."""
    app = create_app(engine)
    front = ExecFastPath(app, gate=app.state.gate, metrics=app.state.metrics)
    proxy = PortProxy(app.state.gate, app.state.port_access)
    return SandboxRouting(front, proxy, wings=(app.state.e2b,))
