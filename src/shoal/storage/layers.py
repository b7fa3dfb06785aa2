"""A sandbox's writable layer: ``disk`` (an ext4 image on the host's disk) or ``ram`` (a tmpfs).

Why an ext4 image on a loop device for ``disk``:

* the kernel enforces the size: a full layer gives the writer ENOSPC, and nothing else happens
  (a tmpfs is charged to the sandbox's memory cgroup, so filling it made the OOM killer act);
* the host's filesystem here has no project quotas (``/`` is ext4 without ``prjquota``), so a quota'd
  directory is not available, and a directory would not let a snapshot freeze the layer as one file;
* the image is one file under the state directory: it outlives the daemon, the loop device, the mount
  and a reboot, and a later snapshot can turn it into an EROFS lower without walking a live tree.

Creating one must not slow ``create`` down: ``mkfs.ext4`` runs once per size (lazy inode tables and
journal, so ~10 ms), and every sandbox then gets a sparse copy of that pristine image (holes stay
holes; a fresh 1 GiB image holds < 1 MiB of data). The loop device is configured with one ioctl
(``LOOP_CONFIGURE``, direct I/O, auto-clear: it disappears with its last user, so a crash between
attaching and mounting leaks nothing).

Nothing here reads what a sandbox wrote: the host mounts the image (written only by the kernel's
ext4 on the sandbox's behalf; the sandbox has no block device) and only ever creates the layer's own
top-level directories, never a path inside the sandbox's tree.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import secrets
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from shoal.errors import Conflict, RuntimeFailure
from shoal.runtime.linux import mounts
from shoal.settings import Settings
from shoal.storage.ready_layers import ReadyLayers

DISK = "disk"
RAM = "ram"
KINDS = (DISK, RAM)
DEFAULT_KIND = DISK

LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_DIRECT_IO = 16
#: Seconds a resume waits for the loop device of its layer's last mount to be detached (see ``mount``).
RESUME_WAIT = 2.0
#: struct loop_config: fd, block_size, struct loop_info64 (232 bytes), 8 reserved u64.
_LOOP_CONFIG = struct.Struct("=II" + "QQQQQIIII64s64s32sQQ" + "8Q")
EXT4_OPTIONS = "noinit_itable,errors=remount-ro"
#: Ready copies of the pristine image kept per size (a few MiB of host disk each at most).
SPARES = 2


@dataclass(frozen=True)
class DiskUsage:
    """Bytes used and total of a mounted writable layer (what ``df`` inside the sandbox would show)."""

    used: int
    total: int


class WritableLayers:
    """Where the ``disk`` layers' images live, and how a layer of either kind is mounted and removed."""

    def __init__(self, settings: Settings) -> None:
        self.dir = settings.state_dir / "layers"
        self.pristine_dir = self.dir / "pristine"
        self._refill_lock = threading.Lock()
        #: fresh layers mounted ahead of time (``ready_layers``): a create moves one into place
        self.ready = ReadyLayers(self, self.dir, settings.run_dir / "layers-ready", settings.uid_base)

    def image(self, sandbox_id: str) -> Path:
        return self.dir / f"{sandbox_id}.ext4"

    def has_files(self, sandbox_id: str) -> bool:
        """True if the sandbox has a ``disk`` layer on the host (it can start again from its files)."""
        return self.image(sandbox_id).is_file()

    # --- making ------------------------------------------------------------------------------
    def create_image(self, sandbox_id: str, size_mb: int) -> Path:
        """A fresh, empty ext4 image of ``size_mb`` for the sandbox (replacing any stale one)."""
        target = self.image(sandbox_id)
        self.copy_pristine(size_mb, target)
        return target

    def copy_pristine(self, size_mb: int, target: Path) -> None:
        """Put a fresh, empty ext4 image of ``size_mb`` at ``target`` (a spare if one is ready)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        spare = self._claim_spare(size_mb)
        if spare is not None:
            os.replace(spare, target)
        else:
            tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            _sparse_copy(self._pristine(size_mb), tmp)
            os.replace(tmp, target)  # never a half-copied image under the sandbox's name
        threading.Thread(target=self._refill, args=(size_mb,), name="shoal-layer-spares", daemon=True).start()

    def _claim_spare(self, size_mb: int) -> Path | None:
        """Take a ready copy of the pristine image (``rename`` makes the claim atomic across processes)."""
        try:
            names = [e.name for e in os.scandir(self.pristine_dir) if e.name.startswith(f"spare-{size_mb}m-")]
        except OSError:
            return None
        for name in names:
            mine = self.dir / f".claimed-{os.getpid()}-{threading.get_ident()}.ext4"
            try:
                os.rename(self.pristine_dir / name, mine)
            except FileNotFoundError:
                continue  # another creator took it
            return mine
        return None

    def _refill(self, size_mb: int) -> None:
        """Keep ``SPARES`` copies of this size ready, so the next creates only rename one (off their path)."""
        try:
            with self._refill_lock:
                have = [e for e in os.scandir(self.pristine_dir) if e.name.startswith(f"spare-{size_mb}m-")]
                for _ in range(SPARES - len(have)):
                    tmp = self.pristine_dir / f".spare-{size_mb}m-{secrets.token_hex(6)}.tmp"
                    _sparse_copy(self._pristine(size_mb), tmp)
                    os.replace(tmp, self.pristine_dir / tmp.name[1:-4])
        except OSError:
            pass  # no spare this time: the next create copies the pristine image itself

    def _pristine(self, size_mb: int) -> Path:
        """The empty ext4 image of this size, made once (concurrent makers each rename a whole one in)."""
        path = self.pristine_dir / f"{size_mb}m.ext4"
        if path.is_file():
            return path
        self.pristine_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as f:
            f.truncate(size_mb * 1024 * 1024)
        # -m 0: no blocks reserved for root (sandbox root is not host root anyway); lazy init: the image
        # stays sparse and mkfs takes milliseconds; the journal is kept so a host crash replays, not loses.
        proc = subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E",
                               "lazy_itable_init=1,lazy_journal_init=1,nodiscard", str(tmp)],
                              capture_output=True, text=True, timeout=120,
                              env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeFailure(f"mkfs.ext4 failed: {proc.stderr.strip()[-300:]}", "writable layer")
        os.replace(tmp, path)
        return path

    # --- mounting ----------------------------------------------------------------------------
    def mount(self, kind: str, sandbox_id: str, size_mb: int, target: Path, *, fresh: bool) -> None:
        """Mount the sandbox's layer on ``target``; ``fresh`` makes a new empty one, else its files are used."""
        if kind == RAM:
            mounts.mount("tmpfs", target, "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV, f"size={size_mb}m,mode=0755")
            return
        if fresh:  # a new image: no loop device can hold it yet
            if self.ready.take(size_mb, self.image(sandbox_id), target):
                return
            self.mount_image(self.create_image(sandbox_id, size_mb), target)
            return
        image = self.image(sandbox_id)
        if not image.is_file():
            raise RuntimeFailure(f"the files of sandbox {sandbox_id} are gone from the host", "writable layer",
                                 sandbox_id)
        # Two ext4 mounts of one image would corrupt it. After the pause's unmount the kernel detaches the
        # auto-clearing device on a work queue: a resume right behind it waits for that, not refuses.
        if not loop_released(image, RESUME_WAIT):
            raise Conflict(f"the files of sandbox {sandbox_id} are still mounted (a lazy unmount has not finished)")
        self.mount_image(image, target)

    @staticmethod
    def mount_image(image: Path, target: Path) -> None:
        """Attach ``image`` to a loop device and mount its ext4 on ``target`` (layers and volumes alike)."""
        fd = os.open(image, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            device, dev_fd = attach_loop(fd)
        finally:
            os.close(fd)
        try:
            mounts.mount(device, target, "ext4", mounts.MS_NOSUID | mounts.MS_NODEV, EXT4_OPTIONS)
        finally:
            # The mount holds the device now; our open was its only other user, so with auto-clear the
            # device goes away by itself when the filesystem is unmounted (or right now if mount failed).
            os.close(dev_fd)

    @staticmethod
    def unmount(target: Path) -> None:
        """Unmount a layer for good: strictly (a lazy unmount could leave the image mounted while a later
        resume mounts it again), after a sync so its data is on disk before the call returns."""
        if not mounts.is_mounted(target):
            return
        fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
            _syncfs(fd)
        finally:
            os.close(fd)
        for attempt in range(100):  # EBUSY while a short-lived helper forked elsewhere still holds an fd
            try:
                mounts.umount(target, strict=True)
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY or attempt == 99:
                    raise
                time.sleep(0.01)

    def remove(self, sandbox_id: str) -> None:
        self.image(sandbox_id).unlink(missing_ok=True)

    def existing(self) -> set[str]:
        """Ids of sandboxes whose ``disk`` layer image is on the host."""
        try:
            return {e.name[:-5] for e in os.scandir(self.dir)
                    if e.name.endswith(".ext4") and not e.name.startswith(".") and e.is_file()}
        except OSError:
            return set()

    @staticmethod
    def usage(target: Path) -> DiskUsage | None:
        """Used and total bytes of the mounted layer at ``target`` (``None`` if it is not mounted)."""
        try:
            if os.stat(target).st_dev == os.stat(target.parent).st_dev:  # not a mount point (cheaper than mountinfo)
                return None
            st = os.statvfs(target)
        except OSError:
            return None
        total = st.f_blocks * st.f_frsize
        return DiskUsage(used=total - st.f_bfree * st.f_frsize, total=total)


# --- loop devices ------------------------------------------------------------------------------
def attach_loop(fd: int) -> tuple[str, int]:
    """Bind a free loop device to the open image ``fd``; return its path and an open fd of it, which the
    caller closes once the device is mounted (auto-clear detaches it at its last close). Retries when
    another process takes the device between ``LOOP_CTL_GET_FREE`` and ``LOOP_CONFIGURE``."""
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(16):
            number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            device = f"/dev/loop{number}"
            dev = os.open(device, os.O_RDWR | os.O_CLOEXEC)
            config = _LOOP_CONFIG.pack(fd, 0, 0, 0, 0, 0, 0, 0, 0, 0, LO_FLAGS_AUTOCLEAR | LO_FLAGS_DIRECT_IO,
                                       b"", b"", b"", 0, 0, *([0] * 8))
            try:
                fcntl.ioctl(dev, LOOP_CONFIGURE, config)
            except OSError as exc:
                os.close(dev)
                if exc.errno == errno.EBUSY:
                    continue
                raise
            return device, dev
    finally:
        os.close(ctl)
    raise RuntimeFailure("no free loop device (every one was taken while we asked)", "writable layer")


def loop_backing(image: Path) -> list[str]:
    """Loop devices whose backing file is ``image`` (``/sys/block/loopN/loop/backing_file``)."""
    found = []
    want = str(image)
    try:
        entries = list(os.scandir("/sys/block"))
    except OSError:
        return found
    for e in entries:
        if not e.name.startswith("loop"):
            continue
        try:
            with open(f"/sys/block/{e.name}/loop/backing_file") as f:
                backing = f.read().strip()
        except OSError:
            continue
        if backing == want or backing.removesuffix(" (deleted)") == want:
            found.append(f"/dev/{e.name}")
    return found


def loop_released(image: Path, wait: float) -> bool:
    """Whether no loop device holds ``image``, waiting up to ``wait`` seconds for one to let it go (a
    sandbox being torn down; or the kernel detaching an auto-clearing device just after an unmount)."""
    deadline = time.monotonic() + wait
    while loop_backing(image):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


_libc = ctypes.CDLL(None, use_errno=True)


def _syncfs(fd: int) -> None:
    if _libc.syncfs(fd) != 0:
        no = ctypes.get_errno()
        raise OSError(no, f"syncfs: {os.strerror(no)}")


def _sparse_copy(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` keeping holes (SEEK_DATA/SEEK_HOLE + copy_file_range)."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        fout.truncate(size)
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fin.fileno(), offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole is left
                    break
                raise
            end = os.lseek(fin.fileno(), start, os.SEEK_HOLE)
            pos = start
            while pos < end:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), end - pos, pos, pos)
                if n == 0:
                    break
                pos += n
            offset = end
