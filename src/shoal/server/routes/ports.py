"""/v1/sandboxes/{id}/ports (what listens inside) and /exposed-ports (sandbox ports on host ports)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from shoal.engine.keys import ApiKey
from shoal.errors import ShoalError
from shoal.runtime.agent_aio import AsyncAgentClient
from shoal.server.auth import api_key
from shoal.server.exposed_ports import ExposedPorts
from shoal.server.listening_ports import listening
from shoal.server.models import ExposedPort, ExposeRequest, ListeningPort
from shoal.server.routes.deps import running_agent

router = APIRouter(prefix="/v1/sandboxes", tags=["ports"])


async def exposed(request: Request) -> ExposedPorts:
    """The daemon's one ``ExposedPorts`` (made in ``app.create_app``)."""
    return request.app.state.exposed_ports


@router.get("/{sandbox_id}/ports", response_model=list[ListeningPort])
async def list_ports(sandbox_id: str, request: Request, agent: AsyncAgentClient = Depends(running_agent)
                     ) -> list[ListeningPort]:
    """TCP ports something listens on inside the sandbox (as its agent reports them, checked)."""
    try:
        return [ListeningPort(**p) for p in await listening(agent)]
    except ShoalError as exc:
        raise request.app.state.gate.explain(sandbox_id, exc) from None


@router.get("/{sandbox_id}/exposed-ports", response_model=list[ExposedPort])
async def list_exposed(sandbox_id: str, key: ApiKey = Depends(api_key),
                       ports: ExposedPorts = Depends(exposed)) -> list[ExposedPort]:
    return [ExposedPort(**e.to_dict()) for e in ports.list(sandbox_id, key)]


@router.post("/{sandbox_id}/exposed-ports", status_code=201, response_model=ExposedPort)
async def expose(sandbox_id: str, body: ExposeRequest, key: ApiKey = Depends(api_key),
                 ports: ExposedPorts = Depends(exposed)) -> ExposedPort:
    """Listen on ``bind:host_port`` and relay each connection to the sandbox's ``port`` (owner's key only;
    409 if the host port is taken; removed when the sandbox is deleted; kept across daemon restarts)."""
    e = await ports.expose(sandbox_id, key, body.port, body.host_port, body.bind)
    return ExposedPort(**e.to_dict())


@router.delete("/{sandbox_id}/exposed-ports/{port}", status_code=204)
async def unexpose(sandbox_id: str, port: int, key: ApiKey = Depends(api_key),
                   ports: ExposedPorts = Depends(exposed)) -> Response:
    await ports.unexpose(sandbox_id, key, port)
    return Response(status_code=204)
