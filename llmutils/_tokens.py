"""Token counting with tiktoken, following OpenAI's published rules, and safe without a network.

Encodings (``model`` -> encoding, after ``MODEL_ALIASES`` from the config is applied):

* ``o200k_base``: ``gpt-4o*``, ``chatgpt-4o*``, ``gpt-4.1*``, ``gpt-4.5*``, ``gpt-5*``, ``o1*``,
  ``o3*``, ``o4*``;
* ``cl100k_base``: ``gpt-4*`` (other than the above), ``gpt-3.5*`` / Azure's ``gpt-35*``,
  ``text-embedding-3-*``, ``text-embedding-ada-002``, ``davinci-002``, ``babbage-002``;
* anything else: :data:`FALLBACK_ENCODING` (``o200k_base``), with one DEBUG line per model.

Names are matched case-insensitively, on whole ``-``/``.``/``:`` separated prefixes, after
dropping a ``ft:`` (fine-tune) prefix and anything up to a ``/`` (``openai/gpt-4o``).

Message rules (the OpenAI cookbook "How to count tokens with tiktoken"): 3 tokens per message
(4 for ``gpt-3.5-turbo-0301``), every string value of a message (role, content, name,
tool_call_id, ...) encoded, +1 per ``name`` (-1 for ``gpt-3.5-turbo-0301``), and +3 per
conversation for the assistant reply priming. Approximations OpenAI does not publish:

* ``content`` as a list of parts: text parts (``text``, ``input_text``, ``output_text``,
  ``refusal``) are encoded; image parts count :data:`IMAGE_TOKENS_LOW` (85) with
  ``detail="low"``, else :data:`IMAGE_TOKENS_HIGH` (765, a 1024x1024 high-detail image); other
  parts count the string values they hold;
* ``tool_calls`` / ``function_call``: the function name and arguments text are encoded, plus
  :data:`TOOL_CALL_TOKENS` (3) per call; call ids and JSON framing are not counted.

Loading: an encoding is loaded through ``tiktoken.get_encoding`` (so its cache and
``TIKTOKEN_CACHE_DIR`` apply) on first use, once per process, in a daemon thread joined for at
most 5 s (``_LOAD_TIMEOUT``), under a per-encoding lock. A failed or timed-out load is not
retried for 10 minutes (``_RETRY_AFTER``; a load that finishes late is used once it lands);
meanwhile counts are :func:`estimate_tokens` estimates with ``exact=False``, and one WARNING per
process says how to make them exact. Importing this module does not import tiktoken.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._cooldown import Cooldown
from ._exceptions import InvalidRequestError
from ._imports import lazy_import

if TYPE_CHECKING:
    from tiktoken import Encoding

__all__ = [
    "TokenCount",
    "count_tokens",
    "count_text_tokens",
    "encoding_name_for_model",
    "estimate_tokens",
    "FALLBACK_ENCODING",
    "IMAGE_TOKENS_LOW",
    "IMAGE_TOKENS_HIGH",
    "TOOL_CALL_TOKENS",
]

logger = logging.getLogger("llmutils")

FALLBACK_ENCODING = "o200k_base"
IMAGE_TOKENS_LOW = 85
IMAGE_TOKENS_HIGH = 765
TOOL_CALL_TOKENS = 3

_LOAD_TIMEOUT = 5.0  # seconds a caller waits for tiktoken to load (download) an encoding
_RETRY_AFTER = 600.0  # seconds before a failed load is attempted again
_monotonic: Callable[[], float] = time.monotonic

# Longest prefix first, so "gpt-4o" / "gpt-4.1" win over "gpt-4".
_PREFIX_TO_ENCODING: tuple[tuple[str, str], ...] = tuple(
    sorted(
        {
            "gpt-4o": "o200k_base",
            "chatgpt-4o": "o200k_base",
            "gpt-4.1": "o200k_base",
            "gpt-4.5": "o200k_base",
            "gpt-5": "o200k_base",
            "o1": "o200k_base",
            "o3": "o200k_base",
            "o4": "o200k_base",
            "gpt-4": "cl100k_base",
            "gpt-3.5": "cl100k_base",
            "gpt-35": "cl100k_base",
            "text-embedding-3": "cl100k_base",
            "text-embedding-ada-002": "cl100k_base",
            "davinci-002": "cl100k_base",
            "babbage-002": "cl100k_base",
        }.items(),
        key=lambda item: -len(item[0]),
    )
)
_SEPARATORS = ("-", ".", ":")

_TEXT_PART_KEYS = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "refusal": "refusal",
}
_IMAGE_PART_TYPES = frozenset({"image_url", "input_image", "image"})

# One piece per English word, 1-3 digits, symbol, whitespace run or other character.
_PIECE = re.compile(r" ?[A-Za-z]+|[0-9]{1,3}|\s+|[^\sA-Za-z0-9]")


class TokenCount(int):
    """A token count; ``exact`` is False when tiktoken was unavailable and this is an estimate."""

    exact: bool

    def __new__(cls, value: int, exact: bool = True) -> TokenCount:
        """Make a count of ``value`` tokens."""
        self = super().__new__(cls, value)
        self.exact = exact
        return self

    def __repr__(self) -> str:
        """Show the value and whether it is exact."""
        return f"TokenCount({int(self)}, exact={self.exact})"

    def __str__(self) -> str:
        """Format as the plain number."""
        return int.__repr__(self)

    def __getnewargs__(self) -> tuple[int, bool]:
        """Keep ``exact`` through pickle and copy."""
        return (int(self), self.exact)


class _Slot:
    """The load state of one encoding."""

    __slots__ = ("lock", "encoding", "error", "thread", "attempted", "off")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.encoding: Encoding | None = None
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        self.attempted = False
        # Off after a failed load: estimates for _RETRY_AFTER seconds, then one caller tries again.
        self.off = Cooldown(_RETRY_AFTER, clock=lambda: _monotonic())


_slots: dict[str, _Slot] = {}
_state_lock = threading.Lock()
_warned = False
_unknown_models: set[str] = set()


def _reset_in_child() -> None:
    """After ``os.fork``: locks another thread held (a load in progress) are not ours; start afresh."""
    global _state_lock
    _state_lock = threading.Lock()
    for slot in _slots.values():
        slot.lock = threading.Lock()
        slot.thread = None
        slot.off.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_in_child)


def _reset_for_tests() -> None:
    """Forget loaded and failed encodings, the warning and the unknown models seen (tests only)."""
    global _warned
    with _state_lock:
        _slots.clear()
        _warned = False
        _unknown_models.clear()


def _settings() -> Mapping[str, Any]:
    """The current config, or an empty mapping when the config module is unavailable."""
    try:
        from ._config import resolved
    except ImportError:
        return {}
    return resolved()


def _resolve_model(model: str | None) -> str | None:
    """Apply the configured default model and ``MODEL_ALIASES`` (e.g. Azure deployment names)."""
    settings = _settings()
    if model is None:
        model = settings.get("MODEL")
    aliases = settings.get("MODEL_ALIASES") or {}
    if model is not None and model in aliases:
        return str(aliases[model])
    return model


def _lookup_encoding(model: str | None) -> str | None:
    """The documented encoding for a real model name, or None when it is not known."""
    if not model:
        return None
    name = model.strip().lower().rsplit("/", 1)[-1]
    if name.startswith("ft:"):
        name = name[3:]
    for prefix, encoding in _PREFIX_TO_ENCODING:
        if name == prefix or (name.startswith(prefix) and name[len(prefix)] in _SEPARATORS):
            return encoding
    return None


def _encoding_name(model: str | None) -> str:
    """The encoding for an already resolved model; unknown names log one DEBUG line each."""
    encoding = _lookup_encoding(model)
    if encoding is not None:
        return encoding
    if model is not None:
        with _state_lock:
            first = model not in _unknown_models
            _unknown_models.add(model)
        if first:
            logger.debug(
                "Unknown model %r: counting tokens with %s; map it to a known model in the "
                "MODEL_ALIASES setting to count exactly",
                model,
                FALLBACK_ENCODING,
            )
    return FALLBACK_ENCODING


def encoding_name_for_model(model: str) -> str:
    """The tiktoken encoding for ``model`` (aliases applied); unknown: ``FALLBACK_ENCODING``."""
    return _encoding_name(_resolve_model(model))


def _load(slot: _Slot, name: str, tiktoken: Any) -> None:
    """Load one encoding through tiktoken (runs in a daemon thread; never raises)."""
    try:
        slot.encoding = tiktoken.get_encoding(name)
    except Exception as exc:  # noqa: BLE001 - any failure means "estimate instead"
        slot.error = exc


def _warn_once(name: str, reason: str) -> None:
    """Log the offline WARNING once per process."""
    global _warned
    with _state_lock:
        if _warned:
            return
        _warned = True
    logger.warning(
        "Could not load the tiktoken encoding %r (%s); token counts are estimates "
        "(exact=False) until it loads, retried every %d s. To count exactly, download the "
        "encodings once where there is network access, e.g. TIKTOKEN_CACHE_DIR=/path/to/dir "
        "python -c \"import tiktoken; [tiktoken.get_encoding(e) for e in ('o200k_base', "
        "'cl100k_base')]\", and set TIKTOKEN_CACHE_DIR to that directory here.",
        name,
        reason,
        int(_RETRY_AFTER),
    )


_load_wait: contextvars.ContextVar[float | None] = contextvars.ContextVar("llmutils_tiktoken_wait", default=None)


@contextlib.contextmanager
def _held(lock: threading.Lock) -> Iterator[None]:
    """Release ``lock`` (already acquired) when the block ends."""
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def loading_within(seconds: float | None) -> Iterator[None]:
    """Within the block, a count waits at most ``seconds`` (None: the usual 5 s) for tiktoken to
    load an encoding, then estimates (``exact=False``) while the load goes on in the background.
    A call with a ``total_timeout`` counts its TPM estimate this way."""
    token = _load_wait.set(seconds)
    try:
        yield
    finally:
        _load_wait.reset(token)


def _get_encoding(name: str) -> Encoding | None:
    """The loaded encoding, or None while it cannot be loaded (see the module docstring)."""
    slot = _slots.get(name)
    if slot is None:
        with _state_lock:
            slot = _slots.setdefault(name, _Slot())
    encoding = slot.encoding
    if encoding is not None:
        return encoding
    if slot.off.blocked():
        return None
    wait = _LOAD_TIMEOUT
    limit = _load_wait.get()
    if limit is not None and limit < wait:  # a call's deadline comes first: estimate rather than wait
        wait = max(0.0, limit)
    if not slot.lock.acquire(timeout=wait):
        return None
    with _held(slot.lock):
        if slot.encoding is not None:
            return slot.encoding
        if slot.off.blocked():
            return None
        try:
            tiktoken = lazy_import("tiktoken")
        except ImportError as exc:
            slot.off.trip(permanent=True)
            _warn_once(name, f"tiktoken is not installed: {exc}")
            return None
        if slot.attempted:
            # A retry: other callers estimate meanwhile instead of queueing on this lock.
            slot.off.trip(interval=_RETRY_AFTER)
        slot.attempted = True
        thread = slot.thread
        if thread is None or not thread.is_alive():
            slot.error = None
            thread = threading.Thread(
                target=_load,
                args=(slot, name, tiktoken),
                name=f"llmutils-tiktoken-{name}",
                daemon=True,
            )
            slot.thread = thread
            thread.start()
        thread.join(wait)
        if slot.encoding is not None:
            slot.off.reset()
            return slot.encoding
        if thread.is_alive() and wait < _LOAD_TIMEOUT:
            return None  # cut short by the caller's deadline: the load goes on; this count estimates
        slot.off.trip(interval=_RETRY_AFTER)
        if thread.is_alive():
            reason = f"no answer within {_LOAD_TIMEOUT:g} s"
        else:
            reason = f"{type(slot.error).__name__}: {slot.error}"
    _warn_once(name, reason)
    return None


def estimate_tokens(text: str) -> int:
    """The offline estimate used when tiktoken cannot load: meant to over- rather than under-count.

    One token per English word of up to 6 letters (longer words: one per 3 letters, rounded
    up), per group of 1-3 digits, per ASCII symbol and per whitespace run; each non-ASCII
    character counts its UTF-8 length minus one (at least 1). Measured against cl100k_base,
    this over-counts English prose, code, JSON and CJK / Cyrillic / Arabic / Indic text by
    about 1.0-1.9x (o200k_base needs fewer tokens still); random strings such as base64 can
    be under-counted (about 0.6x).
    """
    count = 0
    for match in _PIECE.finditer(text):
        piece = match.group()
        last = piece[-1]
        if last.isascii():
            if last.isalpha():
                letters = len(piece) - (piece[0] == " ")
                count += 1 if letters <= 6 else math.ceil(letters / 3)
            else:
                count += 1
        else:
            count += max(1, len(last.encode("utf-8", "surrogatepass")) - 1)
    return count


def _text_counter(model: str | None) -> tuple[Callable[[str], int], bool]:
    """A function counting the tokens of a text for ``model``, and whether it is exact."""
    encoding = _get_encoding(_encoding_name(model))
    if encoding is None:
        return estimate_tokens, False
    return (lambda text: len(encoding.encode_ordinary(text))), True


def count_text_tokens(text: str, model: str | None = None) -> TokenCount:
    """Tokens in plain ``text`` (no message overhead) for ``model`` (None: the configured model).

    :param text: the text to count.
    :param model: a model name, or an alias from ``MODEL_ALIASES``; unknown models use o200k_base.
    :returns: the count, an ``int`` whose ``exact`` is False when it is an estimate.
    """
    if not isinstance(text, str):
        raise InvalidRequestError(f"count_text_tokens: text must be a str, not {type(text).__name__} ({text!r:.80})")
    _check_model("count_text_tokens", model)
    count, exact = _text_counter(_resolve_model(model))
    return TokenCount(count(text) if text else 0, exact)


def _check_model(where: str, model: Any) -> None:
    if model is not None and not isinstance(model, str):
        raise InvalidRequestError(f"{where}: model must be a str (or None for the configured model), not {type(model).__name__} ({model!r:.80})")


def _strings(value: Any) -> list[str]:
    """Every string inside a JSON-like value, except ``type`` tags."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [s for key, item in value.items() if key != "type" for s in _strings(item)]
    if isinstance(value, (list, tuple)):
        return [s for item in value for s in _strings(item)]
    return []


def _count_part(part: Any, count: Callable[[str], int]) -> int:
    """Tokens of one ``content`` part (see the module docstring for the rules)."""
    if isinstance(part, str):
        return count(part)
    if not isinstance(part, Mapping):
        return 0
    kind = part.get("type")
    if kind in _TEXT_PART_KEYS and isinstance(part.get(_TEXT_PART_KEYS[kind]), str):
        return count(part[_TEXT_PART_KEYS[kind]])
    if kind in _IMAGE_PART_TYPES:
        image = part.get("image_url")
        detail = image.get("detail") if isinstance(image, Mapping) else part.get("detail")
        return IMAGE_TOKENS_LOW if detail == "low" else IMAGE_TOKENS_HIGH
    return sum(count(s) for s in _strings(part))


def _count_call(call: Any, count: Callable[[str], int]) -> int:
    """Tokens of one tool call or legacy ``function_call``: name, arguments and an overhead."""
    if not isinstance(call, Mapping):
        return 0
    function = call.get("function", call)
    if not isinstance(function, Mapping):
        return TOOL_CALL_TOKENS
    return TOOL_CALL_TOKENS + sum(
        count(function[key]) for key in ("name", "arguments") if isinstance(function.get(key), str)
    )


def _count_value(key: str, value: Any, count: Callable[[str], int]) -> int:
    """Tokens of one message field."""
    if isinstance(value, str):
        return count(value)
    if key == "content" and isinstance(value, (list, tuple)):
        return sum(_count_part(part, count) for part in value)
    if key == "tool_calls" and isinstance(value, (list, tuple)):
        return sum(_count_call(call, count) for call in value)
    if key == "function_call":
        return _count_call(value, count)
    return sum(count(s) for s in _strings(value))


def _check_messages(messages: Any) -> None:
    """Raise InvalidRequestError naming the culprit unless ``messages`` is a sequence of mappings."""
    shape = "a str or a list of message dicts such as {'role': 'user', 'content': ...}"
    if isinstance(messages, Mapping):
        raise InvalidRequestError(f"count_tokens: messages must be {shape}, not one dict; wrap it in a list: [message]")
    if not isinstance(messages, Sequence) or isinstance(messages, (bytes, bytearray)):
        raise InvalidRequestError(f"count_tokens: messages must be {shape}, not {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequestError(
                f"count_tokens: messages[{i}] is a {type(message).__name__} ({message!r:.80}), "
                f"not a message dict; messages must be {shape}"
            )


def count_tokens(
    messages: Sequence[Mapping[str, Any]] | str, model: str | None = None
) -> TokenCount:
    """Prompt tokens of chat ``messages`` for ``model`` (None: the configured model).

    A str counts as plain text, without message overhead. The result is exact unless the
    encoding could not be loaded (``.exact`` is then False); see the module docstring.

    :param messages: chat messages (dicts with ``role`` and ``content``, list content and tool
        calls included), or a str.
    :param model: a model name, or an alias from ``MODEL_ALIASES``; unknown models use o200k_base.
    :returns: the count, an ``int`` whose ``exact`` says whether tiktoken counted it.
    :raises InvalidRequestError: an item that is not a message, naming it.
    """
    if isinstance(messages, str):
        return count_text_tokens(messages, model)
    _check_model("count_tokens", model)
    _check_messages(messages)
    try:
        return _count_messages(messages, model)
    except RecursionError:
        raise InvalidRequestError("count_tokens: the messages are nested too deeply (or refer to themselves) to be a request") from None


def _count_messages(messages: Sequence[Mapping[str, Any]], model: str | None) -> TokenCount:
    resolved = _resolve_model(model)
    count, exact = _text_counter(resolved)
    legacy = (resolved or "").lower().rsplit("/", 1)[-1] == "gpt-3.5-turbo-0301"
    per_message, per_name = (4, -1) if legacy else (3, 1)
    total = 3  # every reply is primed with <|start|>assistant<|message|>
    for message in messages:
        total += per_message
        for key, value in message.items():
            total += _count_value(key, value, count)
            if key == "name":
                total += per_name
    return TokenCount(total, exact)
