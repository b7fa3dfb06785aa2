"""The bounds of what one sandbox may ask for, declared once.

The engine enforces them (``Engine.create``, ``Engine.set_timeout``); the native API's pydantic
models, the MCP tools and the E2B control plane read them from here so that their schemas and
error messages say what the engine will accept, and a change is made in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.errors import InvalidRequest


@dataclass(frozen=True)
class Limit:
    """Allowed values: ``low <= value <= high``, or ``0 < value <= high`` when ``positive`` (a timeout
    may be a fraction of a second; the message still names ``low``, the smallest whole value)."""

    name: str
    low: float
    high: float
    unit: str = ""
    positive: bool = False

    def allows(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        return (0 < value if self.positive else self.low <= value) and value <= self.high

    def check(self, value: object) -> None:
        """``InvalidRequest`` unless ``value`` is allowed."""
        if not self.allows(value):
            high = int(self.high) if float(self.high).is_integer() else self.high
            raise InvalidRequest(f"{self.name} must be between {self.low:g} and {high}{self.unit}, not {value!r}")


@dataclass(frozen=True)
class Limits:
    cpu: Limit = Limit("cpu", 0.05, 64.0)
    memory_mb: Limit = Limit("memory_mb", 16, 256 * 1024, " MiB")
    disk_mb: Limit = Limit("disk_mb", 16, 1024 * 1024, " MiB")
    #: Seconds until a sandbox expires, and the longest an exec may be given.
    timeout: Limit = Limit("timeout", 1, 7 * 24 * 3600, " seconds", positive=True)

    def check(self, name: str, value: object) -> None:
        getattr(self, name).check(value)


LIMITS = Limits()
