"""Apply OCI image layers (tar streams) to a root tree, treating every byte of them as hostile.

Why not ``tar -x`` or ``tarfile.extractall``: a layer is someone else's archive. Its names may climb
out with ``..`` or an absolute path, or walk through a symlink an earlier layer planted (``etc -> /etc``
then ``etc/passwd``); it may hold device nodes, ids beyond the sandbox's range or a bomb of bytes. And
the OCI image spec gives some names a meaning tar does not know: ``.wh.<name>`` deletes ``<name>`` of the
layers below, ``.wh..wh..opq`` empties its directory of them. So the applier holds these rules:

* every name is split into plain components; ``..``, absolute names, NUL bytes and over-long names are
  refused (``InvalidRequest``);
* the tree is walked with ``openat(O_NOFOLLOW)`` from the root's fd; a directory symlink met on the way
  is resolved *inside* the tree, as a chroot would (what Docker does for a ``lib -> usr/lib`` image), by
  rewriting the path textually with ``..`` clamped at the root, never by letting the kernel follow it;
* only regular files, directories, symlinks, hard links (to a name already in the tree, any layer) and
  FIFOs are made; device nodes are refused: they would be real devices on the host's disk;
* owners must lie in the sandbox's id range and are shifted into the host range as the file is made
  (the same shift ``erofs.shift_ownership`` applies to recipe trees), mode bits are set after the
  chown (which clears set-uid) so set-uid/set-gid survive; only ``user.*`` and ``security.capability``
  xattrs are kept (``trusted.overlay.*`` would steer the sandbox's overlay), and a v2 file capability is
  rewritten as v3 with the sandbox root as its owner, as the kernel does for a write from that namespace;
* bytes actually written and entries made are counted against caps.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import struct
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from shoal.errors import InvalidRequest
from shoal.storage.confined import plain_names

GIB = 1024 ** 3
MAX_SYMLINK_HOPS = 40
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_XATTR_PREFIX = "SCHILY.xattr."
_CAPS = "security.capability"
_CAP_V2, _CAP_V3 = 0x02000000, 0x03000000
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ImportLimits:
    """Caps on one image: what a hostile image can make the host write."""

    max_total_bytes: int = 64 * GIB
    max_entries: int = 2_000_000


def split_name(name: str) -> list[str]:
    """The plain components of a layer member's name; ``InvalidRequest`` if it could leave the tree."""
    return plain_names(name, "in image layer", skip_dots=True)


def _v3_caps(value: bytes, rootid: int) -> bytes:
    """A v2 ``security.capability`` as v3 owned by ``rootid`` (v3 values get their rootid replaced)."""
    if len(value) < 20:
        return value
    magic = struct.unpack_from("<I", value)[0] & 0xFF000000
    if magic not in (_CAP_V2, _CAP_V3):
        return value
    flags = struct.unpack_from("<I", value)[0] & 0x00FFFFFF
    return struct.pack("<I", _CAP_V3 | flags) + value[4:20] + struct.pack("<I", rootid)


class LayerApplier:
    """Applies layers, in order, to the tree at ``root`` (an empty directory the caller made)."""

    def __init__(self, root: str | os.PathLike[str], uid_base: int, uid_count: int,
                 limits: ImportLimits | None = None, log: Callable[[str], None] | None = None) -> None:
        self.uid_base, self.uid_count = uid_base, uid_count
        self.limits = limits or ImportLimits()
        self.log = log or (lambda line: None)
        self.total_bytes = 0
        self.entries = 0
        self.skipped_xattrs = 0
        self._root = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._dirs: dict[tuple[str, ...], tuple[int, tuple[str, ...]]] = {}  # raw parent → (fd, resolved)
        self._dir_times: dict[tuple[str, ...], int] = {}
        self._this_layer: set[tuple[str, ...]] = set()

    def __enter__(self) -> LayerApplier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._forget_dirs()
        if self._root >= 0:
            os.close(self._root)
            self._root = -1

    # --- walking ---------------------------------------------------------------------------------
    def _forget_dirs(self) -> None:
        for fd, _ in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    def _open_dir(self, parts: list[str], create: bool) -> tuple[int, tuple[str, ...]] | None:
        """A borrowed fd of the directory ``parts`` names (symlinks resolved inside the tree) and its
        resolved path; None if it does not exist and not ``create``. Missing parents are made 0755
        root-owned, as Docker does."""
        key = tuple(parts)
        hit = self._dirs.get(key)
        if hit is not None:
            return hit
        todo = list(parts)
        resolved: list[str] = []
        fd = os.dup(self._root)
        hops = 0
        try:
            while todo:
                name = todo.pop(0)
                if name in ("", "."):
                    continue
                if name == "..":
                    resolved = resolved[:-1]
                    os.close(fd)
                    fd = self._walk_plain(resolved)
                    continue
                try:
                    nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        os.close(fd)
                        return None
                    os.mkdir(name, 0o755, dir_fd=fd)
                    os.chown(name, self.uid_base, self.uid_base, dir_fd=fd, follow_symlinks=False)
                    nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError as err:
                    if err.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    st = os.lstat(name, dir_fd=fd)
                    shown = "/".join([*resolved, name])
                    if not stat.S_ISLNK(st.st_mode):
                        raise InvalidRequest(f"image layer puts entries under {shown!r}, which is not a "
                                             "directory") from err
                    hops += 1
                    if hops > MAX_SYMLINK_HOPS:
                        raise InvalidRequest(f"image layer: too many symlinks resolving {shown!r}") from err
                    target = os.readlink(name, dir_fd=fd)
                    if target.startswith("/"):
                        resolved = []
                        os.close(fd)
                        fd = os.dup(self._root)
                    todo = target.split("/") + todo
                    continue
                os.close(fd)
                fd = nfd
                resolved.append(name)
        except BaseException:
            os.close(fd)
            raise
        if len(self._dirs) >= 256:
            self._forget_dirs()
        self._dirs[key] = (fd, tuple(resolved))
        return self._dirs[key]

    def _walk_plain(self, parts: list[str]) -> int:
        fd = os.dup(self._root)
        for name in parts:
            nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return fd

    def _remove(self, dfd: int, name: str) -> None:
        """Remove ``name`` in ``dfd``, a whole directory tree if it is one (never following links)."""
        try:
            st = os.lstat(name, dir_fd=dfd)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=dfd)  # the fd-based walk: never follows a symlink
        else:
            os.unlink(name, dir_fd=dfd)
        self._forget_dirs()  # a cached fd may have been this directory or below it (dfd too: callers reopen)

    # --- applying ---------------------------------------------------------------------------------
    def apply(self, stream: IO[bytes], label: str) -> None:
        """Apply one uncompressed layer tar read from ``stream``; ``label`` names it in errors."""
        self._this_layer = set()
        try:
            with tarfile.open(fileobj=stream, mode="r|", errorlevel=2) as tar:
                for member in tar:
                    self._member(tar, member)
        except tarfile.TarError as err:
            raise InvalidRequest(f"image layer {label} is not a valid tar archive: {err}") from err
        except EOFError as err:
            raise InvalidRequest(f"image layer {label} is truncated") from err

    def _member(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        parts = split_name(m.name)
        if not parts:
            return  # the root itself ("./"): its owner and mode are Shoal's
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise InvalidRequest(f"image has more than {self.limits.max_entries} entries")
        base = parts[-1]
        if base.startswith(WHITEOUT):
            self._whiteout(parts[:-1], base)
            return
        if m.ischr() or m.isblk():
            raise InvalidRequest(f"image layer holds a device node {m.name!r}: refused (devices come from "
                                 "the sandbox's /dev, never from an image)")
        if not (m.isreg() or m.isdir() or m.issym() or m.islnk() or m.isfifo()):
            raise InvalidRequest(f"image layer entry {m.name!r} has an unsupported type {m.type!r}")
        uid, gid = m.uid, m.gid
        if not (0 <= uid < self.uid_count and 0 <= gid < self.uid_count):
            raise InvalidRequest(f"image layer entry {m.name!r} is owned by {uid}:{gid}, outside the "
                                 f"sandbox's {self.uid_count} ids")
        found = self._open_dir(parts[:-1], create=True)
        assert found is not None
        dfd, resolved = found
        path = (*resolved, base)
        self._this_layer.add(path)
        hid, hgid = uid + self.uid_base, gid + self.uid_base
        mode = m.mode & 0o7777
        if m.isdir():
            try:
                st = os.lstat(base, dir_fd=dfd)
            except FileNotFoundError:
                st = None
            if st is None or not stat.S_ISDIR(st.st_mode):
                if st is not None:
                    self._remove(dfd, base)
                    found = self._open_dir(parts[:-1], create=True)
                    assert found is not None
                    dfd = found[0]
                os.mkdir(base, 0o700, dir_fd=dfd)
            fd = os.open(base, _DIR_FLAGS, dir_fd=dfd)
            try:
                self._own(fd, hid, hgid, mode, m)
            finally:
                os.close(fd)
            self._dir_times[path] = int(m.mtime)
            return
        self._remove(dfd, base)
        found = self._open_dir(parts[:-1], create=True)  # _remove forgot the cached fds
        assert found is not None
        dfd = found[0]
        if m.isreg():
            self._file(tar, m, dfd, base, hid, hgid, mode)
        elif m.issym():
            os.symlink(m.linkname, base, dir_fd=dfd)
            os.chown(base, hid, hgid, dir_fd=dfd, follow_symlinks=False)
            os.utime(base, ns=(int(m.mtime) * 10**9,) * 2, dir_fd=dfd, follow_symlinks=False)
        elif m.islnk():
            self._hardlink(m, dfd, base)
        else:  # FIFO
            os.mkfifo(base, 0o600, dir_fd=dfd)
            fd = os.open(base, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            try:
                self._own(fd, hid, hgid, mode, m)
                os.utime(fd, ns=(int(m.mtime) * 10**9,) * 2)
            finally:
                os.close(fd)

    def _file(self, tar: tarfile.TarFile, m: tarfile.TarInfo, dfd: int, base: str, uid: int, gid: int,
              mode: int) -> None:
        fd = os.open(base, _NEW_FILE, 0o600, dir_fd=dfd)
        try:
            source = tar.extractfile(m)
            if source is not None:
                left = m.size
                while left > 0:
                    chunk = source.read(min(_CHUNK, left))
                    if not chunk:
                        raise InvalidRequest(f"image layer is truncated inside {m.name!r}")
                    left -= len(chunk)
                    self.total_bytes += len(chunk)
                    if self.total_bytes > self.limits.max_total_bytes:
                        raise InvalidRequest(f"image unpacks to more than {self.limits.max_total_bytes} bytes "
                                             f"(at {m.name!r})")
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
            self._own(fd, uid, gid, mode, m)
            os.utime(fd, ns=(int(m.mtime) * 10**9,) * 2)
        finally:
            os.close(fd)

    def _own(self, fd: int, uid: int, gid: int, mode: int, m: tarfile.TarInfo) -> None:
        """Owner, then mode (a chown clears set-uid/set-gid), then xattrs (it clears capabilities too)."""
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        for key, value in m.pax_headers.items():
            if not key.startswith(_XATTR_PREFIX):
                continue
            name = key[len(_XATTR_PREFIX):]
            if not (name.startswith("user.") or name == _CAPS):
                self.skipped_xattrs += 1
                continue
            data = value.encode("utf-8", "surrogateescape")
            if name == _CAPS:
                data = _v3_caps(data, self.uid_base)
            try:
                os.setxattr(fd, name, data)
            except OSError as err:
                raise InvalidRequest(f"image layer entry {m.name!r}: cannot set xattr {name}: "
                                     f"{err.strerror}") from err

    def _hardlink(self, m: tarfile.TarInfo, dfd: int, base: str) -> None:
        target = split_name(m.linkname)
        if not target:
            raise InvalidRequest(f"image layer hard link {m.name!r} points at the root")
        found = self._open_dir(target[:-1], create=False)
        if found is None:
            raise InvalidRequest(f"image layer hard link {m.name!r} points at {m.linkname!r}, which does not exist")
        sfd = found[0]
        try:
            st = os.lstat(target[-1], dir_fd=sfd)
        except FileNotFoundError as err:
            raise InvalidRequest(f"image layer hard link {m.name!r} points at {m.linkname!r}, "
                                 "which does not exist") from err
        if stat.S_ISDIR(st.st_mode):
            raise InvalidRequest(f"image layer hard link {m.name!r} points at a directory")
        os.link(target[-1], base, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)

    def _whiteout(self, parent: list[str], base: str) -> None:
        """``.wh.<name>``: delete ``<name>`` of lower layers; ``.wh..wh..opq``: delete every child of
        lower layers (entries of this same layer stay, in whatever order the tar lists them)."""
        found = self._open_dir(parent, create=False)
        if found is None:
            return
        dfd, resolved = found
        if base == OPAQUE:
            names = [n for n in os.listdir(dfd) if (*resolved, n) not in self._this_layer]
        elif base.startswith(WHITEOUT + WHITEOUT):
            return  # other AUFS metadata (.wh..wh.plnk): no meaning in OCI
        else:
            name = base[len(WHITEOUT):]
            split_name(name)
            names = [] if (*resolved, name) in self._this_layer else [name]
        for name in names:
            self._remove(dfd, name)
            found = self._open_dir(parent, create=False)
            if found is None:
                return
            dfd = found[0]

    def ensure_dir(self, parts: list[str], mode: int) -> None:
        """A directory Shoal needs (a mount point, the working directory): made root-owned with
        ``mode`` if the image lacks it, left as the image made it otherwise."""
        found = self._open_dir(parts[:-1], create=True)
        assert found is not None
        dfd = found[0]
        try:
            os.mkdir(parts[-1], 0o700, dir_fd=dfd)
        except FileExistsError:
            return
        os.chown(parts[-1], self.uid_base, self.uid_base, dir_fd=dfd, follow_symlinks=False)
        os.chmod(parts[-1], mode, dir_fd=dfd, follow_symlinks=False)

    def write_file(self, parts: list[str], data: bytes) -> None:
        """Write a root-owned 0644 file of Shoal's at ``parts`` (replacing what the image put there)."""
        found = self._open_dir(parts[:-1], create=True)
        assert found is not None
        self._remove(found[0], parts[-1])
        found = self._open_dir(parts[:-1], create=True)
        assert found is not None
        fd = os.open(parts[-1], _NEW_FILE, 0o600, dir_fd=found[0])
        try:
            os.write(fd, data)
            os.fchown(fd, self.uid_base, self.uid_base)
            os.fchmod(fd, 0o644)
        finally:
            os.close(fd)

    def finish(self) -> None:
        """Set directory mtimes last (adding entries changed them)."""
        self._forget_dirs()
        for path, mtime in sorted(self._dir_times.items(), key=lambda item: -len(item[0])):
            try:
                fd = self._walk_plain(list(path))
            except OSError:
                continue  # removed by a later layer
            try:
                os.utime(fd, ns=(mtime * 10**9,) * 2)
            finally:
                os.close(fd)
