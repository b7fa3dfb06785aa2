"""The host's one check for user text that reaches a process, a file name, the store or a JSON answer.

Valid JSON can carry what none of those can hold: a NUL byte (no C string holds it) and a lone
UTF-16 surrogate (not encodable as UTF-8). The engine, the native API's models and the E2B control
plane all refuse such text here, with the same words. The agent, inside the sandbox, keeps its own
copy: it cannot trust the host's code to be the one that called it.
"""

from __future__ import annotations

from shoal.errors import InvalidRequest


def text_problem(value: object) -> str | None:
    """What is wrong with ``value`` as text (a phrase to follow its name), or None."""
    if not isinstance(value, str):
        return "must be a string"
    if "\0" in value:
        return "must not contain NUL bytes"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid UTF-8 text (no lone surrogates)"
    return None


def check_text(value: object, what: str) -> str:
    """``value`` itself if it is clean text, else ``InvalidRequest("<what> <problem>")``."""
    problem = text_problem(value)
    if problem is not None:
        raise InvalidRequest(f"{what} {problem}")
    return value  # type: ignore[return-value]


def clean_text(value: str) -> str:
    """The pydantic form (``AfterValidator``): a ``ValueError`` pydantic turns into its 400."""
    problem = text_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value
