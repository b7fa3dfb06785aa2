"""The E2B control plane (what ``Sandbox.create/connect/list/kill/...`` call), on the daemon's engine.

Same sandboxes as the native API: a sandbox made here is visible at ``/v1/sandboxes/{id}`` and the
other way round; every call is scoped to the caller's API key (``X-API-KEY``, either key form).

Errors are E2B's shape, ``{"code": <int HTTP status>, "message"}`` (the native API uses string
codes; the route class below keeps the two apart).

``domain`` (what ``get_host(port)`` appends to ``<port>-<id>.``) is ``SHOAL_E2B_DOMAIN`` if set,
else ``localhost:<the port the client reached the daemon on>``: ``*.localhost`` names resolve to
the loopback address in browsers, curl and most HTTP clients, and the daemon routes such a Host
header to the port inside the sandbox. Behind a wildcard DNS name, set ``SHOAL_E2B_DOMAIN``.

Create accepts E2B's body; ``templateID`` (default ``base``), ``timeout`` (default 300 s),
``metadata``, ``envVars`` (every process's environment), ``autoPause`` (pause instead of delete at
the timeout, see ``autopause.py``; with ``autoResume.enabled`` the next request wakes it),
``volumeMounts`` (the key's volumes, ``volumes.py``), ``network.allowPublicTraffic`` (false: ``get_host``
traffic needs the traffic token), ``network.allowOut/denyOut/rules`` and ``allow_internet_access`` (egress policy,
``egress.py``) are honoured; other fields (``mcp``,
``iam``) are accepted and ignored. Pause keeps the memory (the processes are frozen) unless
``memory: false`` asks for a filesystem-only pause (every process stopped; resume cold-boots).

The router reaches the daemon's one E2B wing as ``request.app.state.e2b`` (tokens, options store,
auto-pause): nothing is kept on the engine or in module globals beyond the idempotency table.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import time
import urllib.parse
from datetime import UTC, datetime

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from shoal.engine import Engine, SandboxState
from shoal.engine.keys import ApiKey
from shoal.engine.limits import LIMITS
from shoal.engine.models import SandboxRecord
from shoal.engine.text import check_text
from shoal.errors import CapacityExceeded, InvalidRequest, InvalidTransition, NotFound, QuotaExceeded, ShoalError
from shoal.server.auth import key_from_headers
from shoal.server.e2b import ENVD_VERSION, bounded_json, egress
from shoal.server.e2b.autopause import OPTION as AUTO_PAUSE
from shoal.server.e2b.security import Tokens

CLIENT_ID = "shoal"
DEFAULT_TEMPLATE = "base"
DEFAULT_TIMEOUT = 300
MAX_PAGE = 1000
DOMAIN_ENV = "SHOAL_E2B_DOMAIN"
NEVER = "9999-12-31T23:59:59Z"
IDEMPOTENCY_TTL = 600.0
#: A control-plane body is a few fields; anything near this size is not one.
MAX_BODY = 1024 * 1024
#: What ``timeout: 0`` sets: the smallest timeout the engine takes (it refuses 0), i.e. expired now.
EXPIRE_NOW = 0.001
log = logging.getLogger("shoal.e2b")


def e2b_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": status, "message": message}, status_code=status, headers=headers)


class E2BRoute(APIRoute):
    """Answers failures as E2B does (integer codes), whatever the app-wide handlers do."""

    def get_route_handler(self):  # noqa: ANN201
        inner = super().get_route_handler()

        async def handler(request: Request) -> Response:
            try:
                return await inner(request)
            except ShoalError as exc:
                retry = {"Retry-After": "1"} if isinstance(exc, CapacityExceeded | QuotaExceeded) else None
                return e2b_error(exc.status, exc.message, retry)
            except RequestValidationError as exc:
                return e2b_error(400, "; ".join(str(e.get("msg")) for e in exc.errors()[:3]) or "invalid request")
            except Exception as exc:  # noqa: BLE001 - E2B's shape for the unexpected too
                log.exception("E2B control-plane call failed")
                return e2b_error(500, f"internal error: {type(exc).__name__}")
        return handler


router = APIRouter(route_class=E2BRoute, tags=["e2b"], include_in_schema=False)


# --- helpers ---------------------------------------------------------------------------------------

def _engine(request: Request) -> Engine:
    return request.app.state.engine


def _key(request: Request) -> ApiKey:
    return key_from_headers(request.headers, _engine(request))


def _tokens(request: Request) -> Tokens:
    return request.app.state.e2b.tokens


async def _body(request: Request) -> dict:
    """The JSON object body, read up to ``MAX_BODY`` bytes and parsed by the bounded parser."""
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise InvalidRequest(f"request body larger than {MAX_BODY} bytes")
    try:
        return bounded_json.loads_object(bytes(raw), max_bytes=MAX_BODY)
    except bounded_json.BadJson as exc:
        raise InvalidRequest(f"request body: {exc}") from exc


def _iso(ts: float | None) -> str:
    if ts is None:
        return NEVER
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def domain(request: Request) -> str:
    """What ``get_host`` appends: see the module docstring."""
    configured = os.environ.get(DOMAIN_ENV)
    if configured:
        return configured
    host = request.headers.get("host", "")
    port = None
    if host.startswith("["):
        end = host.find("]")
        rest = host[end + 1:] if end >= 0 else ""
        port = rest[1:] if rest.startswith(":") else None
    elif ":" in host:
        port = host.rsplit(":", 1)[1]
    if not port or not port.isdigit():
        server = request.scope.get("server")
        port = str(server[1]) if server and server[1] else "80"
    return f"localhost:{port}"


def _string_map(value: object, what: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise InvalidRequest(f"{what} must map strings to strings")
    return {check_text(k, f"a {what} key"): check_text(v, f"{what}[{k!r}]") for k, v in value.items()}


def _state(rec: SandboxRecord) -> str:
    return "paused" if rec.state is SandboxState.PAUSED else "running"


def _timeout(value: object, default: int | None = DEFAULT_TIMEOUT) -> int | None:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest("timeout must be a number of seconds")
    LIMITS.check("timeout", value)
    return int(value)


def _sandbox(rec: SandboxRecord, request: Request) -> dict:
    """The ``Sandbox`` answer of create and connect."""
    tokens = _tokens(request)
    return {"templateID": rec.template, "sandboxID": rec.id, "clientID": CLIENT_ID, "envdVersion": ENVD_VERSION,
            "alias": rec.template, "envdAccessToken": tokens.envd(rec.id), "trafficAccessToken": tokens.traffic(rec.id),
            "domain": domain(request)}


def _listed(rec: SandboxRecord) -> dict:
    """``ListedSandbox``."""
    return {"templateID": rec.template, "alias": rec.template, "sandboxID": rec.id, "clientID": CLIENT_ID,
            "startedAt": _iso(rec.created_at), "endAt": _iso(rec.expires_at),
            "cpuCount": max(1, math.ceil(rec.cpu)), "memoryMB": rec.memory_mb, "diskSizeMB": rec.disk_mb,
            "state": _state(rec), "envdVersion": ENVD_VERSION, "metadata": dict(rec.metadata)}


def _detail(rec: SandboxRecord, request: Request) -> dict:
    """``SandboxDetail``."""
    out = _listed(rec)
    out["envdAccessToken"] = _tokens(request).envd(rec.id)
    out["domain"] = domain(request)
    return out


def _metadata_filter(raw: list[str]) -> dict[str, str]:
    """The SDK sends ``metadata=<urlencode({quote(k): quote(v)})>``: decode both layers."""
    wanted: dict[str, str] = {}
    for item in raw:
        for k, v in urllib.parse.parse_qsl(item, keep_blank_values=True):
            wanted[urllib.parse.unquote(k)] = urllib.parse.unquote(v)
    return wanted


def _states(raw: list[str]) -> set[SandboxState]:
    states: set[SandboxState] = set()
    for part in ",".join(raw).split(","):
        part = part.strip()
        if not part:
            continue
        if part == "running":
            states.add(SandboxState.RUNNING)
        elif part == "paused":
            states.add(SandboxState.PAUSED)
        else:
            raise InvalidRequest(f"unknown state {part!r} (running or paused)")
    return states or {SandboxState.RUNNING, SandboxState.PAUSED}


def _encode_token(rec: SandboxRecord) -> str:
    return base64.urlsafe_b64encode(json.dumps([rec.created_at, rec.id]).encode()).decode().rstrip("=")


def _decode_token(token: str) -> tuple[float, str]:
    try:
        created, sid = bounded_json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)), max_depth=2)
        if not isinstance(created, int | float) or not isinstance(sid, str):
            raise ValueError("not [created, id]")
        return float(created), sid
    except (ValueError, TypeError) as exc:  # BadJson and binascii.Error are ValueErrors
        raise InvalidRequest("invalid nextToken") from exc


def _select(request: Request, key: ApiKey, states: set[SandboxState]) -> list[SandboxRecord]:
    q = request.query_params
    wanted = _metadata_filter(q.getlist("metadata"))
    template = q.get("template")
    started_after = q.get("startedAfter")
    after_ts = None
    if started_after:
        try:
            after_ts = datetime.fromisoformat(started_after.replace("Z", "+00:00")).timestamp()
        except ValueError as exc:
            raise InvalidRequest(f"invalid startedAfter {started_after!r}") from exc
    recs = _engine(request).list(key, states, wanted or None)
    if template:
        recs = [r for r in recs if r.template == template]
    if after_ts is not None:
        recs = [r for r in recs if r.created_at >= after_ts]
    return recs


# --- create ----------------------------------------------------------------------------------------

_idempotent: dict[tuple[str, str], tuple[float, str]] = {}


@router.post("/sandboxes", status_code=201)
@router.post("/v2/sandboxes", status_code=201)
async def create(request: Request) -> JSONResponse:
    key = _key(request)
    eng = _engine(request)
    body = await _body(request)
    template = check_text(body.get("templateID") or DEFAULT_TEMPLATE, "templateID")
    from shoal.server.e2b.snapshots import snapshot_of_template  # in E2B a snapshot is a template
    snapshot = snapshot_of_template(eng, key, template)
    timeout = _timeout(body.get("timeout"))
    metadata = _string_map(body.get("metadata") or {}, "metadata")
    env = _string_map(body.get("envVars") or {}, "envVars")
    from shoal.server.e2b.volumes import mounts_of  # volumeMounts: the key's volumes (e2b/volumes.py)
    volumes = mounts_of(body)
    network = body.get("network") or {}
    public = not (isinstance(network, dict) and network.get("allowPublicTraffic") is False)
    auto_pause = body.get("autoPause") is True

    idem = request.headers.get("idempotency-key")
    now = time.monotonic()
    for k, (at, _sid) in list(_idempotent.items()):
        if now - at > IDEMPOTENCY_TTL:
            del _idempotent[k]
    if idem and (key.id, idem) in _idempotent:
        try:
            rec = eng.get(_idempotent[(key.id, idem)][1], key)
            return JSONResponse(_sandbox(rec, request), status_code=201)
        except NotFound:
            pass

    rec = await run_in_threadpool(eng.create, template, env=env, metadata=metadata, timeout=timeout, api_key=key,
                                  snapshot=snapshot, volumes=volumes, **egress.create_args(body))
    wing = request.app.state.e2b
    wing.port_access.set_public(rec.id, public, [])
    if auto_pause:
        wing.autopause.enable(rec.id, auto_resume=_auto_resume(body),
                              keep_memory=body.get("autoPauseMemory") is not False)
    if idem:
        _idempotent[(key.id, idem)] = (now, rec.id)
    return JSONResponse(_sandbox(rec, request), status_code=201)


def _auto_resume(body: dict) -> bool:
    """E2B's ``lifecycle.auto_resume`` (``autoResume: {enabled}``): traffic wakes it after its auto-pause."""
    raw = body.get("autoResume")
    return raw is True or (isinstance(raw, dict) and raw.get("enabled") is True)


@router.put("/sandboxes/{sandbox_id}/network", status_code=204)
async def update_network(sandbox_id: str, request: Request) -> Response:
    """E2B's ``update_network``: the whole egress policy replaced (server/e2b/egress.py)."""
    policy, internet = egress.update_args(await _body(request))
    await run_in_threadpool(_engine(request).update_network, sandbox_id, policy, internet, _key(request))
    return Response(status_code=204)


# --- read ------------------------------------------------------------------------------------------

@router.get("/sandboxes/{sandbox_id}")
async def get_sandbox(sandbox_id: str, request: Request) -> JSONResponse:
    rec = _engine(request).get(sandbox_id, _key(request))
    if rec.state not in (SandboxState.RUNNING, SandboxState.PAUSED):
        raise NotFound(f"sandbox {sandbox_id} is {rec.state.value}")
    return JSONResponse(_detail(rec, request))


@router.get("/v2/sandboxes")
async def list_v2(request: Request) -> JSONResponse:
    key = _key(request)
    q = request.query_params
    recs = _select(request, key, _states(q.getlist("state")))
    order = q.get("order") or "desc"  # E2B's spec: newest first unless asked otherwise
    if order not in ("asc", "desc"):
        raise InvalidRequest(f"order must be asc or desc, not {order!r}")
    desc = order == "desc"
    recs.sort(key=lambda r: (r.created_at, r.id), reverse=desc)
    token = q.get("nextToken")
    if token:
        cursor = _decode_token(token)
        recs = [r for r in recs if ((r.created_at, r.id) < cursor if desc else (r.created_at, r.id) > cursor)]
    try:
        limit = int(q.get("limit") or 100)
    except ValueError as exc:
        raise InvalidRequest("limit must be an integer") from exc
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidRequest(f"limit must be between 1 and {MAX_PAGE}")
    page = recs[:limit]
    headers = {"X-Next-Token": _encode_token(page[-1])} if len(recs) > limit else None
    return JSONResponse([_listed(r) for r in page], headers=headers)


@router.get("/sandboxes")
async def list_v1(request: Request) -> JSONResponse:
    """The older list: running sandboxes unless ``state`` says otherwise, metadata filter, no paging."""
    states = request.query_params.getlist("state")
    recs = _select(request, _key(request), _states(states) if states else {SandboxState.RUNNING})
    recs.sort(key=lambda r: (r.created_at, r.id))
    return JSONResponse([_listed(r) for r in recs])


@router.get("/sandboxes/{sandbox_id}/metrics")
async def metrics(sandbox_id: str, request: Request) -> JSONResponse:
    """``start``/``end`` (Unix seconds) select samples in range: ``metrics.MetricSamples``."""
    rec = _engine(request).get(sandbox_id, _key(request))
    q = request.query_params
    bounds = [_unix(q.get(name), name) for name in ("start", "end")]
    return JSONResponse(await run_in_threadpool(request.app.state.e2b.metrics.series, rec, *bounds))


def _unix(raw: str | None, what: str) -> int | None:
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError as exc:
        raise InvalidRequest(f"{what} must be a Unix time in seconds") from exc
    if not 0 <= value < 2**40:
        raise InvalidRequest(f"{what} must be a Unix time in seconds")
    return value


# --- lifecycle -------------------------------------------------------------------------------------

@router.delete("/sandboxes/{sandbox_id}", status_code=204)
async def kill(sandbox_id: str, request: Request) -> Response:
    eng = _engine(request)
    await run_in_threadpool(eng.destroy, sandbox_id, _key(request))
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/timeout", status_code=204)
async def set_timeout(sandbox_id: str, request: Request) -> Response:
    key = _key(request)
    body = await _body(request)
    if "timeout" not in body:
        raise InvalidRequest("timeout is required")
    value = body["timeout"]
    if value == 0 and not isinstance(value, bool):
        await _time_is_up(sandbox_id, request, key)
        return Response(status_code=204)
    _engine(request).set_timeout(sandbox_id, _timeout(value), key)  # type: ignore[arg-type]
    return Response(status_code=204)


async def _time_is_up(sandbox_id: str, request: Request, key: ApiKey) -> None:
    """``timeout: 0`` is E2B's "the timeout is now": what the sandbox does at its timeout happens at
    once. With ``autoPause`` it is paused here (waiting for the auto-pause thread could let the reaper
    delete it first); otherwise it expires now and the daemon's reaper deletes it within a second, as
    any expired sandbox. A paused sandbox only has its clock reset (paused sandboxes never expire)."""
    eng = _engine(request)
    wing = request.app.state.e2b
    rec = eng.get(sandbox_id, key)
    if rec.state is SandboxState.RUNNING and wing.options.get(rec.id).get(AUTO_PAUSE):
        await run_in_threadpool(eng.pause, sandbox_id, key)
        return
    eng.set_timeout(sandbox_id, EXPIRE_NOW, key)


@router.post("/sandboxes/{sandbox_id}/refreshes", status_code=204)
async def refresh(sandbox_id: str, request: Request) -> Response:
    """Older keep-alive: extend the timeout by ``duration`` seconds (default 60)."""
    key = _key(request)
    body = await _body(request)
    _engine(request).set_timeout(sandbox_id, _timeout(body.get("duration"), 60), key)  # type: ignore[arg-type]
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/pause", status_code=204)
async def pause(sandbox_id: str, request: Request) -> Response:
    eng = _engine(request)
    key = _key(request)
    body = await _body(request)
    rec = eng.get(sandbox_id, key)
    if rec.state is SandboxState.PAUSED:
        return e2b_error(409, f"sandbox {sandbox_id} is already paused")
    # ``memory: false`` (the SDK's ``keep_memory=False``): stop every process and keep only the files;
    # the resume is a cold boot (a new boot id). Otherwise the processes are frozen, memory kept.
    mode = "filesystem" if body.get("memory") is False else "memory"
    await run_in_threadpool(lambda: eng.pause(sandbox_id, key, mode=mode))
    return Response(status_code=204)


async def _connect(sandbox_id: str, request: Request, resume_only: bool) -> JSONResponse:
    eng = _engine(request)
    key = _key(request)
    body = await _body(request)
    timeout = _timeout(body.get("timeout"), None)
    rec = eng.get(sandbox_id, key)
    if rec.state is SandboxState.PAUSED:
        await run_in_threadpool(eng.resume, sandbox_id, key)
        rec = eng.set_timeout(sandbox_id, timeout or DEFAULT_TIMEOUT, key)
        return JSONResponse(_sandbox(rec, request), status_code=201)
    if rec.state is not SandboxState.RUNNING:
        raise InvalidTransition(rec.state.value, "connect to", sandbox_id)
    if resume_only:
        return e2b_error(409, f"sandbox {sandbox_id} is already running")
    if timeout is not None and rec.expires_at is not None and time.time() + timeout > rec.expires_at:
        rec = eng.set_timeout(sandbox_id, timeout, key)  # a running sandbox's timeout only grows
    return JSONResponse(_sandbox(rec, request), status_code=200)


@router.post("/v2/sandboxes/{sandbox_id}/connect")
@router.post("/sandboxes/{sandbox_id}/connect")
async def connect(sandbox_id: str, request: Request) -> JSONResponse:
    return await _connect(sandbox_id, request, resume_only=False)


@router.post("/sandboxes/{sandbox_id}/resume")
async def resume(sandbox_id: str, request: Request) -> JSONResponse:
    return await _connect(sandbox_id, request, resume_only=True)
