"""``shoal template build NAME -f Dockerfile``: real builds (steps run in real sandboxes), no mocks.

Every build starts FROM ``minimal`` (busybox: a shell, ``id``, ``stat``) to stay quick; the cache test
also builds FROM a template the test itself built from a Dockerfile.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shoal.engine import Engine
from shoal.errors import InvalidRequest
from shoal.images.dockerfile import build_dockerfile


@pytest.fixture
def names(engine: Engine) -> Iterator[Callable[[], str]]:
    """Fresh template names, every one removed at the end (whatever the test did)."""
    made: list[str] = []

    def new() -> str:
        made.append(f"df-{secrets.token_hex(4)}")
        return made[-1]
    yield new
    for name in reversed(made):
        try:
            engine.templates.remove(name)
        except Exception:  # noqa: BLE001 - never built (a failing build) is fine
            pass


def _build(engine: Engine, name: str, ctx: Path, text: str, **kwargs: object) -> tuple[object, list[str]]:
    (ctx / "Dockerfile").write_text(text)
    lines: list[str] = []
    info = build_dockerfile(engine, name, ctx / "Dockerfile", ctx, progress=lambda m, f: lines.append(m),
                            **kwargs)  # type: ignore[arg-type]
    return info, lines


def _run(engine: Engine, new_sandbox: Callable[..., str], template: str, script: str) -> str:
    sid = new_sandbox(template)
    result = engine.agent(sid).run(["/bin/sh", "-c", script])
    assert result.exit_code == 0, result.stderr
    return result.stdout


def _build_sandboxes(engine: Engine) -> list[str]:
    return [r.id for r in engine.list() if r.template.startswith("build-")]


def _stage_dirs(engine: Engine) -> list[str]:
    root = engine.templates.settings.templates_dir
    return sorted(p.name for p in root.iterdir() if p.name.startswith("build-"))


def test_cache_hit_and_invalidation(engine: Engine, new_sandbox, names, tmp_path: Path) -> None:  # noqa: ANN001
    first, child = names(), names()
    (tmp_path / "hello.txt").write_text("hello from the context\n")
    text = ("FROM minimal\nENV GREETING=hi\nRUN cat /proc/sys/kernel/random/uuid > /first\n"
            "COPY hello.txt /etc/hello.txt\nWORKDIR /work\nRUN echo \"$GREETING\" > second\n")
    _, lines = _build(engine, first, tmp_path, text)
    assert not any("(cached)" in line for line in lines), lines
    out = _run(engine, new_sandbox, first, "cat /first /etc/hello.txt /work/second; pwd; echo $GREETING")
    uuid, hello, second, cwd, env = out.splitlines()
    assert (hello, second, cwd, env) == ("hello from the context", "hi", "/work", "hi")

    # nothing changed: no sandbox, no step runs
    _, lines = _build(engine, first, tmp_path, text)
    assert lines == ["FROM minimal", f"{first} is up to date"], lines

    # the last RUN changed: the steps before it are cache hits (the first RUN's output is the same bytes)
    _, lines = _build(engine, first, tmp_path, text.replace("> second", "> second; echo more >> second"))
    assert any(line.endswith("RUN cat /proc/sys/kernel/random/uuid > /first (cached)") for line in lines), lines
    assert _run(engine, new_sandbox, first, "cat /first").strip() == uuid

    # a copied file changed: its COPY and everything after it run again, the RUN before it does not
    (tmp_path / "hello.txt").write_text("changed\n")
    _, lines = _build(engine, first, tmp_path, text)
    assert any("RUN cat /proc/sys/kernel/random/uuid > /first (cached)" in line for line in lines)
    assert not any("COPY hello.txt /etc/hello.txt (cached)" in line for line in lines), lines
    assert _run(engine, new_sandbox, first, "cat /first /etc/hello.txt").splitlines() == [uuid, "changed"]

    # FROM a template built from a Dockerfile: its files, its defaults (WORKDIR, ENV) carry over
    sub = tmp_path / "child"
    sub.mkdir()
    _build(engine, child, sub, f"FROM {first}\nRUN echo child > /child\n")
    assert _run(engine, new_sandbox, child, "cat /first /child; pwd").splitlines() == [uuid, "child", "/work"]


def test_failing_run_reports_and_leaves_nothing(engine: Engine, names, tmp_path: Path) -> None:  # noqa: ANN001
    name = names()
    mounts_before = Path("/proc/self/mountinfo").read_text().count(str(engine.settings.run_dir))
    with pytest.raises(InvalidRequest) as info:
        _build(engine, name, tmp_path, "FROM minimal\nRUN echo preparing\nRUN echo it broke >&2; exit 3\n")
    message = str(info.value)
    assert "exit code 3" in message and "it broke" in message and "2/2" in message, message
    assert not (engine.templates.settings.templates_dir / name).exists()
    assert _build_sandboxes(engine) == [] and _stage_dirs(engine) == []
    assert Path("/proc/self/mountinfo").read_text().count(str(engine.settings.run_dir)) <= mounts_before


def test_copy_honours_dockerignore_and_chown(engine: Engine, new_sandbox, names, tmp_path: Path) -> None:  # noqa: ANN001
    name = names()
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "main.sh").write_text("echo main\n")
    (tmp_path / "app" / "secret.key").write_text("do not ship\n")
    (tmp_path / "app" / "cache").mkdir()
    (tmp_path / "app" / "cache" / "junk").write_text("junk\n")
    (tmp_path / "app" / "link").symlink_to("main.sh")  # inside the context: copied as a symlink
    (tmp_path / ".dockerignore").write_text("app/*.key\napp/cache\n")
    _build(engine, name, tmp_path, "FROM minimal\nCOPY --chown=1000:1001 app /srv/app/\n"
                                   "USER 1000\nRUN id -u > /tmp/who\n")
    out = _run(engine, new_sandbox, name, "ls -A /srv/app; stat -c '%u:%g %a' /srv/app/main.sh; "
                                          "readlink /srv/app/link; cat /tmp/who")
    assert out.splitlines() == ["link", "main.sh", "1000:1001 644", "main.sh", "1000"]


@pytest.mark.parametrize("copy, why", [
    ("COPY ../outside /x", "leaves the build context"),
    ("COPY /etc/passwd /x", "relative to the build context"),
    ("COPY escape/passwd /x", "leaves the build context"),
    ("COPY escape/ /x", "leaves the build context"),
    ("COPY missing /x", "does not exist"),
])
def test_copy_path_traversal_refused(engine: Engine, names, tmp_path: Path, copy: str, why: str) -> None:  # noqa: ANN001
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (tmp_path / "outside").write_text("host file\n")
    (ctx / "escape").symlink_to("/etc")
    name = names()
    with pytest.raises(InvalidRequest, match=why):
        _build(engine, name, ctx, f"FROM minimal\n{copy}\n")
    assert not (engine.templates.settings.templates_dir / name).exists()
    assert _build_sandboxes(engine) == []


def test_copy_of_a_symlink_copies_the_link_never_its_target(engine: Engine, new_sandbox, names,  # noqa: ANN001
                                                             tmp_path: Path) -> None:
    """A source that is itself a symlink lands as the link (Docker's and E2B's rule), wherever it points:
    an absolute link into the context (E2B's SDK uploads such), or out of it to a host directory."""
    ctx = tmp_path / "ctx"
    (ctx / "folder").mkdir(parents=True)
    (ctx / "folder" / "test.txt").write_text("in context\n")
    (ctx / "folder" / "abs.txt").symlink_to(ctx / "folder" / "test.txt")
    (ctx / "etc-link").symlink_to("/etc")
    name = names()
    _build(engine, name, ctx, "FROM minimal\nCOPY folder/* /folder/\nCOPY etc-link /x\n")
    out = _run(engine, new_sandbox, name, "readlink /folder/abs.txt; cat /folder/test.txt; readlink /x")
    assert out.splitlines() == [str(ctx / "folder" / "test.txt"), "in context", "/etc"]


def test_copy_of_a_wildcard_matching_several_files_makes_a_directory(engine: Engine, new_sandbox, names,  # noqa: ANN001
                                                                     tmp_path: Path) -> None:
    """Docker's rule (and E2B's ``copy("folder/*", "folder")``): several sources matched by a wildcard land
    in the destination as a directory, even without a trailing '/'."""
    ctx = tmp_path / "ctx"
    (ctx / "folder").mkdir(parents=True)
    for n in ("a.txt", "b.txt"):
        (ctx / "folder" / n).write_text(n + "\n")
    name = names()
    _build(engine, name, ctx, "FROM minimal\nCOPY folder/* /dest\n")
    assert _run(engine, new_sandbox, name, "cat /dest/a.txt /dest/b.txt").splitlines() == ["a.txt", "b.txt"]


def test_add_local_tar_extracts_through_the_layer_code(engine: Engine, new_sandbox, names,  # noqa: ANN001
                                                       tmp_path: Path) -> None:
    import io
    import tarfile
    name = names()
    with tarfile.open(tmp_path / "bundle.tar.gz", "w:gz") as tar:
        data = b"from the tarball\n"
        member = tarfile.TarInfo("inner/file.txt")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    with tarfile.open(tmp_path / "evil.tar", "w") as tar:
        member = tarfile.TarInfo("../../escaped")
        member.size = 1
        tar.addfile(member, io.BytesIO(b"x"))
    _build(engine, name, tmp_path, "FROM minimal\nADD bundle.tar.gz /opt/\n")
    assert _run(engine, new_sandbox, name, "cat /opt/inner/file.txt").strip() == "from the tarball"
    with pytest.raises(InvalidRequest, match="leaves the destination"):
        _build(engine, names(), tmp_path, "FROM minimal\nADD evil.tar /opt/\n")
    assert _build_sandboxes(engine) == [] and _stage_dirs(engine) == []
    assert os.path.exists(tmp_path / "evil.tar")


def test_cli_prints_plain_step_lines_and_one_line_errors(engine: Engine, names, tmp_path: Path) -> None:  # noqa: ANN001
    import subprocess
    import sys
    name = names()
    (tmp_path / "Dockerfile").write_text("FROM minimal\nRUN echo from-the-run-step\n")
    shoal = [sys.executable, "-m", "shoal.cli.main"] if not Path(sys.prefix, "bin/shoal").exists() \
        else [str(Path(sys.prefix, "bin/shoal"))]
    ok = subprocess.run([*shoal, "template", "build", name, "-f", str(tmp_path / "Dockerfile")],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    out = ok.stdout + ok.stderr
    assert "[1/1] RUN echo from-the-run-step" in out and "from-the-run-step" in out and "\x1b[" not in out, out
    (tmp_path / "Dockerfile").write_text("FROM minimal\nCOPY ../etc /x\n")
    bad = subprocess.run([*shoal, "template", "build", names(), "-f", str(tmp_path / "Dockerfile")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert [line for line in bad.stderr.splitlines() if "leaves the build context" in line], bad.stderr
