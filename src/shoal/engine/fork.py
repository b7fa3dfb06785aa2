"""Fork: N new running sandboxes with a sandbox's files, made from one internal snapshot.

Memory is not copied by this runtime: each child boots fresh processes on the parent's files as
they were at one frozen instant; the parent keeps running (it is frozen only while its layer is
written). The children get the parent's template, env, metadata, limits, writable-layer kind,
network (none or its own) and internet setting; each child succeeds or fails on its own (E2B's
shape). The snapshot is internal: no API lists it, and it is deleted with its last child.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from shoal.engine.keys import ApiKey
from shoal.engine.models import SandboxRecord
from shoal.errors import InvalidRequest, RuntimeFailure, ShoalError

if TYPE_CHECKING:
    from shoal.engine.engine import Engine

MAX_FORKS = 100
#: Children made at once: the host has few cores, and each create is mostly the host's own work.
PARALLEL = 4
MEMORY_NOT_COPIED = "memory is not copied: each fork starts new processes on the parent's files"


def fork(engine: Engine, sandbox_id: str, count: int = 1, api_key: ApiKey | None = None,
         timeout: float | None = None) -> list[SandboxRecord | ShoalError]:
    """``count`` (1..100) new sandboxes from ``sandbox_id``'s files; one entry per child, a record or the
    error that child met. ``timeout``: each child's expiry (default: the parent's remaining time)."""
    check_count(count)
    parent = engine.get(sandbox_id, api_key)
    snap = engine.snapshots.create(sandbox_id, None, api_key, internal=True)
    return children(engine, parent, snap.id, count, api_key, timeout)


def check_count(count: object) -> None:
    """``InvalidRequest`` unless ``count`` is an integer from 1 to ``MAX_FORKS`` (every fork surface asks this)."""
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_FORKS:
        raise InvalidRequest(f"count must be an integer from 1 to {MAX_FORKS}")


def children(engine: Engine, parent: SandboxRecord, snapshot_id: str, count: int, api_key: ApiKey | None = None,
             timeout: float | None = None) -> list[SandboxRecord | ShoalError]:
    """The second half of ``fork``: ``count`` sandboxes like ``parent`` on its internal snapshot, made
    ``PARALLEL`` at a time; the snapshot goes with the last of them (now, if none was made)."""
    if timeout is None and parent.expires_at is not None:
        timeout = max(1.0, parent.expires_at - time.time())

    def child(_: int) -> SandboxRecord | ShoalError:
        try:
            return engine.create(parent.template, cpu=parent.cpu, memory_mb=parent.memory_mb,
                                 disk_mb=parent.disk_mb, env=dict(parent.env), metadata=dict(parent.metadata),
                                 timeout=timeout, api_key=api_key, layer=parent.layer, internet=parent.internet,
                                 network=parent.address is not None, networks=list(parent.networks) or None,
                                 snapshot=snapshot_id)
        except ShoalError as exc:
            return exc
        except OSError as exc:
            return RuntimeFailure(f"fork failed: {exc.strerror or exc}", "fork", parent.id)

    try:
        with ThreadPoolExecutor(max_workers=min(count, PARALLEL), thread_name_prefix="shoal-fork") as pool:
            return list(pool.map(child, range(count)))
    finally:
        engine.snapshots.collect(snapshot_id)  # none made: it goes now; else with the last child
