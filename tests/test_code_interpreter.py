"""The E2B code interpreter (port 49999) on real ``code-interpreter-v1`` sandboxes, through the real
daemon (conftest's ``daemon``: ``shoal serve`` on loopback), no stubs.

Two layers, one sandbox per module where it can be shared:

* raw HTTP to the daemon with the headers the E2B SDK sends (``E2b-Sandbox-Id``/``-Port``, access
  tokens): the wire format line by line, contexts, env vars, auth, isolation, lazy (re)start,
  templates without Jupyter.
* The unmodified ``e2b-code-interpreter`` SDK against the same daemon: state, contexts, errors,
  callbacks, charts, DataFrames, execution timeout, the async client. The daemon serves the E2B
  control plane, so a 404 there is a failure, not a skip.

Sandboxes are created through the REST API with a long timeout (they must not expire mid-module)
and deleted by a finalizer whatever the tests did.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import Iterator

import httpx
import pytest

from shoal.server.e2b.security import Tokens
from shoal.settings import Settings

TEMPLATE = "code-interpreter-v1"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: Module sandboxes outlive the module (the REST default of 300 s could expire them mid-way).
SANDBOX_TIMEOUT = 3600

pytestmark = pytest.mark.timeout(600)


class Interp:
    """The interpreter as an E2B client sees it: the daemon's port, the SDK's headers."""

    def __init__(self, daemon) -> None:  # noqa: ANN001 - conftest's RunningDaemon
        self.daemon = daemon
        self.client = httpx.Client(base_url=daemon.url, timeout=120)
        self.api = httpx.Client(base_url=daemon.url, headers=daemon.headers, timeout=120)
        self.tokens = Tokens(Settings().state_dir)
        self.created: list[str] = []

    def create(self, template: str = TEMPLATE) -> str:
        r = self.api.post("/v1/sandboxes", json={"template": template, "timeout": SANDBOX_TIMEOUT})
        assert r.status_code == 201, r.text
        self.created.append(r.json()["id"])
        return r.json()["id"]

    def destroy(self, sid: str) -> None:
        assert self.api.delete(f"/v1/sandboxes/{sid}").status_code in (204, 404)

    def headers(self, sid: str, auth: str = "both") -> dict[str, str]:
        h = {"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49999", "Content-Type": "application/json"}
        if auth in ("both", "envd"):
            h["X-Access-Token"] = self.tokens.envd(sid)
        if auth in ("both", "traffic"):
            h["E2B-Traffic-Access-Token"] = self.tokens.traffic(sid)
        return h

    def request(self, sid: str, method: str, path: str, body: object = None, auth: str = "both") -> httpx.Response:
        kwargs = {} if body is None else {"content": json.dumps(body)}
        return self.client.request(method, path, headers=self.headers(sid, auth), **kwargs)

    def execute(self, sid: str, code: str, **fields: object) -> list[dict]:
        r = self.request(sid, "POST", "/execute", {"code": code, **fields})
        assert r.status_code == 200, r.text
        lines = [json.loads(line) for line in r.text.splitlines() if line.strip()]
        assert lines and lines[-1] == {"type": "end_of_execution"}, lines
        return lines

    def processes(self, sid: str) -> list[dict]:
        r = self.api.get(f"/v1/sandboxes/{sid}/processes")
        assert r.status_code == 200, r.text
        return r.json()

    def close(self) -> None:
        for sid in self.created:
            try:
                self.api.delete(f"/v1/sandboxes/{sid}")
            except httpx.HTTPError:
                pass
        self.client.close()
        self.api.close()


def results(lines: list[dict]) -> list[dict]:
    return [line for line in lines if line["type"] == "result"]


def main_text(lines: list[dict]) -> str | None:
    return next((r.get("text") for r in results(lines) if r["is_main_result"]), None)


@pytest.fixture(scope="module")
def interp(daemon, engine) -> Iterator[Interp]:  # noqa: ANN001
    engine.templates.build(TEMPLATE)
    it = Interp(daemon)
    try:
        yield it
    finally:
        it.close()


@pytest.fixture(scope="module")
def ci_sandbox(interp: Interp) -> Iterator[tuple[str, None]]:
    """One code-interpreter-v1 sandbox whose first execute worked (how fast: ``shoal bench``)."""
    sid = interp.create()
    try:
        lines = interp.execute(sid, "x = 1\nx")
        assert main_text(lines) == "1"
        yield sid, None
    finally:
        interp.destroy(sid)


# --- the interpreter's wire format, through the daemon ------------------------------------------------

def test_state_persists_and_lines_are_e2b_ndjson(interp: Interp, ci_sandbox: tuple[str, None]) -> None:
    sid, _ = ci_sandbox
    interp.execute(sid, "y = 41")
    lines = interp.execute(sid, "print('hello')\ny + 1")
    kinds = [line["type"] for line in lines]
    assert kinds[0] == "number_of_executions" and isinstance(lines[0]["execution_count"], int)
    assert kinds[-1] == "end_of_execution"
    out = [line for line in lines if line["type"] == "stdout"]
    assert out and out[0]["text"] == "hello\n" and out[0]["timestamp"]
    assert main_text(lines) == "42"
    later = interp.execute(sid, "y")
    assert later[0]["execution_count"] == lines[0]["execution_count"] + 1


def test_error_has_name_value_traceback(interp: Interp, ci_sandbox: tuple[str, None]) -> None:
    sid, _ = ci_sandbox
    lines = interp.execute(sid, "def f():\n    return 1/0\nf()")
    errors = [line for line in lines if line["type"] == "error"]
    assert len(errors) == 1
    assert errors[0]["name"] == "ZeroDivisionError"
    assert errors[0]["value"] == "division by zero"
    assert "ZeroDivisionError" in errors[0]["traceback"] and "f()" in errors[0]["traceback"]
    assert main_text(interp.execute(sid, "'still alive'")) == "still alive"


def test_stderr_and_display_data(interp: Interp, ci_sandbox: tuple[str, None]) -> None:
    sid, _ = ci_sandbox
    lines = interp.execute(sid, "import sys\nfrom IPython.display import display, HTML\n"
                                "sys.stderr.write('warn\\n'); sys.stderr.flush()\n"
                                "display(HTML('<b>hi</b>'))\n{'a': 1}")
    assert [line["text"] for line in lines if line["type"] == "stderr"] == ["warn\n"]
    shown = results(lines)
    assert shown[0]["html"] == "<b>hi</b>" and shown[0]["is_main_result"] is False
    assert shown[1]["is_main_result"] is True and shown[1]["text"] == "{'a': 1}"


def test_matplotlib_chart_is_png(interp: Interp, ci_sandbox: tuple[str, None]) -> None:
    sid, _ = ci_sandbox
    lines = interp.execute(sid, "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.show()")
    charts = [r for r in results(lines) if "png" in r]
    assert len(charts) == 1 and charts[0]["is_main_result"] is False
    assert base64.b64decode(charts[0]["png"]).startswith(PNG_MAGIC)


def test_dataframe_is_html(interp: Interp, ci_sandbox: tuple[str, None]) -> None:
    sid, _ = ci_sandbox
    lines = interp.execute(sid, "import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': [3, 4]})")
    main = [r for r in results(lines) if r["is_main_result"]]
    assert len(main) == 1 and "<table" in main[0]["html"] and "a" in main[0]["text"]


def test_json_result(interp: Interp, ci_sandbox: tuple[str, None]) -> None:
    sid, _ = ci_sandbox
    lines = interp.execute(sid, "from IPython.display import JSON\nJSON({'k': [1, 2]})")
    assert results(lines)[0]["json"] == {"k": [1, 2]}


def test_env_vars_apply_to_one_execution(interp: Interp, ci_sandbox: tuple[str, None]) -> None:
    sid, _ = ci_sandbox
    lines = interp.execute(sid, "import os, subprocess\n"
                                "(os.environ.get('SHOAL_T'), subprocess.run(['sh', '-c', 'echo $SHOAL_T'], "
                                "capture_output=True, text=True).stdout.strip())",
                           env_vars={"SHOAL_T": "it's \"quoted\""})
    assert main_text(lines) == "('it\\'s \"quoted\"', 'it\\'s \"quoted\"')"
    assert main_text(interp.execute(sid, "import os\nstr(os.environ.get('SHOAL_T'))")) == "None"
    assert main_text(interp.execute(sid, "os.environ.get('HOME')", env_vars={"HOME": "/x"})) == "/x"
    assert main_text(interp.execute(sid, "os.environ.get('HOME')")) == "/home/user"  # restored


def test_contexts_keep_separate_state(interp: Interp, ci_sandbox: tuple[str, None]) -> None:
    sid, _ = ci_sandbox
    r = interp.request(sid, "POST", "/contexts", {"cwd": "/tmp"}, auth="traffic")  # what the SDK sends
    assert r.status_code == 200, r.text
    ctx = r.json()
    assert ctx["language"] == "python" and ctx["cwd"] == "/tmp" and ctx["id"]
    interp.execute(sid, "z = 'default'")
    interp.execute(sid, "z = 'other'", context_id=ctx["id"])
    assert main_text(interp.execute(sid, "z")) == "default"
    assert main_text(interp.execute(sid, "import os\nz, os.getcwd()", context_id=ctx["id"])) == "('other', '/tmp')"
    listed = interp.request(sid, "GET", "/contexts", auth="traffic").json()
    assert ctx in listed and len(listed) >= 2

    r = interp.request(sid, "POST", f"/contexts/{ctx['id']}/restart", auth="traffic")
    assert r.status_code == 200, r.text
    lines = interp.execute(sid, "z", context_id=ctx["id"])
    assert [e["name"] for e in lines if e["type"] == "error"] == ["NameError"]

    assert interp.request(sid, "DELETE", f"/contexts/{ctx['id']}", auth="traffic").status_code == 200
    r = interp.request(sid, "POST", "/execute", {"code": "1", "context_id": ctx["id"]})
    assert r.status_code == 404
    assert ctx["id"] not in [c["id"] for c in interp.request(sid, "GET", "/contexts", auth="traffic").json()]


def test_language_and_context_errors(interp: Interp, ci_sandbox: tuple[str, None]) -> None:
    sid, _ = ci_sandbox
    assert main_text(interp.execute(sid, "z", language="python")) == "default"
    r = interp.request(sid, "POST", "/execute", {"code": "1", "language": "r"})
    assert r.status_code == 400 and "not supported" in r.text
    r = interp.request(sid, "POST", "/execute", {"code": "1", "language": "python", "context_id": "x"})
    assert r.status_code == 400
    assert interp.request(sid, "POST", "/execute", {"code": "1", "context_id": "nope"}).status_code == 404
    assert interp.request(sid, "POST", "/contexts", {"cwd": "/does/not/exist"}).status_code == 400


def test_tokens_are_required(interp: Interp, ci_sandbox: tuple[str, None]) -> None:
    sid, _ = ci_sandbox
    assert interp.request(sid, "POST", "/execute", {"code": "1"}, auth="none").status_code == 401
    assert interp.request(sid, "POST", "/execute", {"code": "1"}, auth="envd").status_code == 200
    r = interp.client.post("/execute", json={"code": "1"}, headers={
        "E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49999", "X-Access-Token": "sea_" + "0" * 48})
    assert r.status_code == 401
    other = interp.tokens.envd("aaaaaaaaaaaa")  # a valid token of another sandbox id
    r = interp.client.post("/execute", json={"code": "1"}, headers={
        "E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "49999", "X-Access-Token": other})
    assert r.status_code == 401


def test_unknown_sandbox_is_502(interp: Interp) -> None:
    r = interp.request("zzzzzzzzzzzz", "POST", "/execute", {"code": "1"})
    assert r.status_code == 502 and r.json()["code"] == 502


def test_sandboxes_are_isolated(interp: Interp, ci_sandbox: tuple[str, None]) -> None:
    sid, _ = ci_sandbox
    other = interp.create()
    try:
        interp.execute(sid, "who = 'A'")
        interp.execute(other, "who = 'B'")
        assert main_text(interp.execute(sid, "who")) == "A"
        assert main_text(interp.execute(other, "who")) == "B"
        # A's tokens do not open B.
        r = interp.client.post("/execute", json={"code": "who"},
                               headers={**interp.headers(sid), "E2b-Sandbox-Id": other})
        assert r.status_code == 401
    finally:
        interp.destroy(other)


def test_server_restarts_lazily_after_being_killed(interp: Interp) -> None:
    sid = interp.create()
    try:
        interp.execute(sid, "k = 1")
        [server] = [p for p in interp.processes(sid) if p.get("tag") == "shoal-code-interpreter"]
        r = interp.api.post(f"/v1/sandboxes/{sid}/processes/{server['pid']}/signal", json={"signal": 9})
        assert r.status_code in (200, 204), r.text
        deadline = time.monotonic() + 30
        while any(p["pid"] == server["pid"] for p in interp.processes(sid)):
            assert time.monotonic() < deadline, "the killed interpreter server is still listed"
            time.sleep(0.05)
        lines = interp.execute(sid, "'k' in dir()")  # a new server, a new kernel
        assert main_text(lines) == "False"
        [again] = [p for p in interp.processes(sid) if p.get("tag") == "shoal-code-interpreter"]
        assert again["pid"] != server["pid"]
    finally:
        interp.destroy(sid)


def test_template_without_jupyter_answers_502(interp: Interp, base_template: str) -> None:
    sid = interp.create(base_template)
    try:
        r = interp.request(sid, "POST", "/execute", {"code": "1"})
        assert r.status_code == 502
        assert "jupyter_client" in r.json()["message"]
    finally:
        interp.destroy(sid)


# --- the e2b-code-interpreter SDK against a daemon --------------------------------------------------------

def _e2b_env(daemon) -> dict[str, str]:  # noqa: ANN001
    return {"E2B_API_KEY": "e2b_" + daemon.key[len("shoal_"):], "E2B_API_URL": daemon.url,
            "E2B_SANDBOX_URL": daemon.url}


@pytest.fixture(scope="module")
def e2b(daemon, engine) -> Iterator[None]:  # noqa: ANN001
    engine.templates.build(TEMPLATE)
    env = _e2b_env(daemon)
    probe = httpx.get(daemon.url + "/v2/sandboxes", headers={"X-API-KEY": env["E2B_API_KEY"]}, timeout=10)
    assert probe.status_code == 200, f"the daemon must serve the E2B control plane: {probe.status_code} {probe.text}"
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def sdk_sandbox(e2b: None) -> Iterator[object]:
    from e2b_code_interpreter import Sandbox

    sbx = Sandbox.create(timeout=SANDBOX_TIMEOUT)  # the SDK's default template: code-interpreter-v1
    try:
        yield sbx
    finally:
        sbx.kill()


def test_sdk_state_across_calls(sdk_sandbox) -> None:  # noqa: ANN001
    assert sdk_sandbox.run_code("x = 1").error is None
    execution = sdk_sandbox.run_code("x + 1")
    assert execution.text == "2"
    assert execution.execution_count is not None


def test_sdk_contexts(sdk_sandbox) -> None:  # noqa: ANN001
    ctx = sdk_sandbox.create_code_context(cwd="/tmp")
    assert ctx.language == "python" and ctx.cwd == "/tmp"
    sdk_sandbox.run_code("v = 'default'")
    sdk_sandbox.run_code("v = 'ctx'", context=ctx)
    assert sdk_sandbox.run_code("v").text == "default"
    assert sdk_sandbox.run_code("v", context=ctx).text == "ctx"
    assert ctx.id in [c.id for c in sdk_sandbox.list_code_contexts()]
    sdk_sandbox.restart_code_context(ctx)
    assert sdk_sandbox.run_code("v", context=ctx).error.name == "NameError"
    sdk_sandbox.remove_code_context(ctx)
    assert ctx.id not in [c.id for c in sdk_sandbox.list_code_contexts()]


def test_sdk_error_with_traceback(sdk_sandbox) -> None:  # noqa: ANN001
    execution = sdk_sandbox.run_code("1/0")
    assert execution.error is not None
    assert execution.error.name == "ZeroDivisionError"
    assert execution.error.value == "division by zero"
    assert "ZeroDivisionError" in execution.error.traceback


def test_sdk_stdout_callbacks(sdk_sandbox) -> None:  # noqa: ANN001
    seen_out, seen_err, seen_results = [], [], []
    execution = sdk_sandbox.run_code("import sys\nprint('one')\nprint('two', file=sys.stderr)\n3",
                                     on_stdout=seen_out.append, on_stderr=seen_err.append,
                                     on_result=seen_results.append)
    assert "".join(m.line for m in seen_out) == "one\n"
    assert "".join(m.line for m in seen_err) == "two\n"
    assert seen_err[0].error is True
    assert [r.text for r in seen_results] == ["3"]
    assert execution.logs.stdout == ["one\n"]


def test_sdk_envs(sdk_sandbox) -> None:  # noqa: ANN001
    assert sdk_sandbox.run_code("import os\nos.environ['SHOAL_E']", envs={"SHOAL_E": "v"}).text == "v"
    assert sdk_sandbox.run_code("str(os.environ.get('SHOAL_E'))").text == "None"


def test_sdk_matplotlib_png(sdk_sandbox) -> None:  # noqa: ANN001
    execution = sdk_sandbox.run_code("import matplotlib.pyplot as plt\nplt.bar(['a', 'b'], [3, 5])\nplt.show()")
    assert execution.error is None
    assert base64.b64decode(execution.results[0].png).startswith(PNG_MAGIC)
    assert "png" in execution.results[0].formats()


def test_sdk_dataframe_html(sdk_sandbox) -> None:  # noqa: ANN001
    execution = sdk_sandbox.run_code("import pandas as pd\npd.DataFrame({'col': [1, 2, 3]})")
    assert execution.results[0].is_main_result
    assert "<table" in execution.results[0].html


def test_sdk_timeout_interrupts_the_kernel(sdk_sandbox) -> None:  # noqa: ANN001
    from e2b import TimeoutException

    with pytest.raises(TimeoutException):
        sdk_sandbox.run_code("import time\ntime.sleep(60)", timeout=2)
    # the sleep was interrupted, not waited out: were the kernel still sleeping, this one would time out
    assert sdk_sandbox.run_code("'free again'", timeout=20).text == "free again"


def test_sdk_async(e2b: None) -> None:
    from e2b_code_interpreter import AsyncSandbox

    async def scenario() -> None:
        sbx = await AsyncSandbox.create()
        try:
            await sbx.run_code("a = 20")
            out: list[str] = []
            execution = await sbx.run_code("print('async')\na * 2 + 2", on_stdout=lambda m: out.append(m.line))
            assert execution.text == "42" and out == ["async\n"]
            ctx = await sbx.create_code_context()
            assert (await sbx.run_code("'a' in dir()", context=ctx)).text == "False"
            assert (await sbx.run_code("1/0")).error.name == "ZeroDivisionError"
        finally:
            await sbx.kill()

    asyncio.run(scenario())
