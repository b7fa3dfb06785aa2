"""What every sandbox route needs: the engine, the caller's key, a running sandbox's agent."""

from __future__ import annotations

from fastapi import Depends, Request

from shoal.engine import Engine, SandboxState
from shoal.engine.keys import ApiKey
from shoal.errors import InvalidTransition
from shoal.runtime.agent_aio import AsyncAgentClient
from shoal.server.auth import api_key


async def engine(request: Request) -> Engine:
    return request.app.state.engine


async def running_agent(sandbox_id: str, request: Request, key: ApiKey = Depends(api_key)) -> AsyncAgentClient:
    eng: Engine = request.app.state.engine
    rec = eng.get(sandbox_id, key)
    if rec.state is not SandboxState.RUNNING:
        raise InvalidTransition(rec.state.value, "use", sandbox_id)
    return AsyncAgentClient(str(eng.runtime.agent_socket(sandbox_id)), sandbox_id)
