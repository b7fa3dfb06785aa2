"""Health (no key), metrics and the lifecycle event stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from shoal import __version__
from shoal.engine.keys import ApiKey
from shoal.server.auth import api_key
from shoal.server.models import Health
from shoal.server.streams import respond, wants_stream

router = APIRouter(tags=["system"])


@router.get("/health", response_model=Health)
async def health() -> Health:
    return Health(status="ok", version=__version__)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request, key: ApiKey = Depends(api_key)) -> Response:
    """Prometheus metrics: an admin key sees every sandbox, any other key only its own."""
    return Response(request.app.state.metrics.render(key), media_type="text/plain; version=0.0.4")


@router.get("/v1/events", responses={200: {"content": {"application/x-ndjson": {}, "text/event-stream": {}}}})
async def events(request: Request, key: ApiKey = Depends(api_key)):
    """Lifecycle events of the caller's sandboxes (created, paused, resumed, timeout, deleted)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict] = asyncio.Queue(maxsize=1000)

    def listener(event: dict) -> None:
        if event["sandbox"].get("api_key") == key.id:
            loop.call_soon_threadsafe(_offer, queue, event)

    unsubscribe = request.app.state.engine.subscribe(listener)

    async def stream() -> AsyncIterator[dict]:
        yield {"type": "subscribed"}
        while True:
            ev = await queue.get()
            sb = {k: v for k, v in ev["sandbox"].items() if k not in ("env", "api_key", "owner_pid", "owner_start")}
            yield {"type": ev["type"], "time": ev["time"], "sandbox": sb}

    return respond(stream(), wants_stream(request, True) or "application/x-ndjson", on_close=unsubscribe)


def _offer(queue: asyncio.Queue, event: dict) -> None:
    if not queue.full():
        queue.put_nowait(event)
