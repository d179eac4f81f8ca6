"""Usage accounting: thread-safe per-model totals of requests and tokens, and a cost estimate.

Answers served from the llmutils cache are not billed, so they are counted apart:
``requests``, ``prompt_tokens`` and ``completion_tokens`` are what the API billed;
``cached_requests``, ``cached_prompt_tokens`` and ``cached_completion_tokens`` are what the
cache served (the tokens the original call had used). Costs count billed tokens only.
Requests answered through the OpenAI Batch API (``record(..., batch=True)``) are billed requests
too, also counted in ``batch_requests`` / ``batch_prompt_tokens`` / ``batch_completion_tokens``,
and cost :data:`BATCH_DISCOUNT` less (half price, as OpenAI and Azure bill them).

Prices are an estimate. :data:`DEFAULT_PRICES` holds OpenAI's standard-tier list prices in
USD per 1M input / output tokens as of August 2025; it ignores provider-side prompt-cache
discounts, the Batch API, and Azure's regional prices. Override them per tracker with
``UsageTracker(prices={...})`` or for the whole process with :func:`set_prices`. A model
name with a date suffix (``gpt-4o-2024-08-06``) is priced as its family (``gpt-4o``), found
by the longest matching prefix; an unknown model has no cost (``None``).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any

from ._exceptions import ConfigError

__all__ = [
    "BATCH_DISCOUNT",
    "DEFAULT_PRICES",
    "ModelUsage",
    "UsageTracker",
    "get_prices",
    "set_prices",
]

logger = logging.getLogger("llmutils")

#: USD per 1M (input, output) tokens; OpenAI standard tier list prices as of August 2025.
#: Read-only: change prices with set_prices() or UsageTracker(prices=...).
DEFAULT_PRICES: Mapping[str, tuple[float, float]] = MappingProxyType({
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "o3": (2.00, 8.00),
    "o3-mini": (1.10, 4.40),
    "o4-mini": (1.10, 4.40),
    "gpt-5": (1.25, 10.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
    "text-embedding-3-small": (0.02, 0.0),
    "text-embedding-3-large": (0.13, 0.0),
})

#: The share of the price the Batch API takes off (OpenAI and Azure: 50 %).
BATCH_DISCOUNT = 0.5

# A suffix that names a snapshot of the same model: -2024-08-06 or -0613.
_SNAPSHOT_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{4})")

_prices_lock = threading.Lock()
_prices: dict[str, tuple[float, float]] = dict(DEFAULT_PRICES)


def _check_prices(prices: Mapping[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """Validate a price table and return a lower-cased copy."""
    checked: dict[str, tuple[float, float]] = {}
    for model, pair in prices.items():
        try:
            price_in, price_out = (float(x) for x in pair)
        except (TypeError, ValueError):
            raise ConfigError(
                f"price for {model!r} must be (USD per 1M input tokens, USD per 1M output tokens), "
                f"got {pair!r}"
            ) from None
        if price_in < 0 or price_out < 0:
            raise ConfigError(f"price for {model!r} must not be negative, got {pair!r}")
        checked[model.lower()] = (price_in, price_out)
    return checked


def set_prices(prices: Mapping[str, tuple[float, float]], *, replace: bool = False) -> None:
    """Update the process-wide price table (USD per 1M input/output tokens); ``replace`` drops the rest."""
    checked = _check_prices(prices)
    with _prices_lock:
        if replace:
            _prices.clear()
        _prices.update(checked)


def get_prices() -> dict[str, tuple[float, float]]:
    """A copy of the process-wide price table in force."""
    with _prices_lock:
        return dict(_prices)


def _lookup(model: str, table: Mapping[str, tuple[float, float]]) -> tuple[float, float] | None:
    """The price of ``model``: an exact entry, else the longest entry it extends by a date suffix."""
    name = model.lower()
    if name in table:
        return table[name]
    best: str | None = None
    for family in table:
        if (
            name.startswith(family)
            and _SNAPSHOT_SUFFIX.fullmatch(name, len(family))
            and (best is None or len(family) > len(best))
        ):
            best = family
    return table[best] if best is not None else None


def _count(usage: Any, *names: str) -> int:
    """The first of ``names`` present in a usage mapping or object, as an int (0 if none)."""
    for name in names:
        value = usage.get(name) if isinstance(usage, Mapping) else getattr(usage, name, None)
        if value is not None:
            return int(value)
    return 0


@dataclass
class ModelUsage:
    """Totals for one model (or all models); billed and cache-served counts kept apart."""

    requests: int = 0
    cached_requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0
    batch_requests: int = 0
    batch_prompt_tokens: int = 0
    batch_completion_tokens: int = 0
    cost: float | None = None

    @property
    def total_tokens(self) -> int:
        """Billed tokens: prompt plus completion."""
        return self.prompt_tokens + self.completion_tokens

    @property
    def cached_tokens(self) -> int:
        """Tokens served from the cache, not billed."""
        return self.cached_prompt_tokens + self.cached_completion_tokens


class UsageTracker:
    """Thread-safe per-model totals of requests and tokens, with an optional cost estimate.

    Example::

        usage = UsageTracker(prices={"my-finetune": (3.0, 12.0)})
        usage.record("gpt-4o-2024-08-06", {"prompt_tokens": 12, "completion_tokens": 5}, cached=False)
        usage.totals().prompt_tokens   # 12
        usage.cost()                   # USD for billed tokens, or None if a model has no price

    ``prices`` (USD per 1M input/output tokens) is layered over the process-wide table
    (:func:`set_prices`, initially :data:`DEFAULT_PRICES`).
    """

    def __init__(self, *, prices: Mapping[str, tuple[float, float]] | None = None) -> None:
        self._prices = _check_prices(prices or {})
        self._lock = threading.Lock()
        self._models: dict[str, ModelUsage] = {}
        self._unpriced_logged: set[str] = set()

    def record(
        self, model: str, usage: Mapping[str, Any] | Any | None, *, cached: bool = False, batch: bool = False
    ) -> None:
        """Count one answer for ``model``; ``usage`` is the API's usage (dict or object) or None.

        ``batch=True``: the answer came through the Batch API (billed, at the batch discount).
        """
        prompt = completion = 0
        if usage is not None:
            prompt = _count(usage, "prompt_tokens", "input_tokens")
            completion = _count(usage, "completion_tokens", "output_tokens")
        with self._lock:
            totals = self._models.get(model)
            if totals is None:
                totals = self._models[model] = ModelUsage()
            if cached:
                totals.cached_requests += 1
                totals.cached_prompt_tokens += prompt
                totals.cached_completion_tokens += completion
            else:
                totals.requests += 1
                totals.prompt_tokens += prompt
                totals.completion_tokens += completion
                if batch:
                    totals.batch_requests += 1
                    totals.batch_prompt_tokens += prompt
                    totals.batch_completion_tokens += completion

    def snapshot(self) -> dict[str, ModelUsage]:
        """Per-model copies of the totals, each with its ``cost`` (None if unpriced)."""
        with self._lock:
            copies = {model: dataclasses.replace(totals) for model, totals in self._models.items()}
        table = self._table(None)
        for model, totals in copies.items():
            totals.cost = self._model_cost(model, totals, table)
        return copies

    def totals(self) -> ModelUsage:
        """The sum over all models; ``cost`` is None if a billed model has no price."""
        per_model = self.snapshot()
        total = ModelUsage(cost=0.0)
        for usage in per_model.values():
            for f in fields(ModelUsage):
                if f.name != "cost":
                    setattr(total, f.name, getattr(total, f.name) + getattr(usage, f.name))
            if total.cost is not None:
                total.cost = None if usage.cost is None else total.cost + usage.cost
        return total

    def cost(self, prices: Mapping[str, tuple[float, float]] | None = None) -> float | None:
        """Estimated USD for billed tokens, ``prices`` layered over the tracker's table; None if unpriced."""
        table = self._table(prices)
        with self._lock:
            copies = {model: dataclasses.replace(totals) for model, totals in self._models.items()}
        total = 0.0
        for model, totals in copies.items():
            cost = self._model_cost(model, totals, table)
            if cost is None:
                return None
            total += cost
        return total

    def reset(self) -> None:
        """Forget every count."""
        with self._lock:
            self._models.clear()

    def _table(self, prices: Mapping[str, tuple[float, float]] | None) -> dict[str, tuple[float, float]]:
        """The price table in force: process-wide, then this tracker's, then ``prices``."""
        table = get_prices()
        table.update(self._prices)
        if prices:
            table.update(_check_prices(prices))
        return table

    def _model_cost(
        self, model: str, totals: ModelUsage, table: Mapping[str, tuple[float, float]]
    ) -> float | None:
        """USD for one model's billed tokens; None (logged once at DEBUG) without a price."""
        if totals.prompt_tokens == 0 and totals.completion_tokens == 0:
            return 0.0
        price = _lookup(model, table)
        if price is None:
            with self._lock:
                first = model not in self._unpriced_logged
                self._unpriced_logged.add(model)
            if first:
                logger.debug(
                    "no price for model %r; its cost is unknown (add one with prices= or set_prices())", model
                )
            return None
        full = totals.prompt_tokens * price[0] + totals.completion_tokens * price[1]
        discount = BATCH_DISCOUNT * (totals.batch_prompt_tokens * price[0] + totals.batch_completion_tokens * price[1])
        return (full - discount) / 1_000_000
