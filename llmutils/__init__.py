"""llmutils: a synchronous, thread-safe client library for the OpenAI and Azure OpenAI APIs.

>>> import llmutils
>>> llmutils.force_api_type("mock")        # offline; "openai" (default) or "azure" for real calls
>>> llmutils.client().send_message([{"role": "user", "content": "Hello"}])
{'role': 'assistant', 'content': 'echo: Hello'}

Importing llmutils reads no file and loads none of its dependencies: every public name is imported
on first use (PEP 562), so ``from llmutils import OpenAIClient`` and ``llmutils.OpenAIClient`` work as
usual.
"""

# First, before the slow imports: Ctrl-C while the llmutils command starts exits 130 quietly.
from ._sigint import quiet_ctrl_c_while_starting as _quiet_ctrl_c_while_starting

_quiet_ctrl_c_while_starting()

import logging as _logging  # noqa: E402

from typing import TYPE_CHECKING as _TYPE_CHECKING  # noqa: E402

if _TYPE_CHECKING:
    from ._apis.stream import MessageStream as MessageStream
    from ._batch import BatchResult as BatchResult
    from ._batch import batch as batch
    from ._batch import map_calls as map_calls
    from .cache import CacheBackend as CacheBackend
    from .cache import CacheStats as CacheStats
    from .cache import RedisCache as RedisCache
    from .cache import SQLiteCache as SQLiteCache
    from .cache import copy_cache as copy_cache
    from .cache import import_pickle_cache as import_pickle_cache
    from .cache import open_cache as open_cache
    from ._clients import AzureClient as AzureClient
    from ._clients import CallInfo as CallInfo
    from ._clients import MockClient as MockClient
    from ._clients import OpenAIClient as OpenAIClient
    from ._clients import PreparedRequest as PreparedRequest
    from ._config import DEFAULTS as DEFAULTS
    from ._config import force_default_value as force_default_value
    from ._config import override_defaults as override_defaults
    from ._exceptions import AuthenticationError as AuthenticationError
    from ._exceptions import BatchAPIError as BatchAPIError
    from ._exceptions import CacheMissError as CacheMissError
    from ._exceptions import ConfigError as ConfigError
    from ._exceptions import ContentFilterError as ContentFilterError
    from ._exceptions import InvalidRequestError as InvalidRequestError
    from ._exceptions import LLMUtilsError as LLMUtilsError
    from ._exceptions import MalformedResponseError as MalformedResponseError
    from ._exceptions import NonTerminalError as NonTerminalError
    from ._exceptions import NotAttemptedError as NotAttemptedError
    from ._exceptions import OutputParseError as OutputParseError
    from ._exceptions import QuotaExceededError as QuotaExceededError
    from ._exceptions import RateLimitError as RateLimitError
    from ._exceptions import RetriesExhaustedError as RetriesExhaustedError
    from ._exceptions import StreamInterruptedError as StreamInterruptedError
    from ._exceptions import TemplateError as TemplateError
    from ._exceptions import TotalTimeoutError as TotalTimeoutError
    from ._ratelimit import RateLimiter as RateLimiter
    from ._ratelimit_redis import RedisRateLimiter as RedisRateLimiter
    from ._registry import client as client
    from ._registry import force_api_cache as force_api_cache
    from ._registry import force_api_type as force_api_type
    from ._registry import register_client as register_client
    from ._registry import registered_api_types as registered_api_types
    from ._retry import RetryPolicy as RetryPolicy
    from ._templates import LLMCall as LLMCall
    from ._templates import compose_messages as compose_messages
    from ._templates import render_template as render_template
    from ._templates import template_search_path as template_search_path
    from ._tokens import TokenCount as TokenCount
    from ._tokens import count_text_tokens as count_text_tokens
    from ._tokens import count_tokens as count_tokens
    from ._usage import ModelUsage as ModelUsage
    from ._usage import UsageTracker as UsageTracker
    from ._usage import set_prices as set_prices

# Every public name and the module that defines it. They are imported on first use (PEP 562), so
# ``import llmutils`` stays cheap: no jinja2, sqlitedict, tenacity, tqdm, openai or tiktoken until a
# name that needs them is touched.
_EXPORTS: dict[str, str] = {
    "AuthenticationError": "._exceptions",
    "AzureClient": "._clients",
    "BatchAPIError": "._exceptions",
    "BatchResult": "._batch",
    "CacheBackend": ".cache",
    "CacheMissError": "._exceptions",
    "CacheStats": ".cache",
    "CallInfo": "._clients",
    "ConfigError": "._exceptions",
    "ContentFilterError": "._exceptions",
    "DEFAULTS": "._config",
    "InvalidRequestError": "._exceptions",
    "LLMCall": "._templates",
    "LLMUtilsError": "._exceptions",
    "MalformedResponseError": "._exceptions",
    "MessageStream": "._apis.stream",
    "MockClient": "._clients",
    "ModelUsage": "._usage",
    "NonTerminalError": "._exceptions",
    "NotAttemptedError": "._exceptions",
    "OpenAIClient": "._clients",
    "PreparedRequest": "._clients",
    "OutputParseError": "._exceptions",
    "QuotaExceededError": "._exceptions",
    "RateLimitError": "._exceptions",
    "RateLimiter": "._ratelimit",
    "RedisRateLimiter": "._ratelimit_redis",
    "RedisCache": ".cache",
    "RetriesExhaustedError": "._exceptions",
    "RetryPolicy": "._retry",
    "SQLiteCache": ".cache",
    "StreamInterruptedError": "._exceptions",
    "TemplateError": "._exceptions",
    "TokenCount": "._tokens",
    "TotalTimeoutError": "._exceptions",
    "UsageTracker": "._usage",
    "batch": "._batch",
    "client": "._registry",
    "compose_messages": "._templates",
    "copy_cache": ".cache",
    "count_text_tokens": "._tokens",
    "count_tokens": "._tokens",
    "force_api_cache": "._registry",
    "force_api_type": "._registry",
    "force_default_value": "._config",
    "import_pickle_cache": ".cache",
    "map_calls": "._batch",
    "open_cache": ".cache",
    "override_defaults": "._config",
    "register_client": "._registry",
    "registered_api_types": "._registry",
    "render_template": "._templates",
    "set_prices": "._usage",
    "template_search_path": "._templates",
}


def __getattr__(name: str) -> object:
    """Import a public name's module on first use and keep the name in the package namespace."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

__version__ = "0.1.0"

# A library adds no handler of its own (the logging HOWTO): without this, Python's last-resort
# handler would print llmutils' WARNINGs to stderr in an application that never configured logging.
_logging.getLogger("llmutils").addHandler(_logging.NullHandler())

__all__ = [
    "AuthenticationError",
    "AzureClient",
    "BatchAPIError",
    "BatchResult",
    "CallInfo",
    "CacheBackend",
    "CacheMissError",
    "CacheStats",
    "ConfigError",
    "ContentFilterError",
    "DEFAULTS",
    "InvalidRequestError",
    "LLMCall",
    "LLMUtilsError",
    "MalformedResponseError",
    "MessageStream",
    "MockClient",
    "ModelUsage",
    "NonTerminalError",
    "NotAttemptedError",
    "OpenAIClient",
    "OutputParseError",
    "PreparedRequest",
    "QuotaExceededError",
    "RateLimitError",
    "RateLimiter",
    "RedisRateLimiter",
    "RedisCache",
    "RetriesExhaustedError",
    "RetryPolicy",
    "SQLiteCache",
    "StreamInterruptedError",
    "TemplateError",
    "TokenCount",
    "TotalTimeoutError",
    "UsageTracker",
    "batch",
    "client",
    "compose_messages",
    "copy_cache",
    "count_text_tokens",
    "count_tokens",
    "force_api_cache",
    "force_api_type",
    "force_default_value",
    "import_pickle_cache",
    "map_calls",
    "open_cache",
    "override_defaults",
    "register_client",
    "registered_api_types",
    "render_template",
    "set_prices",
    "template_search_path",
]
