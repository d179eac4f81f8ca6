"""The web examples: examples/flask_app.py on a real threaded server, examples/django_app via Django's test client.

Flask and Django are test extras, not runtime dependencies: each half skips when its framework is
not installed. The model is the shared ``server`` fixture (OpenAITestServer on 127.0.0.1).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import openai  # noqa: F401 - imported once here, not by 32 request threads racing for the import lock
import pytest

import llmutils
from llmutils.testing import Fault, OpenAITestServer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SECRET = "sk-test-do-not-leak-1234567890"


def _load_flask_example() -> ModuleType:
    pytest.importorskip("flask")
    spec = importlib.util.spec_from_file_location("llmutils_example_flask_app", EXAMPLES / "flask_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _test_client(server: OpenAITestServer, tmp_path: Path, waits: list[float]) -> llmutils.OpenAIClient:
    """A client of the test server with the cache on in tmp_path; backoff waits are recorded, not slept."""
    return llmutils.OpenAIClient(
        base_url=server.base_url,
        api_key=SECRET,
        cache_api_calls=True,
        cache_file_name=tmp_path / "web-cache.sqlite",
        retry=llmutils.RetryPolicy(max_attempts=3, waiting_time=0.0, sleep=waits.append),
    )


def _post(url: str, payload: Any) -> tuple[int, dict[str, Any]]:
    """POST JSON with urllib; return (status, decoded body), error statuses included."""
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


# -- Flask -----------------------------------------------------------------------------------------


@pytest.fixture
def waits() -> list[float]:
    return []


@pytest.fixture
def llm(server: OpenAITestServer, tmp_path: Path, waits: list[float]) -> Iterator[llmutils.OpenAIClient]:
    client = _test_client(server, tmp_path, waits)
    yield client
    client.close()


@pytest.fixture
def flask_url(llm: llmutils.OpenAIClient) -> Iterator[Any]:
    """Serve create_app(llm, **config) with werkzeug's threaded server; yields url(**config) -> /ask URL."""
    module = _load_flask_example()
    from werkzeug.serving import make_server

    servers: list[Any] = []

    def url(**config: Any) -> str:
        httpd = make_server("127.0.0.1", 0, module.create_app(llm, **config), threaded=True)
        thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        servers.append((httpd, thread))
        return f"http://127.0.0.1:{httpd.server_port}/ask"

    yield url
    for httpd, thread in servers:
        httpd.shutdown()
        thread.join(5)
        httpd.server_close()


def test_flask_32_concurrent_requests_then_all_cached(flask_url: Any, server: OpenAITestServer, llm: llmutils.OpenAIClient) -> None:
    url = flask_url()
    together = threading.Barrier(32, timeout=10)

    def answer_when_all_arrived(body: dict[str, Any]) -> str:
        together.wait()  # proves the 32 requests are in flight at the same time
        return "echo: " + body["messages"][-1]["content"]

    server.chat_handler = answer_when_all_arrived
    prompts = [f"question number {i}" for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        first = list(pool.map(lambda p: _post(url, {"prompt": p}), prompts))
    assert [status for status, _ in first] == [200] * 32
    assert [body["answer"] for _, body in first] == [f"echo: {p}" for p in prompts]
    assert [body["cached"] for _, body in first] == [False] * 32
    assert server.request_count == 32

    server.chat_handler = None
    with ThreadPoolExecutor(32) as pool:
        second = list(pool.map(lambda p: _post(url, {"prompt": p}), prompts))
    assert [status for status, _ in second] == [200] * 32
    assert [body["answer"] for _, body in second] == [f"echo: {p}" for p in prompts]
    assert sum(body["cached"] for _, body in second) == 32
    assert server.request_count == 32  # nothing new reached the model
    assert llm.cache_stats().hits == 32


def test_flask_identical_concurrent_prompts_reach_the_model_once(flask_url: Any, server: OpenAITestServer) -> None:
    url = flask_url()
    server.latency = 0.05
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda _: _post(url, {"prompt": "same question"}), range(32)))
    assert {status for status, _ in results} == {200}
    assert {body["answer"] for _, body in results} == {"echo: same question"}
    assert sorted(body["cached"] for _, body in results) == [False] + [True] * 31
    assert server.request_count == 1


def test_flask_model_field_is_a_per_request_override(flask_url: Any, server: OpenAITestServer) -> None:
    url = flask_url()
    assert _post(url, {"prompt": "hi", "model": "gpt-4o-mini"}) == (
        200,
        {"answer": "echo: hi", "cached": False, "model": "gpt-4o-mini"},
    )
    status, body = _post(url, {"prompt": "hi"})
    assert (status, body["model"]) == (200, "gpt-4.1-mini")
    assert [r.body["model"] for r in server.requests] == ["gpt-4o-mini", "gpt-4.1-mini"]


@pytest.mark.parametrize(
    "payload",
    [b"not json", {"prompt": ""}, {"prompt": 3}, ["hi"], {"prompt": "hi", "model": "gpt-5-pro"}, {"prompt": "x" * 9000}],
)
def test_flask_bad_requests_are_400_and_never_reach_the_model(flask_url: Any, server: OpenAITestServer, payload: Any) -> None:
    status, body = _post(flask_url(), payload)
    assert (status, body["code"]) == (400, "bad_request")
    assert server.request_count == 0


def test_flask_503_when_every_attempt_fails(flask_url: Any, server: OpenAITestServer, waits: list[float]) -> None:
    server.script(*[Fault.server_error(502)] * 3)
    assert _post(flask_url(), {"prompt": "hi"}) == (
        503,
        {"error": "The model is unavailable; try again later.", "code": "model_unavailable"},
    )
    assert server.request_count == 3
    assert len(waits) == 2


def test_flask_503_without_leaking_the_key_when_it_is_rejected(flask_url: Any, server: OpenAITestServer) -> None:
    server.script(Fault.unauthorized())
    status, body = _post(flask_url(), {"prompt": "hi"})
    assert (status, body["code"]) == (503, "model_misconfigured")
    assert SECRET not in json.dumps(body) and "sk-" not in json.dumps(body)


def test_flask_400_when_the_model_rejects_the_request(flask_url: Any, server: OpenAITestServer) -> None:
    server.script(Fault.bad_request("secret upstream detail"))
    status, body = _post(flask_url(), {"prompt": "hi"})
    assert (status, body["code"]) == (400, "invalid_request")
    assert "upstream" not in body["error"]


def test_flask_504_when_retry_after_outlasts_the_total_timeout(flask_url: Any, server: OpenAITestServer, waits: list[float]) -> None:
    server.script(Fault.rate_limit(retry_after=60))
    assert _post(flask_url(), {"prompt": "hi"}) == (
        504,
        {"error": "The model did not answer in time.", "code": "model_timeout"},
    )
    assert server.request_count == 1
    assert waits == []  # gave up at once instead of waiting past the bound


def test_flask_504_when_the_model_is_too_slow(flask_url: Any, server: OpenAITestServer) -> None:
    server.script(Fault.slow(10))
    status, body = _post(flask_url(LLM_TOTAL_TIMEOUT=0.2), {"prompt": "hi"})
    assert (status, body["code"]) == (504, "model_timeout")


def test_flask_example_runs_offline_with_the_mock_client(tmp_path: Path) -> None:
    module = _load_flask_example()
    assert isinstance(module.make_client(), llmutils.MockClient)
    client = module.llm
    assert isinstance(client, llmutils.MockClient)
    app = module.create_app()  # what `flask --app examples/flask_app run` calls
    try:
        first = app.test_client().post("/ask", json={"prompt": "Hello"})
        second = app.test_client().post("/ask", json={"prompt": "Hello"})
        assert first.get_json() == {"answer": "echo: Hello", "cached": False, "model": "gpt-4.1-mini"}
        assert second.get_json()["cached"] is True
        assert (tmp_path / "llmutils_cache.sqlite").exists()
    finally:
        client.close()


# -- Django ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def django_views() -> Iterator[ModuleType]:
    """Configure Django with examples/django_app/llmsite/settings.py; yield the llmsite.llm module."""
    pytest.importorskip("django")
    import django
    from django.conf import settings

    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(EXAMPLES / "django_app"))
    if not settings.configured:
        mp.setenv("DJANGO_SETTINGS_MODULE", "llmsite.settings")
        django.setup()
    from llmsite import llm  # noqa: E402 - needs the settings above

    yield llm
    mp.undo()
    for name in [m for m in sys.modules if m == "llmsite" or m.startswith("llmsite.")]:
        del sys.modules[name]


@pytest.fixture
def django_client(
    django_views: ModuleType, server: OpenAITestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Any]:
    """Django's test client; the project's client is rebuilt from OPENAI_BASE_URL -> the test server."""
    from django.test import Client, override_settings

    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("LLMUTILS_CACHE_FILE_NAME", str(tmp_path / "django-cache.sqlite"))
    monkeypatch.setenv("LLMUTILS_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("LLMUTILS_WAITING_TIME", "0")
    client = django_views.make_client()
    assert type(client) is llmutils.OpenAIClient
    monkeypatch.setattr(django_views, "client", client)
    with override_settings(ALLOWED_HOSTS=["testserver"], ROOT_URLCONF="llmsite.urls", LLM_TOTAL_TIMEOUT=20.0):
        yield Client()
    client.close()


def test_django_answers_then_serves_from_the_cache(django_client: Any, server: OpenAITestServer) -> None:
    first = django_client.post("/ask", {"prompt": "Bonjour"}, content_type="application/json")
    assert (first.status_code, first.json()) == (200, {"answer": "echo: Bonjour", "cached": False, "model": "gpt-4.1-mini"})
    second = django_client.post("/ask", {"prompt": "Bonjour", "model": "gpt-4.1-mini"}, content_type="application/json")
    assert (second.status_code, second.json()["cached"]) == (200, True)
    assert server.request_count == 1
    assert server.requests[0].headers["authorization"] == f"Bearer {SECRET}"


def test_django_model_override_and_bad_requests(django_client: Any, server: OpenAITestServer) -> None:
    ok = django_client.post("/ask", {"prompt": "hi", "model": "gpt-4.1-nano"}, content_type="application/json")
    assert (ok.status_code, ok.json()["model"]) == (200, "gpt-4.1-nano")
    assert server.requests[-1].body["model"] == "gpt-4.1-nano"
    for payload in ({"prompt": ""}, {"prompt": "hi", "model": "o3-pro"}, ["hi"]):
        response = django_client.post("/ask", payload, content_type="application/json")
        assert (response.status_code, response.json()["code"]) == (400, "bad_request")
    assert django_client.post("/ask", "{", content_type="application/json").status_code == 400
    assert django_client.get("/ask").status_code == 405
    assert server.request_count == 1


def test_django_503_when_the_model_is_down_or_the_key_is_wrong(django_client: Any, server: OpenAITestServer) -> None:
    server.script(Fault.server_error(), Fault.server_error(503))
    down = django_client.post("/ask", {"prompt": "hi"}, content_type="application/json")
    assert (down.status_code, down.json()["code"]) == (503, "model_unavailable")
    assert server.request_count == 2
    server.script(Fault.unauthorized())
    rejected = django_client.post("/ask", {"prompt": "hi"}, content_type="application/json")
    assert (rejected.status_code, rejected.json()["code"]) == (503, "model_misconfigured")
    assert SECRET not in rejected.content.decode()


def test_django_504_when_the_total_timeout_would_be_exceeded(django_client: Any, server: OpenAITestServer) -> None:
    server.script(Fault.rate_limit(retry_after=60))
    response = django_client.post("/ask", {"prompt": "hi"}, content_type="application/json")
    assert (response.status_code, response.json()) == (504, {"error": "The model did not answer in time.", "code": "model_timeout"})
    assert server.request_count == 1


def test_django_example_is_offline_without_a_key(django_views: ModuleType) -> None:
    assert isinstance(django_views.make_client(), llmutils.MockClient)


# -- streaming endpoints ---------------------------------------------------------------------------

STORY = "once upon a time there was a cache that remembered every answer it was ever given"


def _sse_events(raw: str) -> list[tuple[str | None, Any]]:
    """Parse the endpoints' Server-Sent Events into (event name, JSON data) pairs."""
    events = []
    for block in raw.split("\n\n"):
        if not block.strip():
            continue
        name = None
        data = None
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
        events.append((name, data))
    return events


def _stream_post(url: str, payload: Any) -> tuple[int, str, list[bytes]]:
    """POST and read the answer chunk by chunk as the server sends it; (status, content type, chunks)."""
    import httpx2

    with httpx2.Client(timeout=30) as http:
        with http.stream("POST", url, json=payload) as response:
            return response.status_code, response.headers.get("content-type", ""), list(response.iter_raw())


def test_flask_stream_sends_text_as_it_comes(flask_url: Any, server: OpenAITestServer) -> None:
    server.stream_interval = 0.01  # the model writes slowly: each piece is its own chunk
    url = flask_url().replace("/ask", "/ask/stream")
    status, content_type, chunks = _stream_post(url, {"prompt": STORY})
    assert (status, content_type.split(";")[0]) == (200, "text/event-stream")
    assert len(chunks) > 5  # more than one chunk arrived before the end
    events = _sse_events(b"".join(chunks).decode())
    assert "".join(data["text"] for name, data in events if name is None) == "echo: " + STORY
    assert events[-1] == ("done", {"cached": False, "model": "gpt-4.1-mini"})
    assert b"event: done" not in b"".join(chunks[:-1])  # the end came last, after the text
    _, _, again = _stream_post(url, {"prompt": STORY})
    assert _sse_events(b"".join(again).decode())[-1] == ("done", {"cached": True, "model": "gpt-4.1-mini"})
    assert server.request_count == 1


def test_flask_stream_ends_cleanly_on_an_error_mid_stream(flask_url: Any, server: OpenAITestServer) -> None:
    server.script(Fault.drop_stream(after=4))
    status, _, chunks = _stream_post(flask_url().replace("/ask", "/ask/stream"), {"prompt": STORY})
    events = _sse_events(b"".join(chunks).decode())
    assert status == 200
    assert [data["text"] for name, data in events if name is None] == ["echo: ", "once ", "upon "]
    assert events[-1] == ("error", {"error": "The model is unavailable; try again later.", "code": "model_unavailable"})
    assert server.request_count == 1


def test_flask_stream_errors_before_any_text_are_json(flask_url: Any, server: OpenAITestServer, waits: list[float]) -> None:
    url = flask_url().replace("/ask", "/ask/stream")
    server.script(*[Fault.server_error(502)] * 3)
    assert _post(url, {"prompt": "hi"}) == (503, {"error": "The model is unavailable; try again later.", "code": "model_unavailable"})
    assert _post(url, {"prompt": ""})[0] == 400
    assert server.request_count == 3 and len(waits) == 2


def _django_stream(django_client: Any, payload: Any) -> tuple[Any, list[bytes]]:
    response = django_client.post("/ask/stream", payload, content_type="application/json")
    return response, list(response.streaming_content) if response.streaming else [response.content]


def test_django_stream_sends_text_as_it_comes(django_client: Any, server: OpenAITestServer) -> None:
    response, chunks = _django_stream(django_client, {"prompt": STORY})
    assert response.status_code == 200 and response["Content-Type"] == "text/event-stream"
    assert len(chunks) > 5
    events = _sse_events(b"".join(chunks).decode())
    assert "".join(data["text"] for name, data in events if name is None) == "echo: " + STORY
    assert events[-1] == ("done", {"cached": False, "model": "gpt-4.1-mini"})


def test_django_stream_ends_cleanly_on_an_error_mid_stream(django_client: Any, server: OpenAITestServer) -> None:
    server.script(Fault.drop_stream(after=4))
    response, chunks = _django_stream(django_client, {"prompt": STORY})
    events = _sse_events(b"".join(chunks).decode())
    assert response.status_code == 200
    assert events[-1] == ("error", {"error": "The model is unavailable; try again later.", "code": "model_unavailable"})
    server.script(Fault.server_error(), Fault.server_error())
    down, _ = _django_stream(django_client, {"prompt": "hi"})
    assert (down.status_code, down.json()["code"]) == (503, "model_unavailable")


def test_flask_stream_closes_the_models_connection_when_the_browser_leaves(flask_url: Any, server: OpenAITestServer) -> None:
    import httpx2

    server.chat_handler = lambda body: "word " * 300
    server.stream_interval = 0.02  # about 6 s for the whole answer
    url = flask_url().replace("/ask", "/ask/stream")
    with httpx2.Client(timeout=30) as http:
        with http.stream("POST", url, json={"prompt": "a long story"}) as response:
            chunks = response.iter_raw()
            next(chunks), next(chunks)
    # The browser is gone: werkzeug's next write fails, the view's generator is closed, and the
    # `with stream:` block closes the connection to the model, which the model's server sees.
    assert server.wait_stream_closed_early(1, timeout=5)
