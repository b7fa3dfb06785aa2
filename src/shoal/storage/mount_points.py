"""Mount points inside a sandbox's lower layers: a volume must land where its path says.

crun resolves a bind mount's destination inside the rootfs, following symlinks there. A template
built by an API key, or a snapshot of a sandbox, can hold a symlink where a volume is asked to go
(``/data -> /.shoal``): the volume would then cover the agent runtime or ``/proc``, which
``engine.volumes.check_mount_path`` refuses by name. So before a create, every prefix of each mount
path is looked up (``lstat``, never following) in the read-only lower layers the host mounted itself
(snapshot images, the template): a symlink on the way is refused. Those mounts are immutable, so
nothing changes between this check and crun's mount.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path


def symlink_on_path(layers: Iterable[Path], path: str) -> str | None:
    """The first prefix of ``path`` (absolute, normalised) that is a symlink in any of ``layers``, or None."""
    parts = [p for p in path.split("/") if p]
    for layer in layers:
        current = layer
        for i, part in enumerate(parts):
            current = current / part
            try:
                mode = os.lstat(current).st_mode
            except OSError:
                break  # not in this layer: a lower one (or crun's mkdir) decides
            if stat.S_ISLNK(mode):
                return "/" + "/".join(parts[:i + 1])
            if not stat.S_ISDIR(mode):
                break
    return None
