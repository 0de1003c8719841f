"""From an answer, or a failure, to the row that gets committed: the one place results are built.

Pure. Whatever transport carried the request (the live client, a batch file), its last answer arrives
as a ``Delivery`` (HTTP status and JSON body) and becomes a ``VisionResult`` here; a row that failed
becomes an error result carrying its ``ErrorKind``.

Response shapes read (reference, "Call the Chat Completion APIs", and Azure's REST spec):

- 200: ``choices[0].message.content``, ``finish_reason`` (a string, or an object ``{"type": ...}`` from
  some Azure deployments, which may instead send ``finish_details``), ``usage``,
  ``prompt_filter_results`` (``prompt_annotations`` in older versions) and the choice's
  ``content_filter_results``.
- 400 with ``error.code == "content_filter"``: the prompt was filtered. The service spells the inner
  object ``innererror.content_filter_result``; the published REST spec spells it
  ``inner_error.content_filter_results``. Both are read.

Whatever else the service adds (Azure's ``enhancements`` grounding and OCR, ``finish_details``,
``system_fingerprint``, ``logprobs``...) is kept, as JSON text in ``response_extra``: the user paid for it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.config import RunConfig
from pipeline.pricing import Price, usage_cost_usd
from pipeline.records import (
    FILTER_CATEGORIES,
    ApiError,
    CategoryFilter,
    Delivery,
    FilterResult,
    ImageTask,
    ManifestError,
    RowError,
    Status,
    Usage,
    VisionResult,
)
from pipeline.structured import Structured, column_values

# What the columns already hold; anything else in a response goes to response_extra.
_MODELLED_TOP = frozenset({"id", "object", "created", "model", "choices", "usage", "prompt_filter_results",
                           "prompt_annotations"})  # fmt: skip
_MODELLED_CHOICE = frozenset({"index", "message", "finish_reason", "content_filter_results"})
_MODELLED_MESSAGE = frozenset({"role", "content", "refusal"})


@dataclass(frozen=True, slots=True)
class Answer:
    """The useful part of a chat-completions response, or of a content-filter refusal."""

    description: str | None
    finish_reason: str | None
    response_id: str | None
    model: str | None
    usage: Usage | None
    prompt_filter: FilterResult | None
    completion_filter: FilterResult | None
    extra: str | None = None  # JSON of the fields no column models
    refusal: str | None = None  # structured outputs: the model declined, saying why


def parse_answer(body: Mapping[str, Any]) -> Answer:
    """Parse a 200 response (Azure or OpenAI shape) or a 400 content_filter refusal."""
    if isinstance(body.get("error"), Mapping):  # a prompt refused by the content filter
        return Answer(None, "content_filter", None, None, None, _refused_prompt_filter(body["error"]), None)
    choices = body.get("choices") or [{}]
    choice: Mapping[str, Any] = choices[0] if isinstance(choices[0], Mapping) else {}
    message: Mapping[str, Any] = choice["message"] if isinstance(choice.get("message"), Mapping) else {}
    prompt_results = body.get("prompt_filter_results") or body.get("prompt_annotations") or []
    finish = choice.get("finish_reason")
    if finish is None and isinstance(choice.get("finish_details"), Mapping):
        finish = choice["finish_details"]  # older Azure vision deployments: {"type": "stop"}
    return Answer(
        description=message.get("content"),
        finish_reason=finish_reason_text(finish),
        response_id=body.get("id"),
        model=body.get("model"),
        usage=parse_usage(body),
        prompt_filter=parse_filter(prompt_results[0].get("content_filter_results"))
        if prompt_results
        else None,
        completion_filter=parse_filter(choice.get("content_filter_results")),
        extra=_extra_json(body, choice, message),
        refusal=message.get("refusal") or None,
    )


def parse_usage(body: Mapping[str, Any]) -> Usage | None:
    """The bill of a response, or None when it carries none."""
    usage = body.get("usage")
    if not isinstance(usage, Mapping):
        return None
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    return Usage(prompt, completion, int(usage.get("total_tokens") or prompt + completion))


def finish_reason_text(value: object) -> str | None:
    """finish_reason as a string: some Azure deployments send it as an object {"type": "stop", ...}."""
    if isinstance(value, Mapping):
        value = value.get("type")
    return None if value is None else str(value)


def parse_filter(results: object) -> FilterResult | None:
    """Content-filter annotations (hate, self_harm, sexual, violence) into a typed record."""
    if not isinstance(results, Mapping):
        return None
    categories = {}
    for name in FILTER_CATEGORIES:
        entry = results.get(name)
        if isinstance(entry, Mapping):
            categories[name] = CategoryFilter(bool(entry.get("filtered", False)), entry.get("severity"))
    return FilterResult(**categories)


def _refused_prompt_filter(error: Mapping[str, Any]) -> FilterResult | None:
    for inner_key, results_key in (
        ("innererror", "content_filter_result"),
        ("inner_error", "content_filter_results"),
    ):
        inner = error.get(inner_key)
        if isinstance(inner, Mapping) and (found := parse_filter(inner.get(results_key))) is not None:
            return found
    return None


def _extra_json(body: Mapping[str, Any], choice: Mapping[str, Any], message: Mapping[str, Any]) -> str | None:
    extra: dict[str, Any] = {key: value for key, value in body.items() if key not in _MODELLED_TOP}
    if more := {key: value for key, value in choice.items() if key not in _MODELLED_CHOICE}:
        extra["choice"] = more
    if more := {key: value for key, value in message.items() if key not in _MODELLED_MESSAGE}:
        extra["message"] = more
    if isinstance(body.get("choices"), list) and len(body["choices"]) > 1:
        extra["choices"] = body["choices"][1:]  # n > 1 is not asked for, but nothing paid for is dropped
    return json.dumps(extra, ensure_ascii=False, separators=(",", ":"), sort_keys=True) if extra else None


# ---- the result builders ---------------------------------------------------------------------------------


def answered_result(
    task: ImageTask,
    delivery: Delivery,
    cfg: RunConfig,
    estimated: int,
    price: Price | None,
    structured: Structured | None = None,
) -> VisionResult:
    """The result of a row the service answered: ok, or filtered (its prompt or its completion); with a
    structured format also refused (the model declined) or invalid_output (not JSON, not valid against
    the schema, or cut at max_tokens), the raw text kept either way. None of these is retried: each
    retry would be paid for."""
    answer = parse_answer(delivery.body)
    is_filtered = delivery.http_status == 400 or answer.finish_reason == "content_filter"
    status: Status = "filtered" if is_filtered else "ok"
    description, error, fields = answer.description, None, None
    if structured is not None and not is_filtered:
        if answer.refusal is not None:
            status, description = "refused", answer.refusal
        else:
            problem, value = structured.problem(answer.description, answer.finish_reason)
            if problem:
                status, error = (
                    "invalid_output",
                    f"row {task.row_id!r}: {structured.response_format}: {problem}",
                )
            elif value is not None:
                fields = column_values(structured, value)
    return VisionResult(
        task=task,
        status=status,
        model=answer.model or cfg.endpoint.model,
        estimated_prompt_tokens=estimated,
        description=description,
        finish_reason=answer.finish_reason,
        response_id=answer.response_id,
        usage=answer.usage,
        cost_usd=usage_cost_usd(answer.usage, price) if answer.usage and price else None,
        prompt_filter=answer.prompt_filter,
        completion_filter=answer.completion_filter,
        attempts=delivery.attempts,
        http_status=delivery.http_status,
        endpoint=delivery.endpoint,
        error=error,
        response_extra=answer.extra,
        fields=fields,
    )


def failed_result(
    task: ImageTask, err: RowError, cfg: RunConfig, estimated: int | None = None
) -> VisionResult:
    """The error row of a task that failed with `err`: its kind, its one-line reason, what was tried."""
    return VisionResult(
        task=task,
        status="error",
        model=cfg.endpoint.model,
        estimated_prompt_tokens=estimated,
        attempts=err.attempts if isinstance(err, ApiError) else 0,
        http_status=err.status if isinstance(err, ApiError) else None,
        endpoint=err.endpoint if isinstance(err, ApiError) else None,
        error=str(err),
        error_kind=err.kind,
    )


def manifest_failure(err: ManifestError, cfg: RunConfig) -> VisionResult:
    """The error row of a manifest row that could not be read into a task."""
    task = ImageTask(row_id=err.row_id, images=(), prompt="", detail=cfg.request.detail, line=err.line)
    return failed_result(task, err, cfg)
