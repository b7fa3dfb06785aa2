"""``shoal serve``: start-up (reconcile, local key), serve, shutdown."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
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
    """The key the local CLI uses (root-only file): made on first start, kept while valid."""
    path = local_key_path(engine.settings)
    try:
        key = path.read_text().strip()
        if engine.keys.verify(key) is not None:
            return key
    except OSError:
        pass
    _, key = engine.keys.create(name="local")
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
    uv = uvicorn.Config(app, host=config.host, port=config.port, log_config=None, access_log=False,
                        loop="uvloop", http="httptools", ws="websockets", timeout_graceful_shutdown=5,
                        log_level=config.log_level)
    log.info("serving", extra={"url": f"http://{config.host}:{config.port}"})
    uvicorn.Server(uv).run()
