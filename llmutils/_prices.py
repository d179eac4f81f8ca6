"""Prices: what a model's tokens cost in USD, from genai-prices with your overrides on top.

The price of a model is looked up, in order:

1. an override: :func:`llmutils.set_prices` (process-wide), ``UsageTracker(prices=...)`` /
   ``OpenAIClient(prices=...)`` (per tracker), and ``usage.cost(prices=...)`` (one call), later
   ones winning. An override is ``(input, output)`` or ``(input, output, cached_input)`` in USD
   per 1M tokens; without a cached-input price, cached input tokens cost the input price. A model
   name with a snapshot suffix (``gpt-4o-2024-08-06``) finds an override for its family
   (``gpt-4o``);
2. `genai-prices <https://github.com/pydantic/genai-prices>`_, pydantic's maintained price
   database (released monthly). Its data ships inside the package: nothing is downloaded, ever.
   It needs Python 3.11+; on 3.10 only the overrides price anything. A plain name is an OpenAI
   model; ``provider/model`` (a LiteLLM-style gateway name such as ``anthropic/claude-3-5-sonnet``)
   is looked up at that provider;
3. the same two steps for the model a ``MODEL_ALIASES`` entry names (``gpt-mock=gpt-4o-mini``,
   ``my-deployment=gpt-4o``): a gateway alias or an Azure deployment is priced as its model.

What is counted: ``input_tokens`` (cached ones included, as OpenAI reports ``prompt_tokens``) at
the input price, except ``cached_tokens`` at the cached-input price; ``output_tokens`` (reasoning
tokens included, as OpenAI reports ``completion_tokens``) at the output price: reasoning tokens are
billed as output. ``batch=True`` is a call made through the Batch API: genai-prices' batch prices
where it has them, else half of the standard price (OpenAI's Batch API discount, 50 %).

A model found nowhere has no price (``None``): it is never counted as free.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ._exceptions import ConfigError

__all__ = [
    "BATCH_DISCOUNT",
    "Price",
    "check_prices",
    "lookup_override",
    "token_cost",
]

#: What the Batch API charges relative to the standard price (OpenAI: 50 % off).
BATCH_DISCOUNT = 0.5

#: USD per 1M tokens: (input, output) or (input, output, cached input).
Price = tuple[float, ...]

# A suffix that names a snapshot of the same model: -2024-08-06 or -0613.
_SNAPSHOT_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{4})")
_BATCH_CONTEXT = {"processing": "batch"}


def check_prices(prices: Mapping[str, Any]) -> dict[str, Price]:
    """Validate a price table and return a copy with lower-cased model names.

    :param prices: model name -> ``(input, output)`` or ``(input, output, cached_input)``, USD per 1M tokens.
    :raises ConfigError: a price that is not two or three non-negative numbers (the message names the model).
    """
    checked: dict[str, Price] = {}
    for model, price in prices.items():
        try:
            numbers = tuple(float(x) for x in price)
        except (TypeError, ValueError):
            numbers = ()
        if len(numbers) not in (2, 3):
            raise ConfigError(
                f"price for {model!r} must be (USD per 1M input tokens, USD per 1M output tokens[, "
                f"USD per 1M cached input tokens]), got {price!r}"
            )
        if any(x < 0 for x in numbers):
            raise ConfigError(f"price for {model!r} must not be negative, got {price!r}")
        checked[str(model).lower()] = numbers
    return checked


def lookup_override(model: str, table: Mapping[str, Price]) -> Price | None:
    """The override for ``model``: an exact entry, else the longest entry it extends by a snapshot suffix."""
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


def token_cost(
    model: str,
    *,
    input_tokens: int,
    output_tokens: int,
    cached_tokens: int = 0,
    batch: bool = False,
    overrides: Mapping[str, Price] | None = None,
    aliases: Mapping[str, str] | None = None,
) -> float | None:
    """USD for one model's tokens, or None when neither an override nor genai-prices knows the model.

    :param model: the model (or Azure deployment, or gateway alias) the tokens were billed under.
    :param input_tokens: prompt tokens, the provider's prompt-cache hits included.
    :param output_tokens: completion tokens, reasoning tokens included.
    :param cached_tokens: the part of ``input_tokens`` served from the provider's prompt cache.
    :param batch: the tokens went through the Batch API (discounted).
    :param overrides: price overrides (already checked with :func:`check_prices`).
    :param aliases: ``MODEL_ALIASES`` (alias -> model), tried when ``model`` itself has no price.
    """
    if input_tokens == 0 and output_tokens == 0:
        return 0.0
    cached_tokens = min(max(cached_tokens, 0), input_tokens)
    names = [model]
    alias = (aliases or {}).get(model)
    if alias and alias != model:
        names.append(alias)
    for name in names:
        price = lookup_override(name, overrides or {})
        if price is not None:
            cached_price = price[2] if len(price) > 2 else price[0]
            usd = (
                (input_tokens - cached_tokens) * price[0] + cached_tokens * cached_price + output_tokens * price[1]
            ) / 1_000_000
            return usd * BATCH_DISCOUNT if batch else usd
        usd_or_none = _genai_price(name, input_tokens, output_tokens, cached_tokens, batch)
        if usd_or_none is not None:
            return usd_or_none
    return None


def _genai_price(model: str, input_tokens: int, output_tokens: int, cached_tokens: int, batch: bool) -> float | None:
    """The price genai-prices' bundled data gives, or None when it does not know the model."""
    try:
        from genai_prices import Usage, calc_price  # imported on the first cost, not with llmutils
    except ImportError:  # Python 3.10: genai-prices needs 3.11; only the overrides price anything
        return None

    provider = "litellm" if "/" in model else "openai"  # litellm: "provider/model" names the provider
    usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens, cache_read_tokens=cached_tokens or None)
    try:
        result = calc_price(usage, model, provider_id=provider)
        if not batch:
            return float(result.total_price)
        if any(dict(variant.when) == _BATCH_CONTEXT for variant in result.model.price_variants or ()):
            return float(calc_price(usage, model, provider_id=provider, price_context=_BATCH_CONTEXT).total_price)
        return float(result.total_price) * BATCH_DISCOUNT
    except LookupError:
        return None
