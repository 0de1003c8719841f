"""The quota keeper the Ray workers share: the local limiter's rules, and a restart that never doubles a
window. The keeper is a plain class (Ray makes it an actor), so these run without Ray."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import TEST_KEY, azure_config

from pipeline.budget import Budget
from pipeline.client import Client, endpoint_for, open_session
from pipeline.limits import WINDOW_S
from pipeline.records import ImageTask
from pipeline.request import RequestPlan
from pipeline.shared_quota import QuotaKeeper, SharedLimits

pytestmark = pytest.mark.looptime  # the loop's clock jumps ahead when idle: a window's wait in milliseconds


async def test_a_restarted_keeper_counts_the_last_window_as_full():
    """It cannot know what its predecessor admitted in the last 10 s: the first request waits them out."""
    loop = asyncio.get_running_loop()
    fresh = QuotaKeeper(6000, 60, is_restart=False)
    restarted = QuotaKeeper(6000, 60, is_restart=True)

    started = loop.time()
    await fresh.acquire(100)
    fresh_wait_s = loop.time() - started
    started = loop.time()
    await restarted.acquire(100)
    restarted_wait_s = loop.time() - started

    assert fresh_wait_s == 0
    assert restarted_wait_s >= WINDOW_S


async def test_a_closed_keeper_admits_nothing_and_says_so():
    keeper = QuotaKeeper(6000, 60, is_restart=False)
    await keeper.acquire(1000)  # the window's whole budget

    waiting = asyncio.get_running_loop().create_task(keeper.acquire(1000))
    await asyncio.sleep(1)
    keeper.close()

    assert await waiting is None


async def test_a_request_sent_late_holds_its_window_from_when_the_keeper_hears_it_was_sent():
    """A Ray worker sends a round trip after the keeper admitted it: the server counts the request from
    then, so the next window's request may not go before that one has left the window."""
    loop = asyncio.get_running_loop()
    keeper = QuotaKeeper(6000, 60, is_restart=False)  # 1000 tokens and 10 requests a window
    first = await keeper.acquire(1000)
    assert first is not None

    await asyncio.sleep(2.0)  # it leaves 2 s after its admission
    keeper.sent(first)
    started = loop.time()
    await keeper.acquire(1000)

    assert loop.time() - started >= WINDOW_S


class InLoop:
    """A stand-in for a Ray actor handle: ``handle.method.remote(...)`` runs the keeper's method in this
    loop, answers through ``.future()`` as an ObjectRef does, and is noted with the loop time of the call."""

    def __init__(self, keeper: QuotaKeeper) -> None:
        self.keeper = keeper
        self.calls: list[tuple[float, str, tuple[Any, ...]]] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.keeper, name)
        calls = self.calls

        class Remote:
            @staticmethod
            def remote(*args: Any) -> Any:
                loop = asyncio.get_running_loop()
                calls.append((loop.time(), name, args))
                answer: concurrent.futures.Future[Any] = concurrent.futures.Future()

                async def call() -> None:
                    result = method(*args)
                    answer.set_result(await result if inspect.isawaitable(result) else result)

                loop.create_task(call())
                return SimpleNamespace(future=lambda: answer)

        return Remote


@pytest.mark.looptime(False)  # a real request to the emulator
async def test_a_worker_tells_the_keeper_when_its_request_goes_out(emulator):
    """Not when it was admitted: the request may wait for the per-second pacer, its body, a connection."""
    loop = asyncio.get_running_loop()
    cfg = azure_config(emulator)
    handle = InLoop(QuotaKeeper(6000, 60, is_restart=False))
    limits = SharedLimits(handle, 6000, 60)
    body = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Describe it."}]}],
        "max_tokens": 50,
    }
    plan = RequestPlan(ImageTask("row-1", (), "Describe it.", "low", 1), body, 20, 70)

    reservation = await limits.acquire(plan.reserve_tokens)
    admitted_at = loop.time()
    await asyncio.sleep(0.3)
    async with open_session(1) as session:
        client = Client(session, endpoint_for(cfg.endpoint, TEST_KEY), limits, cfg.limits, Budget(None, None))
        tried = await client.attempt(plan, reservation)

    assert tried.status == 200
    sent = [(at, args) for at, name, args in handle.calls if name == "sent"]
    assert len(sent) == 1
    sent_at, _ = sent[0]
    assert admitted_at + 0.3 <= sent_at <= emulator.requests[0].at  # before the server counts it
