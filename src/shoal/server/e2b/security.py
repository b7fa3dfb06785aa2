"""Who may talk to a sandbox's envd, code interpreter and ports through the E2B routes.

Control-plane calls carry the API key (``X-API-KEY``). Traffic to a sandbox carries no key, so each
sandbox gets two capabilities, returned by create/connect to the key that owns it only:

* ``envdAccessToken``: the SDK sends it as ``X-Access-Token`` on every envd request (RPC, ``/files``,
  ``/health``) and on the code interpreter's ``/execute``; signed file URLs are derived from it.
* ``trafficAccessToken``: the code interpreter SDK sends it as ``E2B-Traffic-Access-Token`` on its
  other calls; a client may send it as ``e2b-traffic-access-token`` to a ``get_host`` URL.

Both are HMAC-SHA256 of the sandbox id under a daemon secret (``<state_dir>/e2b.secret``, 0600,
made on first use), so they need no storage, survive daemon restarts and can be checked even for
a sandbox that does not exist (a wrong token is 401 whether or not the id exists: no probing).

``Options`` keeps the few per-sandbox settings the engine has no field for (which ports the port
proxy serves without a credential, see ``shoal.server.port_access``; E2B's ``autoPause``), one small
root-only JSON file per sandbox. No file means private ports.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from pathlib import Path

from shoal.engine.models import valid_sandbox_id
from shoal.errors import NotFound, ShoalError

SECRET_FILE = "e2b.secret"
OPTIONS_DIR = "e2b"
_instances: dict[Path, Tokens] = {}
_lock = threading.Lock()


class Tokens:
    def __init__(self, state_dir: Path) -> None:
        path = state_dir / SECRET_FILE
        try:
            secret = path.read_bytes()
        except FileNotFoundError:
            secret = b""
        if len(secret) < 32:
            state_dir.mkdir(parents=True, exist_ok=True)
            secret = secrets.token_bytes(32)
            tmp = path.with_name(f".{SECRET_FILE}.{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secret)
            try:
                os.link(tmp, path)  # first writer wins if two processes race
            except FileExistsError:
                secret = path.read_bytes()
            finally:
                os.unlink(tmp)
        self._secret = secret

    @classmethod
    def of(cls, state_dir: Path) -> Tokens:
        with _lock:
            inst = _instances.get(state_dir)
            if inst is None:
                inst = _instances[state_dir] = cls(state_dir)
            return inst

    def _mac(self, purpose: str, sandbox_id: str) -> str:
        return hmac.new(self._secret, f"{purpose}:{sandbox_id}".encode(), hashlib.sha256).hexdigest()

    def envd(self, sandbox_id: str) -> str:
        return "sea_" + self._mac("envd", sandbox_id)[:48]

    def traffic(self, sandbox_id: str) -> str:
        return "stt_" + self._mac("traffic", sandbox_id)[:48]

    def check_envd(self, sandbox_id: str, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(token.encode(), self.envd(sandbox_id).encode())

    def check_traffic(self, sandbox_id: str, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(token.encode(), self.traffic(sandbox_id).encode())

    def check_signature(self, sandbox_id: str, path: str, operation: str, user: str | None,
                        signature: str | None, expiration: str | None) -> bool:
        """A v1 signed file URL (``download_url``/``upload_url``): sha256 of
        ``path:operation:user:token[:expiration]``, base64 without padding, prefixed ``v1_``."""
        if not signature:
            return False
        raw = f"{path}:{operation}:{user or ''}:{self.envd(sandbox_id)}"
        if expiration:
            try:
                if int(expiration) < time.time():
                    return False
            except ValueError:
                return False
            raw += f":{expiration}"
        digest = base64.b64encode(hashlib.sha256(raw.encode()).digest()).rstrip(b"=").decode()
        return hmac.compare_digest(signature.encode(), f"v1_{digest}".encode())


class Options:
    """Per-sandbox options: ``{"public": bool, "public_ports": [int], "autoPause": bool}``."""

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
        if len(self._cache) > 10000:
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


def header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def unavailable(gate, sid: str) -> str | None:  # noqa: ANN001
    """Why sandbox traffic for ``sid`` (its token already checked) cannot be served, as the one gate
    says it, in the words E2B's SDKs look for ("was not found" means not running to them); None when
    it can be served."""
    from shoal.server.gate import SandboxToken
    try:
        gate.usable(sid, SandboxToken(sid))
    except NotFound:
        return f"The sandbox {sid} was not found"
    except ShoalError as exc:
        hint = " (connect to resume it)" if "paused" in exc.message else ""
        return f"The sandbox {sid} was not found: {exc.message}{hint}"
    return None
