"""Cache keys: the same request gives the same key, in any process, run or Python version."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["KEY_VERSION", "make_key", "check_json", "non_json"]

KEY_VERSION = 1  # part of every key: bump it and no old entry can ever match again

# Built once: json.dumps() with options builds a new encoder on every call.
_KEY_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def check_json(obj: Any, where: str) -> None:
    """Raise TypeError unless ``obj`` is plain JSON (str-keyed dicts, lists, finite numbers...)."""
    problem = non_json(obj)
    if problem is not None:
        raise TypeError(f"{where}{problem}")


def non_json(obj: Any) -> str | None:
    """Where and why ``obj`` is not plain JSON, or None; builds no text unless something is wrong."""
    kind = type(obj)
    if kind is str or kind is int or kind is bool or obj is None:
        return None
    if kind is dict or isinstance(obj, dict):
        for k, v in obj.items():
            if type(k) is not str and not isinstance(k, str):
                return f" has a key {k!r} of type {type(k).__name__}; JSON keys must be str"
            problem = non_json(v)
            if problem is not None:
                return f"[{k!r}]{problem}"
        return None
    if kind is list or isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            problem = non_json(v)
            if problem is not None:
                return f"[{i}]{problem}"
        return None
    if isinstance(obj, float):
        return None if math.isfinite(obj) else f" is {obj!r}, which JSON cannot represent"
    if isinstance(obj, (str, int)):
        return None
    return f" is a {kind.__name__}, not a JSON value"


def make_key(payload: Mapping[str, Any], *, check: bool = True) -> str:
    """Return the SHA-256 hex of canonical JSON of ``{"v": KEY_VERSION, **payload}``: same request, same key, anywhere.

    Canonical means sorted keys, compact separators and ``ensure_ascii=False``, so the key does not
    depend on dict order, the process, the run or the Python version. Anything that is not plain
    JSON (bytes, sets, objects, NaN, non-str dict keys) raises TypeError rather than being str()-ed.
    ``check=False`` skips the walk that names the culprit (the hot path of a cache hit): the encoder
    still rejects non-JSON values (TypeError) and NaN (ValueError), but int dict keys become strings,
    exactly as they would in the request body.
    """
    if not isinstance(payload, Mapping):
        raise TypeError(f"payload must be a mapping, not {type(payload).__name__}")
    if "v" in payload:
        raise ValueError("payload key 'v' is reserved for KEY_VERSION")
    doc = {"v": KEY_VERSION, **payload}
    if check:
        check_json(doc, "payload")
    return hashlib.sha256(_KEY_JSON(doc).encode("utf-8", "surrogatepass")).hexdigest()
