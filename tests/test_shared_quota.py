"""The quota keeper the Ray workers share: the local limiter's rules, and a restart that never doubles a
window. The keeper is a plain class (Ray makes it an actor), so these run without Ray."""

from __future__ import annotations

import asyncio
import time

import pytest

from pipeline.limits import WINDOW_S
from pipeline.shared_quota import QuotaKeeper

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


async def test_a_request_sent_late_holds_its_window_from_when_it_was_sent():
    """A Ray worker sends a round trip after the keeper admitted it: the server counts the request from
    then, so the next window's request may not go before that one has left the window."""
    loop = asyncio.get_running_loop()
    keeper = QuotaKeeper(6000, 60, is_restart=False)  # 1000 tokens and 10 requests a window
    first = await keeper.acquire(1000)
    assert first is not None
    started = loop.time()

    keeper.sent(first, time.time() + 2.0)  # it left 2 s after its admission
    await keeper.acquire(1000)

    assert loop.time() - started >= WINDOW_S + 2.0
