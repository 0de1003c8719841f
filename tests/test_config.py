from pathlib import Path

import pytest

from pipeline.config import api_key, config_from_mapping, load_config
from pipeline.records import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize(
    "name", ["emulator.toml", "azure.toml", "azure-pool.toml", "openai.toml", "vllm.toml"]
)
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name, environ={})

    assert cfg.request.max_tokens > 0


def test_an_unknown_key_is_named_with_its_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[limits]\nconcurency = 3\n")

    with pytest.raises(ConfigError, match=r"c\.toml: unknown key limits\.concurency"):
        load_config(path, environ={})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"request": {"detail": "medium"}},
            r"request\.detail = 'medium': must be one of low \| high \| auto",
        ),
        ({"limits": {"concurrency": "8"}}, r"limits\.concurrency = '8': must be a whole number"),
        ({"limits": {"concurrency": 0}}, r"limits\.concurrency = 0: must be greater than 0"),
        ({"endpoint": {"provider": "azure", "url": "https://x"}}, r"endpoint\.deployment is required"),
        ({"endpoint": {"provider": "openai", "url": "ftp://x"}}, r"endpoint\.url = 'ftp://x'"),
        ({"limit": {}}, r"unknown section \[limit\]"),
    ],
)
def test_bad_values_are_refused_naming_the_setting(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_mapping(raw, source="run.toml")


def test_environment_overrides_the_file_and_is_validated():
    cfg = config_from_mapping(
        {"limits": {"concurrency": 3}}, environ={"VISION_PIPELINE_LIMITS_CONCURRENCY": "5"}
    )

    assert cfg.limits.concurrency == 5
    with pytest.raises(ConfigError, match="VISION_PIPELINE_LIMITS_CONCURRENCY"):
        config_from_mapping({}, environ={"VISION_PIPELINE_LIMITS_CONCURRENCY": "many"})


def test_rpm_defaults_to_azures_six_per_thousand_tpm():
    assert config_from_mapping({"limits": {"tokens_per_minute": 30_000}}).requests_per_minute == 180


def test_a_missing_key_variable_is_named_but_its_value_never_shown():
    cfg = config_from_mapping(
        {"endpoint": {"provider": "azure", "url": "https://x", "deployment": "d", "api_key_env": "MY_KEY"}},
        source="azure.toml",
    )

    with pytest.raises(ConfigError, match="MY_KEY is not set"):
        api_key(cfg, environ={})
    assert api_key(cfg, environ={"MY_KEY": "s3cret"}) == "s3cret"
