"""What every sandbox route needs: the engine, the caller's key, a running sandbox's agent."""

from __future__ import annotations

from fastapi import Depends, Request

from shoal.engine import Engine
from shoal.engine.keys import ApiKey
from shoal.runtime.agent_aio import AsyncAgentClient
from shoal.server.auth import api_key


async def engine(request: Request) -> Engine:
    return request.app.state.engine


async def running_agent(sandbox_id: str, request: Request, key: ApiKey = Depends(api_key)) -> AsyncAgentClient:
    """The caller's usable sandbox's agent, through the one gate (``server/gate.py``)."""
    return request.app.state.gate.agent(sandbox_id, key)
