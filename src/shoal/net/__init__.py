"""Sandbox networking: an interface per sandbox, the internet when allowed, safe defaults.

``Network`` (network.py) is the one entry point the engine uses: ``claim`` a ready slot for a new
sandbox, ``release`` it on delete, ``reconcile`` after a crash. See docs/networking.md for the model.
"""

from shoal.net.config import NetConfig
from shoal.net.network import Lease, Network

__all__ = ["Lease", "NetConfig", "Network"]
