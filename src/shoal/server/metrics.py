"""``/metrics`` in Prometheus format: sandboxes by state, create/exec latency, per-sandbox usage."""

from __future__ import annotations

from collections import Counter

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from shoal.engine import Engine, SandboxState

_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _EngineCollector:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self):  # noqa: ANN201
        records = self.engine.list()
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
        self.registry = CollectorRegistry()
        self.create_seconds = Histogram("shoal_create_seconds", "Sandbox create latency", buckets=_BUCKETS,
                                        registry=self.registry)
        self.exec_seconds = Histogram("shoal_exec_seconds", "Exec round trip (non-streamed) latency",
                                      buckets=_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)
