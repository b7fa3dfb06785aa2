"""E2B's snapshot and fork API, on the engine's snapshots (``engine/snapshots.py``) and fork (``engine/fork.py``).

What E2B's SDK sends (e2b python-sdk, ``sandbox_api.py``):

* ``create_snapshot(name=)`` → ``POST /sandboxes/{id}/snapshots`` ``{"name"?}`` → 201 ``{snapshotID, names}``.
  In E2B a snapshot *is* a template: a name already in use gets the new build, so here the newer
  snapshot takes the name (the older one keeps its id).
* ``list_snapshots(sandbox_id=, name=, limit=, next_token=)`` → ``GET /snapshots?sandboxID&name&limit&nextToken``;
  the next page's token comes back in ``x-next-token``.
* ``delete_snapshot(id)`` → ``DELETE /templates/{id}`` (URL-encoded): 204, 404 when unknown (the SDK says
  ``False``), 409 while sandboxes use it.
* ``Sandbox.create(snapshot_id)`` → ``POST /sandboxes`` with ``templateID`` = the snapshot id: ``control.create``
  asks ``snapshot_of_template`` first.
* ``fork(count, timeout)`` → ``POST /sandboxes/{id}/fork`` ``{timeout, count}`` → 201 one ``{sandbox}`` or
  ``{error: {code, message}}`` per fork. Memory is not copied (``engine/fork.py``).

Snapshot references accept E2B's spellings: ``id``, ``name``, ``name:tag`` and ``team/name:tag`` (the
namespace and tag carry nothing here: names are per key already).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from shoal.engine import Engine
from shoal.engine.fork import check_count, fork
from shoal.engine.keys import ApiKey
from shoal.engine.snapshots import SnapshotRecord
from shoal.errors import InvalidRequest, NotFound, ShoalError
from shoal.server.e2b.control import E2BRoute, _body, _engine, _key, _sandbox, _timeout

router = APIRouter(route_class=E2BRoute, tags=["e2b"], include_in_schema=False)
TAG = "default"


def _plain(ref: str) -> str:
    """``team/name:tag`` → ``name``."""
    return ref.rsplit("/", 1)[-1].split(":", 1)[0]


def snapshot_of_template(eng: Engine, key: ApiKey, template: str) -> str | None:
    """The snapshot id an E2B ``templateID`` names for this key, or None (then it is a template)."""
    try:
        return eng.snapshots.get(_plain(template), key).id
    except NotFound:
        return None


def _info(snap: SnapshotRecord) -> dict:
    return {"snapshotID": snap.id, "names": [f"{snap.name}:{TAG}"] if snap.name else []}


@router.post("/sandboxes/{sandbox_id}/snapshots", status_code=201)
async def create_snapshot(sandbox_id: str, request: Request) -> JSONResponse:
    key, eng = _key(request), _engine(request)
    body = await _body(request)
    name = body.get("name")
    if name is not None and not isinstance(name, str):
        raise InvalidRequest("name must be a string")
    snap = await run_in_threadpool(eng.snapshots.create, sandbox_id, _plain(name) if name else None, key,
                                   take_name=True)
    return JSONResponse(_info(snap), status_code=201)


@router.get("/snapshots")
async def list_snapshots(request: Request) -> JSONResponse:
    key, eng = _key(request), _engine(request)
    q = request.query_params
    try:
        limit = max(1, min(int(q.get("limit") or 100), 1000))
        start = int(q.get("nextToken") or 0)
    except ValueError as exc:
        raise InvalidRequest("limit and nextToken must be integers") from exc
    name = q.get("name")
    snaps = eng.snapshots.list(key, sandbox_id=q.get("sandboxID") or None, name=_plain(name) if name else None)
    page = snaps[max(0, start):max(0, start) + limit]
    headers = {"x-next-token": str(start + limit)} if start + limit < len(snaps) else None
    return JSONResponse([_info(s) for s in page], headers=headers)


@router.delete("/templates/{template_id:path}", status_code=204)
async def delete_snapshot(template_id: str, request: Request) -> Response:
    """Only snapshots are templates one may delete through E2B's API here; anything else is 404."""
    key, eng = _key(request), _engine(request)
    snap = eng.snapshots.get(_plain(template_id), key)
    await run_in_threadpool(eng.snapshots.delete, snap.id, key)
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/fork", status_code=201)
async def fork_sandbox(sandbox_id: str, request: Request) -> JSONResponse:
    key, eng = _key(request), _engine(request)
    body = await _body(request)
    count = body.get("count", 1)
    check_count(count)
    timeout = _timeout(body.get("timeout"))
    parent = eng.get(sandbox_id, key)
    results = await run_in_threadpool(fork, eng, sandbox_id, count, key, timeout)
    access = request.app.state.e2b.port_access
    public, ports = access.publicity(parent.id)
    out: list[dict] = []
    for r in results:
        if isinstance(r, ShoalError):
            out.append({"error": {"code": r.status, "message": r.message}})
        else:
            access.set_public(r.id, public, ports)
            out.append({"sandbox": _sandbox(r, request)})
    return JSONResponse(out, status_code=201)
