"""The request plan: the one body, the estimated and reserved tokens, and the refusals before sending."""

from __future__ import annotations

import pytest

from pipeline.config import config_from_mapping
from pipeline.records import ErrorKind, ImageTask, PreparedImage
from pipeline.request import MAX_IMAGES_PER_REQUEST, build_body, plan_request
from pipeline.tokens import max_image_tokens


def config(**sections):
    raw = {
        "endpoint": {
            "provider": "azure",
            "url": "https://r.openai.azure.com",
            "deployment": "d",
            "api_key_env": "K",
        }
    }
    return config_from_mapping({**raw, **sections}, source="t.toml")


def task(*images: str, prompt: str = "What is this?", detail: str = "high") -> ImageTask:
    return ImageTask("a", images, prompt, detail, 1)


def test_body_has_system_prompt_text_images_with_detail_and_max_tokens():
    images = [
        PreparedImage("data:image/jpeg;base64,AAAA", 1, 1),
        PreparedImage("https://x/b.jpg", None, None),
    ]
    cfg = config(request={"system_prompt": "Sys", "max_tokens": 50})

    body = build_body(task("a.jpg", "b.jpg", detail="low"), images, cfg)

    assert body["max_tokens"] == 50
    assert "model" not in body  # Azure names the deployment in the URL
    system, user = body["messages"]
    assert system == {"role": "system", "content": "Sys"}
    assert user["content"][0] == {"type": "text", "text": "What is this?"}
    assert [p["image_url"] for p in user["content"][1:]] == [
        {"url": "data:image/jpeg;base64,AAAA", "detail": "low"},
        {"url": "https://x/b.jpg", "detail": "low"},
    ]


def test_openai_routes_carry_the_model_in_the_body():
    cfg = config(endpoint={"provider": "openai", "url": "http://127.0.0.1:8000/v1", "model": "gpt-4o"})

    body = build_body(task("a.jpg"), [PreparedImage("https://x/a.jpg", None, None)], cfg)

    assert body["model"] == "gpt-4o"


def test_an_http_image_is_reserved_at_its_most_but_estimated_at_its_known_size():
    """The run never knows a URL's size; the estimate may (--probe-urls), and bills by it."""
    sized = PreparedImage("https://x/a.jpg", 512, 512)

    plan = plan_request(task("https://x/a.jpg"), [sized], config())

    most = max_image_tokens("high")
    assert plan.reserve_tokens - plan.estimated_prompt_tokens == most - 255 + 300  # 512² high: 85 + 170
    assert plan.is_sendable


def test_a_request_is_refused_only_when_it_needs_more_than_the_whole_per_minute_budget():
    image = [PreparedImage("data:image/png;base64,AAAA", 64, 64)]
    fits = plan_request(task("a.png"), image, config(request={"max_tokens": 300}))
    budget = fits.reserve_tokens

    at_budget = plan_request(
        task("a.png"), image, config(request={"max_tokens": 300}, limits={"tokens_per_minute": budget})
    )
    over = plan_request(
        task("a.png"), image, config(request={"max_tokens": 300}, limits={"tokens_per_minute": budget - 1})
    )

    assert at_budget.refusal is None
    assert over.refusal is not None and over.refusal.kind is ErrorKind.OVER_BUDGET
    assert (
        f"needs {budget} tokens" in over.refusal.reason and "limits.tokens_per_minute" in over.refusal.reason
    )


def test_more_images_than_the_service_takes_is_refused_and_ten_is_fine():
    def images(n: int) -> list[PreparedImage]:
        return [PreparedImage("data:image/png;base64,AAAA", 8, 8)] * n

    ten = plan_request(task(*["a.png"] * 10, detail="low"), images(10), config())
    eleven = plan_request(task(*["a.png"] * 11, detail="low"), images(11), config())

    assert ten.is_sendable
    assert eleven.refusal is not None and eleven.refusal.kind is ErrorKind.TOO_MANY_IMAGES
    assert f"at most {MAX_IMAGES_PER_REQUEST}" in eleven.refusal.reason


@pytest.mark.parametrize(("model", "refused"), [("gpt-4-turbo", True), ("gpt-4.1", False)])
def test_a_prompt_over_the_models_context_is_refused_without_a_tokenizer_error(model, refused):
    """A 1 MiB prompt is over gpt-4-turbo's 128k context but within gpt-4.1's million."""
    huge = "lorem ipsum " * (1024 * 1024 // 12)
    cfg = config(endpoint={"provider": "azure", "url": "https://r", "deployment": "d", "api_key_env": "K", "model": model},
                 limits={"tokens_per_minute": 100_000_000})  # fmt: skip

    plan = plan_request(task("a.png", prompt=huge), [PreparedImage("data:image/png;base64,AA", 8, 8)], cfg)

    assert plan.estimated_prompt_tokens > 170_000
    assert (plan.refusal is not None) is refused
    if refused:
        assert plan.refusal.kind is ErrorKind.OVER_CONTEXT and "128,000-token context" in plan.refusal.reason
