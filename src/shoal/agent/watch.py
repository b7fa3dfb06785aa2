"""``file.watch``: stream inotify events for a directory (optionally recursive) until the host leaves.

ctypes is imported only here, on the first watch, to keep it off the agent's start-up path.
"""

from __future__ import annotations

import os
import select
import struct

from shoal.agent import protocol as p
from shoal.agent import users
from shoal.agent.files import Identity, entry, os_error, resolve

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF, IN_ISDIR, IN_IGNORED = 0x400, 0x800, 0x40000000, 0x8000
IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000
MASK = IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF
_EVENT = struct.Struct("iIII")
TEMP_MARK = ".shoal-"  # files.write names its temp files ``.<name>.shoal-<pid>-<ns>``


def _event_type(mask: int) -> str:
    if mask & IN_CREATE or mask & IN_MOVED_TO:
        return "create" if mask & IN_CREATE else "rename"
    if mask & IN_DELETE:
        return "remove"
    if mask & IN_MOVED_FROM:
        return "rename"
    if mask & IN_MODIFY:
        return "write"
    return "chmod"


class Inotify:
    def __init__(self) -> None:
        import ctypes
        libc = ctypes.CDLL("libc.so.6", use_errno=True)  # the runtime's own libc, via --library-path
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self._ctypes = ctypes
        self.fd = libc.inotify_init1(IN_CLOEXEC)
        if self.fd < 0:
            no = ctypes.get_errno()
            raise OSError(no, os.strerror(no))
        self.dirs: dict[int, str] = {}
        self.temp_cookies: set[int] = set()

    def add(self, path: str) -> None:
        wd = self._add(self.fd, os.fsencode(path), MASK)
        if wd < 0:
            no = self._ctypes.get_errno()
            raise OSError(no, os.strerror(no), path)
        self.dirs[wd] = path

    def add_tree(self, path: str) -> None:
        self.add(path)
        for root, dirs, _files in os.walk(path):
            for d in dirs:
                try:
                    self.add(os.path.join(root, d))
                except OSError:
                    pass

    def events(self) -> list[tuple[str, int, str]]:
        data = os.read(self.fd, 65536)
        out = []
        off = 0
        while off < len(data):
            wd, mask, cookie, length = _EVENT.unpack_from(data, off)
            name = data[off + 16: off + 16 + length].rstrip(b"\0").decode("utf-8", "replace")
            off += 16 + length
            if mask & IN_IGNORED:
                self.dirs.pop(wd, None)
                continue
            base = self.dirs.get(wd)
            if base is None:
                continue
            if TEMP_MARK in name:  # the agent's own atomic-write temp file
                if mask & IN_MOVED_FROM:
                    self.temp_cookies.add(cookie)
                continue
            if mask & IN_MOVED_TO and cookie in self.temp_cookies:
                # An upload completed. Clients expect what envd's own write makes: create (open with
                # O_CREAT), chmod (its chown of the new file), write (the bytes); E2B's SDK tests count 3.
                self.temp_cookies.discard(cookie)
                full, plain = os.path.join(base, name), mask & ~IN_MOVED_TO
                out.append((full, plain | IN_CREATE, name))
                out.append((full, plain | IN_ATTRIB, name))
                mask = plain | IN_MODIFY
            out.append((os.path.join(base, name) if name else base, mask, name))
        return out


def watch(sock, reader: p.FrameReader, req: dict) -> None:  # noqa: ANN001
    try:
        user = users.lookup(req.get("user"))
        identity = Identity(user)  # a user may only watch what it may read
        root = resolve(req.get("path"), user)
        recursive = bool(req.get("recursive"))
        if not os.path.isdir(root):
            sock.sendall(p.message(p.error_reply("not_found" if not os.path.exists(root) else "invalid_argument",
                                                 f"{root}: not a directory")))
            return
        ino = Inotify()
        with identity:
            (ino.add_tree if recursive else ino.add)(root)
    except (ValueError, LookupError) as exc:
        sock.sendall(p.message(p.error_reply("invalid_argument", str(exc))))
        return
    except OSError as exc:
        sock.sendall(p.message(os_error(exc, str(req.get("path")))))
        return
    try:
        sock.sendall(p.message({"ok": True, "event": "started"}))
        poller = select.poll()
        poller.register(ino.fd, select.POLLIN)
        poller.register(sock.fileno(), select.POLLIN)
        while True:
            for fd, _ev in poller.poll():
                if fd != ino.fd:
                    if reader.read() is None:
                        return
                    continue
                for path, mask, _name in ino.events():
                    if mask & (IN_DELETE_SELF | IN_MOVE_SELF):
                        if path == root:
                            sock.sendall(p.message({"event": "end", "reason": "watched directory removed"}))
                            return
                        continue
                    if recursive and mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
                        try:
                            with identity:
                                ino.add_tree(path)
                        except OSError:
                            pass
                    rel = os.path.relpath(path, root)
                    ev = {"event": "fs", "type": _event_type(mask), "name": rel, "path": path}
                    if req.get("include_entry") and os.path.lexists(path):
                        try:
                            ev["entry"] = entry(path)
                        except OSError:
                            pass
                    sock.sendall(p.message(ev))
    except OSError:
        return
    finally:
        os.close(ino.fd)
