"""MCP tools for private networks and ports: the same actions as ``/v1/networks`` and ``/ports``, acting
as the request's API key (``mcp_endpoint.build_server`` registers them with its own key lookup)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import anyio.to_thread
from mcp.server.mcpserver import Context, MCPServer
from mcp_types import ToolAnnotations
from pydantic import BaseModel, Field

from shoal.engine import Engine
from shoal.server.gate import Gate
from shoal.server.listening_ports import listening
from shoal.server.models import ListeningPort, PrivateNetworkInfo

NetworkName = Annotated[str, Field(min_length=1, max_length=32, description=(
    "Lower-case letters, digits and '-', starting with a letter."))]


class NetworkList(BaseModel):
    networks: list[PrivateNetworkInfo]


class EgressPolicyInfo(BaseModel):
    allow_out: list[str] = Field(description="CIDRs, IPs and domain names it may reach.")
    deny_out: list[str] = Field(description="CIDRs and IPs it may not reach (unless allowed).")


class PortList(BaseModel):
    ports: list[ListeningPort] = Field(description="TCP ports something listens on inside the sandbox.")


def register(mcp: MCPServer, engine: Engine, gate: Gate, caller: Callable, tool_errors: Callable) -> None:
    """Add the tools; ``caller(ctx, engine)`` is the request's key, ``tool_errors()`` maps Shoal errors."""

    @mcp.tool(annotations=ToolAnnotations(title="Create private network", read_only_hint=False,
                                          destructive_hint=False, idempotent_hint=False, open_world_hint=False))
    async def create_network(ctx: Context, name: NetworkName) -> PrivateNetworkInfo:
        """Create a private network. Sandboxes created with `networks: [name]` reach each other (by address,
        and by name: `<id>.shoal.internal` or the sandbox's `name`); nothing else reaches them that way."""
        with tool_errors():
            key = caller(ctx, engine)
            net = await anyio.to_thread.run_sync(lambda: engine.private_networks.create(key.id, name))
            return PrivateNetworkInfo(**net.to_dict())

    @mcp.tool(annotations=ToolAnnotations(title="List private networks", read_only_hint=True,
                                          open_world_hint=False))
    async def list_networks(ctx: Context) -> NetworkList:
        """Your private networks, each with the ids of its member sandboxes."""
        with tool_errors():
            key = caller(ctx, engine)
            nets = await anyio.to_thread.run_sync(lambda: engine.private_networks.list(key.id, engine.store.all()))
            return NetworkList(networks=[PrivateNetworkInfo(**n.to_dict()) for n in nets])

    @mcp.tool(annotations=ToolAnnotations(title="Delete private network", read_only_hint=False,
                                          destructive_hint=True, idempotent_hint=False, open_world_hint=False))
    async def delete_network(ctx: Context, name: NetworkName) -> NetworkList:
        """Delete a private network (refused while a sandbox is in it). Returns the networks left."""
        with tool_errors():
            key = caller(ctx, engine)
            await anyio.to_thread.run_sync(lambda: engine.delete_network(name, key))
            nets = await anyio.to_thread.run_sync(lambda: engine.private_networks.list(key.id, engine.store.all()))
            return NetworkList(networks=[PrivateNetworkInfo(**n.to_dict()) for n in nets])

    @mcp.tool(annotations=ToolAnnotations(title="Set egress policy", read_only_hint=False, destructive_hint=False,
                                          idempotent_hint=True, open_world_hint=False))
    async def update_network(ctx: Context, sandbox_id: Annotated[str, Field(description="The sandbox's id.")],
                             allow_out: Annotated[list[str], Field(description=(
                                 "CIDRs, IPs or domain names (`*.example.com` ok) it may reach; an allow beats "
                                 "a deny."))] = [],  # noqa: B006 - the schema's default, never mutated
                             deny_out: Annotated[list[str], Field(description=(
                                 "CIDRs or IPs it may not reach (`0.0.0.0/0`: everything not allowed)."))] = [],  # noqa: B006
                             internet: Annotated[bool | None, Field(description=(
                                 "False: deny everything not allowed."))] = None) -> EgressPolicyInfo:
        """Replace a sandbox's egress policy while it runs (all of it, as E2B's update_network). Returns the
        policy as applied."""
        with tool_errors():
            key = caller(ctx, engine)
            egress = {"allow_out": list(allow_out), "deny_out": list(deny_out)}
            applied = await anyio.to_thread.run_sync(lambda: engine.update_network(sandbox_id, egress, internet, key))
            return EgressPolicyInfo(allow_out=applied["allow_out"], deny_out=applied["deny_out"])

    @mcp.tool(annotations=ToolAnnotations(title="List listening ports", read_only_hint=True, open_world_hint=False))
    async def list_ports(ctx: Context, sandbox_id: Annotated[str, Field(description="The sandbox's id.")]
                         ) -> PortList:
        """The TCP ports something listens on inside a running sandbox (port, address, family 4 or 6)."""
        with tool_errors():
            key = caller(ctx, engine)
            return PortList(ports=[ListeningPort(**p) for p in await listening(gate.agent(sandbox_id, key))])
