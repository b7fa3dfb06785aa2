"""Admission control: refuse sandboxes this host cannot hold, before anything is made for them.

Without it a client could ask for 256 GiB and 64 CPUs on a 24 GiB, 2-core host and get a sandbox
whose limits mean nothing, or fill the host with sandboxes whose committed memory is many times its
RAM so that the host's own OOM killer, not the sandbox limits, decides who dies. Memory is the
resource that must hold; CPU is time-shared (each sandbox's quota bounds it, idle ones cost nothing),
so by default only a single sandbox asking for more CPUs than the host has is refused.

The operator sets how far to overcommit (``SHOAL_MEMORY_OVERCOMMIT``, default 1.5; ``SHOAL_CPU_OVERCOMMIT``,
unset: no total CPU cap); the defaults let idle sandboxes share a host as on every platform, and still
refuse the absurd.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from shoal.engine.models import SandboxRecord, SandboxState
from shoal.errors import CapacityExceeded, InvalidRequest

#: States in which a sandbox holds (or is about to hold) its memory and CPU share.
HOLDING = frozenset({SandboxState.CREATING, SandboxState.RUNNING, SandboxState.PAUSED})
DEFAULT_MEMORY_OVERCOMMIT = 1.5
#: Kept for the host itself (daemon, page cache, the kernel): 10 % of RAM, at most 2 GiB.
HOST_RESERVE_FRACTION, HOST_RESERVE_MAX_MB = 0.10, 2048


def _env_ratio(name: str, default: float | None) -> float | None:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be a number, not {raw!r}") from None
    if not 0.1 <= value <= 1000:
        raise InvalidRequest(f"{name} must be between 0.1 and 1000, not {value}")
    return value


def host_memory_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise OSError("MemTotal missing from /proc/meminfo")


def host_cpus() -> int:
    return len(os.sched_getaffinity(0)) or 1


@dataclass(frozen=True)
class HostCapacity:
    """What sandboxes on this host may commit in total, and at most each."""

    memory_mb: int          #: RAM sandboxes may use (total minus the host's reserve)
    cpus: int
    memory_overcommit: float = DEFAULT_MEMORY_OVERCOMMIT
    cpu_overcommit: float | None = None  #: None: no cap on the total

    @classmethod
    def of_this_host(cls) -> HostCapacity:
        total = host_memory_mb()
        reserve = min(HOST_RESERVE_MAX_MB, int(total * HOST_RESERVE_FRACTION))
        return cls(memory_mb=total - reserve, cpus=host_cpus(),
                   memory_overcommit=_env_ratio("SHOAL_MEMORY_OVERCOMMIT", DEFAULT_MEMORY_OVERCOMMIT) or 1.0,
                   cpu_overcommit=_env_ratio("SHOAL_CPU_OVERCOMMIT", None))

    def admit(self, records: Iterable[SandboxRecord], cpu: float, memory_mb: int) -> None:
        """Raise unless a sandbox of ``cpu`` and ``memory_mb`` fits beside ``records``.

        Larger than the host itself → ``InvalidRequest`` (it will never fit); no room now beside the
        other sandboxes → ``CapacityExceeded`` (503: it may fit later).
        """
        if memory_mb > self.memory_mb:
            raise InvalidRequest(f"memory_mb {memory_mb} is more than this host can give one sandbox "
                                 f"({self.memory_mb} MiB)")
        if cpu > self.cpus:
            raise InvalidRequest(f"cpu {cpu:g} is more than this host has ({self.cpus} CPUs)")
        holding = [r for r in records if r.state in HOLDING]
        used_mb = sum(r.memory_mb for r in holding)
        mem_cap = int(self.memory_mb * self.memory_overcommit)
        if used_mb + memory_mb > mem_cap:
            raise CapacityExceeded(f"this host is full: {used_mb} MiB of {mem_cap} MiB committed to sandboxes, "
                                   f"{memory_mb} MiB asked (SHOAL_MEMORY_OVERCOMMIT={self.memory_overcommit:g})")
        if self.cpu_overcommit is None:
            return
        used_cpu = sum(r.cpu for r in holding)
        cpu_cap = self.cpus * self.cpu_overcommit
        if used_cpu + cpu > cpu_cap:
            raise CapacityExceeded(f"this host is full: {used_cpu:g} of {cpu_cap:g} CPUs committed to sandboxes, "
                                   f"{cpu:g} asked (SHOAL_CPU_OVERCOMMIT={self.cpu_overcommit:g})")
