"""Which languages the code interpreter runs, how each is started, and what a missing one needs.

Runs INSIDE the sandbox, imported by ``kernel_server.py`` (stdlib only). Names follow E2B's
server: the client's name is lower-cased, ``js`` means ``javascript``, ``ts`` ``typescript``, and
contexts report the normalized name (E2B's SDK and tests compare against ``"python"`` and
``"javascript"``).

Languages come from E2B's template (Python, JavaScript, R, Bash, Java). A language is offered when
its runtime is in the template; one that is not answers 400 naming the packages it needs, so the
caller learns what to build rather than getting a kernel that fails to start.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))
#: The Node runner of JavaScript and TypeScript contexts (``js_kernel.js``), uploaded beside this file.
JS_RUNNER = os.path.join(HERE, "js_kernel.js")
#: Where node finds the ``typescript`` module (Debian's node-typescript, or a global npm install).
TYPESCRIPT_DIRS = ("/usr/share/nodejs/typescript", "/usr/lib/node_modules/typescript",
                   "/usr/local/lib/node_modules/typescript")
#: Languages run by ``js_kernel.js`` rather than a Jupyter kernel.
NODE_LANGUAGES = ("javascript", "typescript")

#: Client spellings -> the language a context reports.
ALIASES = {"python3": "python", "js": "javascript", "ts": "typescript"}
#: Languages run by a Jupyter kernel, and that kernel's spec name.
JUPYTER_KERNELS = {"python": "python3", "bash": "bash", "r": "ir", "java": "java"}
#: What a template must install for each language (said in the error when it is missing).
NEEDS = {
    "python": "ipykernel (PyPI)",
    "javascript": "Node.js (Debian package nodejs)",
    "bash": "bash_kernel (PyPI package bash_kernel, then python3 -m bash_kernel.install)",
    "r": "R and IRkernel (Debian packages r-base-core and r-cran-irkernel)",
    "java": "a JDK and a Java kernel (Debian package openjdk-17-jdk-headless and PyPI package jjava)",
    "typescript": "Node.js and the TypeScript compiler (Debian packages nodejs and node-typescript)",
}


_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class UnsupportedLanguage(ValueError):
    """The language is unknown, or its runtime is not in this template (the message says which)."""


def normalize(value: object) -> str:
    """The language a client asked for, as E2B names it (``None`` or ``""``: Python)."""
    if value is not None and not isinstance(value, str):
        raise UnsupportedLanguage("language must be a string")
    language = (value or "python").strip().lower() or "python"
    return ALIASES.get(language, language)


class Catalog:
    """The languages this sandbox can run, found once at server start (kernel specs, ``node``)."""

    def __init__(self, kernel_specs: set[str] | None = None, node: str | None = None) -> None:
        """``kernel_specs``/``node`` (the node binary, "" for none) are found when not given."""
        if kernel_specs is None:
            from jupyter_client.kernelspec import KernelSpecManager

            kernel_specs = set(KernelSpecManager().find_kernel_specs())
        self.kernel_specs = kernel_specs
        if node is None:
            node = shutil.which("node") if os.path.isfile(JS_RUNNER) else None
        self.node = node or None
        self.typescript = bool(self.node) and any(os.path.isdir(d) for d in TYPESCRIPT_DIRS)

    def available(self) -> list[str]:
        found = [lang for lang, spec in JUPYTER_KERNELS.items() if spec in self.kernel_specs]
        found[1:1] = [lang for lang, present in (("javascript", self.node), ("typescript", self.typescript))
                      if present]
        return found

    def check(self, language: str) -> str:
        """``language`` if this sandbox runs it; else UnsupportedLanguage saying what is missing."""
        if language in self.available():
            return language
        runs = ", ".join(self.available()) or "nothing"
        if language in NEEDS:
            raise UnsupportedLanguage(f"Language '{language}' is not available in this sandbox: it needs "
                                      f"{NEEDS[language]}. This sandbox runs: {runs}")
        raise UnsupportedLanguage(f"Language '{language}' is not supported. This sandbox runs: {runs}")


def env_code(language: str, values: dict[str, str | None]) -> str:
    """Code that sets (str) or removes (None) environment variables in a Jupyter kernel of ``language``.

    For Java, like E2B, these are system properties (a JVM cannot change its own environment).
    """
    lines: list[str] = []
    if language == "python":
        lines.append("import os as __shoal_os")
        sets = {k: v for k, v in values.items() if v is not None}
        if sets:
            lines.append(f"__shoal_os.environ.update({sets!r})")
        lines += [f"__shoal_os.environ.pop({k!r}, None)" for k, v in values.items() if v is None]
        lines.append("del __shoal_os")
    elif language == "bash":
        lines += [f"export {k}={shlex.quote(v)}" if v is not None else f"unset {k}" for k, v in values.items()
                  if _SHELL_NAME.fullmatch(k)]
    elif language == "r":
        lines += [f"do.call(Sys.setenv, structure(list({json.dumps(v)}), names = {json.dumps(k)}))"
                  if v is not None else f"Sys.unsetenv({json.dumps(k)})" for k, v in values.items()]
    elif language == "java":
        lines += [f"System.setProperty({json.dumps(k)}, {json.dumps(v)});" if v is not None
                  else f"System.clearProperty({json.dumps(k)});" for k, v in values.items()]
    return "\n".join(lines)
