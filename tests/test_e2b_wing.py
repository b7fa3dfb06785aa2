"""The E2B wing is one object on the daemon, apart from the native API (issue 8, items 1-2).

* nothing E2B-shaped is hung on the engine or cached per process: each app has its own wing;
* the port proxy, Host routing and port access (native sandboxes use them too) import nothing
  from ``server/e2b``; native requests never pass through an E2B wrapper;
* the kernel server, code that runs inside sandboxes, lives in ``shoal/inside`` (stdlib + jupyter_client);
* raw ASGI answers share one encoder; limits and the text check are declared once and every API
  (engine, native REST, E2B control) enforces and words them alike.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from shoal.engine import Engine
from shoal.errors import InvalidRequest

ROOT = Path(__file__).resolve().parents[1]
KERNEL_SERVER = ROOT / "src" / "shoal" / "inside" / "kernel_server.py"


def test_native_sandbox_traffic_imports_nothing_from_e2b() -> None:
    code = ("import sys; import shoal.server.portproxy, shoal.server.sandbox_routing, shoal.server.port_access, "
            "shoal.server.sandbox_options; print(sorted(m for m in sys.modules if m.startswith('shoal.server.e2b')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_kernel_server_lives_inside_and_is_stdlib_plus_jupyter_client() -> None:
    from shoal.server.e2b import interpreter
    assert interpreter.server_source() == KERNEL_SERVER.read_bytes()
    assert not (ROOT / "src" / "shoal" / "server" / "e2b" / "kernel_server.py").exists()
    allowed = set(sys.stdlib_module_names) | {"jupyter_client", "__future__", "languages", "node_context"}
    for node in ast.walk(ast.parse(KERNEL_SERVER.read_text())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        for name in names:
            assert name.split(".")[0] in allowed, f"kernel_server imports {name}: not stdlib"


def _fastapi(routing):  # noqa: ANN001, ANN202
    """The FastAPI app behind the routing: only the exec fast path sits between them (``app.create_asgi``)."""
    from fastapi import FastAPI

    from shoal.server.fastpath import ExecFastPath
    assert isinstance(routing.app, ExecFastPath) and isinstance(routing.app.app, FastAPI)
    return routing.app.app


def test_wing_is_made_once_per_app_and_nothing_hangs_on_the_engine(engine: Engine) -> None:
    from shoal.server.app import create_asgi
    first, second = create_asgi(engine), create_asgi(engine)
    assert not [name for name in vars(engine) if "e2b" in name.lower()]
    for routing in (first, second):
        state = _fastapi(routing).state
        assert routing.wings == (state.e2b,)
        assert routing.app.gate is state.gate  # the fast path's gate is the app's one
        assert state.e2b.tokens is state.port_access.tokens  # one token check, passed in
        assert state.e2b.options is state.port_access.options  # one options store
        assert state.e2b.envd.tokens is state.e2b.tokens and state.e2b.interpreter.tokens is state.e2b.tokens
    assert _fastapi(first).state.e2b is not _fastapi(second).state.e2b


def test_native_requests_pass_through_no_e2b_wrapper(engine: Engine) -> None:
    """The routing hands non-sandbox traffic to the exec fast path, which passes all but a plain exec
    straight to the FastAPI app; signed URLs are its ``/files`` route."""
    from shoal.server.app import create_asgi
    app = _fastapi(create_asgi(engine))
    e2b_routes = [r for r in app.routes if getattr(r, "app", None) is app.state.e2b.signed_files]
    assert [r.path for r in e2b_routes] == ["/files"]


def test_signed_files_route_answers_e2b_shaped(daemon) -> None:  # noqa: ANN001
    with httpx.Client(base_url=daemon.url, timeout=30) as client:
        r = client.get("/files", params={"path": "/etc/hostname"})
    assert r.status_code == 401
    assert r.content == b'{"code":401,"message":"invalid or missing file URL signature"}'


def test_raw_asgi_refusals_share_one_encoding(daemon, new_sandbox) -> None:  # noqa: ANN001
    """The port proxy's and envd's refusals are the same compact JSON (``server/asgi.py``)."""
    sid = new_sandbox()
    with httpx.Client(base_url=daemon.url, timeout=30) as client:
        proxy = client.get("/", headers={"Host": f"8080-{sid}.localhost"})
        envd = client.get("/health", headers={"E2b-Sandbox-Id": sid})
    assert proxy.status_code == 401 and proxy.content.startswith(b'{"code":401,"message":"this sandbox port is private')
    assert envd.content == b'{"code":401,"message":"invalid or missing X-Access-Token"}'


def test_limits_are_declared_once(daemon) -> None:  # noqa: ANN001
    from shoal.engine.limits import LIMITS
    with httpx.Client(base_url=daemon.url, headers=daemon.headers, timeout=30) as client:
        schema = client.get("/openapi.json").json()["components"]["schemas"]
        create = schema["SandboxCreate"]["properties"]
        for name in ("cpu", "memory_mb", "disk_mb", "timeout"):
            assert create[name]["maximum"] == getattr(LIMITS, name).high, name
        too_long = LIMITS.timeout.high + 1
        e2b = client.post("/sandboxes", json={"templateID": "minimal", "timeout": too_long},
                          headers={"X-API-KEY": daemon.key})
        native = client.post("/v1/sandboxes", json={"template": "minimal", "timeout": too_long})
    assert e2b.status_code == 400 and e2b.json()["code"] == 400
    assert e2b.json()["message"] == f"timeout must be between 1 and {int(LIMITS.timeout.high)} seconds, not {too_long}"
    assert native.status_code == 400


@pytest.mark.parametrize(("bad", "problem"), [("a\0b", "must not contain NUL bytes"),
                                              ("a\ud800b", "must be valid UTF-8 text (no lone surrogates)")])
def test_text_is_refused_alike_by_every_api(daemon, engine: Engine, bad: str, problem: str) -> None:  # noqa: ANN001
    body_e2b = json.dumps({"templateID": "minimal", "metadata": {"k": bad}})  # \u escapes: valid JSON
    body_native = json.dumps({"template": "minimal", "metadata": {"k": bad}})
    with httpx.Client(base_url=daemon.url, headers=daemon.headers, timeout=30) as client:
        e2b = client.post("/sandboxes", content=body_e2b, headers={"X-API-KEY": daemon.key,
                                                                    "Content-Type": "application/json"})
        native = client.post("/v1/sandboxes", content=body_native, headers={"Content-Type": "application/json"})
    assert e2b.status_code == 400 and problem in e2b.json()["message"], e2b.text
    assert native.status_code == 400 and problem in native.json()["message"], native.text
    with pytest.raises(InvalidRequest, match=problem.replace("(", r"\(").replace(")", r"\)")):
        engine.create("minimal", metadata={"k": bad})
