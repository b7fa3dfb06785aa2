"""E2B's template build API with the official ``e2b`` SDK as the client, against a real ``shoal serve``.

``Template.build`` uploads the COPY files to the daemon's own signed URL, triggers the build, polls its
status and logs; the template is then a Shoal template (a real sandbox starts from it, with its start
command running). Nothing is mocked.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

e2b = pytest.importorskip("e2b")

from e2b import BuildException, Sandbox, Template  # noqa: E402

from shoal.engine.keys import KeyStore, e2b_form  # noqa: E402


@pytest.fixture(scope="module")
def e2b_env(daemon) -> Iterator[dict[str, str]]:  # noqa: ANN001
    env = {"E2B_API_KEY": e2b_form(daemon.key), "E2B_API_URL": daemon.url, "E2B_SANDBOX_URL": daemon.url}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        for k in ("E2B_DEBUG", "E2B_DOMAIN", "E2B_ACCESS_TOKEN"):
            mp.delenv(k, raising=False)
        yield env


def test_template_build_end_to_end(e2b_env, daemon, engine, tmp_path: Path) -> None:  # noqa: ANN001
    name = f"e2b-{secrets.token_hex(4)}"
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "hello.txt").write_text("hello from the SDK\n")
    template = (Template(file_context_path=str(tmp_path))
                .from_template("minimal")
                .copy("app/hello.txt", "/app/")
                .set_envs({"GREETING": "built"})
                .run_cmd("cat /app/hello.txt && echo \"greeting=$GREETING\"")
                .set_workdir("/app")
                .set_start_cmd("echo started > /tmp/started; sleep 3600", "test -f /tmp/started"))
    logs: list[str] = []
    try:
        info = Template.build(template, name, on_build_logs=lambda entry: logs.append(entry.message))
        assert info.template_id == name
        assert any("greeting=built" in line for line in logs), logs
        assert Template.exists(name) is True
        sbx = Sandbox.create(name, timeout=120)
        try:
            # minimal has no bash for E2B's commands: the files API, and the agent for the working directory
            assert sbx.files.read("/app/hello.txt") == "hello from the SDK\n"
            assert sbx.files.read("/tmp/started") == "started\n"  # the start command ran before create returned
            assert engine.agent(sbx.sandbox_id).run(["/bin/sh", "-c", "pwd"]).stdout == "/app\n"
        finally:
            sbx.kill()

        # tags (E2B's Template.assign_tags/remove_tags): they name the template's one build
        tagged = Template.assign_tags(f"{name}:v1", ["production", f"{name}:latest"])
        assert set(tagged.tags) == {"production", "latest"} and str(tagged.build_id)
        with pytest.raises(Exception):  # noqa: B017 - the SDK's exception type for a 400 varies by version
            Template.assign_tags(f"{name}:v1", ":invalid-tag")
        Template.remove_tags(name, ["production"])

        # another key neither sees it as its own nor may delete it, nor tag it
        _, other = KeyStore(engine.settings.db_path).create(f"other-{secrets.token_hex(3)}")
        headers = {"X-API-KEY": e2b_form(other)}
        assert httpx.get(f"{daemon.url}/templates/aliases/{name}", headers=headers).status_code == 403
        assert httpx.delete(f"{daemon.url}/templates/{name}", headers=headers).status_code == 403
        assert httpx.post(f"{daemon.url}/templates/tags", headers=headers,
                          json={"target": name, "tags": ["x"]}).status_code == 403
    finally:
        r = httpx.delete(f"{daemon.url}/templates/{name}", headers={"X-API-KEY": e2b_form(daemon.key)})
    assert r.status_code == 204, r.text
    assert Template.exists(name) is False


def test_failing_step_is_reported(e2b_env, engine) -> None:  # noqa: ANN001
    name = f"e2b-{secrets.token_hex(4)}"
    template = Template().from_template("minimal").run_cmd("echo about to fail; exit 7")
    with pytest.raises(BuildException, match="exit code 7"):
        Template.build(template, name)
    assert not (engine.templates.settings.templates_dir / name).exists()
    assert [r.id for r in engine.list() if r.template.startswith("build-")] == []
