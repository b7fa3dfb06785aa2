"""/v1/sandboxes: create, get, list, delete, timeout, pause, resume."""

from __future__ import annotations

import time

from fastapi import APIRouter, Body, Depends, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from shoal.engine import Engine, SandboxState
from shoal.engine.keys import ApiKey
from shoal.engine.models import SandboxRecord
from shoal.errors import InvalidRequest
from shoal.server.auth import api_key
from shoal.server.models import NetworkUpdate, PauseRequest, Sandbox, SandboxCreate, TimeoutUpdate
from shoal.server.port_access import PortAccess
from shoal.server.routes.deps import engine

router = APIRouter(prefix="/v1/sandboxes", tags=["sandboxes"])


async def port_access(request: Request) -> PortAccess:
    """The daemon's one ``PortAccess`` (made in ``app.create_app``)."""
    return request.app.state.port_access


def _with_access(sandboxes: list[Sandbox], access: PortAccess) -> list[Sandbox]:
    """Add the port settings and the traffic token (the caller owns these sandboxes)."""
    for sb in sandboxes:
        sb.public_traffic, sb.public_ports = access.publicity(sb.id)
        sb.traffic_access_token = access.tokens.traffic(sb.id)
    return sandboxes


def _one(rec: SandboxRecord, access: PortAccess) -> Sandbox:
    return _with_access([Sandbox.of(rec)], access)[0]


@router.post("", status_code=201, response_model=Sandbox)
async def create_sandbox(body: SandboxCreate, request: Request, key: ApiKey = Depends(api_key),
                         eng: Engine = Depends(engine)) -> Sandbox:
    started = time.perf_counter()
    rec = await run_in_threadpool(eng.create, body.template, cpu=body.cpu, memory_mb=body.memory_mb,
                                  disk_mb=body.disk_mb, env=body.env, metadata=body.metadata, timeout=body.timeout,
                                  api_key=key, layer=body.layer, internet=body.internet,
                                  networks=body.networks, name=body.name,
                                  volumes=[v.model_dump() for v in body.volumes], standby_after=body.standby_after,
                                  snapshot=body.snapshot, egress=body.egress, net_limits=body.net_limits)
    if body.public_traffic or body.public_ports:
        request.app.state.port_access.set_public(rec.id, body.public_traffic, body.public_ports)
    request.app.state.metrics.create_seconds.observe(time.perf_counter() - started)
    return _one(rec, request.app.state.port_access)


@router.get("", response_model=list[Sandbox])
async def list_sandboxes(key: ApiKey = Depends(api_key), eng: Engine = Depends(engine),
                         access: PortAccess = Depends(port_access),
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
    return _with_access([Sandbox.of(r) for r in eng.list(key, states or None, wanted or None)], access)


@router.get("/{sandbox_id}", response_model=Sandbox)
async def get_sandbox(sandbox_id: str, key: ApiKey = Depends(api_key), eng: Engine = Depends(engine),
                      access: PortAccess = Depends(port_access)) -> Sandbox:
    """One sandbox, with its writable layer's usage (``disk_used_bytes``/``disk_total_bytes``)."""
    rec = eng.get(sandbox_id, key)
    return _with_access([Sandbox.of(rec, eng.disk_usage(rec.id))], access)[0]


@router.delete("/{sandbox_id}", status_code=204)
async def delete_sandbox(sandbox_id: str, key: ApiKey = Depends(api_key), eng: Engine = Depends(engine)) -> Response:
    await run_in_threadpool(eng.destroy, sandbox_id, key)
    return Response(status_code=204)


@router.post("/{sandbox_id}/timeout", response_model=Sandbox)
async def set_timeout(sandbox_id: str, body: TimeoutUpdate, key: ApiKey = Depends(api_key),
                      eng: Engine = Depends(engine), access: PortAccess = Depends(port_access)) -> Sandbox:
    return _one(eng.set_timeout(sandbox_id, body.timeout, key), access)


@router.post("/{sandbox_id}/pause", response_model=Sandbox)
async def pause(sandbox_id: str, body: PauseRequest | None = Body(None), key: ApiKey = Depends(api_key),
                eng: Engine = Depends(engine), access: PortAccess = Depends(port_access)) -> Sandbox:
    """Body ``{"mode": "filesystem"}`` stops it and frees its memory, keeping its files; none (or ``memory``)
    freezes it."""
    mode = body.mode if body is not None else "memory"
    return _one(await run_in_threadpool(eng.pause, sandbox_id, key, mode), access)


@router.post("/{sandbox_id}/resume", response_model=Sandbox)
async def resume(sandbox_id: str, key: ApiKey = Depends(api_key), eng: Engine = Depends(engine),
                 access: PortAccess = Depends(port_access)) -> Sandbox:
    return _one(await run_in_threadpool(eng.resume, sandbox_id, key), access)


@router.put("/{sandbox_id}/egress")
async def set_egress(sandbox_id: str, body: dict = Body(...), key: ApiKey = Depends(api_key),
                     eng: Engine = Depends(engine)) -> dict:
    """Replace the sandbox's egress policy (``allow_out``, ``deny_out``, ``rules``, ``internet``) in one nft
    batch; answers the policy as applied. ``/network`` is the port proxy's publicity (another setting)."""
    policy = {k: v for k, v in body.items() if k != "internet"}
    internet = body.get("internet")
    if internet is not None and not isinstance(internet, bool):
        raise InvalidRequest("internet must be a boolean")
    return await run_in_threadpool(eng.update_network, sandbox_id, policy, internet, key)


@router.put("/{sandbox_id}/network", response_model=Sandbox)
async def set_network(sandbox_id: str, body: NetworkUpdate, key: ApiKey = Depends(api_key),
                      eng: Engine = Depends(engine), access: PortAccess = Depends(port_access)) -> Sandbox:
    """Which ports the port proxy serves without credentials (``public_traffic``: all of them)."""
    rec = eng.get(sandbox_id, key)
    access.set_public(rec.id, body.public_traffic, body.public_ports)
    return _one(rec, access)
