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

_cv = threading.Condition()
_in_flight = 0


@contextlib.contextmanager
def creating() -> Iterator[None]:
    """Mark a create of this process as in flight for the duration."""
    global _in_flight
    with _cv:
        _in_flight += 1
    try:
        yield
    finally:
        with _cv:
            _in_flight -= 1
            if _in_flight == 0:
                _cv.notify_all()


def wait_between_creates(max_wait: float = 0.25) -> None:
    """Block a pool's filler until no create is in flight, or ``max_wait`` seconds at most."""
    deadline = time.monotonic() + max_wait
    with _cv:
        while _in_flight > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            _cv.wait(left)
