"""``python -m llmutils``: the same as the ``llmutils`` command."""

from __future__ import annotations

from .cli import run

__all__: list[str] = []

if __name__ == "__main__":
    run()
