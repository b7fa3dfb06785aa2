"""A hostile agent, run INSIDE a sandbox as its root by tests/test_host_writes.py (not a test module).

It does what sandbox code can really do to the host side of the agent protocol: it copies PID 1's
listening socket (fd 3) into itself with ``pidfd_getfd``, then lowers PID 1's RLIMIT_NOFILE with
``prlimit`` so that the real agent's ``accept`` fails with EMFILE before it takes a connection off
the queue. From then on every request the host sends is answered here, with whatever lies the
scenario below wants: paths that leave the destination, setuid modes, symlinks, endless files,
endless listings. Only the Python standard library (the ``base`` template has python3).

Readiness is visible from the host: ``ping`` answers ``version: "fake"``.
"""

from __future__ import annotations

import ctypes
import json
import resource
import socket
import struct
import threading

MSG, DATA = 0, 5
SYS_PIDFD_OPEN, SYS_PIDFD_GETFD = 434, 438
CONTENT = b"hostile bytes\n"


def take_over() -> socket.socket:
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = libc.syscall(SYS_PIDFD_OPEN, 1, 0)
    if pidfd < 0:
        raise OSError(ctypes.get_errno(), "pidfd_open(1)")
    fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, 3, 0)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "pidfd_getfd(1, 3)")
    _soft, hard = resource.prlimit(1, resource.RLIMIT_NOFILE)
    resource.prlimit(1, resource.RLIMIT_NOFILE, (2, hard))  # the agent's poll() still works, accept() not
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    return sock


def entry(path: str, kind: str = "file", mode: int = 0o644, size: int = len(CONTENT), **extra: object) -> dict:
    name = path.rsplit("/", 1)[-1] or "/"
    return {"name": name, "path": path, "type": kind, "size": size, "mode": mode, "permissions": "-rw-r--r--",
            "owner": "root", "group": "root", "uid": 0, "gid": 0, "modified": 0.0, **extra}


#: What ``file.list`` answers, by the directory the host asks about (every one of them stats as a dir).
LISTINGS: dict[str, list[dict]] = {
    "/dotdot": [entry("/dotdot/ok.txt"), entry("/dotdot/../../escaped-dotdot", mode=0o4755)],
    "/absolute": [entry("/etc/escaped-absolute", mode=0o4755)],
    "/prefix": [entry("/prefixed-sibling/escaped-prefix")],
    "/nul": [entry("/nul/a\u0000b")],
    "/empty": [entry("/empty//x")],
    "/setuid": [entry("/setuid/bin", kind="dir", mode=0o7777), entry("/setuid/bin/tool", mode=0o6755)],
    "/symlink": [entry("/symlink/passwd", kind="symlink", symlink_target="/etc/passwd"),
                 entry("/symlink/plain.txt")],
    "/through": [entry("/through/planted/owned.txt")],  # "planted" is a symlink the test made on the host
    "/huge": [entry("/huge/endless.bin", size=1)],
    "/many": [entry(f"/many/f{i}") for i in range(5000)],
}


def send(conn: socket.socket, kind: int, payload: bytes) -> None:
    conn.sendall(struct.pack("!BI", kind, len(payload)) + payload)


def recv_request(conn: socket.socket) -> dict:
    buf = b""
    while len(buf) < 5:
        got = conn.recv(5 - len(buf))
        if not got:
            raise ConnectionError
        buf += got
    _kind, length = struct.unpack("!BI", buf)
    body = b""
    while len(body) < length:
        got = conn.recv(length - len(body))
        if not got:
            raise ConnectionError
        body += got
    return json.loads(body)


def answer(conn: socket.socket) -> None:
    try:
        req = recv_request(conn)
        op, path = req.get("op"), str(req.get("path"))
        top = "/" + path.strip("/").split("/", 1)[0]
        if op == "ping":
            send(conn, MSG, json.dumps({"ok": True, "version": "fake", "pid": 1, "sandbox_id": ""}).encode())
        elif op == "file.stat":
            kind = "dir" if path in LISTINGS else "no such type" if path == "/malformed" else "file"
            send(conn, MSG, json.dumps({"ok": True, "entry": entry(path, kind, mode=0o4755)}).encode())
        elif op == "file.list":
            send(conn, MSG, json.dumps({"ok": True, "entries": LISTINGS.get(top, [])}).encode())
        elif op == "file.read":
            size = 1 << 62 if top == "/huge" else len(CONTENT)
            send(conn, MSG, json.dumps({"ok": True, "entry": entry(path, mode=0o4755, size=size)}).encode())
            if top == "/huge":
                chunk = b"\0" * (1024 * 1024)
                while True:  # until the host hangs up
                    send(conn, DATA, chunk)
            send(conn, DATA, CONTENT)
            send(conn, MSG, b'{"event": "eof"}')
        else:
            send(conn, MSG, json.dumps({"error": {"code": "internal", "message": "fake agent"}}).encode())
    except (OSError, ConnectionError, ValueError):
        pass
    finally:
        conn.close()


def main() -> None:
    listener = take_over()
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=answer, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
