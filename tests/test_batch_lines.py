"""Batch input files: custom_ids, lines, and packing under the byte, line and token limits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.batch.ledger import Ledger
from pipeline.batch.lines import CUSTOM_ID_MAX_CHARS, PackedRow, Packer, batch_line, custom_id_for, line_url
from pipeline.config import BatchConfig, EndpointConfig, is_batch_api_version
from pipeline.records import ImageTask


def row(row_id: str, tokens: int = 100) -> PackedRow:
    return PackedRow(custom_id_for(row_id), ImageTask(row_id, ("a.png",), "Describe.", "low", 1), tokens)


def line_of(size: int, row_id: str) -> bytes:
    return json.dumps({"custom_id": row_id, "pad": "x" * size}).encode() + b"\n"


@pytest.mark.parametrize(
    ("row_id", "is_kept"),
    [("row-1", True), ("a" * 64, True), ("a" * 65, False), ("with space", False), ("é", False), ("", False)],
)
def test_a_plain_short_id_is_its_own_custom_id_and_any_other_is_mapped(row_id, is_kept):
    custom_id = custom_id_for(row_id)

    assert (custom_id == row_id) is is_kept
    assert len(custom_id) <= CUSTOM_ID_MAX_CHARS


@given(st.sets(st.text(min_size=1, max_size=100), min_size=2, max_size=50))
def test_distinct_row_ids_never_share_a_custom_id(row_ids):
    custom_ids = [custom_id_for(row_id) for row_id in row_ids]

    assert len(set(custom_ids)) == len(row_ids)
    assert all(len(c) <= CUSTOM_ID_MAX_CHARS for c in custom_ids)


def test_a_packer_refuses_the_same_custom_id_twice_in_a_file(tmp_path):
    packer = Packer(tmp_path, 1, BatchConfig())
    packer.add(line_of(10, "r"), row("r"))

    with pytest.raises(ValueError, match="twice"):
        packer.add(line_of(10, "r"), row("r"))


def test_files_are_split_by_measured_bytes(tmp_path):
    packer = Packer(tmp_path, 1, BatchConfig(max_file_bytes=1000))
    closed = [packer.add(line_of(300, f"r{i}"), row(f"r{i}")) for i in range(7)]

    files = [f for f in [*closed, packer.finish()] if f is not None]

    assert [len(f.rows) for f in files] == [3, 3, 1]
    assert all(f.path.stat().st_size == f.size_bytes <= 1000 for f in files)
    assert not files[0].path.read_bytes().startswith(b"\xef\xbb\xbf")  # UTF-8, no BOM


def test_files_are_split_by_line_count_and_by_enqueued_tokens(tmp_path):
    by_lines = Packer(tmp_path / "a", 1, BatchConfig(max_file_requests=2))
    by_tokens = Packer(tmp_path / "b", 1, BatchConfig(enqueued_tokens=250))
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()

    closed_lines = [by_lines.add(line_of(5, f"r{i}"), row(f"r{i}")) for i in range(5)] + [by_lines.finish()]
    closed_tokens = [by_tokens.add(line_of(5, f"r{i}"), row(f"r{i}")) for i in range(5)] + [
        by_tokens.finish()
    ]

    assert [len(f.rows) for f in closed_lines if f] == [2, 2, 1]
    assert [f.tokens for f in closed_tokens if f] == [200, 200, 100]


def test_a_line_larger_than_a_file_may_be_is_a_row_error(tmp_path):
    packer = Packer(tmp_path, 1, BatchConfig(max_file_bytes=100))

    refusal = packer.check(line_of(200, "big"), row("big"))

    assert refusal is not None and refusal.row_id == "big" and "batch.max_file_bytes" in str(refusal)


def test_a_line_carries_the_body_with_one_model_and_the_surface_url():
    azure = EndpointConfig(
        provider="azure", deployment="gpt-4o-batch", api_version="2024-10-21", mode="batch"
    )

    line = json.loads(batch_line({"messages": [], "max_tokens": 5}, "r1", azure))

    assert line == {"custom_id": "r1", "method": "POST", "url": "/chat/completions",
                    "body": {"messages": [], "max_tokens": 5, "model": "gpt-4o-batch"}}  # fmt: skip
    assert line_url(EndpointConfig(provider="openai")) == line_url(
        EndpointConfig(provider="azure", api_version="v1")
    )


@pytest.mark.parametrize(
    ("version", "is_served"),
    [("v1", True), ("2024-07-01-preview", True), ("2024-10-21", True), ("2024-02-15-preview", False),
     ("2024-06-01", False), ("latest", False)],
)  # fmt: skip
def test_azure_serves_the_batch_api_from_2024_07_01_preview(version, is_served):
    assert is_batch_api_version(version) is is_served


def test_a_ledger_line_cut_short_by_a_kill_is_ignored(tmp_path: Path):
    ledger = Ledger(tmp_path)
    ledger.append({"event": "packed", "file_no": 1, "run_id": "r", "tokens": 5, "rows": []})
    with open(tmp_path / "_batches.jsonl", "a") as f:
        f.write('{"event": "uploaded", "file_')

    state = Ledger(tmp_path).state

    assert list(state.files) == [1] and state.files[1].file_id is None
