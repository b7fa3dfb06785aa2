"""mount(2) and umount2(2) through libc, and reading the host's mount table.

Why not mount(8): it silently sets up a loop device for a file-backed EROFS image (12 ms cold
instead of 1.4 ms straight from the file, see host-facts), and it forks a process per call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
import threading
from collections.abc import Sequence
from pathlib import Path

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
CLONE_FS = 0x00000200

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]


def mount(source: str | os.PathLike, target: str | os.PathLike, fstype: str, flags: int = 0,
          data: str = "") -> None:
    """Mount ``source`` on ``target``; raise OSError with the kernel's errno on failure."""
    rc = _libc.mount(os.fsencode(source), os.fsencode(target), fstype.encode(), flags,
                     data.encode() if data else None)
    if rc != 0:
        no = ctypes.get_errno()
        raise OSError(no, f"mount {fstype} on {target}: {os.strerror(no)}")


def move(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the mount at ``source`` onto ``target`` (``MS_MOVE``: the mounts here are private)."""
    mount(source, target, "", MS_MOVE)


def mount_overlay(target: Path, lower: Path | Sequence[Path], upper: Path, work: Path, cwd: Path) -> None:
    """Mount an overlay whose options name its layers relative to ``cwd``.

    The options are what ``/proc/self/mountinfo`` shows, inside the sandbox too: absolute paths would
    tell sandbox code where the host keeps its state. The kernel resolves relative layer paths
    against the caller's working directory, which is process-wide: the mount runs in a short thread
    that first takes a private copy of it (``unshare(CLONE_FS)``), so no other thread of the daemon
    ever sees a changed directory.
    """
    lowers = [lower] if isinstance(lower, str | os.PathLike) else list(lower)  # several: top first
    named = [*(("lowerdir", p) for p in lowers), ("upperdir", upper), ("workdir", work)]
    for _, path in named:
        if any(c in os.path.relpath(path, cwd) for c in ",:\\"):  # the option syntax's own separators
            raise OSError(errno.EINVAL, f"overlay layer path {path!s} cannot be named in mount options")
    rel = {"lowerdir": ":".join(os.path.relpath(p, cwd) for p in lowers), "upperdir": os.path.relpath(upper, cwd),
           "workdir": os.path.relpath(work, cwd)}
    data = ",".join(f"{k}={v}" for k, v in rel.items())
    box: list[BaseException] = []

    def run() -> None:
        try:
            if _libc.unshare(CLONE_FS) != 0:
                no = ctypes.get_errno()
                raise OSError(no, f"unshare(CLONE_FS): {os.strerror(no)}")
            os.chdir(cwd)
            mount("overlay", os.path.relpath(target, cwd), "overlay", 0, data)
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            box.append(exc)

    thread = threading.Thread(target=run, name="shoal-overlay-mount")
    thread.start()
    thread.join()
    if box:
        raise box[0]


def umount(target: str | os.PathLike, lazy: bool = False, strict: bool = False) -> bool:
    """Unmount ``target``; return False if nothing was mounted there (EINVAL/ENOENT).

    A busy mount is detached lazily unless ``strict``, where EBUSY reaches the caller (for whom
    "busy" is information, e.g. a template still under sandboxes)."""
    rc = _libc.umount2(os.fsencode(target), MNT_DETACH if lazy else 0)
    if rc == 0:
        return True
    no = ctypes.get_errno()
    if no in (errno.EINVAL, errno.ENOENT):  # not a mount point, or gone: already clean
        return False
    if no == errno.EBUSY and not lazy and not strict:
        return umount(target, lazy=True)
    raise OSError(no, f"umount {target}: {os.strerror(no)}")


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mounts_under(prefix: Path) -> list[Path]:
    """Every mount point at or below ``prefix``, deepest first (the order to unmount them in)."""
    base = str(prefix).rstrip("/")
    found: list[Path] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = _unescape(line.split()[4])
            if point == base or point.startswith(base + "/"):
                found.append(Path(point))
    found.sort(key=lambda p: len(p.parts), reverse=True)
    return found


def is_mounted(path: Path) -> bool:
    """True if ``path`` itself is a mount point.

    A directory on another device than its parent is a mount's root: two ``lstat`` calls answer the
    common case (a template's or snapshot's image, mounted), where reading ``/proc/self/mountinfo``
    costs ~10 µs per mount on the host, i.e. milliseconds with many sandboxes, on every create. The same
    device (a bind mount of the same filesystem, or nothing mounted) is settled by mountinfo."""
    path = Path(path)
    try:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode) and st.st_dev != os.lstat(path / "..").st_dev:  # a directory: ".." is its parent
            return True
    except OSError:
        pass
    return path in mounts_under(path)


def umount_tree(prefix: Path) -> None:
    """Unmount everything at or below ``prefix`` (repeatedly, as stacked mounts may hide others)."""
    for _ in range(4):
        points = mounts_under(prefix)
        if not points:
            return
        for point in points:
            umount(point)
