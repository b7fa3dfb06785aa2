"""``shoal snapshot create|ls|rm`` and ``shoal fork``: through the daemon (``shoal create --snapshot`` in main).

Kept out of ``cli/main.py`` (which only calls ``install``). Script contract: ``snapshot create`` prints
only the snapshot id, ``fork`` one new sandbox id per line; errors are one ``shoal: ...`` line and a
non-zero exit, like every other verb.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import typer

from shoal.cli.output import fail, fail_on

snapshot_app = typer.Typer(no_args_is_help=True, help="Snapshots of sandboxes' files (start sandboxes from them "
                           "with `shoal create --snapshot ID`).")


def _sdk() -> type:
    from shoal.client import Sandbox
    return Sandbox


def install(app: typer.Typer, daemon_kwargs: Callable[[], dict]) -> None:
    """Add the commands to ``app``; ``daemon_kwargs()`` gives the SDK's url/api_key for the daemon."""

    @snapshot_app.command("create")
    def snapshot_create(sandbox_id: str = typer.Argument(..., metavar="ID"),
                        name: str = typer.Option(None, "--name", help="A name unique to your key.")) -> None:
        """Freeze sandbox ID's files into a snapshot (it keeps running); print the snapshot id."""
        try:
            snap = _sdk().create_snapshot(sandbox_id, name, **daemon_kwargs())
        except BaseException as exc:  # noqa: BLE001
            fail_on(exc)
        typer.echo(snap["id"])

    @snapshot_app.command("ls")
    def snapshot_ls(sandbox_id: str = typer.Option(None, "--sandbox", help="Only those of this sandbox."),
                    as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
        """Your snapshots."""
        try:
            snaps = _sdk().list_snapshots(sandbox_id, **daemon_kwargs())
        except BaseException as exc:  # noqa: BLE001
            fail_on(exc)
        if as_json:
            typer.echo(json.dumps(snaps, indent=2))
            return
        typer.echo(f"{'ID':<18} {'NAME':<24} {'TEMPLATE':<16} {'PARENT':<18} SIZE")
        for s in snaps:
            typer.echo(f"{s['id']:<18} {s.get('name') or '-':<24} {s['template']:<16} {s.get('parent') or '-':<18} "
                       f"{s['size_bytes'] / 2**20:.1f} MiB")

    @snapshot_app.command("rm")
    def snapshot_rm(snapshot: str = typer.Argument(..., metavar="ID|NAME")) -> None:
        """Delete a snapshot (refused while a sandbox or a stacked snapshot uses it)."""
        try:
            gone = _sdk().delete_snapshot(snapshot, **daemon_kwargs())
        except BaseException as exc:  # noqa: BLE001
            fail_on(exc)
        if not gone:
            fail(f"snapshot {snapshot} does not exist", 1)

    @app.command("fork")
    def fork(sandbox_id: str = typer.Argument(..., metavar="ID"),
             count: int = typer.Option(1, "--count", "-n", min=1, max=100, help="How many (1-100)."),
             timeout: int = typer.Option(None, help="Delete each fork after this many seconds "
                                         "(default: the parent's time left).")) -> None:
        """New running sandboxes with ID's files (not its memory); print their ids, one per line."""
        try:
            sb = _sdk().connect(sandbox_id, **daemon_kwargs())
            try:
                forks = sb.fork(count, timeout)
            finally:
                sb.close()
        except BaseException as exc:  # noqa: BLE001
            fail_on(exc)
        for f in forks:
            typer.echo(f.id)
            f.close()

    app.add_typer(snapshot_app, name="snapshot")
