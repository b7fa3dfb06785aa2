"""``agent_aio.bounded``: the bound on every wait for an agent, with ``asyncio.timeout``'s cancel rules."""

from __future__ import annotations

import asyncio

import pytest

from shoal.errors import AgentUnavailable
from shoal.runtime.agent_aio import bounded


def test_a_block_past_its_bound_is_agent_unavailable():
    async def go() -> None:
        async with bounded(0.05, "sbx", "answer"):
            await asyncio.sleep(5)
    with pytest.raises(AgentUnavailable, match="did not answer within 0.05 s") as info:
        asyncio.run(go())
    assert isinstance(info.value.__cause__, TimeoutError)


def test_a_block_within_its_bound_leaves_nothing_pending():
    async def go() -> str:
        for _ in range(3):
            async with bounded(0.05, "sbx", "answer"):
                await asyncio.sleep(0.001)
        await asyncio.sleep(0.1)  # a timer left armed would cancel this
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        return "done"
    assert asyncio.run(go()) == "done"


def test_no_bound_means_none_and_a_cancel_from_elsewhere_stays_a_cancel():
    async def go() -> None:
        async with bounded(None, "sbx", "answer"):
            await asyncio.sleep(0.01)
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().call_later(0.02, task.cancel)
        async with bounded(5, "sbx", "answer"):
            await asyncio.sleep(1)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(go())


def test_a_cancel_racing_the_bound_is_still_a_cancel():
    """The bound expires and someone else cancels in the same turn of the loop: the outer cancel must not
    be swallowed into an ``AgentUnavailable`` that the caller would answer as a 503 and go on."""
    class Racing(bounded):
        def _expire(self) -> None:
            super()._expire()
            self._task.cancel()  # before the task runs again: both cancels arrive together

    async def go() -> None:
        async with Racing(0.02, "sbx", "answer"):
            await asyncio.sleep(1)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(go())
