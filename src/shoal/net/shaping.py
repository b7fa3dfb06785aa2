"""Per-sandbox bandwidth: a token bucket (tc ``tbf``) on each end of the sandbox's veth.

* Into the sandbox (``ingress_mbit``): on the host side of the veth, where the host transmits to it.
* Out of the sandbox (``egress_mbit``): on ``eth0`` inside the sandbox's namespace, where it transmits.
  The namespace belongs to the host's user namespace (see slotns.py), so sandbox root cannot remove or
  change the qdisc; shaping there queues (TCP slows down smoothly) where a policer on the host side's
  ingress would drop, and this kernel has no ``ifb`` to shape host-side ingress without modules anyway.

The veth dies with the slot, taking the qdiscs with it: nothing to undo on delete.
"""

from __future__ import annotations

import os
from pathlib import Path

from shoal.net import slotns

LATENCY = "50ms"


def _tbf(ipr, index: int, mbit: float) -> None:  # noqa: ANN001 - a pyroute2 IPRoute
    rate_bytes = mbit * 1_000_000 / 8
    burst = max(int(rate_bytes / 100), 16 * 1024)  # 10 ms of traffic, at least a few full packets
    ipr.tc("replace", "tbf", index, 0x10000, rate=f"{int(mbit * 1000)}kbit", burst=burst, latency=LATENCY)


def apply(ns_file: Path, host_if: str, egress_mbit: float | None, ingress_mbit: float | None) -> None:
    """Set the sandbox's rates (None: that direction unlimited, nothing installed)."""
    from pyroute2 import IPRoute

    if ingress_mbit:
        with IPRoute() as ipr:
            _tbf(ipr, ipr.link_lookup(ifname=host_if)[0], ingress_mbit)
    if egress_mbit:
        slotns._in_thread(_inside, ns_file, egress_mbit)


def _inside(ns_file: Path, mbit: float) -> None:
    from pyroute2 import IPRoute

    host_ns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        fd = os.open(ns_file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            slotns._check(slotns._libc.setns(fd, slotns.CLONE_NEWNET))
        finally:
            os.close(fd)
        try:
            with IPRoute() as ipr:
                _tbf(ipr, ipr.link_lookup(ifname="eth0")[0], mbit)
        finally:
            slotns._check(slotns._libc.setns(host_ns, slotns.CLONE_NEWNET))
    finally:
        os.close(host_ns)
