import random

import pytest
from multidict import CIMultiDict

from pipeline.client import backoff_s, classify, endpoint_for, retry_after_s
from pipeline.config import EndpointConfig, LimitsConfig

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


def test_openai_endpoint_uses_bearer():
    endpoint = endpoint_for(EndpointConfig(provider="openai", url="http://127.0.0.1:8000/v1"), "k")

    assert endpoint.url == "http://127.0.0.1:8000/v1/chat/completions"
    assert endpoint.headers == {"Authorization": "Bearer k"}


def test_openai_compatible_server_without_a_key_gets_no_auth_header():
    assert endpoint_for(EndpointConfig(provider="openai", url="http://127.0.0.1:8000/v1"), None).headers == {}


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
