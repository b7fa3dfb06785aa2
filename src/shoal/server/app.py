"""The ASGI app: native REST under /v1, health, metrics, events, the MCP endpoint at /mcp, and the
E2B control plane (/sandboxes, /v2/sandboxes); ``create_asgi`` adds the sandbox traffic routing
(E2B envd, code interpreter, sandbox ports) in front of it."""

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
from shoal.server.fastpath import ExecFastPath
from shoal.server.gate import Gate
from shoal.server.metrics import Metrics
from shoal.server.routes import files, processes, pty, sandboxes, system

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
        async with contextlib.AsyncExitStack() as stack:
            for ctx in extra_lifespans:
                await stack.enter_async_context(ctx(app))
            try:
                yield
            finally:
                task.cancel()

    app = FastAPI(title="Shoal", version=__version__, lifespan=lifespan,
                  description="Sandboxes for AI agents: native REST API. Authenticate with "
                              "`Authorization: Bearer <key>` (see `shoal keys create`).")
    app.state.engine = engine
    app.state.gate = Gate(engine)  # the only way from (sandbox, credential) to an agent: server/gate.py
    app.state.metrics = Metrics(engine)
    errors.install(app)
    app.add_middleware(ExecFastPath, gate=app.state.gate, metrics=app.state.metrics)
    for module in (system, sandboxes, processes, files, pty):
        app.include_router(module.router)
    from shoal.server.e2b import control as e2b_control
    app.include_router(e2b_control.router)
    try:
        from shoal.server import mcp_endpoint
    except ImportError:  # pragma: no cover - the endpoint ships with the daemon
        mcp_endpoint = None  # type: ignore[assignment]
    if mcp_endpoint is not None:
        extra_lifespans.append(mcp_endpoint.mount(app, engine))
    return app


def create_asgi(engine: Engine):  # noqa: ANN201
    """What the daemon serves: ``create_app`` behind ``SandboxRouting``, which sends traffic addressed
    to a sandbox (E2B headers or ``Host: <port>-<id>.<domain>``) to envd, the code interpreter or
    the port proxy. All share ``engine``, so a sandbox is the same through every API."""
    from shoal.server.e2b import interpreter_app
    from shoal.server.e2b.control import AutoPause, options
    from shoal.server.e2b.envd import EnvdApp, SignedFiles
    from shoal.server.portproxy import PortProxy
    from shoal.server.sandbox_routing import SandboxRouting

    app = create_app(engine)
    opts = options(engine)
    existing = engine.list()
    opts.prune({r.id for r in existing})
    if any(opts.get(r.id).get("autoPause") for r in existing):
        AutoPause.of(engine).ensure()
    engine.subscribe(lambda ev: opts.drop(ev["sandbox"]["id"]) if ev.get("type") == "deleted" else None)
    gate = app.state.gate
    envd = EnvdApp(gate)
    return SandboxRouting(SignedFiles(app, envd), envd, interpreter_app(gate), PortProxy(gate))
