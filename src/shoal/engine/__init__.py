"""Sandbox lifecycle on one host: create, use, destroy, reconcile."""

from shoal.engine.engine import Engine
from shoal.engine.models import SandboxEvent, SandboxRecord, SandboxState

__all__ = ["Engine", "SandboxEvent", "SandboxRecord", "SandboxState"]
