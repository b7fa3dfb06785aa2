"""A small process that makes sandboxes' user namespace pairs for the process that started it.

Making a pair forks the maker (``budgets.make_userns``), and forking the daemon costs in proportion to
its memory and stalls its other threads while the page tables are copied: it put ~10 ms on a create
when the pool had run dry and made a refill beside other sandboxes' work unwelcome. This process
holds little (the stdlib, ``budgets`` and ``mounts``), so its forks are cheap, and the pool can refill
the moment a namespace is taken.

Protocol, one line each way over its stdin/stdout: ``<absolute path>\\n`` → ``ok\\n`` or
``err <message>\\n``. The path is named after the requesting process (see ``userns_pool``), so what a
dead requester left is swept as before. The maker exits at end of input: when its parent dies, it goes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path


class UsernsMaker:
    """The requesting side: one maker process, started on first use and again if it died."""

    def __init__(self, uid_base: int, uid_count: int) -> None:
        self.uid_base, self.uid_count = uid_base, uid_count
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def make(self, target: Path) -> None:
        """Make a pair at ``target`` (raises OSError as ``budgets.make_userns`` does)."""
        with self._lock:
            proc = self._process()
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(f"{target}\n".encode())
                proc.stdin.flush()
                reply = proc.stdout.readline().decode(errors="replace").strip()
            except OSError as exc:
                self._stop()
                raise OSError(exc.errno or 0, f"the user namespace maker stopped: {exc}") from exc
            if reply == "ok":
                return
            if not reply:  # it died: start a new one next time
                self._stop()
                raise OSError(0, "the user namespace maker exited")
            raise OSError(0, reply.removeprefix("err ").strip() or "the user namespace maker failed")

    def _process(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": _package_root(),
                   "PYTHONDONTWRITEBYTECODE": "1"}
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c",
                 "import sys; sys.path.insert(0, sys.argv[1]); from shoal.runtime.linux.userns_maker import serve; "
                 "serve(int(sys.argv[2]), int(sys.argv[3]))",
                 _package_root(), str(self.uid_base), str(self.uid_count)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                close_fds=True, cwd="/")
        return self._proc

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()  # our own child, by its pid
            proc.wait()

    def close(self) -> None:
        with self._lock:
            self._stop()


def _package_root() -> str:
    """The directory that holds the ``shoal`` package this process runs."""
    return str(Path(__file__).resolve().parents[3])


def serve(uid_base: int, uid_count: int) -> None:
    """The maker's loop (runs in the child process)."""
    from shoal.runtime.linux import budgets

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    for raw in stdin:
        line = raw.decode(errors="replace").strip()
        path = Path(line)
        if not path.is_absolute() or "\0" in line:
            stdout.write(b"err not an absolute path\n")
        else:
            try:
                budgets.make_userns(path, uid_base, uid_count)
                stdout.write(b"ok\n")
            except OSError as exc:
                stdout.write(f"err {exc}\n".replace("\n", " ").rstrip().encode() + b"\n")
        stdout.flush()
    os._exit(0)
