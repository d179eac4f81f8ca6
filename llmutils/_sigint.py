"""Ctrl-C while the ``llmutils`` command is still starting: exit 130 quietly, not with a traceback.

Importing llmutils takes a few hundred milliseconds, and that import happens before any code of
the command can catch ``KeyboardInterrupt`` (``python -m llmutils`` and the console script both
import the package first). So the package's first statement calls
:func:`quiet_ctrl_c_while_starting`: when, and only when, this process *is* the ``llmutils``
command, it installs a SIGINT handler that prints ``llmutils: interrupted`` and exits with status
130. The command replaces it with its own handler as soon as it runs
(:func:`llmutils.cli.run`). A program that merely imports llmutils is never affected, and a
SIGINT handler set by someone else (or SIGINT ignored) is left alone.
"""

from __future__ import annotations

import os  # only os, signal and sys: this runs first, before any slow import
import signal
import sys

__all__ = ["quiet_ctrl_c_while_starting", "is_the_command"]

_COMMAND_NAMES = frozenset({"llmutils", "llmutils.exe", "llmutils-script.py"})
_MODULES = frozenset({"llmutils", "llmutils.cli"})


def is_the_command() -> bool:
    """True when this process was started as ``python -m llmutils`` or the ``llmutils`` script."""
    argv0 = sys.argv[0] if sys.argv else ""
    if argv0 == "-m":  # runpy is importing the package of ``python -m NAME``: which NAME?
        orig = list(getattr(sys, "orig_argv", []))
        for i, arg in enumerate(orig[1:], start=1):
            if arg == "-m":
                return i + 1 < len(orig) and orig[i + 1] in _MODULES
            if arg.startswith("-m"):
                return arg[2:] in _MODULES
        return False
    return os.path.basename(argv0) in _COMMAND_NAMES


def _exit_130(signum: int, frame: object) -> None:
    """SIGINT before the command runs: say so and exit 130, from whatever import is under way."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C ends the process at once
    os.write(2, b"llmutils: interrupted\n")
    raise SystemExit(130)


def quiet_ctrl_c_while_starting() -> None:
    """Make Ctrl-C exit 130 quietly until the command installs its own handler (see the module)."""
    if not is_the_command() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return
    try:
        signal.signal(signal.SIGINT, _exit_130)
    except ValueError:  # not the main thread: signals are not ours to handle
        pass
