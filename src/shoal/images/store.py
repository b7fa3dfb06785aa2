"""The template store: build, cache, list, mount and remove template images on this host.

Layout::

    <state_dir>/templates/<name>/image.erofs   the image (files owned by uid_base + uid)
    <state_dir>/templates/<name>/meta.json     version, digest, built_at, size_bytes, uid_base
    <state_dir>/templates/<name>/build.log     every line of the last build
    <state_dir>/templates/<name>/.lock         flock: one build/remove of <name> at a time
    <state_dir>/templates/<name>/.build-tmp/   the tree while building (always removed)
    <state_dir>/cache/<name>/                  a recipe's download cache (debootstrap's .debs)
    <state_dir>/images/                        image templates' blob cache (see ``image_templates``)
    <run_dir>/templates/<name>-<digest>/       the image, mounted read-only once per host
    <run_dir>/templates/.<name>.lock           flock: one mount/unmount of <name> at a time

The digest (recipe name + effective version) is in the mount point's name so that a new version
gets a new mount point while sandboxes still running on the old one keep it.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from shoal.errors import Conflict, NotFound, RuntimeFailure, ShoalError, from_errno
from shoal.images import image_templates
from shoal.images.erofs import make_image, shift_ownership
from shoal.images.recipes import RECIPES, Recipe
from shoal.images.usage import overlays_on
from shoal.locks import file_lock
from shoal.runtime.linux import mounts
from shoal.settings import Settings

#: ``progress(message, fraction)``: fraction in [0, 1] at phase changes, None for log lines.
Progress = Callable[[str, float | None], None]

IMAGE_NAME = "image.erofs"
META_NAME = "meta.json"
LOG_NAME = "build.log"

def _flock(path: Path) -> contextlib.AbstractContextManager[bool]:
    """An exclusive flock on ``path``, across processes (and threads: each call opens its own fd)."""
    return file_lock(path)


def _digest(name: str, version: str) -> str:
    return hashlib.sha256(f"{name}\0{version}".encode()).hexdigest()[:12]


@dataclass(frozen=True)
class TemplateInfo:
    """What the store knows about one template, built or not."""

    name: str
    description: str
    built: bool               #: an image of the current recipe version (and uid_base) exists
    image_path: Path
    size_bytes: int | None    #: None if not built
    built_at: float | None    #: unix time; None if not built
    version: str              #: effective version (a child's includes its parent's)
    digest: str               #: short hash of name + version; part of the mount point's name
    mounted: bool
    parent: str | None = None
    source: str = ""          #: "recipe:<name>", or the image it was built from ("docker://…", "oci-archive:…")
    defaults: dict[str, object] | None = None  #: an image's Env, WorkingDir, User, Entrypoint, Cmd, ports

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["image_path"] = str(self.image_path)
        return d


class TemplateStore:
    """Template images of one host, under ``settings.templates_dir``; safe to use from several processes."""

    def __init__(self, settings: Settings | None = None, recipes: Mapping[str, Recipe] | None = None) -> None:
        self.settings = settings or Settings()
        self.recipes: Mapping[str, Recipe] = RECIPES if recipes is None else recipes

    # --- lookups --------------------------------------------------------------------------------

    def known(self) -> builtins.list[str]:
        """Names of every recipe, built or not."""
        return list(self.recipes)

    def _recipe(self, name: str) -> Recipe:
        recipe = self.recipes.get(name)
        if recipe is None:
            raise NotFound(f"unknown template '{name}' (known: {', '.join(self.recipes)})")
        return recipe

    def _version(self, recipe: Recipe, depth: int = 0) -> str:
        if depth > 8:
            raise RuntimeFailure(f"template '{recipe.name}' has a cycle in its parents", step="template build")
        if recipe.parent is None:
            return recipe.version
        return f"{self._version(self._recipe(recipe.parent), depth + 1)}+{recipe.version}"

    def _dir(self, name: str) -> Path:
        return self.settings.templates_dir / name

    def _mount_point(self, name: str, digest: str) -> Path:
        return self.settings.template_mounts_dir / f"{name}-{digest}"

    def _read_meta(self, name: str) -> dict[str, object] | None:
        try:
            return json.loads((self._dir(name) / META_NAME).read_text())
        except (OSError, ValueError):
            return None

    def get(self, name: str) -> TemplateInfo:
        """The template's state; NotFound for a name no recipe or built image has."""
        if name not in self.recipes:
            return self._image_info(name)
        recipe = self._recipe(name)
        version = self._version(recipe)
        digest = _digest(name, version)
        image = self._dir(name) / IMAGE_NAME
        meta = self._read_meta(name)
        built = (meta is not None and image.is_file() and meta.get("version") == version
                 and meta.get("uid_base") == self.settings.uid_base)
        return TemplateInfo(
            name=name, description=recipe.description, built=built, image_path=image,
            size_bytes=image.stat().st_size if built else None,
            built_at=float(meta["built_at"]) if built and meta else None,  # type: ignore[arg-type]
            version=version, digest=digest,
            mounted=mounts.is_mounted(self._mount_point(name, digest)), parent=recipe.parent,
            source=f"recipe:{name}",
        )

    def _image_info(self, name: str) -> TemplateInfo:
        meta = self._read_meta(name) if image_templates.NAME_RE.fullmatch(name or "") else None
        if meta is None or not image_templates.is_image_meta(meta):
            known = ", ".join([*self.recipes, *image_templates.image_names(self)])
            raise NotFound(f"unknown template '{name}' (known: {known})")
        image = self._dir(name) / IMAGE_NAME
        built = image.is_file() and meta.get("uid_base") == self.settings.uid_base
        version, digest = str(meta.get("version")), str(meta.get("digest"))
        return TemplateInfo(
            name=name, description=f"image {meta.get('source')}", built=built, image_path=image,
            size_bytes=image.stat().st_size if built else None,
            built_at=float(meta["built_at"]) if built else None,  # type: ignore[arg-type]
            version=version, digest=digest, mounted=mounts.is_mounted(self._mount_point(name, digest)),
            source=str(meta.get("source")), defaults=meta.get("defaults"),  # type: ignore[arg-type]
        )

    def list(self) -> list[TemplateInfo]:
        """Every known template, built or not: recipes in registry order, then images by name."""
        return [self.get(name) for name in [*self.recipes, *image_templates.image_names(self)]]

    def is_mounted(self, name: str) -> bool:
        """True if the current version of ``name`` is mounted on this host."""
        return self.get(name).mounted

    # --- build ----------------------------------------------------------------------------------

    def build(self, name: str, force: bool = False, progress: Progress | None = None) -> TemplateInfo:
        """Build ``name`` unless an image of its current version exists (or ``force``); return its info.

        Concurrent builds of one template are serialized by a lock; a builder that waited finds
        the image the first one made and returns it. An image template is rebuilt from its source.
        """
        if name not in self.recipes:
            meta = self._read_meta(self._image_info(name).name) or {}
            if meta.get("builder") or meta.get("hidden"):  # built from steps (images/build_runner.py)
                info = self.get(name)
                if info.built and not force:
                    return info
                raise Conflict(f"template '{name}' was built from build steps ({meta.get('source')}); "
                               "build it again with: shoal template build NAME -f Dockerfile [CONTEXT]")
            return self.build_image(name, str(meta["source"]), insecure=bool(meta.get("insecure")), force=force,
                                    progress=progress)
        recipe = self._recipe(name)
        report: Progress = progress or (lambda message, fraction: None)
        info = self.get(name)
        if info.built and not force:
            return info
        tdir = self._dir(name)
        tdir.mkdir(parents=True, exist_ok=True)
        with _flock(tdir / ".lock"):
            info = self.get(name)
            if info.built and not force:
                return info
            started = time.monotonic()
            try:
                size = self._build_locked(recipe, info, report)
            except ShoalError:
                report(f"build of '{name}' failed; log in {tdir / LOG_NAME}", None)
                raise
            except OSError as err:
                report(f"build of '{name}' failed; log in {tdir / LOG_NAME}", None)
                raise RuntimeFailure(f"building template '{name}' failed: {err}", step="template build") from err
            self._refresh_mount(name, info.digest)  # a mount of the image just replaced is stale
            report(f"done: {name} {size / 2**20:.1f} MiB in {time.monotonic() - started:.1f} s", 1.0)
            return self.get(name)

    def build_image(self, name: str, ref: str, *, insecure: bool = False, credentials: str | None = None,
                    force: bool = False, progress: Progress | None = None) -> TemplateInfo:
        """Build template ``name`` from an OCI image (registry reference, OCI layout dir, OCI or docker
        archive); instant when the source has not changed. See ``image_templates``."""
        image_templates.build_image(self, name, ref, insecure=insecure, credentials=credentials, force=force,
                                    progress=progress)
        return self.get(name)

    def _build_locked(self, recipe: Recipe, info: TemplateInfo, report: Progress) -> int:
        tdir = self._dir(recipe.name)
        tmp = tdir / ".build-tmp"
        _remove_tree(tmp)
        tree = tmp / "tree"
        tree.mkdir(parents=True)
        os.chmod(tree, 0o755)
        with open(tdir / LOG_NAME, "w") as logfile:
            def log(line: str) -> None:
                logfile.write(line + "\n")
                logfile.flush()
                report(line, None)

            try:
                if recipe.parent:
                    report(f"starting from template '{recipe.parent}'", 0.0)
                    self._copy_parent(recipe.parent, tree, report)
                report(f"populating '{recipe.name}'", 0.05)
                cache = self.settings.state_dir / "cache" / recipe.name
                recipe.populate(tree, log, cache)
                report("shifting ownership", 0.8)
                shift_ownership(tree, self.settings.uid_base)
                report("compressing (mkfs.erofs)", 0.85)
                size = make_image(tree, tdir / IMAGE_NAME)
            finally:
                _remove_tree(tmp)
        meta = {"name": recipe.name, "version": info.version, "digest": info.digest, "built_at": time.time(),
                "size_bytes": size, "uid_base": self.settings.uid_base}
        meta_tmp = tdir / f".{META_NAME}.tmp"
        meta_tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(meta_tmp, tdir / META_NAME)
        return size

    def _copy_parent(self, parent: str, tree: Path, report: Progress) -> None:
        """Start from the parent's built image: copy it out of its mount and undo the uid shift."""
        self.build(parent, progress=report)
        source = self.mount(parent)
        proc = subprocess.run(["cp", "-a", "--reflink=auto", f"{source}/.", str(tree)],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeFailure(f"copying template '{parent}' failed: {proc.stderr.strip()[-300:]}",
                                 step="template build")
        shift_ownership(tree, -self.settings.uid_base)

    def _refresh_mount(self, name: str, digest: str) -> None:
        """After a rebuild at the same digest (forced, or a new uid_base), drop the old mount so the
        next mount() sees the new image. Sandboxes on the old one keep it: a busy mount is only detached."""
        point = self._mount_point(name, digest)
        with _flock(self._mount_lock(name)):
            try:
                mounts.umount(point, strict=True)
            except OSError as err:
                if err.errno != errno.EBUSY:
                    raise from_errno(err, f"unmount template '{name}'") from err
                mounts.umount(point, lazy=True)

    # --- mount ----------------------------------------------------------------------------------

    def _mount_lock(self, name: str) -> Path:
        return self.settings.template_mounts_dir / f".{name}.lock"

    def mount(self, name: str) -> Path:
        """Mount the image read-only (once per host) and return the mount point; idempotent."""
        info = self.get(name)
        point = self._mount_point(name, info.digest)
        if info.mounted:
            return point
        with _flock(self._mount_lock(name)):
            info = self.get(name)
            if info.mounted:
                return point
            if not info.built:
                raise NotFound(f"template '{name}' is not built; run: shoal template build {name}")
            point.mkdir(parents=True, exist_ok=True)
            try:
                # nosuid, nodev: the image's setuid files (sudo) are sandbox root's, never the host's
                mounts.mount(info.image_path, point, "erofs", mounts.MS_RDONLY | mounts.MS_NOSUID | mounts.MS_NODEV)
            except OSError as err:
                raise RuntimeFailure(f"mounting template '{name}' failed: {err.strerror}",
                                     step="mount template") from err
            return point

    # --- remove ---------------------------------------------------------------------------------

    def _mount_points(self, name: str) -> builtins.list[Path]:
        """Mount point directories of every version of ``name`` (there may be an older one)."""
        pattern = re.compile(rf"{re.escape(name)}-[0-9a-f]{{12}}")
        root = self.settings.template_mounts_dir
        if not root.is_dir():
            return []
        return [p for p in root.iterdir() if pattern.fullmatch(p.name)]

    def remove(self, name: str) -> None:
        """Unmount and delete the template's image. Conflict if sandboxes still use it."""
        if name not in self.recipes:
            self._image_info(name)
        tdir = self._dir(name)
        if not tdir.is_dir() and not self._mount_points(name):
            raise NotFound(f"template '{name}' is not built")
        with _flock(tdir / ".lock"), _flock(self._mount_lock(name)):
            points = self._mount_points(name)
            files = [p for p in tdir.iterdir() if p.name != ".lock"] if tdir.is_dir() else []
            if not files and not any(mounts.is_mounted(p) for p in points):
                raise NotFound(f"template '{name}' is not built")
            for point in points:
                users = overlays_on(point)
                if users:
                    raise Conflict(f"template '{name}' is in use by {len(users)} sandbox overlay(s) "
                                   f"(first: {users[0]}); stop them first")
                try:
                    mounts.umount(point, strict=True)
                except OSError as err:
                    if err.errno == errno.EBUSY:
                        raise Conflict(f"template '{name}' is in use by sandboxes (mounted at {point}); "
                                       "stop them first") from err
                    raise from_errno(err, f"unmount template '{name}'") from err
                point.rmdir()
            for path in files:  # the lock file stays: a waiter holding it must lock the same inode
                if path.is_dir() and not path.is_symlink():
                    _remove_tree(path)
                else:
                    path.unlink()
        image_templates.collect_blobs(self)


def _remove_tree(path: Path) -> None:
    """Delete a build tree, first unmounting anything a failed debootstrap left mounted in it
    (its /proc, /sys): rmtree would otherwise walk into the host's /proc."""
    if not path.exists():
        return
    mounts.umount_tree(path)
    left = mounts.mounts_under(path)
    if left:
        raise RuntimeFailure(f"cannot clean {path}: {left[0]} is still mounted", step="template build")
    shutil.rmtree(path)
