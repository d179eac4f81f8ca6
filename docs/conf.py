"""Sphinx configuration: the API reference is built from the docstrings (reST) with autodoc.

Build: ``sphinx-build -W -b html docs docs/_build/html`` (warnings are errors; nothing is downloaded:
no intersphinx, no remote theme).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # document this checkout even when another llmutils is installed

import llmutils  # noqa: E402

project = "llmutils"
author = "the llmutils authors"
copyright = "the llmutils authors"  # noqa: A001 - Sphinx's name
release = version = llmutils.__version__

extensions = ["sphinx.ext.autodoc"]
root_doc = "index"
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list[str] = []
html_title = f"llmutils {release}"

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_class_signature = "separated"
add_module_names = False
