"""The MCP endpoint of the daemon: Streamable HTTP at ``/mcp``, built on the official ``mcp`` SDK.

Seven tools (create, list and delete sandboxes; run a command; read, write and list files) act as
the API key of the request, exactly like the REST API: a key sees only its own sandboxes.

* Transport: stateless Streamable HTTP with JSON responses. Every POST is self-contained (no
  ``Mcp-Session-Id``, no server-side session to lose on a restart or to pin to one worker), which
  suits many clients behind one daemon; clients that speak the 2026-07-28 single-exchange protocol
  take the SDK's modern path, which is stateless by design.
* Auth: a small ASGI middleware in front of the SDK checks ``Authorization: Bearer <key>`` or
  ``X-API-Key`` on every request (401 ``{"code": "unauthorized", ...}`` like REST) and puts the
  verified key in the ASGI scope, where the tools find it through the request of their context.
* Errors: a ``ShoalError`` becomes an MCP tool error (``isError: true``) carrying its message;
  the request and the daemon carry on.
* Host-header (DNS rebinding) checks of the SDK are off: every request carries a secret key in a
  header, which a rebinding page cannot know, and the daemon may be bound to any address.
"""

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any

import anyio.to_thread
from fastapi import FastAPI
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import ToolAnnotations
from pydantic import BaseModel, Field
from starlette.datastructures import Headers
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from shoal import __version__
from shoal.engine import Engine
from shoal.engine.keys import ApiKey
from shoal.engine.limits import LIMITS
from shoal.errors import InvalidRequest, ShoalError, Unauthorized
from shoal.runtime import agent_aio
from shoal.runtime.agent_aio import bounded
from shoal.runtime.output_budget import BUDGET, CappedOutput
from shoal.server.auth import key_from_headers
from shoal.server.errors import error_response
from shoal.server.gate import Gate
from shoal.server.models import Entry, Sandbox, VolumeMount
from shoal.server.models import Snapshot as SnapshotModel

log = logging.getLogger("shoal.mcp")

PATH = "/mcp"
#: Where the auth middleware leaves the caller's verified key (an ASGI scope extension key).
SCOPE_KEY = "shoal.api_key"
#: read_file refuses files larger than this: they do not belong in a model's context.
MAX_READ_BYTES = 4 * 1024 * 1024
#: run_command keeps at most this much of each of stdout and stderr (the rest is drained).
MAX_OUTPUT_BYTES = 1024 * 1024

INSTRUCTIONS = """\
Shoal runs isolated Linux sandboxes (lightweight containers) on this host. Typical flow: \
create_sandbox -> run_command / write_file / read_file / list_files -> delete_sandbox. \
A sandbox is deleted automatically when its timeout runs out, so delete it when you are done. \
Paths inside a sandbox are absolute, or relative to the home directory (/root). \
You only see sandboxes created with your own API key."""


# --- tool results ----------------------------------------------------------------------------
class SandboxList(BaseModel):
    sandboxes: list[Sandbox] = Field(description="Your sandboxes, in any state.")


class CommandResult(BaseModel):
    exit_code: int = Field(description="The exit status: 0 means success; 128+N if it was killed by signal N.")
    stdout: str = Field(description="Standard output, decoded as UTF-8 (invalid bytes replaced).")
    stderr: str = Field(description="Standard error, decoded as UTF-8 (invalid bytes replaced).")
    timed_out: bool = Field(description="True if the command was killed because it ran past its timeout.")
    truncated: bool = Field(False, description=f"True if stdout or stderr was longer than {MAX_OUTPUT_BYTES} bytes "
                                               "and was cut there.")


class FileList(BaseModel):
    path: str = Field(description="The directory that was listed, as asked.")
    entries: list[Entry] = Field(description="Files, directories and links under it.")


class Deleted(BaseModel):
    id: str
    deleted: bool = True


# --- plumbing ---------------------------------------------------------------------------------
@contextlib.contextmanager
def _tool_errors() -> Iterator[None]:
    """A Shoal error becomes an MCP tool error with its message; anything else stays a crash
    (the SDK reports it as a generic tool failure and logs the traceback)."""
    try:
        yield
    except ShoalError as exc:
        raise ToolError(exc.message) from exc


def _caller(ctx: Context, engine: Engine) -> ApiKey:
    """The API key of the HTTP request behind this tool call."""
    request = ctx.request_context.request
    if request is None:  # not over HTTP (e.g. an in-process client): there is no key to act as
        raise Unauthorized("no API key: the MCP endpoint is served over HTTP only")
    key = request.scope.get(SCOPE_KEY)
    return key if key is not None else key_from_headers(request.headers, engine)


SandboxId = Annotated[str, Field(description="The sandbox's id, as returned by create_sandbox or list_sandboxes.")]
SandboxPath = Annotated[str, Field(min_length=1, max_length=4096,
                                   description="Path inside the sandbox: absolute, or relative to /root.")]


def build_server(engine: Engine, gate: Gate) -> MCPServer:
    """The MCP server and its tools, bound to ``engine``; every sandbox use passes ``gate``."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    mcp = MCPServer("shoal", title="Shoal sandboxes", version=__version__, instructions=INSTRUCTIONS,
                    description="Create isolated Linux sandboxes, run commands and manage files in them.")
    # MCPServer() calls logging.basicConfig (a rich handler on the root logger) when the root has no
    # handler yet, e.g. in tests; logging is the daemon's business, so undo that.
    root.handlers[:], root.level = handlers, level

    @mcp.tool(annotations=ToolAnnotations(title="Create sandbox", read_only_hint=False, destructive_hint=False,
                                          idempotent_hint=False, open_world_hint=False))
    async def create_sandbox(
        ctx: Context,
        template: Annotated[str, Field(min_length=1, max_length=128, description=(
            "Root filesystem to start from. 'minimal' is busybox (sh and the usual Unix tools, no Python); "
            "'base' is Debian with bash and python3."))] = "minimal",
        cpu: Annotated[float, Field(ge=LIMITS.cpu.low, le=LIMITS.cpu.high, description="CPU cores it may use.")] = 1,
        memory_mb: Annotated[int, Field(ge=LIMITS.memory_mb.low, le=LIMITS.memory_mb.high,
                                        description="Memory limit in MiB.")] = 512,
        timeout: Annotated[int, Field(ge=LIMITS.timeout.low, le=LIMITS.timeout.high, description=(
            "Seconds until the sandbox is deleted automatically."))] = 300,
        env: Annotated[dict[str, str] | None, Field(description=(
            "Environment variables for every command run in it."))] = None,
        metadata: Annotated[dict[str, str] | None, Field(description=(
            "Your own string labels, returned by list_sandboxes."))] = None,
        networks: Annotated[list[str] | None, Field(max_length=8, description=(
            "Private networks (create_network) to join: members reach each other by address and name."))] = None,
        name: Annotated[str | None, Field(max_length=32, description=(
            "Its DNS name in its private networks (<name>.shoal.internal)."))] = None,
        snapshot: Annotated[str | None, Field(max_length=64, description=(
            "Start from this snapshot's files (snapshot_create); its template is used."))] = None,
        volumes: Annotated[list[VolumeMount] | None, Field(max_length=16, description=(
            "Your volumes (create_volume) to mount: [{name, path, read_only}]."))] = None,
        standby_after: Annotated[float | None, Field(ge=0, le=LIMITS.timeout.high, description=(
            "Idle seconds before it freezes itself (the next call wakes it); 0: never."))] = None,
    ) -> Sandbox:
        """Create a new, isolated Linux sandbox and start it.

        Returns the sandbox: its `id` (pass it to every other tool), template, state ('running'), limits,
        and `expires_at`, when it will be deleted automatically. Files and processes persist between
        calls until then. Delete it with delete_sandbox when you are done.
        """
        with _tool_errors():
            key = _caller(ctx, engine)
            rec = await anyio.to_thread.run_sync(
                lambda: engine.create(template, cpu=cpu, memory_mb=memory_mb, timeout=timeout, env=env or {},
                                      metadata=metadata or {}, api_key=key, networks=networks, name=name,
                                      snapshot=snapshot, volumes=[v.model_dump() for v in volumes or []],
                                      standby_after=standby_after))
            log.info("sandbox created over MCP", extra={"sandbox": rec.id, "key": key.id})
            return Sandbox.of(rec)

    @mcp.tool(annotations=ToolAnnotations(title="Snapshot sandbox", read_only_hint=False, destructive_hint=False,
                                          idempotent_hint=False, open_world_hint=False))
    async def snapshot_create(
        ctx: Context, sandbox_id: SandboxId,
        name: Annotated[str | None, Field(max_length=63, description=(
            "A name unique among your snapshots (letters, digits, . _ -)."))] = None,
    ) -> SnapshotModel:
        """Freeze a sandbox's files into a snapshot (memory is not kept); the sandbox keeps running.

        Returns the snapshot: its `id` (or use its `name`) starts new sandboxes with those files
        (create_sandbox with `snapshot`).
        """
        with _tool_errors():
            key = _caller(ctx, engine)
            snap = await anyio.to_thread.run_sync(lambda: engine.snapshots.create(sandbox_id, name, key))
            return SnapshotModel.of(snap)

    @mcp.tool(annotations=ToolAnnotations(title="Fork sandbox", read_only_hint=False, destructive_hint=False,
                                          idempotent_hint=False, open_world_hint=False))
    async def fork(
        ctx: Context, sandbox_id: SandboxId,
        count: Annotated[int, Field(ge=1, le=100, description="How many copies to start.")] = 1,
    ) -> SandboxList:
        """Start `count` new sandboxes with a copy of a sandbox's files (not its memory: their processes
        start fresh); the original keeps running. Returns `{"sandboxes": [...]}`, the ones that started.
        """
        from shoal.engine.fork import fork as fork_sandbox
        with _tool_errors():
            key = _caller(ctx, engine)
            results = await anyio.to_thread.run_sync(lambda: fork_sandbox(engine, sandbox_id, count, key))
            made = [r for r in results if not isinstance(r, ShoalError)]
            if not made:
                raise next(r for r in results if isinstance(r, ShoalError))
            return SandboxList(sandboxes=[Sandbox.of(r) for r in made])

    @mcp.tool(annotations=ToolAnnotations(title="List sandboxes", read_only_hint=True, open_world_hint=False))
    async def list_sandboxes(ctx: Context) -> SandboxList:
        """List your sandboxes.

        Returns `{"sandboxes": [...]}`, each with its id, template, state, limits, metadata, creation
        time and expiry time. Empty if you have none.
        """
        with _tool_errors():
            key = _caller(ctx, engine)
            recs = await anyio.to_thread.run_sync(lambda: engine.list(key))
            return SandboxList(sandboxes=[Sandbox.of(r) for r in sorted(recs, key=lambda r: r.created_at)])

    @mcp.tool(annotations=ToolAnnotations(title="Delete sandbox", read_only_hint=False, destructive_hint=True,
                                          idempotent_hint=True, open_world_hint=False))
    async def delete_sandbox(ctx: Context, sandbox_id: SandboxId) -> Deleted:
        """Delete a sandbox: stop every process in it and throw away its files. This cannot be undone.

        Returns `{"id": ..., "deleted": true}`.
        """
        with _tool_errors():
            key = _caller(ctx, engine)
            await anyio.to_thread.run_sync(lambda: engine.destroy(sandbox_id, key))
            return Deleted(id=sandbox_id)

    @mcp.tool(annotations=ToolAnnotations(title="Run command", read_only_hint=False, destructive_hint=True,
                                          idempotent_hint=False, open_world_hint=True))
    async def run_command(
        ctx: Context,
        sandbox_id: SandboxId,
        command: Annotated[str | list[str], Field(description=(
            "A shell command line, run with /bin/sh -c (pipes, redirects, && work), or an argv list run "
            "directly without a shell."))],
        cwd: Annotated[str | None, Field(max_length=4096, description=(
            "Working directory (default: /root)."))] = None,
        env: Annotated[dict[str, str] | None, Field(description="Extra environment variables.")] = None,
        timeout: Annotated[float, Field(gt=0, le=3600, description=(
            "Seconds after which the command is killed."))] = 60,
    ) -> CommandResult:
        """Run a command in a sandbox and wait for it to finish.

        Returns `exit_code`, `stdout`, `stderr` (UTF-8 text, invalid bytes replaced) and `timed_out`.
        A non-zero exit code is a normal result, not an error: read stderr to see what went wrong.
        Each call is a fresh process (cd or export do not carry over; use `cwd`, `env` or `&&`).
        Output longer than 1 MiB per stream is cut (`truncated`); pipe through `tail` or `head` if needed.
        Stdin is empty; do not start interactive programs.
        """
        with _tool_errors():
            key = _caller(ctx, engine)
            argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
            if not argv or not argv[0] or (isinstance(command, str) and not command.strip()):
                raise InvalidRequest("command must not be empty")
            agent = gate.agent(sandbox_id, key)
            req: dict[str, Any] = {"cmd": argv, "env": env or {}, "timeout": timeout}
            if cwd is not None:
                req["cwd"] = cwd
            started = time.perf_counter()
            stream = await agent.start(req)
            # kept output counts against the daemon-wide budget; a stopped agent cannot hold the call forever
            out, err = CappedOutput(MAX_OUTPUT_BYTES, BUDGET), CappedOutput(MAX_OUTPUT_BYTES, BUDGET)
            try:
                async with bounded(timeout + agent_aio.AGENT_TIMEOUT, sandbox_id, "end the command after its timeout"):
                    async for kind, data in stream.events():
                        if kind in ("stdout", "pty"):
                            out.add(data)  # type: ignore[arg-type]
                        elif kind == "stderr":
                            err.add(data)  # type: ignore[arg-type]
                end = stream.end or {}
                log.debug("command ran over MCP", extra={"sandbox": sandbox_id,
                                                         "ms": round((time.perf_counter() - started) * 1000, 1)})
                return CommandResult(exit_code=int(end.get("exit_code", -1)),
                                     stdout=out.data.decode("utf-8", "replace"),
                                     stderr=err.data.decode("utf-8", "replace"),
                                     timed_out=bool(end.get("timed_out")), truncated=out.truncated or err.truncated)
            finally:
                stream.close()
                out.release()
                err.release()

    # Unstructured: the text is the result (structured output would send the contents twice).
    @mcp.tool(structured_output=False,
              annotations=ToolAnnotations(title="Read file", read_only_hint=True, open_world_hint=False))
    async def read_file(ctx: Context, sandbox_id: SandboxId, path: SandboxPath) -> str:
        """Read a text file from a sandbox and return its contents as text.

        The bytes are decoded as UTF-8; invalid bytes (binary files) are replaced with U+FFFD, so use
        run_command (e.g. `base64 FILE` or `od`) for binary data. Files over 4 MiB are refused: read
        parts of them with run_command (`head`, `tail`, `sed -n`). Fails if the path is a directory
        (use list_files) or does not exist.
        """
        with _tool_errors():
            key = _caller(ctx, engine)
            agent = gate.agent(sandbox_id, key)
            entry, chunks = await agent.read_file(path)
            data = bytearray()
            try:
                async for chunk in chunks:  # start it even when too big, so closing it drops the connection
                    data += chunk
                    if entry.get("size", 0) > MAX_READ_BYTES or len(data) > MAX_READ_BYTES:
                        raise InvalidRequest(f"{path} is larger than {MAX_READ_BYTES} bytes; read parts of it "
                                             "with run_command (head, tail, sed -n)")
            finally:
                await chunks.aclose()  # type: ignore[attr-defined]
            return data.decode("utf-8", errors="replace")

    @mcp.tool(annotations=ToolAnnotations(title="Write file", read_only_hint=False, destructive_hint=True,
                                          idempotent_hint=True, open_world_hint=False))
    async def write_file(
        ctx: Context,
        sandbox_id: SandboxId,
        path: SandboxPath,
        content: Annotated[str, Field(description="The complete new contents of the file (text, written as UTF-8).")],
    ) -> Entry:
        """Create or overwrite a file in a sandbox with the given text.

        Missing parent directories are created; an existing file is replaced as a whole (atomically).
        Returns the file's entry: name, absolute path, type, size in bytes, mode, owner, modification time.
        """
        with _tool_errors():
            key = _caller(ctx, engine)
            agent = gate.agent(sandbox_id, key)
            return Entry(**(await agent.write_file(path, content.encode("utf-8"))))

    @mcp.tool(annotations=ToolAnnotations(title="List files", read_only_hint=True, open_world_hint=False))
    async def list_files(
        ctx: Context,
        sandbox_id: SandboxId,
        path: Annotated[str, Field(min_length=1, max_length=4096, description=(
            "Directory inside the sandbox: absolute, or relative to /root."))] = "/root",
        depth: Annotated[int, Field(ge=1, le=64, description=(
            "1 lists the directory itself; 2 also lists inside its subdirectories, and so on."))] = 1,
    ) -> FileList:
        """List the contents of a directory in a sandbox.

        Returns `{"path": ..., "entries": [...]}`; each entry has name, absolute path, type
        ('file', 'dir', 'symlink' or 'other'), size in bytes, permissions, owner and modification time.
        """
        with _tool_errors():
            key = _caller(ctx, engine)
            agent = gate.agent(sandbox_id, key)
            reply = await agent.call({"op": "file.list", "path": path, "depth": depth})
            return FileList(path=path, entries=[Entry(**e) for e in reply["entries"]])

    from shoal.server import mcp_networks  # private networks and ports: their own module
    mcp_networks.register(mcp, engine, gate, _caller, _tool_errors)
    from shoal.server import mcp_volumes  # named volumes: their own module
    mcp_volumes.register(mcp, engine, _caller, _tool_errors)
    return mcp


class RequireApiKey:
    """ASGI middleware: no valid API key, no MCP. The verified key goes into the scope."""

    def __init__(self, app: ASGIApp, engine: Engine) -> None:
        self.app, self.engine = app, engine

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            key = key_from_headers(Headers(scope=scope), self.engine)
        except Unauthorized as exc:
            response = error_response(401, exc.code, exc.message, headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app({**scope, SCOPE_KEY: key}, receive, send)


def mount(app: FastAPI, engine: Engine) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    """Serve MCP at ``/mcp`` of ``app``; returns the lifespan that runs the MCP session manager."""
    server = build_server(engine, app.state.gate)
    # Stateless mode "terminates" a transport after every request, logging each one at INFO.
    logging.getLogger("mcp.server.streamable_http").setLevel(logging.WARNING)
    # Builds the session manager (the Starlette app it also returns is not used: the route is ours).
    server.streamable_http_app(
        streamable_http_path=PATH, stateless_http=True, json_response=True,
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False))
    manager = server.session_manager
    app.router.routes.append(Route(PATH, endpoint=RequireApiKey(StreamableHTTPASGIApp(manager), engine),
                                   include_in_schema=False))
    app.state.mcp = server

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        async with manager.run():
            yield

    return lifespan
