"""Jinja2 prompt templates: finding, rendering, and sending them with :class:`LLMCall`.

Where templates are found (:func:`template_search_path`), first match wins:

1. the directories passed as ``template_dirs=`` (in the order given; each must exist);
2. the directories in ``$LLMUTILS_TEMPLATES``, separated by ``os.pathsep`` (missing ones skipped);
3. ``./templates`` under the current working directory, if it exists;
4. the templates shipped with llmutils (the package ``llmutils.templates``).

The environment variable and the working directory are read on every call, not at import.

A name is a relative path such as ``"summarize"`` or ``"prompts/review"``; names containing
``..`` or that are absolute are rejected. Template files end in ``.j2``. Each directory is
checked for ``NAME.j2`` first, then ``NAME`` exactly as given, so ``"summarize"`` and
``"summarize.j2"`` both find ``summarize.j2``; when ``summarize`` and ``summarize.j2`` sit in
the same directory, ``summarize.j2`` wins. A file in an earlier directory always wins over one
in a later directory, whichever of the two spellings it uses.

Rendering uses ``StrictUndefined`` (a missing variable is an error; test optional ones with
``{% if x is defined %}`` or ``{{ x | default(...) }}``), no autoescaping, ``trim_blocks`` and
``lstrip_blocks`` (a line holding only a ``{% ... %}`` tag leaves no blank line) and keeps the
file's trailing newline. One Jinja2 environment is built per search path and reused; rendering
is safe from many threads.

Trust model: a template is code that shapes what is sent, but it runs in Jinja2's
:class:`~jinja2.sandbox.SandboxedEnvironment`: it cannot reach Python internals (``__class__``,
``__globals__``, ...), so a template file cannot run ``os.popen`` or read files. Only files inside
the search path are loaded: a name or an ``{% include %}`` that resolves (through a symlink)
to a file outside every directory of the search path is refused. Any failure while rendering
(a missing variable, ``{{ 1 / n }}`` with ``n = 0``, ``{{ x + 1 }}`` with a text ``x``) raises
:class:`TemplateError` naming the template, the line and the variables on it; never a raw
exception. Variables are data, never evaluated as templates.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import json
import linecache
import logging
import math
import os
import re
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from types import TracebackType
from typing import Any, Union

import jinja2
import jinja2.sandbox

from ._exceptions import InvalidRequestError, OutputParseError, TemplateError

__all__ = ["render_template", "compose_messages", "template_search_path", "find_template", "LLMCall"]

logger = logging.getLogger("llmutils")

_SUFFIX = ".j2"
_ENV_VAR = "LLMUTILS_TEMPLATES"
_MAX_ENVIRONMENTS = 64
_RAW_PREVIEW_CHARS = 300

TemplateDirs = Union[str, "os.PathLike[str]", Sequence[Union[str, "os.PathLike[str]"]], None]


# --------------------------------------------------------------------------- search path


@functools.lru_cache(maxsize=1)
def _shipped_dir() -> Path:
    """Return the directory of the templates shipped with llmutils."""
    try:
        files = importlib.resources.files("llmutils.templates")
    except ModuleNotFoundError:
        files = None
    if isinstance(files, Path):
        return files.resolve()
    # A source checkout on sys.path without being installed: templates/ beside llmutils/.
    return (Path(__file__).resolve().parent.parent / "templates").resolve()


def _as_dir_list(template_dirs: TemplateDirs) -> list[str | os.PathLike[str]]:
    """Accept one directory or a sequence of them."""
    if template_dirs is None:
        return []
    if isinstance(template_dirs, (str, os.PathLike)):
        return [template_dirs]
    return list(template_dirs)


def template_search_path(template_dirs: TemplateDirs = None) -> list[Path]:
    """Return the template directories in search order, resolved now (see the module docstring)."""
    found: list[Path] = []
    for entry in _as_dir_list(template_dirs):
        path = Path(entry).expanduser().resolve()
        if not path.is_dir():
            raise TemplateError(
                f"template directory {os.fspath(entry)!r} (from template_dirs=) does not exist "
                "or is not a directory; pass an existing directory"
            )
        found.append(path)
    for entry in os.environ.get(_ENV_VAR, "").split(os.pathsep):
        if not entry.strip():
            continue
        path = Path(entry).expanduser().resolve()
        if path.is_dir():
            found.append(path)
        else:
            logger.debug("ignoring %s entry %r: not a directory", _ENV_VAR, entry)
    try:
        local = Path.cwd() / "templates"
    except OSError:  # the working directory was removed
        local = None
    if local is not None and local.is_dir():
        found.append(local.resolve())
    found.append(_shipped_dir())
    unique: list[Path] = []
    for path in found:
        if path not in unique:
            unique.append(path)
    return unique


# --------------------------------------------------------------------------- loading


def _check_name(name: object) -> str:
    """Reject names that are empty, absolute or climb out of a template directory."""
    if not isinstance(name, str) or not name.strip():
        raise TemplateError(f"a template name must be a non-empty string, not {name!r}")
    posix = PurePosixPath(name.replace("\\", "/"))
    windows = PureWindowsPath(name)
    if posix.is_absolute() or windows.drive or windows.is_absolute() or ".." in posix.parts:
        raise TemplateError(
            f"template name {name!r} is not allowed: use a name relative to a template "
            "directory, without '..' (add the directory to template_dirs= instead)"
        )
    return name


def _candidates(name: str) -> list[str]:
    """Return the file names to try for ``name`` within one directory, in order."""
    name = name.replace("\\", "/")
    return [name] if name.endswith(_SUFFIX) else [name + _SUFFIX, name]


class _TemplateLoader(jinja2.BaseLoader):
    """Load ``NAME.j2`` or ``NAME`` from the first directory of the search path holding either."""

    def __init__(self, search_path: tuple[Path, ...]) -> None:
        self.search_path = search_path
        self._loaders = [jinja2.FileSystemLoader(str(path), encoding="utf-8") for path in search_path]

    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str | None, Callable[[], bool] | None]:
        """Return the source, file name and up-to-date check of ``template``.

        Raises :class:`TemplateError` when the file found resolves (through a symlink) to a
        place outside every directory of the search path.
        """
        _check_name(template)
        for loader in self._loaders:
            for candidate in _candidates(template):
                try:
                    found = loader.get_source(environment, candidate)
                except jinja2.TemplateNotFound:
                    continue
                self._check_inside(template, found[1])
                return found
        raise jinja2.TemplateNotFound(template)

    def _check_inside(self, template: str, filename: str | None) -> None:
        """Refuse a file that resolves outside the search path (a symlink pointing elsewhere)."""
        if filename is None:
            return
        real = Path(filename).resolve()
        if any(real.is_relative_to(root) for root in self.search_path):
            return
        raise TemplateError(
            f"template {template!r} ({filename}) resolves to {real}, outside the template search path "
            f"({', '.join(str(p) for p in self.search_path)}); refusing to load it. Copy the file into a "
            "template directory, or add its real directory to template_dirs="
        )

    def list_templates(self) -> list[str]:
        """Return the names of the ``.j2`` templates available, without the suffix."""
        names: set[str] = set()
        for loader in self._loaders:
            for name in loader.list_templates():
                if name.endswith(_SUFFIX):
                    names.add(name[: -len(_SUFFIX)])
        return sorted(names)


_environments: dict[tuple[Path, ...], jinja2.Environment] = {}
_environments_lock = threading.Lock()


def _environment(search_path: tuple[Path, ...]) -> jinja2.Environment:
    """Return the shared Jinja2 environment for ``search_path``, building it on first use."""
    with _environments_lock:
        env = _environments.get(search_path)
        if env is None:
            env = jinja2.sandbox.SandboxedEnvironment(
                loader=_TemplateLoader(search_path),
                undefined=jinja2.StrictUndefined,
                autoescape=False,
                keep_trailing_newline=True,
                trim_blocks=True,
                lstrip_blocks=True,
            )
            _environments[search_path] = env
            while len(_environments) > _MAX_ENVIRONMENTS:
                del _environments[next(iter(_environments))]
            logger.debug("built a template environment for %s", [str(p) for p in search_path])
        return env


def _template_frame(tb: TracebackType | None, search_path: tuple[Path, ...]) -> tuple[str, int] | None:
    """Return the file and line of the innermost template frame of a traceback, if any."""
    roots = tuple(str(path) + os.sep for path in search_path)
    found = None
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename.startswith(roots):
            found = (filename, tb.tb_lineno)
        tb = tb.tb_next
    return found


def _location(tb: TracebackType | None, search_path: tuple[Path, ...]) -> str:
    """Return ``" (FILE, line N)"`` for the innermost template frame of a traceback, or ``""``."""
    frame = _template_frame(tb, search_path)
    return f" ({frame[0]}, line {frame[1]})" if frame else ""


_TAG = re.compile(r"\{\{.*?\}\}|\{%.*?%\}", re.DOTALL)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _variables_on_line(
    frame: tuple[str, int] | None, variables: Mapping[str, Any], env: jinja2.Environment, error: type[BaseException]
) -> list[str]:
    """Return ``"'name' (type)"`` for each variable in the failing expression of a template line.

    The ``{{ ... }}`` tags of that line are tried alone (only now, after a failure): those that
    raise the same error name the culprits; when none does, every tag of the line counts.
    """
    if frame is None:
        return []
    line = linecache.getline(frame[0], frame[1])
    tags = _TAG.findall(line)
    failing = []
    for tag in tags:
        if not tag.startswith("{{"):
            continue
        try:
            env.from_string(tag).render(variables)
        except error:
            failing.append(tag)
        except Exception:  # noqa: S112 - another error (e.g. a name set earlier in the template): not this tag
            continue
    code = " ".join(failing or tags) or line
    names: list[str] = []
    for word in _IDENTIFIER.findall(code):
        if word in variables and word not in names:
            names.append(word)
    return [f"{name!r} ({type(variables[name]).__name__})" for name in names]


def _render_failure(
    exc: Exception, name: str, variables: Mapping[str, Any], search_path: tuple[Path, ...], env: jinja2.Environment
) -> TemplateError:
    """Turn a Python error raised while rendering (TypeError, ZeroDivisionError, ...) into a TemplateError."""
    frame = _template_frame(exc.__traceback__, search_path)
    where = f" ({frame[0]}, line {frame[1]})" if frame else ""
    named = _variables_on_line(frame, variables, env, type(exc))
    if len(named) == 1:
        culprit = f" with variable {named[0]}"
    elif named:
        culprit = f" with variables {', '.join(named)}"
    else:
        culprit = ""
    return TemplateError(
        f"template {name!r}{where} failed{culprit}: {type(exc).__name__}: {exc}. "
        "Fix the item's variables, or make the template handle such values"
    )


def _not_found(name: str, missing: str, search_path: tuple[Path, ...], env: jinja2.Environment) -> TemplateError:
    """Build the error for a template that no directory holds."""
    dirs = ", ".join(str(path) for path in search_path)
    tried = " or ".join(_candidates(missing))
    what = f"template {name!r}" if missing == name else f"template {missing!r} (included from {name!r})"
    try:
        available = env.list_templates()
    except OSError:
        available = []
    hint = f" Available: {', '.join(available[:20])}." if available else ""
    return TemplateError(
        f"{what} not found: looked for {tried} in {dirs}. Put the file in one of these "
        f"directories, pass template_dirs=, or set {_ENV_VAR}.{hint}"
    )


def _translate(exc: jinja2.TemplateError, name: str, search_path: tuple[Path, ...], env: jinja2.Environment) -> TemplateError:
    """Turn a Jinja2 error into a :class:`TemplateError` naming the template and the cause."""
    if isinstance(exc, jinja2.TemplateNotFound):
        return _not_found(name, exc.name or name, search_path, env)
    if isinstance(exc, jinja2.TemplateSyntaxError):
        filename = exc.filename or exc.name or name
        return TemplateError(
            f"syntax error in template {name!r} at {filename}, line {exc.lineno}: {exc.message}"
        )
    where = _location(exc.__traceback__, search_path)
    message = exc.message or str(exc)
    if isinstance(exc, jinja2.UndefinedError):
        match = re.fullmatch(r"'([^']+)' is undefined", message)
        if match:
            var = match.group(1)
            return TemplateError(
                f"template {name!r}{where}: variable {var!r} is undefined; pass {var}=... when "
                f"rendering, or make it optional in the template with "
                f"{{% if {var} is defined %}} or {{{{ {var} | default(...) }}}}"
            )
        return TemplateError(f"template {name!r}{where}: {message}")
    return TemplateError(f"template {name!r}{where}: {type(exc).__name__}: {message}")


def _load(name: str, template_dirs: TemplateDirs) -> tuple[jinja2.Template, tuple[Path, ...]]:
    """Find and compile one template; every problem is a :class:`TemplateError`."""
    _check_name(name)
    search_path = tuple(template_search_path(template_dirs))
    env = _environment(search_path)
    try:
        return env.get_template(name), search_path
    except jinja2.TemplateError as exc:
        raise _translate(exc, name, search_path, env) from exc


def _check_variables(variables: object, where: str) -> Mapping[str, Any]:
    """Accept a mapping of template variables (or None); refuse anything else with a TemplateError."""
    if variables is None:
        return {}
    if not isinstance(variables, Mapping):
        raise TemplateError(
            f"{where}: the template variables must be a mapping such as a dict of names to values, "
            f"got {type(variables).__name__}"
        )
    return variables


def _render(name: str, variables: Mapping[str, Any], template_dirs: TemplateDirs) -> str:
    """Find, load and render one template with ``variables``."""
    template, search_path = _load(name, template_dirs)
    try:
        text = template.render(variables)
    except TemplateError as exc:  # refused by the loader: an include outside the search path
        if exc.message.startswith(f"template {name!r}"):
            raise
        raise TemplateError(f"template {name!r} includes a refused file: {exc.message}") from exc
    except jinja2.TemplateError as exc:
        raise _translate(exc, name, search_path, template.environment) from exc
    except Exception as exc:  # the template's own code failed on these values
        raise _render_failure(exc, name, variables, search_path, template.environment) from exc
    logger.debug("rendered template %r from %s", name, template.filename)
    return text


def find_template(name: str, template_dirs: TemplateDirs = None) -> Path:
    """Return the file the template ``name`` resolves to, after checking that it loads and parses.

    Nothing is rendered. Use it to fail before any request when a template name is wrong
    (:func:`~llmutils.batch` does). Raises :class:`TemplateError` when the template is missing,
    has a syntax error, or resolves outside the search path.
    """
    template, _ = _load(name, template_dirs)
    return Path(template.filename or name)


def render_template(
    name: str,
    variables: Mapping[str, Any] | None = None,
    /,
    *,
    template_dirs: TemplateDirs = None,
    **more_vars: Any,
) -> str:
    """Render the template ``name`` with ``variables`` and ``more_vars`` (which win on clashes).

    >>> render_template("summarize", text="A long story.", max_words=20)  # doctest: +SKIP

    ``template_dirs`` (one directory or several) is searched before ``$LLMUTILS_TEMPLATES``,
    ``./templates`` and the shipped templates. Any problem raises :class:`TemplateError`.
    """
    merged = {**_check_variables(variables, f"render_template({name!r})"), **more_vars}
    return _render(name, merged, template_dirs)


def _compose(
    system_template: str | None,
    user_template: str | None,
    variables: Mapping[str, Any],
    template_dirs: TemplateDirs,
) -> list[dict[str, str]]:
    """Render the system and user templates into chat messages."""
    if system_template is None and user_template is None:
        raise TemplateError("compose_messages needs a system template, a user template or both")
    messages: list[dict[str, str]] = []
    if system_template is not None:
        messages.append({"role": "system", "content": _render(system_template, variables, template_dirs).strip()})
    if user_template is not None:
        messages.append({"role": "user", "content": _render(user_template, variables, template_dirs).strip()})
    return messages


def compose_messages(
    system_template: str | None,
    user_template: str | None = None,
    variables: Mapping[str, Any] | None = None,
    /,
    *,
    template_dirs: TemplateDirs = None,
    **more_vars: Any,
) -> list[dict[str, str]]:
    """Render a system and/or user template into ``[{"role": "system", ...}, {"role": "user", ...}]``.

    Both templates get the same variables: ``variables`` (a mapping, so any name works, even
    ``template_dirs``) and ``more_vars`` (which win on clashes). A ``None`` template adds no
    message. Each message's content is stripped of leading and trailing whitespace. Nothing is sent.
    """
    given = _check_variables(variables, "compose_messages()")
    merged = {**given, **more_vars} if given else more_vars
    return _compose(system_template, user_template, merged, template_dirs)


# --------------------------------------------------------------------------- output types


@dataclass(frozen=True)
class _OutputSpec:
    """How to ask for, and read back, one ``output_type``."""

    label: str
    instruction: str | None
    response_format: dict[str, Any] | None
    coerce: Callable[[str], Any]


def _preview(raw: str) -> str:
    """Return ``raw`` quoted, cut to a readable length."""
    if len(raw) <= _RAW_PREVIEW_CHARS:
        return repr(raw)
    return f"{raw[:_RAW_PREVIEW_CHARS]!r}... ({len(raw)} characters in all)"


def _parse_error(label: str, reason: str, raw: str) -> OutputParseError:
    """Build the error for an answer that is not ``label``."""
    return OutputParseError(
        f"could not read the model's answer as {label}: {reason}. Raw answer: {_preview(raw)}. "
        "Make the prompt ask for that shape, or use output_type=str and parse the text yourself.",
        raw=raw,
    )


def _unwrap_word(raw: str) -> str:
    """Strip whitespace, quotes, backticks, emphasis marks and a final ``.`` or ``!``."""
    marks = "\"'`*_ \t\r\n"
    return raw.strip(marks).rstrip(".!").strip(marks)


_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|(?<![\w.])[-+]?\.\d+")


def _find_number(raw: str, label: str) -> str:
    """Return the one number written in ``raw``, without thousands separators."""
    found = _NUMBER.findall(raw)
    if not found:
        raise _parse_error(label, "it contains no number", raw)
    if len(found) > 1:
        raise _parse_error(label, f"it contains {len(found)} numbers ({', '.join(found[:5])}), expected one", raw)
    return found[0].replace(",", "")


def _to_int(raw: str) -> int:
    """Read a whole number, alone or inside short text ("42", "42.", "The answer is 42")."""
    token = _find_number(raw, "an integer")
    try:
        return int(token)
    except ValueError:
        value = float(token)
        if math.isfinite(value) and value.is_integer():
            return int(value)
        raise _parse_error("an integer", f"{token} is not a whole number", raw) from None


def _to_float(raw: str) -> float:
    """Read a number, alone or inside short text ("3.5", "about 3.5 kg")."""
    value = float(_find_number(raw, "a number"))
    if not math.isfinite(value):
        raise _parse_error("a number", "it is not finite", raw)
    return value


_TRUE_WORDS = frozenset({"yes", "true"})
_FALSE_WORDS = frozenset({"no", "false"})


def _to_bool(raw: str) -> bool:
    """Read yes/no/true/false, case-insensitive, allowing quotes and a final period."""
    word = _unwrap_word(raw).lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise _parse_error("a boolean", "expected one of yes, no, true, false", raw)


_FENCE = re.compile(r"```[\w+-]*[ \t]*\n?(.*?)\n?[ \t]*```", re.DOTALL)


def _load_json(raw: str, label: str) -> Any:
    """Parse JSON, allowing the whole answer to sit in a Markdown code fence."""
    text = raw.strip()
    fenced = _FENCE.fullmatch(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _parse_error(label, f"it is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})", raw) from exc


def _to_dict(raw: str) -> dict[str, Any]:
    """Read a JSON object."""
    value = _load_json(raw, "a JSON object")
    if not isinstance(value, dict):
        raise _parse_error("a JSON object", f"the JSON is a {type(value).__name__}, not an object", raw)
    return value


_LIST_KEY = "items"


def _to_list(raw: str) -> list[Any]:
    """Read a JSON array, or the one array inside a JSON object (``{"items": [...]}``)."""
    value = _load_json(raw, "a JSON list")
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        if isinstance(value.get(_LIST_KEY), list):
            return value[_LIST_KEY]
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(value) == 1 and len(lists) == 1:
            return lists[0]
    raise _parse_error("a JSON list", f'expected an array or {{"{_LIST_KEY}": [...]}}', raw)


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


def _schema_name(name: object) -> str:
    """Return a ``json_schema`` name the API accepts (letters, digits, ``_``, ``-``; 64 at most)."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "_", str(name or ""))[:64]
    return cleaned or "output"


def _strict_schema(schema: Any, root: dict[str, Any]) -> Any:
    """Make a JSON schema fit the API's strict mode, in place (as the openai SDK does for models)."""
    if not isinstance(schema, dict):
        return schema
    for key in ("$defs", "definitions"):
        if isinstance(schema.get(key), dict):
            for sub in schema[key].values():
                _strict_schema(sub, root)
    if schema.get("type") == "object" and "additionalProperties" not in schema:
        schema["additionalProperties"] = False
    if isinstance(schema.get("properties"), dict):
        schema["required"] = list(schema["properties"])
        for sub in schema["properties"].values():
            _strict_schema(sub, root)
    if isinstance(schema.get("items"), dict):
        _strict_schema(schema["items"], root)
    for key in ("anyOf", "allOf"):
        if isinstance(schema.get(key), list):
            for sub in schema[key]:
                _strict_schema(sub, root)
    if "default" in schema and schema["default"] is None:
        del schema["default"]
    ref = schema.get("$ref")
    if isinstance(ref, str) and len(schema) > 1 and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        if isinstance(target, dict):
            merged = {**copy.deepcopy(target), **schema}
            del merged["$ref"]
            schema.clear()
            schema.update(merged)
            _strict_schema(schema, root)
    return schema


def _schema_spec(schema: Mapping[str, Any]) -> _OutputSpec:
    """Build the spec for a JSON schema, or for a ready ``{"name", "schema", "strict"}`` wrapper."""
    if "schema" in schema and "name" in schema and "type" not in schema:
        json_schema = copy.deepcopy(dict(schema))
        json_schema["name"] = _schema_name(json_schema["name"])
        body = json_schema["schema"]
    else:
        body = copy.deepcopy(dict(schema))
        json_schema = {"name": _schema_name(body.get("title")), "schema": body, "strict": True}
    expected = body.get("type") if isinstance(body, Mapping) else None
    allowed = _JSON_TYPES.get(expected) if isinstance(expected, str) else None
    label = f"JSON matching the schema {json_schema['name']!r}"

    def coerce(raw: str) -> Any:
        value = _load_json(raw, label)
        if allowed is not None and (
            not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)
        ):
            raise _parse_error(label, f"the JSON is a {type(value).__name__}, the schema wants {expected}", raw)
        return value

    return _OutputSpec(label, "Answer with JSON only.", {"type": "json_schema", "json_schema": json_schema}, coerce)


def _is_pydantic_model(output_type: object) -> bool:
    """Tell whether ``output_type`` is a pydantic model class (without importing pydantic)."""
    pydantic = sys.modules.get("pydantic")
    base = getattr(pydantic, "BaseModel", None)
    return isinstance(output_type, type) and base is not None and issubclass(output_type, base)


def _pydantic_spec(model: Any) -> _OutputSpec:
    """Build the spec for a pydantic model class: its strict schema, validated on the way back."""
    schema = copy.deepcopy(model.model_json_schema())
    _strict_schema(schema, schema)
    name = _schema_name(model.__name__)
    label = f"a {model.__name__}"

    def coerce(raw: str) -> Any:
        text = raw.strip()
        fenced = _FENCE.fullmatch(text)
        try:
            return model.model_validate_json(fenced.group(1).strip() if fenced else text)
        except ValueError as exc:  # pydantic.ValidationError is a ValueError
            first = str(exc).splitlines()
            raise _parse_error(label, " ".join(first[:3]), raw) from exc

    response_format = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    return _OutputSpec(label, "Answer with JSON only.", response_format, coerce)


def _require_str(raw: str) -> str:
    """Return the text unchanged."""
    return raw


_JSON_OBJECT = {"type": "json_object"}

_SIMPLE_SPECS: dict[type, _OutputSpec] = {
    str: _OutputSpec("text", None, None, _require_str),
    bool: _OutputSpec("a boolean", "Answer with yes or no only, and nothing else.", None, _to_bool),
    int: _OutputSpec("an integer", "Answer with a single integer only, and nothing else.", None, _to_int),
    float: _OutputSpec("a number", "Answer with a single number only, and nothing else.", None, _to_float),
    dict: _OutputSpec("a JSON object", "Answer with a JSON object only.", _JSON_OBJECT, _to_dict),
    list: _OutputSpec(
        "a JSON list",
        f'Answer with a JSON object only, of the form {{"{_LIST_KEY}": [...]}}, holding the list.',
        _JSON_OBJECT,
        _to_list,
    ),
}


def _output_spec(output_type: Any) -> _OutputSpec | None:
    """Return the spec of ``output_type`` (``None`` means: return the content as is)."""
    if output_type is None:
        return None
    if isinstance(output_type, type) and output_type in _SIMPLE_SPECS:
        return _SIMPLE_SPECS[output_type]
    if isinstance(output_type, Mapping):
        return _schema_spec(output_type)
    if _is_pydantic_model(output_type):
        return _pydantic_spec(output_type)
    raise InvalidRequestError(
        f"unsupported output_type {output_type!r}: use str, int, float, bool, list, dict, "
        "a JSON schema dict or a pydantic model class"
    )


# --------------------------------------------------------------------------- LLMCall


def _default_client() -> Any:
    """Return the client configured for this process."""
    from ._registry import client

    return client()


class LLMCall:
    """A prompt made of templates, sent to the model on each :meth:`call`.

    >>> summarize = LLMCall("system_default", "summarize", model="gpt-4o-mini", temperature=0)
    >>> summarize.call(text=article, max_words=50)  # doctest: +SKIP
    'The article says ...'
    >>> LLMCall("system_default", "classify", output_type=bool).call(...)  # doctest: +SKIP

    ``system_template_name`` / ``user_template_name`` name templates (see :func:`render_template`);
    ``output_type`` (``str``, ``int``, ``float``, ``bool``, ``list``, ``dict``, a JSON schema dict
    or a pydantic model class) asks the model for that shape and converts the answer, raising
    :class:`OutputParseError` when it cannot; ``template_dirs`` is searched first for templates;
    ``client`` defaults to the configured client (``llmutils._registry.client()``) at call time;
    every other keyword (``model``, ``temperature``, ...) goes to ``client.send_message``.
    After a call, ``messages`` holds what was sent and ``model_output`` the assistant message.
    With ``n=2`` or more, :meth:`call` returns a list (one value per choice) and ``model_output``
    is the list of assistant messages.
    One instance may be shared by threads; those two attributes then show the latest call.
    """

    def __init__(
        self,
        system_template_name: str,
        user_template_name: str | None = None,
        *,
        output_type: type | Mapping[str, Any] | None = None,
        template_dirs: TemplateDirs = None,
        client: Any = None,
        **model_params: Any,
    ) -> None:
        """Check the template names and ``output_type``; nothing is rendered or sent yet."""
        _check_name(system_template_name)
        if user_template_name is not None:
            _check_name(user_template_name)
        self.system_template_name = system_template_name
        self.user_template_name = user_template_name
        self.output_type = output_type
        self.template_dirs = template_dirs
        self.client = client
        self.model_params: dict[str, Any] = dict(model_params)
        self.messages: list[dict[str, Any]] | None = None
        self.model_output: dict[str, Any] | list[dict[str, Any]] | None = None
        self._spec = _output_spec(output_type)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        """Pickle to the configuration: templates, ``output_type``, ``client``, model parameters.

        The last call's ``messages`` and ``model_output`` and the lock stay behind, so an
        ``LLMCall`` can be sent to a process pool or a Dask worker (``output_type`` must be
        importable there, ``template_dirs`` must exist there, and ``client`` travels as its own
        configuration; see :class:`~llmutils.OpenAIClient`).
        """
        state = dict(self.__dict__)
        for name in ("_lock", "_spec", "messages", "model_output"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Rebuild from :meth:`__getstate__`: a fresh lock, no last call."""
        self.__dict__.update(state)
        self.messages = None
        self.model_output = None
        self._spec = _output_spec(self.output_type)
        self._lock = threading.Lock()

    def _request(self, rendering_configs: Mapping[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Render the messages and the request parameters for one call."""
        messages: list[dict[str, Any]] = list(
            _compose(self.system_template_name, self.user_template_name, rendering_configs, self.template_dirs)
        )
        params = dict(self.model_params)
        spec = self._spec
        if spec is not None and spec.instruction:
            if messages and messages[0]["role"] == "system":
                messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{spec.instruction}".lstrip()}
            else:
                messages.insert(0, {"role": "system", "content": spec.instruction})
        if spec is not None and spec.response_format is not None:
            params.setdefault("response_format", spec.response_format)
        return messages, params

    def call(self, /, **rendering_configs: Any) -> Any:
        """Render the templates with ``rendering_configs``, send them, and return the answer.

        Returns the content string, or the converted value when ``output_type`` is set.
        With ``n=2`` or more (in the model parameters) it returns a list with one such value per
        choice, in choice order, and ``model_output`` is the list of assistant message dicts;
        no choice is ever dropped. Template problems raise :class:`TemplateError` before
        anything is sent.
        """
        messages, params = self._request(rendering_configs)
        with self._lock:
            self.messages = messages
            self.model_output = None
        client = self.client if self.client is not None else _default_client()
        output = client.send_message(messages, **params)
        with self._lock:
            self.messages = messages
            self.model_output = output
        if isinstance(output, list):  # n > 1: one message per choice
            return [self._value(choice) for choice in output]
        return self._value(output)

    def _value(self, output: Any) -> Any:
        """The content of one assistant message, converted to ``output_type`` when it is set."""
        content = output.get("content") if isinstance(output, Mapping) else None
        spec = self._spec
        if spec is None:
            if content is None:
                logger.warning("the model output has no text content: %r", output)
            return content
        if not isinstance(content, str):
            refusal = output.get("refusal") if isinstance(output, Mapping) else None
            reason = f"the model refused: {refusal}" if refusal else "the model returned no text content"
            raise OutputParseError(f"could not read the model's answer as {spec.label}: {reason}", raw=None)
        return spec.coerce(content)

    def __repr__(self) -> str:
        """Show the templates, the parameters, and the last messages and output."""
        return (
            f"LLMCall(system_template_name={self.system_template_name!r}, "
            f"user_template_name={self.user_template_name!r}, model_params={self.model_params!r}, "
            f"output_type={self.output_type!r}, messages={self.messages!r}, "
            f"model_output={self.model_output!r})"
        )
