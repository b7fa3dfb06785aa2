"""A destination-rooted writer for data that comes out of a sandbox.

Why it exists: sandbox root can take over its agent and answer the host's list/stat/read requests
itself, so a name, a type, a mode or a size from the sandbox is attacker-controlled. A host writer that
joins such a name onto a destination, follows what it finds there, or applies the mode it was given
lets a sandbox write setuid-root files anywhere on the host. Every host-side writer goes through
``ConfinedWriter`` instead, which holds these rules in one place:

* a path is relative to the destination and made of plain names: absolute paths, ``.``, ``..``, NUL
  bytes, empty components and over-long names are refused (``InvalidRequest``);
* the walk from the destination opens every directory with ``O_NOFOLLOW`` relative to the previous
  directory's fd (``openat``), so no symlink, whoever planted it and whenever, is ever followed below
  the destination; a component that is a symlink or a file where a directory is needed is a
  ``Conflict``;
* only regular files and directories are created; links from the sandbox are not recreated (the
  caller skips them and says so): a link made by untrusted code is a trap for whoever follows it later;
* modes are masked with ``0o777`` and the process umask (no setuid, setgid or sticky bit ever), files
  belong to whoever runs the copy (never the sandbox's uid/gid); directories this writer creates keep
  ``u+rwx`` so the copy can always be read and removed by its owner;
* a file is written to a fresh hidden temporary name (``O_EXCL``) and renamed over its name only when
  complete, so an interrupted or refused copy leaves no partial file under the real name (the
  temporary file is removed; only a SIGKILL can leave a ``.shoal-part-*`` behind);
* bytes actually received (never the sizes the sandbox claims) are counted against per-file and total
  caps, and created entries against an entry cap.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from shoal.errors import Conflict, InvalidRequest, NotFound, from_errno

GIB = 1024 ** 3
NAME_MAX = 255
PATH_MAX = 4096

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Limits:
    """Caps on one copy. The defaults bound what a lying sandbox can make the host store; a copy
    that needs more says so in its error and the operator raises the cap (``shoal cp --max-*``)."""

    max_entries: int = 100_000
    max_file_bytes: int = 4 * GIB
    max_total_bytes: int = 16 * GIB


def split_relative(path: object) -> list[str]:
    """The plain names of a destination-relative path, or ``InvalidRequest`` if it could leave it."""
    if not isinstance(path, str) or not path:
        raise InvalidRequest("unsafe path from the sandbox: empty or not text")
    return plain_names(path, "from the sandbox")


def plain_names(path: str, where: str, *, skip_dots: bool = False) -> list[str]:
    """The names of a relative path, each safe to open below a directory fd; ``InvalidRequest`` (naming
    ``where`` the path came from) if it is absolute, too long, has a NUL or a ``..``. ``skip_dots``
    drops empty and ``.`` names (tar member names have them) instead of refusing them."""
    if "\0" in path:
        raise InvalidRequest(f"unsafe path {where}: {path!r} contains a NUL byte")
    if path.startswith("/"):
        raise InvalidRequest(f"unsafe path {where}: {path!r} is absolute")
    if len(os.fsencode(path)) > PATH_MAX:
        raise InvalidRequest(f"unsafe path {where}: longer than {PATH_MAX} bytes")
    parts = [n for n in path.split("/") if n not in ("", ".")] if skip_dots else path.split("/")
    for name in parts:
        if name in ("", ".", ".."):
            raise InvalidRequest(f"unsafe path {where}: {path!r} has an empty, '.' or '..' component")
        if len(os.fsencode(name)) > NAME_MAX:
            raise InvalidRequest(f"unsafe path {where}: a name in {path!r} is longer than {NAME_MAX} bytes")
    return parts


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` would, for every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


class ConfinedWriter:
    """Writes regular files and directories strictly below ``root`` (which the operator chose, so it
    may itself be reached through a symlink). Use as a context manager; ``close`` applies the modes of
    the directories it created (deepest first) and releases the root fd."""

    def __init__(self, root: str | os.PathLike[str], limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.entries = 0
        self.total_bytes = 0
        self._mask = 0o777 & ~_umask()
        self._created: list[tuple[list[str], int]] = []  # (parts, final mode) of directories made here
        try:
            self._root = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise NotFound(f"{root}: no such directory") from exc
        except OSError as exc:
            raise InvalidRequest(f"{root}: cannot write here: {exc.strerror}") from exc
        self.root = Path(root)

    def __enter__(self) -> ConfinedWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._root < 0:
            return
        try:
            for parts, mode in sorted(self._created, key=lambda c: -len(c[0])):
                try:
                    fd = self._walk(parts, create=False)
                except (OSError, Conflict):
                    continue  # gone or replaced meanwhile: nothing of ours to chmod
                try:
                    os.fchmod(fd, mode)
                finally:
                    os.close(fd)
        finally:
            os.close(self._root)
            self._root = -1

    # --- the public operations ------------------------------------------------------------------
    def mkdir(self, path: str, mode: int = 0o755) -> None:
        """Make directory ``path`` (and missing parents); an existing directory is kept as it is."""
        parts = split_relative(path)
        self._count()
        try:
            os.close(self._walk(parts, create=True, final_mode=self._dir_mode(mode)))
        except OSError as exc:
            raise from_errno(exc, str(self.root / path)) from exc

    def write_file(self, path: str, chunks: Iterable[bytes], mode: int = 0o644) -> int:
        """Write ``chunks`` to ``path`` (replacing a file there, never following a link); returns the size."""
        parts = split_relative(path)
        self._count()
        try:
            return self._write(parts, chunks, mode)
        except OSError as exc:
            raise from_errno(exc, str(self.root / path)) from exc

    def _write(self, parts: list[str], chunks: Iterable[bytes], mode: int) -> int:
        path = "/".join(parts)
        parent = self._walk(parts[:-1], create=True)
        name = parts[-1]
        tmp: str | None = f".shoal-part-{secrets.token_hex(8)}"
        fd = -1
        written = 0
        try:
            fd = os.open(tmp, _TMP_FLAGS, 0o600, dir_fd=parent)
            for chunk in chunks:
                written += len(chunk)
                if written > self.limits.max_file_bytes:
                    raise InvalidRequest(f"{path}: larger than the per-file limit of {self.limits.max_file_bytes} "
                                         "bytes (raise it with --max-file-bytes)")
                if self.total_bytes + written > self.limits.max_total_bytes:
                    raise InvalidRequest(f"the copy is larger than the limit of {self.limits.max_total_bytes} bytes "
                                         "(raise it with --max-bytes)")
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            os.fchmod(fd, (mode if isinstance(mode, int) else 0o644) & self._mask)  # no suid/sgid/sticky, no chown
            os.close(fd)
            fd = -1
            try:
                os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)  # replaces a link, never follows it
            except IsADirectoryError as exc:
                raise Conflict(f"{path}: a directory is in the way on the host") from exc
            tmp = None
        finally:
            if fd >= 0:
                os.close(fd)
            if tmp is not None:
                try:
                    os.unlink(tmp, dir_fd=parent)
                except OSError:
                    pass
            os.close(parent)
        self.total_bytes += written
        return written

    # --- internals ------------------------------------------------------------------------------
    def _dir_mode(self, mode: object) -> int:
        return ((mode if isinstance(mode, int) else 0o755) & self._mask) | 0o700

    def _count(self) -> None:
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise InvalidRequest(f"the copy has more than {self.limits.max_entries} entries "
                                 "(raise the limit with --max-entries)")

    def _walk(self, parts: list[str], *, create: bool, final_mode: int | None = None) -> int:
        """An fd of the directory ``parts`` below the root, opened one ``O_NOFOLLOW`` step at a time."""
        fd = os.dup(self._root)
        try:
            for i, name in enumerate(parts):
                try:
                    nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    try:
                        os.mkdir(name, 0o700, dir_fd=fd)
                    except FileExistsError:
                        pass  # made meanwhile: the O_NOFOLLOW open below decides
                    else:
                        last = i == len(parts) - 1
                        mode = final_mode if last and final_mode is not None else (0o777 & self._mask) | 0o700
                        self._created.append((parts[:i + 1], mode))
                    nfd = self._open_step(parts, i, fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise Conflict(f"{'/'.join(parts[:i + 1])}: is a symlink or not a directory on the host; "
                                       "refusing to write through it") from exc
                    raise
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def _open_step(parts: list[str], i: int, fd: int) -> int:
        try:
            return os.open(parts[i], _DIR_FLAGS, dir_fd=fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise Conflict(f"{'/'.join(parts[:i + 1])}: is a symlink or not a directory on the host; "
                               "refusing to write through it") from exc
            raise
