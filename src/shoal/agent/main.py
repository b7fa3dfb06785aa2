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

from shoal.agent import processes
from shoal.agent import protocol as p

VERSION = "1"
LISTEN_FD = 3

#: op → (module, function). File and watch modules load on first use (or shortly after start-up,
#: see ``_warm``): the first command of a new sandbox should not wait for them.
_OPS = {
    "ping": ("shoal.agent.main", "_ping"),
    "process.start": ("shoal.agent.processes", "start"),
    "process.connect": ("shoal.agent.processes", "connect"),
    "process.list": ("shoal.agent.processes", "list_processes"),
    "process.signal": ("shoal.agent.processes", "control"),
    "process.stdin": ("shoal.agent.processes", "control"),
    "process.close_stdin": ("shoal.agent.processes", "control"),
    "process.resize": ("shoal.agent.processes", "control"),
    "file.read": ("shoal.agent.files", "read"),
    "file.write": ("shoal.agent.files", "write"),
    "file.stat": ("shoal.agent.files", "stat"),
    "file.list": ("shoal.agent.files", "list_dir"),
    "file.mkdir": ("shoal.agent.files", "mkdir"),
    "file.move": ("shoal.agent.files", "move"),
    "file.remove": ("shoal.agent.files", "remove"),
    "file.watch": ("shoal.agent.watch", "watch"),
    "port.connect": ("shoal.agent.ports", "connect"),
    "port.list": ("shoal.agent.ports", "listening"),
}
_import_lock = _thread.allocate_lock()
#: Modules whose import has completed. ``sys.modules`` alone is not enough: a module is there as
#: soon as its import *starts*, so a second thread would find it half-initialised.
_loaded: set[str] = set()


def _handler(op: object):  # noqa: ANN202
    target = _OPS.get(op) if isinstance(op, str) else None
    if target is None:
        return None
    name = target[0]
    if name not in _loaded:
        with _import_lock:
            __import__(name)
            _loaded.add(name)
    return getattr(sys.modules[name], target[1])


def _warm() -> None:
    """Load the remaining modules once the first requests have had the CPU."""
    import time
    time.sleep(0.2)
    for name in ("shoal.agent.files", "shoal.agent.watch"):
        with _import_lock:
            __import__(name)
            _loaded.add(name)


def _ping(sock, reader, req: dict) -> None:  # noqa: ANN001
    sock.sendall(p.message({"ok": True, "version": VERSION, "pid": os.getpid(),
                            "sandbox_id": os.environ.get("SHOAL_SANDBOX_ID", "")}))


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
        handler = _handler(req.get("op"))
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


#: Written by the image importer (images/oci_image.py): the image's Env, WorkingDir and User.
TEMPLATE_DEFAULTS = "/etc/shoal/template.json"


def _template_defaults() -> None:
    """Apply the template's process defaults; the create request's env (``SHOAL_ENV``) overrides them."""
    try:
        with open(TEMPLATE_DEFAULTS, "rb") as f:
            found = p.loads(f.read(1 << 20).strip())
    except (OSError, ValueError):
        return
    if not isinstance(found, dict):
        return
    env, user, cwd = found.get("env"), found.get("user"), found.get("working_dir")
    if isinstance(env, dict):
        processes.base_env.update({str(k): str(v) for k, v in env.items() if k and "=" not in str(k)})
    if isinstance(user, str) and user:
        processes.default_user = user.split(":", 1)[0]  # "user:group": the user's own groups apply
    if isinstance(cwd, str) and cwd.startswith("/"):
        processes.default_cwd = cwd


def _configure() -> None:
    _template_defaults()
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
    try:
        _thread.start_new_thread(_warm, ())
    except (RuntimeError, MemoryError):
        pass  # modules then load on first use
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
                    try:
                        _thread.start_new_thread(serve_connection, (conn_fd,))
                    except (RuntimeError, MemoryError):  # at the pids/memory limit: refuse, live on
                        _refuse(conn_fd)


_BUSY = p.message(p.error_reply("resource_exhausted",
                                 "the sandbox is at its process limit: the agent cannot serve this call now"))


def _refuse(fd: int) -> None:
    """Tell the caller why, without blocking PID 1 (the reply fits any empty socket buffer)."""
    try:
        os.set_blocking(fd, False)
        os.write(fd, _BUSY)
    except OSError:
        pass
    os.close(fd)


def _shutdown() -> None:
    processes.kill_all()
    sys.exit(0)


if __name__ == "__main__":
    main()
