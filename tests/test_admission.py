"""Admission control: the host refuses sandboxes it cannot hold, with a clear error (issue 7, item 8)."""

from __future__ import annotations

import httpx
import pytest

from shoal.engine.admission import HostCapacity, host_cpus, host_memory_mb
from shoal.engine.models import SandboxRecord, SandboxState
from shoal.errors import CapacityExceeded, InvalidRequest


def test_engine_refuses_more_than_the_host_has(engine, leftovers):
    before = {r.id for r in engine.list()}
    with pytest.raises(InvalidRequest, match="memory_mb"):
        engine.create("minimal", memory_mb=host_memory_mb() + 1024)
    with pytest.raises(InvalidRequest, match="cpu"):
        engine.create("minimal", cpu=float(host_cpus() + 1))
    assert {r.id for r in engine.list()} == before  # nothing was made


def test_the_reported_request_is_refused_over_http(daemon):
    r = httpx.post(f"{daemon.url}/v1/sandboxes", headers=daemon.headers,
                   json={"template": "minimal", "memory_mb": 262144, "cpu": 64})
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "invalid_request" and "host" in r.json()["message"]


def _rec(i: int, memory_mb: int, state: SandboxState = SandboxState.RUNNING, cpu: float = 1.0) -> SandboxRecord:
    return SandboxRecord(id=f"s{i}", template="minimal", state=state, cpu=cpu, memory_mb=memory_mb,
                         disk_mb=64, created_at=0.0)


def test_committed_memory_is_bounded_by_the_overcommit_ratio():
    cap = HostCapacity(memory_mb=1000, cpus=2, memory_overcommit=1.5)
    cap.admit([_rec(1, 700), _rec(2, 700)], 1.0, 100)           # 1500 of 1500
    with pytest.raises(CapacityExceeded, match="full"):
        cap.admit([_rec(1, 700), _rec(2, 700)], 1.0, 101)
    # a deleted or stopping sandbox holds nothing; a paused one keeps its memory
    cap.admit([_rec(1, 1400, SandboxState.STOPPING)], 1.0, 1000)
    with pytest.raises(CapacityExceeded):
        cap.admit([_rec(1, 1400, SandboxState.PAUSED)], 1.0, 1000)


def test_cpu_total_is_capped_only_when_the_operator_asks():
    free = HostCapacity(memory_mb=10**6, cpus=2)
    free.admit([_rec(i, 16, cpu=2.0) for i in range(100)], 2.0, 16)
    capped = HostCapacity(memory_mb=10**6, cpus=2, cpu_overcommit=2.0)
    with pytest.raises(CapacityExceeded, match="CPUs"):
        capped.admit([_rec(1, 16, cpu=2.0), _rec(2, 16, cpu=1.5)], 1.0, 16)
