"""The prompt templates shipped with llmutils (``*.j2`` files), importable as ``llmutils.templates``."""

__all__: list[str] = []
