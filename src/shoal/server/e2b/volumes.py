"""E2B's volumes API (``Volume.create/connect/get_info/list/destroy``) on Shoal's named volumes.

``POST /volumes {name}`` → 201 ``{volumeID, name, token}``; ``GET /volumes``; ``GET``/``DELETE
/volumes/{volumeID}`` (a name works too). The same volumes as ``/v1/volumes`` (``engine/volumes.py``),
scoped to the caller's key; ``Sandbox.create(volume_mounts={path: volume})`` sends ``volumeMounts:
[{name, path}]``, which the control plane mounts read-write. E2B's volume *content* API (reading and
writing a volume's files from outside any sandbox) is not served: the host never walks a volume's tree
(a sandbox wrote it), so ``token`` is empty; mount the volume in a sandbox to reach its files.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from shoal.engine.volumes import DEFAULT_SIZE_MB, VolumeRecord
from shoal.server.e2b.control import E2BRoute, _body, _engine, _key

router = APIRouter(route_class=E2BRoute, tags=["e2b"], include_in_schema=False)


def _shape(vol: VolumeRecord, token: bool = True) -> dict:
    return {"volumeID": vol.id, "name": vol.name, **({"token": ""} if token else {})}


def mounts_of(body: dict) -> list[dict]:
    """E2B's ``volumeMounts`` as ``Engine.create``'s ``volumes`` (checked there: names, paths, the key)."""
    raw = body.get("volumeMounts") or []
    if not isinstance(raw, list):
        raw = [raw]  # the engine refuses what is not a mount
    return [{"name": m.get("name"), "path": m.get("path"), "read_only": False} if isinstance(m, dict) else m
            for m in raw]


@router.post("/volumes", status_code=201)
async def create(request: Request) -> JSONResponse:
    key, eng, body = _key(request), _engine(request), await _body(request)
    vol = await run_in_threadpool(eng.volumes.create, body.get("name"), DEFAULT_SIZE_MB, key)
    return JSONResponse(_shape(vol), status_code=201)


@router.get("/volumes")
async def list_volumes(request: Request) -> JSONResponse:
    return JSONResponse([_shape(v, token=False) for v in _engine(request).volumes.list(_key(request))])


@router.get("/volumes/{volume_id}")
async def get(volume_id: str, request: Request) -> JSONResponse:
    return JSONResponse(_shape(_engine(request).volumes.get(volume_id, _key(request))))


@router.delete("/volumes/{volume_id}", status_code=204)
async def delete(volume_id: str, request: Request) -> Response:
    await run_in_threadpool(_engine(request).volumes.remove, volume_id, _key(request))
    return Response(status_code=204)
