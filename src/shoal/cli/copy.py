"""``shoal cp``: files and directories between the host and a sandbox, streamed both ways (SDK).

Copies out of a sandbox write the host only through ``shoal.storage.confined``."""

from __future__ import annotations

import os
import posixpath
import sys
from collections.abc import Callable
from pathlib import Path

from shoal.client import Sandbox
from shoal.errors import InvalidRequest, NotFound
from shoal.storage.confined import ConfinedWriter, Limits

CHUNK = 1024 * 1024


def split(arg: str) -> tuple[str | None, str]:
    """``ID:/path`` → (ID, path); anything else is a local path."""
    sid, sep, path = arg.partition(":")
    if sep and sid and "/" not in sid and path:
        return sid, path
    return None, arg


def _local_chunks(path: Path):  # noqa: ANN202
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def _upload(sb: Sandbox, src: Path, dst: str) -> None:
    try:
        if sb.files.stat(dst).type == "dir":
            dst = posixpath.join(dst, src.name)
    except NotFound:
        pass
    if src.is_dir():
        sb.files.make_dir(dst)
        for root, dirs, files in os.walk(src):
            rel = os.path.relpath(root, src)
            base = dst if rel == "." else posixpath.join(dst, rel)
            for d in dirs:
                sb.files.make_dir(posixpath.join(base, d))
            for f in files:
                local = Path(root) / f
                sb.files.write(posixpath.join(base, f), _local_chunks(local), mode=local.stat().st_mode & 0o7777)
        return
    sb.files.write(dst, _local_chunks(src), mode=src.stat().st_mode & 0o7777)


def _download(sb: Sandbox, src: str, dst: Path, limits: Limits, warn: Callable[[str], None]) -> None:
    """Everything from the sandbox is hostile (its root can answer for the agent): names, types, modes
    and sizes only ever reach the host through ``ConfinedWriter``, rooted at the destination's directory."""
    info = sb.files.stat(src)
    if dst.is_dir():
        root, name = dst, posixpath.basename(posixpath.normpath(src))
        if not name or name == "/":
            raise InvalidRequest(f"{src}: name the destination (e.g. {dst}/copy), it has no name of its own")
    else:
        root, name = dst.parent, dst.name
    with ConfinedWriter(root, limits) as out:
        if info.type == "dir":
            entries = sb.files.list(src, depth=64)
            if len(entries) > limits.max_entries:
                raise InvalidRequest(f"{src}: {len(entries)} entries, more than the limit of {limits.max_entries} "
                                     "(raise it with --max-entries)")
            out.mkdir(name, info.mode)
            prefix = info.path.rstrip("/") + "/"
            for entry in entries:
                rel = _inside(entry.path, prefix)
                if entry.type == "dir":
                    out.mkdir(f"{name}/{rel}", entry.mode)
                elif entry.type == "file":
                    out.write_file(f"{name}/{rel}", sb.files.read_stream(entry.path), entry.mode)
                else:
                    warn(f"skipped {entry.path}: a {entry.type} (only files and directories are copied out)")
        elif info.type in ("file", "symlink"):  # a named link is read through, inside the sandbox
            out.write_file(name, sb.files.read_stream(src), info.mode if info.type == "file" else 0o644)
        else:
            raise InvalidRequest(f"{src}: not a regular file or directory")


def _inside(path: object, prefix: str) -> str:
    """``path`` relative to the listed directory; a listing entry anywhere else is a lie."""
    if not isinstance(path, str) or not path.startswith(prefix):
        raise InvalidRequest(f"unsafe path from the sandbox: {path!r} is not inside {prefix.rstrip('/') or '/'}")
    return path[len(prefix):]


def _warn(message: str) -> None:
    sys.stderr.write(f"shoal: warning: {message}\n")


def copy(open_sandbox: Callable[[str], Sandbox], src: str, dst: str, limits: Limits | None = None,
         warn: Callable[[str], None] = _warn) -> None:
    """``open_sandbox(id)`` connects to a sandbox (the CLI passes one bound to its daemon); ``limits``
    bound what a copy out of a sandbox may write on the host (see ``shoal.storage.confined``)."""
    src_id, src_path = split(src)
    dst_id, dst_path = split(dst)
    if src_id and dst_id:
        raise InvalidRequest("copy between two sandboxes is not supported; copy through the host")
    if not src_id and not dst_id:
        raise InvalidRequest("one side must be a sandbox path: ID:/path")
    if dst_id:
        local = Path(src_path)
        if not local.exists():
            raise NotFound(f"{src_path}: no such file or directory")
        with _Closing(open_sandbox(dst_id)) as sb:
            _upload(sb, local, dst_path)
    else:
        assert src_id is not None
        with _Closing(open_sandbox(src_id)) as sb:
            _download(sb, src_path, Path(dst_path), limits or Limits(), warn)


class _Closing:
    """Close the SDK client after the copy, without deleting the sandbox (``with sb`` would)."""

    def __init__(self, sb: Sandbox) -> None:
        self.sb = sb

    def __enter__(self) -> Sandbox:
        return self.sb

    def __exit__(self, *exc: object) -> None:
        self.sb.close()
