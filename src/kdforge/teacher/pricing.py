"""Prices per million tokens: from flags/config, else from the shipped table (`prices.json`).

A budget needs a price. `resolve_prices` never guesses: an unknown model without explicit
prices gives None, and the caller turns a budget with no price into a usage error (exit 2).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from importlib import resources

from kdforge.errors import UsageError

NANO = 10**9  # nano-dollars per dollar: money is counted in whole nano-dollars

# A dated snapshot suffix, as in gpt-4o-2024-08-06, claude-sonnet-4-20250514, kimi-k2-0905.
_DATE_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8}|\d{4})$")


@dataclass(frozen=True)
class Prices:
    input: float  # USD per million prompt tokens
    output: float  # USD per million completion tokens
    source: str  # where they came from, for the log line
    batch: tuple[float, float] | None = None  # the provider's published Batch API prices, if any

    def for_batch(self, discount: float) -> "Prices":
        """The Batch API prices: the published ones where known, else `discount` x these."""
        if self.batch is not None:
            return Prices(*self.batch, source=f"{self.source}, its batch price")
        return Prices(self.input * discount, self.output * discount,
                      source=f"{self.source}, x{discount:g} batch discount (--batch-discount)")

    def cost_nano(self, prompt_tokens: int, completion_tokens: int) -> int:
        """Nano-dollars for this many tokens, computed exactly (Fraction) and rounded up: the one
        place cost is computed, for the ledger and the dry run alike."""
        usd = (prompt_tokens * Fraction(self.input) + completion_tokens * Fraction(self.output)) / 10**6
        return math.ceil(usd * NANO)


@lru_cache(maxsize=1)
def price_table() -> dict:
    """The shipped table: {"as_of": date, "models": {name: {"input", "output"}}}."""
    text = resources.files("kdforge.teacher").joinpath("prices.json").read_text(encoding="utf-8")
    return json.loads(text)


def lookup(model: str) -> Prices | None:
    """Table prices for `model`: exact name, else the name without a dated snapshot suffix."""
    table = price_table()
    models = table["models"]
    for name in (model, _DATE_SUFFIX.sub("", model)):
        if name in models:
            row = models[name]
            batch = (row["batch"]["input"], row["batch"]["output"]) if "batch" in row else None
            return Prices(row["input"], row["output"], f"shipped price table (as of {table['as_of']}) for {name}",
                          batch)
    return None


def resolve_prices(model: str | None, price_input: float | None, price_output: float | None) -> Prices | None:
    """Explicit prices win (both must be given); else the table; else None (unknown)."""
    if (price_input is None) != (price_output is None):
        missing = "--price-output" if price_output is None else "--price-input"
        raise UsageError(f"{missing} is missing: give both --price-input and --price-output "
                         "(USD per million tokens), or neither to use the shipped table")
    if price_input is not None:
        return Prices(price_input, price_output, "--price-input/--price-output")
    return lookup(model) if model else None


def unknown_price_fix(config: bool = False) -> str:
    """What to do when a model's price is unknown: give both prices; a local teacher is free (0).
    `config`: name the config fields instead of the flags."""
    if config:
        return ("set generate.price_input and generate.price_output (USD per million tokens); a free local "
                "teacher (kdforge serve, your own vLLM): generate.price_input: 0 and generate.price_output: 0")
    return ("pass --price-input and --price-output (USD per million tokens); a free local teacher "
            "(kdforge serve, your own vLLM): --price-input 0 --price-output 0")
