"""Files inside the sandbox: read, write, list, stat, mkdir, move, remove.

Every path is resolved by the kernel inside the sandbox's own mount namespace and root, so
``..`` and symlinks can never lead to the host: the worst they reach is another sandbox path.
Writes go to a temporary file beside the target and are renamed over it only when complete, so
an interrupted upload never destroys the previous contents.
"""

from __future__ import annotations

import errno
import os
import stat as st
import time

from shoal.agent import protocol as p
from shoal.agent import users

_ERRNO_CODES = {
    errno.ENOENT: "not_found", errno.ENOTDIR: "invalid_argument", errno.EISDIR: "invalid_argument",
    errno.EEXIST: "already_exists", errno.ENOTEMPTY: "already_exists", errno.EACCES: "permission_denied",
    errno.EPERM: "permission_denied", errno.EROFS: "permission_denied", errno.ENOSPC: "resource_exhausted",
    errno.EDQUOT: "resource_exhausted", errno.ENOMEM: "resource_exhausted", errno.EMFILE: "resource_exhausted",
    errno.EINVAL: "invalid_argument", errno.ENAMETOOLONG: "invalid_argument", errno.ELOOP: "invalid_argument",
    errno.EXDEV: "invalid_argument",
}


def os_error(exc: OSError, path: str) -> dict:
    """The one errno → wire code translation for file operations."""
    return p.error_reply(_ERRNO_CODES.get(exc.errno or 0, "internal"), f"{path}: {exc.strerror or exc}")


def resolve(path: object, user: users.User) -> str:
    """A sandbox path: relative paths start at the user's home; NUL bytes are refused."""
    if not isinstance(path, str) or not path or "\0" in path:
        raise ValueError("path must be a non-empty string")
    return os.path.normpath(path if path.startswith("/") else os.path.join(user.home, path))


def _type_name(mode: int) -> str:
    if st.S_ISREG(mode):
        return "file"
    if st.S_ISDIR(mode):
        return "dir"
    if st.S_ISLNK(mode):
        return "symlink"
    return "other"


_names_cache: dict[str, dict[int, str]] = {}


def _name_of(kind: str, ident: int) -> str:
    table = _names_cache.get(kind)
    if table is None:
        table = {}
        try:
            with open("/etc/passwd" if kind == "user" else "/etc/group", encoding="utf-8", errors="replace") as f:
                for line in f:
                    parts = line.split(":")
                    if len(parts) > 2 and parts[2].isdigit():
                        table.setdefault(int(parts[2]), parts[0])
        except OSError:
            pass
        _names_cache[kind] = table
    return table.get(ident, str(ident))


#: File metadata lives in user xattrs under this prefix (as E2B's envd keeps it); the bounds hold both
#: for what clients set and for what is reported (sandbox code may set any xattr it likes).
META_PREFIX = "user.e2b."
META_MAX_KEYS, META_MAX_KEY, META_MAX_VALUE = 64, 200, 4096


def entry(path: str, s: os.stat_result | None = None) -> dict:
    """Everything a client wants to know about one path (never following a final symlink).

    A symlink also gets ``target``: the type of what it points to and its absolute path, resolved here,
    inside the sandbox (E2B reports those); the entry itself stays the link's."""
    s = s or os.lstat(path)
    info = {
        "name": os.path.basename(path) or "/", "path": path, "type": _type_name(s.st_mode),
        "size": s.st_size, "mode": st.S_IMODE(s.st_mode), "permissions": st.filemode(s.st_mode),
        "owner": _name_of("user", s.st_uid), "group": _name_of("group", s.st_gid),
        "uid": s.st_uid, "gid": s.st_gid, "modified": s.st_mtime,
    }
    if st.S_ISLNK(s.st_mode):
        try:
            info["symlink_target"] = os.readlink(path)
        except OSError:
            info["symlink_target"] = None
        try:
            info["target"] = {"type": _type_name(os.stat(path).st_mode), "path": os.path.realpath(path)}
        except (OSError, ValueError):
            pass  # dangling or a loop: no target to describe
    else:
        meta = read_metadata(path)
        if meta:
            info["metadata"] = meta
    return info


def read_metadata(path: str) -> dict[str, str]:
    """The ``user.e2b.*`` xattrs of ``path`` (prefix stripped), within the bounds; unreadable ones are skipped."""
    out: dict[str, str] = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return out
    for name in names:
        if not name.startswith(META_PREFIX) or len(out) >= META_MAX_KEYS:
            continue
        key = name[len(META_PREFIX):]
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
        if key and len(key) <= META_MAX_KEY and len(value) <= META_MAX_VALUE:
            out[key] = value.decode("utf-8", "replace")
    return out


def metadata_of(req: dict) -> dict[str, str] | None:
    """The request's ``metadata`` checked (the host checks it too): string keys and values within the bounds."""
    meta = req.get("metadata")
    if meta is None:
        return None
    if not isinstance(meta, dict) or len(meta) > META_MAX_KEYS:
        raise ValueError(f"metadata must map at most {META_MAX_KEYS} keys to strings")
    for k, v in meta.items():
        if not (isinstance(k, str) and isinstance(v, str) and 0 < len(k) <= META_MAX_KEY
                and len(v.encode()) <= META_MAX_VALUE and "\0" not in k):
            raise ValueError("invalid metadata key or value")
    return meta


def write_metadata(fd: int, meta: dict[str, str]) -> None:
    """Replace the ``user.e2b.*`` xattrs of the open file ``fd`` with ``meta`` (the caller's identity applies)."""
    for name in os.listxattr(fd):
        if name.startswith(META_PREFIX):
            os.removexattr(fd, name)
    for k, v in meta.items():
        os.setxattr(fd, META_PREFIX + k, v.encode())


class Identity:
    """Act with a sandbox user's file permissions in this thread only.

    ``setfsuid``/``setfsgid`` are per-thread system calls (the kernel also drops the file
    capabilities of a thread whose fsuid is not 0); supplementary groups use the raw ``setgroups``
    syscall, because glibc's wrapper would change them in every thread of the agent.
    """

    _libc = None
    _SETGROUPS = {"x86_64": 116, "aarch64": 159}

    def __init__(self, user: users.User) -> None:
        self.user = user

    def __enter__(self) -> None:
        if self.user.uid == 0 and self.user.gid == 0:
            return
        import ctypes
        if Identity._libc is None:
            Identity._libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc = Identity._libc
        groups = (ctypes.c_uint * max(1, len(self.user.groups)))(*self.user.groups)
        nr = self._SETGROUPS.get(os.uname().machine)
        if nr is not None:
            libc.syscall(nr, len(self.user.groups), groups)
        libc.setfsgid(self.user.gid)
        libc.setfsuid(self.user.uid)

    def __exit__(self, *exc: object) -> None:
        if self.user.uid == 0 and self.user.gid == 0:
            return
        import ctypes
        libc = Identity._libc
        libc.setfsuid(0)
        libc.setfsgid(0)
        nr = self._SETGROUPS.get(os.uname().machine)
        if nr is not None:
            zero = (ctypes.c_uint * 1)(0)
            libc.syscall(nr, 1, zero)


def _simple(sock, fn, req: dict | None = None) -> None:  # noqa: ANN001
    """Run ``fn() -> dict`` as the request's user and send its reply, translating the usual failures."""
    try:
        with Identity(_user(req or {})):
            reply = fn()
    except LookupError as exc:
        reply = p.error_reply("not_found", str(exc))
    except ValueError as exc:
        reply = p.error_reply("invalid_argument", str(exc))
    except OSError as exc:
        reply = os_error(exc, exc.filename or "")
    sock.sendall(p.message(reply))


def _user(req: dict) -> users.User:
    return users.lookup(req.get("user"))


def stat(sock, reader, req: dict) -> None:  # noqa: ANN001
    def run() -> dict:
        path = resolve(req.get("path"), _user(req))
        try:
            return {"ok": True, "entry": entry(path)}
        except OSError as exc:
            return os_error(exc, path)
    _simple(sock, run, req)


def list_dir(sock, reader, req: dict) -> None:  # noqa: ANN001
    def run() -> dict:
        path = resolve(req.get("path"), _user(req))
        depth = int(req.get("depth") or 1)
        if depth < 1:
            raise ValueError("depth must be at least 1")
        try:
            if not st.S_ISDIR(os.stat(path).st_mode):
                return p.error_reply("invalid_argument", f"{path}: not a directory")
        except OSError as exc:
            return os_error(exc, path)
        out: list[dict] = []
        _walk(path, depth, out)
        return {"ok": True, "entries": out}
    _simple(sock, run, req)


def _walk(path: str, depth: int, out: list[dict]) -> None:
    try:
        with os.scandir(path) as it:
            items = sorted(it, key=lambda e: e.name)
    except OSError:
        return
    for item in items:
        full = os.path.join(path, item.name)
        try:
            out.append(entry(full, item.stat(follow_symlinks=False)))
        except OSError:
            continue
        if depth > 1 and item.is_dir(follow_symlinks=False):
            _walk(full, depth - 1, out)


def mkdir(sock, reader, req: dict) -> None:  # noqa: ANN001
    def run() -> dict:
        user = _user(req)
        path = resolve(req.get("path"), user)
        try:
            if os.path.lexists(path):
                return p.error_reply("already_exists", f"{path}: already exists")
            if req.get("parents", True):
                _makedirs(path, user)
            else:
                os.mkdir(path)
                _own(path, user)
            return {"ok": True, "entry": entry(path)}
        except OSError as exc:
            return os_error(exc, path)
    _simple(sock, run, req)


def _makedirs(path: str, user: users.User) -> None:
    parent = os.path.dirname(path)
    if parent and parent != path and not os.path.isdir(parent):
        _makedirs(parent, user)
    try:
        os.mkdir(path)
        _own(path, user)
    except FileExistsError:
        if not os.path.isdir(path):
            raise


def _own(path: str, user: users.User) -> None:
    if user.uid != 0 or user.gid != 0:
        os.lchown(path, user.uid, user.gid)


def move(sock, reader, req: dict) -> None:  # noqa: ANN001
    def run() -> dict:
        user = _user(req)
        src, dst = resolve(req.get("src"), user), resolve(req.get("dst"), user)
        try:
            os.rename(src, dst)
            return {"ok": True, "entry": entry(dst)}
        except OSError as exc:
            return os_error(exc, src if exc.errno == errno.ENOENT and not os.path.lexists(src) else dst)
    _simple(sock, run, req)


def remove(sock, reader, req: dict) -> None:  # noqa: ANN001
    def run() -> dict:
        path = resolve(req.get("path"), _user(req))
        if path == "/":
            return p.error_reply("invalid_argument", "refusing to remove /")
        try:
            s = os.lstat(path)
            if st.S_ISDIR(s.st_mode):
                _rmtree(path)
            else:
                os.unlink(path)
            return {"ok": True}
        except OSError as exc:
            return os_error(exc, path)
    _simple(sock, run, req)


def _rmtree(path: str) -> None:
    with os.scandir(path) as it:
        items = list(it)
    for item in items:
        if item.is_dir(follow_symlinks=False):
            _rmtree(item.path)
        else:
            os.unlink(item.path)
    os.rmdir(path)


def read(sock, reader, req: dict) -> None:  # noqa: ANN001
    """``file.read``: a header MSG with the entry, DATA frames, then ``{"event": "eof"}``.

    At most ``entry.size`` bytes follow (up to EOF when the size is 0); the host must still count them,
    since sandbox root can answer in the agent's place."""
    try:
        user = _user(req)
        path = resolve(req.get("path"), user)
        with Identity(user):  # permission is checked at open; the open fd reads on
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except LookupError as exc:
        sock.sendall(p.message(p.error_reply("not_found", str(exc))))
        return
    except ValueError as exc:
        sock.sendall(p.message(p.error_reply("invalid_argument", str(exc))))
        return
    except OSError as exc:
        sock.sendall(p.message(os_error(exc, str(req.get("path")))))
        return
    try:
        s = os.fstat(fd)
        if st.S_ISDIR(s.st_mode):
            sock.sendall(p.message(p.error_reply("invalid_argument", f"{path}: is a directory")))
            return
        if not st.S_ISREG(s.st_mode):  # FIFOs and devices would block or never end
            sock.sendall(p.message(p.error_reply("invalid_argument", f"{path}: not a regular file")))
            return
        os.set_blocking(fd, True)
        sock.sendall(p.message({"ok": True, "entry": entry(path, s)}))
        chunk = 1024 * 1024
        # The bytes up to the size at open: a file that grows meanwhile (a log) is sent as it was, and
        # the transfer ends. Files that report size 0 (procfs, cgroupfs) have contents: read to EOF.
        left = s.st_size if s.st_size > 0 else -1
        while left:
            data = os.read(fd, chunk if left < 0 else min(chunk, left))
            if not data:
                break  # shorter than its size (truncated meanwhile, or a sysfs file): what there is
            if left > 0:
                left -= len(data)
            sock.sendall(p.frame(p.DATA, data))
        sock.sendall(p.message({"event": "eof"}))
    finally:
        os.close(fd)


def write(sock, reader: p.FrameReader, req: dict) -> None:  # noqa: ANN001
    """``file.write``: the host pipelines DATA frames and ``{"op": "eof"}`` after the request.

    On any failure the agent still reads up to the end marker, so the host always gets the one
    reply; the target is replaced only after the last byte is on disk.
    """
    try:
        user = _user(req)
    except LookupError as exc:
        _drain(reader)
        sock.sendall(p.message(p.error_reply("not_found", str(exc))))
        return
    with Identity(user):
        _write(sock, reader, req, user)


def _drain(reader: p.FrameReader) -> None:
    while True:
        got = reader.read()
        if got is None or (got[0] == p.MSG and p.loads(got[1]).get("op") == "eof"):
            return


def _write(sock, reader: p.FrameReader, req: dict, user: users.User) -> None:  # noqa: ANN001
    tmp = None
    fd = -1
    reply: dict | None = None
    path = str(req.get("path"))
    try:
        path = resolve(req.get("path"), user)
        meta = metadata_of(req)
        append = bool(req.get("append"))
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            if req.get("parents", True):
                _makedirs(parent, user)
            else:
                raise FileNotFoundError(errno.ENOENT, "parent directory does not exist", parent)
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        if append:
            existed = os.path.exists(path)
            mode = int(req["mode"]) if req.get("mode") is not None else 0o644
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, mode)
            if not existed:
                os.fchmod(fd, mode)  # exactly, whatever the umask
                if user.uid or user.gid:
                    os.fchown(fd, user.uid, user.gid)
        else:
            tmp = os.path.join(parent, f".{os.path.basename(path)}.shoal-{os.getpid()}-{time.monotonic_ns()}")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except OSError as exc:  # name the file the caller asked for, not our temp file
                tmp = None
                raise OSError(exc.errno, exc.strerror, path) from exc
        if meta:  # on the new file before it is in place: a reader never sees it without its metadata
            write_metadata(fd, meta)
    except (ValueError, LookupError) as exc:
        reply = p.error_reply("invalid_argument", str(exc))
    except OSError as exc:
        reply = os_error(exc, exc.filename or str(req.get("path")))
    complete = False
    while True:
        got = reader.read()
        if got is None:
            break
        kind, payload = got
        if kind == p.DATA:
            if fd >= 0 and reply is None:
                try:
                    view = memoryview(payload)
                    while view:
                        view = view[os.write(fd, view):]
                except OSError as exc:
                    reply = os_error(exc, path)
        elif kind == p.MSG and p.loads(payload).get("op") == "eof":
            complete = True
            break
    try:
        if fd >= 0:
            os.close(fd)
        if reply is None and not complete:
            reply = p.error_reply("invalid_argument", "upload ended before its end marker")
        if reply is None:
            if tmp is not None:
                try:
                    old = os.stat(path)
                    os.chmod(tmp, st.S_IMODE(old.st_mode))
                    try:
                        os.chown(tmp, old.st_uid, old.st_gid)
                    except PermissionError:
                        pass  # a user replacing another's file (in a dir it may write) owns the new one
                except FileNotFoundError:
                    if req.get("mode") is None:
                        _own(tmp, user)
                if req.get("mode") is not None:
                    os.chmod(tmp, int(req["mode"]))
                os.rename(tmp, path)
                tmp = None
            reply = {"ok": True, "entry": entry(path)}
    except OSError as exc:
        reply = os_error(exc, path)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    if complete:
        sock.sendall(p.message(reply))
