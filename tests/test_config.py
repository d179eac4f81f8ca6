"""Configuration layers, their order, and the errors for bad keys and values."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import llmutils
from llmutils import ConfigError, OpenAIClient
from llmutils._config import resolve
from llmutils.testing import OpenAITestServer

HELLO = [{"role": "user", "content": "hello"}]


def write_config(path: Path, **values: object) -> Path:
    lines = ["[OpenAI]"] + [f"{key} = {value}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_defaults_are_sane() -> None:
    settings = resolve()
    assert settings["MAX_ATTEMPTS"] >= 1
    assert settings["TOP_P"] is None  # sampling keys are unset: only what is set is sent
    assert settings["CACHE_API_CALLS"] is False
    assert settings["API_TYPE"] == "openai"


def test_every_layer_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: OpenAITestServer) -> None:
    (tmp_path / "config.ini").write_text(
        "[OpenAI]\nMODEL = from-file\nTEMPERATURE = 0.1\nTOP_P = 0.5\nMAX_TOKENS = 10\nFREQ_PENALTY = 0.3\n"
    )
    monkeypatch.setenv("LLMUTILS_TEMPERATURE", "0.2")
    monkeypatch.setenv("LLMUTILS_TOP_P", "0.6")
    monkeypatch.setenv("LLMUTILS_MAX_TOKENS", "20")
    llmutils.force_default_value("TOP_P", 0.7)
    llmutils.force_default_value("max_tokens", 30)
    client = OpenAIClient(base_url=server.base_url, api_key="k")
    with llmutils.override_defaults(max_tokens=40):
        client.send_message(HELLO, frequency_penalty=0.9)
    body = server.requests[-1].body
    assert body["model"] == "from-file"  # file over default
    assert body["temperature"] == 0.2  # env over file
    assert body["top_p"] == 0.7  # forced over env
    assert body["max_tokens"] == 40  # context over forced
    assert body["frequency_penalty"] == 0.9  # call over everything
    client.close()


def test_config_path_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path / "elsewhere.ini", MODEL="gpt-4o")
    monkeypatch.setenv("LLMUTILS_CONFIG", str(path))
    assert resolve()["MODEL"] == "gpt-4o"
    monkeypatch.setenv("LLMUTILS_CONFIG", str(tmp_path / "missing.ini"))
    with pytest.raises(ConfigError, match="missing.ini"):
        resolve()


def test_file_is_read_at_use_not_at_import(tmp_path: Path) -> None:
    assert resolve()["MODEL"] == llmutils.DEFAULTS["MODEL"]
    write_config(tmp_path / "config.ini", MODEL="later-model")
    assert resolve()["MODEL"] == "later-model"


def test_standard_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", "https://x.openai.azure.com")
    monkeypatch.setenv("OPENAI_API_VERSION", "2025-04-01-preview")
    settings = resolve()
    assert settings["BASE_URL"] == "http://127.0.0.1:9/v1"
    assert settings["AZURE_ENDPOINT"] == "https://x.openai.azure.com"
    assert settings["AZURE_API_VERSION"] == "2025-04-01-preview"


def test_malformed_value_names_key_value_and_file(tmp_path: Path) -> None:
    path = write_config(tmp_path / "config.ini", TEMPERATURE="hot")
    with pytest.raises(ConfigError) as info:
        resolve()
    message = str(info.value)
    assert "TEMPERATURE" in message and "'hot'" in message and str(path) in message
    assert isinstance(info.value, ValueError)


def test_unknown_key_in_file(tmp_path: Path) -> None:
    write_config(tmp_path / "config.ini", TEMPRATURE=1)
    with pytest.raises(ConfigError, match="TEMPRATURE.*Did you mean TEMPERATURE"):
        resolve()


def test_unknown_key_forced() -> None:
    with pytest.raises(ConfigError, match="Unknown config key 'NOPE'"):
        llmutils.force_default_value("NOPE", 1)


def test_bad_forced_value() -> None:
    with pytest.raises(ConfigError, match="MAX_ATTEMPTS"):
        llmutils.force_default_value("MAX_ATTEMPTS", "many")
    with pytest.raises(ConfigError, match="CACHE_MODE"):
        llmutils.force_default_value("CACHE_MODE", "sometimes")


def test_bad_env_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMUTILS_CACHE_API_CALLS", "maybe")
    with pytest.raises(ConfigError, match="LLMUTILS_CACHE_API_CALLS"):
        resolve()


def test_context_override_is_per_thread() -> None:
    seen: dict[str, str] = {}
    inside = threading.Event()
    release = threading.Event()

    def request_a() -> None:
        with llmutils.override_defaults(model="model-a"):
            inside.set()
            release.wait(10)
            seen["a"] = resolve()["MODEL"]

    thread = threading.Thread(target=request_a)
    thread.start()
    inside.wait(10)
    seen["b"] = resolve()["MODEL"]
    release.set()
    thread.join()
    assert seen == {"a": "model-a", "b": llmutils.DEFAULTS["MODEL"]}


def test_client_arguments_beat_config(tmp_path: Path) -> None:
    write_config(tmp_path / "config.ini", MODEL="from-file")
    assert OpenAIClient(model="mine").settings()["MODEL"] == "mine"
    with pytest.raises(ConfigError, match="CACHE_MODE"):
        OpenAIClient(cache_mode="bogus")


def test_import_reads_nothing(tmp_path: Path) -> None:
    import subprocess
    import sys

    write_config(tmp_path / "config.ini", TEMPERATURE="broken")
    code = "import llmutils; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("sections", [["openai"], ["OpenAI", "openai"], ["Openai"], ["Azure"]])
def test_a_section_other_than_openai_is_an_error_naming_the_file_and_sections(tmp_path: Path, sections: list[str]) -> None:
    text = "".join(f"[{section}]\nMODEL = m\n" for section in sections)
    (tmp_path / "config.ini").write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        resolve()
    message = str(info.value)
    assert str(tmp_path / "config.ini") in message and "[OpenAI]" in message
    assert all(f"[{section}]" in message for section in sections)


def test_an_empty_config_file_is_fine(tmp_path: Path) -> None:
    (tmp_path / "config.ini").write_text("# nothing yet\n", encoding="utf-8")
    assert resolve()["MODEL"] == llmutils.DEFAULTS["MODEL"]


def test_the_settings_memo_sees_every_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMUTILS_TEST_UNRELATED", "1")
    assert resolve()["MODEL"] == llmutils.DEFAULTS["MODEL"]
    # Swap an unrelated variable for a setting: the number of variables stays the same.
    monkeypatch.delenv("LLMUTILS_TEST_UNRELATED")
    monkeypatch.setenv("LLMUTILS_MODEL", "from-env")
    assert resolve()["MODEL"] == "from-env"
    monkeypatch.setenv("LLMUTILS_MODEL", "changed-in-place")
    assert resolve()["MODEL"] == "changed-in-place"
    monkeypatch.delenv("LLMUTILS_MODEL")
    write_config(tmp_path / "config.ini", MODEL="from-file")
    assert resolve()["MODEL"] == "from-file"
    write_config(tmp_path / "config.ini", MODEL="edited-file")  # same second, another size
    assert resolve()["MODEL"] == "edited-file"
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)  # another working directory: another ./config.ini (none here)
    assert resolve()["MODEL"] == llmutils.DEFAULTS["MODEL"]
    llmutils.force_default_value("MODEL", "forced")
    assert resolve()["MODEL"] == "forced"
    with llmutils.override_defaults(model="context"):
        assert resolve()["MODEL"] == "context"
    assert resolve()["MODEL"] == "forced"


def test_resolve_returns_a_dict_the_caller_may_change() -> None:
    first = resolve()
    first["MODEL"] = "scribbled"
    assert resolve()["MODEL"] == llmutils.DEFAULTS["MODEL"]


# The [OpenAI] section of the old module's config.ini as TinyTroupe ships it (microsoft/TinyTroupe,
# tinytroupe/config.ini), comments and the trailing space included.
OLD_MODULE_SECTION = """[OpenAI]
# Default options: openai, azure
API_TYPE=openai
AZURE_API_VERSION=2024-12-01-preview
MODEL=gpt-5-mini
REASONING_MODEL=o3-mini
EMBEDDING_MODEL=text-embedding-3-small
MAX_COMPLETION_TOKENS=32000
TIMEOUT=480
MAX_ATTEMPTS=5
WAITING_TIME=1
EXPONENTIAL_BACKOFF_FACTOR=5
MAX_CONCURRENT_MODEL_CALLS=4
REASONING_EFFORT=high
CACHE_API_CALLS=False
CACHE_FILE_NAME=openai_api_cache.pickle
MAX_CONTENT_DISPLAY_LENGTH=4000
""".replace("small\n", "small \n")  # the shipped file has a trailing space after the embedding model


def test_the_old_modules_config_section_works_as_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: OpenAITestServer
) -> None:
    (tmp_path / "config.ini").write_text(OLD_MODULE_SECTION, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    with OpenAIClient(base_url=server.base_url, api_key="k") as client:
        client.send_message([{"role": "user", "content": "hi"}])
        assert client.settings()["EMBEDDING_MODEL"] == "text-embedding-3-small"
    assert server.requests[-1].body == {
        "model": "gpt-5-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": 32000,
        "reasoning_effort": "high",
    }


def test_other_programs_sections_beside_openai_are_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: OpenAITestServer
) -> None:
    """The old module's whole config.ini: [OpenAI] is read, TinyTroupe's own sections are not ours."""
    others = "\n[Simulation]\nPARALLEL_AGENT_GENERATION=True\n\n[ActionGenerator]\nMAX_ATTEMPTS=2\n\n[Logging]\nLOGLEVEL=ERROR\n"
    (tmp_path / "config.ini").write_text(OLD_MODULE_SECTION + others, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert resolve()["MAX_ATTEMPTS"] == 5  # [ActionGenerator]'s MAX_ATTEMPTS is not ours
    with OpenAIClient(base_url=server.base_url, api_key="k") as client:
        client.send_message([{"role": "user", "content": "hi"}])
    assert server.requests[-1].body["model"] == "gpt-5-mini"
