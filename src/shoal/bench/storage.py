"""Benchmarks of the writable layer and the pause modes (issue 10), each beside a floor of the same run.

* ``create_to_first_result_by_layer_ms``: create → first result with a ``disk`` layer vs a ``ram`` one
  (the ``ram`` layer is what every sandbox had before the ``disk`` layer: create must not get slower).
* ``seq_write_*``: ``dd`` of 1 GiB in the sandbox's layer vs the same ``dd`` on the host: onto the
  host's disk under the state directory (``disk``; both end with ``fsync``) or onto a fresh tmpfs
  (``ram``). Throughput ratio goals: ≥ 0.7 (disk) and ≥ 0.8 (ram).
* ``filesystem_resume_ms``: resume of a sandbox paused with ``mode="filesystem"`` until its first
  command has answered (goal p50 ≤ 60 ms).
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from shoal.engine import Engine
from shoal.runtime.linux import mounts

WRITE_MIB = 1024
TARGETS = {"seq_write_disk_ratio": 0.7, "seq_write_ram_ratio": 0.8, "filesystem_resume_ms": 60.0}


def _ms(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def _host_dd(path: Path, fsync: bool) -> None:
    argv = ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={WRITE_MIB}"] + (["conv=fsync"] if fsync else [])
    subprocess.run(argv, check=True, capture_output=True)
    path.unlink()


def _sandbox_dd(engine: Engine, sandbox_id: str, fsync: bool) -> None:
    cmd = f"dd if=/dev/zero of=/bench bs=1M count={WRITE_MIB}{' conv=fsync' if fsync else ''} && rm /bench"
    r = engine.agent(sandbox_id).run(["sh", "-c", cmd], timeout=600)
    if r.exit_code != 0:
        raise RuntimeError(f"dd in the sandbox failed: {r.stderr[-300:]}")


def _throughput(samples_ms: list[float]) -> float:
    """MiB/s of the median sample."""
    return round(WRITE_MIB / (sorted(samples_ms)[len(samples_ms) // 2] / 1000), 1)


def _seq_write(engine: Engine, template: str, layer: str, samples: int) -> dict:
    fsync = layer == "disk"
    with tempfile.TemporaryDirectory(prefix="shoal-bench-dd-", dir=engine.settings.state_dir) as tmp:
        target = Path(tmp)
        if layer == "ram":
            mounts.mount("tmpfs", target, "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV, f"size={WRITE_MIB + 64}m")
        try:
            host = [_ms(lambda: _host_dd(target / "dd", fsync)) for _ in range(samples)]
        finally:
            if layer == "ram":
                mounts.umount(target)
    size = WRITE_MIB + 256
    rec = engine.create(template, layer=layer, disk_mb=size, memory_mb=size + 512 if layer == "ram" else 512,
                        wait=True)
    try:
        inside = [_ms(lambda: _sandbox_dd(engine, rec.id, fsync)) for _ in range(samples)]
    finally:
        engine.destroy(rec.id)
    host_rate, rate = _throughput(host), _throughput(inside)
    return {"mib_per_s": rate, "baseline": f"host dd onto {'the state directory' if fsync else 'a tmpfs'}"
            + (" (conv=fsync)" if fsync else ""), "baseline_mib_per_s": host_rate,
            "ratio": round(rate / host_rate, 2), "samples": samples}


def run_storage_benchmarks(engine: Engine, template: str, iterations: int,
                           time_it: Callable[..., dict], percentiles: Callable[[list[float]], dict]) -> dict:
    """The storage figures; ``time_it`` and ``percentiles`` are ``run``'s (p50/p95 after a warm-up)."""
    _percentiles = percentiles
    out: dict = {}

    def create_and_run(layer: str) -> Callable[[], str]:
        def go() -> str:
            rec = engine.create(template, layer=layer)
            if engine.agent(rec.id).run(["true"]).exit_code != 0:
                raise RuntimeError("true failed")
            return rec.id
        return go

    by_layer = {layer: time_it(create_and_run(layer), iterations, after=engine.destroy) for layer in ("ram", "disk")}
    out["create_to_first_result_by_layer_ms"] = {
        **by_layer["disk"], "baseline": "the same with a ram layer (the writable layer before issue 10)",
        "baseline_ms": by_layer["ram"], "ratio_p50": round(by_layer["disk"]["p50"] / by_layer["ram"]["p50"], 2)}

    rec = engine.create(template, wait=True)
    try:
        engine.agent(rec.id).run(["sh", "-c", "echo kept > /kept"])

        def fs_resume() -> None:
            engine.resume(rec.id)
            if engine.agent(rec.id).run(["cat", "/kept"]).exit_code != 0:
                raise RuntimeError("file lost across a filesystem pause")

        samples = []
        for _ in range(iterations + 1):
            engine.pause(rec.id, mode="filesystem")
            samples.append(_ms(fs_resume))
        out["filesystem_resume_ms"] = {**_percentiles(samples[1:]),
                                       "measure": "resume after pause(mode=filesystem) → first command answered"}
    finally:
        engine.destroy(rec.id)

    samples_dd = 3
    out["seq_write_disk"] = _seq_write(engine, template, "disk", samples_dd)
    out["seq_write_ram"] = _seq_write(engine, template, "ram", samples_dd)
    out["targets"] = {
        "seq_write_disk_ratio": _verdict(out["seq_write_disk"]["ratio"], TARGETS["seq_write_disk_ratio"], False),
        "seq_write_ram_ratio": _verdict(out["seq_write_ram"]["ratio"], TARGETS["seq_write_ram_ratio"], False),
        "filesystem_resume_ms": _verdict(out["filesystem_resume_ms"]["p50"], TARGETS["filesystem_resume_ms"]),
    }
    return out


def _verdict(value: float, target: float, at_most: bool = True) -> dict:
    return {"value": value, "target": target, "met": value <= target if at_most else value >= target}


def report(results: dict) -> str:
    c = results["create_to_first_result_by_layer_ms"]
    t = results["targets"]
    lines = [f"{'create→first result, disk':28} p50 {c['p50']:8.2f}  p95 {c['p95']:8.2f}   | ram layer: "
             f"p50 {c['baseline_ms']['p50']:.2f} p95 {c['baseline_ms']['p95']:.2f}   ratio {c['ratio_p50']}x"]
    for key in ("seq_write_disk", "seq_write_ram"):
        r = results[key]
        lines.append(f"{key:28} {r['mib_per_s']:8.1f} MiB/s   | {r['baseline']}: {r['baseline_mib_per_s']:.1f} MiB/s"
                     f"   ratio {r['ratio']}   target {t[key + '_ratio']['target']}: "
                     f"{'met' if t[key + '_ratio']['met'] else 'NOT met'}")
    f = results["filesystem_resume_ms"]
    lines.append(f"{'filesystem_resume_ms':28} p50 {f['p50']:8.2f}  p95 {f['p95']:8.2f}   target "
                 f"{t['filesystem_resume_ms']['target']}: {'met' if t['filesystem_resume_ms']['met'] else 'NOT met'}")
    return "\n".join(lines)

