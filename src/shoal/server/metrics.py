"""``/metrics`` in Prometheus format: sandboxes by state, create/exec latency, per-sandbox usage.

What a caller sees depends on its key. Sandbox ids are a tenant's secret (they address its ports and
its traffic), and even counts tell one tenant about another's activity, so:

* an admin key (the operator's, see ``shoal.engine.keys``) gets everything: every sandbox's series
  and the daemon-wide create/exec latency histograms;
* any other key gets only its own sandboxes: their count by state and their usage series. The
  histograms mix every tenant's calls, so they are not shown to it.
"""

from __future__ import annotations

from collections import Counter

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from shoal.engine import Engine, SandboxState
from shoal.engine.keys import ApiKey

_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _EngineCollector:
    """The sandbox gauges, for every sandbox (``owner`` None) or only ``owner``'s."""

    def __init__(self, engine: Engine, owner: ApiKey | None = None) -> None:
        self.engine = engine
        self.owner = owner

    def collect(self):  # noqa: ANN201
        records = self.engine.list(self.owner)
        by_state = Counter(r.state.value for r in records)
        g = GaugeMetricFamily("shoal_sandboxes", "Sandboxes by state", labels=["state"])
        for state in SandboxState:
            g.add_metric([state.value], by_state.get(state.value, 0))
        yield g
        mem = GaugeMetricFamily("shoal_sandbox_memory_bytes", "Memory charged to a sandbox", labels=["sandbox"])
        cpu = GaugeMetricFamily("shoal_sandbox_cpu_seconds", "CPU time used by a sandbox", labels=["sandbox"])
        for r in records:
            if r.state in (SandboxState.RUNNING, SandboxState.PAUSED):
                use = self.engine.runtime.usage(r.id)
                if use.get("memory_bytes") is not None:
                    mem.add_metric([r.id], use["memory_bytes"])
                if use.get("cpu_usec") is not None:
                    cpu.add_metric([r.id], use["cpu_usec"] / 1e6)
        yield mem
        yield cpu


class Metrics:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.registry = CollectorRegistry()
        self.create_seconds = Histogram("shoal_create_seconds", "Sandbox create latency", buckets=_BUCKETS,
                                        registry=self.registry)
        self.exec_seconds = Histogram("shoal_exec_seconds", "Exec round trip (non-streamed) latency",
                                      buckets=_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(engine))

    def render(self, key: ApiKey) -> bytes:
        """The exposition ``key`` may read: everything for an admin key, its own sandboxes otherwise."""
        if key.admin:
            return generate_latest(self.registry)
        own = CollectorRegistry()
        own.register(_EngineCollector(self.engine, key))
        return generate_latest(own)
