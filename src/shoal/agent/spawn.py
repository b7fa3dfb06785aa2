"""Starting a child process as fast as the kernel allows.

``subprocess`` costs 8 ms to import (enum, signal, selectors, threading) on a 2-core machine,
more than the whole exec it serves, so the agent calls the same C primitive it uses,
``_posixsubprocess.fork_exec`` (vfork + exec, 0.8 ms here), and falls back to ``subprocess``
only on Python versions whose primitive signature we do not know.

Every child gets ``oom_score_adj`` 1000: when a sandbox fills its memory (a hog, a thousand small
processes, a full RAM-backed writable layer), the kernel kills user processes first, never the agent
that answers the host (its own score stays 0; where the daemon holds CAP_SYS_RESOURCE the host also
lowers it to -1000, see ``shoal.runtime.linux.oom``). The agent writes the child's score right after
the spawn returns (the child has exec'd by then), not in the child: a hook in the child would force
fork instead of vfork and cost about 1 ms per exec. The price is a window of microseconds in which a
program that forks at once could leave a grandchild with the agent's score; that only protects the
program as much as the agent, and sandbox code can take its agent down anyway (see the threat model):
the score is there so that ordinary workloads never take the agent with them.
"""

from __future__ import annotations

import os
import sys

_V = sys.version_info[:2]
#: The ``oom_score_adj`` of every process the agent starts: first in line for the OOM killer.
CHILD_OOM_SCORE = b"1000"


class SpawnError(Exception):
    """The child could not be started: ``errno`` and which step (``exec``, ``chdir``, ``setup``)."""

    def __init__(self, errno: int, step: str, argv0: str) -> None:
        super().__init__(errno, step)
        self.errno, self.step, self.argv0 = errno, step, argv0


def _executable_list(argv0: bytes, env: dict[str, str]) -> tuple[bytes, ...]:
    if b"/" in argv0:
        return (argv0,)
    path = env.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    return tuple(os.path.join(os.fsencode(d or "."), argv0) for d in path.split(":"))


def spawn(argv: list[str], env: dict[str, str], cwd: str | None, stdin: int, stdout: int, stderr: int,
          uid: int = 0, gid: int = 0, groups: list[int] | None = None, keep_fds: tuple[int, ...] = (),
          pty: bool = False) -> int:
    """Start ``argv`` in a new session (so a timeout or kill reaches its whole tree); return its pid.

    The child gets exactly ``stdin``/``stdout``/``stderr`` as fds 0-2; every other fd is closed. With
    ``pty`` the session takes fd 0 (a pty slave) as its controlling terminal.
    """
    args = [os.fsencode(a) for a in argv]
    env_list = [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()]
    switch = uid != 0 or gid != 0
    preexec = _controlling_tty_setter() if pty else None  # None keeps vfork: no Python in the child
    errpipe_read, errpipe_write = os.pipe2(os.O_CLOEXEC)
    try:
        if _V in ((3, 11), (3, 12)):
            import _posixsubprocess
            pid = _posixsubprocess.fork_exec(
                args, _executable_list(args[0], env), True, tuple(sorted((*keep_fds, errpipe_write))), cwd, env_list,
                stdin, -1, -1, stdout, -1, stderr, errpipe_read, errpipe_write,
                True, True, -1,
                gid if switch else None, groups if switch else None, uid if switch else None,
                -1, preexec, True,
            )
        else:  # pragma: no cover - other Pythons: slower, same behaviour
            import subprocess
            proc = subprocess.Popen(
                argv, env=env, cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr,
                start_new_session=True, preexec_fn=preexec, pass_fds=keep_fds,
                user=uid if switch else None, group=gid if switch else None,
                extra_groups=groups if switch else None,
            )
            _first_in_line(proc.pid)
            proc._child_created = False  # the agent's reaper owns waiting for it
            return proc.pid
    finally:
        os.close(errpipe_write)
    try:
        data = b""
        while True:
            part = os.read(errpipe_read, 50000)
            if not part:
                break
            data += part
    finally:
        os.close(errpipe_read)
    if data:
        os.waitpid(pid, 0)  # the child never ran: reap it here, before the reaper sees it
        _name, hex_errno, msg = data.split(b":", 2)
        # 3.11 says only "noexec" for any failure before exec; chdir is the one that can fail there.
        step = "exec" if not msg.startswith(b"noexec") else ("chdir" if cwd else "setup")
        raise SpawnError(int(hex_errno, 16), step, argv[0])
    _first_in_line(pid)
    return pid


def _first_in_line(pid: int) -> None:
    """Make ``pid`` the OOM killer's first choice (see the module docstring); gone already is fine."""
    try:
        fd = os.open(f"/proc/{pid}/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.write(fd, CHILD_OOM_SCORE)
    except OSError:
        pass
    finally:
        os.close(fd)


def _controlling_tty_setter():  # noqa: ANN202
    """A child-side hook making fd 0 the controlling terminal; imports happen here, in the parent,
    because importing after fork in a threaded process can deadlock on the import lock."""
    import fcntl
    import termios

    ioctl, request = fcntl.ioctl, termios.TIOCSCTTY

    def take() -> None:
        ioctl(0, request, 0)

    return take
