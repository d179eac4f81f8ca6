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
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ._exceptions import ConfigError

__all__ = [
    "DEFAULTS",
    "CONFIG_SECTION",
    "resolve",
    "validate",
    "force_default_value",
    "reset_forced_values",
    "override_defaults",
    "config_file_path",
    "api_key_from_env",
    "UNSET",
    "REASONING_EFFORTS",
    "AZURE_V1_API_VERSION",
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
"""The ``AZURE_API_VERSION`` that selects Azure's v1 API (``{endpoint}/openai/v1/``, no ``api-version`` query)."""


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
        if self.kind in (int, float) and parsed < 0:
            raise ValueError("expected a number >= 0")
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
    "API": _Key(str, None, optional=True, choices=("chat", "responses"), doc="chat or responses; unset: chat, or responses for RESPONSES_MODELS"),
    "RESPONSES_MODELS": _Key(tuple, DEFAULT_RESPONSES_MODELS, doc="model name prefixes sent to the Responses API when API is unset"),
    "TIMEOUT": _Key(float, 60.0, doc="seconds for one HTTP attempt"),
    "TOTAL_TIMEOUT": _Key(float, None, optional=True, doc="seconds for a whole call, retries included"),
    "MAX_ATTEMPTS": _Key(int, 5, doc="HTTP attempts per call, the first included"),
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
    "RATE_LIMIT_NAME": _Key(str, None, optional=True, doc="name of the shared RPM/TPM budget (default: the endpoint URL)"),
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
_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar("llmutils_overrides", default={})
_file_cache: dict[str, tuple[tuple[int, int], dict[str, Any]]] = {}


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


def _environ_get() -> Any:
    """A fast ``getenv`` over the live environment. On POSIX ``os.environ`` encodes the name on every
    lookup, and settings are resolved on every call, so look in its underlying bytes dict (still live,
    kept in step by ``os.environ``) instead."""
    data = getattr(os.environ, "_data", None)
    if os.name == "posix" and isinstance(data, dict):

        def get(var: str) -> str | None:
            raw = data.get(var.encode())
            return None if raw is None else os.fsdecode(raw)

        return get
    return os.environ.get


_getenv = _environ_get()

# (variable, key, required-non-empty) for every environment variable that sets a key.
_ENV_VARS = tuple((var, name, True) for var, name in _ENV_ALIASES.items()) + tuple(
    ("LLMUTILS_" + name, name, False) for name in _KEYS
)


def config_file_path() -> Path | None:
    """The config file that applies now: ``$LLMUTILS_CONFIG`` (must exist) or ``./config.ini`` if present."""
    explicit = _getenv("LLMUTILS_CONFIG")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"LLMUTILS_CONFIG points to {path}, which is not a file")
        return path
    return Path("config.ini") if os.path.isfile("config.ini") else None


def _read_file(path: Path) -> dict[str, Any]:
    """Parse the ``[OpenAI]`` section of ``path``, cached until the file changes."""
    name = os.path.abspath(path)
    stat = os.stat(name)
    stamp = (stat.st_mtime_ns, stat.st_size)
    cached = _file_cache.get(name)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read(name, encoding="utf-8")
    except configparser.Error as exc:
        raise ConfigError(f"Cannot parse config file {name}: {exc}") from None
    values: dict[str, Any] = {}
    if parser.has_section(CONFIG_SECTION):
        for raw_key, raw_value in parser.items(CONFIG_SECTION):
            try:
                key = _key_name(raw_key)
            except ConfigError as exc:
                raise ConfigError(f"{exc} (in [{CONFIG_SECTION}] of {name})") from None
            values[key] = _parse(key, raw_value, name)
    _file_cache[name] = (stamp, values)
    return values


def _env_lookup() -> Any:
    """A function returning ``[(variable, key, value), ...]`` for the setting variables that are set.

    It runs on every call, so on POSIX it reads ``os.environ``'s underlying bytes dict (live, kept in
    step by ``os.environ``) with pre-encoded names instead of encoding each name per lookup.
    """
    data = getattr(os.environ, "_data", None)
    if os.name == "posix" and isinstance(data, dict):
        encoded = tuple((var.encode(), var, name, non_empty) for var, name, non_empty in _ENV_VARS)

        def found() -> list[tuple[str, str, str]]:
            return [
                (var, name, os.fsdecode(raw))
                for key, var, name, non_empty in encoded
                if (raw := data.get(key)) is not None and (raw or not non_empty)
            ]

        return found

    def found_portable() -> list[tuple[str, str, str]]:
        return [
            (var, name, raw)
            for var, name, non_empty in _ENV_VARS
            if (raw := os.environ.get(var)) is not None and (raw or not non_empty)
        ]

    return found_portable


_env_settings = _env_lookup()


def _read_env() -> dict[str, Any]:
    return {name: _parse(name, raw, f"environment variable {var}") for var, name, raw in _env_settings()}


def resolve(overrides: Mapping[str, Any] | None = None, *, validated: bool = False) -> dict[str, Any]:
    """The settings in force now, as a new dict with UPPERCASE keys, every layer applied.

    ``overrides`` (config keys, either case) is applied last, as per-call arguments are;
    ``validated=True`` says they already went through :func:`validate`.
    """
    settings = dict(DEFAULTS)
    path = config_file_path()
    if path is not None:
        settings.update(_read_file(path))
    settings.update(_read_env())
    if _forced:
        settings.update(_forced)
    settings.update(_context.get())
    if overrides:
        settings.update(overrides if validated else validate(overrides, "the call's arguments"))
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
    name = _key_name(key)
    parsed = _parse(name, value, "force_default_value()")
    with _forced_lock:
        _forced[name] = parsed


def reset_forced_values() -> None:
    """Forget every :func:`force_default_value` (useful between tests)."""
    with _forced_lock:
        _forced.clear()


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
    for name in names:
        value = _getenv(name)
        if value:
            return value, name
    return None, None

