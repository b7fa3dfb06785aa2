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
    assert main_text(interp.execute(sid, "os.environ.get('HOME')")) == "/root"  # restored (kernels run as root)


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
    r = interp.request(sid, "POST", "/execute", {"code": "1", "language": "cobol"})
    assert r.status_code == 400 and "not supported" in r.text and "python, javascript" in r.text
    r = interp.request(sid, "POST", "/execute", {"code": "1", "language": "python", "context_id": "x"})
    assert r.status_code == 400
    assert interp.request(sid, "POST", "/execute", {"code": "1", "context_id": "nope"}).status_code == 404
    for cwd in ("/does/not/exist", "relative/dir", 5, "/etc/hostname"):
        r = interp.request(sid, "POST", "/contexts", {"cwd": cwd})
        assert r.status_code == 400 and "cwd" in r.text, (cwd, r.status_code, r.text)


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

    sbx = Sandbox.create(timeout=SANDBOX_TIMEOUT,  # the SDK's default template: code-interpreter-v1
                         envs={"SANDBOX_WIDE": "from create"})
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


# --- E2B's template: root kernels, default contexts, charts and data, every language -----------------

def _languages(sbx) -> list[str]:  # noqa: ANN001
    return [c.language for c in sbx.list_code_contexts()]


def test_sdk_fresh_sandbox_lists_the_default_python_and_javascript_contexts(e2b: None) -> None:
    from e2b_code_interpreter import Sandbox

    sbx = Sandbox.create(timeout=SANDBOX_TIMEOUT)
    try:
        assert _languages(sbx) == ["python", "javascript"]  # at once: the listing waits for them
        ctx = sbx.create_code_context()
        listed = sbx.list_code_contexts()
        assert [c.language for c in listed[:2]] == ["python", "javascript"]
        assert listed[-1].id == ctx.id and listed[-1].cwd == "/home/user"
    finally:
        sbx.kill()


def test_sdk_lazily_made_default_lists_before_a_newer_context(sdk_sandbox) -> None:  # noqa: ANN001
    """The default Java context is asked for first and starts slowly (a JVM); a Python context asked
    for while it starts is up sooner, yet lists after it: contexts list in the order they were asked for."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        java = pool.submit(sdk_sandbox.run_code, 'System.out.println("up")', language="java", timeout=120)
        deadline = time.monotonic() + 60
        while sdk_sandbox.commands.run("pgrep -f 'jjava[.]jar' || true", user="root").stdout.strip() == "":
            assert time.monotonic() < deadline, "the Java kernel never started"
            time.sleep(0.05)
        newer = sdk_sandbox.create_code_context(language="python")
        assert java.result().logs.stdout == ["up"]  # E2B's Java kernel drops println's newline
    ids = [c.id for c in sdk_sandbox.list_code_contexts()]
    java_ids = [c.id for c in sdk_sandbox.list_code_contexts() if c.language == "java"]
    assert java_ids and ids.index(java_ids[0]) < ids.index(newer.id) == len(ids) - 1


def test_sdk_kernels_run_as_root_and_cwd_root_works(sdk_sandbox) -> None:  # noqa: ANN001
    ctx = sdk_sandbox.create_code_context(language="python", cwd="/root")
    assert ctx.cwd == "/root"
    assert sdk_sandbox.run_code("import os\nos.getcwd(), os.getuid()", context=ctx).text == "('/root', 0)"
    assert sdk_sandbox.list_code_contexts()[-1].id == ctx.id
    # The default context still starts in /home/user, as E2B's does (and `!pwd` says so).
    assert "".join(sdk_sandbox.run_code("!pwd").logs.stdout).strip() == "/home/user"
    sdk_sandbox.remove_code_context(ctx)


def test_sdk_bad_cwd_is_a_clear_400(sdk_sandbox) -> None:  # noqa: ANN001
    from e2b import SandboxException

    for cwd in ("/no/such/dir", "not/absolute"):
        with pytest.raises(SandboxException, match="400.*cwd"):
            sdk_sandbox.create_code_context(cwd=cwd)


BAR_CHART = """
import matplotlib.pyplot as plt
plt.figure(figsize=(8, 5))
plt.bar(['A', 'B', 'C'], [100, 200, 300], label='Sold')
plt.title('Sales')
plt.xlabel('Authors')
plt.ylabel('Books')
plt.show()
"""


def test_sdk_chart_is_extracted_by_e2b_charts(sdk_sandbox) -> None:  # noqa: ANN001
    from e2b_code_interpreter.charts import BarChart, ChartType

    execution = sdk_sandbox.run_code(BAR_CHART)
    assert execution.error is None
    [result] = execution.results
    assert result.png and not result.extra
    chart = result.chart
    assert isinstance(chart, BarChart) and chart.type == ChartType.BAR
    assert (chart.title, chart.x_label, chart.y_label) == ("Sales", "Authors", "Books")
    assert [(b.label, b.value, b.group) for b in chart.elements] == [
        ("A", 100, "Sold"), ("B", 200, "Sold"), ("C", 300, "Sold")]
    assert "chart" in result.formats()


def test_sdk_dataframe_has_data(sdk_sandbox) -> None:  # noqa: ANN001
    execution = sdk_sandbox.run_code("import pandas as pd\n"
                                     "pd.DataFrame({'a': [1, 2, 3], 't': pd.to_datetime(['2024-01-01'] * 3)})")
    [result] = execution.results
    assert result.data == {"a": [1, 2, 3], "t": ["2024-01-01T00:00:00"] * 3}
    assert "<table" in result.html
    # anything else gets no data field
    assert sdk_sandbox.run_code("[1, 2]").results[0].data is None


def test_sdk_javascript_context(sdk_sandbox) -> None:  # noqa: ANN001
    assert sdk_sandbox.run_code("console.log('Hello, World!')", language="js").logs.stdout == ["Hello, World!\n"]
    assert sdk_sandbox.run_code("import { readFileSync } from 'fs'\nconsole.log(typeof readFileSync)",
                                language="javascript").logs.stdout == ["function\n"]
    assert sdk_sandbox.run_code("await Promise.resolve('Hello World!')", language="js").text == "Hello World!"
    sdk_sandbox.run_code("let kept = 20", language="js")
    assert sdk_sandbox.run_code("kept * 2 + 2", language="js").text == "42"
    assert sdk_sandbox.run_code("process.cwd()", language="js").text == "/home/user"
    assert sdk_sandbox.run_code("process.env.FOO", language="js", envs={"FOO": "bar"}).text == "bar"
    assert sdk_sandbox.run_code("process.env.FOO || 'default'", language="js").text == "default"
    error = sdk_sandbox.run_code("null.x", language="js").error
    assert error.name == "TypeError" and "null" in error.value and "node:" not in error.traceback
    ctx = sdk_sandbox.create_code_context(language="js", cwd="/tmp")
    assert (ctx.language, ctx.cwd) == ("javascript", "/tmp")
    assert sdk_sandbox.run_code("typeof kept", context=ctx).text == "undefined"  # a context of its own


def test_sdk_typescript_context(sdk_sandbox) -> None:  # noqa: ANN001
    execution = sdk_sandbox.run_code("const message: string = 'Hello, World!'; console.log(message)", language="ts")
    assert execution.logs.stdout == ["Hello, World!\n"]
    assert sdk_sandbox.run_code("interface P { x: number }\nconst p: P = { x: 2 }\np.x * 21",
                                language="typescript").text == "42"
    assert sdk_sandbox.run_code("process.cwd()", language="ts").text == "/home/user"
    assert sdk_sandbox.list_code_contexts()  # and the TypeScript default context lists as "typescript"
    assert "typescript" in _languages(sdk_sandbox)


def test_sdk_javascript_timeout_frees_the_context(sdk_sandbox) -> None:  # noqa: ANN001
    from e2b import TimeoutException

    with pytest.raises(TimeoutException):
        sdk_sandbox.run_code("while (true) {}", language="js", timeout=2)
    assert sdk_sandbox.run_code("'free again'", language="js", timeout=30).text == "free again"


def test_sdk_bash_r_and_java_contexts(sdk_sandbox) -> None:  # noqa: ANN001
    out = sdk_sandbox.run_code("echo $FOO; pwd", language="bash", envs={"FOO": "it's"}).logs.stdout
    assert "".join(out) == "it's\n/home/user\n"
    assert sdk_sandbox.run_code("echo ${FOO:-default}", language="bash").logs.stdout == ["default\n"]
    assert sdk_sandbox.run_code('print("Hello, World!")', language="r").logs.stdout == ['[1] "Hello, World!"\n']
    assert sdk_sandbox.run_code("Sys.getenv('FOO')", language="r", envs={"FOO": "bar"}).results[0].text == '[1] "bar"'
    assert sdk_sandbox.run_code("Sys.getenv('FOO', unset = 'default')", language="r").results[0].text == \
        '[1] "default"'
    # E2B's Java kernel: println's line without its newline; the sandbox's env vars as system properties
    assert sdk_sandbox.run_code('System.out.println("Hello, World!")', language="java").logs.stdout == \
        ["Hello, World!"]
    assert sdk_sandbox.run_code('System.getProperty("user.dir")', language="java").text == "/home/user"
    assert sdk_sandbox.run_code('System.getProperty("SANDBOX_WIDE")', language="java").text == "from create"


def test_unknown_language_lists_what_the_sandbox_runs(interp: Interp, ci_sandbox: tuple[str, None]) -> None:
    sid, _ = ci_sandbox
    r = interp.request(sid, "POST", "/contexts", {"language": "cobol"})
    assert r.status_code == 400
    assert "'cobol' is not supported. This sandbox runs: python, javascript, typescript, bash, r, java" in r.text


def test_missing_language_names_the_packages_it_needs() -> None:
    """A template without a language's runtime says which packages bring it (the server's own catalog,
    given what such a template has: only the Python kernel, no node)."""
    from shoal.inside.languages import Catalog, UnsupportedLanguage

    catalog = Catalog(kernel_specs={"python3"}, node="")
    assert catalog.available() == ["python"] and catalog.check("python") == "python"
    for language, needs in (("r", "r-base-core and r-cran-irkernel"), ("java", "openjdk-17-jdk-headless"),
                            ("java", "jjava"), ("javascript", "nodejs"), ("typescript", "node-typescript"),
                            ("bash", "bash_kernel")):
        with pytest.raises(UnsupportedLanguage, match=f"'{language}' is not available.*{needs}.*runs: python$"):
            catalog.check(language)


def test_sdk_run_code_on_a_sandbox_killed_mid_execution_raises(e2b: None) -> None:
    """The relay aborts a response the sandbox cut short: the SDK then reports the sandbox killed,
    never an empty, error-free Execution (which a cleanly ended response would read as)."""
    import threading

    from e2b import TimeoutException
    from e2b_code_interpreter import Sandbox

    sbx = Sandbox.create(timeout=SANDBOX_TIMEOUT)
    running = threading.Event()
    killer = threading.Thread(target=lambda: running.wait(120) and sbx.kill())
    killer.start()
    try:
        with pytest.raises(TimeoutException, match="sandbox was killed while the request was in progress"):
            sbx.run_code("import time\nprint('running', flush=True)\ntime.sleep(300)", timeout=300,
                         on_stdout=lambda _m: running.set())
    finally:
        running.set()
        killer.join()
        sbx.kill()
