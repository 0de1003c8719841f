"""From the row estimates of a manifest to what a run of it would cost and take.

Pure: values in, values out (no clock, files or network). ``estimate.py`` counts each row as the run
would and hands the rows here; ``tally_rows`` sums them chunk by chunk, ``summarize`` turns the totals into
costs, a duration, whether it fits a window and the spend cap; ``estimate_text.py`` says it.

Duration follows ``pipeline/limits.py``: each window (``WINDOW_S`` plus the limiter's slack) admits
``tokens_per_minute / 6`` reserved tokens (prompt + max_tokens per request; a larger request goes alone)
and ``requests_per_minute / 6`` requests. The budget that admits fewer rows per window binds.

Per-row Parquet (``--per-row``), one row per manifest row: ``id``, ``line``, ``detail``, ``images``,
``unsized_images``, ``prompt_tokens``, ``cost_usd`` (prompt at the input price plus the expected
completion at the output price; null for a failing row), ``error_kind`` and ``error`` (null unless
failing).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pipeline.config import RunConfig
from pipeline.limits import WINDOW_S, WINDOW_SLACK_S, WINDOWS_PER_MINUTE
from pipeline.pricing import Price, cost_usd
from pipeline.records import Detail, Usage
from pipeline.tokens import max_image_tokens

DEFAULT_COMPLETION_SHARE = 0.5  # without --observed, a row is assumed to use half of max_tokens
LISTED_IDS_PER_KIND = 100
LISTED_DIFFERING_IDS = 20
_WINDOW_PART = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
_UNIT_H = {"d": 24.0, "h": 1.0, "m": 1 / 60, "s": 1 / 3600}


@dataclass(frozen=True, slots=True)
class RowEstimate:
    row_id: str
    line: int
    detail: Detail | None  # None for a row the manifest could not give
    images: int
    prompt_tokens: int | None = None  # as the service bills them; None when the row fails before counting
    error: str | None = None  # the error the run would commit; None for a row it would send
    error_kind: str | None = None  # records.ErrorKind of the error: what failing rows are counted by
    unsized_because: tuple[str, ...] = ()  # one cause per image not sized


@dataclass(frozen=True, slots=True)
class Observed:
    """An earlier output's ok rows: their mean completion tokens and latency, and their bills by id."""

    output: str
    ok_rows: int
    mean_completion_tokens: float | None
    mean_latency_s: float | None
    billed: Mapping[str, Usage]


@dataclass(frozen=True, slots=True)
class Comparison:
    """Estimated against billed prompt tokens, row by row, over the ok rows of ``Observed``."""

    rows: int = 0
    differing_rows: int = 0
    differing_ids: tuple[str, ...] = ()
    estimated_prompt_tokens: int = 0
    billed_prompt_tokens: int = 0
    billed_completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Tally:
    """Totals over the rows estimated so far; images and tokens count the rows to send only."""

    read: int = 0
    duplicates: int = 0
    to_send: int = 0
    prompt_tokens: int = 0
    images_by_detail: Mapping[str, int] = field(default_factory=dict)
    unsized_because: Mapping[str, int] = field(default_factory=dict)
    failing: Mapping[str, int] = field(default_factory=dict)  # rows by error_kind
    failing_ids: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    comparison: Comparison = field(default_factory=Comparison)


@dataclass(frozen=True, slots=True)
class Costs:
    input_usd: float
    output_max_usd: float
    output_expected_usd: float
    total_max_usd: float
    total_expected_usd: float


@dataclass(frozen=True, slots=True)
class Duration:
    tokens_per_minute: int
    requests_per_minute: int
    reserve_tokens_per_row: float | None  # mean prompt + max_tokens; None without rows
    window_s: float
    rows_per_window_by_tokens: int | None
    rows_per_window_by_requests: int
    binding: str | None  # "tokens_per_minute" or "requests_per_minute"
    rows_per_min: float | None
    duration_h: float
    window_h: float | None
    fits_window: bool | None
    concurrency_rows_per_min: float | None  # concurrency × 60 / observed mean latency: a note, not a bound


@dataclass(frozen=True, slots=True)
class CapFit:
    """How the rows to send fit the spend cap: at the most each row can cost, and at its expected cost."""

    max_cost_usd: float
    fits_at_most: bool  # every row at its worst case stays within the cap: the cap cannot stop the run
    fits_expected: bool  # at the expected cost the whole manifest stays within it
    rows_within_at_most: int  # rows sure to be sent before the cap stops the run
    rows_within_expected: int  # rows the cap is expected to allow


@dataclass(frozen=True, slots=True)
class Estimate:
    manifest: str
    config: str
    model: str
    max_tokens: int
    tally: Tally
    expected_completion_tokens: float  # per row
    expected_source: str
    unsized_assumption: str | None
    price: Price
    cost: Costs
    batch_cost: Costs
    duration: Duration
    observed: Observed | None
    cap: CapFit | None = None  # None without limits.max_cost_usd
    mode: str = "live"  # endpoint.mode: with "batch" the cost is batch_cost and the duration up to 24 h


# ---- the arithmetic: totals, costs, duration -----------------------------------------------------------


def tally_rows(
    tally: Tally,
    rows: Iterable[RowEstimate],
    *,
    duplicates: int = 0,
    billed: Mapping[str, Usage] | None = None,
) -> Tally:
    """`tally` plus `rows` and `duplicates` ignored rows; a row to send whose id is `billed` is compared."""
    read, to_send, prompt_tokens = tally.read + duplicates, tally.to_send, tally.prompt_tokens
    images, unsized, failing = (
        Counter(tally.images_by_detail),
        Counter(tally.unsized_because),
        Counter(tally.failing),
    )
    failing_ids = {kind: list(ids) for kind, ids in tally.failing_ids.items()}
    c = asdict(tally.comparison)
    differing_ids = list(c.pop("differing_ids"))
    for row in rows:
        read += 1
        if row.error is not None or row.prompt_tokens is None:
            failing[row.error_kind or "unexpected"] += 1
            listed = failing_ids.setdefault(row.error_kind or "unexpected", [])
            if len(listed) < LISTED_IDS_PER_KIND:
                listed.append(row.row_id)
            continue
        to_send += 1
        prompt_tokens += row.prompt_tokens
        images[row.detail or "auto"] += row.images
        unsized.update(row.unsized_because)
        if billed is not None and (usage := billed.get(row.row_id)) is not None:
            c["rows"] += 1
            c["estimated_prompt_tokens"] += row.prompt_tokens
            c["billed_prompt_tokens"] += usage.prompt_tokens
            c["billed_completion_tokens"] += usage.completion_tokens
            if row.prompt_tokens != usage.prompt_tokens:
                c["differing_rows"] += 1
                differing_ids += [row.row_id][: LISTED_DIFFERING_IDS - len(differing_ids)]
    return Tally(
        read,
        tally.duplicates + duplicates,
        to_send,
        prompt_tokens,
        dict(images),
        dict(unsized),
        dict(failing),
        {kind: tuple(ids) for kind, ids in failing_ids.items()},
        Comparison(**c, differing_ids=tuple(differing_ids)),
    )


def observe(output: str, rows: Iterable[Mapping[str, Any]]) -> Observed:
    """Summarize an earlier output's rows (mappings of OBSERVED_COLUMNS); only ok rows with usage count."""
    billed: dict[str, Usage] = {}
    latencies: list[float] = []
    for row in rows:
        if row.get("status") != "ok" or row.get("prompt_tokens") is None:
            continue
        prompt, completion = int(row["prompt_tokens"]), int(row.get("completion_tokens") or 0)
        billed[str(row["id"])] = Usage(prompt, completion, prompt + completion)
        if row.get("latency_s") is not None:
            latencies.append(float(row["latency_s"]))
    completions = sum(usage.completion_tokens for usage in billed.values())
    mean_latency_s = sum(latencies) / len(latencies) if latencies else None
    return Observed(
        output, len(billed), completions / len(billed) if billed else None, mean_latency_s, billed
    )


def expected_completion_tokens(max_tokens: int, observed: Observed | None) -> tuple[float, str]:
    """Completion tokens expected per row, and where that figure comes from."""
    if observed is not None and observed.mean_completion_tokens is not None:
        mean = min(float(max_tokens), observed.mean_completion_tokens)
        return mean, f"mean of {observed.ok_rows} ok rows in {observed.output}"
    why = f"no ok rows in {observed.output}" if observed is not None else "no --observed output"
    return (
        max_tokens * DEFAULT_COMPLETION_SHARE,
        f"assumed {DEFAULT_COMPLETION_SHARE:.0%} of max_tokens, {why}",
    )


def costs(
    prompt_tokens: int, rows: int, max_tokens: int, expected: float, price: Price, *, batch: bool
) -> Costs:
    """Input and output dollars, the output at its upper bound and at its expected value."""
    input_usd = cost_usd(prompt_tokens, 0, price, batch=batch)
    output_max_usd = cost_usd(0, max_tokens * rows, price, batch=batch)
    output_expected_usd = cost_usd(0, expected * rows, price, batch=batch)
    return Costs(
        input_usd,
        output_max_usd,
        output_expected_usd,
        input_usd + output_max_usd,
        input_usd + output_expected_usd,
    )


def plan_duration(
    rows: int, prompt_tokens: int, cfg: RunConfig, *, window_h: float | None, latency_s: float | None
) -> Duration:
    """How long the limiters take to admit `rows` requests holding `prompt_tokens` in all: a pool's
    endpoints each admit whole requests into their own windows, side by side."""
    tpm, rpm, max_tokens = cfg.limits.tokens_per_minute, cfg.requests_per_minute, cfg.request.max_tokens
    window_s = WINDOW_S + WINDOW_SLACK_S  # the limiter keeps each reservation this long
    by_requests = sum(max(1, math.floor(m.requests_per_minute / WINDOWS_PER_MINUTE)) for m in cfg.pool)
    concurrency = cfg.limits.concurrency * 60 / latency_s if latency_s else None
    plan = Duration(tpm, rpm, None, window_s, None, by_requests, None, None, 0.0, window_h, None, concurrency)
    if rows == 0:
        return replace(plan, fits_window=None if window_h is None else True)
    reserve = (prompt_tokens + max_tokens * rows) / rows
    # a request larger than a window goes alone
    by_tokens = sum(max(1, math.floor(m.tokens_per_minute / WINDOWS_PER_MINUTE / reserve)) for m in cfg.pool)
    rows_per_min = min(by_tokens, by_requests) * 60 / window_s
    duration_h = rows / rows_per_min / 60
    return replace(
        plan,
        reserve_tokens_per_row=reserve,
        rows_per_window_by_tokens=by_tokens,
        binding="tokens_per_minute" if by_tokens <= by_requests else "requests_per_minute",
        rows_per_min=rows_per_min,
        duration_h=duration_h,
        fits_window=None if window_h is None else duration_h <= window_h,
    )


def summarize(
    tally: Tally,
    cfg: RunConfig,
    price: Price,
    observed: Observed | None,
    *,
    manifest: str,
    window_h: float | None,
) -> Estimate:
    """The estimate of `manifest` from its tally; `window_h`: does the run fit in this many hours?"""
    expected, source = expected_completion_tokens(cfg.request.max_tokens, observed)
    rows, max_tokens, model = tally.to_send, cfg.request.max_tokens, cfg.endpoint.model
    assumption = None
    if tally.unsized_because:
        assumption = (
            f"each counted at the most an image of its detail can cost ({max_image_tokens('high', model)} "
            f"tokens at high or auto, {max_image_tokens('low', model)} at low), as the run reserves it"
        )
    latency_s = observed.mean_latency_s if observed else None
    live = costs(tally.prompt_tokens, rows, max_tokens, expected, price, batch=False)
    batch = costs(tally.prompt_tokens, rows, max_tokens, expected, price, batch=True)
    spent_as = batch if cfg.endpoint.mode == "batch" else live  # what the run's spend cap counts
    return Estimate(
        manifest,
        cfg.source,
        model,
        max_tokens,
        tally,
        expected,
        source,
        assumption,
        price,
        live,
        batch,
        plan_duration(rows, tally.prompt_tokens, cfg, window_h=window_h, latency_s=latency_s),
        observed,
        None if cfg.limits.max_cost_usd is None else fit_cap(cfg.limits.max_cost_usd, rows, spent_as),
        cfg.endpoint.mode,
    )


def fit_cap(max_cost_usd: float, rows: int, cost: Costs) -> CapFit:
    """How many of `rows` rows costing `cost` in all fit under the cap, by rows of mean cost.

    The run holds each request's worst case until its bill comes, so the last request starts only with its
    worst case free: at the expected cost, rows within = 1 + (cap - one worst case) / expected per row.
    """
    if rows == 0:
        return CapFit(max_cost_usd, True, True, 0, 0)
    worst, expected = cost.total_max_usd / rows, cost.total_expected_usd / rows
    at_most = rows if worst == 0 else min(rows, math.floor(max_cost_usd / worst))
    by_expected = rows if expected == 0 else 1 + math.floor(max(0.0, max_cost_usd - worst) / expected)
    within = min(rows, by_expected) if max_cost_usd >= worst else 0
    return CapFit(
        max_cost_usd,
        cost.total_max_usd <= max_cost_usd,
        cost.total_expected_usd <= max_cost_usd,
        at_most,
        within,
    )


def parse_window_h(text: str) -> float:
    """Hours in a duration such as "6h", "90m", "1h30m", "2d", or "1.5" (hours). Raises ValueError."""
    text = text.strip().lower()
    try:
        hours = float(text)
    except ValueError:
        parts = _WINDOW_PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise ValueError(f"{text!r} is not a duration such as 6h, 90m or 1h30m") from None
        hours = sum(float(n) * _UNIT_H[u] for n, u in parts)
    if not 0 < hours < math.inf:
        raise ValueError(f"{text!r}: the window must be longer than 0")
    return hours


def per_row_record(row: RowEstimate, price: Price, expected_completion_tokens: float) -> dict[str, Any]:
    """One row of the ``--per-row`` file (``sink.ESTIMATE_ROWS_SCHEMA``): its tokens and expected cost in US
    dollars (prompt at the input price plus `expected_completion_tokens` at the output price), null cost
    for a row that would fail."""
    is_sent = row.error is None and row.prompt_tokens is not None
    return {
        "id": row.row_id,
        "line": row.line,
        "detail": row.detail,
        "images": row.images,
        "unsized_images": len(row.unsized_because),
        "prompt_tokens": row.prompt_tokens,
        "cost_usd": cost_usd(row.prompt_tokens or 0, expected_completion_tokens, price) if is_sent else None,
        "error_kind": row.error_kind,
        "error": row.error,
    }
