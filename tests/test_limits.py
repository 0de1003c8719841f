import asyncio

import pytest

from pipeline.limits import WINDOW_S, Limits

pytestmark = pytest.mark.looptime  # the loop's clock jumps ahead when idle: minutes of pacing in milliseconds


async def reserve_for(limits: Limits, seconds: float, tokens: int, workers: int = 8) -> list[tuple[float, int]]:
    """Keep `workers` acquiring `tokens` each for `seconds`; return (time, tokens) of each admission."""
    loop = asyncio.get_running_loop()
    start, admitted = loop.time(), []

    async def worker() -> None:
        while loop.time() - start < seconds:
            await limits.acquire(tokens)
            admitted.append((loop.time() - start, tokens))

    async with asyncio.TaskGroup() as tg:
        for _ in range(workers):
            tg.create_task(worker())
    return [(t, n) for t, n in admitted if t < seconds]


def largest_window(admitted: list[tuple[float, int]], span_s: float = WINDOW_S) -> int:
    return max(sum(n for t, n in admitted if start <= t < start + span_s) for start, _ in admitted)


async def test_no_10_second_window_gets_more_than_a_sixth_of_the_minute():
    limits = Limits(tokens_per_minute=60_000, requests_per_minute=360)

    admitted = await reserve_for(limits, seconds=120, tokens=1_800)

    assert largest_window(admitted) <= 60_000 / 6


async def test_a_saturated_run_uses_at_least_97_percent_of_the_token_budget():
    limits = Limits(tokens_per_minute=60_000, requests_per_minute=360)

    admitted = await reserve_for(limits, seconds=180, tokens=1_100)

    used_per_minute = sum(n for _, n in admitted) / 3
    assert used_per_minute >= 0.97 * 60_000 * (1 - 0.25 / WINDOW_S)  # less only the safety slack


async def test_the_first_second_is_paced_not_a_burst():
    limits = Limits(tokens_per_minute=60_000, requests_per_minute=360)

    admitted = await reserve_for(limits, seconds=1, tokens=500)

    assert sum(n for _, n in admitted) <= 1_000 + 500  # one second's budget, plus the request that opened it


async def test_the_request_budget_binds_when_requests_are_small():
    limits = Limits(tokens_per_minute=1_000_000, requests_per_minute=60)

    admitted = await reserve_for(limits, seconds=60, tokens=10)

    assert len(admitted) <= 60


async def test_a_pause_holds_every_worker_for_the_time_given():
    limits = Limits(tokens_per_minute=60_000, requests_per_minute=360)
    loop = asyncio.get_running_loop()

    limits.pause(1.5)
    before = loop.time()
    await limits.acquire(100)

    assert loop.time() - before >= 1.5
    assert limits.pauses == 1 and limits.paused_s == pytest.approx(1.5)


async def test_after_a_429_the_budget_is_cut_then_grows_back():
    limits = Limits(tokens_per_minute=60_000, requests_per_minute=360)
    limits.pause(0)

    cut = sum(n for _, n in await reserve_for(limits, seconds=10, tokens=500))
    recovered = sum(n for _, n in await reserve_for(limits, seconds=60, tokens=500)) / 6

    assert cut <= 10_000 * 0.9
    assert recovered > cut


async def test_a_request_bigger_than_the_minute_budget_is_refused():
    limits = Limits(tokens_per_minute=1_000, requests_per_minute=6)

    assert not limits.admits(1_001)
    with pytest.raises(ValueError):
        await limits.acquire(1_001)


async def test_a_request_bigger_than_the_window_goes_alone():
    limits = Limits(tokens_per_minute=6_000, requests_per_minute=60)

    reservation = await limits.acquire(5_000)

    assert reservation.tokens == 5_000


async def test_remaining_tokens_lower_than_ours_slows_us_down():
    limits = Limits(tokens_per_minute=60_000, requests_per_minute=360)
    loop = asyncio.get_running_loop()

    limits.observe({"x-ratelimit-remaining-tokens": "0"})
    before = loop.time()
    await limits.acquire(1_000)

    assert loop.time() - before >= 9  # the others' use has to leave the window first
