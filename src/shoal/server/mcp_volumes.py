"""MCP tools for named volumes: the same actions as ``/v1/volumes`` (``engine/volumes.py``), acting as the
request's API key (``mcp_endpoint.build_server`` registers them with its own key lookup). A volume is
mounted with ``create_sandbox``'s ``volumes``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import anyio.to_thread
from mcp.server.mcpserver import Context, MCPServer
from mcp_types import ToolAnnotations
from pydantic import BaseModel, Field

from shoal.engine import Engine
from shoal.server.models import Volume

VolumeName = Annotated[str, Field(min_length=1, max_length=63, description=(
    "Letters, digits, '.', '_' or '-', starting with a letter or digit; unique among your volumes."))]


class VolumeList(BaseModel):
    volumes: list[Volume]


def register(mcp: MCPServer, engine: Engine, caller: Callable, tool_errors: Callable) -> None:
    """Add the tools; ``caller(ctx, engine)`` is the request's key, ``tool_errors()`` maps Shoal errors."""

    def listing(key: object) -> VolumeList:
        return VolumeList(volumes=[Volume.of(engine.volumes.usage(v)) for v in engine.volumes.list(key)])

    @mcp.tool(annotations=ToolAnnotations(title="Create volume", read_only_hint=False, destructive_hint=False,
                                          idempotent_hint=False, open_world_hint=False))
    async def create_volume(ctx: Context, name: VolumeName,
                            size_mb: Annotated[int, Field(ge=16, le=1024 * 1024, description=(
                                "Size in MiB; a full volume gives writers ENOSPC."))] = 1024) -> Volume:
        """Create a named volume: files that outlive sandboxes and can be shared between them. Mount it with
        create_sandbox's `volumes: [{"name", "path", "read_only"}]`."""
        with tool_errors():
            key = caller(ctx, engine)
            vol = await anyio.to_thread.run_sync(lambda: engine.volumes.create(name, size_mb, key))
            return Volume.of(engine.volumes.usage(vol))

    @mcp.tool(annotations=ToolAnnotations(title="List volumes", read_only_hint=True, open_world_hint=False))
    async def list_volumes(ctx: Context) -> VolumeList:
        """Your volumes, each with the sandboxes that mount it."""
        with tool_errors():
            return listing(caller(ctx, engine))

    @mcp.tool(annotations=ToolAnnotations(title="Delete volume", read_only_hint=False, destructive_hint=True,
                                          idempotent_hint=False, open_world_hint=False))
    async def delete_volume(ctx: Context, name: VolumeName) -> VolumeList:
        """Delete a volume and its files (refused while a sandbox mounts it). Returns the volumes left."""
        with tool_errors():
            key = caller(ctx, engine)
            await anyio.to_thread.run_sync(lambda: engine.volumes.remove(name, key))
            return listing(key)
