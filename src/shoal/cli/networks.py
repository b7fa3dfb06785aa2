"""``shoal network create|ls|rm``, ``shoal port ls``, ``shoal expose`` / ``unexpose``: through the daemon.

Kept out of ``cli/main.py`` (which only calls ``install``): private networks and ports are one feature.
Errors are one ``shoal: ...`` line and a non-zero exit, like every other verb.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import typer

from shoal.cli.output import fail_on

network_app = typer.Typer(no_args_is_help=True, help="Private networks: sandboxes in one reach each other "
                          "(by address and by name under shoal.internal); nothing else does.")
port_app = typer.Typer(no_args_is_help=True, help="Ports of a sandbox.")


def _sdk() -> type:
    """The SDK's ``Sandbox``, imported on use (the CLI starts without it)."""
    from shoal.client import Sandbox
    return Sandbox


def install(app: typer.Typer, daemon_kwargs: Callable[[], dict]) -> None:
    """Add the commands to ``app``; ``daemon_kwargs()`` gives the SDK's url/api_key for the daemon."""

    @network_app.command("create")
    def network_create(name: str = typer.Argument(..., metavar="NAME")) -> None:
        """Create a private network (join it with `shoal create --network NAME`)."""
        try:
            _sdk().create_network(name, **daemon_kwargs())
        except BaseException as exc:  # noqa: BLE001
            fail_on(exc)
        typer.echo(name)

    @network_app.command("ls")
    def network_ls(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
        try:
            nets = _sdk().list_networks(**daemon_kwargs())
        except BaseException as exc:  # noqa: BLE001
            fail_on(exc)
        if as_json:
            typer.echo(json.dumps(nets, indent=2))
            return
        typer.echo(f"{'NAME':<34}MEMBERS")
        for n in nets:
            typer.echo(f"{n['name']:<34}{' '.join(n['members']) or '-'}")

    @network_app.command("policy")
    def network_policy(sandbox_id: str = typer.Argument(..., metavar="ID"),
                       allow_out: list[str] = typer.Option(None, "--allow-out",
                                                           help="CIDR, IP or domain (*.x ok), repeatable."),
                       deny_out: list[str] = typer.Option(None, "--deny-out", help="CIDR or IP, repeatable."),
                       no_internet: bool = typer.Option(False, "--no-internet",
                                                        help="Deny everything not allowed.")) -> None:
        """Replace a running sandbox's egress policy (all of it; an allow beats a deny); prints it as applied."""
        try:
            applied = _sdk().update_network(sandbox_id, allow_out=allow_out or [], deny_out=deny_out or [],
                                            internet=False if no_internet else None, **daemon_kwargs())
        except BaseException as exc:  # noqa: BLE001
            fail_on(exc)
        typer.echo(json.dumps(applied))

    @network_app.command("rm")
    def network_rm(name: str = typer.Argument(..., metavar="NAME")) -> None:
        """Remove a private network (refused while a sandbox is in it)."""
        try:
            _sdk().delete_network(name, **daemon_kwargs())
        except BaseException as exc:  # noqa: BLE001
            fail_on(exc)

    @port_app.command("ls")
    def port_ls(sandbox_id: str = typer.Argument(..., metavar="ID"),
                as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
        """TCP ports something listens on inside the sandbox, and the host ports exposing them."""
        try:
            ports = _sdk().ports(sandbox_id, **daemon_kwargs())
            exposed = _sdk().exposed_ports(sandbox_id, **daemon_kwargs())
        except BaseException as exc:  # noqa: BLE001
            fail_on(exc)
        if as_json:
            typer.echo(json.dumps({"listening": ports, "exposed": exposed}, indent=2))
            return
        on_host = {e["port"]: f"{e['bind']}:{e['host_port']}" for e in exposed}
        typer.echo(f"{'PORT':<8}{'ADDRESS':<42}EXPOSED")
        for p in ports:
            typer.echo(f"{p['port']:<8}{p['address']:<42}{on_host.get(p['port'], '-')}")

    @app.command()
    def expose(sandbox_id: str = typer.Argument(..., metavar="ID"), port: int = typer.Argument(..., metavar="PORT"),
               host_port: int = typer.Option(None, "--host-port", help="Host port (default: a free one)."),
               bind: str = typer.Option("127.0.0.1", "--bind", help="Host address to listen on.")) -> None:
        """Serve a sandbox port on a host port (until `shoal unexpose` or the sandbox's deletion); prints
        bind:host_port."""
        try:
            e = _sdk().expose(sandbox_id, port, host_port=host_port, bind=bind, **daemon_kwargs())
        except BaseException as exc:  # noqa: BLE001
            fail_on(exc)
        typer.echo(f"{e['bind']}:{e['host_port']}")

    @app.command()
    def unexpose(sandbox_id: str = typer.Argument(..., metavar="ID"),
                 port: int = typer.Argument(..., metavar="PORT")) -> None:
        """Stop serving a sandbox port on the host."""
        try:
            _sdk().unexpose(sandbox_id, port, **daemon_kwargs())
        except BaseException as exc:  # noqa: BLE001
            fail_on(exc)

    app.add_typer(network_app, name="network")
    app.add_typer(port_app, name="port")
