"""A snapshot made into a template: its whole layer stack flattened into one EROFS image.

Why flatten rather than stack: a template is one image in the template store (``images/store.py``)
that every key may start from and that outlives the snapshot; flattening ends its dependence on the
snapshot chain (which may then be deleted) and on the base template's build. The merged tree is read
through a read-only overlay of the stack (no upper: whiteouts and opaque directories are resolved by
overlayfs itself), and ``mkfs.erofs`` copies it without following links. Files keep their owners
(already in the sandboxes' uid range, as the template store expects). The template is an ``image``
kind template (``images/image_templates.py`` metadata, ``source`` = ``snapshot:<id>``), so list,
mount and remove treat it like any imported image.

Templates are shared by every key, so only an admin key (the operator's) may make one.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

from shoal.engine.keys import ApiKey
from shoal.errors import Conflict, Forbidden, from_errno
from shoal.images.erofs import make_image
from shoal.images.image_templates import KIND, check_name
from shoal.images.store import IMAGE_NAME, META_NAME, TemplateInfo, _digest, _flock
from shoal.runtime.linux import mounts


def make_template(engine: object, ref: str, name: str, api_key: ApiKey | None = None) -> TemplateInfo:
    """Template ``name`` from snapshot ``ref`` (id or name); 409 if the name is taken."""
    if api_key is not None and not api_key.admin:
        raise Forbidden("only an admin key may make a template (templates are shared by every key)")
    eng = engine  # an Engine; typed loosely to keep this module out of the engine's import cycle
    snap = eng.snapshots.get(ref)  # type: ignore[attr-defined]  # the operator's key may use any snapshot
    eng.snapshots.check_template(snap)  # type: ignore[attr-defined]
    store = eng.templates  # type: ignore[attr-defined]
    check_name(store, name)
    tdir = store._dir(name)
    tdir.mkdir(parents=True, exist_ok=True)
    with _flock(tdir / ".lock"):
        if (tdir / META_NAME).exists() or (tdir / IMAGE_NAME).exists():
            raise Conflict(f"template '{name}' exists already")
        base = store.get(snap.template)
        layers = [*eng.snapshots.lowers(snap.id), store.mount(snap.template)]  # type: ignore[attr-defined]
        merged = tdir / ".snapshot-merge"
        merged.mkdir(exist_ok=True)
        try:
            try:
                mounts.mount("overlay", merged, "overlay", mounts.MS_RDONLY | mounts.MS_NOSUID | mounts.MS_NODEV,
                             "lowerdir=" + ":".join(str(p) for p in layers))
            except OSError as exc:
                raise from_errno(exc, f"merging the layers of snapshot {snap.id}") from exc
            try:
                size = make_image(merged, tdir / IMAGE_NAME)
            finally:
                mounts.umount(merged)
        except BaseException:
            (tdir / IMAGE_NAME).unlink(missing_ok=True)
            raise
        finally:
            with contextlib.suppress(OSError):
                merged.rmdir()
        version = f"snapshot:{snap.id}"
        meta = {"name": name, "kind": KIND, "source": f"snapshot:{snap.id}", "version": version,
                "digest": _digest(name, version), "built_at": time.time(), "size_bytes": size,
                "uid_base": store.settings.uid_base, "blobs": [], "defaults": base.defaults}
        tmp = tdir / ".meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, tdir / META_NAME)
    return store.get(name)
