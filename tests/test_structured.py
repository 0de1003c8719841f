"""Structured captions: a JSON Schema in, typed Parquet columns out; refusals and broken JSON recorded."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from conftest import TEST_KEY, azure_config, make_image, write_csv

from pipeline.config import EmulatorConfig
from pipeline.emulator import Emulator
from pipeline.exits import EXIT_OK, EXIT_ROW_ERRORS
from pipeline.records import ConfigError
from pipeline.runner import RunOptions, run
from pipeline.sink import read_output
from pipeline.structured import load_structured, strict_violations

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "sample_data" / "caption.schema.json").read_text())
MODEL = "gpt-4o-2024-08-06"


@pytest.fixture
async def gpt4o() -> Emulator:
    async with Emulator(EmulatorConfig(), api_key=TEST_KEY, deployment="vision", model=MODEL) as emulator:
        yield emulator


def structured_config(emulator: Emulator, tmp_path: Path, schema: dict | None = None, **request):
    (tmp_path / "caption.schema.json").write_text(json.dumps(schema or SCHEMA))
    values = {"response_format": "json_schema", "schema": str(tmp_path / "caption.schema.json"), **request}
    return azure_config(
        emulator, endpoint={"model": MODEL, "api_version": "2024-08-01-preview"}, request=values
    )


def manifest(tmp_path: Path, *prompts: str) -> Path:
    make_image(tmp_path / "a.png", (96, 64))
    rows = [{"id": f"r{n}", "image": "a.png", **({"prompt": p} if p else {})} for n, p in enumerate(prompts)]
    return write_csv(tmp_path / "m.csv", rows)


async def test_a_schema_becomes_typed_columns_that_pyarrow_and_duckdb_read(tmp_path, gpt4o, key_in_env):
    cfg = structured_config(gpt4o, tmp_path)

    summary = await run(cfg, RunOptions(manifest(tmp_path, "", ""), tmp_path / "out", handle_signals=False))

    table = read_output(tmp_path / "out")
    assert summary.exit_code == EXIT_OK and table.column("status").to_pylist() == ["ok", "ok"]
    schema = table.schema
    assert schema.field("tags").type == pa.list_(pa.string()) and schema.field("people").type == pa.int64()
    assert schema.field("colours").type == pa.struct(
        [("dominant", pa.string()), ("is_monochrome", pa.bool_())]
    )
    assert schema.field("sharpness").type == pa.float64() and schema.field("safety").type == pa.string()
    row = table.to_pylist()[0]
    assert json.loads(row["description"])["short_caption"] == row["short_caption"]  # the raw text is kept
    assert row["safety"] in ("safe", "sensitive", "unsafe")
    found = duckdb.sql(
        f"select colours.is_monochrome, len(tags), people from read_parquet('{tmp_path}/out/*.parquet')"
    ).fetchall()
    assert len(found) == 2 and all(isinstance(people, int) for _, _, people in found)


async def test_refusals_truncated_and_invalid_json_are_recorded_with_their_text_and_never_retried(
    tmp_path, gpt4o, key_in_env
):
    cfg = structured_config(gpt4o, tmp_path)
    prompts = ("[[refuse]] describe", "[[truncate]] describe", "[[break-schema]] describe", "")

    summary = await run(cfg, RunOptions(manifest(tmp_path, *prompts), tmp_path / "out", handle_signals=False))

    rows = {row["id"]: row for row in read_output(tmp_path / "out").to_pylist()}
    assert summary.exit_code == EXIT_ROW_ERRORS and gpt4o.stats.requests == 4  # nothing sent twice
    assert summary.counts["refused"] == 1 and summary.counts["invalid_output"] == 2
    assert rows["r0"]["status"] == "refused" and "can't help" in rows["r0"]["description"]
    assert rows["r1"]["status"] == "invalid_output" and "max_tokens" in rows["r1"]["error"]
    assert rows["r1"]["description"] and rows["r1"]["finish_reason"] == "length"
    assert rows["r2"]["status"] == "invalid_output" and "does not validate" in rows["r2"]["error"]
    assert rows["r2"]["short_caption"] is None and rows["r3"]["short_caption"] is not None


async def test_retry_failed_sends_refused_and_invalid_rows_again(tmp_path, gpt4o, key_in_env):
    cfg = structured_config(gpt4o, tmp_path)
    path = manifest(tmp_path, "[[refuse]] describe", "")
    await run(cfg, RunOptions(path, tmp_path / "out", handle_signals=False))
    write_csv(path, [{"id": "r0", "image": "a.png"}, {"id": "r1", "image": "a.png"}])  # the cause is gone

    summary = await run(cfg, RunOptions(path, tmp_path / "out", retry_failed=True, handle_signals=False))

    statuses = {row["id"]: row["status"] for row in read_output(tmp_path / "out").to_pylist()}
    assert summary.rows == 1 and statuses == {"r0": "ok", "r1": "ok"}


async def test_another_schema_on_an_existing_output_is_refused(tmp_path, gpt4o, key_in_env):
    path = manifest(tmp_path, "")
    await run(structured_config(gpt4o, tmp_path), RunOptions(path, tmp_path / "out", handle_signals=False))
    other = {**SCHEMA, "properties": {**SCHEMA["properties"], "mood": {"type": "string"}},
             "required": [*SCHEMA["required"], "mood"]}  # fmt: skip

    with pytest.raises(ConfigError, match="answer_format"):
        await run(
            structured_config(gpt4o, tmp_path, other),
            RunOptions(path, tmp_path / "out", handle_signals=False),
        )


async def test_a_400_saying_the_format_is_unsupported_stops_the_run_with_exit_2(
    tmp_path, emulator, key_in_env
):
    """The config says gpt-4o (no version), but the deployment is GPT-4 Turbo with Vision."""
    cfg = azure_config(emulator, endpoint={"model": "gpt-4o"}, request={"response_format": "json_object",
                       "prompt": "Describe the image as JSON."})  # fmt: skip

    summary = await run(cfg, RunOptions(manifest(tmp_path, "", ""), tmp_path / "out", handle_signals=False))

    assert summary.exit_code == 2 and "request.response_format" in summary.stopped_because
    assert read_output(tmp_path / "out").num_rows == 0  # no row is committed as failed for a setting


def cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], check=False, capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin"})  # fmt: skip


def write_config(
    tmp_path: Path, model: str, schema: dict, *, provider: str = "emulator", **extra: str
) -> Path:
    shutil.copy(ROOT / "sample_data" / "icon_64.png", tmp_path / "a.png")
    (tmp_path / "s.json").write_text(json.dumps(schema))
    lines = "".join(f"{key} = {value}\n" for key, value in extra.items())
    endpoint = f'provider = "{provider}"\nmodel = "{model}"\n'
    if provider == "azure":
        endpoint += 'url = "https://r.openai.azure.com"\ndeployment = "d"\napi_key_env = "K"\n'
    (tmp_path / "c.toml").write_text(
        f'[endpoint]\n{endpoint}[request]\nresponse_format = "json_schema"\nschema = "s.json"\n{lines}'
    )
    return tmp_path / "c.toml"


def test_azure_gpt4_turbo_with_images_and_a_schema_is_exit_2_naming_the_models_that_can(tmp_path):
    config = write_config(tmp_path, "gpt-4-turbo-2024-04-09", SCHEMA, provider="azure")

    done = cli("run", config, "--manifest", manifest(tmp_path, ""), "--output", tmp_path / "out")

    assert done.returncode == 2 and "gpt-4o 2024-08-06" in done.stdout + done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("change", "keyword"),
    [
        ({"required": ["short_caption"]}, "required"),
        ({"additionalProperties": True}, "additionalProperties"),
        (
            {"properties": {**SCHEMA["properties"], "short_caption": {"type": "string", "maxLength": 80}}},
            "maxLength",
        ),
    ],
)
def test_a_schema_outside_the_strict_subset_is_exit_2_naming_the_keyword(tmp_path, change, keyword):
    config = write_config(tmp_path, MODEL, {**SCHEMA, **change})

    done = cli("run", config, "--manifest", manifest(tmp_path, ""), "--output", tmp_path / "out")

    assert done.returncode == 2 and keyword in done.stdout + done.stderr


def test_strict_false_lets_any_schema_through_and_newer_models_take_more_keywords():
    with_length = {
        **SCHEMA,
        "properties": {**SCHEMA["properties"], "short_caption": {"type": "string", "maxLength": 80}},
    }

    assert list(strict_violations(with_length, allow_newer=True)) == []
    assert list(strict_violations(with_length, allow_newer=False)) == [
        ("$.properties.short_caption", "maxLength")
    ]


def test_a_property_named_like_an_output_or_manifest_column_is_exit_2_naming_both(tmp_path):
    clash = {**SCHEMA, "properties": {**SCHEMA["properties"], "status": {"type": "string"}},
             "required": [*SCHEMA["required"], "status"]}  # fmt: skip
    config = write_config(tmp_path, MODEL, clash)
    by_manifest = write_csv(tmp_path / "n.csv", [{"id": "x", "image": "a.png", "tags": "mine"}])

    output_clash = cli("run", config, "--manifest", manifest(tmp_path, ""), "--output", tmp_path / "out")
    manifest_clash = cli(
        "run", write_config(tmp_path, MODEL, SCHEMA), "--manifest", by_manifest, "--output", tmp_path / "o2"
    )

    assert output_clash.returncode == 2 and "'status'" in output_clash.stdout + output_clash.stderr
    assert (
        manifest_clash.returncode == 2
        and "manifest column 'tags'" in manifest_clash.stdout + manifest_clash.stderr
    )


def test_json_mode_needs_the_word_json_in_the_messages(tmp_path):
    from pipeline.config import config_from_mapping

    cfg = config_from_mapping({"endpoint": {"model": MODEL}, "request": {"response_format": "json_object"}})

    with pytest.raises(ConfigError, match="word JSON"):
        load_structured(cfg)


async def test_the_estimate_of_a_structured_run_is_what_the_emulator_bills(tmp_path, gpt4o, key_in_env):
    """Neither counts the schema as prompt tokens (no source says the service does): they agree to the token."""
    from pipeline.estimate import EstimateOptions, estimate

    cfg = structured_config(gpt4o, tmp_path)
    path = manifest(tmp_path, "", "Describe it as JSON, please.")

    estimated = await estimate(cfg, EstimateOptions(path))
    await run(cfg, RunOptions(path, tmp_path / "out", handle_signals=False))

    billed = sum(row["prompt_tokens"] for row in read_output(tmp_path / "out").to_pylist())
    assert estimated.tally.prompt_tokens == billed == gpt4o.stats.prompt_tokens
