"""Price tables and the cost of a usage. Prices live in one data file, ``configs/prices.toml``.

A run config may override them in a ``[pricing]`` section: another price file (``file``), or this
model's prices inline (``input_per_1m`` and ``output_per_1m``, optionally ``batch_discount``).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.config import RunConfig
from pipeline.records import ConfigError, Usage

PRICES_FILE = Path(__file__).resolve().parent.parent / "configs" / "prices.toml"
TOKENS_PER_PRICE_UNIT = 1_000_000


@dataclass(frozen=True, slots=True)
class Price:
    model: str  # the table entry that matched
    input_per_1m: float  # US dollars per million prompt tokens
    output_per_1m: float  # US dollars per million completion tokens
    batch_discount: float  # share taken off by the Batch API (0.5 = half price)
    checked: str = "unknown"  # the date the price was last checked
    source: str = "unknown"  # where it comes from
    file: str = ""  # the file to edit to change it


@dataclass(frozen=True, slots=True)
class PriceTable:
    prices: Mapping[str, Price]
    checked: str  # the date the prices were last checked
    source: str  # where they come from
    file: str


def load_prices(path: Path = PRICES_FILE) -> PriceTable:
    """Read a price file. Raises ConfigError naming the file and the entry on a bad one."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path}: cannot read prices: {err}") from None
    checked, source = str(raw.get("checked", "unknown")), str(raw.get("source", "unknown"))
    prices = {}
    for model, entry in (raw.get("models") or {}).items():
        try:
            price = Price(
                model,
                float(entry["input_per_1m"]),
                float(entry["output_per_1m"]),
                float(entry.get("batch_discount", 0.0)),
                checked,
                source,
                str(path),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(
                f"{path}: models.{model!r}: needs input_per_1m and output_per_1m ({err})"
            ) from None
        if min(price.input_per_1m, price.output_per_1m) < 0 or not 0 <= price.batch_discount <= 1:
            raise ConfigError(f"{path}: models.{model!r}: prices must not be negative; batch_discount 0..1")
        prices[model] = price
    return PriceTable(prices, checked, source, str(path))


def price_for(model: str, table: PriceTable) -> Price:
    """The price of `model`: the longest table entry its name starts with.

    Raises ConfigError naming the file to edit when no entry matches.
    """
    name = model.lower()
    matches = [key for key in table.prices if name.startswith(key.lower())]
    if not matches:
        raise ConfigError(f'no price for model {model!r}: add [models."{model}"] to {table.file}')
    return table.prices[max(matches, key=len)]


def price_for_run(cfg: RunConfig) -> Price:
    """The price of ``cfg.endpoint.model`` under the config's ``[pricing]`` section. Reads a file.

    Inline prices win; else the entry of ``pricing.file`` (relative to the config's folder) or of
    ``configs/prices.toml``. Raises ConfigError naming the file to edit when the model has no price.
    """
    pricing, model = cfg.pricing, cfg.endpoint.model
    if pricing.input_per_1m is not None and pricing.output_per_1m is not None:
        discount = 0.0 if pricing.batch_discount is None else pricing.batch_discount
        inline = (pricing.input_per_1m, pricing.output_per_1m, discount)
        return Price(model, *inline, checked="set in the config", source=cfg.source, file=cfg.source)
    path = PRICES_FILE
    if pricing.file:
        path = Path(pricing.file).expanduser()
        path = path if path.is_absolute() else Path(cfg.source).parent / path
    table = load_prices(path)
    try:
        price = price_for(model, table)
    except ConfigError as err:
        where = f"or input_per_1m and output_per_1m under [pricing] in {cfg.source}"
        raise ConfigError(f"{err}, {where}") from None
    return price if pricing.batch_discount is None else replace(price, batch_discount=pricing.batch_discount)


def cost_usd(prompt_tokens: float, completion_tokens: float, price: Price, *, batch: bool = False) -> float:
    """Dollars for these tokens (an expected count may be fractional); `batch`: the Batch API discount."""
    dollars = (
        prompt_tokens * price.input_per_1m + completion_tokens * price.output_per_1m
    ) / TOKENS_PER_PRICE_UNIT
    return dollars * (1 - price.batch_discount) if batch else dollars


def usage_cost_usd(usage: Usage, price: Price) -> float:
    """Dollars billed for one response's usage."""
    return cost_usd(usage.prompt_tokens, usage.completion_tokens, price)
