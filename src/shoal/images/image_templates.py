"""Templates built from OCI images: build (or find up to date), describe, and collect unused blobs.

Layout beside the recipe templates (see ``store``)::

    <state_dir>/templates/<name>/meta.json      kind "image": source, digests, defaults, blobs
    <state_dir>/images/blobs/sha256/<hex>       every manifest, config and layer blob, by digest,
                                                shared by all image templates (skopeo's shared blob dir)
    <state_dir>/images/.lock                    flock: shared while a build uses the blobs,
                                                exclusive to collect the ones nothing references

A rebuild with nothing changed is instant: a local archive whose size, mtime and inode are unchanged
is not even opened; otherwise the source's top manifest digest (one registry request) is compared.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoal.errors import Conflict, InvalidRequest, RuntimeFailure, ShoalError
from shoal.images.erofs import make_image
from shoal.images.oci_image import read_layout, unpack
from shoal.images.oci_source import ImageSource, Skopeo, parse_source
from shoal.locks import file_lock

if TYPE_CHECKING:
    from shoal.images.store import Progress, TemplateStore

KIND = "image"
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")


def images_dir(store: TemplateStore) -> Path:
    return store.settings.state_dir / "images"


def blobs_dir(store: TemplateStore) -> Path:
    return images_dir(store) / "blobs"


def _cache_lock(store: TemplateStore, exclusive: bool, wait: bool = True) -> contextlib.AbstractContextManager[bool]:
    """Shared while a build uses the blob cache, exclusive (without waiting) to collect unused blobs."""
    return file_lock(images_dir(store) / ".lock", exclusive=exclusive, wait=wait)


def check_name(store: TemplateStore, name: str) -> None:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidRequest(f"invalid template name {name!r}: 1-63 of a-z 0-9 . _ -, starting with a letter or digit")
    if name in store.recipes:
        raise Conflict(f"'{name}' is a built-in template; choose another name for an image")


def is_image_meta(meta: dict[str, object] | None) -> bool:
    return isinstance(meta, dict) and meta.get("kind") == KIND


def _stat_key(source: ImageSource) -> str | None:
    """Size, mtime and inode of a local archive: unchanged means the same bytes (as make assumes)."""
    if source.transport not in ("oci-archive", "docker-archive"):
        return None
    try:
        st = os.stat(source.location)
    except OSError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def _write_meta(tdir: Path, meta: dict[str, Any]) -> None:
    tmp = tdir / ".meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, tdir / "meta.json")


def build_image(store: TemplateStore, name: str, ref: str, *, insecure: bool = False,
                credentials: str | None = None, force: bool = False, progress: Progress | None = None) -> None:
    """Build template ``name`` from image ``ref`` unless it is up to date (or ``force``)."""
    from shoal.images.store import IMAGE_NAME, LOG_NAME, _digest, _flock, _remove_tree

    check_name(store, name)
    source = parse_source(ref, insecure)
    report: Progress = progress or (lambda message, fraction: None)
    tdir = store._dir(name)
    tdir.mkdir(parents=True, exist_ok=True)
    with _flock(tdir / ".lock"):
        meta = store._read_meta(name)
        current = (is_image_meta(meta) and meta is not None and meta.get("source") == str(source)
                   and meta.get("uid_base") == store.settings.uid_base and (tdir / IMAGE_NAME).is_file())
        stat_key = _stat_key(source)
        if current and not force and stat_key and meta and meta.get("source_stat") == stat_key:
            report(f"{name} is up to date", 1.0)
            return
        started = time.monotonic()
        with Skopeo(source, credentials) as skopeo:
            top = skopeo.manifest_digest()
            if current and not force and meta and meta.get("manifest_digest") == top:
                _write_meta(tdir, {**meta, "source_stat": stat_key})
                report(f"{name} is up to date", 1.0)
                return
            tmp = tdir / ".build-tmp"
            try:
                with _cache_lock(store, exclusive=False), open(tdir / LOG_NAME, "w") as logfile:
                    def log(line: str) -> None:
                        logfile.write(line + "\n")
                        logfile.flush()
                        report(line, 0.05 if line.startswith("Copying") else None)

                    _remove_tree(tmp)
                    tree = tmp / "tree"
                    tree.mkdir(parents=True)
                    os.chmod(tree, 0o755)
                    os.chown(tree, store.settings.uid_base, store.settings.uid_base)
                    report(f"fetching {source}", 0.0)
                    skopeo.copy_to_layout(tmp / "layout", blobs_dir(store), log)
                    image = read_layout(tmp / "layout", blobs_dir(store))
                    unpack(image, blobs_dir(store), tree, store.settings.uid_base, store.settings.uid_count,
                           lambda message, fraction: log(message) if fraction is None else report(message, fraction),
                           start=0.3, end=0.85)
                    report("compressing (mkfs.erofs)", 0.85)
                    size = make_image(tree, tdir / IMAGE_NAME)
            except ShoalError:
                report(f"build of '{name}' failed; log in {tdir / LOG_NAME}", None)
                _forget_failed(store, tdir)
                raise
            except OSError as err:
                report(f"build of '{name}' failed; log in {tdir / LOG_NAME}", None)
                _forget_failed(store, tdir)
                raise RuntimeFailure(f"building template '{name}' from {ref} failed: {err}",
                                     step="template build") from err
            finally:
                _remove_tree(tmp)
    version = f"image:{image.manifest_digest}"
    _write_meta(tdir, {
        "name": name, "kind": KIND, "source": str(source), "insecure": source.insecure,
        "version": version, "digest": _digest(name, version), "built_at": time.time(), "size_bytes": size,
        "uid_base": store.settings.uid_base, "manifest_digest": top, "image_digest": image.manifest_digest,
        "config_digest": image.config_digest, "source_stat": stat_key, "architecture": image.architecture,
        "layers": [layer.digest for layer in image.layers],
        "blobs": [image.manifest_digest, image.config_digest, *(layer.digest for layer in image.layers)],
        "defaults": image.defaults.to_dict(),
    })
    store._refresh_mount(name, _digest(name, version))
    report(f"done: {name} {size / 2**20:.1f} MiB in {time.monotonic() - started:.1f} s", 1.0)


def _forget_failed(store: TemplateStore, tdir: Path) -> None:
    """After a failed build: a template that had no image before has nothing left but its lock and
    log, and blobs that no template references are dropped from the cache."""
    if not (tdir / "meta.json").exists():
        (tdir / "image.erofs").unlink(missing_ok=True)
    collect_blobs(store)


def image_names(store: TemplateStore, hidden: bool = False) -> list[str]:
    """Names of the image templates with metadata, sorted; ``hidden`` adds a build's own (its FROM image,
    the stage it resumes from: ``build_runner``), which ``template ls`` does not show."""
    root = store.settings.templates_dir
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.name not in store.recipes and NAME_RE.fullmatch(p.name)
                  and is_image_meta(meta := store._read_meta(p.name)) and (hidden or not (meta or {}).get("hidden")))


def collect_blobs(store: TemplateStore) -> int:
    """Delete cached blobs no image template references; skipped while a build is using the cache."""
    root = blobs_dir(store) / "sha256"
    if not root.is_dir():
        return 0
    with _cache_lock(store, exclusive=True, wait=False) as locked:
        if not locked:
            return 0
        keep: set[str] = set()
        for name in image_names(store, hidden=True):
            meta = store._read_meta(name) or {}
            keep.update(str(d).split(":", 1)[-1] for d in meta.get("blobs") or [])  # type: ignore[union-attr]
        removed = 0
        for entry in os.scandir(root):
            if entry.name not in keep:
                os.unlink(entry.path)
                removed += 1
        return removed

