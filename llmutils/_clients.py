"""The client family: :class:`OpenAIClient`, :class:`AzureClient` and the offline :class:`MockClient`.

One client is meant to be shared by every thread of a process. Each call resolves its settings
once (config file, environment, forced values, context overrides, call arguments), makes one
:class:`~llmutils._deadline.Deadline` from ``total_timeout``, builds its request body with the
pure builders of :mod:`llmutils._apis`, and goes through the one send path, :meth:`OpenAIClient._call`:
the cache (through the :class:`~llmutils.CacheBackend` protocol, single-flight included), then the
limiters and the retry policy around :meth:`OpenAIClient._open_stream`, the single place a request
leaves the client. The SDK (and its connection pool) is created once per client, on first use, and
again in a child after ``os.fork``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import math
import os
import re
import socket
import threading
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, ParamSpec, TypeVar

from ._apis import chat as _chat
from ._apis import embeddings as _embeddings
from ._apis import responses as _responses
from ._apis.chat import build_chat_request, check_chat_response, fewer_choices, read_chat_response
from ._apis.embeddings import build_embeddings_request, check_embeddings_response, read_embeddings_response
from ._apis.responses import (
    check_response,
    finish_reason,
    input_as_messages,
    is_responses_model,
    normalize_usage,
    output_from_message,
    request_from_chat,
    to_chat_message,
)
from ._apis.stream import ChatStreamAssembler, MessageStream, ResponsesStreamAssembler, StreamReader, completion_events, response_events
from ._config import UNSET, api_key_from_env, is_azure_v1, resolve, resolved, validate
from ._deadline import Deadline
from ._exceptions import (
    AuthenticationError,
    CacheMissError,
    ConfigError,
    ContentFilterError,
    InvalidRequestError,
    LLMUtilsError,
    NonTerminalError,
    QuotaExceededError,
    RateLimitError,
    StreamInterruptedError,
)
from ._http import (
    RETRYABLE_STATUS,
    answer_context,
    error_fields,
    is_quota_exhausted,
    is_validation_error,
    retry_decision,
    with_answer,
)
from ._imports import importing, lazy_import
from ._otel import StreamSpan, call_span, start_stream_span
from ._ratelimit import ConcurrencyLimiter, RateLimiter
from ._ratelimit_redis import RedisRateLimiter, rate_limit_name
from ._retry import RetryPolicy
from ._tokens import loading_within
from ._usage import UsageTracker
from .cache import CacheStats, make_key, mask_url, open_cache
from .cache.keys import non_json

if TYPE_CHECKING:
    import httpx2

    from .cache import CacheBackend

__all__ = ["AzureClient", "CallInfo", "Message", "MockClient", "OpenAIClient", "PreparedRequest"]

logger = logging.getLogger("llmutils")

Message = dict[str, Any]

_DRAIN_SECONDS = 1.0  # how long the end of a stream's body may take after its end event
_READ_CHUNK = 65536  # bytes asked of the socket per read of a response body

# A response check run inside each attempt: raises NonTerminalError for a malformed 200 (retried,
# never cached) or a terminal LLMUtilsError.
ResponseCheck = Callable[[Mapping[str, Any]], None]


def _check_messages(messages: Any, *, items: bool = False) -> bool:
    """Messages must be a non-empty list of dicts with a role (``items``: or Responses items with a type).

    Returns whether a Responses item (no role) was let through, which only the Responses API takes.
    """
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError(
            f"messages must be a non-empty list of dicts like {{'role': 'user', 'content': '...'}}, "
            f"got {type(messages).__name__}"
        )
    found_items = False
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequestError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        if items and "role" not in message and isinstance(message.get("type"), str):
            found_items = True
            continue
        if not isinstance(message.get("role"), str):
            raise InvalidRequestError(f"messages[{i}] has no 'role' (a string such as 'user'): {message!r:.80}")
    return found_items


# The typed arguments of send_message, in signature order.
_SEND_MESSAGE_TYPES: tuple[tuple[str, tuple[type, ...]], ...] = (
    ("model", (str,)),
    ("temperature", (int, float)),
    ("max_tokens", (int,)),
    ("top_p", (int, float)),
    ("frequency_penalty", (int, float)),
    ("presence_penalty", (int, float)),
    ("stop", (str, list)),
    ("timeout", (int, float)),
    ("total_timeout", (int, float)),
    ("max_attempts", (int,)),
    ("waiting_time", (int, float)),
    ("exponential_backoff_factor", (int, float)),
)


_MAX_N = 128  # the API's limit on choices per request


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _bounded_recursion(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """A request nested thousands deep (or referring to itself) is an InvalidRequestError, not a RecursionError."""

    @functools.wraps(method)
    def call(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(*args, **kwargs)
        except RecursionError:
            raise InvalidRequestError(
                "the request is nested too deeply (or refers to itself) to be sent as JSON; nothing was sent"
            ) from None

    return call


def _check_type(name: str, value: Any, kinds: tuple[type, ...]) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, kinds):
        expected = " or ".join(k.__name__ for k in kinds)
        raise InvalidRequestError(f"{name} must be {expected}, got {value!r:.60}")


def _check_positive(**values: Any) -> None:
    """Counts and durations must be > 0 (``n`` must be a whole number); None means "not given"."""
    for name, value in values.items():
        if name == "n" and (isinstance(value, bool) or not isinstance(value, int) or value > _MAX_N):
            raise InvalidRequestError(f"n must be an int from 1 to {_MAX_N} (the API's limit), got {value!r:.60}")
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise InvalidRequestError(f"{name} must be > 0 (and finite), got {value!r}")



def _check_call(api: str | None, messages: Any, n: int, given: tuple[Any, ...]) -> bool:
    """The argument checks send_message, stream_message and build_request share, before anything is
    built or sent: ``api``, the messages, the typed arguments (``given``, in ``_SEND_MESSAGE_TYPES``
    order) and the counts and durations. Returns whether the messages hold Responses items."""
    if api is not None and api not in ("chat", "responses"):
        raise InvalidRequestError(f"api must be 'chat' or 'responses', got {api!r:.60}")
    has_items = _check_messages(messages, items=api != "chat")
    for (name, kinds), value in zip(_SEND_MESSAGE_TYPES, given, strict=True):
        if value is not None and value is not UNSET:
            _check_type(name, value, kinds)
    timeout, total_timeout, max_attempts = given[7], given[8], given[9]
    if n != 1 or timeout is not None or total_timeout is not None or max_attempts is not None:
        _check_positive(n=n, timeout=timeout, total_timeout=total_timeout, max_attempts=max_attempts)
    return has_items

def _shared_error(error: LLMUtilsError) -> LLMUtilsError:
    """A copy of the leader's terminal error for a waiter (no request of its own: attempts=0)."""
    clone = copy.copy(error)
    clone.attempts = 0
    clone.__cause__ = error
    clone.__traceback__ = None
    return clone


def _surrogate_error(params: Mapping[str, Any]) -> InvalidRequestError:
    """The error for a request body holding a lone surrogate, naming where."""
    where = _lone_surrogate(params) or "the request"
    return InvalidRequestError(
        f"{where} holds a lone surrogate, which is not valid Unicode and cannot be sent as UTF-8 JSON; "
        "nothing was sent. Repair the text first, e.g. text.encode('utf-16', 'surrogatepass').decode('utf-16', 'replace')"
    )


def _lone_surrogate(obj: Any, where: str = "", depth: int = 0) -> str | None:
    """Where in a request body the first string with a lone surrogate is (``messages[0]['content']``)."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return where or "a string"
        return None
    if depth > 50:
        return None
    items = obj.items() if isinstance(obj, Mapping) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = _lone_surrogate(value, f"{where}[{key!r}]" if where else str(key), depth + 1)
        if found is not None:
            return found
    return None


_KEY_TOKEN = re.compile(r"[^\s'\"`()\[\]{}<>,;]+")


def _checked_key(key: str, source: str) -> str:
    """``key`` if it can be a key; AuthenticationError naming ``source`` (never the key) otherwise."""
    problem = None
    if key != key.strip():
        problem = "a newline" if key.strip(" \t") != key.strip() or "\n" in key or "\r" in key else "surrounding spaces"
        problem = f"{problem} at its start or end"
    elif any(ch.isspace() for ch in key):
        problem = "whitespace inside it"
    elif any(not ch.isprintable() for ch in key):
        problem = "a control character"
    if problem is None:
        return key
    raise AuthenticationError(
        f"The API key from {source} has {problem} (as `KEY=$(cat key.txt)` or a pasted key gives); "
        "no request was sent. Set it again without the whitespace, e.g. KEY=$(tr -d '[:space:]' < key.txt)."
    )


def _scrub_key(text: str, key: str | None) -> str:
    """``text`` without ``key``, whole or in part: words that start with its first 4 characters or end
    with its last 4 (as gateways quote ``sk-ab****wxyz``) become ``***``."""
    if not key or not text:
        return text
    text = text.replace(key, "***")
    if len(key) < 8:
        return text
    head, tail = key[:4], key[-4:]

    def hide(match: re.Match[str]) -> str:
        word = match.group(0)
        core = word.rstrip(".:!?")
        if core.startswith(head) or core.endswith(tail):
            return "***" + word[len(core) :]
        return word

    return _KEY_TOKEN.sub(hide, text)


def _scrub_sdk_error(exc: Any, key: str | None) -> None:
    """Scrub ``key`` from an SDK status error in place (message, args, body), before it is chained."""
    if not key:
        return
    message = getattr(exc, "message", None)
    if isinstance(message, str):
        exc.message = _scrub_key(message, key)
    exc.args = tuple(_scrub_key(a, key) if isinstance(a, str) else a for a in exc.args)
    body = getattr(exc, "body", None)
    if isinstance(body, Mapping):
        error = body.get("error")
        target = error if isinstance(error, dict) else body if isinstance(body, dict) else None
        if target is not None and isinstance(target.get("message"), str):
            target["message"] = _scrub_key(target["message"], key)


def _reject_constant(name: str) -> Any:
    """``json.loads`` hook: NaN and Infinity are not JSON (an answer holding one could never be cached)."""
    raise ValueError(f"{name} is not a JSON value")


def _shut_down(http: Any) -> None:
    """Shut the socket of ``http`` down so a blocked read returns at once (the deadline passed)."""
    stream = http.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _as_events(raw: bytes) -> bytes:
    """A whole (non-streamed) JSON answer as the SSE bytes of its stream: one event, then the end."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise NonTerminalError("a streamed request got a body that is neither SSE nor JSON") from exc
    if isinstance(body, dict) and isinstance(body.get("choices"), list):  # chat.completion -> one chunk
        choices = [{**c, "delta": c.get("message") or {}} for c in body["choices"] if isinstance(c, dict)]
        return f"data: {json.dumps({**body, 'choices': choices})}\n\ndata: [DONE]\n\n".encode()
    if isinstance(body, dict) and body.get("object") == "response":
        return f"data: {json.dumps({'type': 'response.completed', 'response': body})}\n\n".encode()
    raise NonTerminalError("a streamed request got a JSON body that is not an answer")


class CallInfo(NamedTuple):
    """What happened in one call: served from the cache or not, the model, the API's usage, and the
    warnings the call logged about its answer (e.g. fewer choices than ``n``).

    ``kind`` is ``chat``, ``responses`` or ``embedding``. ``usage`` is the API's usage with the same
    flat fields for both APIs added: ``prompt_tokens``, ``completion_tokens``, ``total_tokens``,
    ``cached_tokens`` (served from the provider's prompt cache) and ``reasoning_tokens``.
    ``finish_reason`` says why the answer ended, in chat's words (``stop``, ``length``,
    ``tool_calls``, ``content_filter``); an incomplete Responses answer cut at
    ``max_output_tokens`` is ``length``.
    """

    kind: str
    model: str
    cached: bool
    usage: Mapping[str, Any] | None
    warnings: tuple[str, ...] = ()
    finish_reason: str | None = None


class PreparedRequest(NamedTuple):
    """A request built but not sent: what :meth:`OpenAIClient.send_message` would send, and its cache key.

    ``kind`` is the API (``chat`` or ``responses``), ``path`` its endpoint path
    (``/chat/completions`` or ``/responses``), ``body`` the JSON body, ``cache_key`` the key its
    answer is stored under in the cache, and ``endpoint`` the server it goes to, as shown in
    messages (any password in the URL masked). Made by :meth:`OpenAIClient.build_request`.
    """

    kind: str
    path: str
    body: dict[str, Any]
    cache_key: str
    endpoint: str


class _Flight:
    """One request in flight; identical requests wait for it instead of calling the API too.

    When it ends with a terminal error (one that the same request would get again: a 400, a
    rejected key, the content filter), the waiters raise it too instead of sending.
    """

    def __init__(self) -> None:
        self.done = threading.Event()
        self.response: dict[str, Any] | None = None
        self.error: LLMUtilsError | None = None


_live_clients: weakref.WeakSet[OpenAIClient] = weakref.WeakSet()


def _reset_clients_in_child() -> None:
    """After ``os.fork``: the child has only the forking thread, so locks another thread held and
    requests other threads had in flight are gone; start each client's shared state afresh."""
    for client in list(_live_clients):
        client._lock = threading.Lock()
        client._inflight = {}
        client._limits = {}


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_clients_in_child)


class OpenAIClient:
    """A thread-safe client for the OpenAI API or any OpenAI-compatible endpoint.

    >>> client = OpenAIClient()                      # key from OPENAI_API_KEY
    >>> client.send_message([{"role": "user", "content": "Hello"}], temperature=0)
    {'role': 'assistant', 'content': 'Hi! How can I help?'}
    >>> local = OpenAIClient(base_url="http://localhost:11434/v1", model="llama3.2")  # Ollama

    Constructor arguments apply to this client above config files, the environment and forced or
    context defaults; per-call arguments apply above them. ``retry`` injects a whole
    :class:`RetryPolicy`; ``sleep`` only replaces how it waits (tests record the waits). ``api``
    (``"chat"`` or ``"responses"``) chooses the endpoint of :meth:`send_message`;
    :meth:`create_response` calls the Responses API with its own parameters.
    """

    api_type = "openai"
    _key_env_vars: tuple[str, ...] = ("OPENAI_API_KEY",)

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        organization: str | None = None,
        model: str | None = None,
        embedding_model: str | None = None,
        cache_api_calls: bool | None = None,
        cache_file_name: str | os.PathLike[str] | None = None,
        cache_url: str | None = None,
        cache_mode: str | None = None,
        cache_ttl: float | None = None,
        cache_memory_items: int | None = None,
        rpm: float | None = None,
        tpm: float | None = None,
        max_concurrent_calls: int | None = None,
        rate_limit_url: str | None = None,
        rate_limit_name: str | None = None,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] | None = None,
        default_headers: Mapping[str, str] | None = None,
        prices: Mapping[str, tuple[float, float]] | None = None,
        api: str | None = None,
    ) -> None:
        self._api_key = api_key
        self._organization = organization
        self._default_headers = dict(default_headers or {})
        self._retry = retry
        self._sleep = sleep
        given = {}
        for name, value in (
            ("BASE_URL", base_url),
            ("MODEL", model),
            ("EMBEDDING_MODEL", embedding_model),
            ("CACHE_API_CALLS", cache_api_calls),
            ("CACHE_FILE_NAME", os.fspath(cache_file_name) if cache_file_name is not None else None),
            ("CACHE_URL", cache_url),
            ("CACHE_MODE", cache_mode),
            ("CACHE_TTL", cache_ttl),
            ("CACHE_MEMORY_ITEMS", cache_memory_items),
            ("RPM", rpm),
            ("TPM", tpm),
            ("MAX_CONCURRENT_MODEL_CALLS", max_concurrent_calls),
            ("RATE_LIMIT_URL", rate_limit_url),
            ("RATE_LIMIT_NAME", rate_limit_name),
            ("API", api),
        ):
            if value is not None:
                given[name] = value
        self._client_settings = validate(given, f"{type(self).__name__}()")
        self._prices = dict(prices) if prices is not None else None
        self._start()

    def _start(self) -> None:
        """The state a client builds for itself (on construction, and where it is unpickled)."""
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._sdk_clients: dict[tuple[Any, ...], Any] = {}
        self._caches: dict[tuple[str, str, str, float | None, int], CacheBackend] = {}
        self._limits: dict[tuple[Any, ...], tuple[RateLimiter | RedisRateLimiter, ConcurrencyLimiter]] = {}
        self._inflight: dict[str, _Flight] = {}
        self._local = threading.local()
        _live_clients.add(self)
        self.usage = UsageTracker(prices=self._prices)
        """Requests and tokens per model, billed and served from cache apart (see UsageTracker)."""

    # -- pickling ------------------------------------------------------------------------------

    # Built by _start() (or lazily on first use), never pickled: connections, locks, caches,
    # limiters, requests in flight, per-thread call info, counters.
    _RUNTIME = frozenset(
        {"_lock", "_pid", "_sdk_clients", "_caches", "_limits", "_inflight", "_local", "usage"}
    )

    def __getstate__(self) -> dict[str, Any]:
        """Pickle to the configuration only, so a client can go to a process pool or a Dask worker.

        What travels: the constructor's settings (and ``set_api_cache`` changes), an explicit
        ``api_key=``, the organization, default headers, prices, an injected ``retry``/``sleep``.
        What does not: connections, locks, open caches, limiters, requests in flight, usage
        counters; they are built again, lazily, where the client is unpickled. A key that came
        from the environment (``OPENAI_API_KEY``, ...) is not part of the client: the worker reads
        its own environment. Config files and the environment are read there too.
        """
        return {k: v for k, v in self.__dict__.items() if k not in self._RUNTIME}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Rebuild from :meth:`__getstate__`: the configuration, and fresh runtime state."""
        self.__dict__.update(state)
        self._start()

    # -- configuration -------------------------------------------------------------------------

    def set_api_cache(self, cache_api_calls: bool, cache_file_name: str | os.PathLike[str] | None = None) -> None:
        """Turn this client's cache on or off (and choose its file), as the old module did."""
        values: dict[str, Any] = {"CACHE_API_CALLS": bool(cache_api_calls)}
        if cache_file_name is not None:  # a store named here is the store: no CACHE_URL from anywhere
            values["CACHE_FILE_NAME"] = os.fspath(cache_file_name)
            values["CACHE_URL"] = None
        self._client_settings = {**self._client_settings, **validate(values, "set_api_cache()")}

    @property
    def last_call(self) -> CallInfo | None:
        """What the calling thread's most recent call did (cached or not, usage), or None."""
        return getattr(self._local, "info", None)

    def settings(self) -> dict[str, Any]:
        """The settings this client would use for a call made now (no per-call arguments)."""
        return resolve(self._client_settings, validated=True)

    def _settings(self) -> Mapping[str, Any]:
        """:meth:`settings`, memoised and shared: resolved once per call, never modified."""
        return resolved(self._client_settings, validated=True)

    def __repr__(self) -> str:
        try:
            endpoint = self._display(self.settings())
        except LLMUtilsError:
            endpoint = "<not configured>"
        return f"<{type(self).__name__} endpoint={endpoint!r}>"

    # -- the public calls ----------------------------------------------------------------------

    @_bounded_recursion
    def send_message(
        self,
        messages: list[Message],
        model: str | None = None,
        temperature: float | None = UNSET,
        max_tokens: int | None = UNSET,
        top_p: float | None = UNSET,
        frequency_penalty: float | None = UNSET,
        presence_penalty: float | None = UNSET,
        stop: str | list[str] | None = None,
        timeout: float | None = None,
        max_attempts: int | None = None,
        waiting_time: float | None = None,
        exponential_backoff_factor: float | None = None,
        n: int = 1,
        *,
        total_timeout: float | None = None,
        api: str | None = None,
        **more: Any,
    ) -> Message | list[Message]:
        """Send a chat request and return the assistant message as a plain dict.

        With ``n > 1`` the result is a list of the message dicts, in choice order: ``n`` of them,
        or fewer when the server ignored ``n`` (one WARNING naming the server and both counts, and
        ``last_call.warnings`` says so). ``**more`` is passed to the API as is
        (``response_format``, ``seed``, ``tools``, ``tool_choice``, ``max_completion_tokens``,
        ``reasoning_effort``, ...). Only what is set is sent: sampling arguments left out come from
        the configuration (unset by default), and ``None`` turns a configured one off. Raises an
        :class:`LLMUtilsError` subclass on failure, never returns None.

        ``api`` (else the ``API`` setting, else ``responses`` for a model in ``RESPONSES_MODELS``,
        else ``chat``) chooses the endpoint. On ``responses`` the same arguments are mapped to the
        Responses API and the answer comes back in the same chat shape (``n`` > 1 is refused).
        """
        has_items = _check_call(
            api, messages, n, (model, temperature, max_tokens, top_p, frequency_penalty, presence_penalty, stop, timeout,
                               total_timeout, max_attempts, waiting_time, exponential_backoff_factor)
        )
        if more.get("stream"):
            raise InvalidRequestError(
                "stream=True is not supported by send_message, which returns whole answers; "
                "use client.stream_message(...) to receive the answer as it is generated"
            )
        settings = self._settings()
        deadline = Deadline(self._total_timeout(settings, total_timeout))
        params = build_chat_request(
            settings,
            messages,
            model=model,
            temperature=temperature,
            max_tokens=max_tokens,
            top_p=top_p,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            stop=stop,
            n=n,
            more=more,
        )

        def policy() -> RetryPolicy:
            return self._policy(settings, timeout, total_timeout, max_attempts, waiting_time, exponential_backoff_factor)

        timeout_s = float(timeout if timeout is not None else settings["TIMEOUT"])
        if self._api(settings, params["model"], api) == "responses":
            body = request_from_chat(params)  # refuses n > 1 before anything is sent

            def check(response: Mapping[str, Any]) -> None:
                check_response(response, message=True)

            response = self._call(_responses.KIND, _responses.PATH, body, settings, deadline, timeout_s, check, policy)
            check(response)  # also for entries stored by older versions
            info = self.last_call
            if info is not None:
                self._local.info = info._replace(finish_reason=finish_reason(response, stop=stop))
            return to_chat_message(response, stop=stop)
        if has_items:
            _check_messages(messages)  # a Responses item (no role) cannot go to chat: says which
        response = self._call(_chat.KIND, _chat.PATH, params, settings, deadline, timeout_s, check_chat_response, policy)
        answer = read_chat_response(response, n)
        came = fewer_choices(response, n)
        if came is not None:
            warning = (
                f"{self._display(settings)} returned {came} choice(s) for n={n} "
                f"(model {params['model']!r}); returning the {came} that came (the server may ignore n)"
            )
            logger.warning(warning)
            info = self.last_call
            if info is not None:
                self._local.info = info._replace(warnings=(warning,))
        return answer

    @_bounded_recursion
    def create_response(
        self,
        *,
        model: str | None = None,
        timeout: float | None = None,
        total_timeout: float | None = None,
        max_attempts: int | None = None,
        **params: Any,
    ) -> dict[str, Any]:
        """Call the Responses API with ``params`` as they are and return its JSON answer as a dict.

        For what :meth:`send_message` does not express: built-in tools, ``previous_response_id``,
        ``conversation``, ``store``, ``include``, ``prompt_cache_key``, ``service_tier``, ... The
        call goes through the same cache (every sent parameter is part of the key), single-flight,
        retries, limits, deadline and usage accounting. ``model`` defaults to the ``MODEL`` setting.
        A ``background=True`` request is never cached (its answer is not finished).

        :param timeout: seconds for one HTTP attempt (``TIMEOUT``); not sent.
        :param total_timeout: seconds for the whole call, retries included (``TOTAL_TIMEOUT``); not sent.
        :param max_attempts: attempts, the first included (``MAX_ATTEMPTS``); not sent.
        :raises InvalidRequestError: no ``input`` (nor ``previous_response_id``, ``conversation`` or
            ``prompt``), ``stream=True``, or a bad argument; before anything is sent.
        :raises ContentFilterError: the answer is ``incomplete`` because of the content filter.
        :raises LLMUtilsError: a ``failed`` response, mapped like HTTP errors (``server_error`` is
            retried).
        """
        for name, value, kinds in (
            ("model", model, (str,)),
            ("timeout", timeout, (int, float)),
            ("total_timeout", total_timeout, (int, float)),
            ("max_attempts", max_attempts, (int,)),
        ):
            _check_type(name, value, kinds)
        _check_positive(timeout=timeout, total_timeout=total_timeout, max_attempts=max_attempts)
        if params.get("stream"):
            raise InvalidRequestError("stream=True is not supported by create_response; it returns whole answers")
        if params.get("input") is None and not any(params.get(k) for k in ("previous_response_id", "conversation", "prompt")):
            raise InvalidRequestError(
                "create_response needs input= (a string or a list of items), or previous_response_id=, conversation= or prompt="
            )
        if "input" in params and not isinstance(params["input"], (str, list)):
            raise InvalidRequestError(f"input must be a string or a list of items, got {type(params['input']).__name__}")
        settings = self._settings()
        deadline = Deadline(self._total_timeout(settings, total_timeout))
        body = {"model": model or settings["MODEL"], **params}
        if params.get("background"):
            settings = {**settings, "CACHE_API_CALLS": False}

        def policy() -> RetryPolicy:
            return self._policy(settings, timeout, total_timeout, max_attempts, None, None)

        def check(response: Mapping[str, Any]) -> None:
            check_response(response, message=False)

        timeout_s = float(timeout if timeout is not None else settings["TIMEOUT"])
        response = self._call(_responses.KIND, _responses.PATH, body, settings, deadline, timeout_s, check, policy)
        check(response)
        return response

    def _api(self, settings: Mapping[str, Any], model: str, api: str | None) -> str:
        """The API a call goes to: ``api``, else the ``API`` setting, else by ``RESPONSES_MODELS``."""
        if api is not None:
            return api
        if settings["API"] is not None:
            return str(settings["API"])
        name = settings["MODEL_ALIASES"].get(model, model)
        return "responses" if is_responses_model(name, settings["RESPONSES_MODELS"]) else "chat"

    @_bounded_recursion
    def get_embedding(self, text: str, model: str | None = None, **more: Any) -> list[float]:
        """Return the embedding vector of ``text`` (cached like chat calls when the cache is on)."""
        if not isinstance(text, str):
            raise InvalidRequestError(f"text must be a str, got {type(text).__name__}; use get_embeddings() for a list")
        return self.get_embeddings([text], model=model, **more)[0]

    @_bounded_recursion
    def get_embeddings(self, texts: Sequence[str], model: str | None = None, **more: Any) -> list[list[float]]:
        """Return one embedding vector per text, in order, in one request."""
        if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts or not all(isinstance(t, str) for t in texts):
            raise InvalidRequestError(f"texts must be a non-empty list of str, got {type(texts).__name__}")
        _check_type("model", model, (str,))
        timeout = more.pop("timeout", None)
        total_timeout = more.pop("total_timeout", None)
        max_attempts = more.pop("max_attempts", None)
        for name, value, kinds in (
            ("timeout", timeout, (int, float)),
            ("total_timeout", total_timeout, (int, float)),
            ("max_attempts", max_attempts, (int,)),
        ):
            _check_type(name, value, kinds)
        _check_positive(timeout=timeout, total_timeout=total_timeout, max_attempts=max_attempts)
        settings = self._settings()
        deadline = Deadline(self._total_timeout(settings, total_timeout))
        params = build_embeddings_request(settings, texts, model=model, more=more)
        expected = len(params["input"])

        def policy() -> RetryPolicy:
            return self._policy(settings, timeout, total_timeout, max_attempts, None, None)

        def check(body: Mapping[str, Any]) -> None:
            check_embeddings_response(body, expected)

        timeout_s = float(timeout if timeout is not None else settings["TIMEOUT"])
        response = self._call(_embeddings.KIND, _embeddings.PATH, params, settings, deadline, timeout_s, check, policy)
        return read_embeddings_response(response, expected)

    # -- streaming -----------------------------------------------------------------------------

    @_bounded_recursion
    def stream_message(
        self,
        messages: list[Message],
        model: str | None = None,
        temperature: float | None = UNSET,
        max_tokens: int | None = UNSET,
        top_p: float | None = UNSET,
        frequency_penalty: float | None = UNSET,
        presence_penalty: float | None = UNSET,
        stop: str | list[str] | None = None,
        timeout: float | None = None,
        max_attempts: int | None = None,
        waiting_time: float | None = None,
        exponential_backoff_factor: float | None = None,
        n: int = 1,
        *,
        total_timeout: float | None = None,
        api: str | None = None,
        **more: Any,
    ) -> MessageStream:
        """Send a chat request and return the answer as a :class:`MessageStream` of text deltas.

        Takes the same arguments as :meth:`send_message` (``api="responses"`` streams the Responses
        API's events). The request is opened, retried and checked here, up to its first content:
        connection errors, 429, 5xx, timeouts and streams that break before any content are retried
        like ``send_message`` and raise from this call. After that, a broken or stalled stream
        raises :class:`StreamInterruptedError` from the loop (never retried). ``timeout`` bounds each
        wait for the next chunk, ``total_timeout`` the whole stream. A completed stream is cached
        under the same key as the equivalent ``send_message``; a cache hit is replayed in pieces
        without a request.

        >>> with client.stream_message([{"role": "user", "content": "Hi"}]) as stream:
        ...     for text in stream:
        ...         print(text, end="", flush=True)
        """
        _check_call(
            api, messages, 1, (model, temperature, max_tokens, top_p, frequency_penalty, presence_penalty, stop, timeout,
                               total_timeout, max_attempts, waiting_time, exponential_backoff_factor)
        )
        if n != 1:
            raise InvalidRequestError(f"stream_message streams one answer: n must be 1, got {n!r}; use send_message(n=...)")
        if "stream" in more and not more.pop("stream"):
            raise InvalidRequestError("stream=False makes no sense for stream_message; use send_message(...)")
        stream_options = more.pop("stream_options", None)
        settings = self.settings()
        deadline = Deadline(self._total_timeout(settings, total_timeout))
        params = build_chat_request(
            settings,
            messages,
            model=model,
            temperature=temperature,
            max_tokens=max_tokens,
            top_p=top_p,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            stop=stop,
            n=1,
            more=more,
        )
        timeout_s = float(timeout if timeout is not None else settings["TIMEOUT"])
        policy = self._policy(settings, timeout, total_timeout, max_attempts, waiting_time, exponential_backoff_factor)
        if self._api(settings, params["model"], api) == "responses":
            # The key is send_message's on Responses: ``stream`` is transport, not part of it.
            body = request_from_chat(params)
            wire = {**body, "stream": True}
            if stream_options is not None:
                wire["stream_options"] = stream_options

            def check(response: Mapping[str, Any]) -> None:
                check_response(response, message=True)

            return self._message_stream(
                _responses.KIND, _responses.PATH, body, wire, ResponsesStreamAssembler, check,
                lambda response: to_chat_message(response, stop=stop),
                settings, policy, deadline, timeout_s,
            )
        _check_messages(messages)  # a Responses item (no role) cannot go to chat
        # The key is send_message's: ``stream`` and ``stream_options`` are transport, not part of it.
        wire = {**params, "stream": True, "stream_options": stream_options or {"include_usage": True}}
        return self._message_stream(
            _chat.KIND, _chat.PATH, params, wire, ChatStreamAssembler, check_chat_response,
            lambda response: read_chat_response(response, 1),
            settings, policy, deadline, timeout_s,
        )

    def _message_stream(
        self,
        kind: str,
        path: str,
        params: dict[str, Any],
        wire: dict[str, Any],
        assembler: Callable[[], ChatStreamAssembler | ResponsesStreamAssembler],
        check: ResponseCheck,
        read: Callable[[Mapping[str, Any]], Message],
        settings: Mapping[str, Any],
        policy: RetryPolicy,
        deadline: Deadline,
        timeout: float,
    ) -> MessageStream:
        """A cache hit replayed as a stream, a CacheMissError in replay mode, or the live stream.

        Its OpenTelemetry span starts here and ends with the stream; it is never current between
        deltas (:class:`llmutils._otel.StreamSpan`).
        """
        span = start_stream_span(kind, str(params.get("model")), provider=self.api_type,
                                 server_url=lambda: self._endpoint(settings), params=params)
        with span.opening():
            return self._message_stream_in(kind, path, params, wire, assembler, check, read, settings, policy, deadline,
                                           timeout, span)

    def _message_stream_in(
        self,
        kind: str,
        path: str,
        params: dict[str, Any],
        wire: dict[str, Any],
        assembler: Callable[[], ChatStreamAssembler | ResponsesStreamAssembler],
        check: ResponseCheck,
        read: Callable[[Mapping[str, Any]], Message],
        settings: Mapping[str, Any],
        policy: RetryPolicy,
        deadline: Deadline,
        timeout: float,
        span: StreamSpan,
    ) -> MessageStream:
        """:meth:`_message_stream` inside its span."""
        cache = self._cache(settings)
        key = self._cache_key(kind, params, settings) if cache is not None else None
        if cache is not None and key is not None:
            hit = cache.get(key)
            if hit is not None:
                logger.debug("cache hit for a stream of %s", params.get("model"))
                check(hit)  # also for entries stored by older versions
                response = self._finish(kind, params, hit, cached=True)
                span.finish(response, cached=True)
                return MessageStream.replay(read(response), response.get("usage"), cached=True, on_end=span.end)
            if cache.mode == "replay":  # replay never sends
                raise CacheMissError(
                    f"replay mode: no cached answer in {cache.path} for this {kind} request to "
                    f"{params.get('model')!r}; nothing was sent. Record it first with CACHE_MODE=readwrite."
                )
        return self._open_message_stream(kind, path, params, wire, assembler, check, read, settings, policy, deadline,
                                         timeout, cache, key, span)

    def _open_message_stream(
        self,
        kind: str,
        path: str,
        params: dict[str, Any],
        wire: dict[str, Any],
        assembler: Callable[[], ChatStreamAssembler | ResponsesStreamAssembler],
        check: ResponseCheck,
        read: Callable[[Mapping[str, Any]], Message],
        settings: Mapping[str, Any],
        policy: RetryPolicy,
        deadline: Deadline,
        timeout: float,
        cache: CacheBackend | None,
        key: str | None,
        span: StreamSpan,
    ) -> MessageStream:
        """Open the stream with retries up to its first content; the MessageStream reads the rest.

        ``params`` is the request as cached (the ``send_message`` body of ``kind``), ``wire`` what is
        sent (``params`` with ``stream``); ``check`` and ``read`` are the API's response check and
        reader, applied to the assembled answer. The call slot (MAX_CONCURRENT_MODEL_CALLS) is held
        until the stream ends or is closed.
        """
        limiter, in_flight = self._limiters(settings)
        estimate = 0
        if limiter.tpm:  # loading tiktoken takes at most a quarter of what is left (then it estimates)
            left = deadline.timeout_for(None)
            with loading_within(None if left is None else left / 4):
                estimate = self._estimate_tokens(params)

        def attempt(deadline: Deadline) -> tuple[StreamReader, list[str], Any, Callable[[], None]]:
            reservation = limiter.acquire(estimate, deadline=deadline)
            if not in_flight.acquire(timeout=deadline.timeout_for(None)):
                raise deadline.error(
                    f"waiting for one of the {in_flight.max_in_flight} call slots (MAX_CONCURRENT_MODEL_CALLS)"
                )
            released = threading.Event()

            def release() -> None:
                if not released.is_set():
                    released.set()
                    in_flight.release()

            reader: StreamReader | None = None
            try:
                reader = self._stream_reader(path, wire, settings, deadline, timeout, assembler())
                first = reader.until_content()
            except BaseException as exc:
                if reader is not None:
                    reader.close()
                release()
                if isinstance(exc, RateLimitError) and exc.retry_after and limiter.enabled:
                    limiter.pause(min(exc.retry_after, policy.max_wait))  # hold the other threads too
                raise
            return reader, first, reservation, release

        reader, first, reservation, release = policy.call(attempt, deadline)

        def deltas() -> Generator[str, None, tuple[Message, Any]]:
            completed = False
            try:
                yield from first
                try:
                    yield from reader.rest()
                except LLMUtilsError as exc:
                    raise self._interrupted(exc, reader, deadline) from exc
                completion = reader.assembler.result()
                try:
                    check(completion)
                except LLMUtilsError as exc:
                    with_answer(exc, reader.answer)
                    raise
                completed = True
            finally:
                reader.close()
                release()
                if not completed:
                    logger.debug("a stream of %s ended early; nothing cached", params.get("model"))
            usage = completion.get("usage")
            if isinstance(usage, Mapping) and isinstance(usage.get("total_tokens"), int):
                reservation.reconcile(max(usage["total_tokens"], estimate))
            if cache is not None and key is not None:
                cache.set(key, completion, deadline=deadline)
            response = self._finish(kind, params, completion, cached=False)
            span.finish(response, cached=False)
            return read(response), usage

        def cleanup() -> None:  # also when the stream is dropped without being iterated
            reader.close()
            release()
            span.end()

        return MessageStream(span.traced(deltas()), on_close=cleanup)

    @staticmethod
    def _interrupted(exc: LLMUtilsError, reader: StreamReader, deadline: Deadline) -> StreamInterruptedError:
        """The error for a stream that failed after content: StreamInterruptedError with the partial text."""
        text = reader.assembler.text
        why = f"total_timeout={deadline.total:g}s ran out" if deadline.expired else str(exc)
        return StreamInterruptedError(
            f"the stream was interrupted after {len(text)} characters ({why}); it is not retried",
            partial_text=text,
            status_code=exc.status_code,
            request_id=exc.request_id,
            headers=exc.headers,
        )

    def _stream_reader(
        self,
        path: str,
        wire: dict[str, Any],
        settings: Mapping[str, Any],
        deadline: Deadline,
        timeout: float,
        assembler: ChatStreamAssembler | ResponsesStreamAssembler,
    ) -> StreamReader:
        """Open ``path`` as an SSE stream (one attempt) and return a reader of its events.

        The response stays open (and cut at the deadline by its watchdog) until the reader is
        closed. Each read waits at most ``timeout`` (and what was left of the deadline at the
        start) for the next chunk.
        """
        httpx2 = lazy_import("httpx2")

        limit = deadline.timeout_for(timeout)
        stack = contextlib.ExitStack()
        http = stack.enter_context(self._open_stream(path, wire, settings, deadline, timeout))
        answer = answer_context(http.status_code, http.headers)
        if "text/event-stream" in http.headers.get("content-type", ""):
            chunks: Iterator[bytes] = http.iter_raw()
        else:  # a server that ignored stream=true: read its one whole answer as a stream
            try:
                chunks = iter([_as_events(self._read_body(http, deadline, timeout, settings))])
            except BaseException as exc:
                stack.close()
                if isinstance(exc, LLMUtilsError):
                    with_answer(exc, answer)
                raise
        where = self._display(settings)

        def transport_error(exc: Exception) -> LLMUtilsError | None:
            if deadline.expired:
                return deadline.error(f"reading the stream from {where}")
            if isinstance(exc, httpx2.TimeoutException):
                return NonTerminalError(f"no data for {limit:g}s from {where} while streaming")
            if isinstance(exc, (httpx2.HTTPError, httpx2.StreamError, OSError)):
                return NonTerminalError(f"the stream from {where} broke: {exc}")
            return None

        def drain() -> None:
            # After the end event only the body's last chunk is left: reading it returns the
            # connection to the pool. A server that keeps the body open is cut off after a moment.
            with contextlib.suppress(Exception), Deadline(_DRAIN_SECONDS).at_expiry(lambda: _shut_down(http)):
                for _ in chunks:
                    pass

        return StreamReader(
            chunks, assembler, transport_error=transport_error, close=stack.close, drain=drain, answer=answer
        )

    # -- cache ---------------------------------------------------------------------------------

    def cache_stats(self) -> CacheStats:
        """Hits, misses, writes and errors of this client's cache so far (all zero when off)."""
        total = CacheStats()
        with self._lock:
            caches = list(self._caches.values())
        for cache in caches:
            stats = cache.stats()
            total = CacheStats(
                hits=total.hits + stats.hits,
                misses=total.misses + stats.misses,
                writes=total.writes + stats.writes,
                errors=total.errors + stats.errors,
            )
        return total

    def _cache(self, settings: Mapping[str, Any]) -> CacheBackend | None:
        """The cache for these settings: CACHE_URL if set, else CACHE_FILE_NAME (a URL there is a URL too)."""
        if not settings["CACHE_API_CALLS"] or settings["CACHE_MODE"] == "off":
            return None
        location = settings["CACHE_URL"] or settings["CACHE_FILE_NAME"]
        # A relative file name means a different file in another working directory.
        where = "" if "://" in location or os.path.isabs(location) else os.getcwd()
        key = (where, location, settings["CACHE_MODE"], settings["CACHE_TTL"], settings["CACHE_MEMORY_ITEMS"])
        cache = self._caches.get(key)
        if cache is None:
            with self._lock:
                cache = self._caches.get(key)
                if cache is None:
                    target = os.path.join(where, location) if where else location
                    cache = open_cache(target, mode=key[2], ttl=key[3], memory_items=key[4])
                    self._caches[key] = cache
        return cache

    def _cache_key(self, kind: str, params: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
        payload = {"kind": kind, "api": self.api_type, "endpoint": self._endpoint(settings), "params": params}
        try:
            return make_key(payload, check=False)
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError(f"request parameters must be JSON values to be cached: {exc}") from None

    def _call(
        self,
        kind: str,
        path: str,
        params: dict[str, Any],
        settings: Mapping[str, Any],
        deadline: Deadline,
        timeout: float,
        check: ResponseCheck,
        make_policy: Callable[[], RetryPolicy],
    ) -> dict[str, Any]:
        """:meth:`_send_path` in one OpenTelemetry span when tracing is on (:mod:`llmutils._otel`)."""
        with call_span(kind, str(params.get("model")), provider=self.api_type, server_url=lambda: self._endpoint(settings),
                       params=params) as span:
            response = self._send_path(kind, path, params, settings, deadline, timeout, check, make_policy)
            info = self.last_call
            span.finish(response, cached=info is not None and info.cached)
        return response

    def _send_path(
        self,
        kind: str,
        path: str,
        params: dict[str, Any],
        settings: Mapping[str, Any],
        deadline: Deadline,
        timeout: float,
        check: ResponseCheck,
        make_policy: Callable[[], RetryPolicy],
    ) -> dict[str, Any]:
        """The one send path of every API: serve from the cache, or send and store.

        ``path`` and ``params`` are the request (built by :mod:`llmutils._apis`); ``check`` is the
        API's response check, run inside each attempt; ``deadline`` bounds every wait of the call
        (the identical request in flight, the cache's locks, the limiter, each attempt, the backoff).
        Identical requests in flight share one request (single-flight); a Redis cache extends that
        across processes and machines.
        """
        cache = self._cache(settings)

        def send() -> dict[str, Any]:
            return self._send_with_retries(path, params, settings, make_policy(), deadline, timeout, check)

        if cache is None:
            return self._finish(kind, params, send(), cached=False)
        key = self._cache_key(kind, params, settings)
        hit = cache.get(key)
        if hit is not None:
            logger.debug("cache hit for %s %s", kind, params.get("model"))
            return self._finish(kind, params, hit, cached=True)
        if cache.mode == "replay":  # even when the cache file is unusable: replay never sends
            raise CacheMissError(
                f"replay mode: no cached answer in {cache.path} for this {kind} request to "
                f"{params.get('model')!r}; nothing was sent. Record it first with CACHE_MODE=readwrite."
            )
        with self._lock:
            flight = self._inflight.get(key)
            leader = flight is None
            if flight is None:
                flight = self._inflight[key] = _Flight()
        if not leader:
            if not flight.done.wait(deadline.timeout_for(None)):
                raise deadline.error("waiting for the identical request in flight")
            if flight.response is not None:
                return self._finish(kind, params, json.loads(json.dumps(flight.response)), cached=True)
            if flight.error is not None:
                raise _shared_error(flight.error)
            response = send()  # a retryable failure: try again with what is left of our own deadline
            cache.set(key, response, deadline=deadline)
            return self._finish(kind, params, response, cached=False)
        try:
            response, cached = cache.single_flight(key, send, deadline=deadline)
            flight.response = response
        except InvalidRequestError as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                self._inflight.pop(key, None)
            flight.done.set()
        return self._finish(kind, params, json.loads(json.dumps(response)), cached=cached)

    def _finish(self, kind: str, params: Mapping[str, Any], response: dict[str, Any], *, cached: bool) -> dict[str, Any]:
        """Record usage and the thread's call info for a response about to be returned."""
        model = str(response.get("model") or params.get("model"))
        usage = response.get("usage")
        if not self.usage.record(model, usage, cached=cached):  # never raises: bad usage counts as unknown
            usage = None
        if kind == _responses.KIND:
            reason = finish_reason(response)
        else:
            choices = response.get("choices")
            first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], Mapping) else {}
            reason = first.get("finish_reason")
        self._local.info = CallInfo(kind, model, cached, normalize_usage(usage), finish_reason=reason)
        return response

    def _limiters(self, settings: Mapping[str, Any]) -> tuple[RateLimiter | RedisRateLimiter, ConcurrencyLimiter]:
        """The rate and concurrency limiters for these settings: one pair per distinct limit setting.

        Threads (or contexts, under :func:`override_defaults`) with the same RPM/TPM/
        MAX_CONCURRENT_MODEL_CALLS (and RATE_LIMIT_URL/NAME) share one pair, so the limit holds across
        them; a different setting gets its own pair, so two limits never rebuild one shared limiter
        back and forth. With ``RATE_LIMIT_URL`` the RPM/TPM limiter is a :class:`RedisRateLimiter`:
        one budget for every process and machine that uses the same URL and ``RATE_LIMIT_NAME`` (by
        default the endpoint URL, without credentials).
        """
        wanted = (
            settings["RPM"],
            settings["TPM"],
            settings["MAX_CONCURRENT_MODEL_CALLS"],
            settings["RATE_LIMIT_URL"],
            settings["RATE_LIMIT_NAME"],
        )
        limits = self._limits.get(wanted)
        if limits is None:
            with self._lock:
                limits = self._limits.get(wanted)
                if limits is None:
                    rpm, tpm, slots, url, name = wanted
                    limiter: RateLimiter | RedisRateLimiter
                    if url:
                        name = name or rate_limit_name(self._endpoint(settings))
                        limiter = RedisRateLimiter(url, name=name, rpm=rpm, tpm=tpm)
                    else:
                        limiter = RateLimiter(rpm=rpm, tpm=tpm)
                    limits = self._limits[wanted] = (limiter, ConcurrencyLimiter(slots))
        return limits

    def _send_with_retries(
        self,
        path: str,
        params: dict[str, Any],
        settings: Mapping[str, Any],
        policy: RetryPolicy,
        deadline: Deadline,
        timeout: float,
        check: ResponseCheck,
    ) -> dict[str, Any]:
        """Send ``params`` to ``path`` with the retry policy, the limiters and the deadline."""
        limiter, in_flight = self._limiters(settings)
        estimate = 0
        if limiter.tpm:  # loading tiktoken takes at most a quarter of what is left (then it estimates)
            left = deadline.timeout_for(None)
            with loading_within(None if left is None else left / 4):
                estimate = self._estimate_tokens(params)

        def attempt(deadline: Deadline) -> dict[str, Any]:
            reservation = limiter.acquire(estimate, deadline=deadline)
            if not in_flight.acquire(timeout=deadline.timeout_for(None)):
                raise deadline.error(
                    f"waiting for one of the {in_flight.max_in_flight} call slots (MAX_CONCURRENT_MODEL_CALLS)"
                )
            try:
                response = self._post(path, params, settings, deadline, timeout, check)
            except RateLimitError as exc:
                if exc.retryable and exc.retry_after and limiter.enabled:  # hold the other threads too
                    limiter.pause(exc.retry_after)
                raise
            finally:
                in_flight.release()
            usage = response.get("usage")
            if isinstance(usage, Mapping) and isinstance(usage.get("total_tokens"), int):
                # Providers charge the estimate (prompt + max output) against TPM when they admit a
                # request, so only a larger actual count is debited; unused budget is not refunded.
                reservation.reconcile(max(usage["total_tokens"], estimate))
            return response

        return policy.call(attempt, deadline)

    @staticmethod
    def _estimate_tokens(params: Mapping[str, Any]) -> int:
        """Prompt tokens plus the output budget: what a request may cost, for the TPM limiter."""
        from ._tokens import count_tokens

        model = str(params.get("model"))
        raw_input = params.get("input")
        if "messages" not in params and not (isinstance(raw_input, list) and all(isinstance(t, str) for t in raw_input)):
            # A Responses body: instructions and input items (embeddings take a list of strings).
            messages = input_as_messages(params)
            prompt = int(count_tokens(messages, model)) if messages else 0
            return prompt + int(params.get("max_output_tokens") or 0)
        if "input" in params:
            return sum(count_tokens(text, model) for text in params["input"])
        budget = params.get("max_completion_tokens") or params.get("max_tokens") or 0
        return int(count_tokens(params["messages"], model)) + int(budget) * int(params.get("n", 1))

    def _total_timeout(self, settings: Mapping[str, Any], total_timeout: float | None) -> float | None:
        """The call's ``total_timeout``: the argument, else the injected policy's, else the setting."""
        if total_timeout is not None:
            return float(total_timeout)
        if self._retry is not None and self._retry.is_set("total_timeout"):
            return self._retry.total_timeout
        value = settings["TOTAL_TIMEOUT"]
        return None if value is None else float(value)

    def _policy(
        self,
        settings: Mapping[str, Any],
        timeout: float | None,
        total_timeout: float | None,
        max_attempts: int | None,
        waiting_time: float | None,
        backoff: float | None,
    ) -> RetryPolicy:
        """The call's policy: the configuration, the injected policy's given fields over it, then the call's arguments."""
        policy = RetryPolicy(
            max_attempts=settings["MAX_ATTEMPTS"],
            waiting_time=settings["WAITING_TIME"],
            backoff_factor=settings["EXPONENTIAL_BACKOFF_FACTOR"],
            max_wait=settings["MAX_WAIT"],
            total_timeout=settings["TOTAL_TIMEOUT"],
        )
        if self._retry is not None:
            policy = self._retry.over(policy)
        return policy.with_values(
            max_attempts=max_attempts,
            waiting_time=waiting_time,
            backoff_factor=backoff,
            total_timeout=total_timeout,
            sleep=self._sleep,
        ).resolved()

    # -- transport (overridden by subclasses) --------------------------------------------------

    def _endpoint(self, settings: Mapping[str, Any]) -> str:
        """The endpoint identity: part of the cache key, and named in errors."""
        return settings["BASE_URL"] or "https://api.openai.com/v1"

    def _display(self, settings: Mapping[str, Any]) -> str:
        """The endpoint as shown in errors and reprs: any password in the URL masked."""
        return mask_url(self._endpoint(settings))

    def _given_key(self) -> tuple[dict[str, Any], str] | None:
        """The ``api_key`` argument, else the first key environment variable that is set."""
        if self._api_key:
            return {"api_key": _checked_key(self._api_key, "the api_key argument")}, "the api_key argument"
        key, var = api_key_from_env(self._key_env_vars)
        if key:
            source = f"the {var} environment variable"
            return {"api_key": _checked_key(key, source)}, source
        return None

    def _credentials(self, settings: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
        """The SDK's credential arguments and a description of where they came from (never the key)."""
        given = self._given_key()
        if given is not None:
            return given
        if settings["BASE_URL"]:
            return {"api_key": "unused"}, "no key (none is needed by many local servers)"
        raise AuthenticationError(
            "No OpenAI API key found: set the OPENAI_API_KEY environment variable, pass "
            "api_key=..., or use API_TYPE=mock to work offline."
        )

    def _sdk_flavor(self, path: str) -> str:
        """Which SDK client a request to ``path`` needs ("" for the usual one; Azure: see there)."""
        return ""

    def _new_sdk_client(self, settings: Mapping[str, Any], credentials: dict[str, Any], flavor: str = "") -> Any:
        openai = lazy_import("openai")
        sdk_http_options = lazy_import(f"{__package__}._transport").sdk_http_options  # imports httpx2
        return openai.OpenAI(
            base_url=settings["BASE_URL"],
            organization=self._organization,
            max_retries=0,
            **sdk_http_options(self._endpoint(settings), openai.DefaultHttpxClient, self._default_headers, openai.Omit()),
            **credentials,
        )

    def _sdk_url(self, sdk: Any, path: str) -> str:
        """The URL to give ``sdk.post``: absolute (the SDK's public ``base_url`` + ``path``), which
        spares the SDK parsing and joining it again on every request; Azure keeps ``path``, which
        its SDK turns into a deployment URL."""
        base = str(sdk.base_url)
        if "?" in base or "#" in base:
            return path
        return base.rstrip("/") + "/" + path.lstrip("/")

    def _sdk(self, settings: Mapping[str, Any], path: str = "") -> tuple[Any, str]:
        """The SDK client for these settings (and ``path``), created once (and again in a forked
        child), and where its credentials came from."""
        sdk, source, _ = self._sdk_and_key(settings, path)
        return sdk, source

    def _sdk_and_key(self, settings: Mapping[str, Any], path: str = "") -> tuple[Any, str, str | None]:
        """:meth:`_sdk`, and the API key (to scrub from error texts; never shown)."""
        credentials, source = self._credentials(settings)
        flavor = self._sdk_flavor(path)
        identity = (self._endpoint(settings), settings["AZURE_API_VERSION"], flavor, *sorted(credentials.items(), key=lambda kv: kv[0]))
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._sdk_clients = {}  # the parent's connections are not ours to use or close
                    self._caches = {}
                    self._pid = os.getpid()
        sdk = self._sdk_clients.get(identity)
        if sdk is None:
            with self._lock:
                sdk = self._sdk_clients.get(identity)
                if sdk is None:
                    # Creating the SDK imports httpcore2, certifi... and its first request detects
                    # the platform (locks of functools.cached_property): do both now, where a fork
                    # waits for them, so a child never inherits one half done.
                    with importing():
                        sdk = self._new_sdk_client(settings, credentials, flavor)
                        with contextlib.suppress(Exception):
                            sdk.default_headers  # noqa: B018 - computed and cached now
                    self._sdk_clients[identity] = sdk
        key = credentials.get("api_key")
        return sdk, source, key if isinstance(key, str) else None

    def _post(
        self,
        path: str,
        params: Mapping[str, Any],
        settings: Mapping[str, Any],
        deadline: Deadline,
        timeout: float,
        check: ResponseCheck | None = None,
    ) -> dict[str, Any]:
        """POST ``params`` to ``path`` and return the decoded JSON object (one attempt).

        The whole body is read in chunks through :meth:`_open_stream`, so the call's deadline
        ends a body that trickles in, not the next read timeout. ``check`` (the API's response
        check) runs on the body here, so that every error made from the answer (a body that is
        not JSON, a 200 with no choices, a wrong embedding count) carries its ``status_code``,
        ``request_id`` and ``headers``.
        """
        with self._open_stream(path, params, settings, deadline, timeout) as http:
            context = answer_context(http.status_code, http.headers)
            try:
                raw = self._read_body(http, deadline, timeout, settings)
            except LLMUtilsError as exc:
                with_answer(exc, context)
                raise
        try:
            body = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError) as exc:
            status = context["status_code"]
            raise NonTerminalError(
                f"HTTP {status} from {self._display(settings)} with a body that is not JSON ({exc})", **context
            ) from exc
        if not isinstance(body, dict):
            raise NonTerminalError("the response body is not a JSON object", **context)
        if check is not None:
            try:
                check(body)
            except LLMUtilsError as exc:
                with_answer(exc, context)
                raise
        return body

    @contextlib.contextmanager
    def _open_stream(
        self, path: str, params: Mapping[str, Any], settings: Mapping[str, Any], deadline: Deadline, timeout: float
    ) -> Iterator[httpx2.Response]:
        """Send one request and yield its raw HTTP response, headers read and body not yet read.

        This is the single place where a request leaves the client; whole answers
        (:meth:`_post`) and SSE streams both read the body from the response it yields
        (``response.iter_bytes()`` / ``response.iter_lines()``) and must call
        :meth:`_read_error` for an exception raised while iterating.

        It uses the SDK's documented custom-request call in streaming mode,
        ``client.post(path, body=..., cast_to=httpx2.Response, stream=True, options={"timeout": ...})``,
        which keeps the SDK's auth, Azure deployment routing and typed status errors (mapped here to
        the llmutils tree, the error body read by the SDK) but skips its per-call model parsing.
        Through llmutils' transport (``call_deadline``), every wait of the attempt (connecting,
        sending, each receive of the head, of an error body the SDK reads itself and of the body)
        lasts at most ``timeout`` and what is left of ``deadline``. Through the SDK's default
        transport (a proxy), connecting and each read are bounded by ``timeout`` and what was left
        at the start; while the block runs, the deadline's watchdog shuts the socket down the moment
        the deadline passes, so a read that stalls between two bytes ends then. The response is
        closed when the block exits.
        """
        httpx2 = lazy_import("httpx2")
        openai = lazy_import("openai")

        transport = lazy_import(f"{__package__}._transport")
        sdk, source, key = self._sdk_and_key(settings, path)
        limit = deadline.timeout_for(timeout)
        if limit <= 0:
            raise deadline.error(f"before a request to {self._display(settings)} could be sent")
        try:
            with transport.call_deadline(deadline):
                http = sdk.post(
                    self._sdk_url(sdk, path), body=params, cast_to=httpx2.Response, stream=True,
                    options=transport.sdk_request_options(limit, openai.Omit()),
                )
        except openai.APIStatusError as exc:
            _scrub_sdk_error(exc, key)
            raise self._status_error(exc, source, settings) from exc
        except openai.APITimeoutError as exc:
            if deadline.expired:
                raise deadline.error(f"waiting for {self._display(settings)} to answer") from exc
            raise NonTerminalError(f"request timed out after {limit:g}s ({self._display(settings)})") from exc
        except openai.APIConnectionError as exc:
            raise NonTerminalError(f"connection error to {self._display(settings)}: {exc.__cause__ or exc}") from exc
        except openai.OpenAIError as exc:
            raise InvalidRequestError(f"the openai SDK refused the request: {exc}") from exc
        except UnicodeEncodeError:
            raise _surrogate_error(params) from None
        except (TypeError, ValueError) as exc:  # e.g. a message value the SDK cannot serialise
            raise InvalidRequestError(f"the request cannot be sent: {exc}") from exc
        except httpx2.TransportError as exc:  # reading an error body inside the SDK, which lets it through
            raise self._read_error(exc, deadline, limit, settings) from exc
        except Exception as exc:
            if type(exc).__module__.partition(".")[0] != "httpx2":
                raise
            raise InvalidRequestError(f"the request to {self._display(settings)} cannot be sent: {exc}") from exc
        try:
            with deadline.at_expiry(lambda: _shut_down(http)):
                yield http
        finally:
            http.close()

    def _read_body(self, http: httpx2.Response, deadline: Deadline, timeout: float, settings: Mapping[str, Any]) -> bytes:
        """The whole body of ``http``, read in chunks until it ends or the deadline passes."""
        chunks: list[bytes] = []
        try:
            for chunk in http.iter_bytes(_READ_CHUNK):
                chunks.append(chunk)
                if deadline.expired:
                    break
        except Exception as exc:
            raise self._read_error(exc, deadline, timeout, settings) from exc
        if deadline.expired:
            raise deadline.error(f"reading the response body from {self._display(settings)} ({sum(map(len, chunks))} bytes so far)")
        return b"".join(chunks)

    def _read_error(self, exc: BaseException, deadline: Deadline, timeout: float, settings: Mapping[str, Any]) -> BaseException:
        """The llmutils error for ``exc`` raised while reading a response body."""
        httpx2 = lazy_import("httpx2")

        where = self._display(settings)
        if deadline.expired:
            return deadline.error(f"reading the response body from {where}")
        if isinstance(exc, httpx2.TimeoutException):
            return NonTerminalError(f"reading the response body from {where} timed out after {timeout:g}s")
        if isinstance(exc, (httpx2.HTTPError, OSError)):
            return NonTerminalError(f"the connection to {where} broke while reading the response body: {exc}")
        return exc

    def _status_error(self, exc: Any, source: str, settings: Mapping[str, Any]) -> LLMUtilsError:
        """The llmutils error for an HTTP error answer: its class from the status, whether to retry
        it and how long to wait from openai-python's rules (:mod:`llmutils._http`), and every field
        the server sent (``code``, ``type``, ``param``, the request id, the headers)."""
        status = exc.status_code
        headers = exc.response.headers
        info = error_fields(status, headers, exc.body)
        decision = retry_decision(status, headers)
        detail = f"HTTP {status} from {self._display(settings)}: {info.message}"
        if not decision.retry and (status in RETRYABLE_STATUS or status >= 500):  # a retryable status the server refused
            detail += f" (not retried: {decision.reason})"
        context: dict[str, Any] = {
            "status_code": status,
            "request_id": info.request_id,
            "code": info.code,
            "type": info.type,
            "param": info.param,
            "headers": info.headers,
        }
        if status == 429 and is_quota_exhausted(info):  # by code, type or message: LiteLLM keeps only the message
            return QuotaExceededError(f"Quota exhausted; waiting will not help ({detail})", retryable=False, **context)
        if is_validation_error(status, exc.body):  # llama-cpp-python answers these with a 500
            return InvalidRequestError(
                f"The server rejected the request as invalid ({detail}); not retried: it would fail the same way",
                retryable=False,
                **context,
            )
        # A wait that is not obeyed is still told (the 300 s of a refused Retry-After: 300).
        retry_after = decision.wait if decision.retry else decision.asked
        if status in (401, 403):
            return AuthenticationError(
                f"Authentication failed ({detail}). Credentials used: {source}.", retryable=decision.retry, **context
            )
        if status == 429:
            return RateLimitError(detail, retry_after=retry_after, retryable=decision.retry, **context)
        if status in RETRYABLE_STATUS or status >= 500:
            return NonTerminalError(detail, retry_after=retry_after, retryable=decision.retry, **context)
        if info.code == "content_filter" or "content_filter" in str(exc.body):
            return ContentFilterError(f"Refused by the content filter ({detail})", retryable=False, **context)
        return InvalidRequestError(detail, retryable=decision.retry, **context)

    # -- building apart from sending (for code that sends another way, e.g. the Batch API) -----

    @_bounded_recursion
    def build_request(
        self,
        messages: list[Message],
        model: str | None = None,
        temperature: float | None = UNSET,
        max_tokens: int | None = UNSET,
        top_p: float | None = UNSET,
        frequency_penalty: float | None = UNSET,
        presence_penalty: float | None = UNSET,
        stop: str | list[str] | None = None,
        timeout: float | None = None,
        max_attempts: int | None = None,
        waiting_time: float | None = None,
        exponential_backoff_factor: float | None = None,
        n: int = 1,
        *,
        total_timeout: float | None = None,
        api: str | None = None,
        **more: Any,
    ) -> PreparedRequest:
        """Build the request :meth:`send_message` would send for the same arguments, without sending it.

        The body and the cache key are exactly those of ``send_message`` (same settings, same
        builders of :mod:`llmutils._apis`, same key), so an answer stored under ``cache_key`` by
        other means (the Batch API runner does this) is a cache hit for a later ``send_message``
        of the same request. Nothing is sent, read from the cache or counted. The arguments are
        ``send_message``'s and are checked the same way; ``timeout``, ``total_timeout``,
        ``max_attempts``, ``waiting_time`` and ``exponential_backoff_factor`` say how to send, so
        they do not change the request.

        >>> request = MockClient().build_request([{"role": "user", "content": "Hi"}], temperature=0)
        >>> request.kind, request.path, request.body
        ('chat', '/chat/completions', {'model': 'gpt-4.1-mini', 'messages': [...], 'temperature': 0})

        :param messages: the chat messages (on the Responses API, Responses input items too).
        :param api: ``"chat"`` or ``"responses"``; by default chosen as ``send_message`` chooses.
        :raises InvalidRequestError: a bad argument (the same checks as ``send_message``, and
            ``stream=True``), ``n > 1`` on the Responses API, or a parameter that is not a JSON
            value.
        :raises ConfigError: the client is not configured well enough to name its endpoint.
        """
        has_items = _check_call(
            api, messages, n, (model, temperature, max_tokens, top_p, frequency_penalty, presence_penalty, stop, timeout,
                               total_timeout, max_attempts, waiting_time, exponential_backoff_factor)
        )
        if more.get("stream"):
            raise InvalidRequestError(
                "stream=True is not supported by build_request, which builds send_message's request; "
                "client.stream_message(...) streams an answer"
            )
        settings = self._settings()
        params = build_chat_request(
            settings,
            messages,
            model=model,
            temperature=temperature,
            max_tokens=max_tokens,
            top_p=top_p,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            stop=stop,
            n=n,
            more=more,
        )
        if self._api(settings, params["model"], api) == "responses":
            kind, path, body = _responses.KIND, _responses.PATH, request_from_chat(params)  # refuses n > 1
        else:
            if has_items:
                _check_messages(messages)  # a Responses item (no role) cannot go to chat: says which
            kind, path, body = _chat.KIND, _chat.PATH, params
        return PreparedRequest(kind, path, body, self._cache_key(kind, body, settings), self._display(settings))

    def sdk_client(self, path: str = "") -> Any:
        """The ``openai`` SDK client that requests to ``path`` go through, for endpoints llmutils does
        not wrap (the Batch API's ``files`` and ``batches``).

        It has this client's endpoint, credentials and default headers and ``max_retries=0`` (retry
        through :meth:`retry_policy`). It is shared and owned by this client: do not close it,
        :meth:`close` does. On Azure, ``path`` chooses between the deployment API and the v1 API
        (``/responses`` is served only on v1).

        :raises AuthenticationError: no credentials were found.
        :raises ConfigError: the endpoint is not configured.
        """
        sdk, _source = self._sdk(self._settings(), path)
        return sdk

    def retry_policy(self) -> RetryPolicy:
        """The retry policy of a call made now without per-call arguments: the configuration, with
        the injected ``retry`` policy's given fields over it, and the injected ``sleep``."""
        return self._policy(self._settings(), None, None, None, None, None)

    def cache_backend(self) -> CacheBackend | None:
        """The cache a call made now uses (opened on first use, closed by :meth:`close`), or None
        when caching is off. Answers written to it under a :attr:`PreparedRequest.cache_key` are
        what later calls of that request are served."""
        return self._cache(self._settings())

    def endpoint_url(self) -> str:
        """The endpoint calls go to now, as shown in messages and reprs: any password in the URL masked.

        :raises ConfigError: the endpoint is not configured (an Azure client without an endpoint).
        """
        return self._display(self._settings())

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the SDK connection pools and the cache files this client opened."""
        with self._lock:
            sdks, self._sdk_clients = list(self._sdk_clients.values()), {}
            caches, self._caches = list(self._caches.values()), {}
            limits, self._limits = list(self._limits.values()), {}
        if self._pid == os.getpid():
            for sdk in sdks:
                sdk.close()
        for cache in caches:
            cache.close()
        for limiter, _slots in limits:
            if isinstance(limiter, RedisRateLimiter):
                limiter.close()

    def __enter__(self) -> OpenAIClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AzureClient(OpenAIClient):
    """A client for Azure OpenAI: ``model`` is the deployment name.

    Credentials: ``api_key``, else ``AZURE_OPENAI_API_KEY`` (or the older ``AZURE_OPENAI_KEY``), else
    a Microsoft Entra ID token provider: ``azure_ad_token_provider`` (any callable returning a token),
    or ``DefaultAzureCredential`` (scope ``AZURE_AD_SCOPE``) when the ``azure`` extra
    (azure-identity) is installed.

    ``api_version="v1"`` (or ``AZURE_API_VERSION = v1``; any case) uses Azure's v1 API: OpenAI's paths under
    ``{endpoint}/openai/v1/``, the deployment sent as ``model``, no ``api-version`` query.

    >>> AzureClient(azure_endpoint="https://my.openai.azure.com", model="my-gpt4o-deployment")
    >>> AzureClient(azure_endpoint="https://my.openai.azure.com", api_version="v1", model="my-deployment")
    """

    api_type = "azure"
    _key_env_vars = ("AZURE_OPENAI_API_KEY", "AZURE_OPENAI_KEY")

    def __init__(
        self,
        *,
        azure_endpoint: str | None = None,
        api_version: str | None = None,
        azure_ad_token_provider: Callable[[], str] | None = None,
        **kwargs: Any,
    ) -> None:
        self._api_version = api_version
        self._token_provider = azure_ad_token_provider
        super().__init__(**kwargs)
        if azure_endpoint is not None:
            self._client_settings = {**self._client_settings, **validate({"AZURE_ENDPOINT": azure_endpoint}, "AzureClient()")}

    # The Entra ID token provider built from DefaultAzureCredential is made again where the
    # client is unpickled; an azure_ad_token_provider given explicitly travels (it must pickle).
    _RUNTIME = OpenAIClient._RUNTIME | {"_entra_token_provider"}

    def _start(self) -> None:
        super()._start()
        self._entra_token_provider: Callable[[], str] | None = None

    def _sdk_url(self, sdk: Any, path: str) -> str:
        return path

    def _endpoint(self, settings: Mapping[str, Any]) -> str:
        endpoint: str | None = settings["AZURE_ENDPOINT"]
        if not endpoint:
            raise ConfigError(
                "No Azure OpenAI endpoint: set AZURE_OPENAI_ENDPOINT, the AZURE_ENDPOINT config key, "
                "or pass azure_endpoint=..."
            )
        return endpoint.rstrip("/")

    def _credentials(self, settings: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
        given = self._given_key()
        if given is not None:
            return given
        if self._token_provider is not None:
            return {"azure_ad_token_provider": self._token_provider}, "the azure_ad_token_provider argument"
        try:
            with importing():
                from azure.identity import DefaultAzureCredential, get_bearer_token_provider
        except ImportError:
            raise AuthenticationError(
                "No Azure OpenAI credentials: set AZURE_OPENAI_API_KEY, pass api_key=... or "
                "azure_ad_token_provider=..., or install 'llmutils-openai[azure]' for Entra ID sign-in."
            ) from None
        with self._lock:
            if self._entra_token_provider is None:
                self._entra_token_provider = get_bearer_token_provider(DefaultAzureCredential(), settings["AZURE_AD_SCOPE"])
        return {"azure_ad_token_provider": self._entra_token_provider}, "Entra ID (DefaultAzureCredential)"

    def _sdk_flavor(self, path: str) -> str:
        """The Responses API is served on Azure's v1 path, ``{endpoint}/openai/v1/responses``."""
        return "v1" if path == _responses.PATH else ""

    def _new_sdk_client(self, settings: Mapping[str, Any], credentials: dict[str, Any], flavor: str = "") -> Any:
        openai = lazy_import("openai")
        sdk_http_options = lazy_import(f"{__package__}._transport").sdk_http_options  # imports httpx2
        api_version = self._api_version or settings["AZURE_API_VERSION"]
        if flavor == "v1" or is_azure_v1(api_version):
            # Azure's v1 API is OpenAI's API under {endpoint}/openai/v1/ (the Responses API is served
            # only there): the plain OpenAI client, no api-version, the model is the deployment; with
            # the key, or the Entra token provider as a callable key (a fresh Bearer token per request).
            return openai.OpenAI(
                base_url=f"{self._endpoint(settings)}/openai/v1/",
                api_key=credentials.get("api_key") or credentials["azure_ad_token_provider"],
                organization=self._organization,
                max_retries=0,
                **sdk_http_options(self._endpoint(settings), openai.DefaultHttpxClient, self._default_headers, openai.Omit()),
            )
        return openai.AzureOpenAI(
            azure_endpoint=self._endpoint(settings),
            api_version=api_version,
            organization=self._organization,
            max_retries=0,
            **sdk_http_options(self._endpoint(settings), openai.DefaultHttpxClient, self._default_headers, openai.Omit()),
            **credentials,
        )


def _last_user_text(messages: Iterable[Mapping[str, Any]]) -> str:
    for message in reversed(list(messages)):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if isinstance(p, Mapping))
            return "" if content is None else str(content)
    return ""


def _fake_embedding(text: str, dimensions: int = 8) -> list[float]:
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return [round(digest[i % len(digest)] / 127.5 - 1.0, 6) for i in range(dimensions)]


class MockClient(OpenAIClient):
    """An offline client: same return shapes, cache and retries, no network and no key.

    It answers ``"echo: <last user message>"``, or the scripted ``answers`` in order (strings or
    message dicts), or whatever ``handler(messages, params)`` returns. Embeddings are deterministic
    vectors derived from a hash of the text. On the Responses API it answers in the Responses shape
    (the handler gets the input as chat messages).

    >>> MockClient(answers=["yes", "no"]).send_message([{"role": "user", "content": "?"}])
    {'role': 'assistant', 'content': 'yes'}
    """

    api_type = "mock"

    def __init__(
        self,
        *,
        answers: Iterable[str | Message] | None = None,
        handler: Callable[[list[Message], dict[str, Any]], str | Message] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._answers = list(answers or [])
        self._handler = handler

    # The answers still scripted and the handler travel; the count of calls starts again at 0.
    _RUNTIME = OpenAIClient._RUNTIME | {"calls"}

    def _start(self) -> None:
        super()._start()
        self.calls = 0

    def script(self, *answers: str | Message) -> None:
        """Queue answers to return, in order, before falling back to the echo."""
        with self._lock:
            self._answers.extend(answers)

    def _endpoint(self, settings: Mapping[str, Any]) -> str:
        return "mock://"

    def sdk_client(self, path: str = "") -> Any:
        """A MockClient sends nothing over HTTP, so it has no SDK client: always a ConfigError."""
        raise ConfigError(
            "MockClient answers in-process and has no openai SDK client; use an OpenAIClient or AzureClient"
        )

    def _credentials(self, settings: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
        return {}, "none (mock)"

    def _post(
        self,
        path: str,
        params: Mapping[str, Any],
        settings: Mapping[str, Any],
        deadline: Deadline,
        timeout: float,
        check: ResponseCheck | None = None,
    ) -> dict[str, Any]:
        """Answer in-process, as the endpoint would: a chat completion, a response or embeddings."""
        if path == _responses.PATH:
            answer = self._response(params)
        elif path == _embeddings.PATH:
            answer = self._embedding(params)
        else:
            answer = self._chat_completion(params)
        problem = non_json(answer)
        if problem is not None:  # a scripted answer or handler result the wire could not carry
            raise InvalidRequestError(f"the mock answer is not plain JSON: answer{problem}")
        if check is not None:
            check(answer)
        return answer

    def _stream_reader(
        self,
        path: str,
        wire: dict[str, Any],
        settings: Mapping[str, Any],
        deadline: Deadline,
        timeout: float,
        assembler: ChatStreamAssembler | ResponsesStreamAssembler,
    ) -> StreamReader:
        """The mock's answer as a stream: the whole answer cut into pieces."""
        params = {k: v for k, v in wire.items() if k not in ("stream", "stream_options")}
        answer = self._post(path, params, settings, deadline, timeout)
        events = response_events(answer) if answer.get("object") == "response" else completion_events(answer)
        return StreamReader(iter(events), assembler, transport_error=lambda exc: None, close=lambda: None)

    def _chat_completion(self, params: Mapping[str, Any]) -> dict[str, Any]:
        messages = params["messages"]
        with self._lock:
            self.calls += 1
            scripted = self._answers.pop(0) if self._answers else None
        if scripted is None and self._handler is not None:
            scripted = self._handler(messages, params if isinstance(params, dict) else dict(params))  # (it is a dict)
        text = _last_user_text(messages)
        choices: list[dict[str, Any]] = []
        for i in range(params.get("n", 1)):
            answer = scripted if scripted is not None else f"echo: {text}" + (f" [{i}]" if i else "")
            message = dict(answer) if isinstance(answer, Mapping) else {"role": "assistant", "content": answer}
            if isinstance(params.get("response_format"), Mapping) and isinstance(message.get("content"), str) and scripted is None:
                message["content"] = json.dumps({"echo": text})
            choices.append({"index": i, "message": message, "finish_reason": "stop"})
        prompt_tokens = sum(math.ceil(len(str(m.get("content", ""))) / 4) + 3 for m in messages) + 3
        completion_tokens = sum(math.ceil(len(str(c["message"].get("content") or "")) / 4) for c in choices)
        return {
            "id": f"mock-{self.calls}",
            "object": "chat.completion",
            "model": params["model"],
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def _embedding(self, params: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.calls += 1
        dimensions = int(params.get("dimensions") or 8)
        data = [
            {"object": "embedding", "index": i, "embedding": _fake_embedding(text, dimensions)}
            for i, text in enumerate(params["input"])
        ]
        tokens = sum(math.ceil(len(t) / 4) for t in params["input"])
        return {"object": "list", "data": data, "model": params["model"], "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def _response(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """A Responses answer with the same rules as the chat mock (script, handler, echo, JSON)."""
        messages = input_as_messages(params)
        with self._lock:
            self.calls += 1
            number = self.calls
            scripted = self._answers.pop(0) if self._answers else None
        if scripted is None and self._handler is not None:
            scripted = self._handler(messages, dict(params))
        text = _last_user_text(messages)
        message = dict(scripted) if isinstance(scripted, Mapping) else {"role": "assistant", "content": scripted}
        if scripted is None:
            text_format = (params.get("text") or {}).get("format") if isinstance(params.get("text"), Mapping) else None
            json_wanted = isinstance(text_format, Mapping) and text_format.get("type") in ("json_object", "json_schema")
            message["content"] = json.dumps({"echo": text}) if json_wanted else f"echo: {text}"
        output = output_from_message(message, item_id=f"msg_mock_{number}")
        input_tokens = sum(math.ceil(len(str(m.get("content") or "")) / 4) + 3 for m in messages) + 3
        output_tokens = math.ceil(len(str(message.get("content") or "")) / 4)
        return {
            "id": f"resp_mock_{number}",
            "object": "response",
            "status": "completed",
            "model": params.get("model"),
            "output": output,
            "usage": {
                "input_tokens": input_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": input_tokens + output_tokens,
            },
        }
