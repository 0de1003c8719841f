"""From the row estimates of a manifest to what a run of it would cost and take, and what the user reads.

Pure: values in, values out (no clock, files or network). ``estimate.py`` counts each row as the run
would and hands the rows here; ``tally_rows`` sums them chunk by chunk, ``summarize`` turns the totals into
costs, a duration and whether it fits a window, and ``estimate_as_json`` / ``format_estimate`` say it.

Duration follows ``pipeline/limits.py``: each window (``WINDOW_S`` plus the limiter's slack) admits
``tokens_per_minute / 6`` reserved tokens (prompt + max_tokens per request; a larger request goes alone)
and ``requests_per_minute / 6`` requests. The budget that admits fewer rows per window binds.

JSON (``estimate --json``), schema ``vision-pipeline/estimate/1``; keys are only ever added, an unknown
value is null, money is US dollars::

    schema, manifest, config, model     str
    rows            {read, to_send, failing, duplicates}   duplicates: ids seen before, ignored like the run
    images          {total, by_detail: {low, high, auto}, unsized, unsized_because: {cause: n},
                     unsized_assumption}                    of the rows to send; auto is counted as high
    prompt_tokens   int                                     of the rows to send, as the service bills them
    output_tokens   {max, expected, expected_per_row, expected_source}    max: max_tokens × rows to send
    price           {model, input_per_1m, output_per_1m, batch_discount, checked, source, file}  USD per 1M
    cost, batch_cost {input_usd, output_max_usd, output_expected_usd, total_max_usd, total_expected_usd}
    duration        {tokens_per_minute, requests_per_minute, reserve_tokens_per_row, window_s,
                     rows_per_window_by_tokens, rows_per_window_by_requests,
                     binding: "tokens_per_minute" | "requests_per_minute", rows_per_min, duration_h,
                     window_h, fits_window, concurrency_rows_per_min (a note: concurrency / observed latency)}
    failing         {error_kind: {rows, row_ids}}           row_ids: the first LISTED_IDS_PER_KIND
    observed        null | {output, ok_rows, mean_completion_tokens, mean_latency_s, rows (compared: ok
                     rows of the output whose id is to send), differing_rows, differing_ids,
                     estimated_prompt_tokens, billed_prompt_tokens, billed_completion_tokens,
                     estimated_cost_usd, billed_cost_usd, cost_difference_pct}

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
from pipeline.records import DETAILS, Detail, Usage
from pipeline.tokens import max_image_tokens

SCHEMA = "vision-pipeline/estimate/1"
DEFAULT_COMPLETION_SHARE = 0.5  # without --observed, a row is assumed to use half of max_tokens
LISTED_IDS_PER_KIND = 100
LISTED_DIFFERING_IDS = 20
PRINTED_IDS_PER_KIND = 10
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
    """How long the limiter takes to admit `rows` requests holding `prompt_tokens` in all."""
    tpm, rpm, max_tokens = cfg.limits.tokens_per_minute, cfg.requests_per_minute, cfg.request.max_tokens
    window_s = WINDOW_S + WINDOW_SLACK_S  # the limiter keeps each reservation this long
    by_requests = max(1, math.floor(rpm / WINDOWS_PER_MINUTE))
    concurrency = cfg.limits.concurrency * 60 / latency_s if latency_s else None
    plan = Duration(tpm, rpm, None, window_s, None, by_requests, None, None, 0.0, window_h, None, concurrency)
    if rows == 0:
        return replace(plan, fits_window=None if window_h is None else True)
    reserve = (prompt_tokens + max_tokens * rows) / rows
    by_tokens = max(1, math.floor(tpm / WINDOWS_PER_MINUTE / reserve))  # a request larger goes alone
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
        costs(tally.prompt_tokens, rows, max_tokens, expected, price, batch=False),
        costs(tally.prompt_tokens, rows, max_tokens, expected, price, batch=True),
        plan_duration(rows, tally.prompt_tokens, cfg, window_h=window_h, latency_s=latency_s),
        observed,
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


# ---- what the user reads -------------------------------------------------------------------------------


def estimate_as_json(e: Estimate) -> dict[str, Any]:
    """The estimate as the JSON object documented at the top of this module."""
    t, o = e.tally, e.observed
    observed = None
    if o is not None:
        estimated_usd, billed_usd = _compared_costs(e)
        observed = {
            "output": o.output,
            "ok_rows": o.ok_rows,
            "mean_completion_tokens": o.mean_completion_tokens,
            "mean_latency_s": o.mean_latency_s,
            **asdict(t.comparison),
            "estimated_cost_usd": estimated_usd,
            "billed_cost_usd": billed_usd,
            "cost_difference_pct": _difference_pct(estimated_usd, billed_usd),
        }
    return {
        "schema": SCHEMA,
        "manifest": e.manifest,
        "config": e.config,
        "model": e.model,
        "rows": {
            "read": t.read,
            "to_send": t.to_send,
            "failing": sum(t.failing.values()),
            "duplicates": t.duplicates,
        },
        "images": {
            "total": sum(t.images_by_detail.values()),
            "by_detail": {detail: t.images_by_detail.get(detail, 0) for detail in DETAILS},
            "unsized": sum(t.unsized_because.values()),
            "unsized_because": dict(t.unsized_because),
            "unsized_assumption": e.unsized_assumption,
        },
        "prompt_tokens": t.prompt_tokens,
        "output_tokens": {
            "max": e.max_tokens * t.to_send,
            "expected": round(e.expected_completion_tokens * t.to_send),
            "expected_per_row": e.expected_completion_tokens,
            "expected_source": e.expected_source,
        },
        "price": asdict(e.price),
        "cost": asdict(e.cost),
        "batch_cost": asdict(e.batch_cost),
        "duration": asdict(e.duration),
        "failing": {
            kind: {"rows": n, "row_ids": list(t.failing_ids.get(kind, ()))}
            for kind, n in sorted(t.failing.items())
        },
        "observed": observed,
    }


def format_estimate(e: Estimate) -> str:
    """The lines an operator reads before deciding to spend."""
    t, d, p, rows, o = e.tally, e.duration, e.price, e.tally.to_send, e.observed
    by_detail = ", ".join(f"{detail} {t.images_by_detail.get(detail, 0):,}" for detail in DETAILS)
    images = sum(t.images_by_detail.values())
    lines = [
        f"estimate of {e.manifest} under {e.config} (model {e.model}); nothing was sent",
        (
            f"rows: {t.read:,} read, {rows:,} to send, {sum(t.failing.values()):,} would fail, "
            f"{t.duplicates:,} duplicate ids ignored"
        ),
        f"images: {images:,} ({by_detail}; auto is counted as high, the upper bound)",
    ]
    if t.unsized_because:
        causes = "; ".join(f"{cause}: {n:,}" for cause, n in sorted(t.unsized_because.items()))
        lines.append(f"  {sum(t.unsized_because.values()):,} not sized ({causes}): {e.unsized_assumption}")
    expected = e.expected_completion_tokens
    lines += [
        f"prompt tokens: {t.prompt_tokens:,} (as the run counts them and the service bills them)",
        (
            f"output tokens: at most {e.max_tokens * rows:,} (max_tokens {e.max_tokens} × {rows:,} rows); "
            f"expected {round(expected * rows):,} ({expected:,.1f} per row: {e.expected_source})"
        ),
        (
            f"cost: input ${e.cost.input_usd:,.4f} + output ${e.cost.output_expected_usd:,.4f} expected "
            f"= ${e.cost.total_expected_usd:,.4f}; at most ${e.cost.total_max_usd:,.4f}"
        ),
        (
            f"  at Batch API prices ({p.batch_discount:.0%} off): ${e.batch_cost.total_expected_usd:,.4f} "
            f"expected, at most ${e.batch_cost.total_max_usd:,.4f}"
        ),
        (
            f"  prices: {p.model} ${p.input_per_1m:g} in, ${p.output_per_1m:g} out per 1M tokens; "
            f"checked {p.checked}; {p.file}"
        ),
    ]
    if d.rows_per_min is None or d.reserve_tokens_per_row is None:
        lines.append("duration: nothing to send")
    else:
        lines += [
            f"duration: {_hours(d.duration_h)} at {d.rows_per_min:,.1f} rows/min ({d.binding} binds)",
            (
                f"  per {d.window_s:g} s window: {d.tokens_per_minute:,} TPM at {d.reserve_tokens_per_row:,.0f} "
                f"tokens reserved per row admits {d.rows_per_window_by_tokens:,} rows, "
                f"{d.requests_per_minute:,} RPM admits {d.rows_per_window_by_requests:,}"
            ),
        ]
    if d.concurrency_rows_per_min is not None:
        lines.append(
            f"  note: concurrency at the observed latency allows {d.concurrency_rows_per_min:,.0f} rows/min"
        )
    if d.window_h is not None:
        verdict = "fits" if d.fits_window else "does NOT fit"
        lines.append(f"window {_hours(d.window_h)}: {verdict} ({d.duration_h / d.window_h:.0%} of it)")
    for kind, n in sorted(t.failing.items()):
        shown = t.failing_ids.get(kind, ())[:PRINTED_IDS_PER_KIND]
        more = f" and {n - len(shown):,} more" if n > len(shown) else ""
        lines.append(f"would fail, {kind}: {n:,} ({', '.join(shown)}{more})")
    if o is not None:
        c = t.comparison
        estimated_usd, billed_usd = _compared_costs(e)
        pct = _difference_pct(estimated_usd, billed_usd)
        lines += [
            (
                f"observed {o.output}: {c.rows:,} rows compared; estimated prompt tokens differ from the billed "
                f"ones in {c.differing_rows:,}"
            ),
            f"  cost of those rows: ${estimated_usd:,.4f} estimated, ${billed_usd:,.4f} billed"
            + ("" if pct is None else f" ({pct:+.2f} %)"),
        ]
        if c.differing_ids:
            lines.append(f"  differing: {', '.join(c.differing_ids)}")
    return "\n".join(lines)


def _compared_costs(e: Estimate) -> tuple[float, float]:
    """Dollars of the compared rows: as estimated (expected completion per row), and as billed."""
    c = e.tally.comparison
    estimated = cost_usd(c.estimated_prompt_tokens, e.expected_completion_tokens * c.rows, e.price)
    return estimated, cost_usd(c.billed_prompt_tokens, c.billed_completion_tokens, e.price)


def _difference_pct(estimated_usd: float, billed_usd: float) -> float | None:
    return (estimated_usd - billed_usd) / billed_usd * 100 if billed_usd else None


def _hours(hours: float) -> str:
    if hours >= 1:
        return f"{hours:,.2f} h"
    return f"{hours * 60:,.1f} min" if hours * 60 >= 1 else f"{hours * 3600:,.1f} s"
