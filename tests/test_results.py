"""Answers into results: the response shapes the services send, and the error rows with their kinds."""

from __future__ import annotations

import json

from pipeline.config import config_from_mapping
from pipeline.records import ApiError, Delivery, ErrorKind, ImageTask
from pipeline.results import answered_result, failed_result, finish_reason_text, parse_answer

CFG = config_from_mapping({}, source="t.toml")
TASK = ImageTask("a", ("a.jpg",), "Describe", "low", 1)


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
    assert answer.extra is None  # nothing beyond what the columns hold


def test_a_refused_prompt_keeps_its_categories_in_the_live_spelling():
    body = {
        "error": {
            "code": "content_filter",
            "innererror": {"content_filter_result": {"sexual": {"filtered": True, "severity": "high"}}},
        }
    }

    answer = parse_answer(body)

    assert answer.finish_reason == "content_filter"
    assert answer.prompt_filter.sexual.filtered and answer.prompt_filter.is_filtered


def test_a_refused_prompt_keeps_its_categories_in_the_rest_spec_spelling():
    """The published REST spec spells it inner_error.content_filter_results."""
    body = {
        "error": {
            "code": "content_filter",
            "inner_error": {
                "code": "ResponsibleAIPolicyViolation",
                "content_filter_results": {
                    "violence": {"filtered": True, "severity": "medium"},
                    "hate": {"filtered": False, "severity": "safe"},
                },
            },
        }
    }

    answer = parse_answer(body)

    assert answer.prompt_filter.violence.filtered and answer.prompt_filter.violence.severity == "medium"
    assert answer.prompt_filter.hate.severity == "safe"


def test_what_no_column_models_is_kept_and_finish_details_fills_a_missing_finish_reason():
    enhancements = {"grounding": {"lines": [{"text": "EXIT", "polygon": [{"x": 0.1, "y": 0.2}]}]}}
    body = {
        "id": "c1",
        "system_fingerprint": "fp_9",
        "choices": [
            {
                "index": 0,
                "finish_details": {"type": "stop", "stop": "<|fim_suffix|>"},
                "message": {"role": "assistant", "content": "A sign."},
                "enhancements": enhancements,
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
    }

    answer = parse_answer(body)

    assert answer.finish_reason == "stop"
    extra = json.loads(answer.extra)
    assert extra["system_fingerprint"] == "fp_9"
    assert extra["choice"]["enhancements"] == enhancements
    assert extra["choice"]["finish_details"]["type"] == "stop"


def test_a_400_content_filter_answer_is_a_filtered_result_without_cost():
    body = {"error": {"code": "content_filter", "innererror": {"content_filter_result": {}}}}

    result = answered_result(TASK, Delivery(400, body, attempts=1), CFG, estimated=100, price=None)

    assert result.status == "filtered" and result.usage is None and result.cost_usd is None


def test_an_error_row_carries_its_kind_and_what_was_tried():
    err = ApiError("a", "HTTP 400: bad image", status=400, kind=ErrorKind.HTTP_4XX, attempts=1)

    result = failed_result(TASK, err, CFG, estimated=120)

    assert (result.status, result.error_kind, result.http_status, result.attempts) == (
        "error",
        "http_4xx",
        400,
        1,
    )
    assert result.error == "row 'a': HTTP 400: bad image"
