"""Who may talk to a sandbox's envd, code interpreter and ports through the E2B routes.

Control-plane calls carry the API key (``X-API-KEY``). Traffic to a sandbox carries no key, so each
sandbox gets two capabilities, returned by create/connect to the key that owns it only:

* ``envdAccessToken``: the SDK sends it as ``X-Access-Token`` on every envd request (RPC, ``/files``,
  ``/health``) and on the code interpreter's ``/execute``; signed file URLs are derived from it
  (``signing``).
* ``trafficAccessToken``: the code interpreter SDK sends it as ``E2B-Traffic-Access-Token`` on its
  other calls; a client may send it as ``e2b-traffic-access-token`` to a ``get_host`` URL.

Both are HMAC-SHA256 of the sandbox id under a daemon secret (``<state_dir>/e2b.secret``, 0600,
made on first use), so they need no storage, survive daemon restarts and can be checked even for
a sandbox that does not exist (a wrong token is 401 whether or not the id exists: no probing).

The daemon makes one ``Tokens`` (the E2B wing's, ``wing.E2B.tokens``) and passes it to whoever checks
tokens, the port proxy included (``port_access.SandboxTokens``); there is no process-wide cache.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

SECRET_FILE = "e2b.secret"


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

    def check_either(self, sandbox_id: str, access: str | None, traffic: str | None) -> bool:
        """The access token (``X-Access-Token``) or the traffic token: what the guarded ports take."""
        return self.check_envd(sandbox_id, access) or self.check_traffic(sandbox_id, traffic)
