"""Telling a live process from a dead one whose pid was reused, for every owner Shoal records.

Records of sandboxes being created or deleted, network slots and pre-made user namespaces all name the
process that owns them by (pid, start time): a pid alone can be reused by an unrelated process after
a crash, the pair cannot.
"""

from __future__ import annotations


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None
