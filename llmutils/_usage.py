"""Usage accounting: thread-safe per-model totals of requests and tokens, and a cost estimate.

Answers served from the llmutils cache are not billed, so they are counted apart:
``requests``, ``prompt_tokens`` and ``completion_tokens`` are what the API billed;
``cached_requests``, ``cached_prompt_tokens`` and ``cached_completion_tokens`` are what the
cache served (the tokens the original call had used). ``cached_tokens`` (the part of
``prompt_tokens`` the provider served from its prompt cache, billed at a lower price) and
``reasoning_tokens`` (the part of ``completion_tokens`` a reasoning model thought with) are
billed subsets. Requests answered through the OpenAI Batch API (``record(..., batch=True)``) are
billed requests too, also counted in ``batch_requests`` / ``batch_prompt_tokens`` /
``batch_completion_tokens`` / ``batch_cached_tokens``, and priced at the Batch discount
(:data:`BATCH_DISCOUNT`).

Costs count billed tokens only and are an estimate: prices come from genai-prices, with overrides
on top (``UsageTracker(prices={...})``, :func:`set_prices`); ``llmutils._prices`` tells how a
price is found. A model without a price has no cost (``None``), and :meth:`UsageTracker.unpriced_models`
names it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ._prices import BATCH_DISCOUNT, Price, check_prices, token_cost

__all__ = [
    "BATCH_DISCOUNT",
    "ModelUsage",
    "UsageTracker",
    "get_prices",
    "set_prices",
]

logger = logging.getLogger("llmutils")

_prices_lock = threading.Lock()
_prices: dict[str, Price] = {}  # process-wide overrides over genai-prices (set_prices)


def set_prices(prices: Mapping[str, tuple[float, ...]], *, replace: bool = False) -> None:
    """Override prices for the whole process, on top of genai-prices.

    :param prices: model -> ``(input, output)`` or ``(input, output, cached_input)``, USD per 1M tokens.
    :param replace: drop the overrides set before (genai-prices stays underneath).
    :raises ConfigError: a malformed or negative price, naming the model.
    """
    checked = check_prices(prices)
    with _prices_lock:
        if replace:
            _prices.clear()
        _prices.update(checked)


def get_prices() -> dict[str, Price]:
    """A copy of the process-wide price overrides (:func:`set_prices`)."""
    with _prices_lock:
        return dict(_prices)


def _count(usage: Any, *names: str) -> int:
    """The first of ``names`` present in a usage mapping or object, as an int (0 if none).

    :raises ValueError: the count is not a number of tokens (a string such as ``"n/a"``, a bool,
        a negative, fractional or non-finite number, anything else); :meth:`UsageTracker.record`
        counts such usage as unknown.
    """
    for name in names:
        value = usage.get(name) if isinstance(usage, Mapping) else getattr(usage, name, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name}={value!r:.60} is not a count of tokens")
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{name}={value!r} is not a whole number of tokens")
        return int(value)
    return 0


def _detail(usage: Any, parents: tuple[str, str], name: str) -> int:
    """A count nested in the usage's ``*_details`` (``prompt_tokens_details.cached_tokens``), as an int (0 if none)."""
    for parent in parents:
        details = usage.get(parent) if isinstance(usage, Mapping) else getattr(usage, parent, None)
        if details is not None:
            return _count(details, name)
    return 0


@dataclass
class ModelUsage:
    """Totals for one model (or all models); billed and cache-served counts kept apart.

    ``requests``, ``prompt_tokens``, ``completion_tokens``: what the API billed.
    ``cached_requests``, ``cached_prompt_tokens``, ``cached_completion_tokens``: what the llmutils
    cache served (not billed). ``cached_tokens``: the part of ``prompt_tokens`` the provider served
    from its prompt cache (billed at the cached-input price). ``reasoning_tokens``: the part of
    ``completion_tokens`` a reasoning model used to think (billed as output). ``batch_*``: the part
    of the billed counts answered through the Batch API (billed at its discount). ``cost``: USD, or None
    without a price (set by :meth:`UsageTracker.snapshot` and :meth:`UsageTracker.totals`).
    """

    requests: int = 0
    cached_requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    batch_requests: int = 0
    batch_prompt_tokens: int = 0
    batch_completion_tokens: int = 0
    batch_cached_tokens: int = 0
    cost: float | None = None

    @property
    def total_tokens(self) -> int:
        """Billed tokens: prompt plus completion."""
        return self.prompt_tokens + self.completion_tokens


class UsageTracker:
    """Thread-safe per-model totals of requests and tokens, with a cost estimate.

    Example::

        usage = UsageTracker(prices={"my-finetune": (3.0, 12.0)})
        usage.record("gpt-4o-2024-08-06", {"prompt_tokens": 12, "completion_tokens": 5}, cached=False)
        usage.totals().prompt_tokens   # 12
        usage.cost()                   # USD for billed tokens, or None if a model has no price
        usage.unpriced_models()        # [] : every billed model has a price

    :param prices: price overrides, model -> ``(input, output)`` or ``(input, output, cached_input)``
        in USD per 1M tokens, over the process-wide ones (:func:`set_prices`) and genai-prices.
    :param aliases: alias -> model, to price a gateway alias or an Azure deployment as its model;
        by default the ``MODEL_ALIASES`` setting, read when a cost is asked for.
    :raises ConfigError: a malformed price.
    """

    def __init__(
        self,
        *,
        prices: Mapping[str, tuple[float, ...]] | None = None,
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        self._prices = check_prices(prices or {})
        self._aliases = dict(aliases) if aliases is not None else None
        self._lock = threading.Lock()
        self._models: dict[str, ModelUsage] = {}
        self._unpriced_logged: set[str] = set()
        self._warned_bad_usage = False

    def record(
        self, model: str, usage: Mapping[str, Any] | Any | None, *, cached: bool = False, batch: bool = False
    ) -> bool:
        """Count one answer for ``model``; never raises.

        A usage whose counts are not numbers of tokens (``{"prompt_tokens": "n/a"}``, a negative or
        non-finite number) counts the answer with unknown (0) tokens; the first such usage is logged
        as a WARNING, later ones at DEBUG.

        :param usage: the API's usage (dict or object, chat or Responses field names) or None.
        :param cached: served from the llmutils cache (not billed).
        :param batch: billed through the Batch API (priced at its discount).
        :returns: False when ``usage`` could not be counted (its tokens are unknown), else True.
        """
        prompt = completion = prompt_cached = reasoning = 0
        counted = True
        if usage is not None:
            try:
                prompt = _count(usage, "prompt_tokens", "input_tokens")
                completion = _count(usage, "completion_tokens", "output_tokens")
                prompt_cached = _detail(usage, ("prompt_tokens_details", "input_tokens_details"), "cached_tokens")
                reasoning = _detail(usage, ("completion_tokens_details", "output_tokens_details"), "reasoning_tokens")
                if cached:  # the details are billed figures: a cache hit adds none of them
                    prompt_cached = reasoning = 0
            except Exception as exc:  # accounting never fails a call: count the answer, tokens unknown
                prompt = completion = prompt_cached = reasoning = 0
                counted = False
                self._bad_usage(model, usage, exc)
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
                totals.cached_tokens += prompt_cached
                totals.reasoning_tokens += reasoning
                if batch:
                    totals.batch_requests += 1
                    totals.batch_prompt_tokens += prompt
                    totals.batch_completion_tokens += completion
                    totals.batch_cached_tokens += prompt_cached
        return counted

    def _bad_usage(self, model: str, usage: Any, exc: Exception) -> None:
        """Log (a WARNING the first time, then at DEBUG) a usage that cannot be counted."""
        with self._lock:
            first, self._warned_bad_usage = not self._warned_bad_usage, True
        logger.log(
            logging.WARNING if first else logging.DEBUG,
            "the usage of a response for %r cannot be counted (%s; usage=%.200r); "
            "its tokens are counted as unknown (0)",
            model,
            exc,
            usage,
        )

    def snapshot(self) -> dict[str, ModelUsage]:
        """Per-model copies of the totals, each with its ``cost`` (None if unpriced)."""
        copies = self._copies()
        table, aliases = self._table(None), self._model_aliases()
        for model, totals in copies.items():
            totals.cost = self._model_cost(model, totals, table, aliases)
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

    def cost(self, prices: Mapping[str, tuple[float, ...]] | None = None) -> float | None:
        """Estimated USD for the billed tokens of every model.

        :param prices: overrides for this estimate only, over the tracker's and the process-wide ones.
        :returns: the sum, or None when a billed model has no price (see :meth:`unpriced_models`).
        :raises ConfigError: a malformed price.
        """
        table, aliases = self._table(prices), self._model_aliases()
        total = 0.0
        for model, totals in self._copies().items():
            cost = self._model_cost(model, totals, table, aliases)
            if cost is None:
                return None
            total += cost
        return total

    def unpriced_models(self, prices: Mapping[str, tuple[float, ...]] | None = None) -> list[str]:
        """The billed models that have no price (sorted): why :meth:`cost` is None; add them with ``prices=``."""
        table, aliases = self._table(prices), self._model_aliases()
        return sorted(
            model for model, totals in self._copies().items() if self._model_cost(model, totals, table, aliases) is None
        )

    def reset(self) -> None:
        """Forget every count."""
        with self._lock:
            self._models.clear()

    def _copies(self) -> dict[str, ModelUsage]:
        """Copies of the per-model totals."""
        with self._lock:
            return {model: dataclasses.replace(totals) for model, totals in self._models.items()}

    def _table(self, prices: Mapping[str, tuple[float, ...]] | None) -> dict[str, Price]:
        """The overrides in force: process-wide, then this tracker's, then ``prices``."""
        table = get_prices()
        table.update(self._prices)
        if prices:
            table.update(check_prices(prices))
        return table

    def _model_aliases(self) -> Mapping[str, str]:
        """The aliases given, else the ``MODEL_ALIASES`` setting in force."""
        if self._aliases is not None:
            return self._aliases
        from ._config import resolve

        return resolve().get("MODEL_ALIASES") or {}

    def _model_cost(
        self,
        model: str,
        totals: ModelUsage,
        table: Mapping[str, Price],
        aliases: Mapping[str, str],
    ) -> float | None:
        """USD for one model's billed tokens (its Batch API part at the discount); None without a price."""
        t = totals
        parts = [
            (t.prompt_tokens - t.batch_prompt_tokens, t.completion_tokens - t.batch_completion_tokens,
             t.cached_tokens - t.batch_cached_tokens, False),
            (t.batch_prompt_tokens, t.batch_completion_tokens, t.batch_cached_tokens, True),
        ]
        usd = 0.0
        for prompt, completion, cached, via_batch in parts:
            cost = token_cost(
                model,
                input_tokens=prompt,
                output_tokens=completion,
                cached_tokens=cached,
                batch=via_batch,
                overrides=table,
                aliases=aliases,
            )
            if cost is None:
                with self._lock:
                    first = model not in self._unpriced_logged
                    self._unpriced_logged.add(model)
                if first:
                    logger.debug(
                        "no price for model %r; its cost is unknown (add one with prices= or set_prices())", model
                    )
                return None
            usd += cost
        return usd
