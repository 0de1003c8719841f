"""The spend cap: never more than decided, the rest left for the next run, exit code 5."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from conftest import TEST_KEY, azure_config, write_csv

from pipeline.budget import Budget
from pipeline.config import EmulatorConfig
from pipeline.emulator import Emulator
from pipeline.estimate import EstimateOptions, estimate
from pipeline.exits import EXIT_BUDGET, EXIT_OK
from pipeline.pricing import Price, cost_usd
from pipeline.records import BudgetReached
from pipeline.runner import RunOptions, run
from pipeline.sink import read_output

PRICE = Price("gpt-4-turbo", 10.0, 30.0, 0.5, "2024-04-09", "test", "test")  # configs/prices.toml's


async def test_an_attempt_starts_only_while_spent_and_in_flight_leave_room_for_its_worst_case():
    budget = Budget(1.0, PRICE)

    first = await budget.hold(0.4)
    second = await budget.hold(0.4)
    third = asyncio.ensure_future(budget.hold(0.4))
    await asyncio.sleep(0)

    assert not third.done()  # 0.4 + 0.4 + 0.4 > 1.0
    budget.settle(first, 0.1)  # billed less than its worst case: room again
    assert (await third).usd == 0.4
    budget.settle(second, 0.1)
    assert budget.spent_usd == pytest.approx(0.2) and budget.in_flight_usd == pytest.approx(0.4)


async def test_the_cap_is_reached_when_nothing_is_in_flight_and_the_next_attempt_does_not_fit():
    budget = Budget(1.0, PRICE)
    held = await budget.hold(0.7)
    waiting = asyncio.ensure_future(budget.hold(0.7))
    await asyncio.sleep(0)

    budget.settle(held, None)  # the bill cannot be known: kept whole

    with pytest.raises(BudgetReached):
        await waiting
    with pytest.raises(BudgetReached):
        await budget.hold(0.01)  # once reached, nothing more starts
    assert budget.spent_usd == pytest.approx(0.7)


async def test_a_cancelled_wait_gives_its_place_and_nothing_else_back():
    budget = Budget(1.0, PRICE)
    held = await budget.hold(0.9)
    waiting = asyncio.ensure_future(budget.hold(0.5))
    await asyncio.sleep(0)

    waiting.cancel()
    await asyncio.sleep(0)
    budget.settle(held, 0.2)

    assert budget.in_flight_usd == 0 and budget.spent_usd == pytest.approx(0.2)
    assert (await budget.hold(0.8)).usd == 0.8


def rows(n: int, **columns: str) -> list[dict[str, str]]:
    data = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGNgYGAAAAAEAAH2FzhVAAAAAElFTkSuQmCC"
    return [{"id": f"r{i:03d}", "image": data, "detail": "low", **columns} for i in range(n)]


def billed_usd(emulator: Emulator) -> float:
    return cost_usd(emulator.stats.prompt_tokens, emulator.stats.completion_tokens, PRICE)


@pytest.mark.parametrize("faults", [0.0, 0.3])
async def test_a_cap_stops_the_run_with_exit_5_within_it_and_a_rerun_resumes(tmp_path, key_in_env, faults):
    """With 5xx faults and filtered prompts too, what the emulator bills never passes the cap."""
    filtered = [{**row, "id": f"filtered-{n}"} for n, row in enumerate(rows(5, prompt="[[filter]] this one"))]
    manifest = write_csv(tmp_path / "m.csv", [*rows(40), *filtered])
    emulator_cfg = EmulatorConfig(fault_rate=faults, seed=7)
    async with Emulator(emulator_cfg, api_key=TEST_KEY, deployment="vision", model="gpt-4-turbo") as emulator:
        cfg = azure_config(emulator, limits={"max_cost_usd": 0.05, "concurrency": 4, "max_attempts": 8})

        first = await run(cfg, RunOptions(manifest, tmp_path / "out", handle_signals=False))
        billed_first = billed_usd(emulator)
        committed_first = len(read_output(tmp_path / "out").to_pylist())
        second = await run(
            azure_config(emulator, limits={"max_cost_usd": 10.0, "max_attempts": 8}),
            RunOptions(manifest, tmp_path / "out", handle_signals=False),
        )

    ids = [r["id"] for r in read_output(tmp_path / "out").to_pylist()]
    assert first.exit_code == EXIT_BUDGET and "budget reached" in first.stopped_because
    assert billed_first <= 0.05 and first.spend_usd <= 0.05 and first.spend_usd >= billed_first
    assert 0 < committed_first < 45 and f"{45 - committed_first} rows left" in first.stopped_because
    assert billed_first >= 0.05 - 2 * cost_usd(200, 300, PRICE)  # the cap is used, less a request or two
    assert second.exit_code == EXIT_OK and sorted(ids) == sorted({*ids}) and len(ids) == 45


def run_cli(*args: object, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, args)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("flag", "setting"), [("-1", "--max-cost"), ("0", "--max-cost"), ("lots", "--max-cost")]
)
def test_a_cap_that_is_not_a_positive_number_is_exit_2_naming_it(tmp_path, flag, setting):
    write_csv(tmp_path / "m.csv", rows(1))
    (tmp_path / "c.toml").write_text('[endpoint]\nprovider = "emulator"\n')

    done = run_cli("run", tmp_path / "c.toml", "--manifest", tmp_path / "m.csv", "--output", tmp_path / "out",
                   "--max-cost", flag, env={"PATH": "/usr/bin"})  # fmt: skip

    assert done.returncode == 2 and setting in done.stderr + done.stdout
    assert not (tmp_path / "out").exists()


def test_a_cap_without_a_price_for_the_model_is_exit_2_naming_the_file_to_edit(tmp_path):
    write_csv(tmp_path / "m.csv", rows(1))
    (tmp_path / "c.toml").write_text(
        '[endpoint]\nprovider = "emulator"\nmodel = "llava-1.5"\n[limits]\nmax_cost_usd = 5\n'
    )

    done = run_cli("run", tmp_path / "c.toml", "--manifest", tmp_path / "m.csv", "--output", tmp_path / "out",
                   env={"PATH": "/usr/bin"})  # fmt: skip

    assert done.returncode == 2 and "prices.toml" in done.stdout + done.stderr


def test_the_cap_and_the_spend_are_in_stats_and_the_summary(tmp_path):
    write_csv(tmp_path / "m.csv", rows(3))
    (tmp_path / "c.toml").write_text('[endpoint]\nprovider = "emulator"\n')

    done = run_cli("run", tmp_path / "c.toml", "--manifest", tmp_path / "m.csv", "--output", tmp_path / "out",
                   "--max-cost", "2.5", "--log-format", "text", "-q", env={"PATH": "/usr/bin"})  # fmt: skip

    stats = json.loads((tmp_path / "out" / "_stats.json").read_text())
    assert done.returncode == 0, done.stderr
    assert stats["max_cost_usd"] == 2.5 and 0 < stats["spend_usd"] <= 2.5
    assert "of the $2.5000 cap" in done.stdout
    assert stats["spend_usd"] == pytest.approx(stats["cost_usd"])  # every answer billed with usage


async def test_the_estimate_says_how_many_rows_fit_under_the_cap_and_the_run_sends_at_least_those(
    tmp_path, emulator, key_in_env
):
    manifest = write_csv(tmp_path / "m.csv", rows(30))
    cfg = azure_config(emulator, limits={"max_cost_usd": 0.04, "concurrency": 4})

    predicted = (await estimate(cfg, EstimateOptions(manifest))).cap
    summary = await run(cfg, RunOptions(manifest, tmp_path / "out", handle_signals=False))

    sent = len(read_output(tmp_path / "out").to_pylist())
    assert predicted is not None and not predicted.fits_at_most and not predicted.fits_expected
    assert summary.exit_code == EXIT_BUDGET
    assert predicted.rows_within_at_most <= sent < 30
