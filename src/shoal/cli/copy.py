"""``shoal cp``: files and directories between the host and a sandbox, streamed both ways."""

from __future__ import annotations

import os
import posixpath
from pathlib import Path

from shoal.engine import Engine
from shoal.errors import InvalidRequest, NotFound
from shoal.runtime.agent_client import AgentClient

CHUNK = 1024 * 1024


def _split(arg: str) -> tuple[str | None, str]:
    """``ID:/path`` → (ID, path); anything else is a local path."""
    sid, sep, path = arg.partition(":")
    if sep and sid and "/" not in sid and path:
        return sid, path
    return None, arg


def _local_chunks(path: Path):  # noqa: ANN202
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def _upload(agent: AgentClient, src: Path, dst: str) -> None:
    try:
        if agent.stat(dst)["type"] == "dir":
            dst = posixpath.join(dst, src.name)
    except NotFound:
        pass
    if src.is_dir():
        agent.mkdir(dst) if not agent.exists(dst) else None
        for root, dirs, files in os.walk(src):
            rel = os.path.relpath(root, src)
            base = dst if rel == "." else posixpath.join(dst, rel)
            for d in dirs:
                target = posixpath.join(base, d)
                if not agent.exists(target):
                    agent.mkdir(target)
            for f in files:
                local = Path(root) / f
                agent.write_file(posixpath.join(base, f), _local_chunks(local), mode=local.stat().st_mode & 0o7777)
        return
    agent.write_file(dst, _local_chunks(src), mode=src.stat().st_mode & 0o7777)


def _download(agent: AgentClient, src: str, dst: Path) -> None:
    info = agent.stat(src)
    if dst.is_dir():
        dst = dst / posixpath.basename(src.rstrip("/"))
    if info["type"] == "dir":
        dst.mkdir(exist_ok=True)
        for entry in agent.list_dir(src, depth=64):
            rel = posixpath.relpath(entry["path"], src)
            target = dst / rel
            if entry["type"] == "dir":
                target.mkdir(parents=True, exist_ok=True)
            elif entry["type"] == "file":
                _save(agent, entry["path"], target, entry["mode"])
        return
    _save(agent, src, dst, info["mode"])


def _save(agent: AgentClient, src: str, dst: Path, mode: int) -> None:
    tmp = dst.with_name(f".{dst.name}.shoal-part")
    try:
        with open(tmp, "wb") as f:
            for chunk in agent.read_file_stream(src):
                f.write(chunk)
        os.chmod(tmp, mode)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def copy(engine: Engine, src: str, dst: str) -> None:
    src_id, src_path = _split(src)
    dst_id, dst_path = _split(dst)
    if src_id and dst_id:
        raise InvalidRequest("copy between two sandboxes is not supported; copy through the host")
    if not src_id and not dst_id:
        raise InvalidRequest("one side must be a sandbox path: ID:/path")
    if dst_id:
        local = Path(src_path)
        if not local.exists():
            raise NotFound(f"{src_path}: no such file or directory")
        _upload(engine.agent(dst_id), local, dst_path)
    else:
        assert src_id is not None
        _download(engine.agent(src_id), src_path, Path(dst_path))
