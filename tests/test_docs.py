"""The API reference (docs/, Sphinx) documents every public name; .ci/run builds it with -W.

The list of names comes from ``llmutils.__all__``, so a name added to the package and not to the
docs fails here, naming it. The docs' code examples run in tests/test_readme.py.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import llmutils
import llmutils.testing

DOCS = Path(__file__).resolve().parent.parent / "docs"
# ".. autoclass:: llmutils.Name", ".. autofunction:: ...", ".. py:data:: llmutils.Name", ...
DIRECTIVE = re.compile(r"^\.\.\s+(?:auto\w+|py:\w+)::\s+llmutils\.(?P<name>[\w.]+)", re.MULTILINE)


def documented_names() -> set[str]:
    names: set[str] = set()
    for page in DOCS.glob("*.rst"):
        names.update(m["name"] for m in DIRECTIVE.finditer(page.read_text(encoding="utf-8")))
    return names


def test_every_public_name_has_an_api_reference_entry() -> None:
    documented = documented_names()
    missing = sorted(name for name in llmutils.__all__ if name not in documented)
    assert missing == [], f"add these names of llmutils.__all__ to a page of docs/ (autodoc): {missing}"


def test_the_test_helpers_are_documented() -> None:
    documented = documented_names()
    helpers = [name for name in llmutils.testing.__all__ if name != "main"]
    missing = sorted(name for name in helpers if f"testing.{name}" not in documented)
    assert missing == []


def test_every_documented_name_exists() -> None:
    """A name that was renamed or removed must leave the docs too (autodoc would only warn)."""
    for name in documented_names():
        obj: object = llmutils
        for i, part in enumerate(name.split(".")):
            if not hasattr(obj, part):  # a submodule not imported yet (automodule:: llmutils._otel)
                importlib.import_module("llmutils." + ".".join(name.split(".")[: i + 1]))
            obj = getattr(obj, part)


def test_the_docs_build_without_network() -> None:
    conf = (DOCS / "conf.py").read_text(encoding="utf-8")
    extensions = re.search(r"^extensions = (.*)$", conf, re.MULTILINE)
    assert extensions is not None
    assert "intersphinx" not in extensions[1]  # it would download other projects' inventories at build time
    pages = {p.stem for p in DOCS.glob("*.rst")}
    index = (DOCS / "index.rst").read_text(encoding="utf-8")
    outside = [page for page in pages - {"index"} if not re.search(rf"^\s+{page}$", index, re.MULTILINE)]
    assert outside == [], "pages missing from the toctree of index.rst"


def test_every_public_name_and_method_has_a_docstring() -> None:
    """autodoc renders docstrings: a public name or method without one is a hole in the reference."""
    import inspect

    missing: list[str] = []
    for name in llmutils.__all__:
        obj = getattr(llmutils, name)
        if name != "DEFAULTS" and not inspect.getdoc(obj):
            missing.append(name)
        if inspect.isclass(obj) and not issubclass(obj, BaseException):
            for attr, value in vars(obj).items():
                member = callable(value) or isinstance(value, (property, staticmethod, classmethod))
                if attr.startswith("_") or not member:
                    continue
                function = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
                if not getattr(function, "__doc__", None):
                    missing.append(f"{name}.{attr}")
    assert missing == []
