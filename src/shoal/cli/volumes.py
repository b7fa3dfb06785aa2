"""``shoal volume create|ls|rm`` and the ``--volume NAME:/path[:ro]`` of ``shoal create``: through the daemon.

Kept out of ``cli/main.py`` (which only calls ``install`` and ``parse_mount``). Errors are one
``shoal: ...`` line and a non-zero exit, like every other verb.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import typer

from shoal.cli.output import fail_on
from shoal.errors import InvalidRequest

volume_app = typer.Typer(no_args_is_help=True, help="Named volumes: size-limited, shared by the sandboxes that "
                         "mount them (shoal create --volume NAME:/path[:ro]), kept until `shoal volume rm`.")


def parse_mount(spec: str) -> dict:
    """``NAME:/path`` or ``NAME:/path:ro`` (``:rw`` too) as the API's ``{name, path, read_only}``."""
    name, sep, rest = spec.partition(":")
    path, mode = rest, "rw"
    if rest.endswith((":ro", ":rw")):
        path, mode = rest[:-3], rest[-2:]
    if not sep or not name or not path:
        raise InvalidRequest(f"--volume must be NAME:/path[:ro], not {spec!r}")
    return {"name": name, "path": path, "read_only": mode == "ro"}


def _sdk() -> type:
    from shoal.client import Sandbox
    return Sandbox


def install(app: typer.Typer, daemon_kwargs: Callable[[], dict]) -> None:
    """Add ``shoal volume`` to ``app``; ``daemon_kwargs()`` gives the SDK's url/api_key for the daemon."""

    @volume_app.command("create")
    def volume_create(name: str = typer.Argument(..., metavar="NAME"),
                      size: int = typer.Option(1024, "--size", help="Size in MiB (full is ENOSPC).")) -> None:
        """Create a volume; print its name."""
        try:
            _sdk().create_volume(name, size, **daemon_kwargs())
        except BaseException as exc:  # noqa: BLE001
            fail_on(exc)
        typer.echo(name)

    @volume_app.command("ls")
    def volume_ls(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
        try:
            vols = _sdk().list_volumes(**daemon_kwargs())
        except BaseException as exc:  # noqa: BLE001
            fail_on(exc)
        if as_json:
            typer.echo(json.dumps(vols, indent=2))
            return
        typer.echo(f"{'NAME':<34}{'SIZE MiB':>9}  SANDBOXES")
        for v in vols:
            typer.echo(f"{v['name']:<34}{v['size_mb']:>9}  {' '.join(v['sandboxes']) or '-'}")

    @volume_app.command("rm")
    def volume_rm(name: str = typer.Argument(..., metavar="NAME")) -> None:
        """Delete a volume and its files (refused while a sandbox mounts it)."""
        try:
            _sdk().delete_volume(name, **daemon_kwargs())
        except BaseException as exc:  # noqa: BLE001
            fail_on(exc)

    app.add_typer(volume_app, name="volume")
