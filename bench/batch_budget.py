"""A spend cap in batch mode against what the emulator's Batch API bills (``make bench-batch-budget``).

    python bench/batch_budget.py [--runs 20] [--seed 1] [--workdir out/batch-budget]

Each run captions a random manifest (``bench/budget.py``'s rows: prompts of 3 to 1500 words, 1 to 3 images
of 64 to 3000 px a side at a random detail, a random max_tokens, ~6 % of rows the filter refuses) whose
prompts alone cost 1.3 to 3 times its cap (a random $0.02 to $0.30) at the batch price, through the real
CLI (``vision-pipeline run --max-cost``, ``endpoint.mode = "batch"``, ``poll_s = 0.05``) against the
emulator's Batch API in this process. About a third of the runs' emulators fail every 17th line
(``server_error``), and a third expire every job after 5 to 20 lines, so rows are submitted again.
Then the same CLI runs again with ten times the cap, to finish the rest.

Nothing here trusts the pipeline for the bill: what a run cost is the emulator's own count of the tokens
of the lines it answered 200, at the batch price of ``configs/prices.toml``. A line's worst case is its
prompt tokens (``vision-pipeline estimate --per-row``) at the input price plus max_tokens at the output
price, at the batch price; "one line's worst case" is the largest of the manifest.

Goals, printed with the figures: no capped run billed more than its cap, every capped run exits 5
(where jobs expire, 0 or 1 is right too: rows submitted ``batch.max_rounds`` times are left whatever the
cap), the run's own spend ≥ cap − one line's worst case for the runs that exit 5 (how much of the cap it
uses; the bill is lower by the prompts of filtered rows, held but not billed), and after the rerun every
row committed once (where jobs expire: none twice) and no line answered twice. The script exits 1 when
a run is over its cap, stops wrongly or its rerun is not right.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow.dataset as ds
from budget import (  # bench/budget.py: the live spend-cap benchmark's manifests and CLI runner
    KEY,
    KEY_ENV,
    MAX_TOKENS_CHOICES,
    Setup,
    bench,
    cost_usd,
    make_images,
    make_rows,
    run_cli,
    spread,
    worst_cases,
    write_manifest,
)

from pipeline.config import EmulatorConfig
from pipeline.emulator import Emulator
from pipeline.pricing import Price, load_prices, price_for

MODEL = "gpt-4o"  # Azure's Global Batch serves images from gpt-4o on; OpenAI's surface here
HOST = "127.0.0.1"
EXIT_OK, EXIT_ROW_ERRORS, EXIT_BUDGET = 0, 1, 5
MIN_CAP_USD, MAX_CAP_USD = 0.02, 0.30
FAIL_EVERY = 17
EXPIRE_AFTER_LINES = (5, 20)
RERUN_CAP_FACTOR = 10
RUN_TIMEOUT_S = 600.0
ROUNDING_USD = 1e-9


@dataclass(slots=True)
class RunFigures:
    number: int
    cap_usd: float
    rows: int
    max_tokens: int
    faults: str
    worst_usd: float = 0.0
    billed_usd: float = 0.0
    spend_usd: float = 0.0
    exit_code: int | None = None
    committed: int = 0
    duration_s: float = 0.0
    rerun_exit: int | None = None
    rerun_committed: int = 0
    answered_twice: int = 0

    @property
    def is_over_cap(self) -> bool:
        return self.billed_usd > self.cap_usd + ROUNDING_USD

    @property
    def is_near_cap(self) -> bool:
        return self.spend_usd >= self.cap_usd - self.worst_usd

    @property
    def expires(self) -> bool:
        """Every job expires part-way: rows submitted max_rounds times are left whatever the cap."""
        return self.faults.startswith("expires")

    @property
    def is_stop_right(self) -> bool:
        """Exit 5; or, when jobs expire, 0/1 with rows left after their max_rounds submissions."""
        return self.exit_code == EXIT_BUDGET or (
            self.expires and self.exit_code in (EXIT_OK, EXIT_ROW_ERRORS)
        )

    @property
    def is_rerun_right(self) -> bool:
        """Every row committed once (when jobs expire: no row twice), no line answered twice."""
        once = self.rerun_committed == self.rows or (self.expires and self.rerun_committed > 0)
        return once and not self.answered_twice and self.rerun_exit in (EXIT_OK, EXIT_ROW_ERRORS)


def batch_price(price: Price) -> Price:
    """`price` with the Batch API's discount taken off, so plain arithmetic gives batch costs."""
    keep = 1 - price.batch_discount
    return replace(price, input_per_1m=price.input_per_1m * keep, output_per_1m=price.output_per_1m * keep)


def write_config(path: Path, url: str, max_tokens: int) -> Path:
    path.write_text(
        f'[endpoint]\nprovider = "openai"\nurl = "{url}/v1"\napi_key_env = "{KEY_ENV}"\nmodel = "{MODEL}"\n'
        f'mode = "batch"\n[request]\nmax_tokens = {max_tokens}\n[batch]\npoll_s = 0.05\n'
        "[limits]\nconcurrency = 4\n",
        encoding="utf-8",
    )
    return path


async def one_run(number: int, rng: random.Random, setup: Setup) -> RunFigures:
    folder = setup.workdir / f"run-{number:02d}"
    folder.mkdir(parents=True)
    cap_usd = round(rng.uniform(MIN_CAP_USD, MAX_CAP_USD), 4)
    max_tokens = rng.choice(MAX_TOKENS_CHOICES)
    rows = make_rows(rng, setup, cap_usd)
    manifest = write_manifest(setup.workdir / f"manifest-{number:02d}.jsonl", rows)
    fault = rng.choice(("none", "fail", "expire"))
    expire = rng.randint(*EXPIRE_AFTER_LINES) if fault == "expire" else 0
    emulator_cfg = EmulatorConfig(
        batch_fail_every=FAIL_EVERY if fault == "fail" else 0, batch_expire_after_lines=expire
    )
    faults = {"none": "-", "fail": f"every {FAIL_EVERY}th line fails", "expire": f"expires after {expire}"}[
        fault
    ]
    figures = RunFigures(number, cap_usd, len(rows), max_tokens, faults)
    emulator = Emulator(emulator_cfg, api_key=KEY, model=MODEL)
    await emulator.start(HOST, 0)
    try:
        config = write_config(folder / "run.toml", emulator.url, max_tokens)
        per_row = folder / "estimate.parquet"
        if await run_cli(
            ["estimate", str(config), "--manifest", str(manifest), "--per-row", str(per_row)],
            setup.log,
            RUN_TIMEOUT_S,
        ):
            raise RuntimeError(f"the estimate of run {number} failed (see {setup.log.name})")
        figures.worst_usd = max(worst_cases(per_row, max_tokens, setup.price).values())
        output = folder / "output"
        run_args = ["run", str(config), "--manifest", str(manifest), "--output", str(output), "-q"]
        started = asyncio.get_running_loop().time()
        figures.exit_code = await run_cli([*run_args, "--max-cost", str(cap_usd)], setup.log, RUN_TIMEOUT_S)
        figures.duration_s = asyncio.get_running_loop().time() - started
        stats = emulator.batches.stats
        figures.billed_usd = cost_usd(stats.prompt_tokens, stats.completion_tokens, setup.price)
        figures.spend_usd = json.loads((output / "_stats.json").read_text(encoding="utf-8"))["spend_usd"]
        figures.committed = ds.dataset(output).count_rows() if any(output.glob("*.parquet")) else 0
        rerun_cap = str(cap_usd * RERUN_CAP_FACTOR)
        figures.rerun_exit = await run_cli([*run_args, "--max-cost", rerun_cap], setup.log, RUN_TIMEOUT_S)
        table = ds.dataset(output).to_table(columns=["id"]).column("id").to_pylist()
        figures.rerun_committed = len(set(table)) if len(set(table)) == len(table) else -len(table)
        figures.answered_twice = sum(n > 1 for n in stats.billed.values())
    finally:
        await emulator.stop()
    return figures


def format_run(f: RunFigures) -> str:
    return (
        f"run {f.number:2d}: cap ${f.cap_usd:.4f}, {f.rows:4d} rows, max_tokens {f.max_tokens:3d}, worst "
        f"${f.worst_usd:.5f}, faults {f.faults}; billed ${f.billed_usd:.4f} ({f.billed_usd / f.cap_usd:6.1%}), "
        f"spend ${f.spend_usd:.4f}; exit {f.exit_code}, {f.committed} committed in {f.duration_s:4.1f} s; "
        f"rerun exit {f.rerun_exit}, {f.rerun_committed} committed, {f.answered_twice} answered twice"
    )


def format_summary(runs: Sequence[RunFigures], seed: int) -> tuple[str, bool]:
    n = len(runs)
    over = [f for f in runs if f.is_over_cap]
    wrong_stop = [f for f in runs if not f.is_stop_right]
    incomplete = [f for f in runs if not f.is_rerun_right]
    fives = [f for f in runs if f.exit_code == EXIT_BUDGET]
    lines = [
        f"batch budget: {n} runs (seed {seed}), {MODEL} at the batch price, caps ${MIN_CAP_USD:g} to ${MAX_CAP_USD:g}",
        f"  {'runs billed over the cap':32s}{len(over)} of {n} (goal 0)",
        f"  {'capped runs exiting 5':32s}{len(fives)} of {n} ({n - len(wrong_stop)} stopped rightly)",
        f"  {'spend ≥ cap − one worst case':32s}{sum(f.is_near_cap for f in fives)} of the {len(fives)} exiting 5",
        f"  {'billed / cap':32s}{spread([f.billed_usd / f.cap_usd for f in runs], '.1%')}",
        f"  {'spend / cap':32s}{spread([f.spend_usd / f.cap_usd for f in runs], '.1%')}",
        f"  {'(cap − spend) / worst':32s}{spread([(f.cap_usd - f.spend_usd) / f.worst_usd for f in runs], '.2f')}",
        f"  {'rows committed under the cap':32s}{spread([f.committed / f.rows for f in runs], '.1%')} of the manifest",
        f"  {'reruns complete, once each':32s}{n - len(incomplete)} of {n}",
        f"  {'capped run time':32s}{spread([f.duration_s for f in runs], '.1f')} s",
    ]
    is_ok = not over and not wrong_stop and not incomplete
    lines.append("result: " + ("PASS" if is_ok else "FAIL"))
    return "\n".join(lines), is_ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1, help="caps, manifests, images and faults")
    parser.add_argument("--filter-share", type=float, default=0.06, help="rows the filter refuses")
    parser.add_argument(
        "--workdir", type=Path, default=Path("out/batch-budget"), help="emptied first, kept after"
    )
    args = parser.parse_args(argv)
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    price = batch_price(price_for(MODEL, load_prices()))
    images = make_images(args.workdir, random.Random(f"images-{args.seed}"))
    with open(args.workdir / "runs.log", "ab") as log:
        setup = Setup(args.seed, args.filter_share, args.workdir, price, images, log)
        figures = asyncio.run(bench(args.runs, setup, one_run, format_run, "batch-runs"))
    summary, is_ok = format_summary(figures, args.seed)
    print(summary)
    print(f"(runs' stderr: {args.workdir / 'runs.log'})")
    return 0 if is_ok else 1


if __name__ == "__main__":
    sys.exit(main())
