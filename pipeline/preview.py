"""What a run would send first, shown and not sent: ``vision-pipeline run --dry-run``.

The first manifest row that a run would send (committed ids skipped, rows that would fail before
sending passed over and counted), its images prepared (with images.fetch_remote, downloaded) and its
request planned by the run's own steps; shown are the body with every data URL shortened, the endpoint
URL, how the key would be sent (never the key), and the tokens the request would reserve. Nothing is sent and the output folder is neither created nor changed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any

from pipeline import checkpoint
from pipeline.captioner import prepare_images
from pipeline.client import endpoint_for
from pipeline.config import RunConfig
from pipeline.idset import IdSet
from pipeline.images import image_threads
from pipeline.manifest import Skipped, manifest_base_dir, read_manifest
from pipeline.records import ManifestError, RowError
from pipeline.refs import shorten_url
from pipeline.request import RequestPlan, plan_request
from pipeline.structured import load_structured

BATCH_ROWS = 256  # manifest rows read per thread hop
EMULATOR_URL = "(the in-process emulator, on a loopback port chosen when the run starts)"


@dataclass(frozen=True, slots=True)
class Preview:
    endpoint_url: str
    auth: str  # how the key travels, naming the variable it comes from; never the key
    row_id: str | None  # None: no row is left to send
    manifest_line: int | None
    body: Mapping[str, Any] | None  # data URLs shortened
    estimated_prompt_tokens: int | None
    reserve_tokens: (
        int | None
    )  # what the limiter books for it: prompt (http(s) images at their most) + max_tokens
    max_tokens: int
    tokens_per_minute: int
    rows_committed: int  # skipped: committed by an earlier run
    rows_failing: int  # rows before it that would be committed as errors without being sent
    first_failure: str | None


def shorten_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a chat body with every image URL shortened (data URLs lose their payload). Pure."""

    def shorten(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {
                k: shorten_url(v) if k == "url" and isinstance(v, str) else shorten(v)
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [shorten(item) for item in value]
        return value

    return shorten(body)  # type: ignore[no-any-return]


def describe_auth(cfg: RunConfig, environ: Mapping[str, str]) -> str:
    """How the request would authenticate, in words. Pure: reads only whether the variable is set."""
    ep = cfg.endpoint
    if ep.provider == "emulator" and not ep.api_key_env:
        return "api-key header: the emulator's own key"
    if not ep.api_key_env:
        return "no key (endpoint.api_key_env is empty)"
    header = "Authorization: Bearer" if ep.provider == "openai" else "api-key header"
    state = "set" if environ.get(ep.api_key_env, "").strip() else "NOT SET: the run would stop with exit 2"
    return f"{header}: the key in ${ep.api_key_env} ({state})"


async def preview_first_request(
    cfg: RunConfig,
    manifest: Path,
    output: Path,
    *,
    retry_failed: bool = False,
    environ: Mapping[str, str] | None = None,
) -> Preview:
    """Build, without sending, the first request a run of `manifest` into `output` would send.

    The row's images are prepared (and, with images.fetch_remote, downloaded) and its request planned
    by the run's own steps (``captioner.prepare_images``, ``request.plan_request``). Raises ConfigError
    when the manifest cannot be read.
    """
    environ = os.environ if environ is None else environ
    structured = load_structured(cfg)
    skip = await asyncio.to_thread(_skipped_ids, output, retry_failed)
    base_dir = manifest_base_dir(manifest)
    committed = failing = 0
    first_failure: str | None = None
    seen: set[str] = set()
    found: RequestPlan | None = None
    rows = read_manifest(manifest, cfg.request, skip, group_skipped=True)
    with ThreadPoolExecutor(image_threads(cfg.images), thread_name_prefix="preview-images") as pool:
        while found is None and (batch := await asyncio.to_thread(lambda: list(islice(rows, BATCH_ROWS)))):
            for item in batch:
                if isinstance(item, Skipped):
                    committed += item.rows
                    continue
                if item.row_id in seen:
                    continue  # a repeated id: the run ignores it too
                seen.add(item.row_id)
                try:
                    if isinstance(item, ManifestError):
                        raise item
                    images = await prepare_images(item, base_dir, cfg, pool)
                    plan = plan_request(item, images, cfg, structured)
                    if plan.refusal is not None:
                        raise plan.refusal
                except RowError as err:
                    failing, first_failure = failing + 1, first_failure or str(err)
                    continue
                found = plan
                break
    nothing = Preview(
        endpoint_url=EMULATOR_URL
        if cfg.endpoint.provider == "emulator"
        else endpoint_for(cfg.endpoint, None).url,
        auth=describe_auth(cfg, environ),
        row_id=None,
        manifest_line=None,
        body=None,
        estimated_prompt_tokens=None,
        reserve_tokens=None,
        max_tokens=cfg.request.max_tokens,
        tokens_per_minute=cfg.limits.tokens_per_minute,
        rows_committed=committed,
        rows_failing=failing,
        first_failure=first_failure,
    )
    if found is None:
        return nothing
    return replace(
        nothing,
        row_id=found.task.row_id,
        manifest_line=found.task.line,
        body=shorten_body(found.body),
        estimated_prompt_tokens=found.estimated_prompt_tokens,
        reserve_tokens=found.reserve_tokens,
    )


def _skipped_ids(output: Path, retry_failed: bool) -> IdSet:
    """The ids a run would skip: committed ones, less the failed ones with --retry-failed. Blocking."""
    skip = checkpoint.committed_ids(output) if output.is_dir() else IdSet()
    if retry_failed and len(skip):
        skip.difference_update(checkpoint.failed_ids(output))
    return skip


def preview_as_json(preview: Preview) -> dict[str, Any]:
    """The preview as the one JSON object `--dry-run` prints."""
    reserved = preview.reserve_tokens
    return {
        "dry_run": True,
        "sent": False,
        "endpoint": preview.endpoint_url,
        "auth": preview.auth,
        "row": None
        if preview.row_id is None
        else {"id": preview.row_id, "manifest_line": preview.manifest_line},
        "body": preview.body,
        "tokens": {
            "estimated_prompt": preview.estimated_prompt_tokens,
            "max_tokens": preview.max_tokens,
            "reserved": reserved,  # what the limiter books for this request
            "fits_tokens_per_minute": None if reserved is None else reserved <= preview.tokens_per_minute,
        },
        "rows_before_it": {
            "committed": preview.rows_committed,
            "would_fail_unsent": preview.rows_failing,
            "first_failure": preview.first_failure,
        },
        "note": _note(preview),
    }


def _note(preview: Preview) -> str:
    if preview.row_id is not None:
        return "nothing was sent"
    if preview.rows_failing:
        return "no row would be sent: every row not yet committed would fail before sending"
    return "no row is left to send: every row is committed"
