"""``shoal shell``: a real terminal into a sandbox over the daemon's PTY WebSocket (raw mode,
SIGWINCH → resize, the shell's exit code)."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import sys
import termios
import threading
import tty

from shoal.client import Sandbox
from shoal.errors import ShoalError


def _shell_argv(sb: Sandbox) -> list[str]:
    for path in ("/bin/bash", "/bin/sh"):
        if sb.files.exists(path):
            return [path, "-l"]
    return ["/bin/sh"]


def interactive_shell(sb: Sandbox, user: str | None = None) -> int:
    """Run a login shell on a PTY, wiring it to this terminal until it exits; return its exit code."""
    size = shutil.get_terminal_size()
    pty = sb.pty.create(_shell_argv(sb), cols=size.columns, rows=size.lines, user=user)
    stdin_fd = sys.stdin.fileno()
    is_tty = os.isatty(stdin_fd)
    saved = termios.tcgetattr(stdin_fd) if is_tty else None
    wake_r, wake_w = os.pipe()
    out = sys.stdout.buffer

    def on_resize(*_: object) -> None:
        os.write(wake_w, b"r")

    def pump_output() -> None:
        try:
            for data in pty:
                out.write(data)
                out.flush()
        except Exception:  # noqa: BLE001 - wait() below reports what went wrong
            pass
        finally:
            os.write(wake_w, b"e")

    old_handler = signal.signal(signal.SIGWINCH, on_resize)
    try:
        if is_tty:
            tty.setraw(stdin_fd)
        threading.Thread(target=pump_output, daemon=True, name="shoal-shell-output").start()
        inputs = [stdin_fd, wake_r]
        while True:
            try:
                ready = select.select(inputs, [], [])[0]
            except InterruptedError:
                continue
            if wake_r in ready:
                wake = os.read(wake_r, 64)
                if b"e" in wake:
                    break
                size = shutil.get_terminal_size()
                with contextlib.suppress(ShoalError):  # the shell is gone: its end is on the way
                    pty.resize(size.columns, size.lines)
            if stdin_fd in ready:
                data = os.read(stdin_fd, 4096)
                if not data:  # our stdin ended (a pipe): stop reading it, let the shell finish
                    inputs.remove(stdin_fd)
                with contextlib.suppress(ShoalError):
                    pty.send(data or b"\x04")
    finally:
        if saved is not None:
            termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
        signal.signal(signal.SIGWINCH, old_handler)
    try:
        return pty.wait()
    finally:
        pty.close()
        os.close(wake_r)
        os.close(wake_w)
