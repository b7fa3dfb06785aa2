"""/v1/volumes: create, list, get, delete named volumes (``engine/volumes.py``), scoped to the caller's key.

Another key's volume does not exist here (404), exactly like another key's sandbox. Delete is refused
(409) while any sandbox mounts it, in whatever state.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from starlette.concurrency import run_in_threadpool

from shoal.engine import Engine
from shoal.engine.keys import ApiKey
from shoal.server.auth import api_key
from shoal.server.models import Volume, VolumeCreate
from shoal.server.routes.deps import engine

router = APIRouter(prefix="/v1/volumes", tags=["volumes"])


@router.post("", status_code=201, response_model=Volume)
async def create_volume(body: VolumeCreate, key: ApiKey = Depends(api_key), eng: Engine = Depends(engine)) -> Volume:
    vol = await run_in_threadpool(eng.volumes.create, body.name, body.size_mb, key)
    return Volume.of(eng.volumes.usage(vol))


@router.get("", response_model=list[Volume])
async def list_volumes(key: ApiKey = Depends(api_key), eng: Engine = Depends(engine)) -> list[Volume]:
    return [Volume.of(eng.volumes.usage(v)) for v in eng.volumes.list(key)]


@router.get("/{name}", response_model=Volume)
async def get_volume(name: str, key: ApiKey = Depends(api_key), eng: Engine = Depends(engine)) -> Volume:
    return Volume.of(eng.volumes.usage(eng.volumes.get(name, key)))


@router.delete("/{name}", status_code=204)
async def delete_volume(name: str, key: ApiKey = Depends(api_key), eng: Engine = Depends(engine)) -> Response:
    await run_in_threadpool(eng.volumes.remove, name, key)
    return Response(status_code=204)
