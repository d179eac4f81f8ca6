"""A lean HTTP/1.1 transport for the SDK: a thread-safe keep-alive pool of stdlib sockets.

The openai SDK sends every request through an ``httpx2.Client``; by default that client's transport
is httpcore2 + h11, which is about half of the client's CPU per request. The SDK publicly accepts
``http_client=`` and httpx2 publicly accepts ``transport=``, so llmutils gives the SDK an
``httpx2.Client`` whose transport is :class:`LeanTransport`: the request head and body go out in
one ``sendall``, the response head is read with the C ``readline`` of a buffered socket file, and
the body streams (``read1``: whatever has arrived, so server-sent events are not held back).
Authentication, Azure token refresh, status errors and the body's content-encoding stay the SDK's
and httpx2's.

What it does:

- keep-alive: idle connections per (scheme, host, port), most recently used first, dropped after
  :data:`KEEPALIVE_EXPIRY` seconds idle or when the server closed them (the socket is readable);
  a request on a reused connection that receives nothing (the server closed it meanwhile) is sent
  once more on a fresh connection, as httpcore does;
- bodies framed by ``Content-Length``, ``Transfer-Encoding: chunked`` or the end of the connection;
  request bodies of unknown length are sent chunked;
- timeouts from the request's ``timeout`` extension (``connect``, ``read``, ``write``), errors as
  httpx2's (``ConnectTimeout``, ``ReadTimeout``, ``ReadError``, ``RemoteProtocolError``, ...);
- the call's deadline: inside :func:`call_deadline` (set by the client around the SDK call), every
  wait of the request — connecting, each send, each receive of the response head, of an error body
  the SDK reads itself and of the body — lasts at most the smaller of its timeout and what is left
  of the deadline, so a server that trickles its head or body one byte at a time is cut off at the
  deadline (``ConnectTimeout`` / ``WriteTimeout`` / ``ReadTimeout``, which the SDK maps to
  ``APITimeoutError``), not at the next per-read timeout;
- TLS with ``httpx2.create_ssl_context()`` (the same trust store as httpx2, ``SSL_CERT_FILE`` /
  ``SSL_CERT_DIR`` honoured);
- fork safety: a child process never reads or writes the parent's sockets (it closes its copies
  of their descriptors, which leaves the parent's connections open);
- anything else (another scheme, an extension it does not know) goes to httpx2's own
  ``HTTPTransport``; and :func:`lean_http_client` returns None when a proxy environment variable
  applies to the endpoint, so the SDK keeps its default client (which honours proxies).
"""

from __future__ import annotations

import contextlib
import contextvars
import encodings.idna  # noqa: F401 - see below
import io
import math
import os
import select
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx2

from ._imports import importing

# ``socket.getaddrinfo`` imports the ``idna`` codec on its first use, in the middle of the first
# request. A process forked while another thread is inside that import leaves the child waiting
# forever for the import's lock (seen: a fork during the first call hung the child's first call).
# This module is imported under the fork lock (``_imports.lazy_import``), so the codec is imported
# here, before any request, where a fork waits for it.

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from ._deadline import Deadline

__all__ = [
    "KEEPALIVE_EXPIRY",
    "SDK_REQUEST_TELEMETRY_HEADERS",
    "SDK_TELEMETRY_HEADERS",
    "LeanTransport",
    "call_deadline",
    "lean_http_client",
    "sdk_http_options",
    "sdk_request_options",
]

KEEPALIVE_EXPIRY = 5.0
"""Seconds an idle connection is kept for reuse (httpx's default)."""

MAX_IDLE_PER_HOST = 100
"""Idle connections kept per host (the openai SDK's ``max_keepalive_connections``)."""

SDK_TELEMETRY_HEADERS = (
    "X-Stainless-Lang",
    "X-Stainless-Package-Version",
    "X-Stainless-OS",
    "X-Stainless-Arch",
    "X-Stainless-Runtime",
    "X-Stainless-Runtime-Version",
    "X-Stainless-Async",
)
"""The openai SDK's platform headers (language, OS, versions): telemetry no endpoint needs, and
about a fifth of the SDK's per-request CPU to build and send; llmutils does not send them."""

SDK_REQUEST_TELEMETRY_HEADERS = ("x-stainless-retry-count", "x-stainless-read-timeout")
"""The SDK's per-request telemetry headers (its own retry count, always 0 here, and the read
timeout): not sent either."""

_RECHECK_AFTER = 0.5  # seconds idle after which a pooled socket is checked for a close before reuse
_CHUNK = 65536
_MAX_LINE = 65536
_MAX_HEADERS = 200
_KNOWN_EXTENSIONS = frozenset({"timeout"})
_NO_BODY_STATUS = frozenset({204, 304})
_PAST_DEADLINE = 0.001  # a wait cut at the deadline ends this much after it, so the deadline has passed by then

_the_call_deadline: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar("llmutils_call_deadline", default=None)


@contextlib.contextmanager
def call_deadline(deadline: Deadline) -> Iterator[None]:
    """Bound every wait of the requests sent inside the block by ``deadline`` (see the module doc).

    The client sets it around the SDK call of one attempt; :class:`LeanTransport` reads it when a
    request starts and keeps it for that request's whole response body, read after the block.
    An unbounded deadline changes nothing.
    """
    token = _the_call_deadline.set(deadline if deadline.bounded else None)
    try:
        yield
    finally:
        _the_call_deadline.reset(token)


def _wait_for(limit: float | None, deadline: Deadline | None) -> float | None:
    """How long one socket wait may last: ``limit``, cut to what is left of ``deadline``.

    :raises socket.timeout: the deadline has passed already (nothing is waited for).
    """
    if deadline is None:
        return limit
    left = deadline.remaining()
    if left <= 0:
        raise TimeoutError("the call's total_timeout ran out")
    if left == math.inf:
        return limit
    left += _PAST_DEADLINE
    return left if limit is None or left < limit else limit


class _Receiver(io.RawIOBase):
    """The raw side of a connection's buffered reader: each receive waits at most the read
    timeout and what is left of the current request's deadline (both set with :meth:`arm`)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.read_timeout: float | None = None
        self.deadline: Deadline | None = None
        self.timeout: float | None = sock.gettimeout()  # the socket's, known without a syscall

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.deadline is not None:
            self.settimeout(_wait_for(self.read_timeout, self.deadline))
        return self.sock.recv_into(buffer)

    def arm(self, read_timeout: float | None, deadline: Deadline | None) -> None:
        """Bound each receive of the response to come by ``read_timeout`` and by ``deadline``."""
        self.read_timeout = read_timeout
        self.deadline = deadline
        self.settimeout(_wait_for(read_timeout, deadline))

    def settimeout(self, timeout: float | None) -> None:
        """Set the socket's timeout (for the next send or receive) when it differs."""
        if timeout != self.timeout:
            self.sock.settimeout(timeout)
            self.timeout = timeout


class _Connection:
    """One socket to one origin, with the buffered file its responses are read from."""

    __slots__ = ("idle_since", "receiver", "reused", "rfile", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.receiver = _Receiver(sock)
        self.rfile = io.BufferedReader(self.receiver, _CHUNK)
        self.idle_since = 0.0
        self.reused = False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.rfile.close()
        with contextlib.suppress(OSError):
            self.sock.close()

    def is_dropped(self) -> bool:
        """True when the idle socket is readable: the server closed it (or sent something unasked)."""
        try:
            if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
                return True
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)


class _NetworkStream:
    """The ``network_stream`` response extension: gives the socket to whoever must shut it down."""

    __slots__ = ("_sock",)

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def get_extra_info(self, info: str) -> Any:
        return self._sock if info == "socket" else None


class _Body(httpx2.SyncByteStream):
    """A response body read as it arrives; the connection goes back to the pool once it is whole."""

    def __init__(self, transport: LeanTransport, key: tuple[str, str, int], conn: _Connection,
                 length: int | None, chunked: bool, keep_alive: bool) -> None:
        self._transport = transport
        self._key = key
        self._conn: _Connection | None = conn
        self._length = length
        self._chunked = chunked
        self._keep_alive = keep_alive

    def __iter__(self) -> Iterator[bytes]:
        conn = self._conn
        if conn is None:
            return
        try:
            if self._chunked:
                yield from self._chunks(conn)
            elif self._length is not None:
                yield from self._sized(conn, self._length)
            else:
                yield from self._until_close(conn)
        except TimeoutError as exc:
            self.close()
            raise httpx2.ReadTimeout(str(exc) or "timed out reading the response body") from exc
        except OSError as exc:
            self.close()
            raise httpx2.ReadError(str(exc) or type(exc).__name__) from exc
        except httpx2.HTTPError:
            self.close()
            raise
        self._release()

    @staticmethod
    def _sized(conn: _Connection, remaining: int) -> Iterator[bytes]:
        read1 = conn.rfile.read1
        while remaining > 0:
            data = read1(min(remaining, _CHUNK))
            if not data:
                raise httpx2.RemoteProtocolError(
                    f"the server closed the connection with {remaining} bytes of the body still to come"
                )
            remaining -= len(data)
            yield data

    def _chunks(self, conn: _Connection) -> Iterator[bytes]:
        readline = conn.rfile.readline
        while True:
            line = readline(_MAX_LINE)
            if not line.endswith(b"\n"):
                raise httpx2.RemoteProtocolError("the server closed the connection inside a chunked body")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise httpx2.RemoteProtocolError(f"malformed chunk size line {line[:40]!r}") from None
            if size < 0:
                raise httpx2.RemoteProtocolError(f"malformed chunk size line {line[:40]!r}")
            if size == 0:
                for _ in range(_MAX_HEADERS):  # trailers, ignored, up to the blank line
                    trailer = readline(_MAX_LINE)
                    if not trailer.endswith(b"\n"):
                        raise httpx2.RemoteProtocolError("the server closed the connection inside the chunked trailer")
                    if trailer in (b"\r\n", b"\n"):
                        return
                raise httpx2.RemoteProtocolError("too many trailer lines after a chunked body")
            yield from self._sized(conn, size)
            if readline(_MAX_LINE) not in (b"\r\n", b"\n"):
                raise httpx2.RemoteProtocolError("a chunk of the body is not followed by CRLF")

    @staticmethod
    def _until_close(conn: _Connection) -> Iterator[bytes]:
        read1 = conn.rfile.read1
        while True:
            data = read1(_CHUNK)
            if not data:
                return
            yield data

    def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._keep_alive and (self._length is not None or self._chunked):
            self._transport._put(self._key, conn)
        else:
            conn.close()

    def close(self) -> None:
        """Called by httpx2 when the response is closed: an unfinished body ends its connection."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class LeanTransport(httpx2.BaseTransport):
    """An ``httpx2`` transport speaking HTTP/1.1 over pooled stdlib sockets (see the module doc).

    >>> client = httpx2.Client(transport=LeanTransport())

    :param ssl_context: the TLS context for ``https`` (default: ``httpx2.create_ssl_context()``,
        which honours ``SSL_CERT_FILE`` and ``SSL_CERT_DIR``).
    :param keepalive_expiry: seconds an idle connection may be reused.
    """

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None, keepalive_expiry: float = KEEPALIVE_EXPIRY) -> None:
        self._ssl_context = ssl_context
        self._keepalive_expiry = keepalive_expiry
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._closed = False
        self._fallback: httpx2.HTTPTransport | None = None

    # -- the pool ------------------------------------------------------------------------------

    def _take(self, key: tuple[str, str, int]) -> _Connection | None:
        """A live idle connection to ``key``, or None."""
        if self._pid != os.getpid():
            inherited: list[_Connection] = []
            with self._lock:
                if self._pid != os.getpid():
                    inherited = [conn for conns in self._idle.values() for conn in conns]
                    self._idle = {}
                    self._pid = os.getpid()
            for conn in inherited:  # the parent's sockets: never read or written here; closing
                conn.close()        # the child's copy of the descriptor leaves the parent's open
        now = time.monotonic()
        while True:
            with self._lock:
                idle = self._idle.get(key)
                if not idle:
                    return None
                conn = idle.pop()
            idle_for = now - conn.idle_since
            # A connection used a moment ago is taken as is (a syscall spared per request); one
            # the server closed meanwhile costs a resend, since nothing was received on it.
            if idle_for < self._keepalive_expiry and (idle_for < _RECHECK_AFTER or not conn.is_dropped()):
                conn.reused = True
                return conn
            conn.close()

    def _put(self, key: tuple[str, str, int], conn: _Connection) -> None:
        conn.idle_since = time.monotonic()
        conn.receiver.deadline = None
        with self._lock:
            if not self._closed and self._pid == os.getpid():
                idle = self._idle.setdefault(key, [])
                if len(idle) < MAX_IDLE_PER_HOST:
                    idle.append(conn)
                    return
        conn.close()

    def _connect(self, scheme: str, host: str, port: int, timeout: float | None, deadline: Deadline | None) -> _Connection:
        try:
            sock = socket.create_connection((host, port), timeout=_wait_for(timeout, deadline))
        except TimeoutError as exc:
            raise httpx2.ConnectTimeout(f"timed out connecting to {host}:{port}") from exc
        except OSError as exc:
            raise httpx2.ConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https":
                sock.settimeout(_wait_for(timeout, deadline))  # the handshake's own bound
                sock = self._context().wrap_socket(sock, server_hostname=host)
        except TimeoutError as exc:
            sock.close()
            raise httpx2.ConnectTimeout(f"timed out in the TLS handshake with {host}:{port}") from exc
        except OSError as exc:
            sock.close()
            raise httpx2.ConnectError(f"TLS handshake with {host}:{port} failed: {exc}") from exc
        return _Connection(sock)

    def _context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            with importing():  # it imports httpcore2 and certifi: not while a fork is under way
                context = httpx2.create_ssl_context(trust_env=True)
            context.set_alpn_protocols(["http/1.1"])
            self._ssl_context = context
        return self._ssl_context

    # -- one request ---------------------------------------------------------------------------

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        """Send ``request`` and return the response with its head read and its body streaming."""
        url = request.url
        scheme = url.scheme
        if scheme not in ("http", "https") or not _KNOWN_EXTENSIONS.issuperset(request.extensions):
            return self._fallback_transport().handle_request(request)
        if self._closed:
            raise RuntimeError("the transport is closed")
        host = url.raw_host.decode("ascii")
        port = url.port or (443 if scheme == "https" else 80)
        key = (scheme, host, port)
        timeouts = request.extensions.get("timeout") or {}
        connect_timeout = timeouts.get("connect")
        read_timeout = timeouts.get("read")
        write_timeout = timeouts.get("write")
        deadline = _the_call_deadline.get()
        head, body, chunked_request = self._encode(request)

        conn = self._take(key)
        while True:
            fresh = conn is None
            if conn is None:
                conn = self._connect(scheme, host, port, connect_timeout, deadline)
            try:
                self._send(conn, head, body, chunked_request, write_timeout, deadline)
                conn.receiver.arm(read_timeout, deadline)
                status_line = conn.rfile.readline(_MAX_LINE)
            except TimeoutError as exc:
                conn.close()
                if isinstance(exc, _WriteTimeout):
                    raise httpx2.WriteTimeout("timed out sending the request") from exc
                raise httpx2.ReadTimeout("timed out waiting for the response") from exc
            except OSError as exc:
                conn.close()
                if not fresh and isinstance(body, bytes):  # a stale pooled connection: once more, afresh
                    conn = None
                    continue
                if isinstance(exc, _WriteError):
                    raise httpx2.WriteError(f"sending the request failed: {exc.__cause__ or exc}") from exc
                raise httpx2.ReadError(f"reading the response failed: {exc}") from exc
            if not status_line and not fresh and isinstance(body, bytes):
                conn.close()  # closed by the server before answering: nothing was received
                conn = None
                continue
            break
        try:
            return self._response(request, key, conn, status_line)
        except TimeoutError as exc:
            conn.close()
            raise httpx2.ReadTimeout("timed out reading the response head") from exc
        except OSError as exc:
            conn.close()
            raise httpx2.ReadError(f"reading the response head failed: {exc}") from exc
        except BaseException:
            conn.close()
            raise

    @staticmethod
    def _encode(request: httpx2.Request) -> tuple[bytes, bytes | httpx2.SyncByteStream, bool]:
        """The request head, and the body as bytes (when known) or the stream to send chunked."""
        target = request.url.raw_path
        lines = [request.method.encode("ascii") + b" " + target + b" HTTP/1.1"]
        chunked = False
        for name, value in request.headers.raw:
            lines.append(name + b": " + value)
            if name.lower() == b"transfer-encoding" and value.lower() == b"chunked":
                chunked = True
        lines.append(b"\r\n")
        head = b"\r\n".join(lines)
        if head.count(b"\n") != len(lines) or head.count(b"\r") != len(lines) or b"\0" in head:
            raise httpx2.LocalProtocolError("a CR, LF or NUL in the request line or a header")
        body: bytes | httpx2.SyncByteStream
        try:
            body = request.content
        except httpx2.RequestNotRead:
            stream = request.stream
            assert isinstance(stream, httpx2.SyncByteStream)  # noqa: S101 - a sync Client's stream always is (httpx asserts it too)
            body = stream
        return head, body, chunked

    @staticmethod
    def _send(conn: _Connection, head: bytes, body: bytes | httpx2.SyncByteStream, chunked: bool,
              timeout: float | None, deadline: Deadline | None) -> None:
        sock = conn.sock

        def sendall(data: bytes) -> None:  # one sendall is bounded as a whole by its timeout
            conn.receiver.settimeout(_wait_for(timeout, deadline))
            sock.sendall(data)

        try:
            if isinstance(body, bytes):
                sendall(head + body if len(body) < 1 << 20 else head)
                if len(body) >= 1 << 20:
                    sendall(body)
                return
            sendall(head)
            for part in body:
                if not part:
                    continue
                sendall(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
            if chunked:
                sendall(b"0\r\n\r\n")
        except TimeoutError as exc:
            raise _WriteTimeout() from exc
        except OSError as exc:
            raise _WriteError() from exc

    def _response(self, request: httpx2.Request, key: tuple[str, str, int], conn: _Connection,
                  status_line: bytes) -> httpx2.Response:
        readline = conn.rfile.readline
        chunked = False  # set again for each head below; here too, for mypy (it takes `chunked` as unset after the loop)
        while True:
            if not status_line.endswith(b"\n"):
                raise httpx2.RemoteProtocolError("Server disconnected without sending a response.")
            parts = status_line.split(None, 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
                raise httpx2.RemoteProtocolError(f"malformed status line {status_line[:80]!r}")
            status = int(parts[1])
            reason = parts[2].strip() if len(parts) == 3 else b""
            headers: list[tuple[bytes, bytes]] = []
            length: int | None = None
            chunked = False
            close = parts[0] == b"HTTP/1.0"
            for _ in range(_MAX_HEADERS):
                line = readline(_MAX_LINE)
                if line in (b"\r\n", b"\n"):
                    break
                if not line.endswith(b"\n"):
                    raise httpx2.RemoteProtocolError("the server closed the connection inside the response head")
                name, colon, value = line.partition(b":")
                if not colon or not name or name != name.strip():
                    raise httpx2.RemoteProtocolError(f"malformed header line {line[:80]!r}")
                value = value.strip()
                headers.append((name, value))
                lower = name.lower()
                if lower == b"content-length":
                    if not value.isdigit() or (length is not None and length != int(value)):
                        raise httpx2.RemoteProtocolError(f"bad Content-Length {value[:40]!r}")
                    length = int(value)
                elif lower == b"transfer-encoding":
                    chunked = value.lower().endswith(b"chunked")
                elif lower == b"connection":
                    tokens = value.lower()
                    if b"close" in tokens:
                        close = True
                    elif b"keep-alive" in tokens and parts[0] == b"HTTP/1.0":
                        close = False
            else:
                raise httpx2.RemoteProtocolError(f"more than {_MAX_HEADERS} header lines in the response")
            if 100 <= status < 200 and status != 101:
                status_line = readline(_MAX_LINE)  # an interim answer (100 Continue): the real one follows
                continue
            break
        if status == 101:
            raise httpx2.RemoteProtocolError("the server switched protocols (101), which this transport does not speak")
        if chunked:
            length = None
        if request.method == "HEAD" or status in _NO_BODY_STATUS:
            length, chunked = 0, False
        body = _Body(self, key, conn, length, chunked, not close)  # the socket keeps the read timeout
        return httpx2.Response(
            status,
            headers=headers,
            stream=body,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": reason, "network_stream": _NetworkStream(conn.sock)},
        )

    # -- fallback and lifecycle ----------------------------------------------------------------

    def _fallback_transport(self) -> httpx2.HTTPTransport:
        with self._lock:
            if self._fallback is None:
                with importing():
                    self._fallback = httpx2.HTTPTransport()
            return self._fallback

    def close(self) -> None:
        """Close every idle connection; connections still reading a body close when it ends."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
            fallback, self._fallback = self._fallback, None
        for conns in idle.values():  # in a forked child, its copies of the descriptors only
            for conn in conns:
                conn.close()
        if fallback is not None:
            fallback.close()

    def __del__(self) -> None:
        """A client dropped without ``close()`` closes its idle sockets (no ResourceWarning)."""
        with contextlib.suppress(Exception):
            self.close()


class _WriteTimeout(socket.timeout):
    """A timeout while sending (told apart from one while waiting for the answer)."""


class _WriteError(OSError):
    """A socket error while sending."""


def _proxy_applies(url: str) -> bool:
    """True when a proxy environment variable (``HTTP(S)_PROXY``, ``ALL_PROXY``) covers ``url``."""
    proxies = urllib.request.getproxies_environment()
    scheme, _, rest = url.partition("://")
    if not (proxies.get(scheme.lower()) or proxies.get("all")):
        return False
    host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    # CPython's own (what urllib uses on Linux), not in typeshed.
    return not urllib.request.proxy_bypass_environment(host, proxies)  # type: ignore[attr-defined]


def lean_http_client(url: str, make_client: Callable[..., httpx2.Client] | None = None) -> httpx2.Client | None:
    """An ``httpx2.Client`` with :class:`LeanTransport` for the endpoint ``url``, or None.

    None (let the SDK make its default client, which honours proxies) when ``url`` is not
    http(s) or a proxy environment variable applies to it. ``make_client`` builds the client (the SDK's ``DefaultHttpxClient``,
    which carries the SDK's default timeout, limits and redirect policy); httpx2.Client by default.
    """
    if not url.lower().startswith(("http://", "https://")) or _proxy_applies(url):
        return None
    make = make_client or httpx2.Client
    return make(transport=LeanTransport())


def sdk_request_options(timeout: float, omit: object) -> dict[str, Any]:
    """The ``options=`` of one ``sdk.post(...)``: its ``timeout``, and the SDK's per-request
    telemetry headers (:data:`SDK_REQUEST_TELEMETRY_HEADERS`) left out (``omit``: ``openai.Omit()``)."""
    return {"timeout": timeout, "headers": {name: omit for name in SDK_REQUEST_TELEMETRY_HEADERS}}


def sdk_http_options(
    url: str, make_client: Callable[..., httpx2.Client], headers: Mapping[str, str], omit: object
) -> dict[str, Any]:
    """The SDK constructor's ``http_client=`` and ``default_headers=`` for the endpoint ``url``.

    ``http_client`` is :func:`lean_http_client`'s (None: the SDK's default client).
    ``default_headers`` leaves out :data:`SDK_TELEMETRY_HEADERS` (``omit`` is the SDK's
    ``openai.Omit()``, its public way to drop a default header), then adds ``headers`` (the
    caller's, which win). The lean client keeps no client-level default headers: httpx2 merges
    them into every request with a scan per header, and the SDK sends ``Accept`` and
    ``User-Agent`` itself; the one left (``Accept-Encoding``) goes with the SDK's headers, so the
    request sent is the same.
    """
    defaults: dict[str, object] = {name: omit for name in SDK_TELEMETRY_HEADERS}
    client = lean_http_client(url, make_client)
    if client is not None:
        encoding = client.headers.get("Accept-Encoding")
        for name in list(client.headers.keys()):
            del client.headers[name]
        if encoding:
            defaults["Accept-Encoding"] = encoding
    given = {name.lower() for name in headers}  # the caller's spelling of a header wins, whatever its case
    merged: dict[str, object] = {name: value for name, value in defaults.items() if name.lower() not in given}
    merged.update(headers)
    return {"http_client": client, "default_headers": merged}
