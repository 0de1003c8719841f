"""The endpoint pool against real emulators: routing, 429 holds, fail-over, refused keys, the endpoint column."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import KEY_ENV, POOL_NAMES, TEST_KEY, azure_config, pool_config

from pipeline.config import config_from_mapping
from pipeline.emulator import Fault
from pipeline.exits import EXIT_OK, EXIT_REFUSED
from pipeline.records import ConfigError
from pipeline.runner import RunOptions, run
from pipeline.sink import STATS_FILE, part_files, read_output

AZURE_429_HEADERS = {  # what Azure sends with a 429
    "retry-after-ms": "2500",
    "retry-after": "3",
    "x-ratelimit-remaining-requests": "0",
    "x-ratelimit-remaining-tokens": "0",
}


def committed(output: Path) -> list[dict]:
    return read_output(output).to_pylist()


def assert_exactly_once(rows: list[dict], n: int) -> None:
    assert sorted(r["id"] for r in rows) == sorted(f"row-{i}" for i in range(n))


def stats_of(output: Path) -> dict:
    return json.loads((output / STATS_FILE).read_text())


async def test_a_429_with_azures_full_header_set_holds_for_retry_after_ms(
    tmp_path, emulator, images_manifest, key_in_env
):
    """x-ratelimit-remaining-*: 0 on a 429 must not stretch the 2.5 s asked into a 10-s window."""
    emulator.script(Fault(status=429, headers=AZURE_429_HEADERS))
    cfg = azure_config(emulator, limits={"concurrency": 1})

    summary = await run(cfg, RunOptions(images_manifest(3), tmp_path / "out", handle_signals=False))

    refused, after = emulator.requests[0], emulator.requests[1]
    assert refused.status == 429 and after.status == 200
    assert after.at - refused.at == pytest.approx(2.5, rel=0.05)
    assert summary.paused_s == pytest.approx(2.5, rel=0.05)
    assert stats_of(tmp_path / "out")["paused_s"] == pytest.approx(2.5, rel=0.05)
    assert_exactly_once(committed(tmp_path / "out"), 3)


async def test_a_429_holds_only_its_endpoint_and_rows_go_to_the_others(
    tmp_path, emulator_pool, images_manifest, key_in_env
):
    held = emulator_pool[1]
    held.script(Fault(status=429, headers={"retry-after-ms": "1500"}))
    cfg = pool_config(emulator_pool)

    summary = await run(cfg, RunOptions(images_manifest(40), tmp_path / "out", handle_signals=False))

    refused_at = next(r.at for r in held.requests if r.status == 429)
    # requests already on their way when the 429 left may still arrive in its first moments
    during_hold = [r for r in held.requests if refused_at + 0.1 < r.at < refused_at + 1.5 * 0.95]
    assert during_hold == []
    others = sum(len(e.requests) for e in (emulator_pool[0], emulator_pool[2]))
    assert others > 0
    assert summary.exit_code == EXIT_OK and summary.paused_s == 0  # the others could send all along
    assert summary.endpoints["westus"]["held_s"] == pytest.approx(1.5, rel=0.05)
    assert_exactly_once(committed(tmp_path / "out"), 40)


async def test_rows_move_to_healthy_endpoints_when_one_is_down(
    tmp_path, emulator_pool, images_manifest, key_in_env
):
    await emulator_pool[1].stop()  # nothing listens at westus any more: connections are refused
    cfg = pool_config(emulator_pool)

    summary = await run(cfg, RunOptions(images_manifest(30), tmp_path / "out", handle_signals=False))

    rows = committed(tmp_path / "out")
    assert summary.exit_code == EXIT_OK
    assert all(r["status"] == "ok" for r in rows)
    assert {r["endpoint"] for r in rows} <= {"eastus", "sweden"}
    assert summary.endpoints["westus"]["breaker_trips"] >= 1
    assert_exactly_once(rows, 30)


async def test_rows_in_flight_at_an_endpoint_that_fails_are_sent_elsewhere_at_once(
    tmp_path, emulator_pool, images_manifest, key_in_env
):
    """A request hanging at an endpoint whose breaker opens is ended and re-sent, not left to time out."""
    failing = emulator_pool[1]
    failing.script(Fault(delay_s=30.0), *[Fault(drop=True)] * 3)
    cfg = pool_config(emulator_pool, limits={"timeout_s": 60.0})

    summary = await run(cfg, RunOptions(images_manifest(60), tmp_path / "out", handle_signals=False))

    rows = committed(tmp_path / "out")
    assert failing.scripted_left == 0
    assert summary.duration_s < 10  # the hanging request did not hold its row for 30 s
    assert all(r["status"] == "ok" for r in rows)
    assert summary.endpoints["westus"]["breaker_trips"] == 1
    assert_exactly_once(rows, 60)


async def test_a_refused_key_takes_out_only_its_endpoint(
    tmp_path, emulator_pool, images_manifest, key_in_env, monkeypatch, caplog
):
    monkeypatch.setenv("WESTUS_KEY", "not-the-key-51f0")
    cfg = pool_config(emulator_pool, endpoints=[{}, {"api_key_env": "WESTUS_KEY"}, {}])

    summary = await run(cfg, RunOptions(images_manifest(30), tmp_path / "out", handle_signals=False))

    rows = committed(tmp_path / "out")
    assert summary.exit_code == EXIT_OK and all(r["status"] == "ok" for r in rows)
    assert {r["endpoint"] for r in rows} <= {"eastus", "sweden"}
    out_lines = [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "endpoint_out"]
    assert len(out_lines) == 1 and "'westus'" in out_lines[0] and "WESTUS_KEY" in out_lines[0]
    assert "not-the-key-51f0" not in caplog.text and TEST_KEY not in caplog.text
    assert_exactly_once(rows, 30)


async def test_a_quota_gone_on_one_endpoint_takes_it_out_and_the_run_goes_on(
    tmp_path, emulator_pool, images_manifest, key_in_env
):
    emulator_pool[2].script(Fault(status=429, headers={"retry-after-ms": "600000"}))
    cfg = pool_config(emulator_pool)

    summary = await run(cfg, RunOptions(images_manifest(30), tmp_path / "out", handle_signals=False))

    assert summary.exit_code == EXIT_OK
    assert "max_retry_after_s" in summary.endpoints["sweden"]["out_because"]
    refused_at = next(r.at for r in emulator_pool[2].requests if r.status == 429)
    assert [
        r for r in emulator_pool[2].requests if r.at > refused_at + 0.1
    ] == []  # on the wire then: may come
    assert_exactly_once(committed(tmp_path / "out"), 30)


async def test_the_run_stops_with_exit_3_only_when_no_endpoint_is_left(
    tmp_path, emulator_pool, images_manifest, monkeypatch
):
    monkeypatch.setenv(KEY_ENV, "wrong-everywhere")
    cfg = pool_config(emulator_pool)

    summary = await run(cfg, RunOptions(images_manifest(5), tmp_path / "out", handle_signals=False))

    assert summary.exit_code == EXIT_REFUSED
    assert summary.stopped_because is not None and "no endpoint left" in summary.stopped_because
    assert all(name in summary.stopped_because for name in POOL_NAMES)


async def test_every_endpoint_serves_and_the_stats_count_each(
    tmp_path, emulator_pool, images_manifest, key_in_env
):
    cfg = pool_config(emulator_pool)

    summary = await run(cfg, RunOptions(images_manifest(60), tmp_path / "out", handle_signals=False))

    rows = committed(tmp_path / "out")
    by_endpoint = Counter(r["endpoint"] for r in rows)
    assert set(by_endpoint) == set(POOL_NAMES)
    stats = stats_of(tmp_path / "out")["endpoints"]
    for name, emu in zip(POOL_NAMES, emulator_pool, strict=True):
        assert stats[name]["requests"] == len(emu.requests) == by_endpoint[name]
    assert summary.rows == 60


async def test_an_output_from_before_the_endpoint_column_resumes(
    tmp_path, emulator, images_manifest, key_in_env
):
    output = tmp_path / "out"
    cfg = azure_config(emulator)
    await run(cfg, RunOptions(images_manifest(3), output, handle_signals=False))
    for part in part_files(output):  # as a run made before the column existed wrote them
        pq.write_table(pq.read_table(part).drop_columns(["endpoint"]), part)

    summary = await run(cfg, RunOptions(images_manifest(6), output, handle_signals=False))

    rows = committed(output)
    assert summary.rows == 3
    assert_exactly_once(rows, 6)
    assert sorted(r["endpoint"] or "null" for r in rows) == ["default"] * 3 + ["null"] * 3


def endpoint_table(name: str, **values: object) -> dict[str, object]:
    return {
        "name": name,
        "provider": "azure",
        "url": "https://x",
        "deployment": "d",
        "api_key_env": "K",
        **values,
    }


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"endpoints": [endpoint_table("a"), endpoint_table("b", model="gpt-4o")]},
            r"endpoints\[1\]\.model = 'gpt-4o' differs from endpoints\[0\]\.model = 'gpt-4-turbo'",
        ),
        (
            {"endpoints": [endpoint_table("a")], "endpoint": {"provider": "emulator"}},
            r"\[endpoint\] beside \[\[endpoints\]\]",
        ),
        (
            {"endpoints": [endpoint_table("a")], "limits": {"tokens_per_minute": 1000}},
            r"limits\.tokens_per_minute beside \[\[endpoints\]\]",
        ),
        ({"endpoints": [endpoint_table("a"), endpoint_table("a")]}, r"endpoints\[1\]\.name = 'a'"),
        ({"endpoints": [endpoint_table("a", deployment="")]}, r"endpoints\[0\]\.deployment is required"),
    ],
)
def test_a_pool_that_cannot_work_is_refused_naming_the_settings(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_mapping(raw, source="pool.toml")


def test_a_pool_sums_its_quotas_and_derives_each_rpm_from_its_tpm():
    cfg = config_from_mapping(
        {
            "endpoints": [
                endpoint_table("a", tokens_per_minute=450_000),
                endpoint_table("b", tokens_per_minute=150_000),
            ]
        }
    )

    assert [(m.name, m.tokens_per_minute, m.requests_per_minute) for m in cfg.pool] == [
        ("a", 450_000, 2_700),
        ("b", 150_000, 900),
    ]
    assert (cfg.limits.tokens_per_minute, cfg.requests_per_minute) == (600_000, 3_600)
    assert cfg.largest_tokens_per_minute == 450_000


async def test_a_mixed_model_pool_exits_2(tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    config = tmp_path / "pool.toml"
    config.write_text(
        "[[endpoints]]\nname = 'a'\nprovider = 'emulator'\nmodel = 'gpt-4o'\n\n"
        "[[endpoints]]\nname = 'b'\nprovider = 'emulator'\nmodel = 'gpt-4-turbo'\n"
    )
    (tmp_path / "m.csv").write_text("id,image\nrow-0,x.png\n")

    result = CliRunner().invoke(
        main, ["run", str(config), "--manifest", str(tmp_path / "m.csv"), "--output", str(tmp_path / "o")]
    )

    assert result.exit_code == 2 and "endpoints[1].model" in result.output


async def test_emulator_endpoints_of_a_pool_each_get_an_emulator(tmp_path, images_manifest):
    cfg = config_from_mapping(
        {"endpoints": [{"name": "one", "provider": "emulator"}, {"name": "two", "provider": "emulator"}]}
    )

    summary = await run(cfg, RunOptions(images_manifest(20), tmp_path / "out", handle_signals=False))

    assert summary.exit_code == EXIT_OK
    assert {r["endpoint"] for r in committed(tmp_path / "out")} <= {"one", "two"}


async def test_the_report_shows_each_endpoint_of_the_last_run(tmp_path, images_manifest):
    from pipeline.report import write_report

    cfg = config_from_mapping(
        {"endpoints": [{"name": "one", "provider": "emulator"}, {"name": "two", "provider": "emulator"}]}
    )
    await run(cfg, RunOptions(images_manifest(20), tmp_path / "out", handle_signals=False))

    page = write_report(tmp_path / "out").read_text(encoding="utf-8")

    stats = json.loads((tmp_path / "out" / STATS_FILE).read_text())
    for name in ("one", "two"):
        row = page.split(f'id="endpoint-{name}">')[1].split("</tr>")[0]
        assert f"<td>{stats['endpoints'][name]['requests']:,}</td>" in row
    assert sum(e["requests"] for e in stats["endpoints"].values()) >= 20


async def test_an_openai_member_gets_the_model_in_the_body_and_an_azure_one_does_not(
    tmp_path, emulator_pool, images_manifest, key_in_env
):
    cfg = pool_config(
        emulator_pool[:2],
        endpoints=[{"provider": "openai", "url": emulator_pool[0].url + "/v1", "deployment": ""}, {}],
    )

    await run(cfg, RunOptions(images_manifest(20), tmp_path / "out", handle_signals=False))

    assert all(r.body["model"] == "gpt-4-turbo" for r in emulator_pool[0].requests)
    assert all("model" not in r.body for r in emulator_pool[1].requests)
    assert all(r.status == 200 for e in emulator_pool[:2] for r in e.requests)


def test_the_estimate_plans_over_the_pools_summed_quota():
    from pipeline.plan import plan_duration

    one = config_from_mapping({"endpoints": [endpoint_table("a", tokens_per_minute=60_000)]})
    two = config_from_mapping(
        {
            "endpoints": [
                endpoint_table("a", tokens_per_minute=60_000),
                endpoint_table("b", tokens_per_minute=60_000),
            ]
        }
    )

    alone = plan_duration(1_000, 1_000 * 700, one, window_h=None, latency_s=None)
    pooled = plan_duration(1_000, 1_000 * 700, two, window_h=None, latency_s=None)

    assert pooled.rows_per_min == pytest.approx(2 * alone.rows_per_min)
    assert pooled.duration_h == pytest.approx(alone.duration_h / 2)
