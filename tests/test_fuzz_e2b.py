"""Fuzzing the E2B facade (control plane) and envd (every Connect method, ``/files``) with hostile input.

The native API is fuzzed from its OpenAPI document (``test_fuzz.py``); the E2B routes are not in it
(``include_in_schema=False``) and envd's Connect methods have no OpenAPI form, so this fuzzer is
hand-rolled on hypothesis: for every route and every method it sends JSON built from the field
names those messages use, with hostile values (wrong types, huge and negative numbers, NaN and
infinities as raw text, lone surrogates, NUL bytes, deep nesting) and raw bodies that are not JSON
at all. For each answer:

* never a 5xx, and never a Connect stream ending in ``internal``/``unknown`` (a 500 in disguise);
* every HTTP error is JSON ``{"code", "message"}`` without a traceback; every stream is well formed;
* timeouts are not swallowed: a request that outlives its read timeout fails the test.

Bounded: ``SHOAL_FUZZ_EXAMPLES`` (default 25) examples per route or method. Processes the fuzzer starts
carry ``Connect-Timeout-Ms`` so they are killed within seconds. Everything runs under a key limited to
two sandboxes; all its sandboxes are deleted and the key revoked at the end.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import urllib.parse
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.engine.keys import e2b_form

SHOAL = "/opt/shoal/venv/bin/shoal"
MAX_EXAMPLES = int(os.environ.get("SHOAL_FUZZ_EXAMPLES", "25"))
ENVD = 49983
#: (connect, read) seconds: longer than any deadline the fuzzer sets, so a hang is a failure.
TIMEOUT = httpx.Timeout(10, read=30)
CALL_DEADLINE_MS = "3000"
DEEP = 100_000
FIELDS = ["process", "pid", "tag", "cmd", "args", "envs", "cwd", "input", "stdin", "pty", "size", "cols", "rows",
          "signal", "path", "depth", "source", "destination", "recursive", "includeEntry", "watcherId", "start",
          "data", "templateID", "timeout", "metadata", "envVars", "autoPause", "network", "allowPublicTraffic",
          "volumeMounts", "duration", "secure", "username"]
RAW_BODIES = [b"[" * DEEP + b"]" * DEEP, b'{"a":' * DEEP + b"1" + b"}" * DEEP, b"[" * DEEP, b"NaN",
              b'{"timeout": NaN}', b'{"depth": Infinity}', b'{"pid": 1e999}', b'{"timeout": ' + b"9" * 5000 + b"}",
              b"\xff\xfe", b'{"path": "\\ud800"}', b"null", b"[]", b'"x"', b"{", b"", b" ", b'{"a":1}{"b":2}']

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**32, 2**63, -(2**63), 10**30]),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40),
    st.sampled_from(["\ud800", "a\0b", "", "/", "..", "/etc/shadow", "~", "SIGNAL_SIGKILL", "FILE_TYPE_FILE",
                     "-1", "18446744073709551616", "x" * 5000, "YWJj", "!!!notbase64"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner, max_size=5)),
    max_leaves=15)
messages = st.dictionaries(st.sampled_from(FIELDS), values, max_size=6)
#: What a request body is: a message of the right field names, any JSON value, or raw hostile bytes.
bodies = st.one_of(messages.map(lambda m: json.dumps(m).encode()), values.map(lambda v: json.dumps(v).encode()),
                   st.sampled_from(RAW_BODIES), st.binary(max_size=64))

UNARY = ["process.Process/List", "process.Process/SendInput", "process.Process/SendSignal",
         "process.Process/CloseStdin", "process.Process/Update", "filesystem.Filesystem/Stat",
         "filesystem.Filesystem/MakeDir", "filesystem.Filesystem/Move", "filesystem.Filesystem/ListDir",
         "filesystem.Filesystem/Remove", "filesystem.Filesystem/CreateWatcher",
         "filesystem.Filesystem/GetWatcherEvents", "filesystem.Filesystem/RemoveWatcher"]
STREAMS = ["process.Process/Start", "process.Process/Connect", "process.Process/StreamInput",
           "filesystem.Filesystem/WatchDir"]
FUZZ = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


class Target:
    """The fuzzing key and one running ``base`` sandbox of it (re-made if the fuzzer removed it)."""

    def __init__(self, url: str) -> None:
        self.url, self.name = url, f"test-fuzz-e2b-{secrets.token_hex(4)}"
        out = subprocess.run([SHOAL, "keys", "create", "--name", self.name, "--max-sandboxes", "2"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        self.secret = out.strip().splitlines()[-1]
        self.api = {"X-API-KEY": e2b_form(self.secret)}
        self.sid = ""
        self.token = ""

    def ensure(self) -> None:
        if self.sid:
            r = httpx.get(f"{self.url}/sandboxes/{self.sid}", headers=self.api, timeout=TIMEOUT)
            if r.status_code == 200 and r.json()["state"] == "running":
                return
        for sb in httpx.get(f"{self.url}/v2/sandboxes", headers=self.api, timeout=TIMEOUT).json():
            httpx.delete(f"{self.url}/sandboxes/{sb['sandboxID']}", headers=self.api, timeout=60)
        r = httpx.post(f"{self.url}/sandboxes", headers=self.api, json={"templateID": "base", "timeout": 900},
                       timeout=60)
        assert r.status_code == 201, r.text
        self.sid, self.token = r.json()["sandboxID"], r.json()["envdAccessToken"]

    def envd(self, **extra: str) -> dict[str, str]:
        return {"E2b-Sandbox-Id": self.sid, "E2b-Sandbox-Port": str(ENVD), "X-Access-Token": self.token,
                "Connect-Timeout-Ms": CALL_DEADLINE_MS, **extra}

    def close(self) -> None:
        try:
            for sb in httpx.get(f"{self.url}/v2/sandboxes", headers=self.api, timeout=TIMEOUT).json():
                httpx.delete(f"{self.url}/sandboxes/{sb['sandboxID']}", headers=self.api, timeout=60)
        finally:
            subprocess.run([SHOAL, "keys", "revoke", self.name], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def target(daemon, base_template) -> Iterator[Target]:  # noqa: ANN001
    t = Target(daemon.url)
    t.ensure()
    try:
        yield t
    finally:
        t.close()


def check_http(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.request.method, r.request.url, r.status_code, r.text[:500])
    if r.status_code >= 400:
        body = r.json()
        assert isinstance(body, dict) and {"code", "message"} <= set(body), r.text[:500]
        assert "Traceback" not in r.text and 'File "/' not in r.text, r.text[:500]


def check_stream(r: httpx.Response) -> None:
    """A Connect stream: 200, envelopes, an end envelope whose error is not a server error."""
    if r.headers.get("content-type") != "application/connect+json":
        return check_http(r)
    assert r.status_code == 200, r.status_code
    data, end = r.content, None
    while data:
        assert len(data) >= 5, data
        flags, n = data[0], int.from_bytes(data[1:5], "big")
        msg = json.loads(data[5:5 + n])
        data = data[5 + n:]
        if flags & 2:
            end = msg
    assert end is not None, "the stream has no end envelope"
    code = (end.get("error") or {}).get("code")
    assert code not in ("internal", "unknown", "data_loss", "unavailable"), end


def envelope(body: bytes) -> bytes:
    return b"\0" + len(body).to_bytes(4, "big") + body


@pytest.mark.parametrize("method", UNARY)
def test_fuzz_envd_unary(target: Target, method: str) -> None:
    @FUZZ
    @given(body=bodies)
    def run(body: bytes) -> None:
        target.ensure()
        r = httpx.post(f"{target.url}/{method}", content=body, timeout=TIMEOUT,
                       headers=target.envd(**{"Content-Type": "application/json"}))
        check_http(r)
    run()


@pytest.mark.parametrize("method", STREAMS)
def test_fuzz_envd_streams(target: Target, method: str) -> None:
    @FUZZ
    @given(body=bodies, framed=st.booleans(), split=st.booleans())
    def run(body: bytes, framed: bool, split: bool) -> None:
        target.ensure()
        raw = envelope(body) if framed else body
        if split and framed:  # a client stream: the message, then a truncated second envelope
            raw += envelope(body)[: max(1, len(body) // 2)]
        r = httpx.post(f"{target.url}/{method}", content=raw, timeout=TIMEOUT,
                       headers=target.envd(**{"Content-Type": "application/connect+json"}))
        check_stream(r)
    run()


HOSTILE_QUERY = ["\0", "%00", "-1", "9" * 40, "v1_" + "A" * 43, "root", "/root/.bashrc", "", "../../"]
queries = st.dictionaries(st.sampled_from(["path", "username", "signature", "signature_expiration", "x"]),
                          st.one_of(st.text(max_size=30), st.sampled_from(HOSTILE_QUERY)), max_size=4)


def test_fuzz_envd_files(target: Target) -> None:
    @FUZZ
    @given(query=queries, body=bodies, method=st.sampled_from(["GET", "POST"]),
           ctype=st.sampled_from(["application/octet-stream", "multipart/form-data; boundary=b",
                                  "multipart/form-data", "multipart/form-data; boundary=" + "b" * 300, "text/plain"]),
           gz=st.booleans(), signed=st.booleans())
    def run(query: dict, body: bytes, method: str, ctype: str, gz: bool, signed: bool) -> None:
        target.ensure()
        headers = {"Content-Type": ctype, **({"Content-Encoding": "gzip"} if gz else {})}
        if not signed:
            headers.update(target.envd())
        r = httpx.request(method, f"{target.url}/files", params=query, content=body if method == "POST" else None,
                          headers=headers, timeout=TIMEOUT)
        check_http(r)
    run()


CONTROL = [("POST", "/sandboxes"), ("POST", "/v2/sandboxes"), ("POST", "/sandboxes/{id}/timeout"),
           ("POST", "/sandboxes/{id}/refreshes"), ("POST", "/sandboxes/{id}/connect"),
           ("POST", "/v2/sandboxes/{id}/connect"), ("POST", "/sandboxes/{id}/resume"),
           ("POST", "/sandboxes/{other}/pause"), ("GET", "/sandboxes/{id}"), ("GET", "/sandboxes/{id}/metrics"),
           ("DELETE", "/sandboxes/{other}")]
ids = st.one_of(st.text(max_size=30), st.sampled_from(["", "..", "%00", "x" * 500, "i" + "0" * 15]))


@pytest.mark.parametrize(("method", "route"), CONTROL)
def test_fuzz_control_plane(target: Target, method: str, route: str) -> None:
    @FUZZ
    @given(body=bodies, other=ids, real=st.booleans())
    def run(body: bytes, other: str, real: bool) -> None:
        target.ensure()
        quoted = urllib.parse.quote(other, safe="")
        path = route.format(id=target.sid if real else quoted, other=quoted)
        r = httpx.request(method, target.url + path, content=body,
                          headers={**target.api, "Content-Type": "application/json"}, timeout=TIMEOUT)
        check_http(r)
    run()


list_queries = st.dictionaries(st.sampled_from(["state", "metadata", "limit", "nextToken", "order", "template",
                                                "startedAfter"]),
                               st.one_of(st.text(max_size=40), st.sampled_from(
                                   ["-1", "0", "99999999999999999999", "nan", "running,paused,x", "a=b&c",
                                    "9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59", "W1tbW1tb",
                                    "WzEsMl0", "WyJhIiwgMV0"])), max_size=4)


@pytest.mark.parametrize("route", ["/sandboxes", "/v2/sandboxes"])
def test_fuzz_control_plane_lists(target: Target, route: str) -> None:
    @FUZZ
    @given(query=list_queries)
    def run(query: dict) -> None:
        check_http(httpx.get(target.url + route, params=query, headers=target.api, timeout=TIMEOUT))
    run()
