"""Users and groups of the sandbox, read from the sandbox's own /etc files.

The agent's libc is the runtime's, not the image's, so NSS modules of the image would not load;
/etc/passwd and /etc/group are parsed directly instead (that is all minimal images have anyway).
"""

from __future__ import annotations

import os


class User:
    __slots__ = ("name", "uid", "gid", "home", "shell", "groups")

    def __init__(self, name: str, uid: int, gid: int, home: str, shell: str, groups: list[int]) -> None:
        self.name, self.uid, self.gid, self.home, self.shell, self.groups = name, uid, gid, home, shell, groups


ROOT = User("root", 0, 0, "/root", "/bin/sh", [])


def _rows(path: str) -> list[list[str]]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n").split(":") for line in f if line.strip() and not line.startswith("#")]
    except OSError:
        return []


_cache: dict[tuple, User] = {}


def _stamp() -> tuple:
    out = []
    for path in ("/etc/passwd", "/etc/group"):
        try:
            st = os.stat(path)
            out.append((st.st_mtime_ns, st.st_ino, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


def lookup(user: str | int | None) -> User:
    """Find ``user`` (a name or a uid) in the sandbox; raise LookupError if it does not exist.

    Every exec asks, so answers are cached until /etc/passwd or /etc/group change."""
    key = (user, _stamp())
    found = _cache.get(key)
    if found is None:
        found = _lookup(user)
        if len(_cache) > 256:
            _cache.clear()
        _cache[key] = found
    return found


def _lookup(user: str | int | None) -> User:
    if user is None or user == "" or user == "root" or user == 0:
        for row in _rows("/etc/passwd"):
            if len(row) >= 7 and row[2] == "0":
                return User(row[0], 0, 0, row[5] or "/root", row[6] or "/bin/sh", [])
        return ROOT
    key = str(user)
    for row in _rows("/etc/passwd"):
        if len(row) >= 7 and (row[0] == key or row[2] == key):
            name, uid, gid = row[0], int(row[2]), int(row[3])
            groups = [int(g[2]) for g in _rows("/etc/group")
                      if len(g) >= 4 and g[2].isdigit() and name in g[3].split(",")]
            return User(name, uid, gid, row[5] or "/", row[6] or "/bin/sh", groups)
    if isinstance(user, int) or key.isdigit():
        uid = int(key)
        return User(key, uid, uid, "/", "/bin/sh", [])
    raise LookupError(f"user '{user}' does not exist in the sandbox")
