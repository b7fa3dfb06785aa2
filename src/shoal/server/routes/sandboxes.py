"""/v1/sandboxes: create, get, list, delete, timeout, pause, resume."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from shoal.engine import Engine, SandboxState
from shoal.engine.keys import ApiKey
from shoal.errors import InvalidRequest
from shoal.server.auth import api_key
from shoal.server.models import Sandbox, SandboxCreate, TimeoutUpdate
from shoal.server.routes.deps import engine

router = APIRouter(prefix="/v1/sandboxes", tags=["sandboxes"])


@router.post("", status_code=201, response_model=Sandbox)
async def create_sandbox(body: SandboxCreate, request: Request, key: ApiKey = Depends(api_key),
                         eng: Engine = Depends(engine)) -> Sandbox:
    started = time.perf_counter()
    rec = await run_in_threadpool(eng.create, body.template, cpu=body.cpu, memory_mb=body.memory_mb,
                                  disk_mb=body.disk_mb, env=body.env, metadata=body.metadata, timeout=body.timeout,
                                  api_key=key)
    request.app.state.metrics.create_seconds.observe(time.perf_counter() - started)
    return Sandbox.of(rec)


@router.get("", response_model=list[Sandbox])
async def list_sandboxes(key: ApiKey = Depends(api_key), eng: Engine = Depends(engine),
                         state: list[str] = Query(default=[], description="Filter by state (repeat or comma-list)."),
                         metadata: list[str] = Query(default=[], description="key=value, all must match.")
                         ) -> list[Sandbox]:
    states: set[SandboxState] = set()
    for part in ",".join(state).split(","):
        if part:
            try:
                states.add(SandboxState(part))
            except ValueError as exc:
                raise InvalidRequest(f"unknown state {part!r}") from exc
    wanted: dict[str, str] = {}
    for pair in metadata:
        k, sep, v = pair.partition("=")
        if not sep or not k:
            raise InvalidRequest(f"metadata filter must be key=value, not {pair!r}")
        wanted[k] = v
    return [Sandbox.of(r) for r in eng.list(key, states or None, wanted or None)]


@router.get("/{sandbox_id}", response_model=Sandbox)
async def get_sandbox(sandbox_id: str, key: ApiKey = Depends(api_key), eng: Engine = Depends(engine)) -> Sandbox:
    return Sandbox.of(eng.get(sandbox_id, key))


@router.delete("/{sandbox_id}", status_code=204)
async def delete_sandbox(sandbox_id: str, key: ApiKey = Depends(api_key), eng: Engine = Depends(engine)) -> Response:
    await run_in_threadpool(eng.destroy, sandbox_id, key)
    return Response(status_code=204)


@router.post("/{sandbox_id}/timeout", response_model=Sandbox)
async def set_timeout(sandbox_id: str, body: TimeoutUpdate, key: ApiKey = Depends(api_key),
                      eng: Engine = Depends(engine)) -> Sandbox:
    return Sandbox.of(eng.set_timeout(sandbox_id, body.timeout, key))


@router.post("/{sandbox_id}/pause", response_model=Sandbox)
async def pause(sandbox_id: str, key: ApiKey = Depends(api_key), eng: Engine = Depends(engine)) -> Sandbox:
    return Sandbox.of(await run_in_threadpool(eng.pause, sandbox_id, key))


@router.post("/{sandbox_id}/resume", response_model=Sandbox)
async def resume(sandbox_id: str, key: ApiKey = Depends(api_key), eng: Engine = Depends(engine)) -> Sandbox:
    return Sandbox.of(await run_in_threadpool(eng.resume, sandbox_id, key))
