"""Shoal: sandboxes for AI agents on your own Linux box."""

__version__ = "0.1.0"

