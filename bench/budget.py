"""A spend cap against what the emulator bills: never over it, and how close (``make bench-budget``).

    python bench/budget.py [--runs 50] [--seed 1] [--filter-share 0.06] [--workdir out/budget]

Each run captions a random manifest that costs more than its cap (a random $0.05 to $2): random row
count, prompts of 3 to 1500 words, 1 to 3 images of random sizes (64 to 3000 px a side) at a random
detail, a random max_tokens, about 6 % of rows with the emulator's filter marker ``[[filter]]`` (a 400
``content_filter``, which the cap holds whole: its cost cannot be known), and 3 % of requests answered
500. The real CLI (``vision-pipeline run --max-cost``, concurrency 8, a tokens-per-minute budget too
large to pace anything) runs against the emulator in this process (127.0.0.1, 0.05 s of latency), on its
own clock, bounded by ``RUN_TIMEOUT_S``.

Nothing here trusts the pipeline for the bill: what a run cost is the emulator's own count of the prompt
and completion tokens of the answers it billed (200s), times the prices of ``configs/prices.toml``. A
request's worst case is its prompt tokens, as ``vision-pipeline estimate --per-row`` counts them, at the
input price plus max_tokens at the output price; "one request's worst case" is the largest in the run's
manifest. Per run: the cap, the billed cost, the run's own ``spend_usd`` (``_stats.json``), the exit code.

Goals, printed with the figures: no run billed more than its cap (the script exits 1 otherwise, or when
a run does not exit 5); billed ≥ cap − one request's worst case (how much of the cap a run uses). The
run's spend is checked against the bill too: spend − billed must be exactly the worst cases held whole
for the filter's refusals, which the emulator does not bill. Those holds are what keeps the bill of a
run with filter rows further below its cap than one worst case; ``--filter-share 0`` shows the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import shutil
import statistics
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow.parquet as pq
from PIL import Image

from pipeline.config import EmulatorConfig
from pipeline.emulator import FILTER_MARKER, Emulator
from pipeline.pricing import Price, load_prices, price_for
from pipeline.tokens import image_tokens, text_tokens

KEY_ENV = "BENCH_BUDGET_API_KEY"
KEY = "bench-budget-key"  # the emulator's; never a real secret
DEPLOYMENT = "gpt-4-vision"
MODEL = "gpt-4-turbo"
HOST = "127.0.0.1"
EXIT_BUDGET = 5
CONCURRENCY = 8
LATENCY_S = 0.05
FAULT_RATE = 0.03
FILTER_SHARE = 0.06  # the default of --filter-share
TOKENS_PER_MINUTE = 100_000_000  # far above what 8 workers send: the quota limiter never waits
MIN_CAP_USD, MAX_CAP_USD = 0.05, 2.0
MAX_TOKENS_CHOICES = (50, 100, 200, 300, 500, 800)
PROMPT_WORDS = (3, 1500)  # log-uniform
IMAGES_PER_ROW = (1, 3)
IMAGE_SIDE_PX = (64, 3000)  # log-uniform, width and height drawn apart
DISTINCT_IMAGES = 40
IMAGES_DIR = "images"
DETAILS = ("low", "high", "auto")
OVERSIZE = (1.3, 3.0)  # the manifest's prompts alone cost this many times the cap (uniform)
RUN_TIMEOUT_S = 180.0
TOKENS_PER_PRICE_UNIT = 1_000_000
ROUNDING_USD = 1e-9  # sums of token counts times prices: the room budget.py allows for float rounding
ROW_IN_PROMPT = re.compile(r"^Row (r\d{5})\.")
WORDS = ("describe", "the", "scene", "colours", "light", "shadow", "texture", "people", "objects",
         "background", "foreground", "mood", "weather", "street", "building", "tree", "water", "sky",
         "animal", "vehicle", "sign", "text", "pattern", "detail", "edge", "corner", "shape")  # fmt: skip


@dataclass(frozen=True, slots=True)
class Row:
    row_id: str
    images: tuple[str, ...]
    prompt: str
    detail: str

    @property
    def is_filtered(self) -> bool:
        return FILTER_MARKER in self.prompt


@dataclass(frozen=True, slots=True)
class Setup:
    """What every run of one benchmark shares."""

    seed: int
    filter_share: float  # rows whose prompt holds the filter marker
    workdir: Path
    price: Price
    images: Mapping[str, tuple[int, int]]  # path as the manifests give it -> size
    log: BinaryIO  # the runs' stderr


@dataclass(slots=True)
class RunFigures:
    number: int
    cap_usd: float
    rows: int
    filter_rows: int
    max_tokens: int
    worst_usd: float = 0.0  # the largest worst case of one request in the manifest
    prompts_usd: float = 0.0  # the manifest's prompt tokens (filter rows left out) at the input price
    billed_usd: float = 0.0  # the emulator's billed tokens at the prices
    spend_usd: float | None = None  # the run's own count (_stats.json)
    held_usd: float = 0.0  # worst cases of the filter's refusals: held whole by the cap, billed nothing
    exit_code: int | None = None  # None: killed after RUN_TIMEOUT_S
    duration_s: float = 0.0
    answers: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    estimate_mismatches: int = 0  # answers whose billed prompt tokens differ from the estimate's

    @property
    def is_over_cap(self) -> bool:
        return self.billed_usd > self.cap_usd + ROUNDING_USD

    @property
    def is_near_cap(self) -> bool:
        return self.billed_usd >= self.cap_usd - self.worst_usd

    @property
    def unexplained_usd(self) -> float:
        """Spend the bill and the held refusals do not account for (0 up to rounding when all is right)."""
        return (self.spend_usd or 0.0) - self.billed_usd - self.held_usd


def cost_usd(prompt_tokens: int, completion_tokens: int, price: Price) -> float:
    """Tokens at the prices, in US dollars: plain arithmetic, apart from the pipeline's own."""
    return (
        prompt_tokens * price.input_per_1m + completion_tokens * price.output_per_1m
    ) / TOKENS_PER_PRICE_UNIT


def log_uniform(rng: random.Random, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def make_images(workdir: Path, rng: random.Random) -> dict[str, tuple[int, int]]:
    """DISTINCT_IMAGES PNGs of random sizes in workdir/images; their paths as the manifests (in workdir)
    give them, and their sizes."""
    (workdir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    sizes: dict[str, tuple[int, int]] = {}
    for n in range(DISTINCT_IMAGES):
        size = (round(log_uniform(rng, *IMAGE_SIDE_PX)), round(log_uniform(rng, *IMAGE_SIDE_PX)))
        ref = f"{IMAGES_DIR}/img{n:02d}-{size[0]}x{size[1]}.png"
        Image.new("RGB", size, ((n * 53) % 256, (n * 97) % 256, 120)).save(workdir / ref)
        sizes[ref] = size
    return sizes


def make_rows(rng: random.Random, setup: Setup, cap_usd: float) -> list[Row]:
    """Rows until their prompts alone (filter rows left out) cost a random multiple of the cap."""
    images, price = setup.images, setup.price
    target_usd = cap_usd * rng.uniform(*OVERSIZE)
    paths = sorted(images)
    rows: list[Row] = []
    prompts_usd = 0.0
    while prompts_usd < target_usd:
        row_id = f"r{len(rows):05d}"
        words = " ".join(rng.choices(WORDS, k=round(log_uniform(rng, *PROMPT_WORDS))))
        marker = f" {FILTER_MARKER}" if rng.random() < setup.filter_share else ""
        refs = rng.sample(paths, rng.randint(*IMAGES_PER_ROW))
        row = Row(row_id, tuple(refs), f"Row {row_id}.{marker} {words}", rng.choice(DETAILS))
        rows.append(row)
        if not row.is_filtered:
            tokens = text_tokens(row.prompt) + sum(image_tokens(*images[p], row.detail) for p in refs)
            prompts_usd += cost_usd(tokens, 0, price)
    return rows


def write_manifest(path: Path, rows: Sequence[Row]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            record = {"id": row.row_id, "images": row.images, "prompt": row.prompt, "detail": row.detail}
            f.write(json.dumps(record) + "\n")
    return path


def write_config(path: Path, url: str, max_tokens: int) -> Path:
    path.write_text(
        f"""[endpoint]
provider = "azure"
url = "{url}"
deployment = "{DEPLOYMENT}"
api_key_env = "{KEY_ENV}"
model = "{MODEL}"

[request]
max_tokens = {max_tokens}

[limits]
tokens_per_minute = {TOKENS_PER_MINUTE}
requests_per_minute = 1000000
concurrency = {CONCURRENCY}
max_attempts = 6
backoff_initial_s = 0.05
backoff_max_s = 0.5
timeout_s = 30
""",
        encoding="utf-8",
    )
    return path


def cli_command() -> list[str]:
    """The installed console script beside this interpreter, else the package as a module."""
    script = Path(sys.executable).with_name("vision-pipeline")
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipeline"]


async def run_cli(args: Sequence[str], log: BinaryIO, timeout_s: float) -> int | None:
    """Run the CLI with the emulator's key; its exit code, or None when it had to be killed."""
    env = {**os.environ, KEY_ENV: KEY}
    proc = await asyncio.create_subprocess_exec(*cli_command(), *args, env=env, stdout=log, stderr=log)
    try:
        return await asyncio.wait_for(proc.wait(), timeout_s)
    except TimeoutError:
        return None
    finally:
        if proc.returncode is None:  # past its time, or this script was interrupted
            proc.kill()
            await proc.wait()


def worst_cases(per_row: Path, max_tokens: int, price: Price) -> dict[str, float]:
    """Each sendable row's worst case from the estimate's --per-row file: prompt tokens + max_tokens."""
    table = pq.read_table(per_row, columns=["id", "prompt_tokens", "error_kind"]).to_pylist()
    return {
        row["id"]: cost_usd(row["prompt_tokens"], max_tokens, price)
        for row in table
        if row["error_kind"] is None and row["prompt_tokens"] is not None
    }


def estimated_prompt_tokens(per_row: Path) -> dict[str, int]:
    table = pq.read_table(per_row, columns=["id", "prompt_tokens"]).to_pylist()
    return {row["id"]: row["prompt_tokens"] for row in table if row["prompt_tokens"] is not None}


async def one_run(number: int, rng: random.Random, setup: Setup) -> RunFigures:
    """One capped run against a fresh emulator; its figures."""
    price, log = setup.price, setup.log
    folder = setup.workdir / f"run-{number:02d}"
    folder.mkdir(parents=True)
    cap_usd = round(rng.uniform(MIN_CAP_USD, MAX_CAP_USD), 4)
    max_tokens = rng.choice(MAX_TOKENS_CHOICES)
    rows = make_rows(rng, setup, cap_usd)
    manifest = write_manifest(setup.workdir / f"manifest-{number:02d}.jsonl", rows)  # beside the images
    figures = RunFigures(number, cap_usd, len(rows), sum(r.is_filtered for r in rows), max_tokens)
    emulator_cfg = EmulatorConfig(latency_s=LATENCY_S, fault_rate=FAULT_RATE, seed=setup.seed * 1000 + number)
    emulator = Emulator(
        emulator_cfg, api_key=KEY, deployment=DEPLOYMENT, model=MODEL, keep_requests=True, keep_bodies=False
    )
    await emulator.start(HOST, 0)
    try:
        config = write_config(folder / "run.toml", emulator.url, max_tokens)
        per_row = folder / "estimate.parquet"
        estimate_args = ["estimate", str(config), "--manifest", str(manifest), "--per-row", str(per_row)]
        if await run_cli(estimate_args, log, RUN_TIMEOUT_S) != 0:
            raise RuntimeError(f"the estimate of run {number} failed (see {log.name})")
        worst = worst_cases(per_row, max_tokens, price)
        if len(worst) < len(rows):
            raise RuntimeError(f"the estimate of run {number} says {len(rows) - len(worst)} rows would fail")
        estimated = estimated_prompt_tokens(per_row)
        figures.worst_usd = max(worst.values())
        figures.prompts_usd = sum(
            cost_usd(estimated[r.row_id], 0, price) for r in rows if not r.is_filtered and r.row_id in worst
        )
        output = folder / "output"
        run_args = ["run", str(config), "--manifest", str(manifest), "--output", str(output)]
        started = asyncio.get_running_loop().time()
        figures.exit_code = await run_cli(
            [*run_args, "--max-cost", str(cap_usd), "--log-format", "json", "-q"], log, RUN_TIMEOUT_S
        )
        figures.duration_s = asyncio.get_running_loop().time() - started
    finally:
        await emulator.stop()
    stats = emulator.stats
    figures.billed_usd = cost_usd(stats.prompt_tokens, stats.completion_tokens, price)
    figures.by_status = Counter(stats.by_status)
    for request in emulator.requests:
        match = ROW_IN_PROMPT.match(request.prompt_text)
        row_id = match.group(1) if match else None
        if request.status == 400 and FILTER_MARKER in request.prompt_text and row_id in worst:
            figures.held_usd += worst[row_id]  # the filter's refusal: no usage, so the cap keeps its hold
        if request.status == 200:
            figures.answers += 1
            figures.estimate_mismatches += row_id is None or request.prompt_tokens != estimated.get(row_id)
    stats_file = output / "_stats.json"
    if stats_file.exists():
        figures.spend_usd = json.loads(stats_file.read_text(encoding="utf-8")).get("spend_usd")
    return figures


def format_run(f: RunFigures) -> str:
    spend = "-" if f.spend_usd is None else f"${f.spend_usd:.4f}"
    return (
        f"run {f.number:2d}: cap ${f.cap_usd:.4f}, {f.rows:4d} rows ({f.filter_rows:3d} filter), max_tokens "
        f"{f.max_tokens:3d}, worst ${f.worst_usd:.4f}; billed ${f.billed_usd:.4f} "
        f"({f.billed_usd / f.cap_usd:6.1%}), spend {spend}, held ${f.held_usd:.4f}; exit {f.exit_code} "
        f"in {f.duration_s:4.1f} s; ≤ cap {'yes' if not f.is_over_cap else 'NO'}, "
        f"≥ cap − worst {'yes' if f.is_near_cap else 'no'}"
    )


def spread(values: Sequence[float], form: str) -> str:
    return f"min {min(values):{form}}, median {statistics.median(values):{form}}, max {max(values):{form}}"


def format_summary(runs: Sequence[RunFigures], setup: Setup) -> tuple[str, bool]:
    """The summary block and whether every hard check held."""
    n, price = len(runs), setup.price
    over = [f for f in runs if f.is_over_cap]
    not_five = [f for f in runs if f.exit_code != EXIT_BUDGET]
    near = sum(f.is_near_cap for f in runs)
    spend_near = sum((f.spend_usd or 0.0) >= f.cap_usd - f.worst_usd for f in runs)
    affordable = sum(f.prompts_usd <= f.cap_usd for f in runs)
    unexplained = [abs(f.unexplained_usd) for f in runs]
    mismatches = sum(f.estimate_mismatches for f in runs)
    answers = sum(f.answers for f in runs)
    statuses: Counter[int] = Counter()
    for f in runs:
        statuses.update(f.by_status)
    codes = ", ".join(f"{count}×{status}" for status, count in sorted(statuses.items()))
    exit_codes = Counter(str(f.exit_code) for f in runs)
    exits = ", ".join(f"{count}×{code}" for code, count in sorted(exit_codes.items()))
    over_runs = f": runs {', '.join(str(f.number) for f in over)}" if over else ""
    figures = [
        ("runs billed over the cap", f"{len(over)} of {n} (goal 0){over_runs}"),
        ("exit code 5", f"{n - len(not_five)} of {n} ({exits})"),
        ("billed ≥ cap − worst case", f"{near} of {n}"),
        ("spend ≥ cap − worst case", f"{spend_near} of {n} (the run's own count: refusals held whole)"),
        ("billed / cap", spread([f.billed_usd / f.cap_usd for f in runs], ".1%")),
        ("spend / cap", spread([(f.spend_usd or 0.0) / f.cap_usd for f in runs], ".1%")),
        ("(cap − billed) / worst", spread([(f.cap_usd - f.billed_usd) / f.worst_usd for f in runs], ".2f")),
        ("held for refusals / cap", spread([f.held_usd / f.cap_usd for f in runs], ".1%")),
        ("spend − billed − held", f"max ${max(unexplained):.6f} (0: the spend is the bill plus the holds)"),
        ("worst case, one request", spread([f.worst_usd for f in runs], ".4f") + " US dollars"),
        ("caps", spread([f.cap_usd for f in runs], ".4f") + " US dollars"),
        ("manifests the cap could pay", f"{affordable} of {n} (prompt tokens alone, filter rows left out)"),
        ("rows per manifest", spread([f.rows for f in runs], "g")),
        ("requests", f"{sum(statuses.values())} ({codes})"),
        ("prompt tokens ≠ estimate", f"{mismatches} of {answers} answers"),
        ("run time", spread([f.duration_s for f in runs], ".1f") + " s"),
    ]
    prices = f"${price.input_per_1m:g} / ${price.output_per_1m:g} per 1M prompt / completion tokens"
    header = (
        f"budget: {n} runs (seed {setup.seed}), {MODEL} at {prices}, caps ${MIN_CAP_USD:g} to "
        f"${MAX_CAP_USD:g}, concurrency {CONCURRENCY}, emulator latency {LATENCY_S} s, "
        f"{FAULT_RATE:.0%} 500s, ~{setup.filter_share:.0%} filter rows"
    )
    lines = [header, *(f"  {name:30s}{value}" for name, value in figures)]
    is_ok = not over and not not_five
    failures = []
    if over:
        failures.append(f"{len(over)} runs billed over their cap")
    if not_five:
        failures.append(f"{len(not_five)} runs did not exit 5")
    lines.append("result: " + ("PASS" if is_ok else "FAIL: " + "; ".join(failures)))
    return "\n".join(lines), is_ok


async def bench(
    runs: int,
    setup: Setup,
    run_one: Callable[[int, random.Random, Setup], Awaitable[Any]] | None = None,
    show: Callable[[Any], str] = lambda f: format_run(f),
    label: str = "runs",
) -> list[Any]:
    """`runs` capped runs, one after another, each printed as it ends (``bench/batch_budget.py`` passes its
    own `run_one` and `show`)."""
    rng = random.Random(f"{label}-{setup.seed}")
    figures = []
    for number in range(1, runs + 1):
        f = await (run_one or one_run)(number, rng, setup)
        figures.append(f)
        print(show(f), flush=True)
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1, help="caps, manifests, images and emulator faults")
    parser.add_argument("--filter-share", type=float, default=FILTER_SHARE, help="rows the filter refuses")
    parser.add_argument("--workdir", type=Path, default=Path("out/budget"), help="emptied first, kept after")
    args = parser.parse_args(argv)
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    price = price_for(MODEL, load_prices())
    images = make_images(args.workdir, random.Random(f"images-{args.seed}"))
    with open(args.workdir / "runs.log", "ab") as log:
        setup = Setup(args.seed, args.filter_share, args.workdir, price, images, log)
        figures = asyncio.run(bench(args.runs, setup))
        summary, is_ok = format_summary(figures, setup)
    print(summary)
    print(f"(runs' stderr: {args.workdir / 'runs.log'})")
    return 0 if is_ok else 1


if __name__ == "__main__":
    sys.exit(main())
