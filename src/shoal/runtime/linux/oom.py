"""Make the agent the last process the OOM killer would pick in its sandbox.

A sandbox that fills its memory (a hog, a thousand small processes, a full RAM-backed writable
layer) makes the kernel kill something in the sandbox's cgroup. It must be a user process, never
the agent: without the agent the host can no longer reach the sandbox at all.

Two layers. The agent starts every user process with ``oom_score_adj`` 1000 (``shoal.agent.spawn``),
which needs no privilege and puts user processes first in line everywhere. On top of that, where the
daemon holds CAP_SYS_RESOURCE (lowering a score needs it), the host takes the agent out of the line
altogether (-1000), through the legacy ``/proc/<pid>/oom_adj`` file: a privileged write to
``oom_score_adj`` would also lower ``oom_score_adj_min``, which children inherit and which would let
any process in the sandbox make itself as unkillable as the agent. The legacy file leaves it at 0.
"""

from __future__ import annotations

import os

OOM_DISABLE = b"-17"
CAP_SYS_RESOURCE = 24


def can_protect() -> bool:
    """True if this process may lower an OOM score (a root without CAP_SYS_RESOURCE may not)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    except (OSError, ValueError):
        pass
    return False


def protect(pid: int) -> bool:
    """Exempt the sandbox init ``pid`` (the agent) from the OOM killer if this host allows it.

    Returns whether it did; raises OSError if the process is gone."""
    if not can_protect():
        return False
    fd = os.open(f"/proc/{pid}/oom_adj", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, OOM_DISABLE)
    finally:
        os.close(fd)
    return True
