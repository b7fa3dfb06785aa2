"""The ``shoal`` command. Each verb is a few lines over the engine; errors are one line, never a
traceback, and a command run in a sandbox passes its exit code through.

Script contract (kept stable): ``shoal create`` prints only the id on stdout; ``shoal exec`` and
``shoal run`` exit with the command's exit code (124 on timeout, 127 if it cannot be executed).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Optional

import typer

from shoal.cli.output import EXIT_NOT_FOUND, EXIT_TIMEOUT, fail, fail_on, progress_display

if TYPE_CHECKING:
    from shoal.engine import Engine
    from shoal.runtime.agent_client import ExecResult

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Shoal: fast, isolated sandboxes for AI agents on your own Linux box.")
template_app = typer.Typer(no_args_is_help=True, help="Build, list and remove templates.")
app.add_typer(template_app, name="template")

_CMD: dict = {}  # options may follow ID; everything after `--` is the command
_engine_instance: Optional["Engine"] = None


def engine(reconcile: bool = False) -> "Engine":
    global _engine_instance
    if _engine_instance is None:
        from shoal.engine import Engine
        _engine_instance = Engine()
    if reconcile:
        _engine_instance.reconcile()
    return _engine_instance


def _command(cmd: list[str] | None) -> list[str]:
    """The command after ``--`` (click keeps a ``--`` that follows a positional argument)."""
    cmd = list(cmd or [])
    return cmd[1:] if cmd[:1] == ["--"] else cmd


def _parse_env(pairs: list[str] | None) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--env expects KEY=VALUE, got {pair!r}", 2)
        env[key] = value
    return env


def _ensure_template(eng: "Engine", name: str) -> None:
    """Build a known template on first use, with a progress display (so `shoal run` just works)."""
    if not eng.templates.get(name).built:
        with progress_display(f"building template {name}") as progress:
            eng.templates.build(name, progress=progress)


def _stream_result(eng: "Engine", sid: str, cmd: list[str], env: dict[str, str], cwd: str | None,
                   user: str | None, timeout: float | None, forward_stdin: bool) -> "ExecResult":
    out, err = sys.stdout.buffer, sys.stderr.buffer

    def write(stream):  # noqa: ANN001, ANN202
        def emit(data: bytes) -> None:
            stream.write(data)
            stream.flush()
        return emit

    agent = eng.agent(sid)
    stream = agent.start(cmd, env=env or None, cwd=cwd, user=user, timeout=timeout, stdin=forward_stdin)
    if forward_stdin:
        def pump() -> None:
            stdin = sys.stdin.buffer
            stream.feed(iter(lambda: stdin.read1(65536), b""))
        threading.Thread(target=pump, daemon=True).start()
    return stream.wait(write(out), write(err), max_output=0)


def _exit_with(result: "ExecResult", timeout: float | None) -> None:
    if result.timed_out:
        fail(f"command timed out after {timeout:g} s and was killed", EXIT_TIMEOUT)
    raise typer.Exit(result.exit_code)


def _exec_errors(exc: BaseException) -> None:
    from shoal.errors import NotFound
    if isinstance(exc, NotFound) and "cannot execute" in exc.message:
        fail(exc.message, EXIT_NOT_FOUND)
    fail_on(exc)


# --- sandboxes ------------------------------------------------------------------------------
@app.command(context_settings=_CMD)
def run(cmd: list[str] = typer.Argument(None, metavar="-- CMD...", help="Command and arguments."),
        template: str = typer.Option("minimal", "--template", "-t", help="Template to start from."),
        cpu: float = typer.Option(1.0, help="CPU cores."), memory: int = typer.Option(512, help="Memory in MiB."),
        env: list[str] = typer.Option(None, "--env", "-e", help="KEY=VALUE, repeatable."),
        cwd: str = typer.Option(None, help="Working directory inside the sandbox."),
        user: str = typer.Option(None, help="User inside the sandbox (default root)."),
        timeout: float = typer.Option(None, help="Kill the command after this many seconds.")) -> None:
    """Create a sandbox, run CMD in it, print its output, delete it; exit with CMD's exit code."""
    cmd = _command(cmd)
    if not cmd:
        fail("missing command: shoal run [--template T] -- CMD...", 2)
    sid = None
    try:
        eng = engine(reconcile=True)
        _ensure_template(eng, template)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        sid = eng.create(template, cpu=cpu, memory_mb=memory, owner_pid=os.getpid()).id
        result = _stream_result(eng, sid, cmd, _parse_env(env), cwd, user, timeout, not sys.stdin.isatty())
    except (typer.Exit, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001
        _cleanup(sid)
        _exec_errors(exc)
    _cleanup(sid)
    _exit_with(result, timeout)


def _cleanup(sid: str | None) -> None:
    if sid is not None:
        try:
            engine().destroy(sid)
        except BaseException:  # noqa: BLE001 - reconcile finishes it on the next start
            pass


@app.command()
def create(template: str = typer.Option("minimal", "--template", "-t"),
           cpu: float = typer.Option(1.0, help="CPU cores."), memory: int = typer.Option(512, help="Memory in MiB."),
           disk: int = typer.Option(1024, help="Writable layer size in MiB."),
           env: list[str] = typer.Option(None, "--env", "-e", help="KEY=VALUE, repeatable.")) -> None:
    """Create a sandbox that stays until `shoal rm`; print its id alone on stdout."""
    try:
        eng = engine(reconcile=True)
        _ensure_template(eng, template)
        rec = eng.create(template, cpu=cpu, memory_mb=memory, disk_mb=disk, env=_parse_env(env))
    except BaseException as exc:  # noqa: BLE001
        fail_on(exc)
    typer.echo(rec.id)


@app.command("exec", context_settings=_CMD)
def exec_(sandbox_id: str = typer.Argument(..., metavar="ID"),
          cmd: list[str] = typer.Argument(None, metavar="-- CMD..."),
          env: list[str] = typer.Option(None, "--env", "-e", help="KEY=VALUE, repeatable."),
          cwd: str = typer.Option(None), user: str = typer.Option(None),
          timeout: float = typer.Option(None, help="Kill the command after this many seconds."),
          interactive: bool = typer.Option(None, "--interactive/--no-interactive", "-i",
                                           help="Forward stdin (default: when stdin is not a terminal).")) -> None:
    """Run CMD in a running sandbox; exit with its exit code."""
    cmd = _command(cmd)
    if not cmd:
        fail("missing command: shoal exec ID -- CMD...", 2)
    forward = (not sys.stdin.isatty()) if interactive is None else interactive
    try:
        result = _stream_result(engine(), sandbox_id, cmd, _parse_env(env), cwd, user, timeout, forward)
    except (typer.Exit, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001
        _exec_errors(exc)
    _exit_with(result, timeout)


@app.command()
def shell(sandbox_id: str = typer.Argument(..., metavar="ID"), user: str = typer.Option(None)) -> None:
    """Open an interactive terminal in a sandbox."""
    from shoal.cli.terminal import interactive_shell
    try:
        code = interactive_shell(engine().agent(sandbox_id))
    except BaseException as exc:  # noqa: BLE001
        fail_on(exc)
    raise typer.Exit(code)


@app.command()
def cp(src: str = typer.Argument(..., help="Local path or ID:/path."),
       dst: str = typer.Argument(..., help="Local path or ID:/path.")) -> None:
    """Copy files or directories between the host and a sandbox (ID:/path on either side)."""
    from shoal.cli.copy import copy
    try:
        copy(engine(), src, dst)
    except BaseException as exc:  # noqa: BLE001
        fail_on(exc)


@app.command("ls")
def list_(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List sandboxes."""
    try:
        records = engine(reconcile=True).list()
    except BaseException as exc:  # noqa: BLE001
        fail_on(exc)
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in records], indent=2))
        return
    from rich.console import Console
    from rich.table import Table
    table = Table("ID", "TEMPLATE", "STATE", "CPU", "MEMORY", "AGE", box=None)
    now = time.time()
    for r in records:
        table.add_row(r.id, r.template, r.state.value, f"{r.cpu:g}", f"{r.memory_mb} MiB", _age(now - r.created_at))
    Console().print(table)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


@app.command()
def rm(sandbox_ids: list[str] = typer.Argument(..., metavar="ID...")) -> None:
    """Delete sandboxes (everything they had on the host goes with them)."""
    failed = False
    for sid in sandbox_ids:
        try:
            engine().destroy(sid)
        except BaseException as exc:  # noqa: BLE001
            from shoal.errors import ShoalError
            if not isinstance(exc, ShoalError):
                fail_on(exc)
            sys.stderr.write(f"shoal: {exc.message}\n")
            failed = True
    if failed:
        raise typer.Exit(1)


# --- templates ------------------------------------------------------------------------------
@template_app.command("build")
def template_build(name: str, force: bool = typer.Option(False, "--force", help="Rebuild even if cached.")) -> None:
    """Build a template image (cached: instant when up to date)."""
    try:
        from shoal.images import TemplateStore
        store = TemplateStore()
        with progress_display(f"building {name}") as progress:
            info = store.build(name, force=force, progress=progress)
    except BaseException as exc:  # noqa: BLE001
        fail_on(exc)
    typer.echo(f"{info.name}: {(info.size_bytes or 0) / 1048576:.1f} MiB at {info.image_path}")


@template_app.command("ls")
def template_ls(as_json: bool = typer.Option(False, "--json")) -> None:
    """List templates and whether they are built."""
    from shoal.images import TemplateStore
    infos = TemplateStore().list()
    if as_json:
        typer.echo(json.dumps([i.to_dict() for i in infos], indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table
    table = Table("NAME", "BUILT", "SIZE", "DESCRIPTION", box=None)
    for i in infos:
        size = f"{i.size_bytes / 1048576:.1f} MiB" if i.size_bytes else "-"
        table.add_row(i.name, "yes" if i.built else "no", size, i.description)
    Console().print(table)


@template_app.command("rm")
def template_rm(name: str) -> None:
    """Remove a built template (refused while sandboxes use it)."""
    try:
        from shoal.images import TemplateStore
        TemplateStore().remove(name)
    except BaseException as exc:  # noqa: BLE001
        fail_on(exc)


# --- daemon and keys -------------------------------------------------------------------------
keys_app = typer.Typer(no_args_is_help=True, help="Create, list and revoke API keys (local, as root).")
app.add_typer(keys_app, name="keys")


@app.command()
def serve(host: str = typer.Option(None, help="Bind address (env SHOAL_HOST, default 127.0.0.1)."),
          port: int = typer.Option(None, help="Port (env SHOAL_PORT, default 4040)."),
          log_level: str = typer.Option("info", help="debug, info, warning, error.")) -> None:
    """Run the Shoal daemon (REST API, MCP, metrics) in the foreground."""
    from shoal.server.daemon import DEFAULT_HOST, DEFAULT_PORT, DaemonConfig, serve as run_daemon
    try:
        run_daemon(DaemonConfig(host=host or os.environ.get("SHOAL_HOST") or DEFAULT_HOST,
                                port=port or int(os.environ.get("SHOAL_PORT") or DEFAULT_PORT), log_level=log_level))
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, (SystemExit, KeyboardInterrupt)):
            raise SystemExit(0) from None
        fail_on(exc)


def _key_store():  # noqa: ANN202
    from shoal.engine.keys import KeyStore
    from shoal.settings import Settings
    return KeyStore(Settings().db_path)


@keys_app.command("create")
def keys_create(name: str = typer.Option("default", help="A label for the key."),
                max_sandboxes: int = typer.Option(None, help="Concurrent sandboxes allowed."),
                max_memory: int = typer.Option(None, help="Total MiB allowed across its sandboxes.")) -> None:
    """Create an API key and print it (it is shown only once)."""
    try:
        _key, secret = _key_store().create(name, max_sandboxes, max_memory)
    except BaseException as exc:  # noqa: BLE001
        fail_on(exc)
    typer.echo(secret)


@keys_app.command("ls")
def keys_ls(as_json: bool = typer.Option(False, "--json")) -> None:
    """List API keys (never their secrets)."""
    keys = _key_store().list()
    if as_json:
        typer.echo(json.dumps([k.to_dict() for k in keys], indent=2))
        return
    from rich.console import Console
    from rich.table import Table
    table = Table("ID", "NAME", "REVOKED", "MAX SANDBOXES", "MAX MEMORY", box=None)
    for k in keys:
        table.add_row(k.id, k.name, "yes" if k.revoked else "no", str(k.max_sandboxes or "-"),
                      f"{k.max_memory_mb} MiB" if k.max_memory_mb else "-")
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., metavar="ID_OR_NAME")) -> None:
    """Revoke a key: its requests fail from the next second on."""
    try:
        _key_store().revoke(key_id)
    except BaseException as exc:  # noqa: BLE001
        fail_on(exc)


# --- benchmarks -----------------------------------------------------------------------------
@app.command()
def bench(as_json: bool = typer.Option(False, "--json", help="Print the JSON report only."),
          iterations: int = typer.Option(30, "-n", help="Samples per measurement."),
          template: str = typer.Option("minimal", "--template", "-t"),
          api: bool = typer.Option(True, "--api/--no-api", help="Also measure through the daemon's REST API.")) -> None:
    """Measure create → first result, exec round trip, idle memory (and the same through the REST
    API, with exec throughput), each beside a baseline measured in the same run."""
    try:
        from shoal.bench import api as api_bench
        from shoal.bench.run import report, run_benchmarks
        eng = engine(reconcile=True)
        result = {"engine": run_benchmarks(eng, iterations=iterations, template=template)}
        if api:
            result["api"] = api_bench.run_api_benchmarks(eng.settings, iterations=iterations, template=template)
    except BaseException as exc:  # noqa: BLE001
        fail_on(exc)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(report(result["engine"]))
    if api:
        typer.echo(api_bench.report(result["api"]))


def main() -> None:
    try:
        app()
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001
        fail_on(exc)


if __name__ == "__main__":
    main()
