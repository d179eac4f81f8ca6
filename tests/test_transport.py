"""LeanTransport: the SDK's HTTP/1.1 transport, against our test server and a raw socket server
that misbehaves on purpose (closed keep-alive connections, chunked bodies, trickles, drops)."""

from __future__ import annotations

import json
import os
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2
import openai
import pytest
import trustme

import llmutils
from llmutils._transport import LeanTransport, lean_http_client
from llmutils.testing import Fault, OpenAITestServer

OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"


def read_request(conn: socket.socket, buf: bytearray) -> bytes | None:
    """Read one request (head and Content-Length or chunked body) from ``conn``; None at EOF."""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    end = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:end])
    del buf[:end]
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        while not buf.endswith(b"0\r\n\r\n"):
            buf += conn.recv(65536)
        body = bytes(buf)
        buf.clear()
        return head + body
    length = 0
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    while len(buf) < length:
        buf += conn.recv(65536)
    body = bytes(buf[:length])
    del buf[:length]
    return head + body


class RawServer:
    """A threaded TCP server: each connection runs ``handler(conn, index)``; counts connections."""

    def __init__(self, handler: Callable[[socket.socket, int], None], tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.requests: list[bytes] = []
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            thread = threading.Thread(target=self._run, args=(conn, self.connections), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run(self, conn: socket.socket, index: int) -> None:
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            self.handler(conn, index)
        except OSError:
            pass
        finally:
            conn.close()

    def serve_requests(self, conn: socket.socket, answer: Callable[[int], bytes], *, close_after: int | None = None) -> None:
        """Answer requests on ``conn`` with ``answer(n)`` (n counts requests on the server)."""
        buf = bytearray()
        served = 0
        while close_after is None or served < close_after:
            request = read_request(conn, buf)
            if request is None:
                return
            self.requests.append(request)
            conn.sendall(answer(len(self.requests)))
            served += 1

    def close(self) -> None:
        self.sock.close()
        for thread in self._threads:
            thread.join(5)


@pytest.fixture
def raw() -> Iterator[Callable[..., RawServer]]:
    servers: list[RawServer] = []

    def make(handler: Callable[[socket.socket, int], None], tls: ssl.SSLContext | None = None) -> RawServer:
        servers.append(RawServer(handler, tls))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def client() -> Iterator[httpx2.Client]:
    with httpx2.Client(transport=LeanTransport(), timeout=5.0) as c:
        yield c


# -- against the OpenAI test server ---------------------------------------------------------------


def test_llmutils_client_sends_through_the_lean_transport(server: OpenAITestServer) -> None:
    with llmutils.OpenAIClient(base_url=server.base_url, api_key="k", model="gpt-4.1-mini") as c:
        for i in range(3):
            assert c.send_message([{"role": "user", "content": f"hi {i}"}]) == {"role": "assistant", "content": f"echo: hi {i}"}
    assert server.request_count == 3
    headers = server.requests[-1].headers
    assert headers["authorization"] == "Bearer k"
    assert "x-stainless-os" not in headers and "connection" not in headers  # the lean client, no telemetry
    assert "x-stainless-retry-count" not in headers and "x-stainless-read-timeout" not in headers
    assert "gzip" in headers["accept-encoding"] and headers["user-agent"].startswith("OpenAI/Python")


def test_callers_headers_win_whatever_their_case(server: OpenAITestServer) -> None:
    given = {"accept-encoding": "identity", "x-stainless-os": "MyOS", "User-Agent": "mine/1"}
    with llmutils.OpenAIClient(base_url=server.base_url, api_key="k", model="m", default_headers=given) as c:
        c.send_message([{"role": "user", "content": "x"}])
    headers = server.requests[-1].headers
    assert (headers["accept-encoding"], headers["x-stainless-os"], headers["user-agent"]) == ("identity", "MyOS", "mine/1")


def test_azure_client_sends_through_the_lean_transport(server: OpenAITestServer) -> None:
    with llmutils.AzureClient(azure_endpoint=server.azure_endpoint, api_key="k", model="my-deployment",
                              default_headers={"X-Custom": "yes"}) as c:
        assert c.send_message([{"role": "user", "content": "az"}])["content"] == "echo: az"
    request = server.requests[-1]
    assert request.deployment == "my-deployment" and request.headers["api-key"] == "k"
    assert request.headers["x-custom"] == "yes" and "x-stainless-os" not in request.headers


def test_sdk_status_errors_stay_typed(server: OpenAITestServer) -> None:
    http_client = lean_http_client(server.base_url, openai.DefaultHttpxClient)
    assert http_client is not None
    with openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0, http_client=http_client) as sdk:
        server.script(Fault.server_error(503))
        with pytest.raises(openai.InternalServerError) as info:
            sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        assert info.value.status_code == 503
        answer = sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "after"}])
        assert answer.choices[0].message.content == "echo: after"


def test_a_5xx_through_llmutils_is_retried_on_the_same_pool(server: OpenAITestServer) -> None:
    server.script(Fault.server_error(), Fault.server_error(502))
    with llmutils.OpenAIClient(base_url=server.base_url, api_key="k", model="m", sleep=lambda s: None) as c:
        assert c.send_message([{"role": "user", "content": "x"}], max_attempts=3)["content"] == "echo: x"
    assert server.request_count == 3


def test_trickled_body_is_read_whole(server: OpenAITestServer) -> None:
    server.script(Fault.trickle(4000))
    with llmutils.OpenAIClient(base_url=server.base_url, api_key="k", model="m") as c:
        assert c.send_message([{"role": "user", "content": "slowly"}])["content"] == "echo: slowly"


def test_a_trickle_past_the_deadline_ends_the_call(server: OpenAITestServer) -> None:
    server.script(Fault.trickle(20))
    with llmutils.OpenAIClient(base_url=server.base_url, api_key="k", model="m") as c:
        with pytest.raises(llmutils.TotalTimeoutError):
            c.send_message([{"role": "user", "content": "x" * 200}], total_timeout=0.5, max_attempts=1)


# -- framing, keep-alive and faults -------------------------------------------------------------


def test_keep_alive_reuses_one_connection(raw: Callable[..., RawServer], client: httpx2.Client) -> None:
    srv = raw(lambda conn, i: srv.serve_requests(conn, lambda n: OK))
    for _ in range(3):
        assert client.get(srv.url + "/x").text == "hello"
    assert srv.connections == 1


def test_a_connection_closed_by_the_server_is_replaced(raw: Callable[..., RawServer], client: httpx2.Client) -> None:
    # The server answers one request per connection and closes without saying so.
    srv = raw(lambda conn, i: srv.serve_requests(conn, lambda n: f"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n{n}".encode(), close_after=1))
    assert [client.post(srv.url, content=b"a").text for _ in range(3)] == ["1", "2", "3"]
    assert srv.connections == 3


def test_a_stale_connection_that_drops_the_request_is_retried_once(raw: Callable[..., RawServer], client: httpx2.Client) -> None:
    # Connection 1 answers once, then reads the next request and closes without answering: the
    # pooled connection was stale, nothing was received, so the request goes again on a new one.
    def handler(conn: socket.socket, index: int) -> None:
        buf = bytearray()
        if index == 1:
            srv.requests.append(read_request(conn, buf) or b"")
            conn.sendall(OK)
            read_request(conn, buf)
            return
        srv.serve_requests(conn, lambda n: OK)

    srv = raw(handler)
    assert client.post(srv.url, content=b"one").text == "hello"
    assert client.post(srv.url, content=b"two").text == "hello"
    assert srv.connections == 2
    assert srv.requests[-1].endswith(b"two")


def test_a_fresh_connection_closed_without_an_answer_is_an_error(raw: Callable[..., RawServer], client: httpx2.Client) -> None:
    srv = raw(lambda conn, i: read_request(conn, bytearray()))
    with pytest.raises(httpx2.RemoteProtocolError, match="without sending a response"):
        client.post(srv.url, content=b"x")
    assert srv.connections == 1


def test_chunked_body_with_extensions_and_trailers(raw: Callable[..., RawServer], client: httpx2.Client) -> None:
    answer = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: yes\r\n\r\n")
    srv = raw(lambda conn, i: srv.serve_requests(conn, lambda n: answer))
    assert client.get(srv.url).text == "hello world"
    assert client.get(srv.url).text == "hello world"  # the connection was left clean for reuse
    assert srv.connections == 1


def test_the_body_streams_as_it_arrives(raw: Callable[..., RawServer], client: httpx2.Client) -> None:
    first_seen = threading.Event()

    def handler(conn: socket.socket, index: int) -> None:
        read_request(conn, bytearray())
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\ndata:1\r\n")
        assert first_seen.wait(5)  # the second chunk only goes once the client has the first
        conn.sendall(b"6\r\ndata:2\r\n0\r\n\r\n")

    srv = raw(handler)
    with client.stream("GET", srv.url) as response:
        chunks = []
        for chunk in response.iter_bytes():
            chunks.append(chunk)
            first_seen.set()
    assert b"".join(chunks) == b"data:1data:2" and len(chunks) == 2


def test_a_connection_dropped_mid_body_is_an_error(raw: Callable[..., RawServer], client: httpx2.Client) -> None:
    def handler(conn: socket.socket, index: int) -> None:
        read_request(conn, bytearray())
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")

    srv = raw(handler)
    with pytest.raises(httpx2.RemoteProtocolError, match="91 bytes of the body still to come"):
        client.get(srv.url)


def test_a_chunked_body_dropped_mid_chunk_is_an_error(raw: Callable[..., RawServer], client: httpx2.Client) -> None:
    def handler(conn: socket.socket, index: int) -> None:
        read_request(conn, bytearray())
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc")

    srv = raw(handler)
    with pytest.raises(httpx2.RemoteProtocolError):
        client.get(srv.url)


def test_a_body_until_close(raw: Callable[..., RawServer], client: httpx2.Client) -> None:
    def handler(conn: socket.socket, index: int) -> None:
        read_request(conn, bytearray())
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")

    srv = raw(handler)
    assert client.get(srv.url).text == "all of it"
    assert client.get(srv.url).text == "all of it"
    assert srv.connections == 2


def test_interim_100_continue_is_skipped_and_204_has_no_body(raw: Callable[..., RawServer], client: httpx2.Client) -> None:
    answers = [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"HTTP/1.1 204 No Content\r\n\r\n"]
    srv = raw(lambda conn, i: srv.serve_requests(conn, lambda n: answers[(n - 1) % 2]))
    assert client.post(srv.url, content=b"x").text == "ok"
    response = client.delete(srv.url)
    assert response.status_code == 204 and response.content == b""
    assert client.post(srv.url, content=b"x").text == "ok"
    assert srv.connections == 1


def test_a_5xx_with_a_body_keeps_the_connection(raw: Callable[..., RawServer], client: httpx2.Client) -> None:
    answer = b'HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"error":1}'
    srv = raw(lambda conn, i: srv.serve_requests(conn, lambda n: answer))
    for _ in range(2):
        response = client.post(srv.url, content=b"x")
        assert response.status_code == 503 and response.json() == {"error": 1}
    assert srv.connections == 1


def test_a_request_body_of_unknown_length_goes_chunked(raw: Callable[..., RawServer], client: httpx2.Client) -> None:
    srv = raw(lambda conn, i: srv.serve_requests(conn, lambda n: OK))
    assert client.post(srv.url, content=iter([b"ab", b"", b"cde"])).text == "hello"
    assert srv.requests[0].endswith(b"2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n")


def test_read_timeout(raw: Callable[..., RawServer]) -> None:
    gate = threading.Event()

    def handler(conn: socket.socket, index: int) -> None:
        read_request(conn, bytearray())
        gate.wait(10)

    srv = raw(handler)
    with httpx2.Client(transport=LeanTransport(), timeout=0.2) as c:
        with pytest.raises(httpx2.ReadTimeout):
            c.get(srv.url)
    gate.set()


def test_connect_error() -> None:
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    with httpx2.Client(transport=LeanTransport(), timeout=2) as c:
        with pytest.raises(httpx2.ConnectError):
            c.get(f"http://127.0.0.1:{port}/")


def test_the_socket_is_exposed_for_the_deadline_watchdog(raw: Callable[..., RawServer], client: httpx2.Client) -> None:
    srv = raw(lambda conn, i: srv.serve_requests(conn, lambda n: OK))
    with client.stream("GET", srv.url) as response:
        sock = response.extensions["network_stream"].get_extra_info("socket")
        assert isinstance(sock, socket.socket) and sock.getpeername()[1] == srv.port
        response.read()


def test_close_closes_idle_connections(raw: Callable[..., RawServer]) -> None:
    closed = threading.Event()

    def handler(conn: socket.socket, index: int) -> None:
        srv.serve_requests(conn, lambda n: OK)
        closed.set()  # serve_requests returns at EOF: the client closed the connection

    srv = raw(handler)
    c = httpx2.Client(transport=LeanTransport())
    assert c.get(srv.url).text == "hello"
    assert not closed.is_set()
    c.close()
    assert closed.wait(5)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_never_uses_the_parents_connection(raw: Callable[..., RawServer], client: httpx2.Client) -> None:
    srv = raw(lambda conn, i: srv.serve_requests(conn, lambda n: OK))
    assert client.get(srv.url).text == "hello"
    pid = os.fork()
    if pid == 0:  # the child: a request of its own, on a connection of its own
        code = 0
        try:
            code = 0 if client.get(srv.url).text == "hello" else 1
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert srv.connections == 2
    assert client.get(srv.url).text == "hello"  # the parent's connection is intact and reused
    assert srv.connections == 2


# -- TLS ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_server(raw: Callable[..., RawServer], ca: trustme.CA) -> RawServer:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    srv = raw(lambda conn, i: srv.serve_requests(conn, lambda n: OK), server_context)
    return srv


def test_https_with_a_trusted_ca_keeps_the_connection(raw: Callable[..., RawServer], ca: trustme.CA) -> None:
    srv = tls_server(raw, ca)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    with httpx2.Client(transport=LeanTransport(ssl_context=client_context)) as c:
        assert [c.get(f"https://localhost:{srv.port}/").text for _ in range(2)] == ["hello", "hello"]
    assert srv.connections == 1


def test_https_trusts_ssl_cert_file(raw: Callable[..., RawServer], ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    srv = tls_server(raw, ca)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    with httpx2.Client(transport=LeanTransport()) as c:
        assert c.get(f"https://localhost:{srv.port}/").text == "hello"


def test_https_with_an_untrusted_certificate_fails(raw: Callable[..., RawServer], ca: trustme.CA) -> None:
    srv = tls_server(raw, ca)
    with httpx2.Client(transport=LeanTransport(ssl_context=ssl.create_default_context())) as c:
        with pytest.raises(httpx2.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            c.get(f"https://localhost:{srv.port}/")


# -- when the lean transport is not used ----------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "url", "lean"),
    [
        ({}, "http://127.0.0.1:8000/v1", True),
        ({"HTTPS_PROXY": "http://proxy:3128"}, "http://127.0.0.1:8000/v1", True),
        ({"HTTP_PROXY": "http://proxy:3128"}, "http://127.0.0.1:8000/v1", False),
        ({"ALL_PROXY": "http://proxy:3128"}, "https://api.openai.com/v1", False),
        ({"https_proxy": "http://proxy:3128", "NO_PROXY": "api.openai.com"}, "https://api.openai.com/v1", True),
        ({}, "unix://socket", False),
    ],
)
def test_proxies_fall_back_to_the_sdks_client(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], url: str, lean: bool) -> None:
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    http_client = lean_http_client(url)
    assert (http_client is not None) == lean
    if http_client is not None:
        http_client.close()


def test_an_http_proxy_from_the_environment_is_honoured(raw: Callable[..., RawServer], monkeypatch: pytest.MonkeyPatch) -> None:
    # With HTTP_PROXY set, the SDK's default client sends the request to the proxy (absolute-form
    # target), which the lean transport would not do.
    answer = json.dumps({"id": "x", "object": "chat.completion", "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "via proxy"}, "finish_reason": "stop"}]}).encode()
    srv = raw(lambda conn, i: srv.serve_requests(
        conn, lambda n: b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer)))
    for var in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HTTP_PROXY", srv.url)
    with llmutils.OpenAIClient(base_url="http://llm.example.invalid/v1", api_key="k", model="m") as c:
        assert c.send_message([{"role": "user", "content": "x"}])["content"] == "via proxy"
    assert srv.requests[0].startswith(b"POST http://llm.example.invalid/v1/chat/completions HTTP/1.1")


def test_client_close_closes_the_pooled_connection(raw: Callable[..., RawServer]) -> None:
    answer = json.dumps({"id": "x", "object": "chat.completion", "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}).encode()
    ended = threading.Event()

    def handler(conn: socket.socket, index: int) -> None:
        srv.serve_requests(conn, lambda n: b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
        ended.set()  # EOF from the client

    srv = raw(handler)
    c = llmutils.OpenAIClient(base_url=srv.url + "/v1", api_key="k", model="m")
    assert c.send_message([{"role": "user", "content": "x"}])["content"] == "hi"
    assert c.send_message([{"role": "user", "content": "y"}])["content"] == "hi"
    assert srv.connections == 1 and not ended.is_set()
    c.close()
    assert ended.wait(5)
