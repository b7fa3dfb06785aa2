"""The blocking half of what the two SDKs cannot share: background work, stdin and upload sources,
the WebSocket client.

The generated ``sync.py`` imports this module as ``_io`` (``aio.py`` imports ``_async_io``); both
define the same names with the same meaning. Here background work runs on daemon threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from shoal.client import _common as c

#: What ``commands.run(stdin=...)`` accepts: text, bytes, a binary file or an iterable of byte chunks.
StdinData = str | bytes | bytearray | memoryview | Iterable[bytes] | Any
#: What ``files.write`` accepts: the same shapes as ``StdinData``.
UploadData = StdinData
#: A background worker: a daemon thread here, an asyncio task in the async SDK.
Worker = threading.Thread


class Cancelled(BaseException):
    """Never raised: a thread cannot be cancelled. It exists so the generated pump can name the
    exception the async pump treats as "stopped"."""


def spawn(func: Callable[..., None], *args: Any, name: str) -> Worker:
    """Run ``func(*args)`` on a daemon thread, so a process never waits for its reader."""
    thread = threading.Thread(target=func, args=args, daemon=True, name=name)
    thread.start()
    return thread


def join(worker: Worker, timeout: float | None) -> bool:
    """Wait up to ``timeout`` seconds for ``worker``; True when it has finished."""
    worker.join(timeout)
    return not worker.is_alive()


def stop(worker: Worker, source: Any) -> None:
    """Stop a pump: a thread cannot be cancelled, so close its source; its read then ends."""
    source.close()


def cancel(worker: Worker | None) -> None:
    """Nothing to do: a feeder thread ends by itself when its socket closes."""


def connect_ws(url: str, headers: dict[str, str]) -> Any:
    """An open WebSocket (websockets' sync client); its exceptions are translated by the caller.
    ``legacy=True`` keeps a connection that is not used as a context manager warning-free."""
    from websockets.sync.client import connect
    return connect(url, additional_headers=headers, legacy=True, **c.WS_OPTIONS)


def stdin_chunks(data: StdinData) -> Iterator[bytes | str]:
    """``data`` as chunks to send; the process' own stdin is read with ``os.read`` (see ``file_chunks``)."""
    if isinstance(data, (str, bytes, bytearray, memoryview)):
        return iter(c.stdin_chunks(data))
    if hasattr(data, "read"):
        return c.file_chunks(data)
    return iter(data)


def upload_body(data: UploadData) -> Iterable[bytes]:
    """A streamed request body for httpx's sync client."""
    if hasattr(data, "read"):
        return c.file_chunks(data)
    return (chunk.encode() if isinstance(chunk, str) else bytes(chunk) for chunk in data)
