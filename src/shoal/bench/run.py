"""``shoal bench``: Shoal's latencies beside kernel/runtime baselines measured in the same run.

Figures from different machines are not comparable to the digit; the ratio to a baseline taken
seconds earlier on the same machine is. Every figure is a median (p50) and a p95 over
``iterations`` samples, after one warm-up.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from shoal.bench.network import network_report, run_network_benchmarks
from shoal.bench.standby import report as standby_report
from shoal.bench.standby import run_standby_benchmarks
from shoal.bench.storage import report as storage_report
from shoal.bench.storage import run_storage_benchmarks
from shoal.engine import Engine

TARGETS = {"create_to_first_result_ms": 40.0, "exec_round_trip_ms": 2.0, "idle_memory_mib": 15.0}
#: Seconds a running-sandbox figure waits after its create, for the pools' refills to finish.
SETTLE_S = 1.0


def _percentiles(samples_ms: list[float]) -> dict[str, float]:
    s = sorted(samples_ms)
    p95 = s[min(len(s) - 1, max(0, int(round(0.95 * len(s))) - 1))]
    return {"p50": round(statistics.median(s), 3), "p95": round(p95, 3), "n": len(s)}


def _time(fn: Callable[[], object], iterations: int, after: Callable[[object], None] | None = None) -> dict:
    warm = fn()
    if after:
        after(warm)
    samples = []
    for _ in range(iterations):
        t = time.perf_counter()
        value = fn()
        samples.append((time.perf_counter() - t) * 1000)
        if after:
            after(value)
    return _percentiles(samples)


def settle(engine: Engine, limit: float = 30.0) -> None:
    """Wait until every pool of ``engine`` is full (at most ``limit`` s): a new engine fills its pools
    (8 network slots, 8 layers, 8 namespace pairs: ~1 s of work) in the background, and a figure taken
    meanwhile measures the fill, not the create. A daemon that has been up a while is in this state."""
    deadline = time.monotonic() + limit
    while not engine.pools_full() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(SETTLE_S / 4)


def _fork_exec_true() -> None:
    pid = os.posix_spawn("/bin/true", ["true"], {})
    os.waitpid(pid, 0)


def _bare_crun_bundle(rootfs: Path, workdir: Path) -> Path:
    """``crun spec`` defaults, read-only root on the template: the plain container we compare to."""
    bundle = workdir / "bundle"
    bundle.mkdir()
    subprocess.run(["crun", "spec"], cwd=bundle, check=True, capture_output=True)
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["root"] = {"path": str(rootfs), "readonly": True}
    cfg["process"]["args"] = ["/bin/true"]
    cfg["process"]["terminal"] = False
    (bundle / "config.json").write_text(json.dumps(cfg))
    return bundle


def _crun_run_true(bundle: Path, state: Path, counter: list[int]) -> None:
    counter[0] += 1
    name = f"shoal-bench-{os.getpid()}-{counter[0]}"
    subprocess.run(["crun", "--root", str(state), "run", "--bundle", str(bundle), name],
                   check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _memory(engine: Engine, sandbox_id: str) -> dict[str, float]:
    """Host memory of one idle sandbox: its agent's PSS and its whole cgroup's charge."""
    out: dict[str, float] = {}
    pid = getattr(engine.runtime, "init_pid", lambda _sid: None)(sandbox_id)
    if pid:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Pss:", "Rss:")):
                    out["agent_" + line.split(":")[0].lower() + "_mib"] = round(int(line.split()[1]) / 1024, 2)
    usage = engine.runtime.usage(sandbox_id)
    if usage.get("memory_bytes") is not None:
        out["cgroup_mib"] = round(usage["memory_bytes"] / 1048576, 2)
    return out


def run_benchmarks(engine: Engine, iterations: int = 30, template: str = "minimal") -> dict:
    if not engine.templates.get(template).built:
        engine.templates.build(template)
    lower = engine.templates.mount(template)
    host = {"kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version()}
    results: dict = {"host": host, "template": template, "iterations": iterations}

    # create → first result, against a bare `crun run /bin/true`
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmp:
        bundle = _bare_crun_bundle(lower, Path(tmp))
        state = Path(tmp) / "state"
        counter = [0]
        crun = _time(lambda: _crun_run_true(bundle, state, counter), iterations)

    def create_and_run() -> str:
        rec = engine.create(template)
        result = engine.agent(rec.id).run(["true"])
        assert result.exit_code == 0
        return rec.id

    engine.destroy(create_and_run())  # asks every pool for its parts: then they are made, off the clock
    settle(engine)
    create = _time(create_and_run, iterations, after=engine.destroy)  # type: ignore[arg-type]
    results["create_to_first_result_ms"] = {**create, "baseline": "crun run /bin/true (bare bundle)",
                                            "baseline_ms": crun, "ratio_p50": round(create["p50"] / crun["p50"], 2)}

    # exec round trip in a running sandbox, against fork+exec on the host. Measured in the steady state:
    # right after a create, the pools make its replacements (a network slot, a mounted layer, a user
    # namespace: ~50 ms of CPU on a 2-core host), which would land in the first few hundred samples.
    rec = engine.create(template, wait=True)
    try:
        agent = engine.agent(rec.id)
        time.sleep(SETTLE_S)
        fork = _time(_fork_exec_true, max(iterations, 200))
        exec_ = _time(lambda: agent.run(["true"]), max(iterations, 200))
        results["exec_round_trip_ms"] = {**exec_, "baseline": "fork+exec /bin/true on the host",
                                         "baseline_ms": fork, "ratio_p50": round(exec_["p50"] / fork["p50"], 2)}
        time.sleep(0.5)
        mem = _memory(engine, rec.id)
        results["idle_memory_mib"] = {**mem, "measure": "agent PSS + cgroup charge of an idle sandbox"}
    finally:
        engine.destroy(rec.id)

    results["storage"] = run_storage_benchmarks(engine, template, iterations, _time, _percentiles)
    from shoal.bench.snapshots import run_snapshot_benchmarks  # snapshots and fork (issue 10)
    results["snapshots"] = run_snapshot_benchmarks(engine, template, iterations)
    results["network"] = run_network_benchmarks(engine, template, iterations, _percentiles)
    results["standby"] = run_standby_benchmarks(engine, template, iterations)

    memory = results["idle_memory_mib"]
    idle = max(memory.get("cgroup_mib", 0.0), memory.get("agent_pss_mib", 0.0))
    results["targets"] = {
        "create_to_first_result_ms": verdict(results["create_to_first_result_ms"]["p50"],
                                             TARGETS["create_to_first_result_ms"]),
        "exec_round_trip_ms": verdict(results["exec_round_trip_ms"]["p50"], TARGETS["exec_round_trip_ms"]),
        "idle_memory_mib": verdict(idle, TARGETS["idle_memory_mib"]),
    }
    shutil.rmtree(Path(tempfile.gettempdir()) / "shoal-bench-state", ignore_errors=True)
    return results


def verdict(value: float, target: float, at_most: bool = True) -> dict:
    """A measured figure against its goal (``at_most``: lower is better)."""
    return {"value": round(value, 3), "target": target, "met": value <= target if at_most else value >= target}


def _met(v: dict) -> str:
    return f"target {v['target']:g}: {'met' if v['met'] else 'NOT met'}"


def report(results: dict) -> str:
    """A short human table."""
    lines = [f"host: {results['host']}  template: {results['template']}"]
    for key in ("create_to_first_result_ms", "exec_round_trip_ms"):
        r, b = results[key], results[key]["baseline_ms"]
        lines.append(f"{key:28} p50 {r['p50']:8.2f}  p95 {r['p95']:8.2f}   | {r['baseline']}: "
                     f"p50 {b['p50']:.2f} p95 {b['p95']:.2f}   ratio {r['ratio_p50']}x   "
                     f"{_met(results['targets'][key])}")
    lines.append(f"{'idle_memory_mib':28} {results['idle_memory_mib']}   {_met(results['targets']['idle_memory_mib'])}")
    if "storage" in results:
        lines.append(storage_report(results["storage"]))
    if "snapshots" in results:
        from shoal.bench.snapshots import report as snapshots_report
        lines.append(snapshots_report(results["snapshots"]))
    if "network" in results:
        lines.append(network_report(results["network"]))
    if "standby" in results:
        lines.append(standby_report(results["standby"]))
    return "\n".join(lines)
