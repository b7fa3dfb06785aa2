"""How much command output the host may hold in memory: per call, and across all calls at once.

A plain (non-streamed) exec answers with the whole output in one reply, so the daemon has to hold
it. Sandbox code decides how much output there is, so without bounds one ``yes`` can take the
daemon (and with it every sandbox's API) down. Two bounds apply:

* per call, per stream: ``max_output`` bytes (``SHOAL_EXEC_MAX_OUTPUT``, 16 MiB by default); the
  rest is read and dropped, so the command still runs to its end and its exit status is real;
* across every call of the process: an ``OutputBudget`` (``SHOAL_EXEC_OUTPUT_BUDGET``, 256 MiB by
  default). Taking from it never waits: under load a call keeps less (it is flagged truncated like
  any other), which cannot deadlock the way waiting for budget held by other waiting calls could.

Streaming (NDJSON/SSE, the SDK's callbacks) is how to get more: it holds one chunk at a time.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

DEFAULT_MAX_OUTPUT = 16 * 1024 * 1024
DEFAULT_BUDGET = 256 * 1024 * 1024


def _env_bytes(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a number of bytes, not {raw!r}") from exc
    if value < 0:
        raise ValueError(f"{name} must not be negative")
    return value


def max_output() -> int:
    """Bytes of each of stdout and stderr a plain exec keeps."""
    return _env_bytes("SHOAL_EXEC_MAX_OUTPUT", DEFAULT_MAX_OUTPUT)


class OutputBudget:
    """A count of bytes the whole process may hold as collected output; thread-safe, never blocks."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> OutputBudget:
        return cls(_env_bytes("SHOAL_EXEC_OUTPUT_BUDGET", DEFAULT_BUDGET))

    def take(self, want: int) -> int:
        """Up to ``want`` bytes, as many as are free (possibly 0)."""
        with self._lock:
            got = min(want, self.free)
            self.free -= got
            return got

    def give(self, n: int) -> None:
        with self._lock:
            self.free = min(self.total, self.free + n)

    @property
    def used(self) -> int:
        return self.total - self.free


#: The one budget of this process (the daemon), shared by the exec fast path, the REST route and MCP.
BUDGET = OutputBudget.from_env()


@dataclass
class CappedOutput:
    """One stream's kept output: a prefix of what the process wrote, at most ``limit`` bytes.

    Once a chunk could not be kept whole, nothing later is kept either (so the kept bytes are always
    a prefix), and ``truncated`` says so. ``release`` hands the bytes back to the budget.
    """

    limit: int
    budget: OutputBudget | None = None
    data: bytearray = field(default_factory=bytearray)
    truncated: bool = False
    held: int = 0

    def add(self, chunk: bytes) -> None:
        if self.truncated:
            return
        room = min(len(chunk), self.limit - len(self.data))
        if room > 0 and self.budget is not None:
            room = self.budget.take(room)
            self.held += room
        if room > 0:
            self.data += chunk[:room]
        if room < len(chunk):
            self.truncated = True

    def release(self) -> None:
        if self.budget is not None and self.held:
            self.budget.give(self.held)
        self.held = 0
