"""The ``llmutils`` command: chat, batch over JSONL, render templates, count tokens, manage the cache.

Runs offline on the ``mock`` backend when no API key, base URL or API type is configured::

    llmutils batch examples/prompts.jsonl out.jsonl --template summarize
    llmutils chat "Say hello"
    llmutils --help

Exit codes: 0 success; 1 a runtime error, or (``batch``) at least one item failed; 2 a usage
error; 130 interrupted (Ctrl-C, at any moment). Errors are one line on stderr,
``llmutils: error: ...``; ``-v`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import IO, Any, NoReturn

from . import _config
from ._batch import DEFAULT_MAX_CONNECTION_FAILURES
from ._exceptions import ConfigError, LLMUtilsError

__all__ = ["build_parser", "main", "run"]

logger = logging.getLogger("llmutils")

PROG = "llmutils"
API_TYPES = ("openai", "azure", "mock")
_OPENAI_KEY_VARS = ("OPENAI_API_KEY",)
_AZURE_KEY_VARS = ("AZURE_OPENAI_API_KEY", "AZURE_OPENAI_KEY")
_OFFLINE_NOTICE = (
    "llmutils: no API key, base URL or API type configured; running offline on the mock backend "
    "(answers are echoes). For real answers set OPENAI_API_KEY, or pass --base-url URL "
    "(any OpenAI-compatible server) or --api-type openai|azure."
)


_ARGUMENT_PREFIX = re.compile(r"^argument (-[^/:\s]+)(?:/[^:\s]+)*: ")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line: ``llmutils: error: ... (see --help)``.

    A bad option value names the option first: ``--rpm: must be > 0, got -5``.
    """

    def error(self, message: str) -> NoReturn:
        message = _ARGUMENT_PREFIX.sub(r"\1: ", message)
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def _number(kind: Callable[[str], float], text: str, rule: str) -> float:
    """Parse ``text`` as ``kind``; a value that does not parse is reported with the option's rule."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
    return value


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum`` (the error says ``must be >= N, got X``)."""

    def parse(text: str) -> int:
        value = int(_number(int, text, f"an integer >= {minimum}"))
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    """An argparse type: a number > 0."""
    value = _number(float, text, "a number > 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    """An argparse type: a number >= 0."""
    value = _number(float, text, "a number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _fail(message: str) -> NoReturn:
    """Stop the command with a one-line runtime error (exit code 1)."""
    raise SystemExit(_one_line_error(message))


def _one_line_error(message: str) -> int:
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 1


# -- options -------------------------------------------------------------------------------------


def _add_common(parser: argparse.ArgumentParser, *, connection: bool, cache: bool | str, model: bool) -> None:
    """Add the shared options (``cache``: True for all cache options, "file" for --cache-file only); absent ones stay unset."""
    s = argparse.SUPPRESS
    group = parser.add_argument_group("common options")
    if connection:
        group.add_argument(
            "--api-type",
            choices=API_TYPES,
            default=s,
            help="backend to call (default: the configured API_TYPE; 'azure' when only an Azure endpoint "
            "or key is set; 'mock' when no API key, base URL, Azure endpoint or API type is configured)",
        )
        group.add_argument(
            "--base-url", metavar="URL", default=s, help="an OpenAI-compatible endpoint, e.g. http://localhost:11434/v1"
        )
    if model:
        group.add_argument(
            "--model", metavar="NAME", default=s, help="model (Azure: deployment) name; default: the configured MODEL"
        )
    if cache is True:
        group.add_argument(
            "--cache",
            action=argparse.BooleanOptionalAction,
            default=s,
            help="cache answers in a SQLite file (default: on for 'batch', the configured CACHE_API_CALLS otherwise)",
        )
    if cache:
        group.add_argument(
            "--cache-file",
            metavar="PATH",
            default=s,
            help="cache file (default: the configured CACHE_FILE_NAME, ./llmutils_cache.sqlite)",
        )
        group.add_argument(
            "--cache-url",
            metavar="URL",
            default=s,
            help="shared cache instead of the file, e.g. redis://:PASSWORD@host:6379/0 (default: the configured CACHE_URL)",
        )
    if cache is True:
        group.add_argument(
            "--cache-mode",
            choices=("readwrite", "readonly", "replay", "refresh", "off"),
            default=s,
            help="readwrite (default), readonly, replay (fail on a miss, never send), refresh (send and overwrite), off",
        )
    group.add_argument("-v", "--verbose", action="count", default=s, help="log to stderr: -v INFO, -vv DEBUG; show tracebacks")


def _add_template_options(parser: argparse.ArgumentParser, *, user_default: str | None) -> None:
    default = f" (default: {user_default}, which sends the 'prompt' variable)" if user_default else ""
    parser.add_argument("--template", "-t", metavar="NAME", help=f"user-message template, e.g. summarize, classify{default}")
    parser.add_argument("--system-template", metavar="NAME", help="system-message template, e.g. system_default (default: none)")
    parser.add_argument("--template-dir", metavar="DIR", action="append", help="search DIR for templates first (repeatable)")


def _add_var_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--var",
        metavar="K=V",
        action="append",
        default=[],
        help="template variable: K=V is text, K:=JSON is a JSON value (numbers, lists); repeatable",
    )


def _add_model_params(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--temperature", type=_non_negative_float, help="sampling temperature")
    parser.add_argument("--max-tokens", type=_int_at_least(1), metavar="N", help="maximum output tokens")
    parser.add_argument(
        "--api", choices=("chat", "responses"), help="the endpoint: chat completions or the Responses API; default: the configured API"
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``llmutils`` command."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog=PROG,
        description=(
            "Call the OpenAI / Azure OpenAI APIs (or any OpenAI-compatible server) from the shell, "
            "with retries and a SQLite cache."
        ),
        epilog=(
            "examples:\n"
            "  llmutils batch examples/prompts.jsonl out.jsonl --template summarize\n"
            "  llmutils chat 'Write a haiku about caches'\n"
            "  llmutils chat --template summarize --var text=\"$(cat notes.txt)\" --var max_words:=30\n"
            "  llmutils render --template classify --var text=hi --var 'labels:=[\"a\",\"b\"]'\n"
            "  llmutils tokens --file notes.txt --model gpt-4o\n"
            "  llmutils cache stats\n\n"
            "Without OPENAI_API_KEY, a base URL or API_TYPE, calls go to the offline 'mock' backend.\n"
            "Exit codes: 0 ok, 1 error (batch: an item failed), 2 usage error, 130 interrupted."
        ),
        formatter_class=fmt,
    )
    _add_common(parser, connection=True, cache=True, model=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    chat = commands.add_parser(
        "chat",
        help="send one prompt and print the answer",
        description="Send one prompt (the arguments, else stdin), or a template with --var values, and print the answer.",
        epilog="examples:\n  llmutils chat 'Say hello'\n  echo 'Say hello' | llmutils chat\n"
        "  llmutils chat --template summarize --var text=\"$(cat notes.txt)\"",
        formatter_class=fmt,
    )
    chat.add_argument("prompt", nargs="*", help="the prompt (default: read stdin); with --template, sets the 'prompt' variable")
    _add_template_options(chat, user_default=None)
    _add_var_option(chat)
    _add_model_params(chat)
    chat.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="print the answer as it is generated (default); --no-stream waits for the whole answer. "
        "The text printed is the same either way, to a terminal or a pipe",
    )
    _add_common(chat, connection=True, cache=True, model=True)
    chat.set_defaults(func=_cmd_chat, parser=chat)

    batch = commands.add_parser(
        "batch",
        help="answer every line of a JSONL file, in parallel, into another JSONL file",
        description=(
            "Send one request per line of IN (JSONL) on a pool of threads and write one line per\n"
            "item to OUT, in input order. An input line is a JSON object of template variables\n"
            '(e.g. {"text": "..."} with --template summarize; {"prompt": "..."} by default), or\n'
            '{"messages": [...]} (sent as is; other keys are ignored), or a list of messages.\n'
            'An output line is {"index", "input", "output", "cached"}, or {"index", "input",\n'
            '"error": {"type", "message"}} for an item that failed; one failure never stops the rest.\n'
            "OUT is written as results arrive (in input order), so a crash or a kill loses nothing\n"
            "already written; an existing OUT is overwritten and keeps its permissions.\n\n"
            "Fail fast: after an authentication error, or after --max-connection-failures connection\n"
            "failures in a row (each failed attempt counts), nothing more is sent and the items in flight\n"
            "stop retrying; the other items are written as NotAttemptedError.\n\n"
            "The cache is ON by default here: answers are stored as they arrive, so running the\n"
            "same command again (after Ctrl-C, or to retry failed items) sends only what is missing.\n"
            "A progress bar (when stderr is a terminal) and a summary line go to stderr. Exit code 0\n"
            "when every item succeeded, 1 when any failed, 2 a usage error, 130 when interrupted\n"
            "(OUT then holds the results received so far)."
        ),
        epilog="examples:\n  llmutils batch examples/prompts.jsonl out.jsonl --template summarize\n"
        "  llmutils --base-url http://localhost:11434/v1 --model llama3.2 batch in.jsonl out.jsonl --workers 4\n"
        "  llmutils batch in.jsonl - --rpm 500 --tpm 200000 > out.jsonl\n"
        "  llmutils batch in.jsonl out.jsonl --processes 4 --workers 16\n"
        "  llmutils batch in.jsonl out.jsonl --dask-scheduler tcp://10.0.0.5:8786 --cache-url redis://10.0.0.5:6379/0",
        formatter_class=fmt,
    )
    batch.add_argument("input", metavar="IN", help="input JSONL file ('-' for stdin)")
    batch.add_argument("output", metavar="OUT", help="output JSONL file, written as results arrive ('-' for stdout)")
    batch.add_argument("--workers", "-w", type=_int_at_least(1), default=8, metavar="N", help="parallel requests (default: 8)")
    batch.add_argument("--rpm", type=_positive_float, metavar="N", help="client-side limit: requests per minute")
    batch.add_argument("--tpm", type=_positive_float, metavar="N", help="client-side limit: tokens per minute")
    batch.add_argument(
        "--max-connection-failures",
        type=_int_at_least(0),
        default=DEFAULT_MAX_CONNECTION_FAILURES,
        metavar="N",
        help=f"stop sending after N connection failures in a row (attempts, retries included) with no success "
        f"(default: {DEFAULT_MAX_CONNECTION_FAILURES}; 0: never stop)",
    )
    spread = batch.add_mutually_exclusive_group()
    spread.add_argument(
        "--processes",
        type=_int_at_least(1),
        metavar="N",
        help="run the items on N local processes (spawned), --workers threads each",
    )
    spread.add_argument(
        "--dask-scheduler",
        metavar="ADDRESS",
        help="run the items on a Dask cluster (tcp://HOST:PORT), --workers threads per task; "
        "needs pip install 'llmutils-openai[dask]' here and on the workers",
    )
    batch.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar on stderr (default: when stderr is a terminal)",
    )
    _add_template_options(batch, user_default="user_default")
    _add_model_params(batch)
    _add_common(batch, connection=True, cache=True, model=True)
    _add_via_options(batch)
    batch.set_defaults(func=_cmd_batch, parser=batch)

    render = commands.add_parser(
        "render",
        help="print the messages a template renders to, as JSON (nothing is sent)",
        description="Render --system-template and/or --template with --var values and print the messages as JSON.",
        epilog="example:\n  llmutils render --template summarize --var text='A long story.' --var max_words:=20",
        formatter_class=fmt,
    )
    _add_template_options(render, user_default=None)
    _add_var_option(render)
    _add_common(render, connection=False, cache=False, model=False)
    render.set_defaults(func=_cmd_render, parser=render)

    tokens = commands.add_parser(
        "tokens",
        help="count the tokens of a text, a file, stdin or a rendered template",
        description=(
            "Count tokens with tiktoken for --model (default: the configured MODEL). Text (arguments,\n"
            "--file or stdin) is counted as plain text; a template is counted as chat messages,\n"
            "with their per-message overhead. Says whether the count is exact or an offline estimate."
        ),
        epilog="examples:\n  llmutils tokens 'How many tokens is this?'\n  llmutils tokens --file notes.txt --model gpt-4o\n"
        "  llmutils tokens --template summarize --var text=\"$(cat notes.txt)\"",
        formatter_class=fmt,
    )
    tokens.add_argument("text", nargs="*", help="text to count (default: --file, a template, or stdin)")
    tokens.add_argument("--file", "-f", metavar="PATH", help="count the text of this file")
    _add_template_options(tokens, user_default=None)
    _add_var_option(tokens)
    _add_common(tokens, connection=False, cache=False, model=True)
    tokens.set_defaults(func=_cmd_tokens, parser=tokens)

    cache = commands.add_parser(
        "cache",
        help="inspect or maintain the cache (SQLite file or Redis)",
        description=(
            "Inspect or maintain one cache: the one named by --cache-file or --cache-url (and only that\n"
            "one), else the configured CACHE_URL when set, else the configured CACHE_FILE_NAME."
        ),
        epilog="examples:\n  llmutils cache stats\n  llmutils cache stats --cache-url redis://localhost:6379/0\n"
        "  llmutils cache copy llmutils_cache.sqlite redis://localhost:6379/0",
        formatter_class=fmt,
    )
    _add_common(cache, connection=False, cache="file", model=False)
    actions = cache.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    for name, text in (
        ("stats", "print the location, entries, size and versions of the cache"),
        ("clear", "delete every entry (the file, or other keys on the Redis server, stay)"),
        ("vacuum", "give the space of deleted entries back to the disk (SQLite only)"),
    ):
        sub = actions.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        _add_common(sub, connection=False, cache="file", model=False)
        sub.set_defaults(func=_cmd_cache, parser=sub)
    imp = actions.add_parser(
        "import-pickle",
        help="copy an old pickle cache (openai_api_cache.pickle) into the cache file",
        description=(
            "Copy an old pickle cache into the SQLite cache file. Loading a pickle runs any code it\n"
            "contains, so --trusted is required: pass it only for a file you or your program wrote."
        ),
        formatter_class=fmt,
    )
    imp.add_argument("pickle", metavar="PICKLE", help="the old cache file")
    imp.add_argument("--trusted", action="store_true", help="confirm the pickle file is your own (required)")
    _add_common(imp, connection=False, cache="file", model=False)
    imp.set_defaults(func=_cmd_cache, parser=imp)
    copy = actions.add_parser(
        "copy",
        help="copy every entry of one cache into another, e.g. a SQLite file into Redis",
        description=(
            "Copy every live entry of SRC into DEST. Each is a SQLite file path (or sqlite:///file) or a\n"
            "Redis URL (redis://[:PASSWORD@]host:6379/0, rediss://, unix://). Entries keep their JSON and\n"
            "their remaining lifetime; expired ones are skipped; entries already in DEST are overwritten.\n"
            "SRC is only read."
        ),
        epilog="example:\n  llmutils cache copy llmutils_cache.sqlite redis://:PASSWORD@cache.internal:6379/0",
        formatter_class=fmt,
    )
    copy.add_argument("source", metavar="SRC", help="the cache to read: a file path or a URL")
    copy.add_argument("dest", metavar="DEST", help="the cache to write: a Redis URL or a file path")
    _add_common(copy, connection=False, cache=False, model=False)
    copy.set_defaults(func=_cmd_cache_copy, parser=copy)
    cache.set_defaults(func=None, parser=cache)
    _add_batch_api_command(commands)
    return parser


def _add_via_options(parser: argparse.ArgumentParser) -> None:
    """``batch --via live|batch-api [--fallback live]``."""
    group = parser.add_argument_group("Batch API (half price, answers within 24 h)")
    group.add_argument(
        "--via",
        choices=("live", "batch-api"),
        default="live",
        help="live: one request per item now (default); batch-api: submit the items as OpenAI/Azure Batch API "
        "jobs at half price and wait for them (the cache must be on; a rerun resumes the same jobs)",
    )
    group.add_argument(
        "--fallback",
        choices=("live",),
        default=None,
        help="with --via batch-api: send the items the batch did not answer (expired, cancelled, failed) as live calls",
    )


def _add_batch_api_command(commands: Any) -> None:
    """``llmutils batch-api list | status ID | cancel ID``."""
    fmt = argparse.RawDescriptionHelpFormatter
    api = commands.add_parser(
        "batch-api",
        help="list, inspect or cancel the Batch API jobs that 'batch --via batch-api' submitted",
        description=(
            "The Batch API jobs are recorded in the cache (a table of the SQLite file, a hash on Redis)\n"
            "with the requests they cover, so 'batch --via batch-api' resumes them after Ctrl-C or a crash."
        ),
        epilog="examples:\n  llmutils batch-api list\n  llmutils batch-api status batch_abc123\n  llmutils batch-api cancel batch_abc123",
        formatter_class=fmt,
    )
    _add_common(api, connection=True, cache="file", model=False)
    actions = api.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    listing = actions.add_parser(
        "list", help="the recorded jobs, newest first (--remote: the server's batches)", description="List the recorded Batch API jobs."
    )
    listing.add_argument("--remote", action="store_true", help="list the server's batches instead (the last --limit)")
    listing.add_argument("--limit", type=int, default=20, metavar="N", help="with --remote: how many (1-100, default 20)")
    _add_common(listing, connection=True, cache="file", model=False)
    listing.set_defaults(func=_cmd_batch_api, parser=listing)
    for name, text in (
        ("status", "ask the server for a batch's status and request counts"),
        ("cancel", "ask the server to cancel a batch (its finished requests are kept)"),
    ):
        sub = actions.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        sub.add_argument("batch_id", metavar="ID", help="the batch id (batch_...)")
        _add_common(sub, connection=True, cache="file", model=False)
        sub.set_defaults(func=_cmd_batch_api, parser=sub)
    api.set_defaults(func=None, parser=api)


def _cmd_batch_api(args: argparse.Namespace) -> int:
    """list, status or cancel Batch API jobs."""
    from ._batchapi import batch_api_for, ledger_for

    with _client(args, cache_default=True) as client:
        local = args.action == "list" and not args.remote
        if local:
            api, ledger = None, ledger_for(client)
        else:
            api, ledger = batch_api_for(client)
        try:
            if api is None:  # local
                jobs = ledger.jobs()
                if not jobs:
                    print(f"no Batch API jobs recorded in {ledger.location}")
                for job in jobs:
                    state = "collected" if job.collected else "open"
                    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(job.created))
                    print(
                        f"{job.batch_id or job.input_file_id}  {job.status:<11} {state:<9} {job.request_count:>6} requests  "
                        f"{when}  {job.model}"
                    )
                return 0
            if args.action == "list":
                if not 1 <= args.limit <= 100:
                    args.parser.error(f"--limit must be between 1 and 100, got {args.limit}")
                batches, _more = api.list(limit=args.limit)
                for obj in batches:
                    print(_batch_line(obj))
                return 0
            obj = api.cancel(args.batch_id) if args.action == "cancel" else api.retrieve(args.batch_id)
            print(_batch_line(obj))
            for name in ("output_file_id", "error_file_id"):
                if obj.get(name):
                    print(f"  {name}: {obj[name]}")
            recorded = ledger.find(args.batch_id)
            if recorded is not None:
                state = "collected into the cache" if recorded.collected else "not collected yet: rerun the batch command to collect it"
                print(f"  recorded in {ledger.location}: {recorded.request_count} requests, {state}")
        finally:
            ledger.close()
    return 0


def _batch_line(obj: Any) -> str:
    counts = obj.get("request_counts") or {}
    done = f"{counts.get('completed', 0)}/{counts.get('total', 0)} done, {counts.get('failed', 0)} failed"
    return f"{obj.get('id')}  {obj.get('status'):<11} {done}  endpoint {obj.get('endpoint')}"


# -- settings and the client ---------------------------------------------------------------------


def _opt(args: argparse.Namespace, name: str, default: Any = None) -> Any:
    return getattr(args, name, default)


def _overrides(args: argparse.Namespace, *, cache_default: bool | None = None) -> dict[str, Any]:
    """Config values set by the command line; they win over config files and the environment."""
    values: dict[str, Any] = {}
    if _opt(args, "cache_file") is not None:
        if _opt(args, "cache_url") is not None:
            args.parser.error("--cache-file and --cache-url name two caches; give one")
        values["CACHE_URL"] = None  # a file named on the command line wins over a configured CACHE_URL
    for option, key in (
        ("base_url", "BASE_URL"),
        ("model", "MODEL"),
        ("cache_file", "CACHE_FILE_NAME"),
        ("cache_url", "CACHE_URL"),
        ("cache_mode", "CACHE_MODE"),
        ("rpm", "RPM"),
        ("tpm", "TPM"),
        ("api", "API"),
    ):
        value = _opt(args, option)
        if value is not None:
            values[key] = value
    cache = _opt(args, "cache", cache_default)
    if cache is not None:
        values["CACHE_API_CALLS"] = cache
    return values


def _api_type_configured() -> bool:
    """Whether API_TYPE was set anywhere: the environment, the config file, or in-process."""
    if os.environ.get("LLMUTILS_API_TYPE") or _config.resolve()["API_TYPE"] != _config.DEFAULTS["API_TYPE"]:
        return True
    return "API_TYPE" in _config.config_file_values()


def _choose_api_type(args: argparse.Namespace) -> str:
    """--api-type; else API_TYPE if configured, or when a base URL or OPENAI_API_KEY is set; else
    ``azure`` when an Azure endpoint or key is set; else ``mock`` (with a one-line notice)."""
    explicit = _opt(args, "api_type")
    if explicit:
        return str(explicit)
    settings = _config.resolve()
    if _api_type_configured() or settings["BASE_URL"] or _config.api_key_from_env(_OPENAI_KEY_VARS)[0]:
        return str(settings["API_TYPE"])
    if settings["AZURE_ENDPOINT"] or _config.api_key_from_env(_AZURE_KEY_VARS)[0]:
        return "azure"
    print(_OFFLINE_NOTICE, file=sys.stderr)
    return "mock"


def _new_client(api_type: str) -> Any:
    from ._clients import AzureClient, MockClient, OpenAIClient

    classes = {"openai": OpenAIClient, "azure": AzureClient, "mock": MockClient}
    if api_type not in classes:
        raise ConfigError(
            f"API_TYPE {api_type!r} is not one the command line knows; use --api-type with one of {', '.join(API_TYPES)}"
        )
    return classes[api_type]()


@contextmanager
def _client(args: argparse.Namespace, *, cache_default: bool | None = None) -> Iterator[Any]:
    """A fresh client for the chosen API type, with the command line's settings in force."""
    with _config.override_defaults(**_overrides(args, cache_default=cache_default)):
        client = _new_client(_choose_api_type(args))
        with client:
            yield client


def _model_params(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if _opt(args, "temperature") is not None:
        params["temperature"] = args.temperature
    if _opt(args, "max_tokens") is not None:
        params["max_tokens"] = args.max_tokens
    return params


# -- templates and input -------------------------------------------------------------------------


def _parse_vars(args: argparse.Namespace) -> dict[str, Any]:
    """``--var K=V`` (text) and ``--var K:=JSON`` (a JSON value) as a dict."""
    variables: dict[str, Any] = {}
    for spec in _opt(args, "var") or []:
        name, sep, value = spec.partition("=")
        if not sep or not name.rstrip(":").strip():
            args.parser.error(f"--var {spec!r}: expected K=V (text) or K:=JSON")
        if name.endswith(":"):
            name = name[:-1]
            try:
                variables[name.strip()] = json.loads(value)
            except ValueError as exc:
                args.parser.error(f"--var {spec!r}: the value after ':=' is not valid JSON ({exc})")
            except RecursionError:
                args.parser.error(f"--var {name}=...: the JSON value is nested too deeply")
        else:
            variables[name.strip()] = value
    return variables


def _has_template(args: argparse.Namespace) -> bool:
    return bool(args.template or args.system_template)


def _render(args: argparse.Namespace, variables: dict[str, Any]) -> list[dict[str, Any]]:
    from ._templates import compose_messages

    return compose_messages(args.system_template, args.template, variables, template_dirs=args.template_dir)


def _read_stdin(what: str) -> str:
    if sys.stdin is None:
        return ""
    if sys.stdin.isatty():
        print(f"{PROG}: reading {what} from stdin; end with Ctrl-D", file=sys.stderr)
    return sys.stdin.read()


def _read_text(path: str) -> str:
    if path == "-":
        return _read_stdin("the input")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"cannot read {path}: {exc}")


def _read_jsonl(path: str) -> list[Any]:
    """The items of a JSONL file; a line that is not JSON stops everything before anything is sent."""
    items = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except ValueError as exc:
            _fail(f"{path} line {number} is not valid JSON ({exc}); each line must be one JSON object")
        except RecursionError:
            _fail(f"{path} line {number} is nested too deeply to read; each line must be one JSON object")
    return items


# -- commands ------------------------------------------------------------------------------------


def _print_answer(answer: Any) -> None:
    messages = answer if isinstance(answer, list) else [answer]
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str) and set(message) <= {"role", "content"}:
            print(content)
        else:
            print(json.dumps(message, ensure_ascii=False, indent=2))


def _cmd_chat(args: argparse.Namespace) -> int:
    """Send one prompt and print the answer."""
    variables = _parse_vars(args)
    prompt = " ".join(args.prompt)
    if _has_template(args):
        if prompt:
            variables.setdefault("prompt", prompt)
        messages = _render(args, variables)
    else:
        if variables:
            args.parser.error("--var needs --template or --system-template")
        if not prompt:
            prompt = _read_stdin("the prompt").strip()
        if not prompt:
            args.parser.error("no prompt: give it as arguments, on stdin, or use --template")
        messages = [{"role": "user", "content": prompt}]
    with _client(args) as client:
        if _opt(args, "stream"):
            return _stream_answer(client, messages, _model_params(args))
        answer = client.send_message(messages, **_model_params(args))
    _print_answer(answer)
    return 0


def _stream_answer(client: Any, messages: list[dict[str, Any]], params: dict[str, Any]) -> int:
    """Print the answer's text as it arrives (flushed per delta), then what _print_answer would add."""
    from ._exceptions import StreamInterruptedError

    wrote = False
    with client.stream_message(messages, **params) as stream:
        try:
            for text in stream:
                sys.stdout.write(text)
                sys.stdout.flush()
                wrote = True
        except StreamInterruptedError:
            if wrote:
                sys.stdout.write("\n")
                sys.stdout.flush()
            raise
    message = stream.message or {}
    if isinstance(message.get("content"), str) and set(message) <= {"role", "content"}:
        sys.stdout.write("\n")
        sys.stdout.flush()
    else:  # tool calls, a refusal...: the whole message as JSON, as without streaming
        if wrote:
            sys.stdout.write("\n")
        _print_answer(message)
    return 0


def _plain_output(output: Any) -> Any:
    """The answer's text when the message is plain text, else the whole message (or list)."""
    if isinstance(output, dict) and isinstance(output.get("content"), str) and set(output) <= {"role", "content"}:
        return output["content"]
    return output


def _record(result: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"index": result.index, "input": result.input}
    if result.ok:
        record["output"] = _plain_output(result.output)
        record["cached"] = result.cached
    else:
        error = result.error
        record["error"] = {"type": type(error).__name__, "message": str(error)}
        if getattr(error, "status_code", None) is not None:
            record["error"]["status_code"] = error.status_code
    return record


def _json_line(record: Any, encoding: str | None) -> str:
    """One JSON line, readable UTF-8 when the text allows, else ``\\uXXXX`` escapes (a lone surrogate)."""
    line = json.dumps(record, ensure_ascii=False) + "\n"
    try:
        line.encode(encoding or "utf-8")
    except (UnicodeEncodeError, LookupError):
        return json.dumps(record) + "\n"  # the same value, escaped: it reads back identical
    return line


class _JsonlWriter:
    """OUT while the batch runs: one line per result, in input order, written as soon as it is ready.

    Results arrive in finishing order; a :class:`~llmutils._batch.ReorderBuffer` holds those
    ahead of a gap. Each line is flushed, so a crash or a kill loses nothing already answered
    (and the cache holds the rest). The file is opened before the first request, which is the
    check that OUT can be written; an existing file keeps its permission bits, a new one gets
    the umask's.
    """

    def __init__(self, path: str) -> None:
        from ._batch import ReorderBuffer

        self.path = path
        self.written = 0
        self._buffer = ReorderBuffer()
        self._ready: list[Any] = []
        self._file: IO[str]
        if path == "-":
            self._file = sys.stdout
        else:
            try:
                self._file = open(path, "w", encoding="utf-8")  # closed in close()
            except OSError as exc:
                _fail(f"cannot write {path}: {exc.strerror or exc}")

    def push(self, result: Any) -> None:
        """Take one finished result; write every line that is now in order."""
        self._ready.extend(self._buffer.push(result))
        self._write_ready()

    def drain(self) -> None:
        """The run was cut short: write every result still held, in input order, skipping gaps."""
        self._ready.extend(self._buffer.drain())
        self._write_ready()

    def _write_ready(self) -> None:
        while self._ready:
            line = _json_line(_record(self._ready[0]), getattr(self._file, "encoding", None))
            try:
                self._file.write(line)
                self._file.flush()
            except BrokenPipeError:
                raise
            except OSError as exc:
                _fail(f"cannot write {self.path}: {exc.strerror or exc}")
            self._ready.pop(0)
            self.written += 1

    def close(self) -> None:
        """Close OUT (stdout is only flushed)."""
        if self._file is sys.stdout:
            self._file.flush()
        else:
            self._file.close()


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _same_file(a: str, b: str) -> bool:
    if a == "-" or b == "-":
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _check_templates(args: argparse.Namespace, user_template: str | None) -> None:
    """Load the named templates now: a wrong name fails before OUT is touched or anything is sent."""
    from ._templates import find_template

    for name in (args.system_template, user_template):
        if name is not None:
            find_template(name, args.template_dir)


@contextmanager
def _batch_executor(args: argparse.Namespace) -> Iterator[Any]:
    """The executor ``--processes`` or ``--dask-scheduler`` asks for, or None (threads here).

    On the way out, chunks not started are cancelled and nothing waits for running ones (after
    Ctrl-C the spawned processes got the signal too); a Dask client is closed.
    """
    if args.processes:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(args.processes, mp_context=multiprocessing.get_context("spawn"))
        try:
            yield pool
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
    elif args.dask_scheduler:
        try:
            import distributed
        except ImportError:
            args.parser.error("--dask-scheduler needs Dask's distributed package: pip install 'llmutils-openai[dask]'")
        connect: Any = distributed.Client  # untyped in distributed
        try:
            dask_client: Any = connect(args.dask_scheduler, timeout=30)
        except (OSError, TimeoutError, ValueError) as exc:
            raise ConfigError(f"cannot reach the Dask scheduler at {args.dask_scheduler}: {exc}") from None
        try:
            yield dask_client.get_executor()
        finally:
            dask_client.close()
    else:
        yield None


def _cmd_batch(args: argparse.Namespace) -> int:
    """Answer every line of IN into OUT; exit 1 if any item failed."""
    from ._batch import batch

    if _same_file(args.input, args.output):
        args.parser.error(f"IN and OUT are the same file ({args.input}); writing OUT would destroy IN: choose another OUT")
    if args.fallback and args.via != "batch-api":
        args.parser.error("--fallback applies to --via batch-api only")
    items = _read_jsonl(args.input)
    user_template = args.template or (None if args.system_template else "user_default")
    _check_templates(args, user_template)
    progress = args.progress
    if progress is None:  # on a terminal only, and not when the results go to that same terminal
        progress = _is_terminal(sys.stderr) and not (args.output == "-" and _is_terminal(sys.stdout))
    started = time.monotonic()
    out = _JsonlWriter(args.output)
    try:
        with _client(args, cache_default=True) as client, _batch_executor(args) as executor:
            settings = client.settings()
            cache_on = settings["CACHE_API_CALLS"] and settings["CACHE_MODE"] != "off"
            try:
                results = batch(
                    items,
                    client=client,
                    workers=args.workers,
                    system_template=args.system_template,
                    user_template=user_template,
                    template_dirs=args.template_dir,
                    progress=progress,
                    on_result=out.push,
                    max_connection_failures=args.max_connection_failures,
                    executor=executor,
                    via=args.via,
                    fallback=args.fallback,
                    **_model_params(args),
                )
            except KeyboardInterrupt:
                out.drain()
                path = _shown_location(settings["CACHE_URL"] or settings["CACHE_FILE_NAME"])
                where = f"in the cache ({path}): run the same command again to resume" if cache_on else "lost (the cache is off)"
                print(
                    f"{PROG}: interrupted; {out.written} of {len(items)} results were written to {args.output} "
                    f"(in input order; items not finished are left out). Answers received so far are {where}.",
                    file=sys.stderr,
                )
                return 130
    finally:
        out.close()
    failed = [r for r in results if not r.ok]
    skipped = sum(not r.attempted for r in results)
    cached = sum(r.cached for r in results)
    tokens = sum(r.tokens for r in results if not r.cached)
    seconds = time.monotonic() - started
    not_attempted = f" ({skipped} not attempted)" if skipped else ""
    print(
        f"{PROG}: {len(results)} items: {len(results) - len(failed)} ok, {len(failed)} failed{not_attempted}, "
        f"{cached} cached, {tokens} tokens, {seconds:.2f}s -> {args.output}",
        file=sys.stderr,
    )
    if failed:
        first = failed[0]
        print(f"{PROG}: first failure: item {first.index}: {type(first.error).__name__}: {first.error}", file=sys.stderr)
        return 1
    return 0


def _cmd_render(args: argparse.Namespace) -> int:
    """Print the rendered messages as JSON."""
    if not _has_template(args):
        args.parser.error("give --template and/or --system-template")
    print(json.dumps(_render(args, _parse_vars(args)), ensure_ascii=False, indent=2))
    return 0


def _cmd_tokens(args: argparse.Namespace) -> int:
    """Count tokens of a text, a file, stdin or a rendered template."""
    from ._tokens import count_tokens, encoding_name_for_model

    with _config.override_defaults(**_overrides(args)):
        model = _config.resolve()["MODEL"]
        sources = sum(bool(x) for x in (args.text, args.file, _has_template(args)))
        if sources > 1:
            args.parser.error("give text arguments, --file or a template, not several")
        what: Any
        if _has_template(args):
            what = _render(args, _parse_vars(args))
        elif args.file:
            what = _read_text(args.file)
        elif args.text:
            what = " ".join(args.text)
        else:
            what = _read_stdin("the text")
        count = count_tokens(what, model)
        encoding = encoding_name_for_model(model)
    shape = "text" if isinstance(what, str) else f"{len(what)} message{'s' if len(what) != 1 else ''}"
    if count.exact:
        print(f"{int(count)} tokens (exact; {shape}, model {model}, encoding {encoding})")
    else:
        print(f"~{int(count)} tokens (estimate: tiktoken could not load {encoding}; {shape}, model {model})")
    return 0


def _shown_location(location: str) -> str:
    """A cache location for messages: a URL with its password masked, or an absolute file path."""
    from .cache import is_cache_url, mask_url

    return mask_url(location) if is_cache_url(location) else os.path.abspath(location)


def _cmd_cache(args: argparse.Namespace) -> int:
    """stats, clear, vacuum or import-pickle on the cache (a SQLite file or Redis)."""
    from .cache import SQLiteCache, import_pickle_cache, open_cache

    with _config.override_defaults(**_overrides(args)):
        settings = _config.resolve()
    # A cache named on the command line is the one acted on, whatever CACHE_URL is configured.
    location = _opt(args, "cache_file") or _opt(args, "cache_url") or settings["CACHE_URL"] or settings["CACHE_FILE_NAME"]
    if args.action == "import-pickle" and not args.trusted:
        _fail(
            f"refusing to load {args.pickle} without --trusted: loading a pickle runs any code it contains; "
            "pass --trusted only for a file you or your own program wrote"
        )
    with open_cache(location, mode="readwrite") as cache:
        is_file = isinstance(cache, SQLiteCache)
        where = str(cache.path)
        if is_file and args.action != "import-pickle" and not os.path.exists(where):
            _fail(f"no cache file at {where}; choose one with --cache-file PATH, --cache-url URL or the CACHE_FILE_NAME setting")
        if args.action == "stats":
            for name, value in cache.info().items():
                print(f"{name}: {value}")
        elif args.action == "clear":
            entries = len(cache)
            cache.clear()
            if not cache.disabled:
                print(f"cleared {entries} entries from {where}")
        elif args.action == "vacuum":
            if not isinstance(cache, SQLiteCache):
                _fail(f"vacuum is for SQLite cache files; {where} is Redis, which gives memory back by itself")
            before = cache.info()["size_bytes"]
            cache.vacuum()
            print(f"vacuumed {where}: {before} -> {cache.info()['size_bytes']} bytes")
        else:
            try:
                written = import_pickle_cache(args.pickle, cache, trusted=True)
            except OSError as exc:
                _fail(f"cannot read {args.pickle}: {exc}")
            print(f"imported {written} entries from {args.pickle} into {where}")
        if cache.disabled:
            what = "cache file" if is_file else "cache"
            _fail(f"the {what} {where} could not be used (see the warning above)")
    return 0


def _cmd_cache_copy(args: argparse.Namespace) -> int:
    """Copy every live entry of SRC into DEST (SQLite file -> Redis, or any other pair)."""
    from .cache import SQLiteCache, copy_cache, open_cache

    with open_cache(args.source, mode="readonly") as source, open_cache(args.dest, mode="readwrite") as dest:
        if isinstance(source, SQLiteCache) and not os.path.exists(source.path):
            _fail(f"no cache file at {source.path}")
        if str(source.path) == str(dest.path):
            _fail(f"SRC and DEST are the same cache ({source.path})")
        result = copy_cache(source, dest)
        if dest.disabled:
            _fail(f"copying into {dest.path} failed after {result.copied} entries (see the warning above)")
    skipped = f"; skipped {result.expired} expired" + (f", {result.invalid} unreadable" if result.invalid else "")
    print(f"copied {result.copied} entries from {source.path} to {dest.path}{skipped}")
    return 0


# -- entry point ---------------------------------------------------------------------------------


@contextmanager
def _logging(verbosity: int) -> Iterator[logging.Handler]:
    """Send llmutils' log records to stderr for this command: WARNING, or INFO (-v) / DEBUG (-vv)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))  # messages have no prefix
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


def _on_ctrl_c(signum: int, frame: FrameType | None) -> None:
    """The first Ctrl-C stops the command (it writes what it has and exits 130); a second one kills it.

    The second is the operating system's default action: the process ends by SIGINT at once (the
    shell reports 130 too), never with a traceback from a half-handled first one.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    raise KeyboardInterrupt


@contextmanager
def _ctrl_c_stops_once(*, restore: bool) -> Iterator[None]:
    """Install :func:`_on_ctrl_c` for SIGINT (main thread only; SIGINT ignored by the parent stays so)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _on_ctrl_c)
    try:
        yield
    finally:
        if restore:
            signal.signal(signal.SIGINT, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``llmutils`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit code.

    Ctrl-C returns 130 (after ``llmutils: interrupted`` on stderr); a second Ctrl-C while the
    command finishes kills the process by SIGINT. The previous SIGINT handler is restored on return.
    """
    with _ctrl_c_stops_once(restore=True):
        return _main(argv)


def run() -> NoReturn:
    """The ``llmutils`` command itself (the console script and ``python -m llmutils``): run, then exit.

    Ctrl-C at any moment exits 130 without a traceback: while llmutils is imported (see
    :mod:`llmutils._sigint`), while the command runs, and while the process exits.
    """
    code = 130
    try:
        with _ctrl_c_stops_once(restore=False):
            code = _main(None)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # while the interpreter exits: end by the signal, no traceback
    if code == 130:
        logger.disabled = True  # requests abandoned in flight stay quiet while the interpreter exits
    sys.exit(code)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.func is None:  # "llmutils cache" without an action
        args.parser.print_help(sys.stderr)
        return 2
    verbosity = _opt(args, "verbose", 0) or 0
    with _logging(verbosity):
        try:
            return int(args.func(args))
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1
        except LLMUtilsError as exc:
            if verbosity:
                traceback.print_exc(file=sys.stderr)
            return _one_line_error(str(exc))
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:
            # stdout was closed early (| head): stop quietly, and keep Python from complaining at exit.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 1


if __name__ == "__main__":
    run()
