"""``vision-pipeline report OUTPUT``: one self-contained HTML page about an output.

The page holds the output's figures and its last run's ``_stats.json``, the failed rows with their
reasons, content-filter hits by category and severity, histograms of latency and tokens (inline SVG),
and a sample of descriptions beside thumbnails of their images (small JPEG data URIs made from the local
images). Its CSS is inline, it has no script, and its Content-Security-Policy forbids every fetch: it
opens the same from a mail attachment, a CI artifact or an air-gapped laptop.

``collect`` does the reading; ``histogram``, ``filter_hits`` and ``render_html`` are pure.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageOps

from pipeline.exits import EXIT_MEANINGS
from pipeline.records import FILTER_CATEGORIES
from pipeline.sink import RUN_FILE, read_output
from pipeline.sniff import register_formats
from pipeline.status import STATUS_COLUMNS, OutputStatus, read_status

REPORT_FILE = "_report.html"  # "_": dataset readers skip it, as they skip _run.json
HISTOGRAM_BINS = 20
SAMPLE_ROWS = 24
THUMBNAIL_PX = 160
THUMBNAIL_JPEG_QUALITY = 70
MAX_FAILED_SHOWN = 500
SEVERITIES = ("safe", "low", "medium", "high")
REPORT_COLUMNS = (*STATUS_COLUMNS, "latency_s", "prompt_filter", "completion_filter")


@dataclass(frozen=True, slots=True)
class Bin:
    low: float
    high: float
    count: int


@dataclass(frozen=True, slots=True)
class Histogram:
    title: str
    unit: str
    bins: tuple[Bin, ...]


@dataclass(frozen=True, slots=True)
class FilterHits:
    """One content-filter category's annotations on prompts or completions."""

    where: str  # prompt | completion
    category: str
    filtered: int  # rows the filter acted on
    severities: Mapping[str, int]  # rows by severity (safe, low, medium, high, and any other value sent)


@dataclass(frozen=True, slots=True)
class Sample:
    row_id: str
    image: str | None  # the reference as the manifest gave it (data URLs shortened)
    description: str
    thumbnail: str | None  # a data:image/jpeg URI
    missing: str | None  # why there is no thumbnail


@dataclass(frozen=True, slots=True)
class ReportData:
    status: OutputStatus
    manifest: str | None
    generated_at: str  # ISO 8601, UTC
    histograms: tuple[Histogram, ...]
    filters: tuple[FilterHits, ...]
    samples: tuple[Sample, ...]


def histogram(values: pa.Array | pa.ChunkedArray, bins: int = HISTOGRAM_BINS) -> tuple[Bin, ...]:
    """Equal-width bins from the smallest to the largest value (nulls dropped); the last bin is closed. Pure."""
    numbers = pc.drop_null(values).cast(pa.float64())
    if len(numbers) == 0:
        return ()
    low, high = (v.as_py() for v in pc.min_max(numbers).values())
    if high == low:
        return (Bin(low, high, len(numbers)),)
    width = (high - low) / bins
    index = pc.min_element_wise(pc.floor(pc.divide(pc.subtract(numbers, low), width)), bins - 1).cast(
        pa.int64()
    )
    counts = {row["values"]: row["counts"] for row in pc.value_counts(index).to_pylist()}
    return tuple(Bin(low + i * width, low + (i + 1) * width, counts.get(i, 0)) for i in range(bins))


def filter_hits(table: pa.Table) -> tuple[FilterHits, ...]:
    """Filter annotations by where, category and severity; categories no row mentions are left out. Pure."""
    hits = []
    for where in ("prompt", "completion"):
        column = table.column(f"{where}_filter")
        for category in FILTER_CATEGORIES:
            entry = pc.struct_field(column, category)
            severities = {
                row["values"]: row["counts"]
                for row in pc.value_counts(pc.struct_field(entry, "severity")).to_pylist()
                if row["values"] is not None
            }
            filtered = int(pc.sum(pc.struct_field(entry, "filtered")).as_py() or 0)
            if severities or filtered:
                hits.append(FilterHits(where, category, filtered, severities))
    return tuple(hits)


def sample_ids(ok_ids: Sequence[str], n: int = SAMPLE_ROWS) -> list[str]:
    """Up to `n` ids spread evenly over the sorted ids: the same page for the same output. Pure."""
    ordered = sorted(ok_ids)
    if len(ordered) <= n:
        return ordered
    return [ordered[i * len(ordered) // n] for i in range(n)]


def thumbnail(ref: str | None, base_dir: Path | None) -> tuple[str | None, str | None]:
    """A small JPEG data URI of a local or data: image, or None and the reason. Blocking: decodes."""
    if not ref:
        return None, "no image"
    if "://" in ref and ref[:5].lower() != "data:":
        return None, "remote image (the report fetches nothing)"
    if ref[:5].lower() == "data:" and ref.endswith(">"):  # "data:image/png;base64,<12 kB>"
        return None, "inline image (the output keeps its type and size, not its bytes)"
    if ref[:5].lower() != "data:" and not Path(ref).is_absolute() and base_dir is None:
        return None, "manifest folder unknown"
    try:
        if ref[:5].lower() == "data:":
            source: Path | io.BytesIO = io.BytesIO(base64.b64decode(ref.partition(",")[2]))
        else:
            source = Path(ref) if Path(ref).is_absolute() or base_dir is None else base_dir / ref
        register_formats()  # a HEIC photo's thumbnail needs the HEIF plugin registered
        with Image.open(source) as opened:
            im: Image.Image = opened
            im.draft("RGB", (2 * THUMBNAIL_PX, 2 * THUMBNAIL_PX))  # a JPEG decodes at 1/2…1/8 scale: fast
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            buffer = io.BytesIO()
            im.save(buffer, format="JPEG", quality=THUMBNAIL_JPEG_QUALITY)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        return None, f"image not readable here: {type(err).__name__}"
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), None


def collect(output: Path, now: float) -> ReportData:
    """Read everything the page shows from `output`. Blocking. Raises ConfigError when it is not an output."""
    status = read_status(output)
    table = read_output(output, REPORT_COLUMNS)
    manifest = _manifest_path(output)
    base_dir = None if manifest is None else (manifest if manifest.is_dir() else manifest.parent)
    ok = table.filter(pc.equal(table.column("status"), "ok"))
    chosen = sample_ids(ok.column("id").to_pylist())
    rows = read_output(
        output, ["id", "image", "description"], row_filter=pc.field("id").isin(chosen)
    ).to_pylist()
    samples = []
    for row in sorted(rows, key=lambda r: r["id"]):
        thumb, missing = thumbnail(row["image"], base_dir)
        image = row["image"] if not (row["image"] or "").lower().startswith("data:") else "data: URL"
        samples.append(Sample(row["id"], image, row["description"] or "", thumb, missing))
    total_tokens = pc.add(table.column("prompt_tokens"), table.column("completion_tokens"))
    histograms = (
        Histogram("Latency per row", "s", histogram(table.column("latency_s"))),
        Histogram("Prompt tokens per row", "tokens", histogram(table.column("prompt_tokens"))),
        Histogram("Completion tokens per row", "tokens", histogram(table.column("completion_tokens"))),
        Histogram("Total tokens per row", "tokens", histogram(total_tokens)),
    )
    generated = datetime.datetime.fromtimestamp(now, tz=datetime.UTC).isoformat(timespec="seconds")
    return ReportData(
        status,
        None if manifest is None else str(manifest),
        generated,
        histograms,
        filter_hits(table),
        tuple(samples),
    )


def _manifest_path(output: Path) -> Path | None:
    try:
        identity = json.loads((output / RUN_FILE).read_text(encoding="utf-8"))
        return Path(identity["manifest"]["path"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_report(output: Path, dest: Path | None = None, now: float | None = None) -> Path:
    """Write the report of `output` to `dest` (default ``OUTPUT/_report.html``), atomically. Blocking."""
    dest = dest or output / REPORT_FILE
    page = render_html(collect(output, time.time() if now is None else now))
    temp = dest.with_name(f".{dest.name}.tmp")
    temp.write_text(page, encoding="utf-8")
    os.replace(temp, dest)
    return dest


# ---- rendering: values in, HTML text out -------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;max-width:1100px;color:#1d2328;padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #d5dade;padding-bottom:.2rem}
.meta{color:#5b6670}table{border-collapse:collapse;margin:.5rem 0}td,th{padding:.25rem .7rem;border-bottom:1px solid #e6e9ec;text-align:left;vertical-align:top}
th{background:#f4f6f8;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:.7rem}.card{border:1px solid #d5dade;border-radius:6px;padding:.5rem .9rem;min-width:8rem}
.card .v{font-size:1.35rem;font-weight:600}.card .k{color:#5b6670;font-size:.85rem}
.ok{color:#1e7b34}.error{color:#b3261e}.filtered{color:#8a5a00}
.hist{display:inline-block;margin:0 1.5rem 1rem 0}svg text{font-size:10px;fill:#5b6670}svg rect{fill:#4a7fb0}
.samples{display:grid;grid-template-columns:repeat(auto-fill,minmax(320px,1fr));gap:1rem}
figure{margin:0;display:flex;gap:.7rem;border:1px solid #e6e9ec;border-radius:6px;padding:.5rem}
figure img{width:auto;height:auto;max-width:160px;max-height:160px;flex:none;border-radius:4px}
.noimg{width:160px;height:100px;flex:none;background:#f4f6f8;color:#5b6670;font-size:.8rem;display:flex;align-items:center;justify-content:center;text-align:center}
figcaption .id{font-weight:600}.err{font-family:ui-monospace,monospace;font-size:.85rem;word-break:break-word}
"""


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _figure(key: str, value: object, element_id: str, css: str = "") -> str:
    return f'<div class="card"><div class="v {css}" id="{element_id}">{_e(value)}</div><div class="k">{_e(key)}</div></div>'


def _money(value: float | None) -> str:
    return "unknown" if value is None else f"${value:,.4f}"


def _summary(status: OutputStatus) -> str:
    counts = status.by_status
    cards = [
        _figure("rows", f"{status.rows:,}", "rows-total"),
        _figure("ok", f"{counts['ok']:,}", "rows-ok", "ok"),
        _figure("filtered", f"{counts['filtered']:,}", "rows-filtered", "filtered"),
        _figure("error", f"{counts['error']:,}", "rows-error", "error"),
        *(
            _figure(name.replace("_", " "), f"{counts[name]:,}", f"rows-{name}", "error")
            for name in ("refused", "invalid_output")
            if counts.get(name)
        ),
        _figure("prompt tokens", f"{status.prompt_tokens:,}", "prompt-tokens"),
        _figure("completion tokens", f"{status.completion_tokens:,}", "completion-tokens"),
        _figure("cost", _money(status.cost_usd), "cost-usd"),
    ]
    return f'<section id="summary"><h2>Output</h2><div class="cards">{"".join(cards)}</div></section>'


def _last_run(run: Mapping[str, Any] | None) -> str:
    if not run:
        return '<section id="last-run"><h2>Last run</h2><p>No <code>_stats.json</code>: no run has finished here.</p></section>'
    exit_code = int(run.get("exit_code", -1))
    percentiles = run.get("latency_percentiles_s") or {}
    causes = run.get("retries_by_cause") or {}
    rows: list[tuple[str, str, str]] = [
        ("run", "run-id", str(run.get("run_id"))),
        ("exit code", "exit-code", f"{exit_code} ({EXIT_MEANINGS.get(exit_code, 'unknown')})"),
        ("rows this run", "run-rows", f"{run.get('rows', 0):,}"),
        ("already done before it", "run-skipped", f"{run.get('skipped', 0):,}"),
        ("duration", "run-duration", f"{run.get('duration_s', 0):,.1f} s"),
        ("rows/s", "run-rows-per-s", f"{run.get('rows_per_s', 0):,.2f}"),
        ("tokens", "run-tokens", f"{run.get('prompt_tokens', 0):,} prompt + {run.get('completion_tokens', 0):,} completion"),
        ("cost", "run-cost", _money(run.get("cost_usd"))),
        ("retries", "run-retries", f"{run.get('retries', 0):,}" + (
            " (" + ", ".join(f"{k} {v:,}" for k, v in causes.items()) + ")" if causes else "")),
        ("429 answers", "run-429s", f"{run.get('http_429s', 0):,}"),
        ("pauses on 429", "run-pauses", f"{run.get('pauses', 0):,}, {run.get('paused_s', 0):,.1f} s in all"),
        ("latency p50 / p90 / p99", "run-latency",
         " / ".join(f"{percentiles[p]:.3f} s" for p in ("p50", "p90", "p99") if p in percentiles) or "—"),
    ]  # fmt: skip
    if run.get("stopped_because"):
        rows.append(("stopped early", "run-stopped", str(run["stopped_because"])))
    body = "".join(f'<tr><th>{_e(k)}</th><td id="{i}">{_e(v)}</td></tr>' for k, i, v in rows)
    return f'<section id="last-run"><h2>Last run</h2><table>{body}</table></section>'


def _endpoints(run: Mapping[str, Any] | None) -> str:
    """The last run's endpoints (``_stats.json`` ``endpoints``): requests, tokens/min against quota, 429s, holds."""
    endpoints = (run or {}).get("endpoints") or {}
    if not endpoints:
        return ""
    head = "".join(
        f"<th>{h}</th>" for h in ("endpoint", "requests", "tokens/min", "quota", "429s", "held", "out")
    )
    rows = "".join(
        f'<tr id="endpoint-{_e(name)}"><td>{_e(name)}</td><td>{int(e.get("requests", 0)):,}</td>'
        f"<td>{float(e.get('tokens_per_min', 0)):,.0f}</td><td>{int(e.get('tokens_per_minute_quota', 0)):,}</td>"
        f"<td>{int(e.get('http_429s', 0)):,}</td><td>{float(e.get('held_s', 0)):,.1f} s</td>"
        f"<td>{_e(e.get('out_because') or '—')}</td></tr>"
        for name, e in endpoints.items()
    )
    return (
        '<section id="endpoints"><h2>Endpoints</h2><p>What each endpoint of the last run served, against '
        f"its quota.</p><table><tr>{head}</tr>{rows}</table></section>"
    )


def _failed(status: OutputStatus) -> str:
    if not status.failed_total:
        return '<section id="failed"><h2>Failed rows</h2><p id="failed-count">0 failed rows.</p></section>'
    shown = status.failed[:MAX_FAILED_SHOWN]
    rows = "".join(f'<tr><td>{_e(r.row_id)}</td><td class="err">{_e(r.error)}</td></tr>' for r in shown)
    more = status.failed_total - len(shown)
    tail = (
        f"<p>… and {more:,} more: <code>vision-pipeline status --json</code> lists them.</p>" if more else ""
    )
    return (
        f'<section id="failed"><h2>Failed rows</h2><p id="failed-count">{status.failed_total:,} failed rows; '
        f"<code>run --retry-failed</code> sends them again.</p>"
        f"<table><tr><th>id</th><th>reason</th></tr>{rows}</table>{tail}</section>"
    )


def _filters(hits: Sequence[FilterHits]) -> str:
    if not hits:
        return '<section id="filters"><h2>Content filter</h2><p>No filter annotations in this output.</p></section>'
    others = sorted({s for h in hits for s in h.severities} - set(SEVERITIES))
    columns = [*SEVERITIES, *others]
    head = "".join(f"<th>{_e(c)}</th>" for c in ["on", "category", "filtered", *columns])
    rows = "".join(
        f"<tr><td>{_e(h.where)}</td><td>{_e(h.category)}</td>"
        f'<td class="n" id="filter-{_e(h.where)}-{_e(h.category)}">{h.filtered:,}</td>'
        + "".join(f'<td class="n">{h.severities.get(c, 0):,}</td>' for c in columns)
        + "</tr>"
        for h in hits
    )
    return (
        '<section id="filters"><h2>Content filter</h2><p>Rows by category and severity, and how many the filter '
        f"acted on.</p><table><tr>{head}</tr>{rows}</table></section>"
    )


def _number(value: float, unit: str) -> str:
    return f"{value:,.0f}" if unit == "tokens" else f"{value:.3g}"


def _svg_histogram(h: Histogram) -> str:
    width, height, pad_x, pad_y = 360, 150, 34, 22
    if not h.bins:
        return f'<div class="hist"><h3>{_e(h.title)}</h3><p>No values.</p></div>'
    top = max(b.count for b in h.bins) or 1
    bar_w = (width - pad_x) / len(h.bins)
    bars = []
    for i, b in enumerate(h.bins):
        bar_h = (height - pad_y) * b.count / top
        x, y = pad_x + i * bar_w, height - pad_y - bar_h
        tip = f"{_number(b.low, h.unit)}–{_number(b.high, h.unit)} {h.unit}: {b.count:,} rows"
        bars.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(bar_w - 1, 1):.1f}" height="{bar_h:.1f}"><title>{_e(tip)}</title></rect>'
        )
    low, high = h.bins[0].low, h.bins[-1].high
    labels = (
        f'<text x="{pad_x}" y="{height - 6}">{_e(_number(low, h.unit))}</text>'
        f'<text x="{width}" y="{height - 6}" text-anchor="end">{_e(_number(high, h.unit))} {_e(h.unit)}</text>'
        f'<text x="{pad_x - 4}" y="10" text-anchor="end">{top:,}</text>'
        f'<text x="{pad_x - 4}" y="{height - pad_y}" text-anchor="end">0</text>'
    )
    total = sum(b.count for b in h.bins)
    svg = (
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{_e(h.title)}: {total:,} rows">{"".join(bars)}{labels}</svg>'
    )
    return f'<div class="hist"><h3>{_e(h.title)}</h3>{svg}</div>'


def _samples(samples: Sequence[Sample]) -> str:
    if not samples:
        return '<section id="samples"><h2>Sample descriptions</h2><p>No ok rows yet.</p></section>'
    figures = []
    for s in samples:
        picture = (
            f'<img src="{s.thumbnail}" alt="{_e(s.image)}">'
            if s.thumbnail
            else f'<div class="noimg">{_e(s.missing)}</div>'
        )
        figures.append(
            f'<figure>{picture}<figcaption><div class="id">{_e(s.row_id)}</div>'
            f'<div class="meta">{_e(s.image)}</div><div>{_e(s.description)}</div></figcaption></figure>'
        )
    return (
        f'<section id="samples"><h2>Sample descriptions</h2><p>{len(samples)} ok rows spread over the output.</p>'
        f'<div class="samples">{"".join(figures)}</div></section>'
    )


def render_html(data: ReportData) -> str:
    """The whole page. Pure: every text is escaped; the only URLs are data: thumbnails."""
    status = data.status
    histograms = "".join(_svg_histogram(h) for h in data.histograms)
    manifest = f" · manifest {_e(data.manifest)}" if data.manifest else ""
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        # nothing may be fetched and nothing may run: the page is complete as it is
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>vision-pipeline report: {_e(status.output)}</title><style>{_CSS}</style></head><body>"
        f'<h1>vision-pipeline report</h1><p class="meta">{_e(status.output)}{manifest} · generated '
        f"{_e(data.generated_at)} · last row finished {_e(status.last_finished_at or 'never')}</p>"
        f"{_summary(status)}{_last_run(status.last_run)}{_endpoints(status.last_run)}{_failed(status)}"
        f"{_filters(data.filters)}"
        f'<section id="histograms"><h2>Latency and tokens</h2>{histograms}</section>'
        f"{_samples(data.samples)}</body></html>\n"
    )
