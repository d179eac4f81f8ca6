"""Configuration: every setting, its default, and the one place that reads files and the environment.

Precedence, later wins:

1. ``DEFAULTS`` shipped in this module;
2. the ``[OpenAI]`` section of a ``config.ini`` at ``$LLMUTILS_CONFIG`` or ``./config.ini``;
3. environment variables (``OPENAI_BASE_URL``, ``AZURE_OPENAI_ENDPOINT``, ``OPENAI_API_VERSION``,
   and ``LLMUTILS_<KEY>`` for any key);
4. :func:`force_default_value` (process-wide);
5. :func:`override_defaults` (a context manager: this thread / context only);
6. the arguments of each call.

Nothing is read at import: :func:`resolve` reads at call time, re-parsing the file only when its
modification time changes.
"""

from __future__ import annotations

import configparser
import contextlib
import contextvars
import difflib
import os
import stat
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from ._exceptions import ConfigError

__all__ = [
    "AZURE_V1_API_VERSION",
    "CONFIG_SECTION",
    "DEFAULTS",
    "REASONING_EFFORTS",
    "UNSET",
    "api_key_from_env",
    "config_file_path",
    "config_file_values",
    "force_default_value",
    "is_azure_v1",
    "override_defaults",
    "reset_forced_values",
    "resolve",
    "resolved",
    "validate",
]

CONFIG_SECTION = "OpenAI"

DEFAULT_API_TYPE = "openai"
DEFAULT_MODEL = "gpt-4.1-mini"
DEFAULT_REASONING_MODEL = "o4-mini"
DEFAULT_EMBEDDING_MODEL = "text-embedding-3-small"
DEFAULT_AZURE_API_VERSION = "2024-10-21"
DEFAULT_CACHE_FILE_NAME = "llmutils_cache.sqlite"
#: Model name prefixes served only by the Responses API (``*`` matches any run of characters):
#: the ``-pro`` reasoning models, the codex models, computer use and deep research.
DEFAULT_RESPONSES_MODELS: tuple[str, ...] = (
    "o1-pro",
    "o3-pro",
    "gpt-5*-pro",
    "*codex*",
    "computer-use-preview",
    "o3-deep-research",
    "o4-mini-deep-research",
)
DEFAULT_AZURE_AD_SCOPE = "https://cognitiveservices.azure.com/.default"
DEFAULT_MAX_WAIT = 8.0  # openai-python's MAX_RETRY_DELAY: the cap of one backoff wait
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
AZURE_V1_API_VERSION = "v1"
"""The ``AZURE_API_VERSION`` that selects Azure's v1 API (``{endpoint}/openai/v1/``, no ``api-version``
query), in any case (``V1`` too): see :func:`is_azure_v1`."""


def is_azure_v1(api_version: object) -> bool:
    """Whether ``api_version`` (an ``AZURE_API_VERSION`` or ``api_version=`` value) selects Azure's v1 API.

    ``v1`` in any case and with surrounding spaces (``V1``, ``" v1 "``) does; a dated version does not.
    """
    return isinstance(api_version, str) and api_version.strip().lower() == AZURE_V1_API_VERSION


class _Unset:
    """The type of :data:`UNSET`."""

    _instance: _Unset | None = None

    def __new__(cls) -> _Unset:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


UNSET: Any = _Unset()
"""An argument that was not given (``None`` is a value: it turns a configured setting off)."""


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true/false, yes/no, on/off or 1/0")


def _parse_aliases(text: str) -> dict[str, str]:
    aliases: dict[str, str] = {}
    for item in text.replace("\n", ",").split(","):
        if not item.strip():
            continue
        name, sep, model = item.partition("=")
        if not sep or not name.strip() or not model.strip():
            raise ValueError("expected 'alias=model' pairs separated by commas")
        aliases[name.strip()] = model.strip()
    return aliases


def _check_http_url(url: str) -> None:
    """An endpoint must be an http(s) URL with a host; raise ValueError saying what is wrong."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL with a host, e.g. http://localhost:11434/v1")


def _check_redis_url(url: str) -> None:
    """A shared rate limit lives on Redis: raise ValueError unless ``url`` is a Redis URL."""
    if urlsplit(url).scheme.lower() not in ("redis", "rediss", "unix"):
        raise ValueError("expected a Redis URL: redis://[:password@]host:6379/0, rediss://... or unix:///path")


@dataclass(frozen=True)
class _Key:
    """One configuration key: its type, default, whether None is allowed, and a one-line doc."""

    kind: type
    default: Any
    optional: bool = False
    choices: tuple[str, ...] = ()
    url: bool = False
    doc: str = ""
    minimum: float = 0
    redis_url: bool = False

    def parse(self, value: Any) -> Any:
        """Turn a string (or an already typed value) into this key's type; raise ValueError if it cannot."""
        if isinstance(value, str):
            text = value.strip()
            if self.optional and text.lower() in ("", "none", "null") and text not in self.choices:
                return None
            if self.kind is bool:
                parsed: Any = _parse_bool(text)
            elif self.kind is dict:
                parsed = _parse_aliases(text)
            elif self.kind is tuple:
                parsed = tuple(item.strip() for item in text.replace("\n", ",").split(",") if item.strip())
            elif self.kind is int:
                parsed = int(text)
            elif self.kind is float:
                parsed = float(text)
            else:
                parsed = text
        elif value is None:
            if not self.optional:
                raise ValueError("a value is required")
            return None
        elif self.kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            parsed = float(value)
        elif self.kind is tuple and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            parsed = tuple(value)
        elif isinstance(value, self.kind) and not (self.kind is int and isinstance(value, bool)):
            parsed = value
        else:
            raise ValueError(f"expected {self.kind.__name__}, got {type(value).__name__}")
        if self.url and parsed is not None:
            _check_http_url(parsed)
        if self.redis_url and parsed is not None:
            _check_redis_url(parsed)
        if self.choices and parsed not in self.choices:
            raise ValueError(f"expected one of {', '.join(self.choices)}")
        if self.kind in (int, float) and parsed is not None and parsed < self.minimum:
            raise ValueError(f"expected a number >= {self.minimum:g}")
        return parsed


_KEYS: dict[str, _Key] = {
    "API_TYPE": _Key(str, DEFAULT_API_TYPE, doc="which registered client client() returns"),
    "MODEL": _Key(str, DEFAULT_MODEL, doc="chat model (or Azure deployment)"),
    "REASONING_MODEL": _Key(str, DEFAULT_REASONING_MODEL, doc="a model treated as a reasoning model"),
    "EMBEDDING_MODEL": _Key(str, DEFAULT_EMBEDDING_MODEL, doc="model for get_embedding"),
    # Sampling keys are unset by default: only what is set is sent (the server's defaults apply).
    "MAX_TOKENS": _Key(int, None, optional=True, doc="max output tokens (non-reasoning models); unset: not sent"),
    "MAX_COMPLETION_TOKENS": _Key(int, None, optional=True, doc="max output tokens for reasoning models"),
    "TEMPERATURE": _Key(float, None, optional=True, doc="unset: not sent"),
    "TOP_P": _Key(float, None, optional=True, doc="unset: not sent"),
    "FREQ_PENALTY": _Key(float, None, optional=True, doc="sent as frequency_penalty; unset: not sent"),
    "PRESENCE_PENALTY": _Key(float, None, optional=True, doc="unset: not sent"),
    "REASONING_EFFORT": _Key(
        str, None, optional=True, choices=REASONING_EFFORTS, doc="reasoning models; 'none' sends the sampling keys too"
    ),
    "API": _Key(
        str, None, optional=True, choices=("chat", "responses"), doc="chat or responses; unset: chat, or responses for RESPONSES_MODELS"
    ),
    "RESPONSES_MODELS": _Key(tuple, DEFAULT_RESPONSES_MODELS, doc="model name prefixes sent to the Responses API when API is unset"),
    "TIMEOUT": _Key(float, 60.0, doc="seconds for one HTTP attempt"),
    "TOTAL_TIMEOUT": _Key(float, None, optional=True, doc="seconds for a whole call, retries included"),
    "MAX_ATTEMPTS": _Key(int, 5, minimum=1, doc="HTTP attempts per call, the first included"),
    "WAITING_TIME": _Key(float, 1.0, doc="first backoff wait, seconds"),
    "EXPONENTIAL_BACKOFF_FACTOR": _Key(float, 2.0, doc="backoff multiplier per attempt"),
    "MAX_WAIT": _Key(float, DEFAULT_MAX_WAIT, doc="cap on one backoff wait of ours (a server's Retry-After is obeyed up to 120 s)"),
    "CACHE_API_CALLS": _Key(bool, False),
    "CACHE_FILE_NAME": _Key(str, DEFAULT_CACHE_FILE_NAME),
    "CACHE_URL": _Key(
        str,
        None,
        optional=True,
        doc="shared cache, wins over CACHE_FILE_NAME: redis://[:password@]host:6379/0, rediss://, unix://, sqlite:///file",
    ),
    "CACHE_MODE": _Key(str, "readwrite", choices=("off", "readwrite", "readonly", "replay", "refresh")),
    "CACHE_TTL": _Key(float, None, optional=True, doc="seconds an entry stays valid"),
    "CACHE_MEMORY_ITEMS": _Key(int, 0, doc="decoded answers kept in memory in front of the cache (0: none)"),
    "BASE_URL": _Key(str, None, optional=True, url=True, doc="OpenAI-compatible endpoint"),
    "AZURE_ENDPOINT": _Key(str, None, optional=True, url=True),
    "AZURE_API_VERSION": _Key(str, DEFAULT_AZURE_API_VERSION, doc="a dated version, or 'v1' for {endpoint}/openai/v1/"),
    "AZURE_AD_SCOPE": _Key(str, DEFAULT_AZURE_AD_SCOPE, doc="Entra ID scope of the DefaultAzureCredential token"),
    "MODEL_ALIASES": _Key(
        dict, {}, doc="alias=model pairs: what a gateway alias or Azure deployment really is (reasoning, tokens)"
    ),
    "RPM": _Key(float, None, optional=True, doc="client-side requests per minute limit"),
    "TPM": _Key(float, None, optional=True, doc="client-side tokens per minute limit"),
    "MAX_CONCURRENT_MODEL_CALLS": _Key(int, None, optional=True, doc="calls in flight per client"),
    "RATE_LIMIT_URL": _Key(
        str,
        None,
        optional=True,
        doc="Redis URL that makes RPM/TPM shared by every process using it and RATE_LIMIT_NAME: redis://host:6379/0",
        redis_url=True,
    ),
    "RATE_LIMIT_NAME": _Key(
        str, None, optional=True, doc="name of the shared RPM/TPM budget (default: the endpoint URL)"
    ),
    # In the [OpenAI] section of the old module's config.ini (TinyTroupe's display limit): accepted
    # so that file keeps working, and not used by llmutils.
    "MAX_CONTENT_DISPLAY_LENGTH": _Key(int, None, optional=True, doc="the old module's display limit; accepted, unused"),
    "BATCH_POLL_INTERVAL": _Key(float, 5.0, doc="Batch API: first wait between polls of a batch, seconds"),
    "BATCH_POLL_MAX": _Key(float, 60.0, doc="Batch API: cap on the wait between polls, seconds"),
}

DEFAULTS: Mapping[str, Any] = {name: key.default for name, key in _KEYS.items()}

# Standard environment variables and the key each one sets (LLMUTILS_<KEY> covers every key).
_ENV_ALIASES = {
    "OPENAI_BASE_URL": "BASE_URL",
    "AZURE_OPENAI_ENDPOINT": "AZURE_ENDPOINT",
    "OPENAI_API_VERSION": "AZURE_API_VERSION",
}

_forced: dict[str, Any] = {}
_forced_lock = threading.Lock()
# The default is read-only: one object shared by every context, never to be modified.
_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar("llmutils_overrides", default=MappingProxyType({}))
_forced_version = 0  # bumped on every change of _forced: part of the settings memo's key
_file_cache: dict[tuple[int, int, int, int], dict[str, Any]] = {}


def _key_name(key: str) -> str:
    """Normalise a key (``model`` or ``MODEL``) and fail with a suggestion when it is unknown."""
    if not isinstance(key, str):
        raise ConfigError(f"Config keys are strings, got {key!r}")
    name = key.upper()
    if name not in _KEYS:
        close = difflib.get_close_matches(name, _KEYS, n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise ConfigError(f"Unknown config key {key!r}.{hint} Known keys: {', '.join(_KEYS)}")
    return name


def _parse(name: str, value: Any, source: str) -> Any:
    try:
        return _KEYS[name].parse(value)
    except (ValueError, TypeError) as exc:
        shown = _without_password(value) if name.endswith("_URL") and isinstance(value, str) else value
        raise ConfigError(f"Bad value {shown!r} for config key {name} in {source}: {exc}") from None


def _without_password(url: str) -> str:
    """``url`` with the password of its user part replaced by ``***`` (for error messages)."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return url.split("://", 1)[0] + "://***"
    return url.replace(f":{password}@", ":***@", 1) if password else url


# (variable, key, required-non-empty) for every environment variable that sets a key.
_ENV_VARS = tuple((var, name, True) for var, name in _ENV_ALIASES.items()) + tuple(
    ("LLMUTILS_" + name, name, False) for name in _KEYS
)
_CONFIG_VAR = "LLMUTILS_CONFIG"
# Every variable resolve() reads; looked up in one pass over the environment's names.
_ENV_NAMES = frozenset(var for var, _, _ in _ENV_VARS) | {_CONFIG_VAR}
_ENV_BY_NAME = {var: (name, non_empty) for var, name, non_empty in _ENV_VARS}


if os.supports_bytes_environ:
    _ENV_BYTES = {os.fsencode(var): var for var in _ENV_NAMES}
    _ENV_BYTE_NAMES = frozenset(_ENV_BYTES)

    def _env_items() -> tuple[tuple[str, str], ...]:
        """The variables resolve() reads that are set now, as sorted ``(name, value)`` pairs.

        Portable (public ``os.environb``, live and in step with ``os.environ``) and exact: one pass
        over the environment's names finds the ones set, so the misses, which cost two exceptions
        each through ``os.environ.get``, stay off the hot path.
        """
        env = os.environb
        present = _ENV_BYTE_NAMES.intersection(env)
        if not present:
            return ()
        return tuple(sorted((_ENV_BYTES[var], os.fsdecode(env[var])) for var in present))

else:  # pragma: no cover - Windows: os.environ is the only view

    def _env_items() -> tuple[tuple[str, str], ...]:
        """The variables resolve() reads that are set now, as sorted ``(name, value)`` pairs."""
        env = os.environ
        present = _ENV_NAMES.intersection(env)
        if not present:
            return ()
        return tuple(sorted((var, env[var]) for var in present))


def _config_stamp(explicit: str | None) -> tuple[str, int, int, int, int] | None:
    """``(path, device, inode, mtime_ns, size)`` of the config file that applies now, or None.

    ``$LLMUTILS_CONFIG`` must name a file; else ``./config.ini`` is used if it is one. One ``stat``.
    """
    name = os.path.expanduser(explicit) if explicit else "config.ini"
    try:
        st = os.stat(name)
    except OSError:
        st = None
    if st is None or not stat.S_ISREG(st.st_mode):
        if explicit:
            raise ConfigError(f"{_CONFIG_VAR} points to {Path(name)}, which is not a file")
        return None
    return (name, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def config_file_path() -> Path | None:
    """The config file that applies now: ``$LLMUTILS_CONFIG`` (must exist) or ``./config.ini`` if present."""
    stamp = _config_stamp(os.environ.get(_CONFIG_VAR) or None)
    return None if stamp is None else Path(stamp[0])


def config_file_values(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The settings the config file sets (``path``, else :func:`config_file_path`), parsed; {} when none."""
    stamp = _config_stamp(os.fspath(path)) if path is not None else _config_stamp(os.environ.get(_CONFIG_VAR) or None)
    return {} if stamp is None else dict(_read_file(stamp))


def _read_file(stamp: tuple[str, int, int, int, int]) -> dict[str, Any]:
    """Parse the ``[OpenAI]`` section of the file ``stamp`` names, cached until the file changes.

    Other modules read the file through :func:`config_file_values` (or :func:`resolve`).
    """
    cached = _file_cache.get(stamp[1:])
    if cached is not None:
        return cached
    name = os.path.abspath(stamp[0])
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case: the documented idiom, a method in the stub
    try:
        parser.read(name, encoding="utf-8")
    except configparser.Error as exc:
        raise ConfigError(f"Cannot parse config file {name}: {exc}") from None
    # The old module's config.ini holds other programs' sections beside [OpenAI] (TinyTroupe's
    # [Simulation], [Cognition], [Logging], ...): those are not ours and are left alone. What is an
    # error is a file whose settings llmutils would silently miss: [OpenAI] misspelt ([openai]), or
    # sections with no [OpenAI] at all.
    others = [section for section in parser.sections() if section != CONFIG_SECTION]
    misspelt = [section for section in others if section.lower() == CONFIG_SECTION.lower()]
    if misspelt or (others and not parser.has_section(CONFIG_SECTION)):
        found = ", ".join(f"[{section}]" for section in parser.sections())
        raise ConfigError(
            f"Config file {name} has sections {found}; llmutils reads only [{CONFIG_SECTION}] "
            "(the name is case-sensitive): rename the section or move the other settings to another file"
        )
    values: dict[str, Any] = {}
    if parser.has_section(CONFIG_SECTION):
        for raw_key, raw_value in parser.items(CONFIG_SECTION):
            try:
                key = _key_name(raw_key)
            except ConfigError as exc:
                raise ConfigError(f"{exc} (in [{CONFIG_SECTION}] of {name})") from None
            values[key] = _parse(key, raw_value, name)
    if len(_file_cache) > 16:
        _file_cache.clear()
    _file_cache[stamp[1:]] = values
    return values


def _read_env(items: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for var, raw in items:
        known = _ENV_BY_NAME.get(var)
        if known is None or (known[1] and not raw):
            continue
        values[known[0]] = _parse(known[0], raw, f"environment variable {var}")
    return values


# Resolved settings, memoised on everything they depend on: the config file's identity and
# modification stamp, the environment variables that are set, the forced values' version, and the
# context and per-client layers (held, and compared by identity).
_memo: dict[tuple[Any, ...], tuple[Mapping[str, Any], Mapping[str, Any] | None, dict[str, Any]]] = {}
_MEMO_SIZE = 64


def resolve(overrides: Mapping[str, Any] | None = None, *, validated: bool = False) -> dict[str, Any]:
    """The settings in force now, as a new dict with UPPERCASE keys, every layer applied.

    ``overrides`` (config keys, either case) is applied last, as per-call arguments are;
    ``validated=True`` says they already went through :func:`validate`.
    """
    return dict(resolved(overrides, validated=validated))


def resolved(overrides: Mapping[str, Any] | None = None, *, validated: bool = False) -> Mapping[str, Any]:
    """Like :func:`resolve`, but the memoised mapping itself: fast, shared, never to be modified."""
    if overrides and not validated:
        overrides = validate(overrides, "the call's arguments")
    env = _env_items()
    explicit = next((value for var, value in env if var == _CONFIG_VAR), None) if env else None
    stamp = _config_stamp(explicit or None)
    context = _context.get()
    key = (stamp, env, _forced_version, id(context), id(overrides))
    hit = _memo.get(key)
    if hit is not None and hit[0] is context and hit[1] is overrides:
        return hit[2]
    layers: list[Mapping[str, Any]] = [_read_file(stamp) if stamp is not None else {}, _read_env(env), dict(_forced), context]
    if overrides:
        layers.append(overrides)
    settings = dict(DEFAULTS)
    for layer in layers:
        settings.update(layer)
    # An explicit cache file set at a later layer than CACHE_URL (code over the environment or the
    # config file) names the store: the URL from the lower layer does not apply.
    file_layer = max((i for i, layer in enumerate(layers) if "CACHE_FILE_NAME" in layer), default=-1)
    url_layer = max((i for i, layer in enumerate(layers) if "CACHE_URL" in layer), default=-1)
    if file_layer > url_layer >= 0:
        settings["CACHE_URL"] = None
    if len(_memo) >= _MEMO_SIZE:
        _memo.clear()
    _memo[key] = (context, overrides, settings)
    return settings


def validate(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Check and convert ``values`` (config keys, either case) without reading any file."""
    parsed = {}
    for key, value in values.items():
        name = _key_name(key)
        parsed[name] = _parse(name, value, source)
    return parsed


def force_default_value(key: str, value: Any) -> None:
    """Set a default for the whole process, above config files and the environment.

    >>> force_default_value("MODEL", "gpt-4o-mini")

    :param key: a setting (``MODEL``, any case; the keys are listed in :data:`DEFAULTS`).
    :param value: its value, checked and converted as a config file's would be.
    :raises ConfigError: an unknown key (with a suggestion) or a malformed value, naming both.
    """
    global _forced_version
    name = _key_name(key)
    parsed = _parse(name, value, "force_default_value()")
    with _forced_lock:
        _forced[name] = parsed
        _forced_version += 1


def reset_forced_values() -> None:
    """Forget every :func:`force_default_value` (useful between tests)."""
    global _forced_version
    with _forced_lock:
        _forced.clear()
        _forced_version += 1


@contextlib.contextmanager
def override_defaults(**values: Any) -> Iterator[dict[str, Any]]:
    """Override defaults for the current thread / context only, e.g. inside one web request.

    >>> with override_defaults(model="gpt-4o", temperature=0):
    ...     client().send_message([{"role": "user", "content": "hi"}])

    :param values: settings by name (any case), above :func:`force_default_value` and below a
        client's constructor arguments; the previous values come back when the block ends.
    :returns: a context manager; ``as`` gives the overrides in force inside it.
    :raises ConfigError: an unknown key or a malformed value, before the block runs.
    """
    parsed = validate(values, "override_defaults()")
    token = _context.set({**_context.get(), **parsed})
    try:
        yield parsed
    finally:
        _context.reset(token)


def api_key_from_env(names: tuple[str, ...]) -> tuple[str | None, str | None]:
    """The first non-empty environment variable among ``names``: ``(value, variable name)``."""
    env = os.environ
    for name in names:
        value = env.get(name)
        if value:
            return value, name
    return None, None

