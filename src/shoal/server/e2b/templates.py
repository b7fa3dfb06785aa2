"""E2B's template build API on Shoal's build machinery (``images/build_runner.py``).

What ``Template.build(...)`` of the official SDK sends (``e2b/template_sync/build_api.py``):

1. ``POST /v3/templates`` {name, tags, cpuCount, memoryMB} → a template id (the Shoal template name)
   and a build id;
2. per COPY, ``GET /templates/{id}/files/{hash}`` → ``present``, or a URL of this daemon's own to PUT a
   tar of the files to: signed (HMAC under the wing's secret, naming the key, the hash and an expiry),
   size-capped (``SHOAL_E2B_MAX_UPLOAD``), stored per API key (one key's upload never satisfies
   another's hash);
3. ``POST /v2/templates/{id}/builds/{buildID}`` {fromTemplate | fromImage, steps, startCmd, readyCmd,
   force}: the steps become a ``BuildPlan``; the uploaded tars are unpacked by ``oci_layers.LayerApplier``
   (hostile names refused) into the build's context; the build runs in a thread;
4. ``GET /templates/{id}/builds/{buildID}/status?logsOffset=N`` until ``ready`` or ``error`` (with the
   failing step's message), the same lines ``shoal template build`` prints.

Also alias lookup (``Template.exists``), list, get and delete. A template built here belongs to the key
that built it (``owner`` in its meta): other keys see it as someone else's (403 on alias lookup, as E2B
answers) and cannot delete it; Shoal's own templates (no owner) are visible to all and deletable by none.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from shoal.engine import Engine
from shoal.engine.keys import ApiKey
from shoal.engine.template_access import check_usable
from shoal.errors import Conflict, Forbidden, InvalidRequest, NotFound, ShoalError
from shoal.images import image_templates
from shoal.images.build_steps import BuildPlan, Step
from shoal.images.oci_layers import LayerApplier
from shoal.server.e2b import ENVD_VERSION
from shoal.server.e2b.control import E2BRoute, _body, _key
from shoal.server.e2b.uploads import max_upload

log = logging.getLogger("shoal.e2b")
router = APIRouter(route_class=E2BRoute, tags=["e2b"], include_in_schema=False)

UPLOAD_PATH = "/e2b/template-files"
UPLOAD_LIFETIME = 3600
MAX_BUILDS = 200            #: finished builds remembered for status polling (oldest forgotten first)
MAX_LOG_ENTRIES = 20_000    #: per build; the rest is summarised in one line
MAX_PAGE = 100              #: log entries per status answer (E2B's page)
_HASH = re.compile(r"[0-9a-f]{64}")
#: E2B's base images: Shoal's ``base`` template is the Debian counterpart here (no outside registry).
_E2B_BASE = re.compile(r"^(docker\.io/)?e2bdev/(code-interpreter|base)(:.*)?$")


def _now_iso(ts: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if ts is None else ts, UTC).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


class Build:
    """One build: its status and log, as the status endpoint reports them."""

    def __init__(self, build_id: str, template: str, owner: str, cpu: float, memory_mb: int) -> None:
        self.id, self.template, self.owner = build_id, template, owner
        self.cpu, self.memory_mb = cpu, memory_mb
        self.status = "waiting"
        self.entries: list[dict[str, str]] = []
        self.reason: dict[str, object] | None = None
        self.created = time.time()
        self.lock = threading.Lock()

    def log(self, message: str, level: str = "info") -> None:
        with self.lock:
            if len(self.entries) < MAX_LOG_ENTRIES:
                self.entries.append({"timestamp": _now_iso(), "level": level, "message": message})
            elif len(self.entries) == MAX_LOG_ENTRIES:
                self.entries.append({"timestamp": _now_iso(), "level": "warn", "message": "(log truncated)"})


class TemplateBuilds:
    """The wing's builds and uploads; one per daemon (``wing.E2B.templates``)."""

    def __init__(self, engine: Engine, secret: bytes) -> None:
        self.engine = engine
        self._secret = hmac.new(secret, b"e2b-template-uploads", hashlib.sha256).digest()
        self.builds: dict[str, Build] = {}
        self.lock = threading.Lock()

    # --- storage -------------------------------------------------------------------------------------
    def uploads_dir(self, key_id: str) -> Path:
        return image_templates.images_dir(self.engine.templates) / "e2b-uploads" / key_id

    def upload_path(self, key_id: str, files_hash: str) -> Path:
        return self.uploads_dir(key_id) / f"{files_hash}.tar"

    def sign(self, key_id: str, files_hash: str, expires: int) -> str:
        return hmac.new(self._secret, f"{key_id}:{files_hash}:{expires}".encode(), hashlib.sha256).hexdigest()

    def check_signature(self, key_id: str, files_hash: str, expires: str, signature: str) -> None:
        if not expires.isdigit() or int(expires) < time.time() or int(expires) > time.time() + 2 * UPLOAD_LIFETIME:
            raise Forbidden("this upload link has expired")
        if not hmac.compare_digest(self.sign(key_id, files_hash, int(expires)), signature):
            raise Forbidden("this upload link is not valid")

    # --- builds --------------------------------------------------------------------------------------
    def new_build(self, template: str, owner: str, cpu: float, memory_mb: int) -> Build:
        build = Build(str(uuid.uuid4()), template, owner, cpu, memory_mb)
        with self.lock:
            finished = [b for b in self.builds.values() if b.status in ("ready", "error")]
            for old in sorted(finished, key=lambda b: b.created)[:max(0, len(self.builds) + 1 - MAX_BUILDS)]:
                del self.builds[old.id]
            if len(self.builds) >= MAX_BUILDS:
                raise Conflict(f"more than {MAX_BUILDS} template builds in progress")
            self.builds[build.id] = build
        return build

    def find(self, template: str, build_id: str, key: ApiKey) -> Build:
        build = self.builds.get(build_id)
        if build is None or build.template != template or build.owner != key.id:
            raise NotFound(f"build {build_id} of template {template} does not exist")
        return build

    def start(self, build: Build, body: dict) -> None:
        """Turn the body into a plan (InvalidRequest now for what is malformed) and build in a thread."""
        if build.status != "waiting":
            raise Conflict(f"build {build.id} was already started")
        images = image_templates.images_dir(self.engine.templates)
        images.mkdir(parents=True, exist_ok=True)  # a first build without COPY: no upload made it yet
        context = Path(tempfile.mkdtemp(prefix=f"e2b-build-{build.id[:8]}-", dir=images))
        try:
            plan = self._plan(build, body, context)
        except BaseException:
            shutil.rmtree(context, ignore_errors=True)
            raise
        build.status = "building"
        threading.Thread(target=self._run, args=(build, plan, context), name=f"e2b-build-{build.id[:8]}",
                         daemon=True).start()

    def _run(self, build: Build, plan: BuildPlan, context: Path) -> None:
        from shoal.images import build_runner
        step = {"n": 0}

        def progress(message: str, fraction: float | None) -> None:
            m = re.match(r"\[(\d+)/\d+\]", message)
            if m:
                step["n"] = int(m.group(1))
            build.log(message)
        try:
            build_runner.build(self.engine, build.template, plan, progress)
            build.log(f"template {build.template} is ready")
            build.status = "ready"
        except ShoalError as err:
            build.log(err.message, "error")
            build.reason = {"message": err.message, "step": str(step["n"]) if step["n"] else "base"}
            build.status = "error"
        except Exception as err:  # noqa: BLE001 - a bug must end the build, not hang its pollers
            log.exception("E2B template build failed")
            build.reason = {"message": f"internal error: {type(err).__name__}"}
            build.status = "error"
        finally:
            shutil.rmtree(context, ignore_errors=True)

    def _plan(self, build: Build, body: dict, context: Path) -> BuildPlan:
        plan = BuildPlan(context=context, source="e2b", force=bool(body.get("force")), owner=build.owner)
        if isinstance(body.get("fromTemplate"), str) and body["fromTemplate"]:
            plan.base_template = body["fromTemplate"]
            store = self.engine.templates  # another key's template is not a base: its files are that key's
            check_usable(store._read_meta(plan.base_template) if image_templates.NAME_RE.fullmatch(
                plan.base_template) else None, plan.base_template, build.owner)
        elif isinstance(body.get("fromImage"), str) and body["fromImage"]:
            image = body["fromImage"]
            if _E2B_BASE.match(image):
                plan.base_template = "base"
            else:
                plan.base_image = image
        else:
            raise InvalidRequest("a build needs fromTemplate or fromImage")
        steps = body.get("steps") or []
        if not isinstance(steps, list) or len(steps) > 1000:
            raise InvalidRequest("steps must be a list of at most 1000 steps")
        for raw in steps:
            plan.steps.append(self._step(build, raw, context))
            plan.force = plan.force or bool(raw.get("force")) and raw.get("type") != "COPY"
        if body.get("startCmd"):
            from shoal.images.start_cmd import parse_ready
            plan.start_cmd = str(body["startCmd"])
            ready = body.get("readyCmd")
            plan.ready = parse_ready({"cmd": ready} if isinstance(ready, str) and ready else None)
        return plan

    def _step(self, build: Build, raw: object, context: Path) -> Step:
        if not isinstance(raw, dict) or not isinstance(raw.get("args"), list) or not all(
                isinstance(a, str) for a in raw["args"]):
            raise InvalidRequest("every step needs a type and a list of string args")
        kind, args = raw.get("type"), list(raw["args"])
        text = f"{kind} {' '.join(args)}"[:500]
        if kind == "RUN" and args:
            return Step("RUN", {"shell": args[0], "user": args[1] if len(args) > 1 and args[1] else None}, text)
        if kind == "ENV" and len(args) % 2 == 0:
            return Step("ENV", {"pairs": dict(zip(args[::2], args[1::2], strict=True))}, text)
        if kind == "WORKDIR" and len(args) == 1:
            return Step("WORKDIR", {"path": args[0]}, text)
        if kind == "USER" and len(args) == 1:
            return Step("USER", {"user": args[0]}, text)
        if kind == "COPY" and len(args) >= 2:
            files_hash = raw.get("filesHash")
            if not isinstance(files_hash, str) or not _HASH.fullmatch(files_hash):
                raise InvalidRequest("a COPY step needs its filesHash")
            upload = self.upload_path(build.owner, files_hash)
            if not upload.is_file():
                raise InvalidRequest(f"the files of COPY {args[0]} were not uploaded (hash {files_hash[:12]})")
            _unpack(upload, context)
            mode = None
            if len(args) > 3 and args[3]:
                try:
                    mode = int(args[3], 8)
                except ValueError:
                    raise InvalidRequest(f"COPY mode {args[3]!r} is not octal") from None
            return Step("COPY", {"sources": [args[0]], "dest": args[1], "chown": (args[2] if len(args) > 2 else "")
                                 or None, "mode": mode, "archive": False}, text)
        raise InvalidRequest(f"unsupported or malformed build step: {text}")


def _unpack(upload: Path, context: Path) -> None:
    """An uploaded tar (the client's files) into the build context, through the layer applier: names are
    confined, devices refused, sizes capped. Ids are the client's and do not matter (COPY sets its own)."""
    import gzip
    with open(upload, "rb") as raw:
        gz = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw) if gz else raw
        with LayerApplier(context, 0, 2**32 - 2) as applier:
            applier.apply(stream, "upload")  # type: ignore[arg-type]
            applier.finish()


def _builds(request: Request) -> TemplateBuilds:
    return request.app.state.e2b.templates


def _name(raw: object) -> str:
    name = raw.split(":", 1)[0] if isinstance(raw, str) else ""
    if not image_templates.NAME_RE.fullmatch(name):
        raise InvalidRequest(f"invalid template name {raw!r}: 1-63 of a-z 0-9 . _ -")
    return name


def _visible(request: Request, name: str, key: ApiKey, own: bool = False) -> dict:
    """The template's meta if ``key`` may see it (its own, or one of the host's), else NotFound/Forbidden."""
    store = _builds(request).engine.templates
    info = store.get(name)  # NotFound
    meta = store._read_meta(name) or {}
    if meta.get("hidden"):
        raise NotFound(f"template '{name}' does not exist")
    owner = meta.get("owner")
    if (owner is not None and owner != key.id) or (own and owner is None):
        raise Forbidden(f"template '{name}' belongs to someone else")
    return {"meta": meta, "info": info}


def _template_json(name: str, meta: dict, info: object) -> dict:
    built = getattr(info, "built_at", None) or time.time()
    return {"templateID": name, "buildID": str(meta.get("build_key") or meta.get("digest") or "")[:36],
            "cpuCount": 1, "memoryMB": 512, "diskSizeMB": 1024, "public": meta.get("owner") is None,
            "aliases": [name], "names": [name], "createdAt": _now_iso(built), "updatedAt": _now_iso(built),
            "createdBy": None, "lastSpawnedAt": None, "spawnCount": 0, "buildCount": 1,
            "envdVersion": ENVD_VERSION, "buildStatus": "ready" if getattr(info, "built", False) else "error"}


#: A tag: what E2B's ``name:tag`` carries after the colon.
TAG_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


def _tags(template: str, raw: object) -> list[str]:
    """E2B's tags (``tag`` or ``<template>:tag``), checked; a tag naming another template is refused."""
    if not isinstance(raw, list) or not raw or len(raw) > 32:
        raise InvalidRequest("tags must be a list of 1 to 32 tags")
    out = []
    for item in raw:
        alias, colon, tag = item.rpartition(":") if isinstance(item, str) else ("", "", "")
        if (colon and alias != template) or not TAG_RE.fullmatch(tag):
            raise InvalidRequest(f"invalid tag {item!r}: a tag is 1-63 of a-z 0-9 . _ - (optionally "
                                 f"'{template}:<tag>')")
        out.append(tag)
    return list(dict.fromkeys(out))


def _build_uuid(name: str, meta: dict) -> str:
    """The template's one build as a UUID (E2B's SDK parses it as one): Shoal keeps one build per template,
    so every tag of a template names its current build."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"shoal-template:{name}:{meta.get('digest') or ''}"))


@router.post("/templates/tags", status_code=201)
async def assign_tags(request: Request) -> JSONResponse:
    """E2B's ``Template.assign_tags(target, tags)``: the tags name the target template's current build."""
    key = _key(request)
    body = await _body(request)
    name = _name(body.get("target"))
    found = _visible(request, name, key, own=True)
    tags = _tags(name, body.get("tags"))
    return JSONResponse({"tags": tags, "buildID": _build_uuid(name, found["meta"])}, status_code=201)


@router.delete("/templates/tags", status_code=204)
async def remove_tags(request: Request) -> Response:
    """E2B's ``Template.remove_tags(name, tags)``: checked like an assignment (nothing is kept per tag)."""
    key = _key(request)
    body = await _body(request)
    name = _name(body.get("name"))
    _visible(request, name, key, own=True)
    _tags(name, body.get("tags"))
    return Response(status_code=204)


@router.post("/v3/templates", status_code=202)
@router.post("/v2/templates", status_code=202)
async def request_build(request: Request) -> JSONResponse:
    key = _key(request)
    body = await _body(request)
    name = _name(body.get("name") or body.get("alias"))
    store = _builds(request).engine.templates
    if name in store.recipes:
        raise Conflict(f"'{name}' is a built-in template; choose another name")
    meta = store._read_meta(name)
    if meta is not None and meta.get("owner") not in (None, key.id) or (meta and meta.get("hidden")):
        raise Forbidden(f"template '{name}' belongs to someone else")
    if meta is not None and meta.get("owner") is None and image_templates.is_image_meta(meta):
        raise Conflict(f"template '{name}' was made on the host; choose another name")
    cpu, memory = body.get("cpuCount", 2), body.get("memoryMB", 1024)
    build = _builds(request).new_build(name, key.id, float(cpu) if isinstance(cpu, int) else 2.0,
                                       int(memory) if isinstance(memory, int) else 1024)
    tags = [t for t in body.get("tags") or [] if isinstance(t, str)] or ["default"]
    return JSONResponse({"templateID": name, "buildID": build.id, "public": False, "names": [name],
                         "tags": tags, "aliases": [name]}, status_code=202)


@router.get("/templates/{template_id}/files/{files_hash}")
async def file_upload_link(template_id: str, files_hash: str, request: Request) -> JSONResponse:
    key = _key(request)
    if not _HASH.fullmatch(files_hash):
        raise InvalidRequest("files hash must be 64 hex digits")
    builds = _builds(request)
    if builds.upload_path(key.id, files_hash).is_file():
        return JSONResponse({"present": True}, status_code=201)
    expires = int(time.time()) + UPLOAD_LIFETIME
    base = str(request.base_url).rstrip("/")
    url = (f"{base}{UPLOAD_PATH}/{key.id}/{files_hash}?expires={expires}"
           f"&signature={builds.sign(key.id, files_hash, expires)}")
    return JSONResponse({"present": False, "url": url}, status_code=201)


@router.put(UPLOAD_PATH + "/{key_id}/{files_hash}")
async def upload_files(key_id: str, files_hash: str, request: Request) -> Response:
    """The signed upload link: the tar goes to a temp file (capped), renamed into place when complete."""
    builds = _builds(request)
    if not _HASH.fullmatch(files_hash) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", key_id):
        raise NotFound("no such upload link")
    builds.check_signature(key_id, files_hash, request.query_params.get("expires", ""),
                           request.query_params.get("signature", ""))
    limit = max_upload()
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise InvalidRequest(f"upload larger than {limit} bytes (SHOAL_E2B_MAX_UPLOAD)")
    folder = builds.uploads_dir(key_id)
    await run_in_threadpool(folder.mkdir, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".upload-")
    size = 0
    try:
        with os.fdopen(fd, "wb") as f:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise InvalidRequest(f"upload larger than {limit} bytes (SHOAL_E2B_MAX_UPLOAD)")
                f.write(chunk)
        os.replace(tmp, builds.upload_path(key_id, files_hash))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return Response(status_code=200)


@router.post("/v2/templates/{template_id}/builds/{build_id}", status_code=202)
async def trigger_build(template_id: str, build_id: str, request: Request) -> Response:
    key = _key(request)
    body = await _body(request)
    builds = _builds(request)
    build = builds.find(template_id, build_id, key)
    await run_in_threadpool(builds.start, build, body)
    return Response(status_code=202)


@router.get("/templates/{template_id}/builds/{build_id}/status")
async def build_status(template_id: str, build_id: str, request: Request) -> JSONResponse:
    key = _key(request)
    build = _builds(request).find(template_id, build_id, key)
    try:
        offset = max(0, int(request.query_params.get("logsOffset", "0")))
    except ValueError:
        raise InvalidRequest("logsOffset must be a number") from None
    with build.lock:
        status = build.status
        entries = build.entries[offset:offset + MAX_PAGE]
    answer: dict[str, object] = {"templateID": template_id, "buildID": build_id, "status": status,
                                 "logEntries": entries, "logs": [e["message"] for e in entries]}
    if status == "error" and build.reason:
        answer["reason"] = build.reason
    return JSONResponse(answer)


@router.get("/templates/aliases/{alias}")
async def alias(alias: str, request: Request) -> JSONResponse:
    key = _key(request)
    found = await run_in_threadpool(_visible, request, _name(alias), key)
    return JSONResponse({"templateID": _name(alias), "public": found["meta"].get("owner") is None})


@router.get("/templates")
async def list_templates(request: Request) -> JSONResponse:
    key = _key(request)

    def rows() -> list[dict]:
        out = []
        for info in _builds(request).engine.templates.list():
            try:
                found = _visible(request, info.name, key)
            except ShoalError:
                continue
            if info.built:
                out.append(_template_json(info.name, found["meta"], info))
        return out
    return JSONResponse(await run_in_threadpool(rows))


@router.get("/templates/{template_id}")
async def get_template(template_id: str, request: Request) -> JSONResponse:
    key = _key(request)
    found = await run_in_threadpool(_visible, request, _name(template_id), key)
    body = _template_json(template_id, found["meta"], found["info"])
    body["builds"] = []
    return JSONResponse(body)


@router.delete("/templates/{template_id:path}")
async def delete_template(template_id: str, request: Request) -> Response:
    key = _key(request)
    name = template_id.split(":", 1)[0]
    store = _builds(request).engine.templates
    if not image_templates.NAME_RE.fullmatch(name) or (
            name not in store.recipes and not image_templates.is_image_meta(store._read_meta(name))):
        from shoal.server.e2b.snapshots import delete_snapshot  # E2B deletes snapshots at this path too
        return await delete_snapshot(template_id, request)
    await run_in_threadpool(_visible, request, name, key, True)
    await run_in_threadpool(_builds(request).engine.templates.remove, name)
    return Response(status_code=204)
