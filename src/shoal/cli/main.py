"""The ``shoal`` command. Sandbox verbs (run, create, exec, shell, cp, ls, rm, pause, resume) go
through the daemon with the Python SDK; ``template``, ``keys``, ``serve`` and ``bench`` work on this
host directly. Errors are one line, never a traceback, and a command run in a sandbox passes its
exit code through.

Script contract (kept stable): ``shoal create`` prints only the id on stdout; ``shoal exec`` and
``shoal run`` exit with the command's exit code (124 on timeout, 127 if it cannot be executed).

The daemon is ``SHOAL_URL`` (default http://127.0.0.1:4040) with ``SHOAL_API_KEY`` (default: the
local key, for root); the default local daemon is started on first use if it is not running.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click
import typer

from shoal.cli.output import EXIT_NOT_FOUND, EXIT_TIMEOUT, fail, fail_on, progress_display

if TYPE_CHECKING:
    from shoal.cli.remote import Daemon
    from shoal.client import CommandResult, Sandbox
    from shoal.engine import Engine

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Shoal: fast, isolated sandboxes for AI agents on your own Linux box.")
template_app = typer.Typer(no_args_is_help=True, help="Build, list and remove templates.")
app.add_typer(template_app, name="template")
daemon_app = typer.Typer(no_args_is_help=True, help="The daemon the CLI started for you.")
app.add_typer(daemon_app, name="daemon")

_CMD: dict = {}  # options may follow ID; everything after `--` is the command
_engine_instance: Engine | None = None
_daemon: Daemon | None = None
#: `shoal run`'s sandbox expires this long after its last sign of life (if the CLI is killed -9).
RUN_TTL = 60
#: `shoal create`'s sandbox lives until `shoal rm`, at most this long (the API's upper bound).
CREATE_TTL = 7 * 24 * 3600


def engine(reconcile: bool = False) -> Engine:
    """The local engine, for the verbs that do not go through the daemon (bench)."""
    global _engine_instance
    if _engine_instance is None:
        from shoal.engine import Engine
        _engine_instance = Engine()
    if reconcile:
        _engine_instance.reconcile()
    return _engine_instance


def daemon() -> Daemon:
    """The daemon at SHOAL_URL (started here if it is the default local one and is down)."""
    global _daemon
    if _daemon is None:
        from shoal.cli.remote import connect
        _daemon = connect()
    return _daemon


def sandbox(sandbox_id: str) -> Sandbox:
    from shoal.client import Sandbox
    return Sandbox.connect(sandbox_id, **daemon().kwargs)


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


def _ensure_template(name: str) -> None:
    """Build a known template on first use with a progress display, when the daemon is on this host
    and we may (root); otherwise the daemon builds it (silently) on create."""
    from shoal.client._config import is_loopback
    if os.geteuid() != 0 or not is_loopback(daemon().url):
        return
    from shoal.images import TemplateStore
    store = TemplateStore()
    if not store.get(name).built:
        with progress_display(f"building template {name}") as progress:
            store.build(name, progress=progress)


def _stream_result(sb: Sandbox, cmd: list[str], env: dict[str, str], cwd: str | None, user: str | None,
                   timeout: float | None, forward_stdin: bool) -> CommandResult:
    """Run ``cmd``, writing its output byte for byte as it comes, stdin streamed when forwarded."""
    out, err = sys.stdout.buffer, sys.stderr.buffer
    handle = sb.commands.run(cmd, env=env or None, cwd=cwd, user=user, timeout=timeout,
                             stdin=sys.stdin.buffer if forward_stdin else None, background=True)
    for chunk in handle:
        stream = err if chunk.stream == "stderr" else out
        stream.write(chunk.data)
        stream.flush()
    return handle.wait()


def _exit_with(result: CommandResult, timeout: float | None) -> None:
    if result.timed_out:
        fail(f"command timed out after {timeout:g} s and was killed", EXIT_TIMEOUT)
    raise typer.Exit(result.exit_code)


def _exec_errors(exc: BaseException) -> None:
    from shoal.errors import NotFound
    if isinstance(exc, NotFound) and "cannot execute" in exc.message:
        fail(exc.message, EXIT_NOT_FOUND)
    fail_on(exc)


def _interrupt_on_term() -> None:
    """SIGTERM and SIGHUP end the CLI like Ctrl-C does (so `shoal run` still cleans up)."""
    def raise_interrupt(*_: object) -> None:
        raise KeyboardInterrupt
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_interrupt)


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
    env_vars = _parse_env(env)
    sb = None
    stop = threading.Event()
    try:
        _interrupt_on_term()
        _ensure_template(template)
        from shoal.client import Sandbox
        sb = Sandbox.create(template, cpu=cpu, memory_mb=memory, timeout=RUN_TTL,
                            metadata={"created_by": "shoal run"}, **daemon().kwargs)
        threading.Thread(target=_keep_alive, args=(sb, stop), daemon=True, name="shoal-keepalive").start()
        result = _stream_result(sb, cmd, env_vars, cwd, user, timeout, not sys.stdin.isatty())
    except (typer.Exit, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001
        stop.set()
        _cleanup(sb)
        _exec_errors(exc)
    stop.set()
    _cleanup(sb)
    _exit_with(result, timeout)


def _keep_alive(sb: Sandbox, stop: threading.Event) -> None:
    """Push the expiry of `shoal run`'s sandbox forward while the CLI lives."""
    from shoal.errors import ShoalError
    while not stop.wait(RUN_TTL / 4):
        try:
            sb.set_timeout(RUN_TTL)
        except ShoalError:
            pass


def _cleanup(sb: Sandbox | None) -> None:
    if sb is not None:
        try:
            sb.kill()
        except BaseException:  # noqa: BLE001 - it expires on its own within RUN_TTL
            pass
        sb.close()


@app.command()
def create(template: str = typer.Option("minimal", "--template", "-t"),
           cpu: float = typer.Option(1.0, help="CPU cores."), memory: int = typer.Option(512, help="Memory in MiB."),
           disk: int = typer.Option(1024, help="Writable layer size in MiB."),
           layer: str = typer.Option("disk", help="Writable layer: disk (on the host's disk, survives restarts) "
                                     "or ram (tmpfs, counted as memory)."),
           env: list[str] = typer.Option(None, "--env", "-e", help="KEY=VALUE, repeatable."),
           timeout: int = typer.Option(CREATE_TTL, help="Delete it after this many seconds (default 7 days)."),
           metadata: list[str] = typer.Option(None, "--metadata", "-m", help="KEY=VALUE label, repeatable."),
           network: list[str] = typer.Option(None, "--network", help="Private network to join, repeatable."),
           name: str = typer.Option(None, "--name", help="Its DNS name in its private networks."),
           snapshot: str = typer.Option(None, "--snapshot", help="Start from this snapshot's files (id or name; "
                                        "its template is used)."),
           no_internet: bool = typer.Option(False, "--no-internet", help="Reach nothing past the host."),
           allow_out: list[str] = typer.Option(None, "--allow-out", help="CIDR, IP or domain (*.x ok), repeatable."),
           deny_out: list[str] = typer.Option(None, "--deny-out", help="CIDR or IP (0.0.0.0/0: all), repeatable; "
                                              "an allow beats a deny."),
           volume: list[str] = typer.Option(None, "--volume", "-v", help="NAME:/path[:ro] (shoal volume create), "
                                            "repeatable."),
           standby_after: float = typer.Option(None, "--standby-after", help="Idle seconds before it freezes "
                                               "itself (the next request wakes it); 0: never."),
           ) -> None:
    """Create a sandbox that stays until `shoal rm`; print its id alone on stdout."""
    env_vars, labels = _parse_env(env), _parse_env(metadata)
    try:
        from shoal.cli.volumes import parse_mount
        mounts = [parse_mount(v) for v in volume or []]
        if snapshot is None:
            _ensure_template(template)
        from shoal.client import Sandbox
        sb = Sandbox.create(template, cpu=cpu, memory_mb=memory, disk_mb=disk, env=env_vars, metadata=labels,
                            timeout=timeout, layer=layer, networks=network or None, name=name, snapshot=snapshot,
                            internet=False if no_internet else None,
                            egress={"allow_out": allow_out or [], "deny_out": deny_out or []}
                            if allow_out or deny_out else None, volumes=mounts or None,
                            standby_after=standby_after, **daemon().kwargs)
        sb.close()
    except BaseException as exc:  # noqa: BLE001
        fail_on(exc)
    typer.echo(sb.id)


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
    env_vars = _parse_env(env)
    try:
        result = _stream_result(sandbox(sandbox_id), cmd, env_vars, cwd, user, timeout, forward)
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
        code = interactive_shell(sandbox(sandbox_id), user=user)
    except BaseException as exc:  # noqa: BLE001
        fail_on(exc)
    raise typer.Exit(code)


@app.command()
def cp(src: str = typer.Argument(..., help="Local path or ID:/path."),
       dst: str = typer.Argument(..., help="Local path or ID:/path."),
       max_bytes: int = typer.Option(None, min=0, show_default=False,
                                     help="Out of a sandbox: at most this many bytes [16 GiB]."),
       max_file_bytes: int = typer.Option(None, min=0, show_default=False,
                                          help="Out of a sandbox: at most this per file [4 GiB]."),
       max_entries: int = typer.Option(None, min=1, show_default=False,
                                       help="Out of a sandbox: at most this many entries [100000].")) -> None:
    """Copy files or directories between the host and a sandbox (ID:/path on either side)."""
    from shoal.cli.copy import copy
    from shoal.storage.confined import Limits
    given = {"max_total_bytes": max_bytes, "max_file_bytes": max_file_bytes, "max_entries": max_entries}
    try:
        copy(sandbox, src, dst, Limits(**{k: v for k, v in given.items() if v is not None}))
    except BaseException as exc:  # noqa: BLE001
        fail_on(exc)


@app.command("ls")
def list_(as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
          state: list[str] = typer.Option(None, "--state", help="Only sandboxes in this state (repeatable)."),
          metadata: list[str] = typer.Option(None, "--metadata", "-m", help="KEY=VALUE that must match.")) -> None:
    """List sandboxes (the API key's own)."""
    labels = _parse_env(metadata)
    try:
        from shoal.client import Sandbox
        infos = Sandbox.list(state=state or None, metadata=labels or None, **daemon().kwargs)
    except BaseException as exc:  # noqa: BLE001
        fail_on(exc)
    if as_json:
        rows = [{"id": i.id, "template": i.template, "state": i.state, "cpu": i.cpu, "memory_mb": i.memory_mb,
                 "disk_mb": i.disk_mb, "created_at": i.created_at.isoformat() if i.created_at else None,
                 "expires_at": i.expires_at.isoformat() if i.expires_at else None, "metadata": i.metadata}
                for i in infos]
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table
    table = Table("ID", "TEMPLATE", "STATE", "CPU", "MEMORY", "AGE", "EXPIRES IN", box=None)
    now = time.time()
    for i in infos:
        age = _age(now - i.created_at.timestamp()) if i.created_at else "-"
        left = _age(max(0.0, i.expires_at.timestamp() - now)) if i.expires_at else "-"
        table.add_row(i.id, i.template, i.state, f"{i.cpu:g}", f"{i.memory_mb} MiB", age, left)
    Console().print(table)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _each(sandbox_ids: list[str], action: str, **kwargs: object) -> None:
    """Apply ``action`` (kill, pause, resume) to each sandbox; one line per failure, exit 1 if any."""
    from shoal.errors import NotFound, ShoalError
    failed = False
    for sid in sandbox_ids:
        try:
            sb = sandbox(sid)
            try:
                if action == "kill" and not sb.kill():
                    raise NotFound(f"sandbox {sid} does not exist")
                if action != "kill":
                    getattr(sb, action)(**kwargs)
            finally:
                sb.close()
        except BaseException as exc:  # noqa: BLE001
            if not isinstance(exc, ShoalError):
                fail_on(exc)
            sys.stderr.write(f"shoal: {exc.message}\n")
            failed = True
    if failed:
        raise typer.Exit(1)


@app.command()
def rm(sandbox_ids: list[str] = typer.Argument(..., metavar="ID...")) -> None:
    """Delete sandboxes (everything they had on the host goes with them)."""
    _each(sandbox_ids, "kill")


@app.command()
def pause(sandbox_ids: list[str] = typer.Argument(..., metavar="ID..."),
          filesystem_only: bool = typer.Option(False, "--filesystem-only",
                                               help="Stop every process and free the memory; keep only the files "
                                               "(resume starts the sandbox again from them).")) -> None:
    """Freeze every process of the sandboxes (memory and files stay) until `shoal resume`."""
    _each(sandbox_ids, "pause", **({"filesystem_only": True} if filesystem_only else {}))


@app.command()
def resume(sandbox_ids: list[str] = typer.Argument(..., metavar="ID...")) -> None:
    """Thaw paused sandboxes (or start again from their files, after `pause --filesystem-only`)."""
    _each(sandbox_ids, "resume")


# --- the daemon the CLI starts ---------------------------------------------------------------
@daemon_app.command("status")
def daemon_status() -> None:
    """Say whether a daemon answers at SHOAL_URL (default http://127.0.0.1:4040)."""
    from shoal.cli.remote import healthy
    from shoal.client._config import resolve_url
    try:
        url = resolve_url()
    except BaseException as exc:  # noqa: BLE001
        fail_on(exc)
    if not healthy(url):
        fail(f"no Shoal daemon answers at {url}")
    typer.echo(f"running at {url}")


@daemon_app.command("stop")
def daemon_stop() -> None:
    """Stop the daemon the CLI started in the background (its pid is in /run/shoal/daemon.pid)."""
    from shoal.cli.remote import stop
    try:
        pid = stop()
    except BaseException as exc:  # noqa: BLE001
        fail_on(exc)
    typer.echo(f"stopped the daemon (pid {pid})", err=True)



# --- templates ------------------------------------------------------------------------------
@template_app.command("build")
def template_build(
        name: str,
        force: bool = typer.Option(False, "--force", help="Rebuild even if cached."),
        from_image: str = typer.Option(None, "--from-image", metavar="REF",
                                       help="Build from an OCI image: registry/name[:tag][@sha256:…], an OCI "
                                            "layout directory, or an OCI / docker save archive."),
        insecure_registry: bool = typer.Option(False, "--insecure-registry",
                                               help="Allow plain HTTP (and unverified TLS) to the registry."),
        creds: str = typer.Option(None, "--creds", envvar="SHOAL_REGISTRY_CREDS", show_envvar=True,
                                  help="USER:PASSWORD for the registry (better through the environment)."),
        context: Path = typer.Argument(None, help="Build context of -f (default: the Dockerfile's folder)."),
        dockerfile: Path = typer.Option(None, "--file", "-f", help="Build from a Dockerfile (steps run in a sandbox)."),
        start_cmd: str = typer.Option(None, "--start-cmd", help="Command every new sandbox starts ('dockerfile': "
                                                                "its ENTRYPOINT + CMD)."),
        ready: str = typer.Option(None, "--ready", help="When the start command is ready: port:N, url:N/path or "
                                                        "a command that exits 0."),
        build_arg: list[str] = typer.Option([], "--build-arg", help="ARG value for the Dockerfile: NAME=VALUE."),
) -> None:
    """Build a template image (cached: instant when up to date)."""
    try:
        from shoal.images import TemplateStore
        store = TemplateStore()
        with progress_display(f"building {name}") as progress:
            if dockerfile is not None:
                from shoal.engine import Engine
                from shoal.images.dockerfile import build_dockerfile
                args = dict(a.split("=", 1) if "=" in a else (a, "") for a in build_arg)
                info = build_dockerfile(Engine(), name, dockerfile, context, force=force, start_cmd=start_cmd,
                                        ready=ready, build_args=args, progress=progress)
            elif from_image is not None:
                info = store.build_image(name, from_image, insecure=insecure_registry, credentials=creds,
                                         force=force, progress=progress)
            else:
                info = store.build(name, force=force, progress=progress)
    except BaseException as exc:  # noqa: BLE001
        fail_on(exc)
    typer.echo(f"{info.name}: {(info.size_bytes or 0) / 1048576:.1f} MiB at {info.image_path}")


@template_app.command("ls")
def template_ls(as_json: bool = typer.Option(False, "--json")) -> None:
    """List templates: built or not, size, source, when built, and the sandboxes using each."""
    from shoal.images import TemplateStore
    store = TemplateStore()
    infos = store.list()
    users: dict[str, list[str]] = {i.name: [] for i in infos}
    if store.settings.db_path.exists():  # the sandboxes this instance made, by the template they came from
        from shoal.engine.store import Store
        for rec in Store(store.settings.db_path).all():
            users.setdefault(rec.template, []).append(rec.id)
    if as_json:
        typer.echo(json.dumps([{**i.to_dict(), "used_by": users[i.name]} for i in infos], indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table
    table = Table("NAME", "BUILT", "SIZE", "SOURCE", "CREATED", "USED BY", box=None)
    for i in infos:
        size = f"{i.size_bytes / 1048576:.1f} MiB" if i.size_bytes else "-"
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(i.built_at)) if i.built_at else "-"
        used = ", ".join(users[i.name][:3]) + (f" +{len(users[i.name]) - 3}" if len(users[i.name]) > 3 else "")
        table.add_row(i.name, "yes" if i.built else "no", size, i.source, created, used or "-")
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
    from shoal.server.daemon import DEFAULT_HOST, DEFAULT_PORT, DaemonConfig
    from shoal.server.daemon import serve as run_daemon
    try:
        run_daemon(DaemonConfig(host=host or os.environ.get("SHOAL_HOST") or DEFAULT_HOST,
                                port=port or int(os.environ.get("SHOAL_PORT") or DEFAULT_PORT), log_level=log_level))
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, (SystemExit, KeyboardInterrupt)):
            raise SystemExit(0) from None
        fail_on(exc)


@app.command("e2b-env")
def e2b_env() -> None:
    """Print the exports that point the E2B SDKs at this daemon: eval "$(shoal e2b-env)"."""
    import shlex

    try:
        from shoal.client._config import resolve_api_key, resolve_url
        from shoal.engine.keys import e2b_form
        url = resolve_url()
        key = e2b_form(resolve_api_key(None, url))
    except BaseException as exc:  # noqa: BLE001
        fail_on(exc)
    for name, value in (("E2B_API_KEY", key), ("E2B_API_URL", url), ("E2B_SANDBOX_URL", url)):
        print(f"export {name}={shlex.quote(value)}")


def _key_store():  # noqa: ANN202
    from shoal.engine.keys import KeyStore
    from shoal.settings import Settings
    return KeyStore(Settings().db_path)


@keys_app.command("create")
def keys_create(name: str = typer.Option("default", help="A label for the key."),
                max_sandboxes: int = typer.Option(None, help="Concurrent sandboxes allowed."),
                max_memory: int = typer.Option(None, help="Total MiB allowed across its sandboxes."),
                admin: bool = typer.Option(False, "--admin", help="An operator key: sees every tenant in /metrics.")
                ) -> None:
    """Create an API key and print it (it is shown only once)."""
    try:
        _key, secret = _key_store().create(name, max_sandboxes, max_memory, admin=admin)
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
    table = Table("ID", "NAME", "ADMIN", "REVOKED", "MAX SANDBOXES", "MAX MEMORY", box=None)
    for k in keys:
        table.add_row(k.id, k.name, "yes" if k.admin else "no", "yes" if k.revoked else "no",
                      str(k.max_sandboxes or "-"), f"{k.max_memory_mb} MiB" if k.max_memory_mb else "-")
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
          api: bool = typer.Option(True, "--api/--no-api", help="Also measure through the daemon's REST API."),
          images: bool = typer.Option(False, "--images", help="Only measure OCI image import (~100 MB) "
                                      "and no-change rebuild, beside tar -x + mkfs.erofs.")) -> None:
    """Measure create → first result, exec round trip, idle memory (and the same through the REST
    API, with exec throughput), each beside a baseline measured in the same run."""
    if images:
        try:
            from shoal.bench.images import report as images_report
            from shoal.bench.images import run_image_benchmarks
            from shoal.images import TemplateStore
            image_result = run_image_benchmarks(TemplateStore())
            from shoal.bench.images import run_dockerfile_benchmark
            image_result["dockerfile"] = run_dockerfile_benchmark(engine(reconcile=True))
        except BaseException as exc:  # noqa: BLE001
            fail_on(exc)
        typer.echo(json.dumps(image_result, indent=2) if as_json else images_report(image_result))
        return
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


from shoal.cli import networks as _networks  # noqa: E402 - needs ``daemon`` above

_networks.install(app, lambda: daemon().kwargs)

from shoal.cli import snapshots as _snapshots  # noqa: E402 - needs ``daemon`` above

_snapshots.install(app, lambda: daemon().kwargs)

from shoal.cli import volumes as _volumes  # noqa: E402 - needs ``daemon`` above

_volumes.install(app, lambda: daemon().kwargs)


def main() -> None:
    """Run the CLI: every failure, usage errors included, is one ``shoal: ...`` line and a non-zero exit."""
    try:
        code = app(standalone_mode=False)  # click hands us its errors instead of printing its usage box
    except SystemExit:
        raise
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "shoal"
        fail(f"{exc.format_message()} (see: {where} --help)", exc.exit_code)
    except click.ClickException as exc:
        fail(exc.format_message(), exc.exit_code)
    except click.Abort:
        fail("interrupted", 130)
    except BaseException as exc:  # noqa: BLE001
        fail_on(exc)
    if isinstance(code, int) and code:  # ``typer.Exit(n)`` comes back as a return value in this mode
        raise SystemExit(code)


if __name__ == "__main__":
    main()
