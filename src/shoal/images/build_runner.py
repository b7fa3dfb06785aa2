"""Execute a ``BuildPlan``: steps run in a real Shoal sandbox, each cached by the hash of its inputs.

Layout (beside the image blob cache of ``image_templates``)::

    <state_dir>/images/build-cache/<key>.erofs   the whole root tree after a RUN/COPY step (or the final one)
    <state_dir>/images/build-cache/.<name>.lock  flock: one build of <name> at a time

A step's key is ``sha256(parent key, the step, the content hash of the files it copies)``, the first
key is the base's identity (template version, or the image's manifest digest), so an unchanged step on
an unchanged parent is a cache hit, and any change invalidates it and everything after it (Docker's
layer cache). The final key adds the config (ENV, USER, WORKDIR, CMD ...) and the start command; when it
is cached the build is one hard link. When a step misses, a sandbox starts from the last cached tree (a
hidden ``build-<key>`` template) and the remaining steps run in it: RUN through the agent (as the
Dockerfile's USER, with its ENV/ARG, in its WORKDIR); COPY from the host through
``oci_layers.LayerApplier`` into the frozen sandbox's root (confined: no ``..``, links resolved inside the
tree, ownership shifted); after each one the frozen root is packed with ``mkfs.erofs``. The sandbox is
frozen (cgroup freezer) whenever the host reads or writes its tree, so nothing in it can swap a
directory for a symlink under the host's feet. A failing step reports its output and exit code and
removes the sandbox and its stage template; the named template is only written when all went well.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from shoal.errors import Conflict, InvalidRequest, NotFound, RuntimeFailure, ShoalError
from shoal.images import image_templates
from shoal.images.build_steps import (
    FS_KINDS,
    BuildConfig,
    BuildPlan,
    Ignore,
    Step,
    archive_tar,
    content_hash,
    copy_tar,
    is_archive,
    select,
)
from shoal.images.erofs import make_image
from shoal.images.oci_layers import LayerApplier
from shoal.images.start_cmd import spec_from_meta, start_and_wait
from shoal.locks import file_lock

if TYPE_CHECKING:
    from shoal.engine.engine import Engine
    from shoal.images.store import Progress, TemplateInfo, TemplateStore
    from shoal.runtime.agent_client import AgentClient

BUILDER = "steps"
RUN_TIMEOUT = 3600.0
OUTPUT_TAIL = 2000
MAX_PASSWD = 1 << 20


def cache_dir(store: TemplateStore) -> Path:
    return image_templates.images_dir(store) / "build-cache"


def _hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


class _Planned:
    """A step with its cache key and (COPY) the context entries it copies."""

    def __init__(self, step: Step, key: str, groups: list | None) -> None:
        self.step, self.key, self.groups = step, key, groups


def build(engine: Engine, name: str, plan: BuildPlan, progress: Progress | None = None) -> TemplateInfo:
    """Build template ``name`` from ``plan``; instant when nothing changed. Returns its info."""
    store = engine.templates
    report: Progress = progress or (lambda message, fraction: None)
    image_templates.check_name(store, name)
    cdir = cache_dir(store)
    cdir.mkdir(parents=True, exist_ok=True)
    with file_lock(cdir / f".{name}.lock"):
        base, key, inherited = _base(store, plan, report)
        ignore = Ignore.of(plan.context) if plan.context else Ignore([])
        config = inherited.copy()
        planned: list[_Planned] = []
        for step in plan.steps:
            groups = None
            extra = ""
            if step.kind == "COPY":
                groups = select(plan.context, list(step.args["sources"]), ignore)
                extra = content_hash(groups)
            key = _hash(key, step.key_material(), extra)
            planned.append(_Planned(step, key, groups))
            config.apply(step)
        final = _hash(key, "final", json.dumps([config.defaults(), plan.start_cmd, plan.ready], sort_keys=True))
        meta = store._read_meta(name)
        image = store._dir(name) / "image.erofs"
        if (not plan.force and meta and meta.get("build_key") == final and image.is_file()
                and meta.get("uid_base") == store.settings.uid_base):
            report(f"{name} is up to date", 1.0)
            return store.get(name)
        started = time.monotonic()
        if plan.force or not (cdir / f"{final}.erofs").is_file():
            _run(engine, name, plan, base, planned, inherited, final, report)
        else:
            for n, p in enumerate(planned, 1):
                report(f"[{n}/{len(planned)}] {p.step.text} (cached)", n / (len(planned) + 1))
        info = _install(store, name, plan, config, final)
        report(f"done: {name} {(info.size_bytes or 0) / 2**20:.1f} MiB in {time.monotonic() - started:.1f} s", 1.0)
        return info


def _base(store: TemplateStore, plan: BuildPlan, report: Progress) -> tuple[str, str, BuildConfig]:
    """The template the first sandbox starts from, the first cache key (the base's identity), and the
    config it hands down (an image's or a built template's ENV, WORKDIR, USER, CMD: Docker's inheritance)."""
    if plan.base_image is not None:
        hidden = "from-" + _hash(plan.base_image)[:16]
        report(f"FROM {plan.base_image}", 0.0)
        image_templates.build_image(store, hidden, plan.base_image, progress=lambda m, f: report(m, None))
        meta = store._read_meta(hidden) or {}
        if not meta.get("hidden"):
            image_templates._write_meta(store._dir(hidden), {**meta, "hidden": True})
        return hidden, _hash("image", str(meta.get("image_digest"))), BuildConfig.inherit(meta.get("defaults"))
    if not plan.base_template:
        raise InvalidRequest("a build needs a base: FROM an image or a Shoal template")
    info = store.get(plan.base_template)  # NotFound names the known ones
    if not info.built:
        store.build(plan.base_template, progress=lambda m, f: report(m, None))
        info = store.get(plan.base_template)
    report(f"FROM {plan.base_template}", 0.0)
    return (plan.base_template, _hash("template", info.name, info.version, str(store.settings.uid_base)),
            BuildConfig.inherit(info.defaults))


def _run(engine: Engine, name: str, plan: BuildPlan, base: str, planned: list[_Planned],
         inherited: BuildConfig, final: str, report: Progress) -> None:
    """Run the steps from the first cache miss on, in one sandbox; snapshot after each RUN/COPY."""
    store = engine.templates
    cdir = cache_dir(store)
    total = len(planned) + 1
    resume = -1  # index of the last step whose tree is cached
    state = inherited.copy()
    for n, p in enumerate(planned):
        if p.step.kind in FS_KINDS:
            if plan.force or not (cdir / f"{p.key}.erofs").is_file():
                break
            resume = n
    stages: list[str] = []
    sandbox: str | None = None
    try:
        start = base
        if resume >= 0:
            start = _stage(store, planned[resume].key)
            stages.append(start)
        for n, p in enumerate(planned):
            if n <= resume:
                state.apply(p.step)
                report(f"[{n + 1}/{total - 1}] {p.step.text} (cached)", (n + 1) / total)
                continue
            report(f"[{n + 1}/{total - 1}] {p.step.text}", (n + 1) / total)
            if p.step.kind not in FS_KINDS:
                state.apply(p.step)
                continue
            if sandbox is None:
                sandbox = engine.create(start, owner_pid=os.getpid(), wait=True, start=False, memory_mb=1024,
                                        disk_mb=4096).id
            if p.step.kind == "RUN":
                _run_step(engine, sandbox, p.step, state, n + 1, total - 1, report)
            else:
                _copy_step(engine, sandbox, p, state, plan.context)
            _snapshot(engine, sandbox, cdir / f"{p.key}.erofs", report)
        report("finishing (template defaults, mkfs.erofs)", (total - 0.5) / total)
        if sandbox is None:
            sandbox = engine.create(start, owner_pid=os.getpid(), wait=True, start=False, memory_mb=1024,
                                    disk_mb=4096).id
        agent = engine.agent(sandbox)
        _ensure_dir(agent, state.workdir)
        agent.write_file("/etc/shoal/template.json", json.dumps(state.defaults()).encode() + b"\n", mode=0o644)
        _snapshot(engine, sandbox, cdir / f"{final}.erofs", report, resume_after=False)
        engine.destroy(sandbox)
        sandbox = None
        if plan.start_cmd:
            report(f"checking the start command: {plan.start_cmd}", None)
            check = _stage(store, final, {"start_cmd": plan.start_cmd, "ready": plan.ready})
            stages.append(check)
            try:
                sandbox = engine.create(check, owner_pid=os.getpid(), start=False, wait=True).id
                spec = spec_from_meta({"start_cmd": plan.start_cmd, "ready": plan.ready})
                assert spec is not None
                start_and_wait(engine.agent(sandbox), spec)
            except ShoalError as err:
                (cdir / f"{final}.erofs").unlink(missing_ok=True)
                raise InvalidRequest(f"the start command failed its check: {err}") from err
    finally:
        if sandbox is not None:
            with contextlib.suppress(ShoalError):
                engine.destroy(sandbox)
        for stage in stages:
            with contextlib.suppress(ShoalError, OSError):
                store.remove(stage)
                # a stage is this build's own: its lock file (which remove keeps for waiters) goes too
                (store._dir(stage) / ".lock").unlink(missing_ok=True)
                store._dir(stage).rmdir()


def _run_step(engine: Engine, sandbox: str, step: Step, state: BuildConfig, n: int, total: int,
              report: Progress) -> None:
    agent = engine.agent(sandbox)
    _ensure_dir(agent, state.workdir)
    argv = step.args["argv"] if "argv" in step.args else ["/bin/sh", "-c", step.args["shell"]]
    user = step.args.get("user") or state.user
    tail = bytearray()
    pending = bytearray()

    def out(data: bytes) -> None:
        tail.extend(data)
        del tail[:-OUTPUT_TAIL]
        pending.extend(data)
        while b"\n" in pending:
            line, _, rest = bytes(pending).partition(b"\n")
            pending[:] = rest
            report("    " + line.decode(errors="replace")[:500], None)

    result = agent.run(argv, env={**state.args, **state.env}, cwd=state.workdir,
                       user=user.split(":", 1)[0] if user else None, timeout=RUN_TIMEOUT, on_stdout=out, on_stderr=out)
    if pending:
        report("    " + pending.decode(errors="replace")[:500], None)
    if result.exit_code != 0 or result.signal or result.timed_out:
        how = ("timed out" if result.timed_out else f"was killed by signal {result.signal}" if result.signal
               else f"failed with exit code {result.exit_code}")
        output = tail.decode(errors="replace").strip()
        raise InvalidRequest(f"step {n}/{total} `{step.text}` {how}" + (f"; its output ended with:\n{output}"
                                                                          if output else " (no output)"))


def _ensure_dir(agent: AgentClient, path: str) -> None:
    if path and path != "/" and not agent.exists(path):
        agent.mkdir(path, parents=True)


def _ids(agent: AgentClient, chown: str | None) -> tuple[int, int]:
    """``--chown=user[:group]`` as ids of the sandbox's own /etc/passwd and /etc/group (read bounded,
    through the agent: the tree is the sandbox's, so are its names)."""
    if not chown:
        return 0, 0
    user, _, group = chown.partition(":")

    def table(path: str) -> list[list[str]]:
        data = b""
        with contextlib.suppress(ShoalError):
            for chunk in agent.read_file_stream(path):
                data += chunk
                if len(data) > MAX_PASSWD:
                    raise InvalidRequest(f"{path} in the build sandbox is larger than {MAX_PASSWD} bytes")
        return [line.split(":") for line in data.decode(errors="replace").splitlines()]

    def find(name: str, path: str, what: str) -> tuple[int, int]:
        if name.isdigit():
            return int(name), -1
        for row in table(path):
            if len(row) >= 4 and row[0] == name and row[2].isdigit():
                return int(row[2]), int(row[3]) if row[3].isdigit() else -1
        raise InvalidRequest(f"--chown: no {what} named {name!r} in the image")

    uid, primary = find(user, "/etc/passwd", "user")
    gid = find(group, "/etc/group", "group")[0] if group else (primary if primary >= 0 else uid)
    return uid, gid


@contextlib.contextmanager
def _frozen(engine: Engine, sandbox: str, resume_after: bool = True) -> Iterator[Path]:
    """The sandbox's root tree while every process in it is frozen: the host reads or writes it only then."""
    engine.pause(sandbox)
    try:
        yield engine.settings.sandboxes_dir / sandbox / "rootfs"
    finally:
        if resume_after:
            engine.resume(sandbox)


def _copy_step(engine: Engine, sandbox: str, p: _Planned, state: BuildConfig, context: Path | None) -> None:
    store = engine.templates
    args = p.step.args
    uid, gid = _ids(engine.agent(sandbox), args.get("chown"))
    dest = str(args["dest"])
    if not dest.startswith("/"):
        dest = os.path.join(state.workdir, dest) + ("/" if dest.endswith("/") else "")
    if uid >= store.settings.uid_count or gid >= store.settings.uid_count:
        raise InvalidRequest(f"--chown {args.get('chown')}: ids must be below {store.settings.uid_count}")
    streams = []
    groups = p.groups or []
    if args.get("archive"):
        plain = []
        for group in groups:
            entries = group[1]
            if group[0] and len(entries) == 1 and entries[0].kind == "file" and is_archive(entries[0].path):
                streams.append(archive_tar(entries[0].path, dest, uid, gid))
            else:
                plain.append(group)
        groups = plain
    # Docker's rule: several sources, given or matched by a wildcard, make the destination a directory
    many = len(args["sources"]) > 1 or len(p.groups or []) > 1 or any(not g[0] for g in groups)
    if groups:
        streams.append(copy_tar(groups, dest, many, uid, gid, args.get("mode")))
    with _frozen(engine, sandbox) as root:
        with LayerApplier(root, store.settings.uid_base, store.settings.uid_count) as applier:
            for stream in streams:
                with stream:
                    applier.apply(stream, p.step.text)
            applier.finish()


def _snapshot(engine: Engine, sandbox: str, image: Path, report: Progress, resume_after: bool = True) -> None:
    with _frozen(engine, sandbox, resume_after) as root:
        size = make_image(root, image)
    report(f"    snapshot {size / 2**20:.1f} MiB", None)


def _stage(store: TemplateStore, key: str, extra: dict[str, object] | None = None) -> str:
    """A hidden template whose image is the cached tree ``key`` (a build's sandbox starts from it)."""
    from shoal.images.store import _digest
    name = f"build-{key[:20]}" + ("-check" if extra else "")
    tdir = store._dir(name)
    tdir.mkdir(parents=True, exist_ok=True)
    image = tdir / "image.erofs"
    tmp = tdir / ".image.tmp"
    tmp.unlink(missing_ok=True)
    os.link(cache_dir(store) / f"{key}.erofs", tmp)
    os.replace(tmp, image)
    version = f"build:{key}"
    image_templates._write_meta(tdir, {
        "name": name, "kind": image_templates.KIND, "hidden": True, "source": f"build-step:{key[:12]}",
        "version": version, "digest": _digest(name, version), "built_at": time.time(),
        "size_bytes": image.stat().st_size, "uid_base": store.settings.uid_base, "blobs": [], **(extra or {})})
    return name


def _install(store: TemplateStore, name: str, plan: BuildPlan, config: BuildConfig, final: str) -> TemplateInfo:
    """Make the cached final tree template ``name`` (a hard link: the cache and the template share it)."""
    from shoal.images.store import _digest
    tdir = store._dir(name)
    tdir.mkdir(parents=True, exist_ok=True)
    with file_lock(tdir / ".lock"):
        old = store._read_meta(name)
        if old is not None and not image_templates.is_image_meta(old):
            raise Conflict(f"'{name}' is a built-in template; choose another name")
        tmp = tdir / ".image.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(cache_dir(store) / f"{final}.erofs", tmp)
        except FileNotFoundError as err:
            raise RuntimeFailure(f"the build cache lost {final[:12]} mid-build", step="template build") from err
        os.replace(tmp, tdir / "image.erofs")
        version = f"build:{final}"
        image_templates._write_meta(tdir, {
            "name": name, "kind": image_templates.KIND, "builder": BUILDER, "source": plan.source or "steps",
            "version": version, "digest": _digest(name, version), "built_at": time.time(),
            "size_bytes": (tdir / "image.erofs").stat().st_size, "uid_base": store.settings.uid_base,
            "build_key": final, "blobs": [], "defaults": config.defaults(),
            "start_cmd": plan.start_cmd, "ready": plan.ready, "owner": plan.owner,
            "context": str(plan.context) if plan.context else None})
    store._refresh_mount(name, _digest(name, version))
    try:
        return store.get(name)
    except NotFound as err:
        raise RuntimeFailure(f"template '{name}' vanished right after its build", step="template build") from err
