"""Price tables and the cost of a usage. Prices live in one data file, ``configs/prices.toml``."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline.records import ConfigError, Usage

PRICES_FILE = Path(__file__).resolve().parent.parent / "configs" / "prices.toml"
TOKENS_PER_PRICE_UNIT = 1_000_000


@dataclass(frozen=True, slots=True)
class Price:
    model: str  # the table entry that matched
    input_per_1m: float  # US dollars per million prompt tokens
    output_per_1m: float  # US dollars per million completion tokens
    batch_discount: float  # share taken off by the Batch API (0.5 = half price)


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
    prices = {}
    for model, entry in (raw.get("models") or {}).items():
        try:
            prices[model] = Price(
                model,
                float(entry["input_per_1m"]),
                float(entry["output_per_1m"]),
                float(entry.get("batch_discount", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"{path}: models.{model!r}: needs input_per_1m and output_per_1m ({err})") from None
    return PriceTable(prices, str(raw.get("checked", "unknown")), str(raw.get("source", "unknown")), str(path))


def price_for(model: str, table: PriceTable) -> Price:
    """The price of `model`: the longest table entry its name starts with.

    Raises ConfigError naming the file to edit when no entry matches.
    """
    name = model.lower()
    matches = [key for key in table.prices if name.startswith(key.lower())]
    if not matches:
        raise ConfigError(f"no price for model {model!r}: add [models.\"{model}\"] to {table.file}")
    return table.prices[max(matches, key=len)]


def cost_usd(prompt_tokens: int, completion_tokens: int, price: Price, *, batch: bool = False) -> float:
    """Dollars for these tokens; `batch` applies the Batch API discount."""
    dollars = (prompt_tokens * price.input_per_1m + completion_tokens * price.output_per_1m) / TOKENS_PER_PRICE_UNIT
    return dollars * (1 - price.batch_discount) if batch else dollars


def usage_cost_usd(usage: Usage, price: Price) -> float:
    """Dollars billed for one response's usage."""
    return cost_usd(usage.prompt_tokens, usage.completion_tokens, price)
