"""Loading and validating TOML run configs, environment overrides, and the API key from the environment.

Every default lives here. A bad value stops the run with one line naming the file and the key.
Any setting can be overridden from the environment as ``VISION_PIPELINE_<SECTION>_<KEY>``, for
example ``VISION_PIPELINE_LIMITS_CONCURRENCY=4``; the override is validated like the file.

A pool of endpoints is a list of ``[[endpoints]]`` tables, each with the keys of ``[endpoint]`` plus its own
``tokens_per_minute`` and ``requests_per_minute`` (no environment overrides: a list has no one name).
The run then uses ``RunConfig.pool``; ``cfg.endpoint`` is the pool's first member (its model and provider
are the run's: every member serves the same model) and ``cfg.limits`` carries the pool's summed quota.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.records import ConfigError

ENV_PREFIX = "VISION_PIPELINE_"
EMULATOR_API_KEY = "emulator"  # the in-process emulator accepts any key; this one is never secret
PROVIDERS = ("azure", "openai", "emulator")
RPM_PER_1000_TPM = 6  # Azure's default ratio of requests to tokens per minute


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    name: str = "default"  # what the output's endpoint column, the log and _stats.json call it
    provider: Literal["azure", "openai", "emulator"] = "emulator"
    url: str = ""  # Azure: https://RESOURCE.openai.azure.com; OpenAI-compatible: the base URL (…/v1)
    deployment: str = ""  # Azure only
    api_version: str = "2024-02-15-preview"
    api_key_env: str = ""  # name of the environment variable holding the key, never the key itself
    model: str = "gpt-4-turbo"  # used for token accounting and prices
    mode: Literal["live", "batch"] = "live"  # batch: the Batch API, half price within 24 h (pipeline/batch/)


@dataclass(frozen=True, slots=True)
class PoolMember:
    """One endpoint of the run and its own quota (requests_per_minute resolved: never 0)."""

    endpoint: EndpointConfig
    tokens_per_minute: int
    requests_per_minute: int

    @property
    def name(self) -> str:
        return self.endpoint.name


@dataclass(frozen=True, slots=True)
class RequestConfig:
    system_prompt: str = "You are a careful image captioner."
    prompt: str = "Describe this image in one paragraph."
    detail: Literal["low", "high", "auto"] = "auto"
    max_tokens: int = 300
    temperature: float = 0.0
    response_format: Literal["text", "json_object", "json_schema"] = "text"  # structured.py
    schema: str = ""  # json_schema: a JSON Schema file, relative to this config's folder
    schema_name: str = "caption"  # json_schema: the schema's name in the request
    strict: bool = True  # json_schema: the service enforces the schema (only its strict subset is allowed)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    requests_per_minute: int = 0  # 0: derived from tokens_per_minute at Azure's 6 RPM per 1000 TPM
    tokens_per_minute: int = 30_000
    concurrency: int = 16
    max_attempts: int = 6
    timeout_s: float = 60.0
    max_retry_after_s: float = 120.0  # a server asking for a longer wait means the quota is gone: stop
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    grace_s: float = 30.0  # on SIGINT/SIGTERM, how long in-flight requests may take to finish
    max_cost_usd: float | None = None  # the most this run may spend (budget.py); unset: no cap


@dataclass(frozen=True, slots=True)
class OutputConfig:
    rows_per_part: int = 1000
    flush_seconds: float = 30.0


@dataclass(frozen=True, slots=True)
class ImagesConfig:
    """How local (and, with fetch_remote, downloaded) images are read, checked and encoded for the wire."""

    jpeg_quality: int = 90
    encoding: Literal["jpeg", "png"] = "jpeg"  # png: lossless, several times larger for photos
    keep_alpha: bool = False  # true: an image with transparent pixels goes out as PNG with its alpha kept
    max_image_bytes: int = 20 * 1024 * 1024  # the service's limit per image
    max_request_bytes: int = 20 * 1024 * 1024  # the service's limit on a request: a row's data URLs together
    max_pixels: int = 100_000_000  # larger images are refused as decompression bombs
    extension_must_match: bool = True  # false: a local file whose extension names another format is sent
    threads: int = 0  # images prepared at once; 0: one more than the CPU cores this process may use
    # folders local images may be read from, relative ones to the manifest's folder; empty: that folder only
    allowed_roots: tuple[str, ...] = ()
    fetch_remote: bool = False  # download http(s) images and prepare them like local files; else pass the URL
    allow_private_urls: bool = False  # let fetch_remote reach loopback, private and link-local addresses
    max_remote_bytes: int = 50 * 1024 * 1024  # a download stops past this many bytes
    remote_timeout_s: float = 30.0  # for one download, every redirect included
    max_redirects: int = 5


@dataclass(frozen=True, slots=True)
class EmulatorConfig:
    """How the in-process emulator behaves when provider = "emulator"."""

    latency_s: float = 0.0
    fault_rate: float = 0.0  # share of requests answered 500
    drop_rate: float = 0.0  # share of connections dropped without an answer
    tokens_per_minute: int = 0  # 0: no quota enforced
    requests_per_minute: int = 0
    seed: int = 0
    batch_delay_s: float = 0.0  # Batch API: seconds a job waits in_progress before its lines are answered
    batch_expire_after_lines: int = 0  # a job expires after answering this many lines (0: never)
    batch_fail_every: int = 0  # every Nth line of a job is answered with a server_error line (0: none)
    batch_max_file_bytes: int = 200 * 1024 * 1024  # uploads over this are refused, as the services do
    batch_max_file_requests: int = 100_000  # a job with more lines fails validation
    batch_enqueued_tokens: int = 0  # jobs over this many enqueued prompt tokens fail (0: no quota)


@dataclass(frozen=True, slots=True)
class PricingConfig:
    """This config's prices, over the shipped table ``configs/prices.toml`` (see ``pricing.price_for_run``)."""

    file: str = ""  # another price file, relative to this config's folder; empty: configs/prices.toml
    input_per_1m: float | None = (
        None  # US dollars per 1M prompt tokens for endpoint.model; with output_per_1m
    )
    output_per_1m: float | None = None  # these two replace the file's entry (0 for a free local server)
    batch_discount: float | None = None  # share the Batch API takes off; unset: the file's, or 0 inline


@dataclass(frozen=True, slots=True)
class BatchConfig:
    """How a run with endpoint.mode = "batch" packs, submits and waits for Batch API jobs."""

    completion_window: str = "24h"  # the only window the services offer
    max_file_bytes: int = 190_000_000  # the services refuse input files over 200 MB; keep a margin
    max_file_requests: int = 50_000  # OpenAI's limit (Azure's v1 reference says the same)
    enqueued_tokens: int = 0  # the deployment's enqueued-token quota; 0: unknown, back off when refused
    poll_s: float = 60.0  # Azure asks for no faster than once a minute; lower only against an emulator
    max_rounds: int = 3  # submissions of rows a batch left over (expired, cancelled, timed out) per run


BATCH_MIN_API_VERSION = "2024-07-01-preview"  # Azure's first api-version with the Batch API


@dataclass(frozen=True, slots=True)
class RunConfig:
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)
    request: RequestConfig = field(default_factory=RequestConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    emulator: EmulatorConfig = field(default_factory=EmulatorConfig)
    pricing: PricingConfig = field(default_factory=PricingConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    source: str = "<defaults>"  # the file it came from, for messages
    endpoints: tuple[PoolMember, ...] = ()  # [[endpoints]]; empty: the single [endpoint] + [limits] form

    @property
    def requests_per_minute(self) -> int:
        """The RPM budget: as configured, else Azure's ratio of 6 RPM per 1000 TPM."""
        return _rpm(self.limits.requests_per_minute, self.limits.tokens_per_minute)

    @property
    def pool(self) -> tuple[PoolMember, ...]:
        """The endpoints of the run with their quotas: [[endpoints]], or [endpoint] with [limits]'s quota."""
        if self.endpoints:
            return self.endpoints
        return (PoolMember(self.endpoint, self.limits.tokens_per_minute, self.requests_per_minute),)

    @property
    def largest_tokens_per_minute(self) -> int:
        """The most one request may reserve: it must fit one member's minute."""
        return max(member.tokens_per_minute for member in self.pool)


def _rpm(configured: int, tokens_per_minute: int) -> int:
    return configured if configured > 0 else max(1, tokens_per_minute * RPM_PER_1000_TPM // 1000)


_SECTION_TYPES = {
    "endpoint": EndpointConfig,
    "request": RequestConfig,
    "limits": LimitsConfig,
    "output": OutputConfig,
    "images": ImagesConfig,
    "emulator": EmulatorConfig,
    "pricing": PricingConfig,
    "batch": BatchConfig,
}


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> RunConfig:
    """Read, override from the environment, and validate a TOML config.

    Raises ConfigError naming the file and the key on any unknown key or bad value.
    """
    environ = os.environ if environ is None else environ
    source = str(path)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: not valid TOML: {err}") from None
    return config_from_mapping(raw, source=source, environ=environ)


def config_from_mapping(
    raw: Mapping[str, Any], *, source: str = "<mapping>", environ: Mapping[str, str] | None = None
) -> RunConfig:
    """Validate a parsed config (as tomllib returns it) plus environment overrides."""
    environ = {} if environ is None else environ
    sections: dict[str, Any] = {}
    for name in raw:
        if name not in _SECTION_TYPES and name != "endpoints":
            known = ", ".join([*_SECTION_TYPES, "[endpoints]"])
            raise ConfigError(f"{source}: unknown section [{name}] (known: {known})")
    for name, section_type in _SECTION_TYPES.items():
        values = raw.get(name, {})
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: [{name}] must be a table")
        sections[name] = _load_section(section_type, name, values, source, environ)
    cfg = RunConfig(**sections, source=source)
    if "endpoints" in raw:
        cfg = _with_pool(cfg, raw, environ)
    _check(cfg)
    return cfg


_POOL_QUOTA_KEYS = ("tokens_per_minute", "requests_per_minute")


def _with_pool(cfg: RunConfig, raw: Mapping[str, Any], environ: Mapping[str, str]) -> RunConfig:
    """`cfg` with its [[endpoints]] pool: checked, the first member as cfg.endpoint, the quotas summed."""
    src, tables = cfg.source, raw["endpoints"]
    if not isinstance(tables, list) or not tables or not all(isinstance(t, Mapping) for t in tables):
        raise ConfigError(f"{src}: endpoints must be a list of [[endpoints]] tables")
    if "endpoint" in raw:
        raise ConfigError(
            f"{src}: [endpoint] beside [[endpoints]]: use one form (move it into [[endpoints]])"
        )
    for key in _POOL_QUOTA_KEYS:
        env_name = f"{ENV_PREFIX}limits_{key}".upper()
        if key in raw.get("limits", {}) or env_name in environ:
            raise ConfigError(
                f"{src}: limits.{key} beside [[endpoints]]: set endpoints[].{key} on each endpoint instead"
            )
    members = []
    for n, table in enumerate(tables):
        where = f"endpoints[{n}]"
        quotas = {key: table[key] for key in _POOL_QUOTA_KEYS if key in table}
        endpoint_keys = {key: value for key, value in table.items() if key not in _POOL_QUOTA_KEYS}
        if "name" not in endpoint_keys:
            raise ConfigError(f"{src}: {where}.name is required: each endpoint of a pool is named")
        endpoint = _load_section(EndpointConfig, where, endpoint_keys, src, {})
        limits = _load_section(LimitsConfig, where, quotas, src, {})
        members.append(
            PoolMember(
                endpoint, limits.tokens_per_minute, _rpm(limits.requests_per_minute, limits.tokens_per_minute)
            )
        )
    first = members[0].endpoint
    seen: set[str] = set()
    for n, member in enumerate(members):
        ep = member.endpoint
        if not ep.name.strip() or ep.name in seen:
            raise ConfigError(
                f"{src}: endpoints[{n}].name = {ep.name!r}: each endpoint needs a name of its own"
            )
        seen.add(ep.name)
        if ep.model != first.model:
            raise ConfigError(
                f"{src}: endpoints[{n}].model = {ep.model!r} differs from endpoints[0].model = {first.model!r}: "
                "every endpoint of a pool serves the same model"
            )
        if member.tokens_per_minute <= 0 or member.requests_per_minute <= 0:
            raise ConfigError(
                f"{src}: endpoints[{n}].tokens_per_minute and requests_per_minute must be greater than 0"
            )
        _check_endpoint(ep, src, f"endpoints[{n}]")
    limits = dataclasses.replace(
        cfg.limits,
        tokens_per_minute=sum(m.tokens_per_minute for m in members),
        requests_per_minute=sum(m.requests_per_minute for m in members),
    )
    return dataclasses.replace(cfg, endpoint=first, limits=limits, endpoints=tuple(members))


def _load_section(
    section_type: type, name: str, values: Mapping[str, Any], source: str, environ: Mapping[str, str]
) -> Any:
    hints = typing.get_type_hints(section_type)
    known = {f.name for f in dataclasses.fields(section_type)}
    for key in values:
        if key not in known:
            raise ConfigError(f"{source}: unknown key {name}.{key} (known: {', '.join(sorted(known))})")
    kwargs = {key: _coerce(hints[key], value, f"{source}: {name}.{key}") for key, value in values.items()}
    for key in known:
        env_name = f"{ENV_PREFIX}{name}_{key}".upper()
        if env_name in environ:
            kwargs[key] = _coerce(hints[key], _parse_env(environ[env_name]), f"environment {env_name}")
    return section_type(**kwargs)


def _parse_env(text: str) -> Any:
    """An environment value as TOML would read it, falling back to the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _coerce(hint: Any, value: Any, where: str) -> Any:
    if typing.get_origin(hint) is Literal:
        if value not in typing.get_args(hint):
            allowed = " | ".join(map(str, typing.get_args(hint)))
            raise ConfigError(f"{where} = {value!r}: must be one of {allowed}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} = {value!r}: must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} = {value!r}: must be a whole number")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} = {value!r}: must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} = {value!r}: must be a string")
        return value
    if typing.get_origin(hint) is tuple:  # a list in TOML, e.g. images.allowed_roots = ["/data/photos"]
        if not isinstance(value, list):
            raise ConfigError(f'{where} = {value!r}: must be a list, e.g. ["/data/photos"]')
        (item_hint, _) = typing.get_args(hint)  # tuple[X, ...]
        return tuple(_coerce(item_hint, item, f"{where}[{n}]") for n, item in enumerate(value))
    if isinstance(hint, types.UnionType):  # an optional setting: TOML has no null, so check the value's type
        arms = [arm for arm in typing.get_args(hint) if arm is not type(None)]
        return _coerce(arms[0], value, where) if len(arms) == 1 else value
    raise ConfigError(f"{where}: unsupported setting type {hint}")  # pragma: no cover


def _check(cfg: RunConfig) -> None:
    """Cross-field and range checks: each failure names the setting."""
    src, req, lim = cfg.source, cfg.request, cfg.limits
    _check_endpoint(cfg.endpoint, src, "endpoint")
    positive = {
        "request.max_tokens": req.max_tokens,
        "limits.tokens_per_minute": lim.tokens_per_minute,
        "limits.concurrency": lim.concurrency,
        "limits.max_attempts": lim.max_attempts,
        "limits.timeout_s": lim.timeout_s,
        "output.rows_per_part": cfg.output.rows_per_part,
        "output.flush_seconds": cfg.output.flush_seconds,
        "images.max_image_bytes": cfg.images.max_image_bytes,
        "images.max_request_bytes": cfg.images.max_request_bytes,
        "images.max_pixels": cfg.images.max_pixels,
        "images.max_remote_bytes": cfg.images.max_remote_bytes,
        "images.remote_timeout_s": cfg.images.remote_timeout_s,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{src}: {key} = {value}: must be greater than 0")
    not_negative = {
        "limits.requests_per_minute": lim.requests_per_minute,
        "limits.backoff_initial_s": lim.backoff_initial_s,
        "limits.backoff_max_s": lim.backoff_max_s,
        "limits.max_retry_after_s": lim.max_retry_after_s,
        "limits.grace_s": lim.grace_s,
        "request.temperature": req.temperature,
        "emulator.latency_s": cfg.emulator.latency_s,
        "emulator.tokens_per_minute": cfg.emulator.tokens_per_minute,
        "emulator.requests_per_minute": cfg.emulator.requests_per_minute,
        "emulator.batch_delay_s": cfg.emulator.batch_delay_s,
        "emulator.batch_expire_after_lines": cfg.emulator.batch_expire_after_lines,
        "emulator.batch_fail_every": cfg.emulator.batch_fail_every,
        "emulator.batch_enqueued_tokens": cfg.emulator.batch_enqueued_tokens,
        "images.max_redirects": cfg.images.max_redirects,
        "images.threads": cfg.images.threads,
    }
    for key, value in not_negative.items():
        if value < 0:
            raise ConfigError(f"{src}: {key} = {value}: must not be negative")
    for key in ("fault_rate", "drop_rate"):
        if not 0 <= getattr(cfg.emulator, key) <= 1:
            raise ConfigError(f"{src}: emulator.{key} must be between 0 and 1")
    if not 1 <= cfg.images.jpeg_quality <= 95:
        raise ConfigError(f"{src}: images.jpeg_quality = {cfg.images.jpeg_quality}: must be 1..95")
    for n, root in enumerate(cfg.images.allowed_roots):
        if not root.strip():
            raise ConfigError(f"{src}: images.allowed_roots[{n}] is empty: name a folder")
    _check_pricing(cfg)
    _check_batch(cfg)
    if lim.max_cost_usd is not None and not 0 < lim.max_cost_usd < float("inf"):
        raise ConfigError(f"{src}: limits.max_cost_usd = {lim.max_cost_usd}: must be a number greater than 0")


def _check_endpoint(ep: EndpointConfig, src: str, where: str) -> None:
    """The keys a provider needs; `where` is how the config names the table (endpoint, endpoints[1])."""
    if ep.provider == "azure":
        for key in ("url", "deployment", "api_key_env"):
            if not getattr(ep, key):
                raise ConfigError(f"{src}: {where}.{key} is required when {where}.provider = 'azure'")
    if ep.provider == "openai" and not ep.url:
        raise ConfigError(f"{src}: {where}.url is required when {where}.provider = 'openai'")
    if ep.provider != "emulator" and not ep.url.startswith(("http://", "https://")):
        raise ConfigError(f"{src}: {where}.url = {ep.url!r}: must start with http:// or https://")


def _check_batch(cfg: RunConfig) -> None:
    src, batch, ep = cfg.source, cfg.batch, cfg.endpoint
    for key in ("max_file_bytes", "max_file_requests", "poll_s", "max_rounds"):
        if getattr(batch, key) <= 0:
            raise ConfigError(f"{src}: batch.{key} = {getattr(batch, key)}: must be greater than 0")
    if batch.enqueued_tokens < 0:
        raise ConfigError(f"{src}: batch.enqueued_tokens = {batch.enqueued_tokens}: must not be negative")
    batch_members = [n for n, m in enumerate(cfg.endpoints) if m.endpoint.mode == "batch"]
    if batch_members and len(cfg.endpoints) > 1:
        raise ConfigError(
            f'{src}: endpoints[{batch_members[0]}].mode = "batch": a Batch API run uses one endpoint; '
            "give it a single [endpoint] table"
        )
    if ep.mode == "batch" and ep.provider == "azure" and not is_batch_api_version(ep.api_version):
        raise ConfigError(
            f'{src}: endpoint.api_version = {ep.api_version!r}: the Batch API needs "v1" or '
            f'{BATCH_MIN_API_VERSION} or later (endpoint.mode = "batch")'
        )


def is_batch_api_version(api_version: str) -> bool:
    """Whether Azure serves the Batch API at `api_version`: "v1", or a dated version (YYYY-MM-DD, maybe with
    "-preview") from 2024-07-01-preview on."""
    if api_version == "v1":
        return True
    date, rest = api_version[:10], api_version[10:]
    is_dated = len(date) == 10 and date[4] == date[7] == "-" and rest in ("", "-preview")
    return is_dated and date >= BATCH_MIN_API_VERSION[:10]


def with_max_cost(cfg: RunConfig, max_cost_usd: float) -> RunConfig:
    """`cfg` with the run's spend cap set from ``--max-cost``, which wins over the file. Raises ConfigError."""
    if not 0 < max_cost_usd < float("inf"):
        raise ConfigError(f"--max-cost {max_cost_usd:g}: must be a number greater than 0 (US dollars)")
    return dataclasses.replace(cfg, limits=dataclasses.replace(cfg.limits, max_cost_usd=max_cost_usd))


def _check_pricing(cfg: RunConfig) -> None:
    src, pricing = cfg.source, cfg.pricing
    for key in ("input_per_1m", "output_per_1m"):
        value = getattr(pricing, key)
        if value is not None and value < 0:
            raise ConfigError(f"{src}: pricing.{key} = {value}: must not be negative")
    if (pricing.input_per_1m is None) != (pricing.output_per_1m is None):
        raise ConfigError(
            f"{src}: pricing.input_per_1m and pricing.output_per_1m go together: set both or neither"
        )
    if pricing.batch_discount is not None and not 0 <= pricing.batch_discount <= 1:
        raise ConfigError(
            f"{src}: pricing.batch_discount = {pricing.batch_discount}: must be between 0 and 1"
        )


def api_key(cfg: RunConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The API key from the variable named by endpoint.api_key_env.

    Raises ConfigError naming the variable (never its value) when it is required and unset. An
    OpenAI-compatible server may need no key: leave api_key_env empty.
    """
    return api_key_of(cfg.endpoint, cfg.source, environ)


def api_key_of(ep: EndpointConfig, source: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The key of one endpoint (of a pool, or the run's one): see ``api_key``."""
    environ = os.environ if environ is None else environ
    if ep.provider == "emulator":
        return environ.get(ep.api_key_env) if ep.api_key_env else EMULATOR_API_KEY
    if not ep.api_key_env:
        return None
    key = environ.get(ep.api_key_env, "").strip()
    if not key:
        raise ConfigError(
            f"{source}: endpoint {ep.name!r} api_key_env: environment variable {ep.api_key_env} is not set"
        )
    return key
