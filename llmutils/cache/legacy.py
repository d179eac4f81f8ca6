"""Importing the old ``openai_utils`` pickle cache (``openai_api_cache.pickle``) into a cache."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .._exceptions import ConfigError
from .base import WRITE_MODES, CacheBase

__all__ = ["import_pickle_cache"]

logger = logging.getLogger("llmutils")


def _to_json_value(obj: Any) -> Any:
    """An old cached response as plain JSON: pydantic/openai objects are dumped, dicts kept."""
    methods = (("model_dump", {"mode": "json"}), ("to_dict_recursive", {}), ("to_dict", {}), ("dict", {}))
    for name, kwargs in methods:
        method = getattr(obj, name, None)
        if callable(method):
            try:
                return method(**kwargs)
            except TypeError:
                continue
    return obj


def import_pickle_cache(
    pickle_path: str | os.PathLike[str],
    cache: CacheBase,
    *,
    trusted: bool = False,
    key_prefix: str = "legacy:",
) -> int:
    """Copy an old ``openai_api_cache.pickle`` ({str key: response}) into ``cache``; return entries written.

    Unpickling runs whatever code the file contains, so this refuses unless ``trusted=True`` says
    the file is your own. Responses are stored as JSON (``model_dump()``/``to_dict()`` when they
    have it); entries that are not JSON-able are skipped with one WARNING. The old keys cannot be
    turned into new request keys, so they are kept as ``key_prefix + old key``. A file that is
    not a pickle (or is truncated) raises :class:`ConfigError` naming it.

    :param pickle_path: the old cache file.
    :param cache: the cache to write into (open for writing).
    :param trusted: you vouch for the file: without it nothing is read.
    :param key_prefix: what the old keys are stored under.
    :returns: how many entries were written.
    :raises ConfigError: ``trusted`` is not given, or the file is not a pickle (or is truncated).
    :raises OSError: the file cannot be read (a missing file is ``FileNotFoundError``).
    """
    path = Path(os.fspath(pickle_path))
    if not trusted:
        raise ConfigError(
            f"refusing to read {path}: loading a pickle file runs any code it contains. "
            "Pass trusted=True (CLI: --trusted) only for a file you or your own program wrote."
        )
    if cache.mode not in WRITE_MODES:
        raise ConfigError(f"import needs a cache open for writing, but {cache.path} is in mode {cache.mode!r}")
    import pickle  # only here, behind trusted=True: the store itself never unpickles

    with open(path, "rb") as f:
        try:
            data = pickle.load(f)  # noqa: S301 - the caller vouched for this file
        except (ImportError, AttributeError) as exc:
            raise ConfigError(
                f"cannot load {path}: it refers to code that is not installed here ({type(exc).__name__}: {exc}); "
                "install the packages of the program that wrote it and try again"
            ) from exc
        except Exception as exc:  # UnpicklingError, EOFError (truncated), ValueError, ...
            raise ConfigError(
                f"{path} is not a pickle file (or it is truncated): {type(exc).__name__}: {exc}; "
                "pass the old openai_api_cache.pickle file, whole"
            ) from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a {type(data).__name__}, not the dict of an old llmutils cache")
    written = 0
    skipped: list[str] = []
    for old_key, obj in data.items():
        if not isinstance(old_key, str):
            skipped.append(repr(old_key))
            continue
        try:
            ok = cache.put(key_prefix + old_key, _to_json_value(obj), None)
        except TypeError:
            skipped.append(old_key)
            continue
        if ok:
            written += 1
    if skipped:
        logger.warning(
            "llmutils cache import from %s: skipped %d entries that are not JSON values (first: %s)",
            path,
            len(skipped),
            skipped[0],
        )
    return written
