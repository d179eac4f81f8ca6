"""Tests for llmutils._templates: search order, rendering errors, threads, LLMCall and output types."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import jinja2
import pydantic
import pytest

from llmutils import InvalidRequestError, LLMUtilsError, OutputParseError, TemplateError
from llmutils import _templates
from llmutils._templates import LLMCall, compose_messages, render_template, template_search_path

SHIPPED = Path(__file__).resolve().parent.parent / "templates"


def _write(directory: Path, name: str, text: str) -> Path:
    """Create ``directory/name`` holding ``text``."""
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Run in an empty working directory with no $LLMUTILS_TEMPLATES; return that directory."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("LLMUTILS_TEMPLATES", raising=False)
    return work


class FakeClient:
    """Records what it is sent and answers with a fixed content."""

    def __init__(self, content: Any = "ok") -> None:
        self.content = content
        self.calls: list[tuple[list[dict[str, Any]], dict[str, Any]]] = []

    def send_message(self, messages: list[dict[str, Any]], **params: Any) -> dict[str, Any]:
        self.calls.append((messages, params))
        return {"role": "assistant", "content": self.content}


# --------------------------------------------------------------------------- search path


def test_search_order_explicit_then_env_then_cwd_then_shipped(
    isolated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    explicit, env_a, env_b = tmp_path / "explicit", tmp_path / "env_a", tmp_path / "env_b"
    local = isolated / "templates"
    for directory in (explicit, env_a, env_b, local):
        _write(directory, "probe.j2", directory.name)
    monkeypatch.setenv("LLMUTILS_TEMPLATES", os.pathsep.join([str(env_a), "", str(tmp_path / "missing"), str(env_b)]))

    assert template_search_path([explicit]) == [explicit, env_a, env_b, local, SHIPPED]
    assert render_template("probe", template_dirs=[explicit]) == "explicit"
    assert render_template("probe") == "env_a"
    (env_a / "probe.j2").unlink()
    assert render_template("probe") == "env_b"
    monkeypatch.delenv("LLMUTILS_TEMPLATES")
    assert template_search_path() == [local, SHIPPED]
    assert render_template("probe") == "templates"
    (local / "probe.j2").unlink()
    with pytest.raises(TemplateError, match="probe"):
        render_template("probe")


def test_shipped_templates_are_last_and_found_from_any_directory(isolated: Path) -> None:
    assert template_search_path() == [SHIPPED]
    local = _write(isolated / "templates", "summarize.j2", "local {{ text }}")
    assert render_template("summarize", text="x") == "local x"
    local.unlink()
    assert "at most 100 words" in render_template("summarize", text="x")


def test_single_directory_and_duplicates(isolated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = tmp_path / "mine"
    _write(mine, "hello.j2", "hi {{ who }}")
    monkeypatch.setenv("LLMUTILS_TEMPLATES", str(mine))
    assert template_search_path(str(mine)) == [mine, SHIPPED]
    assert render_template("hello", template_dirs=mine, who="you") == "hi you"


def test_explicit_directory_must_exist(isolated: Path, tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="does not exist"):
        render_template("summarize", template_dirs=[tmp_path / "nope"], text="x")


def test_name_with_or_without_extension(isolated: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    _write(first, "both.j2", "both.j2 wins")
    _write(first, "both", "bare loses")
    _write(first, "plain", "bare only")
    _write(first, "sub/deep.j2", "nested")
    _write(second, "plain.j2", "later directory")
    dirs = [first, second]
    assert render_template("both", template_dirs=dirs) == "both.j2 wins"
    assert render_template("both.j2", template_dirs=dirs) == "both.j2 wins"
    assert render_template("plain", template_dirs=dirs) == "bare only"  # earlier directory wins
    assert render_template("sub/deep", template_dirs=dirs) == "nested"


def test_variables_mapping_and_keywords_merge(isolated: Path, tmp_path: Path) -> None:
    _write(tmp_path, "vars.j2", "{{ a }} {{ b }} {{ name }}")
    out = render_template("vars", {"a": 1, "b": 2}, template_dirs=[tmp_path], b=3, name="n")
    assert out == "1 3 n"


# --------------------------------------------------------------------------- errors


def test_missing_variable_names_variable_and_template(isolated: Path, tmp_path: Path) -> None:
    _write(tmp_path, "greet.j2", "Hello\n{{ name }}!\n")
    with pytest.raises(TemplateError) as info:
        render_template("greet", template_dirs=[tmp_path])
    message = str(info.value)
    assert "'name'" in message and "'greet'" in message
    assert f"{tmp_path / 'greet.j2'}, line 2" in message
    assert isinstance(info.value, LLMUtilsError)


def test_missing_variable_raises_before_sending(isolated: Path) -> None:
    client = FakeClient()
    call = LLMCall("system_default", "summarize", client=client)
    with pytest.raises(TemplateError, match="'text'"):
        call.call(max_words=10)
    assert client.calls == []


def test_optional_variables_in_shipped_templates(isolated: Path) -> None:
    plain = render_template("system_default")
    assert "helpful" in plain and "{%" not in plain
    custom = render_template("system_default", persona="You are a pirate.", instructions="Be brief.")
    assert custom.startswith("You are a pirate.\n") and custom.endswith("Be brief.\n")
    assert render_template("user_default", prompt="hi") == "hi\n"


def test_syntax_error_names_file_and_line(isolated: Path, tmp_path: Path) -> None:
    path = _write(tmp_path, "broken.j2", "line one\n{% if x %}\nno end\n")
    with pytest.raises(TemplateError) as info:
        render_template("broken", template_dirs=[tmp_path], x=1)
    message = str(info.value)
    assert "syntax error" in message and str(path) in message and "line 3" in message


def test_syntax_error_on_line_one(isolated: Path, tmp_path: Path) -> None:
    _write(tmp_path, "bad.j2", "{{ oops }")
    with pytest.raises(TemplateError, match=r"bad\.j2, line 1"):
        render_template("bad", template_dirs=[tmp_path], oops=1)


def test_not_found_lists_directories(isolated: Path, tmp_path: Path) -> None:
    with pytest.raises(TemplateError) as info:
        render_template("nothing_here", template_dirs=[tmp_path])
    message = str(info.value)
    assert "nothing_here.j2" in message and str(tmp_path) in message and str(SHIPPED) in message
    assert "summarize" in message  # the available names are listed


@pytest.mark.parametrize(
    "name", ["../secret", "a/../../secret", "/etc/passwd", "..\\secret", "C:\\secret", "c:secret", "", "   "]
)
def test_traversal_and_absolute_names_rejected(isolated: Path, tmp_path: Path, name: str) -> None:
    _write(tmp_path, "secret.j2", "secret")
    inner = tmp_path / "inner"
    inner.mkdir()
    with pytest.raises(TemplateError, match="not allowed|non-empty"):
        render_template(name, template_dirs=[inner])
    with pytest.raises(TemplateError):
        LLMCall(name)


def test_traversal_rejected_in_include(isolated: Path, tmp_path: Path) -> None:
    _write(tmp_path, "secret.j2", "secret")
    _write(tmp_path / "inner", "sneaky.j2", "{% include '../secret.j2' %}")
    with pytest.raises(TemplateError):
        render_template("sneaky", template_dirs=[tmp_path / "inner"])


def test_includes_resolve_names_too(isolated: Path, tmp_path: Path) -> None:
    _write(tmp_path, "part.j2", "[{{ x }}]")
    _write(tmp_path, "whole.j2", "a {% include 'part' %} b")
    assert render_template("whole", template_dirs=[tmp_path], x=1) == "a [1] b"


def test_missing_include_names_both(isolated: Path, tmp_path: Path) -> None:
    _write(tmp_path, "outer.j2", "{% include 'absent' %}")
    with pytest.raises(TemplateError, match="'absent' \\(included from 'outer'\\)"):
        render_template("outer", template_dirs=[tmp_path])


# --------------------------------------------------------------------------- sandbox and trust


def test_a_template_cannot_reach_python_internals(isolated: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _write(tmp_path, "evil.j2", "{{ cycler.__init__.__globals__.os.popen('touch %s').read() }}" % marker)
    _write(tmp_path, "evil2.j2", "{{ ''.__class__.__mro__[1].__subclasses__() }}")
    for name in ("evil", "evil2"):
        with pytest.raises(TemplateError, match=f"template '{name}'.*SecurityError.*unsafe"):
            render_template(name, template_dirs=[tmp_path])
    assert not marker.exists()
    key = tuple(template_search_path([tmp_path]))
    assert isinstance(_templates._environment(key), jinja2.sandbox.SandboxedEnvironment)


def test_a_symlink_resolving_outside_the_search_path_is_refused(isolated: Path, tmp_path: Path) -> None:
    outside = _write(tmp_path / "outside", "secret.txt", "the secret")
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "leak.j2").symlink_to(outside)
    (templates / "linked_dir").symlink_to(outside.parent, target_is_directory=True)
    _write(templates, "includer.j2", "a {% include 'leak' %} b")
    _write(templates, "real.j2", "real {{ x }}")
    (templates / "alias.j2").symlink_to(templates / "real.j2")  # inside the search path: fine
    for name, variables in (("leak", {}), ("linked_dir/secret.txt", {}), ("includer", {})):
        with pytest.raises(TemplateError, match="outside the template search path") as info:
            render_template(name, variables, template_dirs=[templates])
        assert "the secret" not in str(info.value)
    with pytest.raises(TemplateError, match="'includer' includes a refused file"):
        render_template("includer", template_dirs=[templates])
    assert render_template("alias", template_dirs=[templates], x=1) == "real 1"


def test_render_time_python_errors_name_the_template_and_the_variable(isolated: Path, tmp_path: Path) -> None:
    _write(tmp_path, "calc.j2", "Title: {{ title }}\nShare: {{ 100 / parts }}\nNext: {{ count + 1 }}\n")
    with pytest.raises(TemplateError) as info:
        render_template("calc", template_dirs=[tmp_path], title="t", parts=0, count=1)
    message = str(info.value)
    assert "template 'calc'" in message and "calc.j2, line 2" in message
    assert "with variable 'parts' (int)" in message and "ZeroDivisionError" in message
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    with pytest.raises(TemplateError, match=r"line 3\) failed with variable 'count' \(str\): TypeError"):
        render_template("calc", template_dirs=[tmp_path], title="t", parts=4, count="3")


def test_variables_must_be_a_mapping(isolated: Path) -> None:
    for bad in (5, ["prompt", "x"], "prompt=x"):
        with pytest.raises(TemplateError, match="must be a mapping"):
            render_template("user_default", bad)  # type: ignore[arg-type]
        with pytest.raises(TemplateError, match="must be a mapping"):
            compose_messages(None, "user_default", bad)  # type: ignore[arg-type]


def test_find_template_checks_without_rendering(isolated: Path, tmp_path: Path) -> None:
    _write(tmp_path, "needs.j2", "{{ required }}")
    _write(tmp_path, "broken.j2", "{% if %}")
    assert _templates.find_template("needs", [tmp_path]) == tmp_path.resolve() / "needs.j2"
    assert _templates.find_template("summarize").name == "summarize.j2"
    with pytest.raises(TemplateError, match="not found"):
        _templates.find_template("absent", [tmp_path])
    with pytest.raises(TemplateError, match="syntax error"):
        _templates.find_template("broken", [tmp_path])


# --------------------------------------------------------------------------- environments and threads


def test_environment_built_once_per_search_path(isolated: Path, tmp_path: Path) -> None:
    key = tuple(template_search_path([tmp_path]))
    assert _templates._environment(key) is _templates._environment(key)
    env = _templates._environment(key)
    assert env.undefined is jinja2.StrictUndefined
    assert env.autoescape is False and env.keep_trailing_newline is True


def test_sixteen_threads_render_concurrently(isolated: Path, tmp_path: Path) -> None:
    _write(tmp_path, "worker.j2", "{% for i in range(n) %}{{ who }}{% endfor %} done\n")
    barrier = threading.Barrier(16)
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            barrier.wait()
            for _ in range(25):
                results[index] = render_template("worker", template_dirs=[tmp_path], who=f"<{index}>", n=3)
            compose_messages("system_default", "summarize", text=f"t{index}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert results == {i: f"<{i}>" * 3 + " done\n" for i in range(16)}


# --------------------------------------------------------------------------- installed package


def test_installed_package_finds_shipped_templates_outside_repo(tmp_path: Path) -> None:
    """Runs a fresh interpreter in tmp_path (not the repo) against the installed llmutils."""
    script = (
        "import json, importlib.resources, llmutils._templates as t\n"
        "print(json.dumps({'file': t.__file__, 'path': [str(p) for p in t.template_search_path()],\n"
        " 'shipped': str(importlib.resources.files('llmutils.templates')),\n"
        " 'messages': t.compose_messages('system_default', 'classify', text='great', labels=['pos', 'neg'])}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "LLMUTILS_"))}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    if "No module named 'llmutils'" in proc.stderr:
        pytest.skip("llmutils is not installed in this interpreter (run pip install -e .)")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["path"] == [out["shipped"]]
    assert Path(out["shipped"], "summarize.j2").is_file()
    assert out["messages"][0]["role"] == "system"
    assert "labels: pos, neg" in out["messages"][1]["content"]


# --------------------------------------------------------------------------- compose_messages


def test_compose_messages_roles_and_stripping(isolated: Path) -> None:
    messages = compose_messages("system_default", "user_default", prompt="  Hello  ")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1]["content"] == "Hello"
    assert compose_messages(None, "user_default", prompt="x") == [{"role": "user", "content": "x"}]
    assert [m["role"] for m in compose_messages("system_default")] == ["system"]
    with pytest.raises(TemplateError):
        compose_messages(None, None)


def test_shipped_task_templates(isolated: Path) -> None:
    summary = compose_messages(None, "summarize", text="Long text.", max_words=30)[0]["content"]
    assert "at most 30 words" in summary and "Long text." in summary
    labels = compose_messages(None, "classify", text="I love it", labels=["positive", "negative"])[0]["content"]
    assert "positive, negative" in labels and "I love it" in labels
    both = compose_messages(None, "translate", text="Hallo", target_language="English", source_language="German")
    assert "from German into English" in both[0]["content"]
    one = compose_messages(None, "translate", text="Hallo", target_language="English")
    assert "text into English" in one[0]["content"]


# --------------------------------------------------------------------------- LLMCall


def test_llmcall_sends_renders_and_keeps_state(isolated: Path, tmp_path: Path) -> None:
    _write(tmp_path, "sys.j2", "You are {{ role }}.")
    _write(tmp_path, "usr.j2", "Say {{ word }}.")
    client = FakeClient("done")
    call = LLMCall("sys", "usr", template_dirs=[tmp_path], client=client, model="m", temperature=0)
    assert call.messages is None and call.model_output is None
    assert call.call(role="terse", word="hi") == "done"
    sent, params = client.calls[0]
    assert sent == [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi."}]
    assert params == {"model": "m", "temperature": 0}  # template_dirs and output_type are not forwarded
    assert call.messages == sent
    assert call.model_output == {"role": "assistant", "content": "done"}
    text = repr(call)
    assert "You are terse." in text and "'done'" in text and "model_params={'model': 'm'" in text


def test_llmcall_rendering_configs_may_use_any_name(isolated: Path, tmp_path: Path) -> None:
    _write(tmp_path, "u.j2", "{{ template_dirs }} {{ client }}")  # (Jinja2 keeps {{ self }} for itself)
    client = FakeClient()
    LLMCall("system_default", "u", template_dirs=[tmp_path], client=client).call(template_dirs="a", client="b", self="c")
    assert client.calls[0][0][1]["content"] == "a b"


def test_compose_messages_takes_a_mapping_so_any_name_works(isolated: Path, tmp_path: Path) -> None:
    _write(tmp_path, "u.j2", "{{ template_dirs }} {{ system_template }} {{ a }}")
    variables = {"template_dirs": "td", "system_template": "st", "a": 1}
    messages = compose_messages(None, "u", variables, template_dirs=[tmp_path], a=2)
    assert messages == [{"role": "user", "content": "td st 2"}]
    assert variables == {"template_dirs": "td", "system_template": "st", "a": 1}  # not changed


def test_one_llmcall_shared_by_sixteen_threads(isolated: Path) -> None:
    class Echo(FakeClient):
        def send_message(self, messages: list[dict[str, Any]], **params: Any) -> dict[str, Any]:
            return {"role": "assistant", "content": messages[-1]["content"]}

    call = LLMCall("system_default", "user_default", output_type=int, client=Echo())
    barrier = threading.Barrier(16)
    results: dict[int, int] = {}

    def work(index: int) -> None:
        barrier.wait()
        results[index] = call.call(prompt=str(index))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {i: i for i in range(16)}
    assert call.messages is not None and call.model_output is not None
    assert call.messages[-1]["content"] == call.model_output["content"]  # the pair is from one call


def test_llmcall_uses_registry_client_when_none_given(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client = FakeClient("from registry")
    import llmutils._registry

    monkeypatch.setattr(llmutils._registry, "client", lambda: client)
    assert LLMCall("system_default", "user_default").call(prompt="x") == "from registry"


def test_llmcall_rejects_unknown_output_type() -> None:
    with pytest.raises(InvalidRequestError, match=r"unsupported output_type <class 'set'>"):
        LLMCall("system_default", output_type=set)


class ChoicesClient(FakeClient):
    """Answers like a client asked for ``n`` choices: a list of message dicts when n > 1."""

    def __init__(self, contents: list[str]) -> None:
        super().__init__()
        self.contents = contents

    def send_message(self, messages: list[dict[str, Any]], **params: Any) -> Any:
        self.calls.append((messages, params))
        answers = [{"role": "assistant", "content": c} for c in self.contents[: params.get("n", 1)]]
        return answers if params.get("n", 1) > 1 else answers[0]


def test_llmcall_with_n_returns_every_choice(isolated: Path, caplog: pytest.LogCaptureFixture) -> None:
    client = ChoicesClient(["first", "second", "third"])
    call = LLMCall("system_default", "user_default", client=client, n=2)
    assert call.call(prompt="q") == ["first", "second"]
    assert call.model_output == [{"role": "assistant", "content": "first"}, {"role": "assistant", "content": "second"}]
    assert client.calls[0][1]["n"] == 2
    assert not [r for r in caplog.records if r.levelno >= 30]


def test_llmcall_with_n_coerces_each_choice(isolated: Path) -> None:
    answers = ChoicesClient(["1", "The answer is 2.", "3"])
    as_int = LLMCall("system_default", "user_default", client=answers, output_type=int, n=3)
    assert as_int.call(prompt="q") == [1, 2, 3]
    bad = LLMCall("system_default", "user_default", client=ChoicesClient(["1", "no number"]), output_type=int, n=2)
    with pytest.raises(OutputParseError, match="no number"):
        bad.call(prompt="q")


class Person(pydantic.BaseModel):
    """A small model for the output_type tests."""

    name: str
    age: int


PERSON_SCHEMA = {
    "title": "Person record",
    "type": "object",
    "properties": {"name": {"type": "string"}},
    "required": ["name"],
    "additionalProperties": False,
}

GOOD_ANSWERS = [
    (str, "hello there", "hello there"),
    (int, "42", 42),
    (int, "42.", 42),
    (int, "The answer is -7.", -7),
    (int, "1,234", 1234),
    (int, "3.0", 3),
    (float, "3.5", 3.5),
    (float, "About 2.25 kg.", 2.25),
    (float, "7", 7.0),
    (bool, "Yes", True),
    (bool, "FALSE.", False),
    (bool, '"true"', True),
    (bool, "no", False),
    (list, '{"items": [1, 2]}', [1, 2]),
    (list, "[1, 2]", [1, 2]),
    (list, '{"colors": ["red"]}', ["red"]),
    (list, '```json\n["a"]\n```', ["a"]),
    (dict, '{"a": 1}', {"a": 1}),
    (dict, '```\n{"a": 1}\n```', {"a": 1}),
    (PERSON_SCHEMA, '{"name": "Ann"}', {"name": "Ann"}),
    (Person, '{"name": "Ann", "age": 30}', Person(name="Ann", age=30)),
]

BAD_ANSWERS = [
    (str, None),
    (int, "forty-two"),
    (int, "3 or 4"),
    (int, "4.5"),
    (float, "n/a"),
    (float, "1.5 to 2.5"),
    (bool, "maybe"),
    (bool, "yes and no"),
    (list, '{"a": 1, "b": [2]}'),
    (list, "1, 2, 3"),
    (dict, "[1]"),
    (dict, "{'a': 1}"),
    (PERSON_SCHEMA, '"Ann"'),
    (PERSON_SCHEMA, "Ann"),
    (Person, '{"name": "Ann"}'),
    (Person, "not json"),
]


@pytest.mark.parametrize(("output_type", "answer", "expected"), GOOD_ANSWERS)
def test_output_type_good_answer(isolated: Path, output_type: Any, answer: str, expected: Any) -> None:
    client = FakeClient(answer)
    value = LLMCall("system_default", "user_default", output_type=output_type, client=client).call(prompt="q")
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(("output_type", "answer"), BAD_ANSWERS)
def test_output_type_bad_answer(isolated: Path, output_type: Any, answer: str | None) -> None:
    client = FakeClient(answer)
    call = LLMCall("system_default", "user_default", output_type=output_type, client=client)
    with pytest.raises(OutputParseError) as info:
        call.call(prompt="q")
    assert isinstance(info.value, ValueError) and isinstance(info.value, LLMUtilsError)
    assert info.value.raw == answer
    if answer is not None:
        assert repr(answer) in str(info.value)
    assert call.model_output == {"role": "assistant", "content": answer}  # still inspectable


def test_output_parse_error_truncates_long_answers(isolated: Path) -> None:
    answer = "no number here " * 100
    with pytest.raises(OutputParseError) as info:
        LLMCall("system_default", "user_default", output_type=int, client=FakeClient(answer)).call(prompt="q")
    assert info.value.raw == answer
    assert f"({len(answer)} characters in all)" in str(info.value)
    assert len(str(info.value)) < 700


@pytest.mark.parametrize(
    ("output_type", "response_format", "instruction"),
    [
        (str, None, None),
        (int, None, "single integer"),
        (float, None, "single number"),
        (bool, None, "yes or no"),
        (dict, {"type": "json_object"}, "JSON object"),
        (list, {"type": "json_object"}, '{"items": [...]}'),
    ],
)
def test_output_type_request_shape(
    isolated: Path, output_type: Any, response_format: dict[str, Any] | None, instruction: str | None
) -> None:
    answers = {str: "x", int: "1", float: "1.5", bool: "yes", dict: "{}", list: '{"items": []}'}
    client = FakeClient(answers[output_type])
    LLMCall("system_default", "user_default", output_type=output_type, client=client).call(prompt="q")
    messages, params = client.calls[0]
    assert params.get("response_format") == response_format
    assert messages[1] == {"role": "user", "content": "q"}  # the user's prompt is left alone
    if instruction:
        assert instruction in messages[0]["content"]
    else:
        assert messages[0]["content"] == render_template("system_default").strip()


def test_json_schema_request(isolated: Path) -> None:
    client = FakeClient('{"name": "Ann"}')
    LLMCall("system_default", "user_default", output_type=PERSON_SCHEMA, client=client).call(prompt="q")
    response_format = client.calls[0][1]["response_format"]
    assert response_format == {
        "type": "json_schema",
        "json_schema": {"name": "Person_record", "schema": PERSON_SCHEMA, "strict": True},
    }
    wrapper = {"name": "thing", "schema": {"type": "object"}, "strict": False}
    client = FakeClient("{}")
    LLMCall("system_default", "user_default", output_type=wrapper, client=client).call(prompt="q")
    assert client.calls[0][1]["response_format"] == {"type": "json_schema", "json_schema": wrapper}


def test_pydantic_request_is_strict_schema(isolated: Path) -> None:
    class Pet(pydantic.BaseModel):
        name: str
        nickname: str | None = None

    class Owner(pydantic.BaseModel):
        pet: Pet
        tags: list[str] = []

    client = FakeClient('{"pet": {"name": "Rex", "nickname": null}, "tags": ["a"]}')
    value = LLMCall("system_default", "user_default", output_type=Owner, client=client).call(prompt="q")
    assert value == Owner(pet=Pet(name="Rex"), tags=["a"])
    json_schema = client.calls[0][1]["response_format"]["json_schema"]
    assert json_schema["name"] == "Owner" and json_schema["strict"] is True
    schema = json_schema["schema"]
    assert schema["additionalProperties"] is False and schema["required"] == ["pet", "tags"]
    pet = schema["$defs"]["Pet"]
    assert pet["additionalProperties"] is False and pet["required"] == ["name", "nickname"]
    assert "default" not in pet["properties"]["nickname"]


def test_explicit_response_format_is_kept(isolated: Path) -> None:
    client = FakeClient('{"a": 1}')
    mine = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    LLMCall("system_default", "user_default", output_type=dict, client=client, response_format=mine).call(prompt="q")
    assert client.calls[0][1]["response_format"] is mine


def test_refusal_is_reported(isolated: Path) -> None:
    class Refuser(FakeClient):
        def send_message(self, messages: list[dict[str, Any]], **params: Any) -> dict[str, Any]:
            return {"role": "assistant", "content": None, "refusal": "I can't help with that."}

    with pytest.raises(OutputParseError, match="I can't help with that"):
        LLMCall("system_default", "user_default", output_type=dict, client=Refuser()).call(prompt="q")


# --------------------------------------------------------------------------- end to end


def test_llmcall_end_to_end_through_local_server(isolated: Path, server: Any) -> None:
    from llmutils import OpenAIClient

    client = OpenAIClient(base_url=server.base_url, api_key="test", cache_api_calls=False)
    call = LLMCall("system_default", "user_default", client=client, model="gpt-4o-mini", temperature=0)
    assert call.call(prompt="hello server") == "echo: hello server"
    body = server.requests[-1].body
    assert body["messages"] == call.messages
    assert body["model"] == "gpt-4o-mini" and "template_dirs" not in body
    assert call.model_output is not None and call.model_output["content"] == "echo: hello server"
    assert "echo: hello server" in repr(call)

    as_dict = LLMCall("system_default", "user_default", client=client, output_type=dict, model="gpt-4o-mini")
    assert as_dict.call(prompt="json please") == {"echo": "json please"}
    assert server.requests[-1].body["response_format"] == {"type": "json_object"}

    server.chat_handler = lambda body: "The total is 1,024."
    as_int = LLMCall("system_default", "summarize", client=client, output_type=int, model="gpt-4o-mini")
    assert as_int.call(text="numbers", max_words=5) == 1024
    server.chat_handler = lambda body: "none at all"
    with pytest.raises(OutputParseError, match="none at all"):
        as_int.call(text="numbers")

    server.chat_handler = None
    several = LLMCall("system_default", "user_default", client=client, model="gpt-4o-mini", n=3)
    assert several.call(prompt="hi") == ["echo: hi", "echo: hi [1]", "echo: hi [2]"]
    assert server.requests[-1].body["n"] == 3
    assert [m["content"] for m in several.model_output] == ["echo: hi", "echo: hi [1]", "echo: hi [2]"]
