"""The request plan: one row's exact request, what it reserves, and why it may not be sent.

Pure: values in, values out. ``run`` (through the captioner), ``run --dry-run`` and ``estimate`` build
every request here, so the body, the estimated prompt tokens and the refusals of the three agree.

A plan is made from an ``ImageTask`` and its prepared images. The run and the dry run prepare them (data
URLs of exactly the pixels the service views); the estimate passes the sizes it read from headers with
a placeholder URL, since an image's URL costs no tokens, only its size does.

Refusals, checked in this order, each a ``RowError`` of its own kind, found before anything is sent:

- ``too_many_images``: more images than the service takes in one request;
- ``over_context``: the prompt and ``max_tokens`` together exceed the model's context;
- ``over_budget``: the reservation (prompt + ``max_tokens``) is more than the minute's token budget (of
  the largest endpoint of a pool), so no limiter could ever admit it.

What the limiter reserves differs from what the service bills in one case only: an http(s) image sent
as a URL is reserved at the most an image of its detail can cost, since the run never knows its size
(the estimate may, from ``--probe-urls``); the bill uses the size when it is known.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pipeline.config import RunConfig
from pipeline.records import ErrorKind, ImageTask, PreparedImage, RowError
from pipeline.structured import Structured
from pipeline.tokens import count_prompt_tokens, model_family

MAX_IMAGES_PER_REQUEST = 10  # reference: "a limit of 10 images per chat request"
_REMOTE_PREFIXES = ("http://", "https://")


@dataclass(frozen=True, slots=True)
class RequestPlan:
    """One row's request as it would go on the wire, and what it costs the quota.

    `body` holds the images' data URLs whole: never log it (``preview.shorten_body`` shortens it).
    """

    task: ImageTask
    body: Mapping[str, Any]
    estimated_prompt_tokens: int  # as the service bills them: what the cost is counted from
    reserve_tokens: int  # what the limiter books: prompt tokens as reserved + max_tokens
    refusal: RowError | None = None  # why the row must not be sent; None when it may

    @property
    def is_sendable(self) -> bool:
        return self.refusal is None


def sends_model_in_body(provider: str) -> bool:
    """Whether the route takes the model in the body (OpenAI style) rather than in the URL (Azure)."""
    return provider == "openai"


def body_for_endpoint(body: Mapping[str, Any], model_in_body: str | None) -> Mapping[str, Any]:
    """`body` as one endpoint of a pool takes it: with `model_in_body` for an OpenAI-style route, without a
    model for Azure (its URL names the deployment). The same mapping when nothing changes. Pure."""
    if model_in_body is None:
        return body if "model" not in body else {k: v for k, v in body.items() if k != "model"}
    return body if body.get("model") == model_in_body else {**body, "model": model_in_body}


def build_body(
    task: ImageTask, images: Sequence[PreparedImage], cfg: RunConfig, structured: Structured | None = None
) -> dict[str, Any]:
    """The chat-completions body for one row: system prompt, the row's prompt, its images, max_tokens,
    and the answer's format when it is structured.

    The model goes into the body for OpenAI-style routes only; Azure names the deployment in the URL.
    """
    request = cfg.request
    content: list[dict[str, Any]] = [{"type": "text", "text": task.prompt}]
    content += [
        {"type": "image_url", "image_url": {"url": image.url, "detail": task.detail}} for image in images
    ]
    messages: list[dict[str, Any]] = []
    if request.system_prompt:
        messages.append({"role": "system", "content": request.system_prompt})
    messages.append({"role": "user", "content": content})
    # the reference: "Remember to set a max_tokens value, or the return output will be cut off"
    body: dict[str, Any] = {
        "messages": messages,
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
    }
    if structured is not None:
        body["response_format"] = structured.body_format()
    if sends_model_in_body(cfg.endpoint.provider):
        body["model"] = cfg.endpoint.model
    return body


def plan_request(
    task: ImageTask, images: Sequence[PreparedImage], cfg: RunConfig, structured: Structured | None = None
) -> RequestPlan:
    """The exact request for `task` with its prepared `images`, its token counts, and any refusal.

    A structured format's schema is not counted in the prompt: no source says whether or how the service
    bills it (README, "Structured captions")."""
    body = build_body(task, images, cfg, structured)
    messages, model, max_tokens = body["messages"], cfg.endpoint.model, cfg.request.max_tokens
    billed_sizes = [_size(image) for image in images]
    estimated = count_prompt_tokens(messages, billed_sizes, model)
    reserved = estimated
    if any(size is not None and _is_remote(image) for image, size in zip(images, billed_sizes, strict=True)):
        reserved = count_prompt_tokens(messages, [None if _is_remote(i) else _size(i) for i in images], model)
    plan = RequestPlan(task, body, estimated, reserved + max_tokens)
    refusal = refusal_of(plan, cfg)
    return plan if refusal is None else replace(plan, refusal=refusal)  # replace is slow: not per row


def refusal_of(plan: RequestPlan, cfg: RunConfig) -> RowError | None:
    """Why `plan` must not be sent (the first reason found), or None. Pure."""
    row_id, max_tokens = plan.task.row_id, cfg.request.max_tokens
    if (n := len(plan.task.images)) > MAX_IMAGES_PER_REQUEST:
        reason = f"{n} images: the service takes at most {MAX_IMAGES_PER_REQUEST} per request; not sent"
        return RowError(row_id, reason, kind=ErrorKind.TOO_MANY_IMAGES)
    context = model_family(cfg.endpoint.model).context_tokens
    if plan.estimated_prompt_tokens + max_tokens > context:
        reason = (
            f"prompt of {plan.estimated_prompt_tokens:,} tokens + max_tokens {max_tokens:,} is more than "
            f"the {context:,}-token context of {cfg.endpoint.model}; not sent"
        )
        return RowError(row_id, reason, kind=ErrorKind.OVER_CONTEXT)
    tokens_per_minute = cfg.largest_tokens_per_minute  # a request must fit one endpoint's minute
    if plan.reserve_tokens > tokens_per_minute:
        prompt = plan.reserve_tokens - max_tokens
        setting = (
            "endpoints[].tokens_per_minute (the largest)" if cfg.endpoints else "limits.tokens_per_minute"
        )
        reason = (
            f"needs {plan.reserve_tokens} tokens (prompt {prompt} + max_tokens {max_tokens}), more "
            f"than {setting} = {tokens_per_minute}; not sent"
        )
        return RowError(row_id, reason, kind=ErrorKind.OVER_BUDGET)
    return None


def _size(image: PreparedImage) -> tuple[int, int] | None:
    return (image.width, image.height) if image.width and image.height else None


def _is_remote(image: PreparedImage) -> bool:
    return image.url[:8].lower().startswith(_REMOTE_PREFIXES)
