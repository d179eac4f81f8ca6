"""Heavy modules (``openai``, ``httpx2``, ``tiktoken``) imported on first use, fork-safely.

Importing ``llmutils`` imports none of them; the first call does. An import takes a while (openai:
several hundred milliseconds), and a process forked while another thread is in the middle of one
inherits that module's import lock held by a thread that does not exist in the child: the child's
first call then waits forever. So every such import runs under one lock that ``os.fork`` takes
first (``os.register_at_fork``): a fork waits until the import in progress is done, and the child
finds the module whole.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from types import ModuleType

__all__ = ["lazy_import", "importing"]

_lock = threading.RLock()
_modules: dict[str, ModuleType] = {}


def lazy_import(name: str) -> ModuleType:
    """``import name`` (first time under the fork lock), then the module from a plain dict."""
    module = _modules.get(name)
    if module is not None and sys.modules.get(name) is module:
        return module
    with _lock:
        module = importlib.import_module(name)
        _modules[name] = module
        return module


def importing() -> threading.RLock:
    """The fork lock, for a block that may import lazily (creating the SDK's HTTP transport imports
    ``httpcore2``, ``certifi``...): ``with importing(): ...``. Re-entrant."""
    return _lock


def _before_fork() -> None:
    _lock.acquire()


def _after_fork_in_parent() -> None:
    _lock.release()


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.RLock()  # only the forking thread survives, and no import is half done


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)
