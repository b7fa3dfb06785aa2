"""Dockerfile → ``BuildPlan`` (``shoal template build NAME -f Dockerfile [CONTEXT]``).

Parsed by ``dockerfile-parse`` (line continuations, comments, JSON vs shell forms are its job); this
module gives each instruction Docker's meaning: FROM (a Shoal template name, else an image reference
imported by ``image_templates``), RUN, COPY/ADD (``--chown``; ADD of a local tar extracts it; ADD of a
URL is refused: builds fetch only through RUN, inside the sandbox), ENV, ARG, WORKDIR, USER, EXPOSE,
CMD, ENTRYPOINT. LABEL, SHELL-less comments and the like are ignored; anything else is refused with
its line number rather than silently skipped. One stage only (multi-stage builds are refused).
"""

from __future__ import annotations

import io
import json
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from dockerfile_parse import DockerfileParser

from shoal.errors import InvalidRequest
from shoal.images.build_steps import BuildPlan, Step, substitute

if TYPE_CHECKING:
    from shoal.engine.engine import Engine
    from shoal.images.store import Progress, TemplateInfo

MAX_DOCKERFILE = 1024 * 1024
_IGNORED = {"LABEL", "MAINTAINER", "STOPSIGNAL", "HEALTHCHECK", "VOLUME", "ONBUILD"}


def _argv_or_shell(value: str) -> dict[str, object]:
    text = value.strip()
    if text.startswith("["):
        try:
            argv = json.loads(text)
        except ValueError:
            argv = None
        if isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv):
            return {"argv": argv}
    return {"shell": text}


def _pairs(value: str, line: int, kind: str) -> dict[str, str]:
    try:
        words = shlex.split(value)
    except ValueError as err:
        raise InvalidRequest(f"Dockerfile line {line}: {kind}: {err}") from err
    if kind == "ENV" and words and "=" not in words[0]:  # legacy "ENV KEY value with spaces"
        key, _, rest = value.strip().partition(" ")
        return {key: rest.strip()}
    pairs: dict[str, str] = {}
    for word in words:
        key, sep, val = word.partition("=")
        if not key or (kind == "ENV" and not sep):
            raise InvalidRequest(f"Dockerfile line {line}: {kind} needs NAME=value, got {word!r}")
        pairs[key] = val if sep else ""
    return pairs


def _flags(words: list[str], line: int, allowed: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    flags: dict[str, str] = {}
    while words and words[0].startswith("--"):
        key, _, val = words.pop(0)[2:].partition("=")
        if key not in allowed:
            raise InvalidRequest(f"Dockerfile line {line}: flag --{key} is not supported")
        flags[key] = val
    return flags, words


def parse(dockerfile: Path, context: Path | None, build_args: dict[str, str] | None = None) -> BuildPlan:
    """Read ``dockerfile`` into a plan; InvalidRequest (with the line) for what Shoal cannot build."""
    try:
        if dockerfile.stat().st_size > MAX_DOCKERFILE:
            raise InvalidRequest(f"{dockerfile} is larger than {MAX_DOCKERFILE} bytes")
        content = dockerfile.read_text(errors="replace")
    except OSError as err:
        raise InvalidRequest(f"cannot read {dockerfile}: {err.strerror or err}") from err
    parser = DockerfileParser(fileobj=io.BytesIO(content.encode()))
    plan = BuildPlan(context=context, source=f"dockerfile:{dockerfile.resolve()}")
    variables: dict[str, str] = dict(build_args or {})
    seen_from = False
    for item in parser.structure:
        kind, value, line = item["instruction"].upper(), item["value"], item["startline"] + 1
        if kind == "COMMENT" or kind in _IGNORED:
            continue
        if kind == "FROM":
            if seen_from:
                raise InvalidRequest(f"Dockerfile line {line}: multi-stage builds are not supported")
            seen_from = True
            words = substitute(value, variables).split()
            if not words or (len(words) > 1 and words[1].upper() != "AS"):
                raise InvalidRequest(f"Dockerfile line {line}: FROM needs one image or template")
            _set_base(plan, words[0])
            continue
        if kind == "ARG":
            pairs = _pairs(value, line, kind)
            for k, v in pairs.items():
                variables.setdefault(k, v)
            if seen_from:
                plan.steps.append(Step("ARG", {"pairs": {k: variables.get(k, v) for k, v in pairs.items()}},
                                       f"ARG {value}"))
            continue
        if not seen_from:
            raise InvalidRequest(f"Dockerfile line {line}: {kind} before FROM")
        plan.steps.append(_step(kind, value, line, variables))
        if kind == "ENV":
            variables.update(plan.steps[-1].args["pairs"])
    if not seen_from:
        raise InvalidRequest(f"{dockerfile} has no FROM instruction")
    return plan


def _set_base(plan: BuildPlan, ref: str) -> None:
    from shoal.images.image_templates import NAME_RE
    from shoal.images.recipes import RECIPES
    if ref in RECIPES or (NAME_RE.fullmatch(ref) and "/" not in ref and ":" not in ref and "." not in ref):
        plan.base_template = ref  # a bare name: a Shoal template (docker's "ubuntu" needs docker.io/ubuntu)
    else:
        plan.base_image = ref


def _step(kind: str, value: str, line: int, variables: dict[str, str]) -> Step:
    text = f"{kind} {value}"
    if kind == "RUN":
        return Step("RUN", _argv_or_shell(value), text)
    if kind in ("CMD", "ENTRYPOINT"):
        return Step(kind, _argv_or_shell(value), text)
    if kind == "ENV":
        pairs = {k: substitute(v, variables) for k, v in _pairs(value, line, kind).items()}
        return Step("ENV", {"pairs": pairs}, text)
    if kind == "WORKDIR":
        path = substitute(value.strip(), variables)
        if not path:
            raise InvalidRequest(f"Dockerfile line {line}: WORKDIR needs a path")
        return Step("WORKDIR", {"path": path}, text)
    if kind == "USER":
        user = substitute(value.strip(), variables)
        if not user or any(c.isspace() for c in user):
            raise InvalidRequest(f"Dockerfile line {line}: USER needs one user[:group]")
        return Step("USER", {"user": user}, text)
    if kind == "EXPOSE":
        ports = [p if "/" in p else f"{p}/tcp" for p in substitute(value, variables).split()]
        return Step("EXPOSE", {"ports": ports}, text)
    if kind in ("COPY", "ADD"):
        text_value = value.strip()
        if text_value.startswith("["):
            try:
                words = json.loads(text_value)
            except ValueError:
                words = None
            if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                raise InvalidRequest(f"Dockerfile line {line}: {kind} has a malformed JSON form")
        else:
            words = shlex.split(text_value)
        flags, words = _flags(words, line, ("chown", "chmod", "from", "link"))
        if "from" in flags:
            raise InvalidRequest(f"Dockerfile line {line}: COPY --from needs multi-stage builds (not supported)")
        words = [substitute(w, variables) for w in words]
        if len(words) < 2:
            raise InvalidRequest(f"Dockerfile line {line}: {kind} needs a source and a destination")
        if kind == "ADD" and any("://" in w for w in words[:-1]):
            raise InvalidRequest(f"Dockerfile line {line}: ADD of a URL is not supported (fetch it in a RUN step)")
        mode = None
        if flags.get("chmod"):
            try:
                mode = int(flags["chmod"], 8)
            except ValueError:
                raise InvalidRequest(f"Dockerfile line {line}: --chmod needs an octal mode") from None
        args: dict[str, object] = {"sources": words[:-1], "dest": words[-1], "chown": flags.get("chown") or None,
                                   "mode": mode, "archive": kind == "ADD"}
        return Step("COPY", args, text)
    raise InvalidRequest(f"Dockerfile line {line}: {kind} is not supported")



#: ``--start-cmd dockerfile``: the Dockerfile's ENTRYPOINT + CMD become the start command.
FROM_DOCKERFILE = "dockerfile"


def start_command(plan: BuildPlan, asked: str | None) -> str | None:
    """The start command a build records: as asked, or (``dockerfile``) ENTRYPOINT + CMD as one shell line."""
    if not asked:
        return None
    if asked != FROM_DOCKERFILE:
        return asked
    from shoal.images.build_steps import BuildConfig
    config = BuildConfig()
    for step in plan.steps:
        config.apply(step)
    argv = [*(config.entrypoint or []), *(config.cmd or [])]
    if not argv:
        raise InvalidRequest("--start-cmd dockerfile: the Dockerfile has no CMD or ENTRYPOINT")
    return shlex.join(argv)


def build_dockerfile(engine: Engine, name: str, dockerfile: Path, context: Path | None, *, force: bool = False,
                     start_cmd: str | None = None, ready: str | None = None,
                     build_args: dict[str, str] | None = None, progress: Progress | None = None) -> TemplateInfo:
    """``shoal template build NAME -f Dockerfile [CONTEXT]`` (the context defaults to the Dockerfile's folder)."""
    from shoal.images import build_runner
    from shoal.images.start_cmd import parse_ready
    context = (context or dockerfile.parent).resolve()
    if not context.is_dir():
        raise InvalidRequest(f"build context {context} is not a directory")
    plan = parse(dockerfile, context, build_args)
    plan.force = force
    plan.start_cmd = start_command(plan, start_cmd)
    plan.ready = parse_ready(ready)
    if plan.ready and not plan.start_cmd:
        raise InvalidRequest("--ready needs --start-cmd")
    return build_runner.build(engine, name, plan, progress)
