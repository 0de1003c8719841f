"""What the user reads of an estimate: ``estimate --json`` (its schema is documented here) and the text.

Pure. JSON (``estimate --json``), schema ``vision-pipeline/estimate/1``; keys are only ever added, an unknown
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
    cap             null | {max_cost_usd, fits_at_most, fits_expected, rows_within_at_most,
                     rows_within_expected}                  with a spend cap (limits.max_cost_usd, --max-cost)
    mode            "live" | "batch"                        endpoint.mode; batch: batch_cost is what is billed
    batch_duration_h  24                                    the Batch API's completion window: the most it takes
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

BATCH_WINDOW_H = 24  # the Batch API answers within its 24 h completion window (OpenAI and Azure Global Batch)

from pipeline.plan import Estimate
from pipeline.pricing import cost_usd
from pipeline.records import DETAILS

SCHEMA = "vision-pipeline/estimate/1"
PRINTED_IDS_PER_KIND = 10


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
        "cap": None if e.cap is None else asdict(e.cap),
        "mode": e.mode,
        "batch_duration_h": BATCH_WINDOW_H,
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
    if e.mode == "batch":
        lines.append(
            f"batch mode: billed at Batch API prices (${e.batch_cost.total_expected_usd:,.4f} expected); "
            f"duration up to {BATCH_WINDOW_H} h (the completion window); the live figures below are for comparison"
        )
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
    if (cap := e.cap) is not None:
        verdict = "fits" if cap.fits_at_most else "may fit" if cap.fits_expected else "does NOT fit"
        lines.append(
            f"spend cap ${cap.max_cost_usd:,.2f}: {verdict}; rows within it: {cap.rows_within_expected:,} "
            f"expected, {cap.rows_within_at_most:,} at the most each row can cost"
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
