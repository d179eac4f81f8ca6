"""The public surface is exactly what ``__all__`` declares, and every name in it exists."""

from __future__ import annotations

import subprocess
import sys

import llmutils


def test_all_is_exactly_the_public_surface() -> None:
    public = {name for name in dir(llmutils) if not name.startswith("_")}
    modules = {"testing", "cli", "templates", "cache"}  # importable submodules, not re-exported names
    assert public - modules - {"annotations"} == set(llmutils.__all__)
    assert all(getattr(llmutils, name) is not None for name in llmutils.__all__)


def test_import_loads_no_heavy_dependency() -> None:
    """``import llmutils`` is cheap: every public name is loaded on first use (PEP 562)."""
    heavy = ("jinja2", "sqlitedict", "tenacity", "tqdm", "openai", "tiktoken", "httpx2", "genai_prices")
    code = f"import sys, llmutils; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
    code = "import sys, llmutils; llmutils.TemplateError; print('jinja2' in sys.modules, 'tenacity' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False False"  # an exception class does not pull in its users' dependencies


def test_unknown_attribute_is_an_attribute_error() -> None:
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        llmutils.Nope  # noqa: B018 - the lookup is the test


def test_old_module_names_are_kept() -> None:
    for name in ("OpenAIClient", "AzureClient", "register_client", "client", "force_api_type", "force_api_cache", "force_default_value", "LLMCall"):
        assert name in llmutils.__all__


def test_every_exception_derives_from_the_base() -> None:
    errors = [getattr(llmutils, n) for n in llmutils.__all__ if n.endswith("Error")]
    assert len(errors) >= 12
    assert all(issubclass(e, llmutils.LLMUtilsError) for e in errors)


def test_every_public_name_is_in_the_readme() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    missing = [name for name in llmutils.__all__ if f"`{name}" not in readme]
    assert missing == []
