"""Benchmarks of snapshots and fork (issue 10), each beside a floor of the same run.

* ``snapshot_100mb_ms``: snapshot of a sandbox with 100 MB written (freeze, survey, ``mkfs.erofs`` of its
  upper tree, fsync, thaw) against the floor: ``mkfs.erofs`` of the same tree with the flags the snapshot
  chose, run directly (goal p50 ≤ 300 ms). The data is incompressible (``/dev/urandom``): lz4 would cost
  ~10x and save nothing, so ``auto`` stores it as is.
* ``fork_per_child_ms``: a fork of 10 (``engine.fork``'s two halves: its internal snapshot, then the
  children, made ``fork.PARALLEL`` at a time as the API makes them), from the snapshot's end to each
  child's first result, per child (goal p50 ≤ 50 ms); beside one plain create → first result.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from shoal.engine import Engine
from shoal.engine.fork import children as fork_children
from shoal.engine.fork import fork
from shoal.storage import snapshots as snapshot_storage

TARGETS = {"snapshot_100mb_ms": 300.0, "fork_per_child_ms": 50.0}


def _p(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"p50": round(statistics.median(xs), 2), "p95": round(xs[min(len(xs) - 1, int(len(xs) * 0.95))], 2),
            "n": len(xs)}


def run_snapshot_benchmarks(engine: Engine, template: str, iterations: int = 5) -> dict:
    out: dict = {}
    rec = engine.create(template, wait=True, disk_mb=1024)
    try:
        engine.agent(rec.id).run(["sh", "-c", "mkdir /data; for i in 0 1 2 3 4 5 6 7 8 9; do "
                                              "head -c 10485760 /dev/urandom > /data/$i; done; sync"], timeout=300)
        snap_ms, floor_ms = [], []
        upper_fd = os.open(engine.runtime.upper_dir(rec.id), os.O_RDONLY | os.O_DIRECTORY)
        try:  # the flags the snapshot itself chooses (SHOAL_SNAPSHOT_COMPRESSION, default auto: none here)
            flags = snapshot_storage.survey(upper_fd, rec.disk_mb << 20).mkfs_flags()
        finally:
            os.close(upper_fd)
        with tempfile.TemporaryDirectory(prefix="shoal-bench-erofs-") as tmp:
            for _ in range(max(3, iterations)):
                t = time.perf_counter()
                snap = engine.snapshots.create(rec.id)
                snap_ms.append((time.perf_counter() - t) * 1000)
                engine.snapshots.delete(snap.id)
                image = Path(tmp) / "floor.erofs"
                t = time.perf_counter()
                subprocess.run([shutil.which("mkfs.erofs") or "mkfs.erofs", *flags, "--quiet", str(image),
                                str(engine.runtime.upper_dir(rec.id))], check=True)
                floor_ms.append((time.perf_counter() - t) * 1000)
                os.unlink(image)
        s, f = _p(snap_ms), _p(floor_ms)
        out["snapshot_100mb_ms"] = {**s, "baseline": f"mkfs.erofs {' '.join(flags)} of the same tree",
                                    "baseline_ms": f, "ratio_p50": round(s["p50"] / f["p50"], 2)}
        per_child, snap_part = [], []
        for _ in range(max(1, iterations // 2)):  # the fork itself, as the API runs it: snapshot, then children
            t = time.perf_counter()
            snap = engine.snapshots.create(rec.id, internal=True)
            snap_done = time.perf_counter()
            kids = fork_children(engine, engine.get(rec.id), snap.id, 10)
            for k in kids:
                if isinstance(k, Exception):
                    raise k
                engine.agent(k.id).run(["true"])
            per_child.append((time.perf_counter() - snap_done) * 1000 / 10)
            snap_part.append((snap_done - t) * 1000)
            for k in kids:
                engine.destroy(k.id)
        t = time.perf_counter()
        kids = fork(engine, rec.id, 10)
        whole = (time.perf_counter() - t) * 1000
        for k in kids:
            if not isinstance(k, Exception):
                engine.destroy(k.id)
        plain = []
        for _ in range(5):
            t = time.perf_counter()
            k = engine.create(template)
            engine.agent(k.id).run(["true"])
            plain.append((time.perf_counter() - t) * 1000)
            engine.destroy(k.id)
        c = _p(per_child)
        out["fork_per_child_ms"] = {**c, "snapshot_ms": _p(snap_part), "fork_x10_total_ms": round(whole, 1),
                                    "baseline": "create → first result from the template", "baseline_ms": _p(plain),
                                    "ratio_p50": round(c["p50"] / _p(plain)["p50"], 2)}
    finally:
        engine.destroy(rec.id)
    out["targets"] = {k: {"value": out[k]["p50"], "target": v, "met": out[k]["p50"] <= v} for k, v in TARGETS.items()}
    return out


def report(results: dict) -> str:
    lines = []
    for key in TARGETS:
        r, b, t = results[key], results[key]["baseline_ms"], results["targets"][key]
        lines.append(f"{key:28} p50 {r['p50']:8.2f}  p95 {r['p95']:8.2f}   | {r['baseline']}: p50 {b['p50']:.2f}"
                     f"   ratio {r['ratio_p50']}x   target {t['target']:g}: {'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)
