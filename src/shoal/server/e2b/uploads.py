"""envd ``POST /files`` bodies, streamed to the agent with a byte budget: nothing is spooled on the host.

Why: the old path let Starlette spool every multipart part whole into host temp files (the daemon's
disk, not the sandbox's) before the first byte reached the sandbox, and gunzipped ``Content-Encoding:
gzip`` bodies in one ``decompress`` call (a 1 MiB bomb is ~1 GiB of daemon memory). Here:

* ``Budget``: an upload may write at most ``min(configured maximum, free space of the sandbox's
  writable layer)`` bytes *after* decompression; the free space is read on the host (``statvfs`` of the
  sandbox's upper tmpfs), never asked of the agent, which the sandbox may impersonate. Past the budget
  the upload fails (507 past the free space, as envd does; 400 past the maximum), and the stream to the
  agent is cut, so the agent's write is abandoned (it writes to a temp file and renames at the end).
* ``gunzip``: decompression in bounded steps (``UPLOAD_CHUNK`` of output at a time).
* ``MultipartReader``: the ``multipart/form-data`` parser of python-multipart (Starlette's own) driven
  incrementally, each part's data handed on as it arrives.

The configured maximum is ``SHOAL_E2B_MAX_UPLOAD`` (bytes, read per request; default 1 GiB).
"""

from __future__ import annotations

import collections
import os
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

from python_multipart.multipart import MultipartParser, parse_options_header

from shoal.errors import CapacityExceeded, InvalidRequest

MAX_UPLOAD_ENV = "SHOAL_E2B_MAX_UPLOAD"
DEFAULT_MAX_UPLOAD = 1024 * 1024 * 1024
UPLOAD_CHUNK = 256 * 1024
#: What a multipart body may spend on things that are not file data (boundaries, headers, fields).
MULTIPART_OVERHEAD = 1024 * 1024

Receive = Callable[[], Awaitable[dict]]


def max_upload() -> int:
    """The configured maximum (``SHOAL_E2B_MAX_UPLOAD``); a bad value falls back to the default."""
    raw = os.environ.get(MAX_UPLOAD_ENV, "")
    try:
        value = int(raw)
    except ValueError:
        return DEFAULT_MAX_UPLOAD
    return value if value > 0 else DEFAULT_MAX_UPLOAD


def free_space(upper: Path) -> int | None:
    """Bytes an unprivileged writer can still put on the sandbox's writable layer, or None if unknown."""
    try:
        st = os.statvfs(upper)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class Budget:
    """Counts the bytes of one upload against its limit; ``take`` raises once they are over."""

    def __init__(self, maximum: int, free: int | None) -> None:
        self.maximum, self.free = maximum, free
        self.limit = maximum if free is None else min(maximum, free)
        self.used = 0

    def check_declared(self, length: int) -> None:
        """Refuse at once a body whose ``Content-Length`` alone is over the limit."""
        self._over(length)

    def take(self, n: int) -> None:
        self.used += n
        self._over(self.used)

    def _over(self, size: int) -> None:
        if size <= self.limit:
            return
        if self.free is not None and self.free < self.maximum:
            raise CapacityExceeded(f"not enough disk space in the sandbox: the upload is over the {self.free} "
                                   "bytes free")
        raise InvalidRequest(f"the upload is larger than the daemon's maximum of {self.maximum} bytes "
                             f"({MAX_UPLOAD_ENV})")


class Gunzip:
    """A gzip (or zlib) stream decoded in bounded steps, every output byte counted by ``budget``."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self._d = zlib.decompressobj(47)  # 32 + 15: gzip or zlib header, auto-detected

    def feed(self, data: bytes) -> Iterator[bytes]:
        try:
            while True:
                out = self._d.decompress(data, UPLOAD_CHUNK)
                data = self._d.unconsumed_tail
                if out:
                    self.budget.take(len(out))
                    yield out
                if not data and len(out) < UPLOAD_CHUNK:
                    return
        except zlib.error as exc:
            raise InvalidRequest(f"invalid gzip body: {exc}") from exc

    def finish(self) -> Iterator[bytes]:
        try:
            out = self._d.flush(UPLOAD_CHUNK)
        except zlib.error as exc:
            raise InvalidRequest(f"invalid gzip body: {exc}") from exc
        if out:
            self.budget.take(len(out))
            yield out
        if not self._d.eof:
            raise InvalidRequest("the gzip body is truncated")


async def body_chunks(receive: Receive) -> AsyncIterator[bytes]:
    """The request body as it arrives; a client that leaves mid-way is an error (the write is abandoned)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidRequest("the client went away during the upload")
        data = message.get("body", b"")
        if data:
            yield data
        if not message.get("more_body", False):
            return


async def octet_stream(receive: Receive, budget: Budget, gzip: bool) -> AsyncIterator[bytes]:
    """An ``application/octet-stream`` body, gunzipped if asked, within ``budget``."""
    gunzip = Gunzip(budget) if gzip else None
    async for data in body_chunks(receive):
        if gunzip is None:
            budget.take(len(data))
            yield data
        else:
            for out in gunzip.feed(data):
                yield out
    if gunzip is not None:
        for out in gunzip.finish():
            yield out


class Part:
    """One part of a multipart body: its form ``name``, ``filename`` (or None), and its data."""

    def __init__(self, reader: MultipartReader, name: str, filename: str | None) -> None:
        self.reader, self.name, self.filename = reader, name, filename
        self.done = False

    async def chunks(self) -> AsyncIterator[bytes]:
        while not self.done:
            kind, value = await self.reader.next_event()
            if kind == "data":
                yield value
            elif kind == "part_end":
                self.done = True
            else:
                raise InvalidRequest("malformed multipart body")

    async def skip(self) -> None:
        async for _ in self.chunks():
            pass


class MultipartReader:
    """``multipart/form-data`` parts in order, parsed as the body arrives. Part data counts against
    ``budget``; boundaries, headers and non-file parts against ``MULTIPART_OVERHEAD``."""

    def __init__(self, receive: Receive, content_type: str, budget: Budget) -> None:
        _ctype, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if not boundary or len(boundary) > 200:
            raise InvalidRequest("multipart/form-data without a valid boundary")
        self.budget = budget
        self._events: collections.deque[tuple[str, object]] = collections.deque()
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._body = body_chunks(receive).__aiter__()
        self._ended = False
        self._overhead = 0
        self._parser = MultipartParser(boundary, {
            "on_part_begin": self._on_part_begin,
            "on_part_data": self._on_part_data,
            "on_part_end": lambda: self._events.append(("part_end", None)),
            "on_header_field": lambda d, s, e: self._header_field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
            "on_header_end": self._on_header_end,
            "on_headers_finished": lambda: self._events.append(("headers", dict(self._headers))),
            "on_end": lambda: self._events.append(("end", None)),
        })

    def _on_part_begin(self) -> None:
        self._headers = {}

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._events.append(("data", bytes(data[start:end])))

    def _on_header_end(self) -> None:
        self._headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    async def next_event(self) -> tuple[str, bytes]:
        while not self._events:
            if self._ended:
                raise InvalidRequest("the multipart body ended before its closing boundary")
            try:
                data = await self._body.__anext__()
            except StopAsyncIteration:
                self._ended = True
                self._parser.finalize()
                continue
            try:
                self._parser.write(data)
            except Exception as exc:  # noqa: BLE001 - python-multipart's MultipartParseError and kin
                raise InvalidRequest(f"malformed multipart body: {type(exc).__name__}") from exc
        kind, value = self._events.popleft()
        if kind == "data":
            self.budget.take(len(value))  # type: ignore[arg-type]
        return kind, value  # type: ignore[return-value]

    def _spend(self, n: int) -> None:
        self._overhead += n
        if self._overhead > MULTIPART_OVERHEAD:
            raise InvalidRequest(f"more than {MULTIPART_OVERHEAD} bytes of multipart headers and fields")

    async def parts(self) -> AsyncIterator[Part]:
        """Each part in turn; a part the caller did not read to its end is skipped before the next."""
        current: Part | None = None
        while True:
            if current is not None and not current.done:
                await current.skip()
            kind, value = await self.next_event()
            if kind == "end":
                return
            if kind != "headers":
                raise InvalidRequest("malformed multipart body")
            headers: dict[bytes, bytes] = value  # type: ignore[assignment]
            self._spend(sum(len(k) + len(v) for k, v in headers.items()))
            _disp, opts = parse_options_header(headers.get(b"content-disposition", b""))
            try:
                name = opts.get(b"name", b"").decode()
                filename = opts[b"filename"].decode() if b"filename" in opts else None
            except UnicodeDecodeError as exc:
                raise InvalidRequest("a multipart part's name or filename is not UTF-8") from exc
            current = Part(self, name, filename)
            yield current
