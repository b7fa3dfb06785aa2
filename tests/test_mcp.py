"""The daemon's MCP endpoint (/mcp), driven by the official MCP client against a real ``shoal serve``
(conftest's ``daemon``: default state dirs, the local key).

Both protocol eras are covered: ``mode="legacy"`` (initialize handshake, served statelessly) and
``mode="auto"`` (the client negotiates the 2026-07-28 single-exchange protocol).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import anyio
import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

TOOLS = {"create_sandbox", "list_sandboxes", "delete_sandbox", "run_command", "read_file", "write_file",
         "list_files", "create_network", "list_networks", "delete_network", "list_ports", "update_network",
         "snapshot_create", "fork", "create_volume", "list_volumes", "delete_volume"}
MARK = {"suite": "test_mcp"}


@dataclass
class Target:
    """The daemon's MCP endpoint, its local key, and the sandboxes a test still has to delete."""

    url: str
    key: str
    created: list[str] = field(default_factory=list)

    @property
    def mcp_url(self) -> str:
        return self.url + "/mcp"


@pytest.fixture(scope="module")
def target(daemon) -> Iterator[Target]:  # noqa: ANN001 - ``daemon``: conftest's running ``shoal serve``
    t = Target(daemon.url, daemon.key)
    yield t
    for sid in t.created:  # whatever a failed test left behind
        httpx.delete(f"{t.url}/v1/sandboxes/{sid}", headers={"Authorization": f"Bearer {t.key}"}, timeout=30)


def _http(headers: dict[str, str] | None = None) -> httpx2.AsyncClient:
    """The HTTP client the MCP transport uses (httpx2 in mcp 2.x); headers carry the API key."""
    return httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=300))


def _client(target: Target, http: httpx2.AsyncClient, mode: str) -> Client:
    return Client(streamable_http_client(target.mcp_url, http_client=http), mode=mode)  # type: ignore[arg-type]


def _text(result) -> str:  # noqa: ANN001
    return "".join(getattr(block, "text", "") for block in result.content)


@pytest.mark.parametrize("mode", ["legacy", "auto"])
def test_sandbox_workflow(target: Target, mode: str) -> None:
    async def main() -> None:
        async with _http(headers={"Authorization": f"Bearer {target.key}"}) as http, \
                _client(target, http, mode) as client:
            if mode == "auto":
                assert client.protocol_version == "2026-07-28"

            tools = {t.name: t for t in (await client.list_tools()).tools}
            assert set(tools) == TOOLS
            for tool in tools.values():
                assert tool.description and len(tool.description) > 40, tool.name
            assert "UTF-8" in tools["read_file"].description

            created = await client.call_tool("create_sandbox", {"template": "minimal", "timeout": 300,
                                                                "metadata": MARK, "env": {"GREETING": "hi"}})
            assert not created.is_error, _text(created)
            info = created.structured_content
            sid = info["id"]
            target.created.append(sid)
            assert info["template"] == "minimal" and info["state"] == "running"
            assert info["metadata"] == MARK and info["expires_at"]
            assert sid in _text(created)

            ok = await client.call_tool("run_command", {"sandbox_id": sid, "command": "echo $GREETING world"})
            assert not ok.is_error, _text(ok)
            assert ok.structured_content == {"exit_code": 0, "stdout": "hi world\n", "stderr": "",
                                             "timed_out": False, "truncated": False}

            bad = await client.call_tool("run_command", {"sandbox_id": sid,
                                                         "command": "echo out; echo oops >&2; exit 7"})
            assert not bad.is_error  # a failing command is a result, not a tool error
            assert bad.structured_content["exit_code"] == 7
            assert bad.structured_content["stdout"] == "out\n" and bad.structured_content["stderr"] == "oops\n"

            argv = await client.call_tool("run_command", {"sandbox_id": sid, "command": ["/bin/pwd"], "cwd": "/tmp"})
            assert argv.structured_content["stdout"] == "/tmp\n"

            slow = await client.call_tool("run_command", {"sandbox_id": sid, "command": "sleep 30", "timeout": 0.5})
            assert slow.structured_content["timed_out"] is True

            written = await client.call_tool("write_file", {"sandbox_id": sid, "path": "work/notes.txt",
                                                            "content": "héllo\nwörld\n"})
            assert not written.is_error, _text(written)
            entry = written.structured_content
            assert entry["path"] == "/root/work/notes.txt" and entry["type"] == "file"
            assert entry["size"] == len("héllo\nwörld\n".encode())

            read = await client.call_tool("read_file", {"sandbox_id": sid, "path": "/root/work/notes.txt"})
            assert not read.is_error, _text(read)
            assert _text(read) == "héllo\nwörld\n"

            await client.call_tool("run_command", {"sandbox_id": sid, "command": r"printf 'a\377b' > /root/bin.dat"})
            binary = await client.call_tool("read_file", {"sandbox_id": sid, "path": "bin.dat"})
            assert _text(binary) == "a\ufffdb"

            listed = await client.call_tool("list_files", {"sandbox_id": sid, "path": "work"})
            assert not listed.is_error, _text(listed)
            names = {e["name"]: e for e in listed.structured_content["entries"]}
            assert names["notes.txt"]["type"] == "file"
            assert json.loads(_text(listed))["entries"]  # the text content is the same JSON, for the model

            deep = await client.call_tool("list_files", {"sandbox_id": sid, "path": "/root", "depth": 2})
            assert "/root/work/notes.txt" in {e["path"] for e in deep.structured_content["entries"]}

            mine = await client.call_tool("list_sandboxes", {})
            assert not mine.is_error
            assert sid in {s["id"] for s in mine.structured_content["sandboxes"]}

            missing = await client.call_tool("read_file", {"sandbox_id": sid, "path": "/no/such/file"})
            assert missing.is_error and "No such file" in _text(missing)

            is_dir = await client.call_tool("read_file", {"sandbox_id": sid, "path": "/root"})
            assert is_dir.is_error and "directory" in _text(is_dir)

            deleted = await client.call_tool("delete_sandbox", {"sandbox_id": sid})
            assert not deleted.is_error, _text(deleted)
            assert deleted.structured_content == {"id": sid, "deleted": True}
            target.created.remove(sid)

            after = await client.call_tool("list_sandboxes", {})
            assert sid not in {s["id"] for s in after.structured_content["sandboxes"]}
            gone = await client.call_tool("run_command", {"sandbox_id": sid, "command": "true"})
            assert gone.is_error and f"sandbox {sid} does not exist" in _text(gone)

    anyio.run(main)


@pytest.mark.parametrize("mode", ["legacy", "auto"])
def test_errors_are_tool_errors(target: Target, mode: str) -> None:
    """Bad ids and bad arguments come back as isError results; the session keeps working."""
    async def main() -> None:
        async with _http(headers={"X-API-Key": target.key}) as http, \
                _client(target, http, mode) as client:
            for tool, args in [("run_command", {"sandbox_id": "nosuchsandbox1", "command": "echo hi"}),
                               ("read_file", {"sandbox_id": "nosuchsandbox1", "path": "/etc/hostname"}),
                               ("write_file", {"sandbox_id": "nosuchsandbox1", "path": "x", "content": "y"}),
                               ("list_files", {"sandbox_id": "nosuchsandbox1", "path": "/"}),
                               ("delete_sandbox", {"sandbox_id": "nosuchsandbox1"}),
                               ("delete_sandbox", {"sandbox_id": "../../etc"})]:
                result = await client.call_tool(tool, args)
                assert result.is_error, tool
                assert "does not exist" in _text(result), (tool, _text(result))

            unknown = await client.call_tool("create_sandbox", {"template": "no-such-template"})
            assert unknown.is_error and "no-such-template" in _text(unknown)

            too_big = await client.call_tool("create_sandbox", {"memory_mb": 10 ** 9})
            assert too_big.is_error and "memory_mb" in _text(too_big)

            assert (await client.call_tool("list_sandboxes", {})).is_error is False  # still usable

    anyio.run(main)


def test_keys_see_only_their_own_sandboxes(target: Target) -> None:
    from shoal.engine.keys import KeyStore
    from shoal.settings import Settings

    store = KeyStore(Settings().db_path)
    other, other_secret = store.create(name=f"test-mcp-{os.getpid()}")

    async def main() -> None:
        async with _http(headers={"Authorization": f"Bearer {target.key}"}) as http, \
                _client(target, http, "legacy") as client:
            created = await client.call_tool("create_sandbox", {"metadata": MARK})
            sid = created.structured_content["id"]
            target.created.append(sid)
            async with _http(headers={"Authorization": f"Bearer {other_secret}"}) as http2, \
                    _client(target, http2, "auto") as intruder:
                theirs = await intruder.call_tool("list_sandboxes", {})
                assert sid not in {s["id"] for s in theirs.structured_content["sandboxes"]}
                for tool, args in [("run_command", {"sandbox_id": sid, "command": "id"}),
                                   ("read_file", {"sandbox_id": sid, "path": "/etc/passwd"}),
                                   ("delete_sandbox", {"sandbox_id": sid})]:
                    result = await intruder.call_tool(tool, args)
                    assert result.is_error and "does not exist" in _text(result), tool
            still = await client.call_tool("run_command", {"sandbox_id": sid, "command": "echo alive"})
            assert still.structured_content["stdout"] == "alive\n"
            assert not (await client.call_tool("delete_sandbox", {"sandbox_id": sid})).is_error
            target.created.remove(sid)

    try:
        anyio.run(main)
    finally:
        store.revoke(other.id)


INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "raw", "version": "0"}}}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer sk-not-a-real-key"}, {"X-API-Key": "nope"},
                                     {"Authorization": "Basic dXNlcjpwYXNz"}])
def test_without_a_valid_key_401(target: Target, headers: dict[str, str]) -> None:
    r = httpx.post(target.mcp_url, json=INIT, headers={**MCP_HEADERS, **headers}, timeout=10)
    assert r.status_code == 401
    body = r.json()
    assert body["code"] == "unauthorized" and body["message"]
    assert r.headers["www-authenticate"] == "Bearer"


def test_official_client_without_key_fails(target: Target) -> None:
    async def main() -> None:
        async with _http() as http:
            with pytest.raises(Exception):  # noqa: B017 - any failure; what matters is that it is refused
                async with _client(target, http, "legacy") as client:
                    await client.list_tools()

    anyio.run(main)


def test_stateless_json_responses(target: Target) -> None:
    """No session id: every POST stands alone, and the answer is plain JSON (not an SSE stream)."""
    r = httpx.post(target.mcp_url, json=INIT, headers={**MCP_HEADERS, "Authorization": f"Bearer {target.key}"},
                   timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert "mcp-session-id" not in r.headers
    assert r.json()["result"]["serverInfo"]["name"] == "shoal"
    listed = httpx.post(target.mcp_url, json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
                        headers={**MCP_HEADERS, "Authorization": f"Bearer {target.key}",
                                 "Mcp-Protocol-Version": "2025-06-18"}, timeout=10)
    assert listed.status_code == 200, listed.text
    assert {t["name"] for t in listed.json()["result"]["tools"]} == TOOLS
