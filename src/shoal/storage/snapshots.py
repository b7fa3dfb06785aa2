"""Snapshot images on the host: a frozen sandbox's writable layer made into a read-only EROFS lower.

Layout::

    <state>/snapshots/<id>/layer.erofs   the upper tree of the sandbox (lz4 EROFS, owners as they are:
                                         already in the sandboxes' uid range, like a template's)
    <state>/snapshots/<id>/meta.json     what the snapshot stacks on (template, digest, parent snapshot)
    <state>/snapshots/.tmp-<id>/         a snapshot being written (never visible under its id)
    <run>/snapshots/<id>/                the image, mounted read-only once per host (nosuid, nodev)

Why EROFS of the *upper* tree rather than a copy of the merged tree: the upper holds only what the
sandbox changed, overlayfs's own whiteouts (char 0/0 devices) and opaque directories
(``trusted.overlay.opaque``) included, and ``mkfs.erofs`` keeps both, so the image stacks as a middle
lower (``lowerdir=snap2:snap1:template``) and means exactly what the upper meant.

The tree is the sandbox's, hence hostile: the host never walks it. ``mkfs.erofs`` reads it with
``lstat``/``readlink`` (it never follows a symlink), from a directory fd opened with ``O_NOFOLLOW``; the
sandbox is frozen meanwhile, so nothing in it changes under the reader. A crash half-way leaves only
a ``.tmp-`` directory, which ``sweep`` removes: an id's directory appears by one ``rename``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import stat
import subprocess
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from shoal.errors import Conflict, RuntimeFailure, from_errno
from shoal.images.usage import overlays_on
from shoal.locks import file_lock
from shoal.runtime.linux import mounts
from shoal.settings import Settings

IMAGE_NAME = "layer.erofs"
META_NAME = "meta.json"
TEMP_PREFIX = ".tmp-"
#: mkfs.erofs of a sandbox's layer (at most its disk size) must finish within this (the sandbox is frozen).
MKFS_TIMEOUT = 300.0
#: ``auto`` (default), ``lz4`` or ``none``. mkfs.erofs 1.5's lz4 costs ~10x the time on incompressible
#: data (100 MB of random bytes: 2.3 s against 0.2 s uncompressed), and that is time the sandbox stays
#: frozen; ``auto`` samples the files first (``choose_compression``) and compresses only what pays.
COMPRESSION = os.environ.get("SHOAL_SNAPSHOT_COMPRESSION", "auto")
#: ``auto`` compresses when zlib level 1 shrinks the sampled bytes below this fraction: lz4 saves less than
#: zlib, so above it lz4 would spend seconds to save a few percent of host disk.
COMPRESS_BELOW = 0.85
#: ``auto`` reads one chunk of this size per stride of file data...
SAMPLE_BYTES = 16 * 1024
#: ...at most this many chunks (a 16 MiB budget of reads whatever the tree).
MAX_SAMPLES = 256


class SnapshotImages:
    """Where snapshot images live and how they are written, mounted and removed."""

    def __init__(self, settings: Settings) -> None:
        self.dir = settings.state_dir / "snapshots"
        self.mounts_dir = settings.run_dir / "snapshots"

    def path(self, snapshot_id: str) -> Path:
        return self.dir / snapshot_id

    def image(self, snapshot_id: str) -> Path:
        return self.dir / snapshot_id / IMAGE_NAME

    def mount_point(self, snapshot_id: str) -> Path:
        return self.mounts_dir / snapshot_id

    # --- writing ---------------------------------------------------------------------------------
    def write(self, upper: Path, snapshot_id: str, meta: dict[str, object], mkfs: str | None = None,
              max_bytes: int | None = None) -> int:
        """Make ``upper`` (the overlay's upper directory of a frozen sandbox) into the snapshot's image;
        return its size. The snapshot's directory appears whole (temp dir + rename) or not at all.
        ``max_bytes``: the most file data (apparent sizes) the image may hold; see ``apparent_size``."""
        mkfs = mkfs or shutil.which("mkfs.erofs")
        if not mkfs:
            raise RuntimeFailure("mkfs.erofs not found on the host; install it with: apt-get install erofs-utils",
                                 step="snapshot")
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        tmp = self.dir / f"{TEMP_PREFIX}{snapshot_id}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        try:
            fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeFailure(f"the writable layer is not there: {exc.strerror}", "snapshot") from exc
        try:
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                raise RuntimeFailure("the writable layer is not a directory", "snapshot")
            tree = survey(fd, max_bytes)
            if max_bytes is not None and tree.size > max_bytes:
                raise Conflict(f"the sandbox's files are larger than {max_bytes} bytes as a snapshot copies "
                                       "them (sparse files are copied whole): remove or truncate them first")
            out = tmp / IMAGE_NAME
            returncode, output = _run_mkfs([mkfs, *tree.mkfs_flags(), "--quiet", str(out), f"/proc/self/fd/{fd}"],
                                           fd, out)
            if returncode != 0:
                lines = output.strip().splitlines()
                raise RuntimeFailure(f"mkfs.erofs failed with exit code {returncode}: "
                                     f"{lines[-1] if lines else 'no output'}", "snapshot")
            with open(out, "rb") as f:
                os.fsync(f.fileno())
            size = out.stat().st_size
            (tmp / META_NAME).write_text(json.dumps({**meta, "size_bytes": size}) + "\n")
            _fsync_dir(tmp)
            os.rename(tmp, self.path(snapshot_id))
            _fsync_dir(self.dir)
            return size
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            os.close(fd)

    # --- mounting --------------------------------------------------------------------------------
    def mount(self, snapshot_id: str) -> Path:
        """Mount the image read-only once per host (again after a reboot); return the mount point."""
        point = self.mount_point(snapshot_id)
        if mounts.is_mounted(point):
            return point
        self.mounts_dir.mkdir(parents=True, exist_ok=True)
        with file_lock(self.mounts_dir / f".{snapshot_id}.lock"):
            if mounts.is_mounted(point):
                return point
            image = self.image(snapshot_id)
            if not image.is_file():
                raise RuntimeFailure(f"the image of snapshot {snapshot_id} is gone from the host", "mount snapshot")
            point.mkdir(exist_ok=True)
            try:
                mounts.mount(image, point, "erofs", mounts.MS_RDONLY | mounts.MS_NOSUID | mounts.MS_NODEV)
            except OSError as exc:
                raise RuntimeFailure(f"mounting snapshot {snapshot_id} failed: {exc.strerror}",
                                     "mount snapshot") from exc
        return point

    def remove(self, snapshot_id: str) -> None:
        """Unmount and delete the snapshot; ``Conflict`` while an overlay still stacks on it."""
        point = self.mount_point(snapshot_id)
        with file_lock(self.mounts_dir / f".{snapshot_id}.lock"):
            users = overlays_on(point) if mounts.is_mounted(point) else []
            if users:
                raise Conflict(f"snapshot {snapshot_id} is in use by {len(users)} sandbox overlay(s)")
            try:
                mounts.umount(point, strict=True)
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    raise Conflict(f"snapshot {snapshot_id} is in use by a sandbox") from exc
                raise from_errno(exc, f"unmount snapshot {snapshot_id}") from exc
            with contextlib.suppress(OSError):
                point.rmdir()
            shutil.rmtree(self.path(snapshot_id), ignore_errors=True)

    # --- recovery --------------------------------------------------------------------------------
    def on_disk(self) -> set[str]:
        """Ids of the whole snapshots on the host (temp directories excluded)."""
        try:
            return {e.name for e in os.scandir(self.dir) if not e.name.startswith(".") and e.is_dir()}
        except OSError:
            return set()

    def sweep_temp(self) -> list[str]:
        """Remove what crashed snapshots left (``.tmp-`` directories); only under the exclusive reconcile
        lock, which every snapshot in progress holds shared."""
        gone = []
        try:
            entries = [e for e in os.scandir(self.dir) if e.name.startswith(TEMP_PREFIX)]
        except OSError:
            return gone
        for e in entries:
            shutil.rmtree(e.path, ignore_errors=True)
            gone.append(e.name)
        return gone


@dataclass
class Survey:
    """What ``mkfs.erofs`` would read from a tree: ``size``, regular files' apparent sizes (each inode once),
    and a sample of their bytes (``raw``) with its zlib level-1 size (``packed``)."""

    size: int = 0
    raw: int = 0
    packed: int = 0

    def compressible(self) -> bool:
        """Whether lz4 pays: a small sample (a small tree) costs little either way."""
        return self.raw < 64 * 1024 or self.packed < self.raw * COMPRESS_BELOW

    def mkfs_flags(self) -> list[str]:
        """``mkfs.erofs`` compression flags, per ``COMPRESSION``."""
        if COMPRESSION == "none" or (COMPRESSION == "auto" and not self.compressible()):
            return []
        return ["-zlz4"]


def survey(dir_fd: int, stop_after: int | None = None) -> Survey:
    """One walk of the tree at ``dir_fd``: its size and, for ``COMPRESSION=auto``, a compressibility sample.

    Size first: a sparse file holds little on disk and terabytes to a reader, which would keep the sandbox
    frozen and a daemon thread busy until the timeout; so the walk stops once past ``stop_after``.
    Samples: one chunk per stride of file data (a file holding most of the bytes holds most of the
    samples), compressed with zlib level 1; random bytes, media and archives are stored as they are.

    The tree is the sandbox's (frozen, hostile): walked with directory fds and ``lstat`` only (no link is
    followed); a file is opened relative to its directory's fd with ``O_NOFOLLOW | O_NONBLOCK`` (a FIFO
    never blocks the host) and read only if it is a regular file."""
    out, seen = Survey(), set()
    stride = max(1 << 20, (stop_after or 1 << 30) // MAX_SAMPLES)
    next_sample = 0
    sampling = COMPRESSION == "auto"
    for _, _, files, root_fd in os.fwalk(".", dir_fd=dir_fd, follow_symlinks=False):
        for name in files:
            try:
                st = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            start, out.size = out.size, out.size + st.st_size
            if stop_after is not None and out.size > stop_after:
                return out
            if not sampling or next_sample >= out.size:
                continue
            offsets = []
            while next_sample < out.size and len(offsets) < 8:
                offsets.append(max(0, min(next_sample - start, st.st_size - SAMPLE_BYTES)))
                next_sample += stride
            next_sample = max(next_sample, -(-out.size // stride) * stride)  # a huge file: 8 samples at most
            chunk = _read_chunks(name, root_fd, offsets)
            out.raw += len(chunk)
            out.packed += len(zlib.compress(chunk, 1))
            sampling = out.raw < MAX_SAMPLES * SAMPLE_BYTES
    return out


#: While mkfs.erofs runs, what it has written so far is sent to the disk this often, so that the fsync
#: after it has little left to wait for (100 MB: the fsync alone was ~85 ms after a 180 ms mkfs).
WRITEBACK_EVERY = 0.02
_SYNC_FILE_RANGE_WRITE = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def _run_mkfs(argv: list[str], dir_fd: int, out: Path) -> tuple[int, str]:
    """Run mkfs.erofs (reading the tree at ``dir_fd``), starting the writeback of ``out`` as it grows;
    return its exit code and output. ``RuntimeFailure`` after ``MKFS_TIMEOUT``."""
    deadline = time.monotonic() + MKFS_TIMEOUT
    proc = subprocess.Popen(argv, pass_fds=(dir_fd,), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    image_fd = -1
    try:
        while True:
            try:
                output, _ = proc.communicate(timeout=WRITEBACK_EVERY)
                return proc.returncode, output.decode(errors="replace")
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() >= deadline:
                raise RuntimeFailure(f"mkfs.erofs took longer than {MKFS_TIMEOUT:.0f} s", "snapshot")
            if image_fd < 0:
                with contextlib.suppress(OSError):
                    image_fd = os.open(out, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            if image_fd >= 0:
                _libc.sync_file_range(image_fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # start writeback, never wait
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if image_fd >= 0:
            os.close(image_fd)


def _read_chunks(name: str, dir_fd: int, offsets: list[int]) -> bytes:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return b""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        return b"".join(os.pread(fd, SAMPLE_BYTES, off) for off in offsets)
    except OSError:
        return b""
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
