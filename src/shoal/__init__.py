"""Shoal: sandboxes for AI agents on your own Linux box.

``from shoal import Sandbox, AsyncSandbox`` gives the Python SDK (a client of the daemon). It is
imported lazily, so the rest of the package (and the in-sandbox agent) never loads httpx.
"""

__version__ = "0.1.0"

_SDK_NAMES = frozenset({"Sandbox", "AsyncSandbox", "CommandResult", "CommandHandle", "AsyncCommandHandle",
                        "PtyHandle", "AsyncPtyHandle", "SandboxInfo", "EntryInfo", "FilesystemEvent",
                        "ProcessInfo", "Output"})


def __getattr__(name: str):  # noqa: ANN202 - PEP 562 lazy exports
    if name in _SDK_NAMES:
        from shoal import client

        return getattr(client, name)
    raise AttributeError(f"module 'shoal' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_SDK_NAMES))
