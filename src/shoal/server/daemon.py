"""``shoal serve``: start-up (reconcile, local key, limits), serve, shutdown.

Limits (environment): ``SHOAL_MAX_CONNECTIONS`` (4096), ``SHOAL_HEADER_TIMEOUT`` (10 s), see
``connections.py``; ``SHOAL_EXEC_MAX_OUTPUT`` (16 MiB), ``SHOAL_EXEC_OUTPUT_BUDGET`` (256 MiB), see
``runtime/output_budget.py``; ``SHOAL_AGENT_TIMEOUT`` (10 s), ``SHOAL_AGENT_CALL_TIMEOUT`` (60 s), see
``runtime/agent_client.py``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from shoal.engine import Engine
from shoal.settings import Settings

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4040


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra`` fields."""

    _skip = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
               "message": record.getMessage()}
        out.update({k: v for k, v in record.__dict__.items() if k not in self._skip})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def local_key_path(settings: Settings) -> Path:
    return settings.state_dir / "local.key"


def ensure_local_key(engine: Engine) -> str:
    """The key the local CLI uses (root-only file): made on first start, kept while valid. It is an
    admin key (operator-wide metrics): whoever can read it is root on this host anyway."""
    path = local_key_path(engine.settings)
    try:
        key = path.read_text().strip()
        found = engine.keys.verify(key)
        if found is not None:
            if not found.admin:  # made before keys had the flag
                engine.keys.set_admin(found.id)
            return key
    except OSError:
        pass
    _, key = engine.keys.create(name="local", admin=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


@dataclass
class DaemonConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    log_level: str = "info"


def serve(config: DaemonConfig, settings: Settings | None = None) -> None:
    import uvicorn

    from shoal.runtime.agent_client import AGENT_TIMEOUT
    from shoal.runtime.output_budget import BUDGET, max_output
    from shoal.server import connections
    from shoal.server.app import create_asgi

    configure_logging(config.log_level)
    log = logging.getLogger("shoal.daemon")
    engine = Engine(settings)
    started = time.perf_counter()
    cleaned = engine.reconcile()
    kept = [r.id for r in engine.list()]
    ensure_local_key(engine)
    log.info("reconciled", extra={"cleaned": cleaned, "reattached": kept,
                                  "ms": round((time.perf_counter() - started) * 1000, 1)})
    app = create_asgi(engine)
    # Hostile clients: enough fds to serve, a bounded number of connections, a deadline for headers.
    fd_limit = connections.raise_fd_limit()
    guard = connections.ConnectionGuard(connections.max_connections(fd_limit), connections.header_timeout())
    log.info("limits", extra={"fd_limit": fd_limit, "max_connections": guard.max_connections,
                              "header_timeout_s": guard.header_timeout, "exec_max_output": max_output(),
                              "exec_output_budget": BUDGET.total, "agent_timeout_s": AGENT_TIMEOUT})
    uv = uvicorn.Config(app, host=config.host, port=config.port, log_config=None, access_log=False,
                        loop="uvloop", http=connections.protocol_class(guard), ws="websockets",
                        timeout_graceful_shutdown=5, timeout_keep_alive=5, log_level=config.log_level)
    log.info("serving", extra={"url": f"http://{config.host}:{config.port}"})
    _run_server(uv, engine)


def _run_server(config: object, engine: Engine) -> None:
    """``uvicorn.Server(config).run()``, freeing the engine's pools once serving has ended.

    A server stopped by SIGTERM or SIGINT ends its process by raising that signal again after the
    graceful shutdown (uvicorn >= 0.29), so ``atexit`` handlers never run: the pools' network slots,
    user namespaces and mounted layers would stay until the next start's reconcile swept them. They
    are freed after the last request and before the signal is raised again."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                try:
                    yield
                finally:  # inside the server's event loop: pyroute2 runs its own, so on a thread of its own
                    closer = threading.Thread(target=engine.close_pools, name="shoal-close-pools")
                    closer.start()
                    closer.join()

    Server(config).run()  # type: ignore[arg-type]
