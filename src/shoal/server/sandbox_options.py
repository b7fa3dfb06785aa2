"""The per-sandbox settings the engine has no field for, one store for the whole daemon.

Which ports the port proxy serves without a credential (``public``, ``public_ports``: native and
E2B sandboxes alike, see ``port_access``) and E2B's ``autoPause`` (``e2b/autopause.py``). One small
root-only JSON file per sandbox under ``<state_dir>/e2b/`` (the directory keeps its first name so
that settings written by earlier versions still apply); no file means private ports, no auto-pause.

The daemon makes ONE ``SandboxOptions`` (``app.create_app``) and hands it to whoever needs it: two
stores over the same files would disagree through their caches.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from shoal.engine import Engine
from shoal.engine.models import SandboxEvent, valid_sandbox_id

OPTIONS_DIR = "e2b"
#: A cache, not the truth: past this many entries it starts again from the files.
MAX_CACHED = 10000


class SandboxOptions:
    """``{"public": bool, "public_ports": [int], "autoPause": bool}`` per sandbox id."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / OPTIONS_DIR
        self._cache: dict[str, dict] = {}

    def _path(self, sandbox_id: str) -> Path:
        return self.dir / f"{sandbox_id}.json"

    def put(self, sandbox_id: str, options: dict) -> None:
        self.dir.mkdir(mode=0o700, exist_ok=True)
        tmp = self.dir / f".{sandbox_id}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(options, f)
        os.replace(tmp, self._path(sandbox_id))
        self._cache[sandbox_id] = dict(options)

    def update(self, sandbox_id: str, **changes: object) -> None:
        """Change some options of ``sandbox_id``, keeping the others."""
        self.put(sandbox_id, {**self.get(sandbox_id), **changes})

    def get(self, sandbox_id: str) -> dict:
        hit = self._cache.get(sandbox_id)
        if hit is not None:
            return hit
        if not valid_sandbox_id(sandbox_id):
            return {}
        try:
            value = json.loads(self._path(sandbox_id).read_text())
        except (OSError, ValueError):
            value = {}
        if not isinstance(value, dict):
            value = {}
        if len(self._cache) > MAX_CACHED:
            self._cache.clear()
        self._cache[sandbox_id] = value
        return value

    def drop(self, sandbox_id: str) -> None:
        self._cache.pop(sandbox_id, None)
        if valid_sandbox_id(sandbox_id):
            try:
                self._path(sandbox_id).unlink()
            except FileNotFoundError:
                pass

    def prune(self, keep: set[str]) -> None:
        """Forget the options of sandboxes that no longer exist."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return
        for name in names:
            if name.endswith(".json") and name[:-5] not in keep:
                self.drop(name[:-5])

    def follow(self, engine: Engine) -> None:
        """Drop what the engine no longer has, now and on every deletion from here on."""
        self.prune({r.id for r in engine.list()})
        engine.subscribe(lambda ev: self.drop(ev["sandbox"]["id"])
                         if ev.get("type") == SandboxEvent.DELETED.value else None)
