"""How the CLI finds the daemon: ``SHOAL_URL`` (default http://127.0.0.1:4040) and ``SHOAL_API_KEY``.

When nothing answers at the default local address, the CLI starts ``shoal serve`` itself, detached
(its own session), logging to ``<state>/daemon.log`` with its pid in ``<run>/daemon.pid``, and says
so in one line on stderr. Any other URL is the user's to run: the CLI says how to start one there.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from shoal.client._config import DEFAULT_PORT, URL_ENV, resolve_api_key, resolve_url, start_hint
from shoal.errors import DaemonUnreachable, InvalidRequest, RuntimeFailure

START_WAIT = 10.0
LOCAL_HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class Daemon:
    url: str
    api_key: str

    @property
    def kwargs(self) -> dict[str, str]:
        """What the SDK's constructors take."""
        return {"url": self.url, "api_key": self.api_key}


def _run_dir() -> Path:
    return Path(os.environ.get("SHOAL_RUN_DIR") or "/run/shoal")


def _state_dir() -> Path:
    return Path(os.environ.get("SHOAL_STATE_DIR") or "/var/lib/shoal")


def log_path() -> Path:
    return _state_dir() / "daemon.log"


def pid_path() -> Path:
    return _run_dir() / "daemon.pid"


def healthy(url: str, timeout: float = 2.0) -> bool:
    import httpx
    try:
        r = httpx.get(url + "/health", timeout=timeout)
        return r.status_code == 200 and r.json().get("status") == "ok"
    except (httpx.HTTPError, ValueError):
        return False


def auto_start_allowed(url: str) -> bool:
    """Only the default local daemon is ours to start: SHOAL_URL unset, or naming it."""
    if not os.environ.get(URL_ENV):
        return True
    parts = urlsplit(url)
    return parts.scheme == "http" and parts.hostname in LOCAL_HOSTS and (parts.port or 80) == DEFAULT_PORT


def connect() -> Daemon:
    """The daemon to talk to (started here if it is the default local one and is not running)."""
    url = resolve_url()
    if not healthy(url):
        if not auto_start_allowed(url):
            raise DaemonUnreachable(f"no Shoal daemon answers at {url}; {start_hint(url)}")
        start(url)
    return Daemon(url, resolve_api_key(None, url))


def start(url: str) -> None:
    """Start ``shoal serve`` for ``url`` in the background and wait for /health."""
    if os.geteuid() != 0:
        raise DaemonUnreachable(f"the Shoal daemon is not running at {url}; start it as root: sudo shoal serve")
    parts = urlsplit(url)
    host = "127.0.0.1" if parts.hostname in LOCAL_HOSTS else str(parts.hostname)
    port = parts.port or DEFAULT_PORT
    run_dir, log = _run_dir(), log_path()
    run_dir.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(run_dir / "daemon.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two CLIs at once start one daemon
        if healthy(url):
            return
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "shoal.cli.main", "serve", "--host", host,
                                     "--port", str(port)], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    cwd="/", start_new_session=True, close_fds=True)
        pid_path().write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + START_WAIT
        while not healthy(url, timeout=0.5):
            if proc.poll() is not None:
                raise RuntimeFailure(f"the Shoal daemon exited at start ({_last_line(log)}); see {log}")
            if time.monotonic() > deadline:
                raise RuntimeFailure(f"the Shoal daemon did not answer at {url} within {START_WAIT:g} s; see {log}")
            time.sleep(0.05)
    finally:
        os.close(lock)
    sys.stderr.write(f"shoal: started the daemon at {url} (logs: {log})\n")
    sys.stderr.flush()


def _last_line(log: Path) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    if not lines:
        return "no output"
    import json
    try:
        return str(json.loads(lines[-1]).get("message", lines[-1]))[:200]
    except ValueError:
        return lines[-1][:200]


def stop(timeout: float = 15.0) -> int:
    """Stop a daemon the CLI started (the pid in ``daemon.pid``); returns its pid."""
    path = pid_path()
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        raise InvalidRequest(f"no daemon started by the CLI ({path} is missing); stop a `shoal serve` "
                             "you started yourself the way you started it") from None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"serve" not in f.read():
                raise FileNotFoundError
        os.kill(pid, signal.SIGTERM)
    except (FileNotFoundError, ProcessLookupError):
        path.unlink(missing_ok=True)
        raise InvalidRequest(f"the daemon (pid {pid}) is not running") from None
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    path.unlink(missing_ok=True)
    return pid
