"""``shoal shell``: a real terminal into a sandbox (raw mode, resize, exit code)."""

from __future__ import annotations

import os
import select
import shutil
import signal
import sys
import termios
import tty

from shoal.runtime.agent_client import AgentClient


def _shell_argv(agent: AgentClient) -> list[str]:
    for path in ("/bin/bash", "/bin/sh"):
        if agent.exists(path):
            return [path, "-l"]
    return ["/bin/sh"]


def interactive_shell(agent: AgentClient, user: str | None = None) -> int:
    """Run a login shell on a PTY, wiring it to this terminal until it exits; return its exit code."""
    size = shutil.get_terminal_size()
    stream = agent.start(_shell_argv(agent), pty=(size.columns, size.lines), user=user)
    stdin_fd = sys.stdin.fileno()
    is_tty = os.isatty(stdin_fd)
    saved = termios.tcgetattr(stdin_fd) if is_tty else None
    wake_r, wake_w = os.pipe()

    def on_resize(*_: object) -> None:
        os.write(wake_w, b"r")

    old_handler = signal.signal(signal.SIGWINCH, on_resize)
    try:
        if is_tty:
            tty.setraw(stdin_fd)
        events = iter(stream)
        sock = stream.conn.sock
        out = sys.stdout.buffer
        inputs = [sock, stdin_fd, wake_r]
        while True:
            ready = [sock] if stream.conn.reader.buffered() else select.select(inputs, [], [])[0]
            if wake_r in ready:
                os.read(wake_r, 64)
                size = shutil.get_terminal_size()
                stream.resize(size.columns, size.lines)
            if stdin_fd in ready:
                data = os.read(stdin_fd, 4096)
                if data:
                    stream.send_stdin(data)
                else:  # our stdin ended (a pipe): stop reading it, let the shell finish
                    inputs.remove(stdin_fd)
                    stream.send_stdin(b"\x04")
            if sock in ready:
                ev = next(events)
                if ev.kind == "end":
                    break
                out.write(ev.data)
                out.flush()
    finally:
        if saved is not None:
            termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
        signal.signal(signal.SIGWINCH, old_handler)
        os.close(wake_r)
        os.close(wake_w)
        stream.close()
    assert stream.result is not None
    return stream.result.exit_code
