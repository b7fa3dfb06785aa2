"""Where the daemon is and which key to use: argument → environment → local default."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from shoal.errors import InvalidRequest, Unauthorized

DEFAULT_URL = "http://127.0.0.1:4040"
DEFAULT_PORT = 4040
URL_ENV = "SHOAL_URL"
KEY_ENV = "SHOAL_API_KEY"
#: Seconds for ordinary requests (create, exec and streams wait as long as they need).
REQUEST_TIMEOUT = 60.0
CONNECT_TIMEOUT = 5.0


def state_dir() -> Path:
    return Path(os.environ.get("SHOAL_STATE_DIR") or "/var/lib/shoal")


def local_key_path() -> Path:
    """The root-only key ``shoal serve`` writes for local use."""
    return state_dir() / "local.key"


def resolve_url(url: str | None = None) -> str:
    value = (url or os.environ.get(URL_ENV) or DEFAULT_URL).strip().rstrip("/")
    if "://" not in value:
        value = "http://" + value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"invalid daemon URL {value!r} (expected http://HOST:PORT)")
    return value


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_port(url: str) -> int:
    parts = urlsplit(url)
    return parts.port or (443 if parts.scheme == "https" else 80)


def resolve_api_key(api_key: str | None, url: str) -> str:
    """``api_key`` → ``SHOAL_API_KEY`` → the daemon's local key file (only for a daemon on loopback,
    so that key never travels to another host)."""
    key = api_key or os.environ.get(KEY_ENV)
    if key:
        return key.strip()
    path = local_key_path()
    if is_loopback(url):
        try:
            key = path.read_text().strip()
        except PermissionError:
            raise Unauthorized(f"no API key: set {KEY_ENV} (create one with `shoal keys create`), or run as "
                               f"root to use the local key in {path}") from None
        except OSError:
            key = ""
        if key:
            return key
    raise Unauthorized(f"no API key: pass api_key=, or set {KEY_ENV} (create one with `shoal keys create`)"
                       + (f"; the local key {path} exists once `shoal serve` has started" if is_loopback(url) else ""))


def ws_url(url: str, path: str) -> str:
    parts = urlsplit(url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}{path}"


def start_hint(url: str) -> str:
    """How to start a daemon that would answer at ``url``."""
    parts = urlsplit(url)
    if not is_loopback(url):
        return f"start it on that host with `shoal serve --host {parts.hostname} --port {url_port(url)}`, " \
               f"or point {URL_ENV} at a running daemon"
    if url_port(url) == DEFAULT_PORT:
        return "start it with `shoal serve` (as root)"
    return f"start it with `shoal serve --port {url_port(url)}` (as root), or point {URL_ENV} at a running daemon"


@dataclass(frozen=True)
class ClientConfig:
    url: str
    api_key: str
    request_timeout: float = REQUEST_TIMEOUT

    @classmethod
    def resolve(cls, url: str | None = None, api_key: str | None = None,
                request_timeout: float | None = None) -> ClientConfig:
        resolved = resolve_url(url)
        return cls(resolved, resolve_api_key(api_key, resolved),
                   REQUEST_TIMEOUT if request_timeout is None else request_timeout)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}
