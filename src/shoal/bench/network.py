"""``shoal bench``: what a sandbox's network costs at create (goal: ≤ 2 ms on create → first result p50).

The two variants run interleaved (with, without, with, ...) so a drift of the machine's load hits both
alike; "without" is a sandbox with loopback only (``Engine.create(network=False)``), as before Shoal
had networking. The pool is warmed first: a create with networking takes a ready slot.
"""

from __future__ import annotations

import time
from collections.abc import Callable

NETWORK_TARGET_MS = 2.0


def run_network_benchmarks(engine, template: str, iterations: int,  # noqa: ANN001
                           percentiles: Callable[[list[float]], dict]) -> dict:
    if engine.network is None:
        return {"skipped": "SHOAL_NET=0"}
    samples: dict[bool, list[float]] = {True: [], False: []}
    for i in range(iterations * 2 + 2):
        network = i % 2 == 0
        if network:  # a steady state: the pool refilled (off the clock) since the last create
            engine.network.ensure()
            deadline = time.monotonic() + 5
            while len(engine.network._pool) < engine.network.config.pool_size and time.monotonic() < deadline:
                time.sleep(0.01)
        t = time.perf_counter()
        rec = engine.create(template, network=network)
        assert engine.agent(rec.id).run(["true"]).exit_code == 0
        elapsed = (time.perf_counter() - t) * 1000
        engine.destroy(rec.id)
        if i >= 2:  # one warm-up of each
            samples[network].append(elapsed)
    with_net, without = percentiles(samples[True]), percentiles(samples[False])
    added = round(with_net["p50"] - without["p50"], 3)
    return {"with_network_ms": with_net, "without_network_ms": without, "added_p50_ms": added,
            "target": {"value": added, "target": NETWORK_TARGET_MS, "met": added <= NETWORK_TARGET_MS}}


def network_report(r: dict) -> str:
    if "skipped" in r:
        return f"{'network':28} skipped ({r['skipped']})"
    w, wo, t = r["with_network_ms"], r["without_network_ms"], r["target"]
    return (f"{'create_with_network_ms':28} p50 {w['p50']:8.2f}  p95 {w['p95']:8.2f}   | without network: "
            f"p50 {wo['p50']:.2f} p95 {wo['p95']:.2f}   added p50 {r['added_p50_ms']} ms   "
            f"target {t['target']:g}: {'met' if t['met'] else 'NOT met'}")
