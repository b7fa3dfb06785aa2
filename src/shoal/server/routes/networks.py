"""/v1/networks: private networks of the caller's key (create, list, get, delete; 409 while in use)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from starlette.concurrency import run_in_threadpool

from shoal.engine import Engine
from shoal.engine.keys import ApiKey
from shoal.server.auth import api_key
from shoal.server.models import NetworkCreate, PrivateNetworkInfo
from shoal.server.routes.deps import engine

router = APIRouter(prefix="/v1/networks", tags=["networks"])


@router.post("", status_code=201, response_model=PrivateNetworkInfo)
async def create_network(body: NetworkCreate, key: ApiKey = Depends(api_key),
                         eng: Engine = Depends(engine)) -> PrivateNetworkInfo:
    net = await run_in_threadpool(eng.private_networks.create, key.id, body.name)
    return PrivateNetworkInfo(**net.to_dict())


@router.get("", response_model=list[PrivateNetworkInfo])
async def list_networks(key: ApiKey = Depends(api_key), eng: Engine = Depends(engine)) -> list[PrivateNetworkInfo]:
    nets = await run_in_threadpool(eng.private_networks.list, key.id, eng.store.all())
    return [PrivateNetworkInfo(**n.to_dict()) for n in nets]


@router.get("/{name}", response_model=PrivateNetworkInfo)
async def get_network(name: str, key: ApiKey = Depends(api_key), eng: Engine = Depends(engine)) -> PrivateNetworkInfo:
    return PrivateNetworkInfo(**eng.private_networks.get(key.id, name, eng.store.all()).to_dict())


@router.delete("/{name}", status_code=204)
async def delete_network(name: str, key: ApiKey = Depends(api_key), eng: Engine = Depends(engine)) -> Response:
    await run_in_threadpool(eng.delete_network, name, key)
    return Response(status_code=204)
