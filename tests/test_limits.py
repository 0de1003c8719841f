import asyncio
import random

import pytest

from pipeline.limits import WINDOW_S, Limits, LimitsClosed

pytestmark = pytest.mark.looptime  # the loop's clock jumps ahead when idle: minutes of pacing in milliseconds


async def reserve_for(
    limits: Limits, seconds: float, tokens: int | list[int], workers: int = 8
) -> list[tuple[float, int]]:
    """Keep `workers` acquiring `tokens` each (or sizes drawn from a list) for `seconds`; return (time,
    tokens) of each admission."""
    loop = asyncio.get_running_loop()
    start, admitted = loop.time(), []
    rng = random.Random(7)

    async def worker() -> None:
        while loop.time() - start < seconds:
            size = rng.choice(tokens) if isinstance(tokens, list) else tokens
            await limits.acquire(size)
            admitted.append((loop.time() - start, size))

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
    assert used_per_minute >= 0.97 * 60_000


async def test_mixed_sizes_still_use_at_least_97_percent_and_never_overfill_a_window():
    """Rows of low and high detail (prompt + max_tokens of 412 to 1432 tokens): a large request waiting for
    room must not leave the window half-empty meanwhile."""
    limits = Limits(tokens_per_minute=60_000, requests_per_minute=360)
    sizes = [412, 412, 412, 582, 752, 1092, 1092, 1092, 1432]

    admitted = await reserve_for(limits, seconds=180, tokens=sizes, workers=24)

    assert sum(n for _, n in admitted) / 3 >= 0.97 * 60_000
    assert largest_window(admitted) <= 60_000 / 6


async def test_a_smaller_request_goes_first_only_when_it_does_not_delay_the_first_in_line():
    limits = Limits(tokens_per_minute=60_000, requests_per_minute=360)
    loop = asyncio.get_running_loop()
    await asyncio.sleep(WINDOW_S)  # past the start-up ramp
    await limits.acquire(5_000)
    await asyncio.sleep(5)
    await limits.acquire(3_000)
    start, admitted = loop.time(), {}

    async def send(name: str, tokens: int) -> None:
        await limits.acquire(tokens)
        admitted[name] = loop.time() - start

    async with asyncio.TaskGroup() as tg:  # in this order: the 6000 is first in line
        for name, tokens in (("first", 6_000), ("would-delay-it", 1_500), ("fits-beside-it", 900)):
            tg.create_task(send(name, tokens))

    assert admitted["fits-beside-it"] == 0  # room now, and the 6000 still fits when the 5000 leaves
    assert admitted["first"] == pytest.approx(5, abs=0.1)  # when the 5000 leaves
    assert admitted["would-delay-it"] >= admitted["first"]  # beside the 3000 it would keep the 6000 out


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


async def test_after_a_short_429_hold_the_whole_budget_is_used_again():
    """A 429 at a window's edge (transit jitter) costs its hold, not a share of the quota."""
    limits = Limits(tokens_per_minute=60_000, requests_per_minute=360)
    await reserve_for(limits, seconds=30, tokens=500)  # a full window, as when a 429 comes

    limits.pause(0.05)
    after = sum(n for _, n in await reserve_for(limits, seconds=10, tokens=500))

    assert after >= 10_000 * 0.95


async def test_after_a_pause_sends_resume_at_the_quotas_rate_not_in_a_burst():
    limits = Limits(tokens_per_minute=60_000, requests_per_minute=360)

    limits.pause(30)
    admitted = await reserve_for(limits, seconds=32, tokens=500)

    assert admitted[0][0] >= 30
    first_second = sum(n for t, n in admitted if t < 31)
    assert first_second <= 1_000 + 500  # a second's budget, plus the request that opened it


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


async def test_remaining_requests_lower_than_ours_slows_us_down():
    limits = Limits(tokens_per_minute=1_000_000, requests_per_minute=60)
    loop = asyncio.get_running_loop()

    limits.observe({"x-ratelimit-remaining-requests": "0", "x-ratelimit-remaining-tokens": "1000000"})
    before = loop.time()
    await limits.acquire(100)

    assert loop.time() - before >= 9


async def test_remaining_figures_that_match_our_own_book_nothing():
    """The server counts what we sent; only what it counts beyond that is someone else's."""
    limits = Limits(tokens_per_minute=60_000, requests_per_minute=360)
    await limits.acquire(4_000)
    loop = asyncio.get_running_loop()

    limits.observe({"x-ratelimit-remaining-tokens": "36000", "x-ratelimit-remaining-requests": "354"})
    before = loop.time()
    await limits.acquire(5_000)

    assert loop.time() - before < 6  # only the start-up ramp's pace: 4000 tokens in 4 s


async def test_a_request_cancelled_while_waiting_does_not_hold_up_the_next():
    limits = Limits(tokens_per_minute=6_000, requests_per_minute=60)
    loop = asyncio.get_running_loop()
    await asyncio.sleep(WINDOW_S)
    await limits.acquire(900)
    stuck = asyncio.create_task(limits.acquire(500))  # must wait for the 900 to leave
    await asyncio.sleep(1)

    stuck.cancel()
    before = loop.time()
    await limits.acquire(100)

    assert loop.time() - before < 0.01


async def test_closing_turns_away_the_waiting_at_once_and_everyone_after():
    limits = Limits(tokens_per_minute=6_000, requests_per_minute=60)
    loop = asyncio.get_running_loop()
    await asyncio.sleep(WINDOW_S)
    await limits.acquire(900)
    waiting = [asyncio.create_task(limits.acquire(500)) for _ in range(3)]  # the window is full
    await asyncio.sleep(1)

    before = loop.time()
    limits.close()
    outcomes = await asyncio.gather(*waiting, return_exceptions=True)

    assert all(isinstance(outcome, LimitsClosed) for outcome in outcomes)
    assert loop.time() - before < 0.01
    with pytest.raises(LimitsClosed):
        await limits.acquire(100)


async def test_a_waiter_cancelled_in_the_turn_it_is_turned_away_is_cancelled_not_turned_away():
    """A second signal cancels the task as the first closes the limiter: the cancel must win."""
    limits = Limits(tokens_per_minute=6_000, requests_per_minute=60)
    await asyncio.sleep(WINDOW_S)
    await limits.acquire(900)
    waiting = asyncio.create_task(limits.acquire(500))
    await asyncio.sleep(1)

    limits.close()
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)

    assert waiting.cancelled()


async def test_a_smaller_bill_makes_room_in_the_window_at_once():
    loop = asyncio.get_running_loop()
    limits = Limits(tokens_per_minute=6_000, requests_per_minute=600_000)  # 1,000 tokens per window
    await asyncio.sleep(WINDOW_S + 0.1)  # past the start's ramp
    first = await limits.acquire(1_000)
    waiting = asyncio.ensure_future(limits.acquire(900))
    await asyncio.sleep(1)
    assert not waiting.done()  # the window is full

    limits.settle(first, 100)  # the server billed less than reserved
    await asyncio.sleep(0)
    started = loop.time()
    await waiting
    assert loop.time() - started < 0.01


async def test_settling_a_reservation_that_left_the_window_frees_nothing():
    loop = asyncio.get_running_loop()
    limits = Limits(tokens_per_minute=6_000, requests_per_minute=600_000)
    await asyncio.sleep(WINDOW_S + 0.1)
    early = await limits.acquire(1_000)
    await asyncio.sleep(WINDOW_S + 1)  # `early` has left the window
    await limits.acquire(1_000)  # fills the window again
    limits.settle(early, 0)  # a late bill for a request the window no longer counts

    started = loop.time()
    await limits.acquire(1_000)
    assert loop.time() - started > WINDOW_S - 0.1  # waits for the second to leave, as before the bill
