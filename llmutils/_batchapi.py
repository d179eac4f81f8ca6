"""Half-price batches: run prepared requests through the OpenAI Batch API, with the cache as the ledger.

What one run does (:func:`run_batch_job`):

1. every request whose cache key is already in the cache is served from it and not sent;
2. requests covered by a batch recorded in the ledger and not yet collected (a run stopped by
   Ctrl-C, a crash or a reboot) resume that batch instead of being submitted again;
3. the others are written as JSONL (one line per request, ``custom_id`` = the cache key), split at
   50,000 requests / 200 MB and by model, uploaded (``purpose=batch``) and submitted; each batch and
   input file id is recorded in the ledger with the keys it covers *before* polling starts;
4. the batches are polled with capped exponential backoff (``BATCH_POLL_INTERVAL`` first, doubling up
   to ``BATCH_POLL_MAX``); errors while polling follow the retry policy, and a run that gives up still
   leaves the batch in the ledger, so the next run resumes it;
5. when a batch ends, its output and error files are read back by ``custom_id``: each answer is
   written into the cache under its key (so a later live call of the same request is a cache hit),
   each failure becomes that request's error, naming the batch.

The ledger lives in the cache store: a table ``llmutils_batches`` in the SQLite cache file (readable
with the ``sqlite3`` shell), or a hash ``llmutils:batches:v1`` (and one key per batch for its keys)
on the Redis cache server.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from ._apis.batch import MAX_FILE_BYTES, MAX_REQUESTS, LineResult, build_input_files, read_results, request_line
from ._exceptions import (
    AuthenticationError,
    BatchAPIError,
    ConfigError,
    ContentFilterError,
    InvalidRequestError,
    LLMUtilsError,
    NonTerminalError,
    QuotaExceededError,
    RateLimitError,
)
from ._http import retry_decision
from ._retry import RetryPolicy
from .cache import is_cache_url, mask_url

__all__ = [
    "AZURE_EXTRAS_SINCE",
    "FALLBACKS",
    "FILE_LIFETIME",
    "LEDGER_TABLE",
    "TERMINAL_STATUSES",
    "BatchAPI",
    "BatchJob",
    "BatchLedger",
    "BatchRun",
    "RedisLedger",
    "SQLiteLedger",
    "batch_api_for",
    "error_for_status",
    "ledger_for",
    "open_ledger",
    "run_batch_job",
    "run_items",
]

logger = logging.getLogger("llmutils")

#: Statuses after which a batch does not change any more ("canceled": some Azure samples spell it so).
TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled", "canceled"})
#: The ledger's table in the SQLite cache file.
LEDGER_TABLE = "llmutils_batches"
_META_TABLE = "llmutils_meta"  # the cache file's schema marker: the ledger only joins a real cache file
_REDIS_HASH = "llmutils:batches:v1"
_REDIS_KEYS = "llmutils:batch-keys:v1:"
_ADOPT_PAGES = 10  # pages of 100 batches searched for one created from a given input file
_FILENAME = "llmutils-batch.jsonl"
#: Seconds the uploaded and result files live (30 days, the most allowed): OpenAI's default for batch
#: files, and on Azure a set expiry lifts the limit of 500 batch files per resource to 10,000.
FILE_LIFETIME = 2_592_000
#: The first Azure api-version whose batch and file calls take ``expires_after``/``output_expires_after``
#: and ``metadata``; older ones (the GA 2024-10-21) are sent the bare request.
AZURE_EXTRAS_SINCE = "2025-03-01"


# -- the ledger ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchJob:
    """One submitted batch as the ledger records it.

    ``input_file_id`` identifies it from the upload on (``batch_id`` is None between the upload and
    the batch's creation: status ``submitting``); ``keys`` are the cache keys (custom ids) it
    covers; ``collected`` turns True once its results were read back into the cache.
    """

    input_file_id: str
    batch_id: str | None
    status: str
    keys: tuple[str, ...] = ()
    endpoint: str = ""
    server: str = ""
    model: str = ""
    created: float = 0.0
    updated: float = 0.0
    collected: bool = False
    request_count: int = 0

    def info(self) -> dict[str, Any]:
        """The job without its keys, as JSON-ready values (what ``llmutils batch-api list`` shows)."""
        values = dataclasses.asdict(self)
        values.pop("keys")
        return values


class BatchLedger(Protocol):
    """Where batch jobs are recorded: :class:`SQLiteLedger` and :class:`RedisLedger` have it."""

    location: str

    def save(self, job: BatchJob) -> None: ...

    def jobs(self, *, open_only: bool = False, with_keys: bool = False) -> list[BatchJob]: ...

    def find(self, batch_or_file_id: str) -> BatchJob | None: ...

    def close(self) -> None: ...


def _job_from(info: Mapping[str, Any], keys: Sequence[str] = ()) -> BatchJob:
    names = {f.name for f in dataclasses.fields(BatchJob)} - {"keys"}
    values = {k: v for k, v in info.items() if k in names}
    values["collected"] = bool(values.get("collected"))
    return BatchJob(keys=tuple(keys), **values)


class SQLiteLedger:
    """The ledger as a table in the SQLite cache file (``llmutils_batches``), beside the responses.

    One row per input file: ``input_file_id``, ``batch_id``, ``status``, ``collected``, ``info``
    (JSON) and ``keys`` (a JSON list of cache keys). The file must already be an llmutils cache.
    """

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 30.0) -> None:
        self.path = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
        self.location = str(self.path)
        self.busy_timeout = busy_timeout
        self._ready = False

    def __repr__(self) -> str:
        return f"SQLiteLedger({self.location!r})"

    def _connect(self) -> sqlite3.Connection:
        uri = f"file:{quote(str(self.path))}?mode=rw"
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=self.busy_timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open the cache file {self.path} to record batches: {exc}") from exc
        if not self._ready:
            try:
                tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if _META_TABLE not in tables:
                    raise ConfigError(f"{self.path} is not an llmutils cache file; batches are recorded only in one")
                conn.execute(
                    f'CREATE TABLE IF NOT EXISTS "{LEDGER_TABLE}" (input_file_id TEXT PRIMARY KEY, batch_id TEXT, '
                    "status TEXT NOT NULL, collected INTEGER NOT NULL DEFAULT 0, info TEXT NOT NULL, keys TEXT NOT NULL)"
                )
            except sqlite3.Error as exc:
                conn.close()
                raise ConfigError(f"cannot record batches in the cache file {self.path}: {exc}") from exc
            except BaseException:
                conn.close()
                raise
            self._ready = True
        return conn

    def save(self, job: BatchJob) -> None:
        """Insert or replace the row of ``job``."""
        conn = self._connect()
        try:
            conn.execute(
                f'INSERT OR REPLACE INTO "{LEDGER_TABLE}" (input_file_id, batch_id, status, collected, info, keys) '
                "VALUES (?, ?, ?, ?, ?, ?)",
                (job.input_file_id, job.batch_id, job.status, int(job.collected), json.dumps(job.info()), json.dumps(list(job.keys))),
            )
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot record batch {job.batch_id or job.input_file_id} in {self.path}: {exc}") from exc
        finally:
            conn.close()

    def jobs(self, *, open_only: bool = False, with_keys: bool = False) -> list[BatchJob]:
        """Every recorded job, newest first; ``open_only``: not collected yet."""
        if not self.path.exists():
            return []
        columns = "info, keys" if with_keys else "info, '[]'"
        where = " WHERE collected = 0" if open_only else ""
        conn = self._connect()
        try:
            rows = conn.execute(f'SELECT {columns} FROM "{LEDGER_TABLE}"{where}').fetchall()
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot read the batches recorded in {self.path}: {exc}") from exc
        finally:
            conn.close()
        jobs = [_job_from(json.loads(info), json.loads(keys)) for info, keys in rows]
        return sorted(jobs, key=lambda j: j.created, reverse=True)

    def find(self, batch_or_file_id: str) -> BatchJob | None:
        """The job with this batch id or input file id (keys included), or None."""
        if not self.path.exists():
            return None
        conn = self._connect()
        try:
            row = conn.execute(
                f'SELECT info, keys FROM "{LEDGER_TABLE}" WHERE batch_id = ? OR input_file_id = ?',
                (batch_or_file_id, batch_or_file_id),
            ).fetchone()
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot read the batches recorded in {self.path}: {exc}") from exc
        finally:
            conn.close()
        return None if row is None else _job_from(json.loads(row[0]), json.loads(row[1]))

    def close(self) -> None:
        """Nothing stays open between calls."""


class RedisLedger:
    """The ledger on the Redis cache server: a hash ``llmutils:batches:v1`` (input file id -> job info
    as JSON) and a key ``llmutils:batch-keys:v1:<input file id>`` per job holding its keys (a JSON list).
    """

    def __init__(self, url: str, *, socket_timeout: float = 5.0) -> None:
        try:
            import redis
        except ImportError:
            raise ConfigError("the cache is on Redis, which needs redis-py: pip install 'llmutils[redis]'") from None
        self._errors: type[Exception] = redis.RedisError
        self.location = mask_url(url)
        try:
            self._redis = redis.Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"cache URL {self.location!r} is not a valid Redis URL") from exc

    def __repr__(self) -> str:
        return f"RedisLedger({self.location!r})"

    def _fail(self, doing: str, exc: Exception) -> ConfigError:
        return ConfigError(f"cannot {doing} on the Redis cache at {self.location}: {type(exc).__name__}")

    def save(self, job: BatchJob) -> None:
        """Write the job's info and keys."""
        try:
            pipe = self._redis.pipeline(transaction=True)
            pipe.set(_REDIS_KEYS + job.input_file_id, json.dumps(list(job.keys)))
            pipe.hset(_REDIS_HASH, job.input_file_id, json.dumps(job.info()))
            pipe.execute()
        except self._errors as exc:
            raise self._fail(f"record batch {job.batch_id or job.input_file_id}", exc) from exc

    def jobs(self, *, open_only: bool = False, with_keys: bool = False) -> list[BatchJob]:
        """Every recorded job, newest first; ``open_only``: not collected yet."""
        try:
            infos = [json.loads(v) for v in self._redis.hgetall(_REDIS_HASH).values()]
            if open_only:
                infos = [i for i in infos if not i.get("collected")]
            keys: list[Any] = [None] * len(infos)
            if with_keys and infos:
                keys = self._redis.mget([_REDIS_KEYS + i["input_file_id"] for i in infos])
        except self._errors as exc:
            raise self._fail("read the recorded batches", exc) from exc
        jobs = [_job_from(info, json.loads(k) if k else ()) for info, k in zip(infos, keys, strict=True)]
        return sorted(jobs, key=lambda j: j.created, reverse=True)

    def find(self, batch_or_file_id: str) -> BatchJob | None:
        """The job with this batch id or input file id (keys included), or None."""
        for job in self.jobs():
            if batch_or_file_id in (job.batch_id, job.input_file_id):
                try:
                    raw = self._redis.get(_REDIS_KEYS + job.input_file_id)
                except self._errors as exc:
                    raise self._fail("read the recorded batches", exc) from exc
                return dataclasses.replace(job, keys=tuple(json.loads(raw)) if raw else ())
        return None

    def close(self) -> None:
        """Release the connections."""
        self._redis.close()


def open_ledger(location: str | os.PathLike[str]) -> BatchLedger:
    """The ledger in the cache store at ``location`` (what ``CACHE_URL`` or ``CACHE_FILE_NAME`` names).

    ``redis://``, ``rediss://`` and ``unix://`` give a :class:`RedisLedger`; ``sqlite:///file`` or a
    plain path a :class:`SQLiteLedger` in that cache file.
    """
    text = os.fspath(location)
    scheme = text.split("://", 1)[0].lower() if is_cache_url(text) else ""
    if scheme in ("redis", "rediss", "unix"):
        return RedisLedger(text)
    if scheme == "sqlite":
        return SQLiteLedger(text[len("sqlite:///") :])
    if scheme:
        raise ConfigError(f"batches cannot be recorded in a cache at {mask_url(text)!r}: unknown scheme {scheme!r}")
    return SQLiteLedger(text)


# -- the endpoints ----------------------------------------------------------------------------------


def error_for_status(
    status: int,
    detail: str,
    *,
    code: str | None = None,
    request_id: str | None = None,
    retry_after: float | None = None,
    retryable: bool | None = None,
) -> LLMUtilsError:
    """The typed error for an HTTP failure, by the same rules as live calls (401/403, 429, 5xx...).

    ``retry_after`` and ``retryable`` (of a 408, 409, 429 or 5xx) come from the answer's headers by
    openai-python's rules (:func:`llmutils._http.retry_decision`); ``retryable`` None keeps the error
    class's default (retried).
    """
    context: dict[str, Any] = {"status_code": status, "request_id": request_id}
    if status in (401, 403):
        return AuthenticationError(f"Authentication failed ({detail})", **context)
    if status == 429:
        if code == "insufficient_quota":
            return QuotaExceededError(f"Quota exhausted; waiting will not help ({detail})", **context)
        return RateLimitError(detail, retry_after=retry_after, retryable=retryable, **context)
    if status in (408, 409) or status >= 500:
        return NonTerminalError(detail, retry_after=retry_after, retryable=retryable, **context)
    if code == "content_filter":
        return ContentFilterError(f"Refused by the content filter ({detail})", **context)
    return InvalidRequestError(detail, **context)


class BatchAPI:
    """The files and batches endpoints of one server, through an ``openai.OpenAI`` / ``AzureOpenAI`` client.

    Every call goes through the SDK (same auth, Azure routing) with the retry ``policy``; the SDK's
    exceptions become llmutils' typed errors. ``where`` names the server in messages.

    >>> api = BatchAPI(openai.OpenAI(base_url=srv.base_url, api_key="k", max_retries=0), where=srv.base_url)
    >>> api.retrieve("batch_abc")["status"]
    """

    def __init__(self, sdk: Any, *, where: str = "", policy: RetryPolicy | None = None) -> None:
        self.sdk = sdk
        self.where = where or str(getattr(sdk, "base_url", ""))
        self.policy = policy or RetryPolicy()
        version = (getattr(sdk, "default_query", None) or {}).get("api-version")
        self.extras = version is None or str(version) >= AZURE_EXTRAS_SINCE
        """Whether to send file expiry and batch metadata (not to Azure api-versions before 2025-03-01)."""

    def _call(self, doing: str, fn: Callable[[], Any]) -> Any:
        import openai

        def attempt(_deadline: Any) -> Any:
            try:
                return fn()
            except openai.APIStatusError as exc:
                detail = f"HTTP {exc.status_code} from {self.where} while {doing}: {exc.message}"
                # openai-python's rules, as for live calls: a refused wait is still told (Retry-After: 300).
                decision = retry_decision(exc.status_code, exc.response.headers)
                raise error_for_status(
                    exc.status_code,
                    detail,
                    code=exc.code if isinstance(exc.code, str) else None,
                    request_id=exc.request_id,
                    retry_after=decision.wait if decision.retry else decision.asked,
                    retryable=decision.retry,
                ) from exc
            except openai.APITimeoutError as exc:
                raise NonTerminalError(f"timed out while {doing} ({self.where})") from exc
            except openai.APIConnectionError as exc:
                raise NonTerminalError(f"connection error to {self.where} while {doing}: {exc.__cause__ or exc}") from exc
            except openai.OpenAIError as exc:
                raise InvalidRequestError(f"the openai SDK refused {doing}: {exc}") from exc

        return self.policy.call(attempt)

    @staticmethod
    def _dict(obj: Any) -> dict[str, Any]:
        return obj.model_dump() if hasattr(obj, "model_dump") else dict(obj)

    def upload(self, content: bytes, filename: str = _FILENAME) -> str:
        """Upload a JSONL input file (``purpose=batch``, expiring after :data:`FILE_LIFETIME`); return its file id."""
        extra: dict[str, Any] = {"expires_after": {"anchor": "created_at", "seconds": FILE_LIFETIME}} if self.extras else {}
        uploaded = self._call(
            "uploading a batch file",
            lambda: self.sdk.files.create(file=(filename, content), purpose="batch", **extra),
        )
        return str(uploaded.id)

    def create(self, input_file_id: str, endpoint: str, metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Create a batch of the uploaded file (``completion_window="24h"``), sent once.

        A create whose answer was lost (a timeout, a 5xx) may still have created the batch, so a
        retry first looks for a batch of the same input file and adopts it: never paid twice.
        """
        tries = 0

        def attempt() -> Any:
            nonlocal tries
            tries += 1
            if tries > 1:
                found = self.find_by_input_file(input_file_id)
                if found is not None:
                    logger.info("batch %s of file %s was created after all; using it", found["id"], input_file_id)
                    return found
            extra: dict[str, Any] = {}
            if self.extras:
                extra["output_expires_after"] = {"anchor": "created_at", "seconds": FILE_LIFETIME}
                if metadata:
                    extra["metadata"] = dict(metadata)
            return self.sdk.batches.create(input_file_id=input_file_id, endpoint=endpoint, completion_window="24h", **extra)

        return self._dict(self._call(f"creating a batch of file {input_file_id}", attempt))

    def retrieve(self, batch_id: str) -> dict[str, Any]:
        """The batch object now."""
        return self._dict(self._call(f"polling batch {batch_id}", lambda: self.sdk.batches.retrieve(batch_id)))

    def cancel(self, batch_id: str) -> dict[str, Any]:
        """Ask the server to cancel a batch (it goes ``cancelling``, then ``cancelled``)."""
        return self._dict(self._call(f"cancelling batch {batch_id}", lambda: self.sdk.batches.cancel(batch_id)))

    def list(self, *, limit: int = 20, after: str | None = None) -> tuple[list[dict[str, Any]], bool]:
        """One page of batches, newest first, and whether there are more."""
        kwargs: dict[str, Any] = {"limit": limit}
        if after:
            kwargs["after"] = after
        page = self._call("listing batches", lambda: self.sdk.batches.list(**kwargs))
        return [self._dict(b) for b in page.data], bool(getattr(page, "has_more", False))

    def content(self, file_id: str) -> bytes:
        """The bytes of a file (a batch's output or error file)."""
        return bytes(self._call(f"downloading file {file_id}", lambda: self.sdk.files.content(file_id)).content)

    def find_by_input_file(self, input_file_id: str) -> dict[str, Any] | None:
        """The newest batch created from ``input_file_id`` among the last pages of batches, or None."""
        after = None
        for _ in range(_ADOPT_PAGES):
            kwargs: dict[str, Any] = {"limit": 100}
            if after:
                kwargs["after"] = after
            page = self._call("looking for a batch of file " + input_file_id, functools.partial(self.sdk.batches.list, **kwargs))
            for batch in page.data:
                if batch.input_file_id == input_file_id:
                    return self._dict(batch)
            if not page.data or not getattr(page, "has_more", False):
                return None
            after = page.data[-1].id
        return None


# -- one run --------------------------------------------------------------------------------------


@dataclass
class BatchRun:
    """What :func:`run_batch_job` did: per cache key an answer (``answers``, billed now through a
    batch; ``cached``, already in the cache) or an error, and the batches involved."""

    answers: dict[str, dict[str, Any]] = field(default_factory=dict)
    cached: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, LLMUtilsError] = field(default_factory=dict)
    submitted: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    lines_submitted: int = 0


class _Bar:
    """A tqdm bar over the requests of the batches being polled, with their statuses; or nothing."""

    def __init__(self, enabled: bool) -> None:
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=0, desc="batch-api", unit="req", file=sys.stderr, dynamic_ncols=True)

    def show(self, done: int, total: int, statuses: Mapping[str, str]) -> None:
        if self._bar is None:
            return
        self._bar.total = total
        self._bar.n = done
        self._bar.set_postfix_str(" ".join(f"{b}={s}" for b, s in statuses.items()), refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _counts(obj: Mapping[str, Any]) -> tuple[int, int]:
    counts = obj.get("request_counts") or {}
    done = int(counts.get("completed") or 0) + int(counts.get("failed") or 0)
    return done, int(counts.get("total") or 0)


def _batch_errors(obj: Mapping[str, Any]) -> str:
    errors = obj.get("errors") or {}
    data = errors.get("data") if isinstance(errors, Mapping) else None
    texts = []
    for error in data or []:
        if isinstance(error, Mapping):
            line = f" (line {error['line']})" if error.get("line") is not None else ""
            texts.append(f"{error.get('code')}: {error.get('message')}{line}")
    return "; ".join(texts[:5]) + (f"; and {len(texts) - 5} more" if len(texts) > 5 else "")


def _with_message(exc: LLMUtilsError, message: str) -> LLMUtilsError:
    """A copy of ``exc`` (same type and context) with another message."""
    new = copy.copy(exc)
    new.message = message
    new.args = (message,)
    return new


def _line_error(batch_id: str, status: str, line: LineResult | None, obj: Mapping[str, Any]) -> LLMUtilsError:
    """The error of one request a batch did not answer."""
    if line is not None and line.status_code is not None and line.status_code != 200:
        detail = f"batch {batch_id}: HTTP {line.status_code}: {line.error_message or 'no message'}"
        return error_for_status(line.status_code, detail, code=line.error_code, request_id=line.request_id)
    if line is not None and line.status_code == 200:
        return NonTerminalError(f"batch {batch_id}: the answer to this request is not a JSON object", request_id=line.request_id)
    if line is not None and line.error_code:
        return BatchAPIError(f"batch {batch_id} ({status}): {line.error_code}: {line.error_message}", batch_id=batch_id)
    if status == "failed":
        reason = _batch_errors(obj) or "no reason given"
        return BatchAPIError(f"batch {batch_id} failed: {reason}", batch_id=batch_id)
    return BatchAPIError(f"batch {batch_id} ended {status!r} without an answer to this request", batch_id=batch_id)


def run_batch_job(
    requests: Iterable[tuple[str, Mapping[str, Any]]],
    *,
    api: BatchAPI,
    cache: Any,
    ledger: BatchLedger,
    url: str,
    check: Callable[[dict[str, Any]], None] | None = None,
    on_answer: Callable[[str, dict[str, Any]], None] | None = None,
    poll_interval: float = 5.0,
    poll_max: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
    progress: bool = False,
    max_requests: int = MAX_REQUESTS,
    max_bytes: int = MAX_FILE_BYTES,
    metadata: Mapping[str, str] | None = None,
) -> BatchRun:
    """Answer ``(cache key, request body)`` pairs through the Batch API; see the module docstring.

    ``cache`` is a cache backend (``get``/``set``, mode ``readwrite`` or ``refresh``); ``ledger``
    records the batches; ``url`` is the lines' URL and the batch endpoint (``/v1/chat/completions``;
    ``/chat/completions`` on Azure's api-version paths). ``check(body)`` may raise an
    :class:`LLMUtilsError` to refuse an answer (it is then that request's error, and not cached);
    ``on_answer(key, body)`` is called for every answer read from a batch (usage accounting).
    ``sleep`` waits between polls (tests record the waits). A run-level failure (the upload or the
    creation refused, polling given up) raises; per-request failures are in ``BatchRun.errors``.
    """
    if cache is None:
        raise ConfigError("the Batch API path needs the cache on: set CACHE_API_CALLS = true (the cache is its ledger)")
    if cache.mode not in ("readwrite", "refresh"):
        raise ConfigError(
            f"the Batch API path writes its results into the cache, so CACHE_MODE must be readwrite or refresh, not {cache.mode!r}"
        )
    if not (poll_interval > 0 and poll_max > 0):
        raise ConfigError(f"BATCH_POLL_INTERVAL and BATCH_POLL_MAX must be > 0, got {poll_interval} and {poll_max}")
    run = BatchRun()
    bodies: dict[str, Mapping[str, Any]] = {}
    for key, body in requests:
        bodies.setdefault(key, body)
    pending: list[str] = []
    for key in bodies:
        hit = cache.get(key) if cache.mode != "refresh" else None
        if hit is not None:
            run.cached[key] = hit
        else:
            pending.append(key)
    if cache.disabled:
        raise ConfigError(
            f"the cache at {cache.path} cannot be used now (see the warning above), and the Batch API path needs it "
            "to record its batches and results; fix it or send live"
        )
    if not pending:
        return run
    wanted = set(pending)
    bar = _Bar(progress)
    try:
        active: dict[str, tuple[BatchJob, dict[str, Any]]] = {}
        covered: set[str] = set()
        for job in ledger.jobs(open_only=True, with_keys=True):
            if not wanted.intersection(job.keys):
                continue
            resumed = _resume(job, api, ledger, url)
            if resumed is not None:
                assert resumed[0].batch_id is not None  # noqa: S101 - a resumed job has its batch (for mypy)
                run.resumed.append(resumed[0].batch_id)
                active[resumed[0].batch_id] = resumed
                covered.update(job.keys)
        to_send = []
        for key in pending:
            if key in covered:
                continue
            try:
                size = len(request_line(key, url, bodies[key]))
            except InvalidRequestError as exc:
                run.errors[key] = exc
                continue
            if size > max_bytes:
                run.errors[key] = BatchAPIError(
                    f"this request is {size} bytes, more than one batch file may hold ({max_bytes}); send it live"
                )
                continue
            to_send.append(key)
        for spec in build_input_files(((k, bodies[k]) for k in to_send), url, max_requests=max_requests, max_bytes=max_bytes):
            job, obj = _submit(spec.content, spec.keys, spec.model, api, ledger, url, metadata)
            assert job.batch_id is not None  # noqa: S101 - _submit records the batch it created (for mypy)
            run.submitted.append(job.batch_id)
            run.lines_submitted += len(spec.keys)
            active[job.batch_id] = (job, obj)
        wait = poll_interval
        while active:
            for batch_id, (job, _) in list(active.items()):
                try:
                    obj = api.retrieve(batch_id)
                except LLMUtilsError as exc:
                    hint = f"batch {batch_id} is still recorded in {ledger.location}; run the same command again to resume it"
                    raise _with_message(exc, f"{exc} -- {hint}") from exc
                status = str(obj.get("status"))
                if status != job.status:
                    job = dataclasses.replace(job, status=status, updated=time.time())
                    ledger.save(job)
                active[batch_id] = (job, obj)
                if status in TERMINAL_STATUSES:
                    _collect(job, obj, api, cache, ledger, run, wanted, check, on_answer)
                    del active[batch_id]
            done = total = 0
            for _, obj in active.values():
                d, t = _counts(obj)
                done, total = done + d, total + t
            bar.show(done, total, {b: str(o.get("status")) for b, (_, o) in active.items()})
            if active:
                sleep(wait)
                wait = min(wait * 2, poll_max)
    finally:
        bar.close()
    for key in pending:
        if key not in run.answers and key not in run.errors:
            run.errors[key] = BatchAPIError("no batch answered this request (its batch is gone from the ledger)")
    return run


def _resume(job: BatchJob, api: BatchAPI, ledger: BatchLedger, url: str) -> tuple[BatchJob, dict[str, Any]] | None:
    """A job found open in the ledger, with its batch now; None when the server no longer knows it.

    A job still ``submitting`` (the process stopped between the upload and the creation) adopts the
    batch created from its file, or creates it. A batch or file the server does not know (deleted,
    another account) is marked ``lost`` and its requests are sent anew.
    """
    try:
        if job.batch_id is None:
            found = api.find_by_input_file(job.input_file_id) or api.create(job.input_file_id, job.endpoint or url)
            job = dataclasses.replace(job, batch_id=str(found["id"]), status=str(found.get("status")), updated=time.time())
            ledger.save(job)
            obj = found
        else:
            obj = api.retrieve(job.batch_id)
    except InvalidRequestError as exc:
        if isinstance(exc, AuthenticationError) or exc.status_code not in (400, 404):
            raise
        logger.warning(
            "batch %s (file %s) cannot be resumed (%s); its requests are sent anew",
            job.batch_id, job.input_file_id, exc,
        )
        ledger.save(dataclasses.replace(job, status="lost", collected=True, updated=time.time()))
        return None
    logger.info("resuming batch %s (%d requests, status %s)", job.batch_id, len(job.keys), obj.get("status"))
    return job, obj


def _submit(
    content: bytes,
    keys: Sequence[str],
    model: str,
    api: BatchAPI,
    ledger: BatchLedger,
    url: str,
    metadata: Mapping[str, str] | None,
) -> tuple[BatchJob, dict[str, Any]]:
    """Upload one input file and create its batch, recording the job before and after the creation."""
    file_id = api.upload(content)
    now = time.time()
    job = BatchJob(
        input_file_id=file_id,
        batch_id=None,
        status="submitting",
        keys=tuple(keys),
        endpoint=url,
        server=api.where,
        model=model,
        created=now,
        updated=now,
        request_count=len(keys),
    )
    ledger.save(job)
    obj = api.create(file_id, url, {"created_by": "llmutils", **(metadata or {})})
    job = dataclasses.replace(job, batch_id=str(obj["id"]), status=str(obj.get("status")), updated=time.time())
    ledger.save(job)
    logger.info(
        "submitted batch %s (%d requests, file %s); if this run stops, run it again to resume the batch",
        job.batch_id, len(keys), file_id,
    )
    return job, obj


def _collect(
    job: BatchJob,
    obj: Mapping[str, Any],
    api: BatchAPI,
    cache: Any,
    ledger: BatchLedger,
    run: BatchRun,
    wanted: set[str],
    check: Callable[[dict[str, Any]], None] | None,
    on_answer: Callable[[str, dict[str, Any]], None] | None,
) -> None:
    """Read a finished batch's files: answers into the cache, failures into errors; mark it collected."""
    batch_id = str(job.batch_id)
    status = str(obj.get("status"))
    files = [api.content(str(fid)) for fid in (obj.get("output_file_id"), obj.get("error_file_id")) if fid]
    results = read_results(*files)
    answered = failed = 0
    for key in job.keys:
        line = results.get(key)
        error: LLMUtilsError | None = None
        if line is not None and line.ok:
            body: dict[str, Any] = line.body
            try:
                if check is not None:
                    check(body)
            except LLMUtilsError as exc:
                error = _with_message(exc, f"batch {batch_id}: {exc}")
                error.request_id = error.request_id or line.request_id
            else:
                cache.set(key, body)
                answered += 1
                if on_answer is not None:
                    on_answer(key, body)
                if key in wanted:
                    run.answers[key] = body
                continue
        else:
            error = _line_error(batch_id, status, line, obj)
        failed += 1
        if key in wanted:
            run.errors[key] = error
    logger.info("batch %s %s: %d answered, %d not", batch_id, status, answered, failed)
    # Collected: its answers are in the cache, so its keys are no longer needed to resume it.
    ledger.save(dataclasses.replace(job, keys=(), status=status, collected=True, updated=time.time()))


# -- batch(..., via="batch-api") -----------------------------------------------------------------------

# send_message's arguments that shape the request body (the rest of **params goes to the API as is).
_NAMED_CHAT_ARGS = ("model", "temperature", "max_tokens", "top_p", "frequency_penalty", "presence_penalty", "stop", "n")
# send_message's arguments that only say how to send; the Batch API has no use for them.
_TRANSPORT_ARGS = ("timeout", "total_timeout", "max_attempts", "waiting_time", "exponential_backoff_factor")
_ARG_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "temperature": (int, float),
    "max_tokens": (int,),
    "top_p": (int, float),
    "frequency_penalty": (int, float),
    "presence_penalty": (int, float),
    "stop": (str, list),
    "n": (int,),
}
FALLBACKS = (None, "live")


@dataclass(frozen=True)
class _ClientParts:
    """What the Batch API path needs of an llmutils client, gathered in one place."""

    settings: Mapping[str, Any]
    cache: Any
    location: str
    api: BatchAPI
    url: str


def _client_parts(client: Any, api: str = "chat") -> _ClientParts:
    """The settings, the cache, the ledger location, the files/batches endpoints and the lines' URL
    of ``client`` for ``api`` (chat or responses), or a ConfigError when it cannot use the Batch API.

    Everything comes through the client's public seams (:meth:`~llmutils.OpenAIClient.sdk_client`,
    :meth:`~llmutils.OpenAIClient.retry_policy`, :meth:`~llmutils.OpenAIClient.cache_backend`,
    :meth:`~llmutils.OpenAIClient.endpoint_url`); the lines themselves are built and keyed by
    :meth:`~llmutils.OpenAIClient.build_request`, exactly as ``send_message`` would send them.
    """
    from ._apis import chat, responses
    from ._apis.batch import batch_url

    if getattr(client, "api_type", None) not in ("openai", "azure") or not hasattr(client, "sdk_client"):
        raise ConfigError(
            f"the Batch API path needs an OpenAI or Azure OpenAI client, not {type(client).__name__} "
            f"(api_type {getattr(client, 'api_type', None)!r}); use via='live' for other backends"
        )
    settings = client.settings()
    cache, location = _cache_and_location(client, settings)
    path, kind = (responses.PATH, responses.KIND) if api == "responses" else (chat.PATH, chat.KIND)
    sdk = client.sdk_client(path)
    # Azure's api-version paths spell the line URL without /v1; its /openai/v1 path (Responses) with it.
    azure_style = "api-version" in (getattr(sdk, "default_query", None) or {})
    url = batch_url(kind, azure=azure_style)
    api_endpoints = BatchAPI(sdk, where=client.endpoint_url(), policy=client.retry_policy())
    return _ClientParts(settings, cache, location, api_endpoints, url)


def _which_api(settings: Mapping[str, Any], model: str, api: str | None) -> str:
    """The API a request goes to, by ``send_message``'s rule: ``api``, the ``API`` setting, ``RESPONSES_MODELS``."""
    from ._apis.responses import is_responses_model

    if api is not None:
        return api
    if settings.get("API") is not None:
        return str(settings["API"])
    name = settings["MODEL_ALIASES"].get(model, model)
    return "responses" if is_responses_model(name, settings.get("RESPONSES_MODELS") or ()) else "chat"


def _cache_and_location(client: Any, settings: Mapping[str, Any]) -> tuple[Any, str]:
    """The client's cache and where its ledger is (``settings``: the client's, for the cache's
    location), or a ConfigError when the cache is off."""
    cache = client.cache_backend()
    if cache is None:
        raise ConfigError(
            "the Batch API path needs the cache on (it is where batches are recorded and results land): "
            "set CACHE_API_CALLS = true, pass cache_api_calls=True, or use --cache"
        )
    location = settings["CACHE_URL"] or settings["CACHE_FILE_NAME"]
    if not is_cache_url(location) or location.lower().startswith("sqlite:"):
        location = str(cache.path)
    return cache, location


def ledger_for(client: Any) -> BatchLedger:
    """The ledger in ``client``'s cache store, without touching the network (``llmutils batch-api list``)."""
    return open_ledger(_cache_and_location(client, client.settings())[1])


def batch_api_for(client: Any) -> tuple[BatchAPI, BatchLedger]:
    """The Batch API endpoints and the ledger of ``client`` (for ``llmutils batch-api list|status|cancel``)."""
    parts = _client_parts(client)
    return parts.api, open_ledger(parts.location)


def run_items(
    items: Sequence[Any],
    messages: Sequence[list[dict[str, Any]] | LLMUtilsError],
    *,
    client: Any,
    fallback: str | None = None,
    live: Callable[[Any], Any] | None = None,
    workers: int = 8,
    progress: bool = False,
    on_result: Callable[[Any], None] | None = None,
    max_connection_failures: int | None = 5,
    sleep: Callable[[float], None] = time.sleep,
    max_requests: int = MAX_REQUESTS,
    max_bytes: int = MAX_FILE_BYTES,
    **params: Any,
) -> list[Any]:
    """The Batch API side of :func:`~llmutils.batch`: one :class:`~llmutils.BatchResult` per item, in order.

    ``messages[i]`` is item i's messages (or the error that rendering them raised). Each request is
    built and keyed exactly as :meth:`~llmutils.OpenAIClient.send_message` would, so answers are
    cache hits for later live calls. ``fallback="live"`` sends the items the Batch API did not
    answer (the batch failed, expired or was cancelled; a retryable line error) through ``live``,
    on ``workers`` threads with the live path's fail-fast rule (``max_connection_failures``).
    ``on_result`` is called for every result, in input order, at the end.
    """
    from ._apis.chat import check_chat_response, read_chat_response
    from ._apis.responses import check_response, normalize_usage, to_chat_message
    from ._batch import BatchResult, map_calls

    if fallback not in FALLBACKS:
        raise ConfigError(f"fallback must be None or 'live', got {fallback!r}")
    if fallback == "live" and live is None:
        raise ConfigError("fallback='live' needs a live sender")
    if params.get("stream"):
        raise InvalidRequestError("stream=True is not supported by the Batch API; it returns whole answers")
    for name, kinds in _ARG_TYPES.items():
        value = params.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
            raise InvalidRequestError(f"{name} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r:.60}")
    if params.get("n", 1) < 1:
        raise InvalidRequestError(f"n must be an int >= 1, got {params['n']!r}")
    api = params.pop("api", None)
    if api not in (None, "chat", "responses"):
        raise InvalidRequestError(f"api must be 'chat' or 'responses', got {api!r:.60}")
    settings = client.settings()
    which = _which_api(settings, params.get("model") or settings["MODEL"], api)
    parts = _client_parts(client, which)
    named = {k: params[k] for k in _NAMED_CHAT_ARGS if k in params}
    more = {k: v for k, v in params.items() if k not in _NAMED_CHAT_ARGS and k not in _TRANSPORT_ARGS}
    n = named.get("n", 1)
    stop = named.get("stop")
    check: Callable[[dict[str, Any]], None]
    read: Callable[[dict[str, Any]], Any]
    if which == "responses":

        def check(body: dict[str, Any]) -> None:
            check_response(body, message=True)

        def read(body: dict[str, Any]) -> Any:
            check(body)
            return to_chat_message(body, stop=stop)

    else:
        check = check_chat_response

        def read(body: dict[str, Any]) -> Any:
            return read_chat_response(body, n)
    results: list[Any] = [None] * len(items)
    keys: dict[int, str] = {}
    requests: list[tuple[str, Mapping[str, Any]]] = []
    for index, (item, msgs) in enumerate(zip(items, messages, strict=True)):
        if isinstance(msgs, LLMUtilsError):
            results[index] = BatchResult(index, item, error=msgs)
            continue
        try:
            request = client.build_request(msgs, api=which, **named, **more)  # send_message's body and key
        except LLMUtilsError as exc:
            results[index] = BatchResult(index, item, error=exc)
            continue
        keys[index] = request.cache_key
        requests.append((request.cache_key, request.body))

    def record_usage(_key: str, body: dict[str, Any]) -> None:
        client.usage.record(str(body.get("model")), body.get("usage"), cached=False, batch=True)

    run = run_batch_job(
        requests,
        api=parts.api,
        cache=parts.cache,
        ledger=open_ledger(parts.location),
        url=parts.url,
        check=check,
        on_answer=record_usage,
        poll_interval=float(parts.settings["BATCH_POLL_INTERVAL"]),
        poll_max=float(parts.settings["BATCH_POLL_MAX"]),
        sleep=sleep,
        progress=progress,
        max_requests=max_requests,
        max_bytes=max_bytes,
    )
    retry_live: list[int] = []
    for index, key in keys.items():
        item = items[index]
        response = run.cached.get(key)
        cached = response is not None
        if response is None:
            response = run.answers.get(key)
        if response is not None:
            try:
                output = read(response)
            except LLMUtilsError as exc:
                results[index] = BatchResult(index, item, error=exc)
                continue
            if cached:
                client.usage.record(str(response.get("model")), response.get("usage"), cached=True)
            results[index] = BatchResult(index, item, output=output, cached=cached, usage=normalize_usage(response.get("usage")))
            continue
        error = run.errors.get(key) or BatchAPIError("the Batch API gave no answer to this request")
        if fallback == "live" and isinstance(error, (BatchAPIError, NonTerminalError)):
            retry_live.append(index)
        else:
            results[index] = BatchResult(index, item, error=error)
    if retry_live:
        assert live is not None  # noqa: S101 - fallback="live" comes with a live client (for mypy)
        logger.info("sending %d requests the Batch API did not answer as live calls", len(retry_live))
        sent = map_calls(
            live,
            [items[i] for i in retry_live],
            workers=workers,
            client=client,
            progress=progress,
            desc="live",
            max_connection_failures=max_connection_failures,
        )
        for offset, result in enumerate(sent):
            index = retry_live[offset]
            results[index] = dataclasses.replace(result, index=index)
    if on_result is not None:
        for result in results:
            on_result(result)
    return results
