"""Find the sandboxes still using a template mount, so ``remove`` can refuse instead of pulling it away.

Why not just try umount and look for EBUSY: overlayfs clones its lower layers privately
(``clone_private_mount``), so an overlay on top of the template does not keep the template's
mount busy; umount succeeds while sandboxes still read from it. And a sandbox's overlay may
live in its own mount namespace, invisible in ours. So we look at every mount namespace on the
host (one process each, through /proc) for an overlay whose lower layers lie inside the mount point.
The option string an overlay shows is the one it was mounted with, so host paths match even in a
sandbox's namespace after pivot_root.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(text: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), text)


def _lower_layers(super_options: str) -> list[str]:
    layers: list[str] = []
    for option in super_options.split(","):  # commas inside values are shown octal-escaped
        key, _, value = option.partition("=")
        if key in ("lowerdir", "lowerdir+"):
            layers.extend(_unescape(layer) for layer in value.split(":") if layer)
    return layers


def overlays_on(point: Path) -> list[str]:
    """Describe every overlay, in any mount namespace, with a lower layer at or below ``point``.

    Each entry reads "pid P: /mount/point" (P: one process in that namespace). Best effort:
    processes that exit while we look are skipped.
    """
    base = str(point).rstrip("/")
    seen: set[tuple[int, int]] = set()
    found: list[str] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            ns = os.stat(f"/proc/{entry.name}/ns/mnt")
            if (ns.st_dev, ns.st_ino) in seen:
                continue
            seen.add((ns.st_dev, ns.st_ino))
            with open(f"/proc/{entry.name}/mountinfo") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            head, sep, tail = line.partition(" - ")
            fields = tail.split()
            if not sep or len(fields) < 3 or fields[0] != "overlay":
                continue
            where = _unescape(head.split()[4])
            # a relative layer (mounts.mount_overlay) is relative to the directory holding the overlay
            layers = [os.path.normpath(os.path.join(os.path.dirname(where), layer))
                      for layer in _lower_layers(fields[2])]
            if any(layer == base or layer.startswith(base + "/") for layer in layers):
                found.append(f"pid {entry.name}: {where}")
    return found
