"""The asyncio half of what the two SDKs cannot share: background work, stdin and upload sources,
the WebSocket client.

``aio.py`` imports this module as ``_io``; ``scripts/gen_sync.py`` turns that into ``_sync_io``
when it writes ``sync.py``. Both modules define the same names with the same meaning, so the
generated code reads exactly like the async code with ``await`` removed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Callable, Coroutine, Iterable
from typing import Any

from shoal.client import _common as c

#: What ``commands.run(stdin=...)`` accepts: text, bytes, a binary file, an iterable or (here) an
#: async iterable of byte chunks.
StdinData = str | bytes | bytearray | memoryview | Iterable[bytes] | AsyncIterable[bytes] | Any
#: What ``files.write`` accepts: the same shapes as ``StdinData``.
UploadData = StdinData
#: A background worker: an asyncio task here, a thread in the sync SDK.
Worker = asyncio.Task
#: Raised in a worker that is stopped (the sync SDK's threads are never cancelled).
Cancelled = asyncio.CancelledError


def spawn(func: Callable[..., Coroutine[Any, Any, None]], *args: Any, name: str) -> Worker:
    """Run ``func(*args)`` in the background, so a process never waits for its reader."""
    return asyncio.create_task(func(*args), name=name)


async def join(worker: Worker, timeout: float | None) -> bool:
    """Wait up to ``timeout`` seconds for ``worker``; True when it has finished. The worker is not
    cancelled when the wait times out (or the waiter is cancelled): the process keeps being read."""
    await asyncio.wait({worker}, timeout=timeout)
    return worker.done()


async def stop(worker: Worker, source: Any) -> None:
    """Stop a pump: cancel its task and wait for it (its ``finally`` closes ``source``)."""
    worker.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await worker


def cancel(worker: Worker | None) -> None:
    """Stop a stdin feeder that is still sending (its socket is closing anyway)."""
    if worker is not None and not worker.done():
        worker.cancel()


async def connect_ws(url: str, headers: dict[str, str]) -> Any:
    """An open WebSocket (websockets' asyncio client); its exceptions are translated by the caller."""
    from websockets.asyncio.client import connect
    return await connect(url, additional_headers=headers, **c.WS_OPTIONS)


async def stdin_chunks(data: StdinData) -> AsyncIterator[bytes | str]:
    """``data`` as chunks to send; a file is read on a thread so the event loop never blocks on it."""
    if isinstance(data, (str, bytes, bytearray, memoryview)):
        for part in c.stdin_chunks(data):
            yield part
    elif hasattr(data, "__aiter__"):
        async for chunk in data:
            yield chunk
    elif hasattr(data, "read"):
        read = getattr(data, "read1", None) or data.read
        while chunk := await asyncio.to_thread(read, c.CHUNK):
            yield chunk
    else:
        for chunk in data:
            yield chunk


def upload_body(data: UploadData) -> AsyncIterable[bytes]:
    """A streamed request body for httpx's async client, which takes only async iterables."""
    if hasattr(data, "__aiter__"):
        return data

    async def chunks(items: Iterable[bytes | str]) -> AsyncIterator[bytes]:
        for chunk in items:
            yield chunk.encode() if isinstance(chunk, str) else bytes(chunk)
    return chunks(c.file_chunks(data) if hasattr(data, "read") else data)
