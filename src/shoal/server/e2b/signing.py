"""Signed envd file URLs (``download_url()``/``upload_url()``): how they are checked, and how long they live.

The SDK signs locally, so the format is E2B's (``e2b/sandbox/signature.py``): ``signature`` is
``v1_`` + unpadded base64 of sha256(``path:operation:user:envdAccessToken[:expiration]``), where
``user`` is the ``username`` query parameter ("" when absent: the sandbox's default user) and
``expiration`` the ``signature_expiration`` parameter (unix seconds) when the URL has one.

What such a URL grants, and nothing more: ``operation`` (read or write) on that one ``path``, as that
one user. The caller's ``Authorization`` header does not change the user (it did: ``Basic root:`` on a
URL signed for the default user read root-only files), and an upload through it writes only ``path``.

How long: E2B's own URLs without an expiration never expire. Here every URL has a maximum lifetime,
``SHOAL_E2B_URL_MAX_LIFETIME`` seconds (read per request; default 3600):

* a URL with ``signature_expiration`` is refused once that time has passed, and refused outright if
  the expiration lies more than the maximum lifetime ahead (a URL cannot outlive the rule by asking);
* a URL without one carries no issue time (it is a function of the sandbox's token only), so it is
  honoured until the maximum lifetime after the sandbox was created; past that, sign with
  ``use_signature_expiration`` (any sandbox can still get URLs valid for up to the maximum from now).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time

MAX_LIFETIME_ENV = "SHOAL_E2B_URL_MAX_LIFETIME"
DEFAULT_MAX_LIFETIME = 3600
#: Slack for a signer whose clock runs ahead of the daemon's (the SDK signs on the client's machine).
CLOCK_SKEW = 60


def max_lifetime() -> int:
    """Seconds a signed file URL may live (``SHOAL_E2B_URL_MAX_LIFETIME``; a bad value: the default)."""
    try:
        value = int(os.environ.get(MAX_LIFETIME_ENV, ""))
    except ValueError:
        return DEFAULT_MAX_LIFETIME
    return value if value > 0 else DEFAULT_MAX_LIFETIME


def sign(token: str, path: str, operation: str, user: str | None, expiration: int | None) -> str:
    """The v1 signature, exactly as the E2B SDK computes it."""
    raw = f"{path}:{operation}:{user or ''}:{token}"
    if expiration is not None:
        raw += f":{expiration}"
    digest = base64.b64encode(hashlib.sha256(raw.encode("utf-8", "surrogatepass")).digest()).rstrip(b"=")
    return f"v1_{digest.decode()}"


def parse_expiration(raw: str | None) -> int | None:
    """``signature_expiration`` as unix seconds; None when absent; ValueError when not a plain integer."""
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or len(raw) > 12:
        raise ValueError("signature_expiration must be unix seconds")
    return int(raw)


def matches(token: str, path: str, operation: str, user: str | None, signature: str | None,
            expiration: str | None) -> bool:
    """Whether ``signature`` was made with ``token`` for exactly these values (time not considered)."""
    if not signature:
        return False
    try:
        exp = parse_expiration(expiration)
    except ValueError:
        return False
    return hmac.compare_digest(signature.encode("utf-8", "surrogatepass"),
                               sign(token, path, operation, user, exp).encode())


def expired(expiration: str | None, created_at: float, now: float | None = None) -> str | None:
    """Why a URL whose signature matched is no longer (or never) valid, or None while it is."""
    now = time.time() if now is None else now
    limit = max_lifetime()
    exp = parse_expiration(expiration)  # matches() already refused a malformed one
    if exp is None:
        if now > created_at + limit:
            return (f"this file URL has no expiration and the sandbox is over {limit} s old "
                    f"({MAX_LIFETIME_ENV}): sign it with an expiration")
        return None
    if exp < now:
        return "signature is already expired"  # envd's own words (E2B's tests compare them)
    if exp > now + limit + CLOCK_SKEW:
        return f"this file URL expires more than {limit} s from now ({MAX_LIFETIME_ENV})"
    return None
