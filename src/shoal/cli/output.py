"""How the CLI talks to people: one-line errors on stderr, a progress display for long work."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn

from shoal.errors import ShoalError

#: Exit codes of the CLI's own failures (a command's exit code is passed through unchanged).
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 124
EXIT_NOT_FOUND = 127


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    sys.stderr.write(f"shoal: {message}\n")
    sys.stderr.flush()
    raise SystemExit(code)


def fail_on(exc: BaseException) -> NoReturn:
    """The one place an exception becomes a CLI message; tracebacks only with SHOAL_DEBUG=1."""
    if os.environ.get("SHOAL_DEBUG"):
        raise exc
    if isinstance(exc, ShoalError):
        fail(exc.message)
    if isinstance(exc, KeyboardInterrupt):
        fail("interrupted", 130)
    if isinstance(exc, BrokenPipeError):
        raise SystemExit(141)
    fail(f"internal error: {type(exc).__name__}: {exc} (set SHOAL_DEBUG=1 for details)")


@contextmanager
def progress_display(title: str) -> Iterator[Callable[[str, float | None], None]]:
    """A rich progress bar on stderr when it is a terminal, plain lines otherwise."""
    if not sys.stderr.isatty():
        last = [""]

        def plain(message: str, fraction: float | None) -> None:
            if fraction is not None and message != last[0]:
                last[0] = message
                sys.stderr.write(f"{title}: {message}\n")

        yield plain
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                  TextColumn("{task.fields[line]}", style="dim"), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(title, total=1.0, line="")

        def update(message: str, fraction: float | None) -> None:
            if fraction is None:
                bar.update(task, line=message[-60:])
            else:
                bar.update(task, completed=fraction, line=message[-60:])

        yield update
