"""The host side of the agent protocol: a blocking client over the sandbox's unix socket.

One connection per operation keeps the agent stateless between calls and lets any number of
host threads (or processes: the CLI) talk to one sandbox at once. Connecting costs ~20 µs.
Every error frame is turned into a ``shoal.errors`` exception here and nowhere else.

The agent is sandbox code as far as the host is concerned: frame lengths are checked per kind
before anything is read (output and file data come in pieces of at most 1 MiB), and connecting
plus the first reply are bounded by ``AGENT_TIMEOUT`` (``SHOAL_AGENT_TIMEOUT``, 10 s), a one-reply
call by ``CALL_TIMEOUT`` (``SHOAL_AGENT_CALL_TIMEOUT``, 60 s); running out raises ``AgentUnavailable``.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from shoal.agent import protocol as p
from shoal.errors import AgentUnavailable, NotFound, RuntimeFailure, ShoalError, from_agent_error

OutputCallback = Callable[[bytes], None]


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    value = float(raw) if raw else default
    if value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds")
    return value


#: Seconds the agent has to accept a connection and send its first reply (process started, file opened).
AGENT_TIMEOUT = _env_seconds("SHOAL_AGENT_TIMEOUT", 10.0)
#: Seconds a one-reply operation may take (a recursive remove or listing of a big tree is slow).
CALL_TIMEOUT = _env_seconds("SHOAL_AGENT_CALL_TIMEOUT", 60.0)
#: The largest output or file-data frame the host accepts; the agent sends at most 1 MiB at a time.
MAX_DATA_FRAME = 1024 * 1024


def frame_limit(kind: int) -> int:
    """The largest frame of ``kind`` the host accepts from the agent: replies may be big (a listing),
    process output and file data come in bounded pieces."""
    return p.MAX_FRAME if kind == p.MSG else MAX_DATA_FRAME


class HostFrameReader(p.FrameReader):
    """``FrameReader`` that refuses a frame by its header, per kind, before buffering any of it."""

    def read(self) -> tuple[int, bytes] | None:
        if self._fill(p.HEADER_SIZE):
            kind, length = p.unpack_header(bytes(self._buf[:p.HEADER_SIZE]))
            if length > frame_limit(kind):
                raise ConnectionError(f"oversized frame ({length} bytes, kind {kind}) from the sandbox agent")
        return super().read()


@dataclass
class ExecResult:
    """What a finished command left behind. ``stdout``/``stderr`` are the raw bytes (a prefix, if
    ``*_truncated``: the host keeps a bounded amount; streaming gets everything)."""

    exit_code: int
    stdout_bytes: bytes | bytearray = b""
    stderr_bytes: bytes | bytearray = b""
    signal: int | None = None
    timed_out: bool = False
    pid: int = 0
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    #: SIGKILLed by the OOM killer (the sandbox's memory limit), as the host saw from its cgroup.
    oom_killed: bool = False

    @property
    def truncated(self) -> bool:
        return self.stdout_truncated or self.stderr_truncated

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", "replace")

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass
class ProcessEvent:
    """One item of a process stream: ``start`` (pid), ``stdout``/``stderr``/``pty`` (data), ``end``."""

    kind: str
    data: bytes = b""
    pid: int = 0
    end: dict = field(default_factory=dict)


_KIND_NAMES = {p.STDOUT: "stdout", p.STDERR: "stderr", p.PTY: "pty"}


class AgentConnection:
    """One operation's connection: send frames, read frames, raise agent errors."""

    def __init__(self, path: str, timeout: float | None = None, sandbox_id: str = "") -> None:
        self.sandbox_id = sandbox_id
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(AGENT_TIMEOUT if timeout is None else min(timeout, AGENT_TIMEOUT))
        try:
            self.sock.connect(path)
        except TimeoutError as exc:
            self.sock.close()
            raise AgentUnavailable("the sandbox agent did not accept the connection in time (stopped or overloaded?)",
                                   sandbox_id=sandbox_id) from exc
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self.sock.close()
            raise NotFound(f"sandbox {sandbox_id or path} is not running (no agent)") from exc
        except OSError as exc:
            self.sock.close()
            raise RuntimeFailure(f"cannot reach the sandbox agent: {exc.strerror or exc}",
                                 sandbox_id=sandbox_id) from exc
        # Until the first reply, the handshake bound applies; after it, the caller's own timeout.
        self.sock.settimeout(AGENT_TIMEOUT if timeout is None else timeout)
        self.reader = HostFrameReader(self.sock)

    def handshake_done(self) -> None:
        """The agent answered: from now on waits are the caller's (a process may be silent for hours)."""
        self.sock.settimeout(self.timeout)

    def send(self, obj: dict) -> None:
        self._send(p.message(obj))

    def send_frame(self, kind: int, data: bytes) -> None:
        self._send(p.frame(kind, data))

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except TimeoutError as exc:
            raise self._unavailable() from exc
        except OSError as exc:
            # The agent closed on us; it may have said why before it did (e.g. out of processes).
            try:
                self.read_msg()
            except ShoalError as reason:
                raise reason from exc
            raise RuntimeFailure(f"lost the connection to the sandbox agent: {exc}",
                                 sandbox_id=self.sandbox_id) from exc

    def read(self) -> tuple[int, bytes]:
        try:
            got = self.reader.read()
        except TimeoutError as exc:
            raise self._unavailable() from exc
        except (OSError, ConnectionError) as exc:
            raise RuntimeFailure(f"lost the connection to the sandbox agent: {exc}",
                                 sandbox_id=self.sandbox_id) from exc
        if got is None:
            raise RuntimeFailure("the sandbox agent closed the connection (sandbox stopped?)",
                                 sandbox_id=self.sandbox_id)
        return got

    def read_msg(self) -> dict:
        """The next MSG frame as a dict, raising the Shoal error it carries."""
        kind, payload = self.read()
        if kind != p.MSG:
            raise RuntimeFailure(f"unexpected frame kind {kind} from the agent", sandbox_id=self.sandbox_id)
        try:
            return check(p.loads(payload))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise RuntimeFailure("malformed reply from the sandbox agent", sandbox_id=self.sandbox_id) from exc

    def _unavailable(self) -> AgentUnavailable:
        return AgentUnavailable("the sandbox agent did not answer in time (stopped or overloaded?)",
                                sandbox_id=self.sandbox_id)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> AgentConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check(msg: object) -> dict:
    if not isinstance(msg, dict):
        raise RuntimeFailure("malformed reply from the sandbox agent")
    err = msg.get("error")
    if err:
        raise from_agent_error(str(err.get("code")), str(err.get("message")))
    return msg


class ProcessStream:
    """A running process: iterate its events; send stdin, signals, resizes; wait for its result."""

    def __init__(self, conn: AgentConnection) -> None:
        self.conn = conn
        first = conn.read_msg()
        conn.handshake_done()
        pid = first.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise RuntimeFailure("malformed reply from the sandbox agent (no pid)", sandbox_id=conn.sandbox_id)
        self.pid = pid
        self.result: ExecResult | None = None

    def __iter__(self) -> Iterator[ProcessEvent]:
        while self.result is None:
            kind, payload = self.conn.read()
            if kind == p.MSG:
                try:
                    msg = check(p.loads(payload))
                except (ValueError, UnicodeDecodeError, RecursionError) as exc:
                    raise RuntimeFailure("malformed event from the sandbox agent",
                                         sandbox_id=self.conn.sandbox_id) from exc
                if msg.get("event") == "end":
                    self.result = ExecResult(exit_code=int(msg["exit_code"]), signal=msg.get("signal"),
                                             timed_out=bool(msg.get("timed_out")), pid=self.pid)
                    yield ProcessEvent("end", pid=self.pid, end=msg)
            else:
                yield ProcessEvent(_KIND_NAMES.get(kind, "stdout"), data=payload, pid=self.pid)

    def send_stdin(self, data: bytes) -> None:
        self.conn.send_frame(p.STDIN, data)

    def close_stdin(self) -> None:
        self.conn.send({"op": "close_stdin"})

    def feed(self, data: bytes | Iterable[bytes]) -> None:
        """Send all of ``data`` as stdin, then close stdin; stops quietly if the process ends."""
        chunks = (data[i:i + p.CHUNK] for i in range(0, len(data), p.CHUNK)) \
            if isinstance(data, (bytes, bytearray, memoryview)) else data
        try:
            for chunk in chunks:
                self.send_stdin(bytes(chunk))
            self.close_stdin()
        except (OSError, ShoalError):
            pass  # the process ended (or the stream was closed) before it took all its input

    def signal(self, signum: int) -> None:
        self.conn.send({"op": "signal", "signal": signum})

    def resize(self, cols: int, rows: int) -> None:
        self.conn.send({"op": "resize", "cols": cols, "rows": rows})

    def wait(self, on_stdout: OutputCallback | None = None, on_stderr: OutputCallback | None = None,
             max_output: int | None = None) -> ExecResult:
        """Collect output until the process ends; callbacks see every chunk as it arrives."""
        out, err = bytearray(), bytearray()
        for ev in self:
            if ev.kind in ("stdout", "pty"):
                if on_stdout:
                    on_stdout(ev.data)
                if max_output is None or len(out) < max_output:
                    out += ev.data
            elif ev.kind == "stderr":
                if on_stderr:
                    on_stderr(ev.data)
                if max_output is None or len(err) < max_output:
                    err += ev.data
        assert self.result is not None
        self.result.stdout_bytes, self.result.stderr_bytes = bytes(out), bytes(err)
        self.close()
        return self.result

    def close(self) -> None:
        """Stop following the process (it keeps running unless it has ended)."""
        self.conn.close()


class AgentClient:
    """Every operation of the agent, as blocking calls. Safe to share between threads."""

    def __init__(self, socket_path: str, sandbox_id: str = "") -> None:
        self.socket_path = socket_path
        self.sandbox_id = sandbox_id

    def connect(self, timeout: float | None = None) -> AgentConnection:
        return AgentConnection(self.socket_path, timeout, self.sandbox_id)

    def call(self, request: dict, timeout: float | None = None) -> dict:
        """A one-reply operation, answered within ``timeout`` (default ``CALL_TIMEOUT``)."""
        with self.connect(CALL_TIMEOUT if timeout is None else timeout) as conn:
            conn.send(request)
            return conn.read_msg()

    def ping(self, timeout: float = 10.0) -> dict:
        return self.call({"op": "ping"}, timeout)

    def wait_ready(self, timeout: float = 10.0) -> dict:
        """Ping until the agent answers: the listening socket exists before the agent runs."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.ping(timeout=max(0.1, deadline - time.monotonic()))
            except ShoalError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.005)

    # processes -----------------------------------------------------------------------------
    def start(self, cmd: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
              user: str | None = None, timeout: float | None = None, stdin: bool = False,
              pty: tuple[int, int] | None = None, tag: str | None = None) -> ProcessStream:
        """Start ``cmd`` and return its live stream (first event, the pid, already read)."""
        req: dict = {"op": "process.start", "cmd": list(cmd)}
        if env:
            req["env"] = env
        if cwd:
            req["cwd"] = cwd
        if user is not None:
            req["user"] = user
        if timeout:
            req["timeout"] = timeout
        if stdin:
            req["stdin"] = True
        if pty:
            req["pty"] = {"size": {"cols": pty[0], "rows": pty[1]}}
        if tag:
            req["tag"] = tag
        conn = self.connect()
        try:
            conn.send(req)
            return ProcessStream(conn)
        except BaseException:
            conn.close()
            raise

    def run(self, cmd: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
            user: str | None = None, timeout: float | None = None, input: bytes | None = None,
            on_stdout: OutputCallback | None = None, on_stderr: OutputCallback | None = None) -> ExecResult:
        """Run ``cmd`` to completion."""
        stream = self.start(cmd, env=env, cwd=cwd, user=user, timeout=timeout, stdin=input is not None)
        if input is not None:
            if len(input) <= p.CHUNK:
                stream.send_stdin(input)
                stream.close_stdin()
            else:  # feed from a thread: the process may answer before it has read everything
                threading.Thread(target=stream.feed, args=(input,), daemon=True).start()
        return stream.wait(on_stdout, on_stderr)

    def connect_process(self, pid: int | None = None, tag: str | None = None) -> ProcessStream:
        conn = self.connect()
        try:
            conn.send({"op": "process.connect", "pid": pid, "tag": tag})
            return ProcessStream(conn)
        except BaseException:
            conn.close()
            raise

    def processes(self) -> list[dict]:
        return self.call({"op": "process.list"})["processes"]

    def signal(self, pid: int, signum: int = 9) -> None:
        self.call({"op": "process.signal", "pid": pid, "signal": signum})

    def send_stdin(self, pid: int, data: bytes) -> None:
        import base64
        self.call({"op": "process.stdin", "pid": pid, "data_b64": base64.b64encode(data).decode()})

    def close_stdin(self, pid: int) -> None:
        self.call({"op": "process.close_stdin", "pid": pid})

    def resize(self, pid: int, cols: int, rows: int) -> None:
        self.call({"op": "process.resize", "pid": pid, "cols": cols, "rows": rows})

    # files ---------------------------------------------------------------------------------
    def read_file_stream(self, path: str, user: str | None = None) -> Iterator[bytes]:
        """Yield the file's bytes in chunks (raises before the first chunk if it cannot be read)."""
        conn = self.connect()
        try:
            conn.send({"op": "file.read", "path": path, "user": user})
            conn.read_msg()
            conn.handshake_done()
        except BaseException:
            conn.close()
            raise

        def chunks() -> Iterator[bytes]:
            with conn:
                while True:
                    kind, payload = conn.read()
                    if kind == p.DATA:
                        yield payload
                    else:
                        check(p.loads(payload))
                        return
        return chunks()

    def read_file(self, path: str, user: str | None = None) -> bytes:
        return b"".join(self.read_file_stream(path, user))

    def write_file(self, path: str, data: bytes | Iterable[bytes], *, user: str | None = None,
                   mode: int | None = None, append: bool = False) -> dict:
        """Write (atomically replace, unless ``append``) a file from bytes or an iterable of chunks."""
        chunks: Iterable[bytes] = (data[i:i + p.CHUNK * 4] for i in range(0, len(data), p.CHUNK * 4)) \
            if isinstance(data, (bytes, bytearray, memoryview)) else data
        with self.connect(CALL_TIMEOUT) as conn:
            conn.send({"op": "file.write", "path": path, "user": user, "mode": mode, "append": append})
            try:
                for chunk in chunks:
                    if chunk:
                        conn.send_frame(p.DATA, bytes(chunk))
                conn.send({"op": "eof"})
            except BrokenPipeError:
                pass  # the agent refused early; its reply says why
            return conn.read_msg()["entry"]

    def stat(self, path: str, user: str | None = None) -> dict:
        return self.call({"op": "file.stat", "path": path, "user": user})["entry"]

    def exists(self, path: str, user: str | None = None) -> bool:
        try:
            self.stat(path, user)
            return True
        except NotFound:
            return False

    def list_dir(self, path: str, depth: int = 1, user: str | None = None) -> list[dict]:
        return self.call({"op": "file.list", "path": path, "depth": depth, "user": user})["entries"]

    def mkdir(self, path: str, parents: bool = True, user: str | None = None) -> dict:
        return self.call({"op": "file.mkdir", "path": path, "parents": parents, "user": user})["entry"]

    def move(self, src: str, dst: str, user: str | None = None) -> dict:
        return self.call({"op": "file.move", "src": src, "dst": dst, "user": user})["entry"]

    def remove(self, path: str, user: str | None = None) -> None:
        self.call({"op": "file.remove", "path": path, "user": user})

    def watch(self, path: str, recursive: bool = False, user: str | None = None) -> Iterator[dict]:
        """Yield filesystem events (dicts with ``type``, ``name``, ``path``) until closed."""
        conn = self.connect()
        try:
            conn.send({"op": "file.watch", "path": path, "recursive": recursive, "user": user})
            conn.read_msg()
            conn.handshake_done()
        except BaseException:
            conn.close()
            raise

        def events() -> Iterator[dict]:
            with conn:
                while True:
                    msg = conn.read_msg()
                    if msg.get("event") == "end":
                        return
                    yield msg
        return events()
