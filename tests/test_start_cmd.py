"""A template's start command and readiness check: real builds, real sandboxes, busybox's httpd."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.engine import Engine
from shoal.errors import RuntimeFailure
from shoal.images.dockerfile import build_dockerfile
from shoal.images.start_cmd import _probe

DOCKERFILE = "FROM minimal\nRUN mkdir -p /www && echo up > /www/index.html\nEXPOSE 8080\n" \
             "CMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n"


@pytest.fixture(scope="module")
def served(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A template whose start command (its Dockerfile CMD) serves HTTP on 8080, ready at a URL."""
    ctx = tmp_path_factory.mktemp("start")
    (ctx / "Dockerfile").write_text(DOCKERFILE)
    name = f"start-{secrets.token_hex(4)}"
    build_dockerfile(engine, name, ctx / "Dockerfile", ctx, start_cmd="dockerfile", ready="url:8080/index.html")
    yield name
    engine.templates.remove(name)


def test_create_returns_once_ready(engine: Engine, new_sandbox, served: str) -> None:  # noqa: ANN001
    meta = engine.templates._read_meta(served) or {}
    assert meta["start_cmd"] == "httpd -f -p 8080 -h /www"
    assert meta["ready"] == {"port": 8080, "path": "/index.html"}
    sid = new_sandbox(served)
    # one probe, no retry: the service answers as soon as create has returned
    assert _probe(engine.agent(sid), {"port": 8080, "path": "/index.html"}, 5.0) == (True, "HTTP status 200")
    assert any(p.get("tag") == "start" for p in engine.agent(sid).processes())


def test_not_ready_in_time_is_a_clear_error_and_removes_the_sandbox(engine: Engine, served: str,
                                                                    tmp_path: Path) -> None:
    name = f"start-{secrets.token_hex(4)}"
    tdir = engine.templates.settings.templates_dir
    (tdir / name).mkdir()
    try:
        import os
        os.link(tdir / served / "image.erofs", tdir / name / "image.erofs")
        meta = {**(engine.templates._read_meta(served) or {}), "name": name, "start_cmd": "sleep 3600",
                "ready": {"port": 9, "timeout": 2}}
        (tdir / name / "meta.json").write_text(json.dumps(meta))
        before = {r.id for r in engine.list()}
        with pytest.raises(RuntimeFailure, match=r"not ready within 2 s \(port 9"):
            engine.create(name)
        assert {r.id for r in engine.list()} == before
    finally:
        engine.templates.remove(name)
