import random

import pytest
from multidict import CIMultiDict

from pipeline.client import (
    backoff_s,
    build_body,
    classify,
    endpoint_for,
    finish_reason_text,
    oversize_reason,
    parse_answer,
    retry_after_s,
)
from pipeline.config import EndpointConfig, LimitsConfig, RequestConfig
from pipeline.records import ImageTask, PreparedImage

NOW = 1_700_000_000.0


def headers(**values: str) -> CIMultiDict[str]:
    return CIMultiDict({k.replace("_", "-"): v for k, v in values.items()})


def test_azure_endpoint_puts_the_deployment_in_the_url_and_the_key_in_api_key():
    cfg = EndpointConfig(
        provider="azure", url="https://res.openai.azure.com/", deployment="vis", api_key_env="K"
    )

    endpoint = endpoint_for(cfg, "secret")

    assert endpoint.url == (
        "https://res.openai.azure.com/openai/deployments/vis/chat/completions?api-version=2024-02-15-preview"
    )
    assert endpoint.headers == {"api-key": "secret"}
    assert "secret" not in repr(endpoint)


def test_openai_endpoint_uses_bearer_and_sends_the_model():
    endpoint = endpoint_for(EndpointConfig(provider="openai", url="http://127.0.0.1:8000/v1"), "k")

    assert endpoint.url == "http://127.0.0.1:8000/v1/chat/completions"
    assert endpoint.headers == {"Authorization": "Bearer k"}
    assert endpoint.sends_model


def test_openai_compatible_server_without_a_key_gets_no_auth_header():
    assert endpoint_for(EndpointConfig(provider="openai", url="http://127.0.0.1:8000/v1"), None).headers == {}


def test_body_has_system_prompt_text_images_with_detail_and_max_tokens():
    task = ImageTask("a", ("a.jpg", "b.jpg"), "What is this?", "low", 1)
    images = [
        PreparedImage("data:image/jpeg;base64,AAAA", 1, 1),
        PreparedImage("https://x/b.jpg", None, None),
    ]

    body = build_body(task, images, RequestConfig(system_prompt="Sys", max_tokens=50), model=None)

    assert body["max_tokens"] == 50
    assert "model" not in body
    system, user = body["messages"]
    assert system == {"role": "system", "content": "Sys"}
    assert user["content"][0] == {"type": "text", "text": "What is this?"}
    assert [p["image_url"] for p in user["content"][1:]] == [
        {"url": "data:image/jpeg;base64,AAAA", "detail": "low"},
        {"url": "https://x/b.jpg", "detail": "low"},
    ]


@pytest.mark.parametrize(
    ("status", "body", "action"),
    [
        (200, {"choices": []}, "done"),
        (200, None, "retry"),  # not JSON: a proxy's error page
        (400, {"error": {"code": "content_filter"}}, "filtered"),
        (400, {"error": {"code": "BadRequest"}}, "fail"),
        (413, None, "fail"),
        (422, None, "fail"),
        (401, None, "abort"),
        (403, None, "abort"),
        (404, {"error": {"code": "DeploymentNotFound"}}, "abort"),
        (408, None, "retry"),
        (409, None, "retry"),
        (429, None, "retry"),
        (500, None, "retry"),
        (503, None, "retry"),
    ],
)
def test_classify_says_what_an_answer_means_for_the_row(status, body, action):
    assert classify(status, headers(), body, now=NOW).action == action


def test_retry_after_ms_wins_over_retry_after():
    assert retry_after_s(headers(retry_after_ms="1500", retry_after="9"), now=NOW) == 1.5


def test_retry_after_accepts_seconds_and_http_dates():
    assert retry_after_s(headers(retry_after="7"), now=NOW) == 7
    assert retry_after_s(headers(retry_after="Tue, 14 Nov 2023 22:13:30 GMT"), now=NOW) == pytest.approx(
        10, abs=1
    )


def test_openai_reset_headers_are_read_when_no_retry_after():
    reset = headers(x_ratelimit_reset_requests="20ms", x_ratelimit_reset_tokens="1m6s")

    assert retry_after_s(reset, now=NOW) == 66


def test_no_wait_header_means_none():
    assert retry_after_s(headers(retry_after="soon"), now=NOW) is None


def test_backoff_grows_exponentially_with_full_jitter_and_a_ceiling():
    cfg = LimitsConfig(backoff_initial_s=1, backoff_max_s=8)
    rng = random.Random(1)

    waits = [[backoff_s(attempt, cfg, rng) for _ in range(200)] for attempt in (1, 2, 3, 4, 5, 6)]

    assert [round(max(w)) for w in waits] == [1, 2, 4, 8, 8, 8]
    assert all(min(w) >= 0 for w in waits)


def test_finish_reason_in_object_form_is_normalised_to_a_string():
    assert finish_reason_text({"type": "stop", "stop": "<|fim_suffix|>"}) == "stop"
    assert finish_reason_text("length") == "length"


def test_parse_answer_reads_the_reference_response():
    body = {
        "id": "chatcmpl-1",
        "model": "gpt-4",
        "prompt_filter_results": [
            {"prompt_index": 0, "content_filter_results": {"hate": {"filtered": False, "severity": "safe"}}}
        ],
        "choices": [
            {
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": "A cat."},
                "content_filter_results": {"violence": {"filtered": False, "severity": "low"}},
            }
        ],
        "usage": {"prompt_tokens": 1156, "completion_tokens": 80, "total_tokens": 1236},
    }

    answer = parse_answer(body)

    assert (answer.description, answer.finish_reason, answer.response_id) == ("A cat.", "stop", "chatcmpl-1")
    assert answer.usage.total_tokens == 1236
    assert answer.prompt_filter.hate.severity == "safe"
    assert answer.completion_filter.violence.severity == "low"


def test_parse_answer_reads_the_filter_result_of_a_refused_prompt():
    body = {
        "error": {
            "code": "content_filter",
            "innererror": {"content_filter_result": {"sexual": {"filtered": True, "severity": "high"}}},
        }
    }

    answer = parse_answer(body)

    assert answer.finish_reason == "content_filter"
    assert answer.prompt_filter.sexual.filtered
    assert answer.prompt_filter.is_filtered


def test_a_request_is_refused_only_when_it_needs_more_than_the_whole_per_minute_budget():
    """The run's refusal and the estimate's count of it: one function, one text."""
    request, limits = RequestConfig(max_tokens=300), LimitsConfig(tokens_per_minute=1_000)

    at_budget = oversize_reason(700, request, limits)
    over = oversize_reason(701, request, limits)

    assert at_budget is None
    assert over == (
        "needs 1001 tokens (prompt 701 + max_tokens 300), more than limits.tokens_per_minute = 1000; not sent"
    )
