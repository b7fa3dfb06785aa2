"""Processes inside the sandbox: start, stream, stdin, signals, PTY, timeouts, list, connect.

Threading model: the connection that starts a process pumps its output (one thread per live
process, no extra thread), fanning every chunk out to all subscribers; other connections may
subscribe (``process.connect``) and send input or signals. Exit statuses come from the single
reaper (PID 1 must reap orphans too, so nobody else may call ``waitpid``), which wakes the pump
through a per-process pipe.
"""

from __future__ import annotations

import _struct
import _thread
import os
import select
import time

from shoal.agent import protocol as p
from shoal.agent import users
from shoal.agent.spawn import SpawnError, spawn

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: After the process exits, how long to keep reading output that its orphans may still write.
DRAIN_AFTER_EXIT = 0.1
MAX_PENDING_INPUT = 4 * p.CHUNK
LINGER = 5.0

#: Environment every process gets (the sandbox-wide env from create is merged in by ``main``).
base_env: dict[str, str] = {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"}
#: The template's user and working directory for requests that name none (an image's User, WorkingDir).
default_user: str | None = None
default_cwd: str | None = None


class Subscriber:
    """A connection that receives a process' output frames."""

    __slots__ = ("sock", "lock", "alive")

    def __init__(self, sock) -> None:  # noqa: ANN001
        self.sock = sock
        self.lock = _thread.allocate_lock()
        self.alive = True

    def send(self, data: bytes) -> bool:
        if not self.alive:
            return False
        with self.lock:
            try:
                self.sock.sendall(data)
                return True
            except OSError:
                self.alive = False
                return False


class Process:
    __slots__ = ("pid", "argv", "tag", "cwd", "pty", "stdin_fd", "status", "status_r", "status_w",
                 "subscribers", "started_at", "timed_out", "lock", "envs", "pending_in", "closing_in")

    def __init__(self, pid: int, argv: list[str], tag: str | None, cwd: str, pty: int | None,
                 stdin_fd: int | None, envs: dict[str, str]) -> None:
        self.pid = pid
        self.argv = argv
        self.tag = tag
        self.cwd = cwd
        self.pty = pty
        self.stdin_fd = stdin_fd
        self.envs = envs
        self.status: int | None = None
        self.status_r, self.status_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.subscribers: list[Subscriber] = []
        self.started_at = time.time()
        self.timed_out = False
        self.lock = _thread.allocate_lock()
        #: Input not yet accepted by the process; the pump writes it when the fd is writable, so a
        #: process that does not read its stdin can never block output (or other clients).
        self.pending_in = bytearray()
        self.closing_in = False

    def info(self) -> dict:
        return {"pid": self.pid, "cmd": self.argv[0], "args": self.argv[1:], "tag": self.tag,
                "cwd": self.cwd, "pty": self.pty is not None, "envs": self.envs,
                "started_at": self.started_at}

    def broadcast(self, kind: int, data: bytes) -> None:
        out = p.frame(kind, data)
        for sub in list(self.subscribers):
            if not sub.send(out):
                self.unsubscribe(sub)

    def unsubscribe(self, sub: Subscriber) -> None:
        with self.lock:
            if sub in self.subscribers:
                self.subscribers.remove(sub)

    def signal(self, signum: int) -> None:
        """Signal the whole process group (the child leads its own session); SIGKILL reaches
        every descendant, even those that left the group (``setsid``)."""
        if signum == 9:
            kill_tree(self.pid)
            return
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            pass
        except PermissionError:
            os.kill(self.pid, signum)

    def input_fd(self) -> int | None:
        return self.pty if self.pty is not None else self.stdin_fd

    def write_stdin(self, data: bytes) -> None:
        """Queue input for the process (any thread); the pump delivers it."""
        if self.input_fd() is None or self.closing_in:
            raise ValueError("stdin is not open for this process")
        with self.lock:
            self.pending_in += data
        self._wake()

    def close_stdin(self) -> None:
        """Close stdin once the queued input is delivered (any thread)."""
        self.closing_in = True
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self.status_w, b"i")
        except OSError:
            pass

    def flush_stdin(self) -> bool:
        """Write what the fd takes now (pump thread only); True while input is still queued."""
        fd = self.input_fd()
        if fd is None:
            self.pending_in.clear()
            return False
        with self.lock:
            while self.pending_in:
                try:
                    n = os.write(fd, self.pending_in[:p.CHUNK])
                except BlockingIOError:
                    return True
                except OSError:  # the process closed its stdin: drop what it will never read
                    self.pending_in.clear()
                    break
                del self.pending_in[:n]
        if self.closing_in and self.stdin_fd is not None:
            fd, self.stdin_fd = self.stdin_fd, None
            os.close(fd)
        return False

    def resize(self, cols: int, rows: int) -> None:
        if self.pty is None:
            raise ValueError("process has no PTY")
        _set_winsize(self.pty, cols, rows)


class Table:
    """Every live process by pid; the reaper and spawners share ``lock``."""

    def __init__(self) -> None:
        self.lock = _thread.allocate_lock()
        self.procs: dict[int, Process] = {}

    def find(self, selector: dict) -> Process:
        pid, tag = selector.get("pid"), selector.get("tag")
        with self.lock:
            if pid is not None and int(pid) in self.procs:
                return self.procs[int(pid)]
            if tag is not None:
                for proc in self.procs.values():
                    if proc.tag == tag:
                        return proc
        raise LookupError(f"no running process with {'pid ' + str(pid) if pid is not None else 'tag ' + str(tag)}")

    def reap(self) -> None:
        """Collect every exited child; called by the main thread on SIGCHLD."""
        with self.lock:
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    return
                if pid == 0:
                    return
                proc = self.procs.pop(pid, None)
                if proc is not None:
                    proc.status = status
                    os.write(proc.status_w, b"x")


table = Table()


def _exit_fields(proc: Process) -> dict:
    status = proc.status or 0
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return {"exit_code": 128 + sig, "signal": sig, "exited": False, "timed_out": proc.timed_out}
    return {"exit_code": os.WEXITSTATUS(status), "signal": None, "exited": True, "timed_out": proc.timed_out}


def _text(value: object, what: str) -> str:
    """Text a process can receive: a str without NUL bytes that encodes as UTF-8 (a lone
    surrogate raises UnicodeEncodeError, itself a ValueError, like every refusal here)."""
    if not isinstance(value, str) or "\0" in value:
        raise ValueError(f"{what} must be text without NUL bytes")
    value.encode("utf-8")
    return value


def _prepare(req: dict) -> tuple[list[str], dict[str, str], str, users.User]:
    argv = req.get("cmd")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv) or not argv[0]:
        raise ValueError("cmd must be a non-empty list of strings")
    for arg in argv:
        _text(arg, "cmd")
    if req.get("cwd"):
        _text(req["cwd"], "cwd")
    user = users.lookup(default_user if req.get("user") in (None, "") else req.get("user"))
    env = dict(base_env)
    env.update({"HOME": user.home, "USER": user.name, "LOGNAME": user.name})
    if req.get("pty"):
        env["TERM"] = "xterm-256color"
    extra = req.get("env") or {}
    if not isinstance(extra, dict):
        raise ValueError("env must be an object")
    for k, v in extra.items():
        if not isinstance(k, str) or not k or "=" in k:
            raise ValueError(f"invalid environment variable {k!r}")
        env[_text(k, "env")] = _text(v, "env")
    cwd = req.get("cwd") or default_cwd or user.home
    if not os.path.isdir(cwd):
        cwd = cwd if req.get("cwd") else "/"
    return argv, env, cwd, user


def _set_winsize(fd: int, cols: int, rows: int) -> None:
    import fcntl
    import termios
    fcntl.ioctl(fd, termios.TIOCSWINSZ, _struct.pack("HHHH", rows, cols, 0, 0))


def start(sock, reader: p.FrameReader, req: dict) -> None:  # noqa: ANN001
    """``process.start``: run a command and stream it until it ends (or the client leaves)."""
    try:
        argv, env, cwd, user = _prepare(req)
    except LookupError as exc:
        sock.sendall(p.message(p.error_reply("not_found", str(exc))))
        return
    except ValueError as exc:
        sock.sendall(p.message(p.error_reply("invalid_argument", str(exc))))
        return
    pty_req = req.get("pty")
    stdin_wanted = bool(req.get("stdin"))
    master = stdin_w = None
    close_after: list[int] = []
    try:
        if pty_req:
            master, slave = os.openpty()
            close_after.append(slave)
            os.set_blocking(master, False)
            size = pty_req.get("size") if isinstance(pty_req, dict) else None
            size = size if isinstance(size, dict) else {}
            try:  # before the child runs: a size set after spawn races its first look (``stty size`` saw 0 0)
                _set_winsize(master, int(size.get("cols", 80)), int(size.get("rows", 24)))
            except (OSError, ValueError, TypeError, OverflowError, _struct.error):
                pass
            fds = (slave, slave, slave)
        else:
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            close_after += [out_w, err_w]
            if stdin_wanted:
                in_r, stdin_w = os.pipe2(os.O_CLOEXEC)
                os.set_blocking(stdin_w, False)
                close_after.append(in_r)
            else:
                in_r = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
                close_after.append(in_r)
            fds = (in_r, out_w, err_w)
        with table.lock:
            pid = spawn(argv, env, cwd, *fds, uid=user.uid, gid=user.gid, groups=user.groups,
                        pty=bool(pty_req))
            proc = Process(pid, argv, req.get("tag"), cwd, master, stdin_w, dict(req.get("env") or {}))
            table.procs[pid] = proc
    except SpawnError as exc:
        for fd in close_after + [x for x in (master, stdin_w) if x is not None]:
            os.close(fd)
        if not pty_req:
            os.close(out_r)
            os.close(err_r)
        code = "not_found" if exc.errno == 2 and exc.step == "exec" else "invalid_argument"
        what = {"exec": f"cannot execute {exc.argv0!r}", "chdir": f"cannot enter directory {cwd!r}",
                "setup": "cannot set up the process"}[exc.step]
        sock.sendall(p.message(p.error_reply(code, f"{what}: {os.strerror(exc.errno)}")))
        return
    except OSError as exc:
        sock.sendall(p.message(p.error_reply("resource_exhausted" if exc.errno in (11, 12, 24) else "internal",
                                             f"cannot start process: {exc.strerror}")))
        return
    for fd in close_after:
        os.close(fd)
    me = Subscriber(sock)
    proc.subscribers.append(me)
    me.send(p.message({"event": "start", "pid": pid}))
    outputs = {master: p.PTY} if pty_req else {out_r: p.STDOUT, err_r: p.STDERR}
    timeout = req.get("timeout")
    _pump(proc, me, reader, outputs, time.monotonic() + float(timeout) if timeout else None)
    if me.alive:
        _linger(me.sock)


def _linger(sock) -> None:  # noqa: ANN001
    """End our side but keep reading until the client closes (at most a few seconds): a client
    that sends input or a signal just as the process ends must not meet a closed socket (EPIPE),
    which would make it lose the end event it has not read yet."""
    try:
        sock.shutdown(1)  # SHUT_WR: the client sees EOF after the end event
        sock.settimeout(LINGER)
        while sock.recv(65536):
            pass
    except OSError:
        pass


def _pump(proc: Process, me: Subscriber, reader: p.FrameReader, outputs: dict[int, int],
          deadline: float | None) -> None:
    poller = select.poll()
    for fd in outputs:
        poller.register(fd, select.POLLIN)
    poller.register(proc.status_r, select.POLLIN)
    sock_fd = me.sock.fileno()
    poller.register(sock_fd, select.POLLIN)
    drain_until: float | None = None
    in_fd = proc.input_fd()
    want_out = False  # is in_fd registered for POLLOUT?
    sock_paused = False  # backpressure: frames stay in the socket while input is queued

    def interest(fd: int) -> int:
        return (select.POLLIN if fd in outputs else 0) | (select.POLLOUT if fd == in_fd and want_out else 0)

    try:
        while outputs or drain_until is None:
            while me.alive and reader.buffered():  # frames that arrived with the request
                if not _client_frame(proc, reader):
                    poller.unregister(sock_fd)
                    proc.unsubscribe(me)
                    me.alive = False
            if in_fd is not None:
                need = proc.flush_stdin()
                if proc.input_fd() is None:
                    if want_out and in_fd not in outputs:
                        poller.unregister(in_fd)
                    in_fd, want_out = None, False
                elif need != want_out:
                    want_out = need
                    if in_fd in outputs:
                        poller.modify(in_fd, interest(in_fd))
                    elif want_out:
                        poller.register(in_fd, select.POLLOUT)
                    else:
                        poller.unregister(in_fd)
            if me.alive and (len(proc.pending_in) >= MAX_PENDING_INPUT) != sock_paused:
                sock_paused = not sock_paused
                poller.modify(sock_fd, 0 if sock_paused else select.POLLIN)
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                proc.timed_out = True
                proc.signal(9)
                deadline = None
            if drain_until is not None and now >= drain_until:
                break
            limits = [t for t in (deadline, drain_until) if t is not None]
            wait = max(0, int((min(limits) - now) * 1000) + 1) if limits else None
            events = poller.poll(wait)
            for fd, ev in events:
                if fd in outputs and ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    try:
                        data = os.read(fd, p.CHUNK)
                    except BlockingIOError:
                        continue
                    except OSError:  # EIO on a pty whose last writer is gone
                        data = b""
                    if data:
                        proc.broadcast(outputs[fd], data)
                    else:
                        del outputs[fd]
                        if fd == in_fd and want_out:
                            poller.modify(fd, interest(fd))
                        else:
                            poller.unregister(fd)
                        if fd != proc.pty:  # a pipe at EOF is done (the PTY master is closed below)
                            os.close(fd)
                elif fd == proc.status_r:
                    try:
                        os.read(fd, 4096)
                    except BlockingIOError:
                        pass
                    if proc.status is not None and drain_until is None:
                        drain_until = time.monotonic() + DRAIN_AFTER_EXIT
                elif fd == sock_fd:
                    if not _client_frame(proc, reader):
                        poller.unregister(sock_fd)
                        proc.unsubscribe(me)
                        me.alive = False
    finally:
        for fd in list(outputs):
            os.close(fd)
        if proc.status is None:  # pump failed: do not leave the process unattended
            proc.signal(9)
            with table.lock:  # from now on the reaper treats it as an orphan
                table.procs.pop(proc.pid, None)
        if proc.stdin_fd is not None:
            os.close(proc.stdin_fd)
            proc.stdin_fd = None
        if proc.pty is not None:
            try:
                os.close(proc.pty)
            except OSError:
                pass
            proc.pty = None
        end = p.message({"event": "end", **_exit_fields(proc)})
        for sub in list(proc.subscribers):
            sub.send(end)
        proc.subscribers.clear()
        os.close(proc.status_r)
        os.close(proc.status_w)


def _client_frame(proc: Process, reader: p.FrameReader) -> bool:
    """Handle one frame from a subscriber: input, close_stdin, signal, resize. False on EOF."""
    try:
        got = reader.read()
    except (OSError, ConnectionError):
        return False
    if got is None:
        return False
    kind, payload = got
    try:
        if kind == p.STDIN:
            proc.write_stdin(payload)
        elif kind == p.MSG:
            _control(proc, p.loads(payload))
    except (OSError, ValueError):
        pass  # input to a process that closed stdin, or a bad control message: the stream goes on
    return True


def _control(proc: Process, msg: dict) -> None:
    op = msg.get("op")
    if op == "close_stdin":
        proc.close_stdin()
    elif op == "signal":
        proc.signal(int(msg.get("signal", 9)))
    elif op == "resize":
        proc.resize(int(msg["cols"]), int(msg["rows"]))
    elif op == "stdin":
        proc.write_stdin(msg.get("data", "").encode())


def connect(sock, reader: p.FrameReader, req: dict) -> None:  # noqa: ANN001
    """``process.connect``: follow a running process' output from now on; may send input/signals."""
    try:
        proc = table.find(req)
    except LookupError as exc:
        sock.sendall(p.message(p.error_reply("not_found", str(exc))))
        return
    me = Subscriber(sock)
    with proc.lock:
        proc.subscribers.append(me)
    me.send(p.message({"event": "start", "pid": proc.pid}))
    while me.alive:
        if not _client_frame(proc, reader):
            break
    proc.unsubscribe(me)


def list_processes(sock, reader: p.FrameReader, req: dict) -> None:  # noqa: ANN001
    with table.lock:
        infos = [proc.info() for proc in table.procs.values()]
    sock.sendall(p.message({"ok": True, "processes": infos}))


def control(sock, reader: p.FrameReader, req: dict) -> None:  # noqa: ANN001
    """``process.signal`` / ``process.stdin`` / ``process.close_stdin`` / ``process.resize`` by pid or tag."""
    try:
        proc = table.find(req)
        op = req["op"].split(".", 1)[1]
        if op == "stdin" and "data_b64" in req:
            import binascii
            proc.write_stdin(binascii.a2b_base64(req["data_b64"]))
        else:
            _control(proc, {**req, "op": op})
    except LookupError as exc:
        sock.sendall(p.message(p.error_reply("not_found", str(exc))))
        return
    except (ValueError, KeyError, OSError) as exc:
        sock.sendall(p.message(p.error_reply("invalid_argument", str(exc))))
        return
    sock.sendall(p.message({"ok": True}))


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        ppid = int(data[data.rindex(b")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def kill_tree(root: int) -> None:
    """SIGSTOP the whole tree under ``root`` (so nothing forks away mid-walk), then SIGKILL it.
    Repeats until the walk finds nothing new: descendants that left the process group or the
    session are found through their parent links."""
    seen: set[int] = set()
    for _ in range(8):
        kids = _children_map()
        tree, todo, walked = [], [root], set()
        while todo:
            pid = todo.pop()
            if pid in walked or pid == 1:
                continue
            walked.add(pid)
            tree.append(pid)
            todo.extend(kids.get(pid, []))
        fresh = [pid for pid in tree if pid not in seen]
        if not fresh:
            break
        for sig in (19, 9):  # SIGSTOP, then SIGKILL
            for pid in fresh:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        seen.update(fresh)
    try:
        os.killpg(root, 9)
    except (ProcessLookupError, PermissionError):
        pass


def kill_all() -> None:
    with table.lock:
        procs = list(table.procs.values())
    for proc in procs:
        proc.signal(9)
