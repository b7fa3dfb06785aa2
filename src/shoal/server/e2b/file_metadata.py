"""E2B file metadata: ``files.write(..., metadata=...)`` sends ``X-Metadata-<key>: <value>`` upload
headers; envd keeps them as ``user.e2b.<key>`` xattrs on the file and reports every such xattr
(prefix stripped) in ``EntryInfo.metadata`` and the upload answer.

The agent sets and reads the xattrs as the request's user (``agent/files.py``). Both directions are
bounded here, since the keys come from API clients and the reported values from the sandbox (whose
code can set any xattr, or answer in the agent's place): at most ``MAX_KEYS`` keys of ``MAX_KEY``
characters from HTTP's token alphabet, values of printable ASCII up to ``MAX_VALUE`` bytes, and
``MAX_TOTAL`` bytes in all. A bad key or value is the client's error (400), never a partial write.
"""

from __future__ import annotations

import re

from shoal.errors import InvalidRequest

HEADER_PREFIX = "x-metadata-"
MAX_KEYS, MAX_KEY, MAX_VALUE, MAX_TOTAL = 64, 200, 4096, 64 * 1024
_KEY = re.compile(r"\A[A-Za-z0-9!#$%&'*+\-.^_`|~]+\Z")
_VALUE = re.compile(r"\A[\x20-\x7e]*\Z")


def check(meta: dict[str, str]) -> dict[str, str]:
    """``meta`` within the bounds and alphabets (keys lowercased, as envd does), or ``InvalidRequest``."""
    if len(meta) > MAX_KEYS:
        raise InvalidRequest(f"at most {MAX_KEYS} metadata keys")
    out: dict[str, str] = {}
    total = 0
    for key, value in meta.items():
        if not _KEY.match(key) or len(key) > MAX_KEY:
            raise InvalidRequest(f"invalid metadata key {key[:MAX_KEY]!r}: 1 to {MAX_KEY} HTTP token characters")
        if not _VALUE.match(value) or len(value) > MAX_VALUE:
            raise InvalidRequest(f"invalid metadata value for {key!r}: up to {MAX_VALUE} printable ASCII characters")
        total += len(key) + len(value)
        if total > MAX_TOTAL:
            raise InvalidRequest(f"metadata larger than {MAX_TOTAL} bytes")
        out[key.lower()] = value
    return out


def from_headers(headers: dict[str, str]) -> dict[str, str] | None:
    """The upload's metadata from its (lower-cased) headers, checked; None when it has none."""
    meta = {name[len(HEADER_PREFIX):]: value for name, value in headers.items() if name.startswith(HEADER_PREFIX)}
    return check(meta) if meta else None


def reported(value: object) -> dict[str, str] | None:
    """Metadata from an agent's entry, which the sandbox may forge: what is within the bounds, else nothing."""
    if not isinstance(value, dict) or not value:
        return None
    try:
        return check({k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}) or None
    except InvalidRequest:
        return None
