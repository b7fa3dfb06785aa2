"""``shoal cp``: files and directories between the host and a sandbox, streamed both ways (SDK)."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable
from pathlib import Path

from shoal.client import Sandbox
from shoal.errors import InvalidRequest, NotFound

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


def _download(sb: Sandbox, src: str, dst: Path) -> None:
    info = sb.files.stat(src)
    if dst.is_dir():
        dst = dst / posixpath.basename(src.rstrip("/"))
    if info.type == "dir":
        dst.mkdir(exist_ok=True)
        for entry in sb.files.list(src, depth=64):
            target = dst / posixpath.relpath(entry.path, info.path)
            if entry.type == "dir":
                target.mkdir(parents=True, exist_ok=True)
            elif entry.type == "file":
                target.parent.mkdir(parents=True, exist_ok=True)
                _save(sb, entry.path, target, entry.mode)
        return
    _save(sb, src, dst, info.mode)


def _save(sb: Sandbox, src: str, dst: Path, mode: int) -> None:
    tmp = dst.with_name(f".{dst.name}.shoal-part")
    try:
        with open(tmp, "wb") as f:
            for chunk in sb.files.read_stream(src):
                f.write(chunk)
        os.chmod(tmp, mode & 0o7777)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def copy(open_sandbox: Callable[[str], Sandbox], src: str, dst: str) -> None:
    """``open_sandbox(id)`` connects to a sandbox (the CLI passes one bound to its daemon)."""
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
            _download(sb, src_path, Path(dst_path))


class _Closing:
    """Close the SDK client after the copy, without deleting the sandbox (``with sb`` would)."""

    def __init__(self, sb: Sandbox) -> None:
        self.sb = sb

    def __enter__(self) -> Sandbox:
        return self.sb

    def __exit__(self, *exc: object) -> None:
        self.sb.close()
