"""The one JSON parser of the E2B facade (control plane and envd's Connect messages): bounded.

``json.loads`` recurses once per nesting level, so ``[[[[...]]]]`` 100k deep raises RecursionError
(a 500, and a thread's stack spent) before any handler sees the value; it also accepts ``NaN`` and
``Infinity``, which are not JSON and which ``int()`` turns into OverflowError/ValueError later. Every
request body the facade parses goes through ``loads`` here, so those limits hold everywhere at once:

* at most ``max_bytes`` of text (the caller's own cap applies too; this one is the last word),
* at most ``MAX_DEPTH`` nested arrays/objects, checked by a linear scan *before* parsing,
* no ``NaN``/``Infinity``/``-Infinity``, no float that overflows to infinity (``1e999``); an integer
  beyond Python's digit limit is refused as invalid.

Failures raise ``BadJson`` (a ValueError) with a message safe to show the caller.
"""

from __future__ import annotations

import json
import re

MAX_DEPTH = 64
MAX_BYTES = 16 * 1024 * 1024
#: A JSON string, terminated or not (possessive: linear time whatever the input), to blank out.
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*+"?', re.DOTALL)
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


class BadJson(ValueError):
    """The text is not JSON we accept; ``str()`` says why, without echoing the input."""


def _reject_constant(name: str) -> object:
    raise BadJson(f"{name} is not a JSON value")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise BadJson(f"number {text[:20]} is out of range")
    return value


def too_deep(raw: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether ``raw`` nests arrays/objects deeper than ``limit`` (or leaves brackets unbalanced in a
    way the recursive parser would follow). Linear and in C: strings are blanked out, everything but
    brackets dropped, then innermost ``[]`` pairs removed ``limit`` times; anything left is too deep."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False  # cannot be deeper than the number of openers
    rest = _STRING.sub(b"", raw).translate(_BRACKETS, _NOT_BRACKETS)
    for _ in range(limit):
        if not rest:
            return False
        rest = rest.replace(b"[]", b"")
    return b"[" in rest


def loads(raw: bytes | str, *, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH) -> object:
    """``json.loads`` within the limits above."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    if len(data) > max_bytes:
        raise BadJson(f"JSON text larger than {max_bytes} bytes")
    if too_deep(data, max_depth):
        raise BadJson(f"JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(data, parse_constant=_reject_constant, parse_float=_finite)
    except BadJson:
        raise
    except RecursionError as exc:  # the scan above makes this unreachable; kept as the last guard
        raise BadJson(f"JSON nested deeper than {max_depth} levels") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, and ints past the digit limit
        raise BadJson(f"not valid JSON: {exc}") from exc


def loads_object(raw: bytes | str, what: str = "request body", **limits: int) -> dict:
    """``loads`` for a text that must hold a JSON object (empty text: ``{}``)."""
    if not (raw.strip() if isinstance(raw, bytes | str) else raw):
        return {}
    value = loads(raw, **limits)
    if not isinstance(value, dict):
        raise BadJson(f"{what} must be a JSON object")
    return value
