"""Property-based fuzzing of the REST API from its own OpenAPI document (schemathesis).

Every operation of ``/openapi.json`` gets valid and invalid requests (bodies, query strings, path
parameters) from a running daemon; for each answer:

* never a server error (``not_a_server_error``: no 5xx),
* every error is JSON ``{"code", "message"}`` with no traceback in it.

Path parameters named ``sandbox_id`` are mostly replaced by a real running sandbox of the fuzzing
key, so the requests reach the agent instead of stopping at 404. The WebSocket routes are not in
the document (tests/test_fuzz_mcp_ws.py fuzzes them and MCP); the never-ending streams (``/v1/events``,
``files/watch``) are skipped, and the other streams get a short read timeout: only they may time out,
any other request that does not answer in time fails the test. Bounded: ~25 examples per operation. Every sandbox the
fuzzing key made is deleted at the end, and the key is revoked.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

SHOAL = "/opt/shoal/venv/bin/shoal"
MAX_EXAMPLES = int(os.environ.get("SHOAL_FUZZ_EXAMPLES", "25"))  # more for a longer hunt
#: Streams that only end when the client leaves: nothing to check that a fuzzer could wait for.
ENDLESS = r"^/v1/events$|/files/watch$"
#: (connect, read) seconds for every fuzzed request: a stream that stays silent longer is cut.
REQUEST_TIMEOUT = (5, 10)
#: Exec and background processes the fuzzer starts are killed after this long at most.
EXEC_TIMEOUT_CAP = 5.0


class Fuzzing:
    """The fuzzing key, a running target sandbox for it, and clean-up of everything it made."""

    def __init__(self, url: str) -> None:
        self.name = f"test-fuzz-{secrets.token_hex(4)}"
        self.secret = subprocess.run([SHOAL, "keys", "create", "--name", self.name, "--max-sandboxes", "4",
                                      "--max-memory", str(64 * 1024)], capture_output=True, text=True,
                                     timeout=60, check=True).stdout.strip().splitlines()[-1]
        self.headers = {"Authorization": f"Bearer {self.secret}"}
        self.http = httpx.Client(base_url=url, headers=self.headers, timeout=30)
        self.target: str | None = None
        self.key_id: str | None = None
        self.requests = 0
        self.statuses: dict[int, int] = {}

    def ensure_target(self) -> str:
        """A running sandbox of the key (the fuzzer may have deleted, paused or expired the last one)."""
        if self.target is not None:
            r = self.http.get(f"/v1/sandboxes/{self.target}")
            if r.status_code == 200 and r.json()["state"] == "paused":
                self.http.post(f"/v1/sandboxes/{self.target}/resume")
                r = self.http.get(f"/v1/sandboxes/{self.target}")
            if r.status_code == 200 and r.json()["state"] == "running":
                self.http.post(f"/v1/sandboxes/{self.target}/timeout", json={"timeout": 600})
                probe = self.http.post(f"/v1/sandboxes/{self.target}/exec", json={"cmd": ["true"], "timeout": 5})
                if probe.status_code == 200 and probe.json()["exit_code"] == 0:
                    return self.target
            self._delete(self.target)
            self.target = None
        self.delete_others()
        r = self.http.post("/v1/sandboxes", json={"template": "minimal", "timeout": 600, "memory_mb": 256,
                                                  "metadata": {"fuzz": "target"}})
        assert r.status_code == 201, r.text
        self.target = r.json()["id"]
        return self.target

    def _mine(self) -> list[str]:
        """The key's sandboxes as the store has them (the API's list may itself be what broke)."""
        from shoal.engine.keys import KeyStore
        from shoal.engine.store import Store
        from shoal.settings import Settings

        if self.key_id is None:
            keys = KeyStore(Settings().db_path)
            self.key_id = {k.name: k.id for k in keys.list()}[self.name]
        store = Store(Settings().db_path)
        try:
            return [r.id for r in store.all() if r.api_key == self.key_id]
        finally:
            store.close()

    def _delete(self, sid: str) -> None:
        if self.http.delete(f"/v1/sandboxes/{sid}").status_code not in (204, 404):
            from shoal.engine import Engine
            from shoal.errors import NotFound
            try:
                Engine().destroy(sid)
            except NotFound:
                pass

    def delete_others(self) -> None:
        """Every sandbox of the key but the target (the fuzzer's creates must not pile up)."""
        for sid in self._mine():
            if sid != self.target:
                self._delete(sid)

    def cleanup(self) -> list[str]:
        for sid in self._mine():
            self._delete(sid)
        remaining = self._mine()
        subprocess.run([SHOAL, "keys", "revoke", self.name], capture_output=True, timeout=60)
        self.http.close()
        return remaining


@pytest.fixture(scope="module")
def fuzzing(daemon) -> Iterator[Fuzzing]:  # noqa: ANN001
    f = Fuzzing(daemon.url)
    started = time.monotonic()
    try:
        yield f
    finally:
        remaining = f.cleanup()
        print(f"\nfuzzing: {f.requests} requests in {time.monotonic() - started:.1f} s, statuses {f.statuses}")
        assert remaining == [], f"sandboxes of the fuzzing key survived clean-up: {remaining}"


@pytest.fixture(scope="module")
def api_schema(daemon):  # noqa: ANN001, ANN201
    schema = schemathesis.openapi.from_url(daemon.url + "/openapi.json", timeout=30)
    schema.config.phases.coverage.enabled = False  # boundary sweep: hundreds of cases, little new here
    return schema


# (filters belong on the lazy schema: the fixture's own are replaced by these when it is resolved)
schema = schemathesis.pytest.from_fixture("api_schema").exclude(path_regex=ENDLESS)


def assert_error_body(response) -> None:  # noqa: ANN001
    """Every error answer is ``{"code": str, "message": str}`` as JSON, never a traceback."""
    if response.status_code < 400:
        return
    text = response.text
    assert "Traceback" not in text and 'File "/' not in text, text[:2000]
    ctype = response.headers.get("content-type") or response.headers.get("Content-Type") or ""
    if isinstance(ctype, list):  # schemathesis' Response keeps every value of a header
        ctype = ctype[0] if ctype else ""
    assert ctype.startswith("application/json"), f"{response.status_code} with content-type {ctype!r}: {text[:500]}"
    body = json.loads(text)
    assert isinstance(body, dict) and set(body) == {"code", "message"}, body
    assert isinstance(body["code"], str) and body["code"] and isinstance(body["message"], str) and body["message"]


def _bounded(case) -> None:  # noqa: ANN001
    """Cap the run time of processes the fuzzer starts (valid timeouts only: invalid ones stay)."""
    body = case.body
    if isinstance(body, dict) and "cmd" in body:
        t = body.get("timeout")
        if t is None or (isinstance(t, int | float) and not isinstance(t, bool) and t > EXEC_TIMEOUT_CAP):
            body["timeout"] = EXEC_TIMEOUT_CAP


def _streams(case) -> bool:  # noqa: ANN001
    """Whether the request asks for a response that streams as long as a process runs."""
    body = case.body
    return case.path.endswith("/stream") or (isinstance(body, dict) and body.get("stream") is True)


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, print_blob=True,
          suppress_health_check=list(HealthCheck))
def test_api_never_fails_with_a_server_error(case, fuzzing: Fuzzing):  # noqa: ANN001
    rng = random.Random(repr(case.path_parameters) + repr(case.query) + repr(case.body))
    if case.path_parameters and "sandbox_id" in case.path_parameters and rng.random() < 0.8:
        case.path_parameters["sandbox_id"] = fuzzing.ensure_target()
    _bounded(case)
    try:
        response = case.call(headers=fuzzing.headers, timeout=REQUEST_TIMEOUT)
    except Exception as exc:
        # Only a stream may stay silent past the read timeout (a followed process that prints
        # nothing); a plain request that does not answer within 10 s is a hung daemon: a failure.
        if not _streams(case) or ("timed out" not in str(exc).lower()
                                  and "timeout" not in type(exc).__name__.lower()):
            raise
        response = None
    fuzzing.requests += 1
    if response is not None:
        fuzzing.statuses[response.status_code] = fuzzing.statuses.get(response.status_code, 0) + 1
        case.validate_response(response, checks=[not_a_server_error])
        assert_error_body(response)
        if case.method.upper() == "POST" and case.path == "/v1/sandboxes":
            fuzzing.delete_others()  # whatever it answered, a sandbox may exist now
    assert httpx.get(str(fuzzing.http.base_url) + "/health", timeout=10).status_code == 200
