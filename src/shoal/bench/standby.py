"""Wake from standby (issue 10): what a standby freeze adds to the first request that wakes the sandbox.

``wake_from_standby_ms``: the first request (``Gate.agent`` + an agent ``ping``, as every surface does
it) on a sandbox that standby froze, minus the same request on the running sandbox (the floor of the
same run, measured between the wakes). Goal: p50 ≤ 2 ms added.
"""

from __future__ import annotations

import asyncio
import statistics
import time

from shoal.engine import Engine
from shoal.engine.standby import STANDBY
from shoal.server.gate import Gate

TARGET_MS = 2.0


async def _request(gate: Gate, sandbox_id: str) -> float:
    start = time.perf_counter()
    agent = gate.agent(sandbox_id, None)  # type: ignore[arg-type]  (in-process: no key to check)
    await agent.call({"op": "ping"})
    return (time.perf_counter() - start) * 1000


async def _samples(engine: Engine, gate: Gate, sandbox_id: str, iterations: int) -> tuple[list[float], list[float]]:
    woken, running = [], []
    for i in range(iterations + 1):
        running_ms = await _request(gate, sandbox_id)
        engine.pause(sandbox_id, reason=STANDBY)
        wake_ms = await _request(gate, sandbox_id)
        if i:  # the first round warms up
            running.append(running_ms)
            woken.append(wake_ms)
    return woken, running


def run_standby_benchmarks(engine: Engine, template: str, iterations: int) -> dict:
    rec = engine.create(template, wait=True)
    try:
        gate = Gate(engine)
        woken, running = asyncio.run(_samples(engine, gate, rec.id, iterations))
    finally:
        engine.destroy(rec.id)
    added = statistics.median(woken) - statistics.median(running)
    return {"wake_from_standby_ms": {
        "p50_added": round(added, 3), "first_request_p50": round(statistics.median(woken), 3),
        "baseline": "the same request on the running sandbox", "baseline_p50": round(statistics.median(running), 3),
        "samples": iterations, "target": TARGET_MS, "met": added <= TARGET_MS}}


def report(results: dict) -> str:
    w = results["wake_from_standby_ms"]
    return (f"{'wake_from_standby (freeze)':28} +{w['p50_added']:.2f} ms p50 added (first request "
            f"{w['first_request_p50']:.2f} vs {w['baseline_p50']:.2f} running)   target {w['target']:g}: "
            f"{'met' if w['met'] else 'NOT met'}")


if __name__ == "__main__":  # python -m shoal.bench.standby: this figure alone
    print(report(run_standby_benchmarks(Engine(), "minimal", 30)))
