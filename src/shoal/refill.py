"""Pools refill between creates, not during them.

A create takes ready-made parts from per-process pools (network slots, mounted ``disk`` layers, user
namespaces) and each pool makes the next one on a background thread. Made *during* a create, that
work competes with it for the two cores, for the GIL (a network slot is tens of ms of pyroute2
Python) and for the kernel's mount and netlink locks: measured back to back, a refill running beside
the create cost it ~8 ms, more than the pool saved. So a create marks itself in flight, and a pool's
filler waits until no create of this process is (bounded, so a steady stream of creates from many
clients cannot starve the pools: then they refill anyway).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

#: After the last create of a burst returns, the pools wait this long more: the new sandbox's agent is
#: starting (a Python interpreter, ~15 ms of CPU) and its first call is on its way. A filler that
#: starts now takes the GIL and a core from that first call.
QUIET_AFTER = 0.04

_cv = threading.Condition()
_in_flight = 0
_last_end = 0.0


@contextlib.contextmanager
def creating() -> Iterator[None]:
    """Mark a create of this process as in flight for the duration (``@creating()`` marks a whole call)."""
    global _in_flight
    with _cv:
        _in_flight += 1
    try:
        yield
    finally:
        with _cv:
            _in_flight -= 1
            if _in_flight == 0:
                global _last_end
                _last_end = time.monotonic()
                _cv.notify_all()


def wait_between_creates(max_wait: float = 0.25) -> None:
    """Block a pool's filler until no create is in flight and ``QUIET_AFTER`` has passed since the last
    one returned, or ``max_wait`` seconds at most."""
    deadline = time.monotonic() + max_wait
    with _cv:
        while True:
            now = time.monotonic()
            if now >= deadline:
                return
            if _in_flight > 0:
                _cv.wait(deadline - now)
            elif now < _last_end + QUIET_AFTER:
                _cv.wait(min(deadline, _last_end + QUIET_AFTER) - now)
            else:
                return
