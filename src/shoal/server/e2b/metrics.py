"""Sandbox metrics as E2B's ``GET /sandboxes/{id}/metrics?start=&end=`` answers them: a time series.

Shoal has no collector running per sandbox; a sample is taken when metrics are asked for (at most one
per ``EVERY`` seconds per sandbox) and kept in a small ring, ``KEEP`` samples per sandbox, dropped when
the sandbox is deleted. ``start``/``end`` (Unix seconds, as the SDK sends them) select the kept
samples in range, compared at the second precision the SDK uses; the current sample is taken only if
"now" is in range, so a range an hour ago answers ``[]``, never the current sample. Without a range
the answer is the current sample alone.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from datetime import UTC, datetime

from shoal.engine import Engine
from shoal.engine.models import SandboxEvent, SandboxRecord

#: Samples kept per sandbox, and the least time between two of them.
KEEP, EVERY = 120, 1.0


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class MetricSamples:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._rings: dict[str, collections.deque[tuple[float, dict]]] = {}
        self._lock = threading.Lock()
        engine.subscribe(self._on_event)

    def _on_event(self, event: dict) -> None:
        if event.get("type") in (SandboxEvent.DELETED.value, SandboxEvent.EXPIRED.value):
            with self._lock:
                self._rings.pop(event["sandbox"]["id"], None)

    def sample(self, rec: SandboxRecord, now: float | None = None) -> dict:
        """One ``SandboxMetric`` of ``rec`` now (cgroup CPU and memory, the writable layer's usage)."""
        now = time.time() if now is None else now
        use = self.engine.runtime.usage(rec.id)
        cpus = max(1, math.ceil(rec.cpu))
        elapsed = max(1e-3, now - rec.created_at)
        cpu_pct = (use.get("cpu_usec") or 0) / 1e6 / elapsed / cpus * 100
        disk = self.engine.disk_usage(rec.id)
        return {"timestamp": _iso(now), "timestampUnix": int(now), "cpuCount": cpus, "cpuUsedPct": round(cpu_pct, 2),
                "memUsed": use.get("memory_bytes") or 0, "memTotal": rec.memory_mb * 1024 * 1024, "memCache": 0,
                "diskUsed": disk.used if disk is not None else 0, "diskTotal": rec.disk_mb * 1024 * 1024}

    def series(self, rec: SandboxRecord, start: int | None, end: int | None) -> list[dict]:
        """The kept samples with ``start <= second <= end`` (either bound may be absent), oldest first."""
        now = time.time()
        if start is None and end is None:
            return [self._take(rec, now)]
        if (start is None or start <= int(now)) and (end is None or int(now) <= end):
            self._take(rec, now)
        with self._lock:
            kept = [m for _at, m in self._rings.get(rec.id, ())]
        return [m for m in kept if (start is None or m["timestampUnix"] >= start)
                and (end is None or m["timestampUnix"] <= end)]

    def _take(self, rec: SandboxRecord, now: float) -> dict:
        with self._lock:
            ring = self._rings.get(rec.id)
            if ring and now - ring[-1][0] < EVERY:
                return ring[-1][1]
        metric = self.sample(rec, now)
        with self._lock:
            self._rings.setdefault(rec.id, collections.deque(maxlen=KEEP)).append((now, metric))
        return metric
