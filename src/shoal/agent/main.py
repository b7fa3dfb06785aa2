"""The agent: PID 1 of every sandbox.

It inherits a listening unix socket as fd 3, accepts one connection per operation and serves
each in its own thread; the main thread does nothing but accept and reap children (PID 1 must
reap every orphan of the sandbox). It runs on the read-only runtime mounted at ``/.shoal`` and
imports only builtins and C accelerators, so it needs no Python in the image and starts fast.

Configuration arrives as environment variables from the OCI config: ``SHOAL_SANDBOX_ID`` and
``SHOAL_ENV`` (JSON object: the sandbox-wide environment of every process).
"""

from __future__ import annotations

import _signal
import _socket
import _thread
import os
import select
import sys

from shoal.agent import files, processes, protocol as p, watch

VERSION = "1"
LISTEN_FD = 3

_OPS = {
    "process.start": processes.start,
    "process.connect": processes.connect,
    "process.list": processes.list_processes,
    "process.signal": processes.control,
    "process.stdin": processes.control,
    "process.close_stdin": processes.control,
    "process.resize": processes.control,
    "file.read": files.read,
    "file.write": files.write,
    "file.stat": files.stat,
    "file.list": files.list_dir,
    "file.mkdir": files.mkdir,
    "file.move": files.move,
    "file.remove": files.remove,
    "file.watch": watch.watch,
}


def _ping(sock, reader, req: dict) -> None:  # noqa: ANN001
    sock.sendall(p.message({"ok": True, "version": VERSION, "pid": os.getpid(),
                            "sandbox_id": os.environ.get("SHOAL_SANDBOX_ID", "")}))


_OPS["ping"] = _ping


def serve_connection(fd: int) -> None:
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM, 0, fd)
    try:
        reader = p.FrameReader(sock)
        first = reader.read()
        if first is None:
            return
        kind, payload = first
        try:
            req = p.loads(payload) if kind == p.MSG else None
        except ValueError:
            req = None
        if not isinstance(req, dict):
            sock.sendall(p.message(p.error_reply("invalid_argument", "the first frame must be a JSON request")))
            return
        handler = _OPS.get(req.get("op"))  # type: ignore[arg-type]
        if handler is None:
            sock.sendall(p.message(p.error_reply("invalid_argument", f"unknown operation {req.get('op')!r}")))
            return
        handler(sock, reader, req)
    except (OSError, ConnectionError):
        pass  # the host went away mid-operation; nothing to tell anyone
    except Exception as exc:  # noqa: BLE001 - PID 1 must survive any bug in one operation
        try:
            sock.sendall(p.message(p.error_reply("internal", f"agent error: {type(exc).__name__}: {exc}")))
        except OSError:
            pass
    finally:
        sock.close()


def _configure() -> None:
    env = os.environ.get("SHOAL_ENV")
    if env:
        extra = p.loads(env)
        if isinstance(extra, dict):
            processes.base_env.update({str(k): str(v) for k, v in extra.items()})
    for key in ("SHOAL_ENV",):
        os.environ.pop(key, None)


def main() -> None:
    _configure()
    listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM, 0, LISTEN_FD)
    listener.setblocking(False)
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    _signal.set_wakeup_fd(wake_w)
    _signal.signal(_signal.SIGCHLD, lambda *_: None)
    _signal.signal(_signal.SIGTERM, lambda *_: _shutdown())
    _signal.signal(_signal.SIGPIPE, _signal.SIG_IGN)
    poller = select.poll()
    poller.register(LISTEN_FD, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        try:
            events = poller.poll()
        except InterruptedError:
            continue
        for fd, _ev in events:
            if fd == wake_r:
                try:
                    os.read(wake_r, 4096)
                except BlockingIOError:
                    pass
                processes.table.reap()
            else:
                while True:
                    try:
                        conn_fd, _addr = listener._accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break  # EMFILE and friends: try again on the next wake-up
                    _thread.start_new_thread(serve_connection, (conn_fd,))


def _shutdown() -> None:
    processes.kill_all()
    sys.exit(0)


if __name__ == "__main__":
    main()
