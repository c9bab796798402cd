"""Simple Task Orchestrator: a work queue of prompts for AI coding agents.

Clients create tasks (a prompt plus the absolute work directory it applies to);
workers claim the next task for their directory, hold it under a lease, and
report success or failure. Failures and expired leases are retried up to a
limit, after a backoff if one is set. A task may wait for others to complete
(depends_on) or for a time (not_before), and a client may wait for a task to
finish. One in-memory store answers a REST API under /api/v1 (described at
/openapi.json), an MCP endpoint at /mcp for agents, a page at / for people and
/metrics for Prometheus. With a data file (APP_DATA_FILE) every change is also
written through to SQLite before it is acknowledged, so the queue survives a
restart or a kill -9.

Needs Python 3.11+, bottle and waitress. Limits: one process per data file;
without one, a restart loses every task. Delivery is at-least-once, so a task
whose lease expires goes to the next worker; the lease token each claim gets
makes sure its former holder can no longer report on it.

Run it:

    python orchestrator.py                                  # serve (or: make run)
    python orchestrator.py work --work-path DIR -- CMD ...  # run CMD on each task
    python orchestrator.py add --dir DIR < prompt.md        # queue; also ls, show, wait...
    python orchestrator.py mcp-stdio                        # for stdio MCP clients

Embed it in tests:

    with running_server() as url:
        ...                                  # talk HTTP to url

Sections, in dependency order: configuration, errors, the task and its life
cycle, request declarations, logging, the data file, the store, the rate
limiter, HTTP (the gate, the handlers, the route table), /metrics, response
schemas, MCP, the OpenAPI document, serving and the command line (the client
commands, the stdio relay and the worker), and last the page at /.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import contextlib
import copy
import dataclasses
import errno
import functools
import gc
import hashlib
import heapq
import hmac
import ipaddress
import itertools
import json
import logging
import math
import ntpath
import operator
import os
import posixpath
import queue
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import types
import typing
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import unquote_to_bytes, urlsplit

import bottle
import waitress
import waitress.trigger
import waitress.wasyncore

try:
    import fcntl
except ImportError:  # Windows, which locks files through msvcrt instead
    fcntl = None
    import msvcrt

__all__ = [
    # the task's statuses and priorities
    "STATUSES", "WAITING", "WORKING", "COMPLETED", "FAILED", "CANCELLED", "FINISHED", "PRIORITIES",
    "CANCELLABLE", "RETRYABLE",
    # the request declarations: bodies and queries, and the fields they share
    "TASK_CREATE", "TASK_UPDATE", "TASK_COMPLETE", "TASK_FAIL", "TASK_HEARTBEAT", "TASK_CANCEL",
    "TASK_RETRY", "TASK_RELEASE", "TASK_BULK", "RESULT", "CLAIM_QUERY", "READ_QUERY", "LIST_QUERY",
    "TASK_FILTERS", "WORK_DIRECTORY", "PROMPT", "PRIORITY", "TAG", "TAGS", "METADATA",
    "MAX_RETRIES", "NOT_BEFORE", "DELAY_SECONDS", "DEPENDS_ON", "WORKER_ID", "LEASE_TOKEN", "REPORTER_FIELDS", "TASK_ID", "IDEMPOTENCY_KEY",
    "IDEMPOTENCY_HEADER",
    # the store's limits
    "BULK_LIMIT", "WORKER_MEMORY", "DURATION_BUCKETS",
    # the service
    "Config",
    "Field",
    "RateLimiter",
    "Schema",
    "Task",
    "TaskStore",
    "create_app",
    "main",
    "running_server",
    # the errors, each with its HTTP status and code
    "OrchestratorError",
    "ConfigError",
    "ValidationError",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "MethodNotAllowed",
    "Conflict",
    "PayloadTooLarge",
    "UnsupportedMediaType",
    "RateLimited",
    "StorageError",
]

__version__ = "1.0.0"

logger = logging.getLogger("orchestrator")


# ---------------------------------------------------------------------------
# Configuration: every setting, read once from APP_* variables into a frozen Config
# ---------------------------------------------------------------------------

#: Where the client commands (work, mcp-stdio) find the server unless told otherwise.
_DEFAULT_URL = "http://127.0.0.1:8080"


def _integer(low: int, high: int) -> Callable[[str], int]:
    """A parser for a whole number from low to high."""
    def parse(raw: str) -> int:
        if not re.fullmatch(r"\s*-?[0-9]{1,18}\s*", raw):
            raise ValueError(f"an integer from {low} to {high}")
        value = int(raw)
        if not low <= value <= high:
            raise ValueError(f"an integer from {low} to {high}")
        return value
    return parse


def _choice(*options: str) -> Callable[[str], str]:
    """A parser for one of a few words, in any case."""
    def parse(raw: str) -> str:
        if raw.strip().lower() not in options:
            raise ValueError("one of " + ", ".join(options))
        return raw.strip().lower()
    return parse


def _switch(raw: str) -> bool:
    """A parser for on or off (also true/false, yes/no, 1/0), in any case."""
    word = raw.strip().lower()
    if word not in ("on", "off", "true", "false", "yes", "no", "1", "0"):
        raise ValueError("on or off")
    return word in ("on", "true", "yes", "1")


def _seconds(raw: str) -> float:
    """A parser for a number of seconds, 0 or more."""
    rule = "a number of seconds, 0 or more"
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(rule) from None
    if not 0 <= seconds < math.inf:
        raise ValueError(rule)
    return seconds


def _http_url(raw: str) -> str:
    """A parser for an http:// or https:// URL, which is all the client commands can reach."""
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"an http:// or https:// URL such as {_DEFAULT_URL}, not {raw!r}")
    return raw


def _text(raw: str) -> str:
    """Any non-empty text, as it is."""
    return raw


#: Printable ASCII, spaces inside only: what every client sends alike in a header.
_SENDABLE_API_KEY = re.compile(r"[!-~]([ -~]*[!-~])?")


def _api_key_text(raw: str) -> str:
    """An API key every client can send alike, or ValueError.

    The server strips the token it reads, so spaces at the ends would never
    match; a header cannot carry a control character; beyond ASCII, clients
    disagree (curl sends UTF-8, browsers and Python Latin-1).
    """
    if not _SENDABLE_API_KEY.fullmatch(raw):
        raise ValueError("printable ASCII, with no spaces at either end (it travels in the "
                         "Authorization header)")
    return raw


def _origins(raw: str) -> tuple[str, ...]:
    """A comma-separated list of origins such as https://app.example:8443."""
    origins = tuple(part.strip() for part in raw.split(",") if part.strip())
    for origin in origins:
        if _origin_key(origin) is None:
            raise ValueError("comma-separated origins like http://localhost:3000")
    return origins


def _hosts(raw: str) -> tuple[str, ...]:
    """A comma-separated list of host names, each with an optional :port."""
    hosts = tuple(part.strip().lower() for part in raw.split(",") if part.strip())
    if not hosts or not all(
        _HOST_PATTERN.fullmatch(host) and _host_port(host)[1] != 0 for host in hosts
    ):
        raise ValueError("comma-separated host names, each with an optional :port, "
                         "like box.lan,box.lan:8080")
    return hosts


#: A host name, an IPv4 address or a bracketed IPv6 one, then an optional port.
_HOST_PATTERN = re.compile(
    r"(\[[0-9a-f:.]+\]|[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?)"
    r"(:[0-9]{1,5})?", re.IGNORECASE)


@functools.lru_cache(maxsize=256)  # a server hears the same few Host headers all day
def _host_port(host: str) -> tuple[str, int | None]:
    """A Host header split into its lower-case name and its port (None when absent, 0 when
    it is not a port)."""
    name, colon, port = host.rpartition(":")
    if not colon or name.count(":") and not name.endswith("]"):
        return host.lower(), None  # no port, or a bare IPv6 address
    valid = re.fullmatch(r"[0-9]{1,5}", port) and int(port) <= 65535
    return name.lower(), int(port) if valid else 0


def _origin_key(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an origin, default ports filled in; None when malformed."""
    try:
        parts = urlsplit(origin.strip().rstrip("/"))
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    except ValueError:
        return None
    if not parts.hostname or port is None or parts.path:
        return None
    return parts.scheme.lower(), parts.hostname.lower(), port


_LEGACY_IPV4 = re.compile(r"[0-9A-Fa-fXx.]+")  # what inet_aton's spellings are made of


@functools.lru_cache(maxsize=256)  # checked on every request, for the same few names
def _is_loopback(host: str) -> bool:
    """Whether an address or host name means this machine only.

    IPv4 has legacy spellings (127.1, 0x7f000001) that bind, and resolve, to
    127.0.0.1 all the same; inet_aton reads them as the OS does.
    """
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    if not _LEGACY_IPV4.fullmatch(host):  # inet_aton reads "127.0.0.1 evil" as 127.0.0.1
        return host.lower() == "localhost"
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host)).is_loopback
    except OSError:  # digits that are no address, such as 1.2.3.4.5
        return False


#: Every setting once: its environment variable, its attribute, its parser.
_SETTINGS: tuple[tuple[str, str, Callable[[str], object]], ...] = (
    ("APP_SERVER_HOST", "host", _text),
    ("APP_SERVER_PORT", "port", _integer(0, 65535)),
    ("APP_SERVER_THREADS", "threads", _integer(1, 1000)),
    ("APP_SERVER_TIMEOUT", "timeout", _integer(1, 86400)),
    ("APP_SERVER_MAX_BODY", "max_body", _integer(1, 2**31 - 1)),
    ("APP_TASK_MAX_RETRIES", "max_retries", _integer(0, 100)),
    ("APP_TASK_TIMEOUT", "task_timeout", _integer(1, 31_536_000)),
    ("APP_TASK_RETENTION", "retention", _integer(0, 3_153_600_000)),
    ("APP_TASK_DIRECTORY_CONCURRENCY", "directory_concurrency", _integer(0, 1000)),
    ("APP_TASK_RETRY_BACKOFF", "retry_backoff", _integer(0, 86_400)),
    ("APP_TASK_RETRY_BACKOFF_MAX", "retry_backoff_max", _integer(0, 604_800)),
    ("APP_TASK_ANONYMOUS_REPORTS", "anonymous_reports", _switch),
    ("APP_DATA_FILE", "data_file", _text),
    ("APP_DATA_SYNC", "data_sync", _choice("full", "normal")),
    ("APP_SECURITY_RATE_LIMIT", "rate_limit", _integer(0, 1_000_000)),
    ("APP_SECURITY_API_KEY", "api_key", _api_key_text),
    ("APP_SECURITY_ALLOWED_ORIGINS", "allowed_origins", _origins),
    ("APP_SECURITY_ALLOWED_HOSTS", "allowed_hosts", _hosts),
    ("APP_LOG_LEVEL", "log_level", _choice("debug", "info", "warning", "error")),
    ("APP_LOG_FORMAT", "log_format", _choice("pretty", "json")),
)


@dataclass(frozen=True, slots=True)
class Config:
    """Every setting of the service; `Config.from_env()` reads them from the environment."""

    host: str = "127.0.0.1"
    port: int = 8080
    threads: int = 8
    timeout: int = 30
    max_body: int = 1_048_576
    max_retries: int = 3
    task_timeout: int = 3600
    retention: int = 604_800
    directory_concurrency: int = 0  #: working tasks one directory may have at once; 0: any
    retry_backoff: int = 0  #: seconds before a failed task is claimable again, doubling; 0: at once
    retry_backoff_max: int = 600  #: the most that backoff grows to
    #: Whether complete and fail may name neither worker_id nor lease_token, as clients from
    #: before lease tokens do.
    anonymous_reports: bool = True
    data_file: str | None = None  #: the SQLite file that keeps the tasks; None: memory only
    data_sync: str = "full"  #: "full" survives power loss; "normal" only a crash of the process
    rate_limit: int = 1000
    api_key: str | None = field(default=None, repr=False)  # never printed
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    log_level: str = "info"
    log_format: str = "pretty"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Read the APP_* variables; None means os.environ. Raises ConfigError."""
        environ = os.environ if environ is None else environ
        values = {}
        for variable, attribute, parse in _SETTINGS:
            raw = environ.get(variable, "")
            if raw != "":  # an empty variable counts as unset, as in most shells
                values[attribute] = _parse_setting(variable, parse, raw)
        return cls(**values)

    def with_flags(self, **flags: str | None) -> Config:
        """This configuration with command-line flags (already strings) laid over it."""
        parsers = {attribute: parse for _, attribute, parse in _SETTINGS}
        changes = {
            name: _parse_setting("--" + name.replace("_", "-"), parsers[name], raw)
            for name, raw in flags.items()
            if raw  # None (not given) or empty: unset, as for the variables
        }
        return dataclasses.replace(self, **changes)


def _parse_setting(name: str, parse: Callable[[str], object], raw: str) -> object:
    """Parse one setting, naming it and what it accepts when the value is bad."""
    try:
        return parse(raw)
    except ValueError as error:
        raise ConfigError(f"{name} must be {error}") from None


# ---------------------------------------------------------------------------
# Errors: domain code raises these; one place in HTTP turns them into envelopes
# ---------------------------------------------------------------------------

class OrchestratorError(Exception):
    """The root of every error the service answers with; carries its HTTP status and code."""

    status = 500
    code = "INTERNAL_ERROR"

    def __init__(self, message: str = "internal server error", **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def headers(self) -> dict[str, str]:
        """Extra response headers this error calls for."""
        return {}


class ConfigError(OrchestratorError, ValueError):
    """A setting has a value the service cannot use; the message names it."""


class ValidationError(OrchestratorError):
    """A request is malformed: bad JSON, a wrong type, a missing or invalid field."""

    status = 400
    code = "VALIDATION_ERROR"


class Unauthorized(OrchestratorError):
    """An API key is configured and the request did not carry it."""

    status = 401
    code = "UNAUTHORIZED"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="orchestrator"'}


class Forbidden(OrchestratorError):
    """A Host that is not this server's name, or a browser request from another site."""

    status = 403
    code = "FORBIDDEN"


class NotFound(OrchestratorError):
    """No such task, or no such route."""

    status = 404
    code = "NOT_FOUND"


class MethodNotAllowed(OrchestratorError):
    """The route exists but not with this method."""

    status = 405
    code = "METHOD_NOT_ALLOWED"

    def __init__(self, allow: str) -> None:
        super().__init__(f"method not allowed; allowed: {allow}", allow=allow.split(","))
        self.allow = allow

    def headers(self) -> dict[str, str]:
        return {"Allow": self.allow}


class Conflict(OrchestratorError):
    """The task's state, or its holder, forbids this change."""

    status = 409
    code = "CONFLICT"


class StorageError(OrchestratorError):
    """The data file could not be written: the change is not acknowledged."""

    status = 503
    code = "STORAGE_ERROR"


class PayloadTooLarge(OrchestratorError):
    """The request body is larger than the configured limit."""

    status = 413
    code = "PAYLOAD_TOO_LARGE"


class UnsupportedMediaType(OrchestratorError):
    """A request body that is not application/json."""

    status = 415
    code = "UNSUPPORTED_MEDIA_TYPE"


class RateLimited(OrchestratorError):
    """The client sent more requests than the limit allows; `retry_after` says when to retry."""

    status = 429
    code = "RATE_LIMIT_EXCEEDED"

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"rate limit exceeded; retry in {retry_after} s", retry_after=retry_after)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


# ---------------------------------------------------------------------------
# The task and its life cycle: the dataclass, its statuses and how it moves between them
#
#   create --> waiting --claim--> working --complete--> completed
#                 ^  |               |  \--fail, or lease expired:
#                 |  |               |       retries left? --> waiting (back of its priority)
#                 |  |               |       none left     --> failed --retry--> waiting
#                 |  +---cancel------+--cancel--> cancelled
#
# A waiting task can be claimed unless it is blocked (a task in its depends_on has
# not completed) or delayed (its not_before, or a failure's backoff, is ahead).
# A dependency that ends failed or cancelled, or is deleted, cancels it.
# ---------------------------------------------------------------------------

WAITING, WORKING, COMPLETED, FAILED, CANCELLED = (
    "waiting", "working", "completed", "failed", "cancelled",
)
STATUSES = (WAITING, WORKING, COMPLETED, FAILED, CANCELLED)
FINISHED = (COMPLETED, FAILED, CANCELLED)
CANCELLABLE = (WAITING, WORKING)
RETRYABLE = (FAILED, CANCELLED)
PRIORITIES = ("high", "medium", "low")  # claim order
_PRIORITY_RANK = {name: rank for rank, name in enumerate(PRIORITIES)}


@dataclass(slots=True)
class Task:
    """One prompt for one work directory, and where it stands."""

    id: str
    work_directory: str
    prompt: str
    priority: str
    tags: Sequence[str]  #: a tuple in the store (the collector skips it), a list when handed out
    metadata: dict
    max_retries: int
    created_at: float
    updated_at: float
    status: str = WAITING
    worker_id: str | None = None
    started_at: float | None = None
    completed_at: float | None = None  #: when it became completed, failed or cancelled
    lease_expires_at: float | None = None
    result: dict | None = None
    error_message: str | None = None
    retry_count: int = 0
    progress: str | None = None  #: the holder's last word on how far it has got
    progress_at: float | None = None
    not_before: float | None = None  #: while waiting, not claimable before this time
    # Most tasks have no dependencies: those share the empty tuple rather than hold two
    # empty lists each. The store replaces these, never changes them in place.
    depends_on: Sequence[str] = ()  #: ids that must complete first
    blocked_by: Sequence[str] = ()  #: of those, the ones not completed yet
    #: The holder's secret for this one claim: a report that carries it is fenced to this lease.
    lease_token: str | None = field(default=None, repr=False)
    #: The started_at of the claim that made lease_token: how _restore tells a token an
    #: older version (which knows no tokens) left behind when it let another claim in.
    token_started_at: float | None = field(default=None, repr=False)
    number: int = field(default=0, repr=False)  #: creation order, for newest-first listing
    #: Its live entry in its directory's queue while waiting; any other entry is stale.
    queue_entry: tuple | None = field(default=None, repr=False)
    idempotency_key: str | None = field(default=None, repr=False)
    fingerprint: str | None = field(default=None, repr=False)  #: of the body that used the key
    #: Counts the task's changes, so that a data file never takes an older row over a newer.
    version: int = field(default=0, repr=False)

    def snapshot(self, *, with_lease_token: bool = False) -> Task:
        """A copy that shares nothing mutable with this task, to hand out of the store.

        The lease token stays out unless asked for: only the claim that made it
        hands it out, so that nobody else can read it and report as the holder.
        """
        copied = Task(*_every_field(self))  # positional: several times faster than replace()
        copied.tags = list(self.tags)
        copied.depends_on = list(self.depends_on)
        copied.blocked_by = list(self.blocked_by)
        copied.metadata = _copy_json(self.metadata)
        copied.result = _copy_json(self.result)
        if not with_lease_token:
            copied.lease_token = None
        return copied

    def to_dict(self) -> dict:
        """The task as the API shows it, timestamps in RFC 3339 UTC."""
        instant = _remembered_instant  # a local name: looked up once, not per timestamp
        return {
            "id": self.id,
            "work_directory": self.work_directory,
            "prompt": self.prompt,
            "priority": self.priority,
            "tags": list(self.tags),
            "metadata": self.metadata,
            "status": self.status,
            "worker_id": self.worker_id,
            "created_at": instant(self.created_at),
            "updated_at": instant(self.updated_at),
            # The nullable ones are looked at here rather than in a call: most are None.
            "started_at": None if self.started_at is None else instant(self.started_at),
            "completed_at": None if self.completed_at is None else instant(self.completed_at),
            "lease_expires_at": (None if self.lease_expires_at is None
                                 else instant(self.lease_expires_at)),
            "result": self.result,
            "error_message": self.error_message,
            "retry_count": self.retry_count,
            "progress": self.progress,
            "progress_at": None if self.progress_at is None else instant(self.progress_at),
            "not_before": None if self.not_before is None else instant(self.not_before),
            "depends_on": list(self.depends_on),
            "blocked_by": list(self.blocked_by),
            "max_retries": self.max_retries,
        }


def _copy_json(value: object) -> object:
    """A copy of a JSON value that shares no dict or list with it: what copy.deepcopy
    gives for metadata and results, without its bookkeeping for cycles and classes."""
    if isinstance(value, dict):
        return {key: _copy_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy_json(item) for item in value]
    return value


def _json_encoder(ascii_only: bool) -> Callable[[object], str]:
    """json.dumps(value, ensure_ascii=ascii_only), from an encoder built once.

    json.dumps builds its C encoder (and a closure) anew on every call, which costs as
    much as encoding a health answer. This builds it once, the way JSONEncoder.iterencode
    does (CPython's internal c_make_encoder, the same arguments in 3.11 to 3.13). No
    cycle check (markers None, so that one encoder serves every thread): what is
    encoded here is a tree of JSON values.
    """
    if json.encoder.c_make_encoder is None:  # an interpreter without json's C part
        return json.JSONEncoder(ensure_ascii=ascii_only).encode
    chunks = json.encoder.c_make_encoder(
        None,  # markers: no cycle check
        json.JSONEncoder().default,  # TypeError for what JSON cannot hold
        json.encoder.encode_basestring_ascii if ascii_only else json.encoder.encode_basestring,
        None, ": ", ", ",  # indent, key and item separators: json.dumps's defaults
        False, False, True)  # sort_keys, skipkeys, allow_nan: json.dumps's defaults
    return lambda value: "".join(chunks(value, 0))


_unicode_json = _json_encoder(ascii_only=False)
_ascii_json = _json_encoder(ascii_only=True)


#: A task's fields in declaration order, read in one call: snapshot() passes them on.
_every_field = operator.attrgetter(*(f.name for f in dataclasses.fields(Task)))


def _rfc3339(timestamp: float | None) -> str | None:
    """Epoch seconds as an RFC 3339 UTC string ending in Z (None stays None)."""
    return None if timestamp is None else _instant(timestamp)


def _instant(timestamp: float) -> str:
    """Epoch seconds as an RFC 3339 UTC string ending in Z, such as 2026-12-03T10:00:00.123Z.

    Every answer formats several of these, so the date and time of day are made once
    per second; the digits are what datetime's isoformat(timespec="milliseconds") gives.
    """
    # The steps of datetime.fromtimestamp: the fraction rounded to the nearest microsecond,
    # then carried into the seconds either way. Small numbers and lookups: this runs for
    # every instant of every answer, and a format spec or arithmetic on all the
    # microseconds since 1970 (beyond a machine word) each cost more than the rest.
    fraction, whole = math.modf(timestamp)
    seconds, microseconds = int(whole), round(fraction * 1e6)
    if microseconds >= 1_000_000:
        seconds, microseconds = seconds + 1, microseconds - 1_000_000
    elif microseconds < 0:
        seconds, microseconds = seconds - 1, microseconds + 1_000_000
    return _utc_second(seconds) + _MILLISECOND_ENDINGS[microseconds // 1000]


#: ".000Z" to ".999Z": looked up rather than %-formatted, at a third of the cost.
_MILLISECOND_ENDINGS = tuple(f".{millisecond:03d}Z" for millisecond in range(1000))


#: A task's instants are shown again and again (each answer about it, each list and page
#: that holds it), and each is formatted once while it is among the last 4096 shown.
#: The current time (the envelope's timestamp) is new each time: _instant formats it.
_remembered_instant = functools.lru_cache(maxsize=4096)(_instant)


@functools.lru_cache(maxsize=64)
def _utc_second(seconds: int) -> str:
    """The UTC date and time of day of an epoch second, in RFC 3339 (four-digit years)."""
    return "%04d-%02d-%02dT%02d:%02d:%02d" % time.gmtime(seconds)[:6]


class _RandomBytes(threading.local):
    """Cryptographically random bytes from the OS, read 4 KiB at a time per thread.

    os.urandom is a system call that lets go of the GIL, and under load a thread
    then waits its turn to get it back; a read per id and per token made every
    create and claim pay that. Each byte is still used once, by one thread.
    """

    def __init__(self) -> None:
        self.pool, self.used = b"", 0

    def take(self, count: int) -> bytes:
        """The next `count` unused bytes."""
        if self.used + count > len(self.pool):
            self.pool, self.used = os.urandom(4096), 0
        self.used += count
        return self.pool[self.used - count:self.used]


_random_bytes = _RandomBytes()


def _new_task_id() -> str:
    """A random (version 4) UUID, as str(uuid.uuid4()) makes it, at a third of the cost."""
    octets = bytearray(_random_bytes.take(16))
    octets[6] = octets[6] & 0x0F | 0x40  # version 4
    octets[8] = octets[8] & 0x3F | 0x80  # the RFC 4122 variant
    digits = octets.hex()
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def _new_lease_token() -> str:
    """A secret of 24 random bytes in URL-safe base64, as secrets.token_urlsafe(24) makes it."""
    return base64.urlsafe_b64encode(_random_bytes.take(24)).rstrip(b"=").decode("ascii")


def _parse_rfc3339(text: str) -> float:
    """Epoch seconds from the API's timestamps."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# ---------------------------------------------------------------------------
# Request declarations: each body and query is declared once, validation is
# derived from the declaration (and, later, the MCP and OpenAPI schemas).
# ---------------------------------------------------------------------------

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}

_SURROGATES = re.compile(r"[\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class Field:
    """One declared field: its JSON type, its limits, and how its value is normalized."""

    name: str
    type: str
    required: bool = False
    default: object = None  #: copied into the cleaned request when the field is absent
    description: str = ""
    min_length: int | None = None
    max_length: int | None = None
    pattern: str | None = None  #: searched, as JSON Schema does; `pattern_rule` says it in words
    pattern_rule: str = ""
    enum: tuple[str, ...] | None = None  #: checked after `normalize`
    case_insensitive: bool = False  #: an enum value in any case, stored in lower case
    minimum: int | None = None
    maximum: int | None = None
    items: Field | None = None
    max_items: int | None = None
    max_depth: int | None = None  #: how deeply an object may nest
    schema: Schema | None = None  #: the declared fields of an object
    normalize: Callable[[object], object] | None = None
    #: Derived once from the fields above, as the declaration is frozen: every request
    #: checks against them.
    matcher: re.Pattern | None = field(init=False, repr=False, compare=False)
    plain: bool = field(init=False, repr=False, compare=False)  #: nothing to normalize or pick

    def __post_init__(self) -> None:
        """Derive matcher and plain (frozen: set through object.__setattr__)."""
        object.__setattr__(self, "matcher",
                           None if self.pattern is None else _ecma_anchored(self.pattern))
        object.__setattr__(self, "plain", self.normalize is None and not self.case_insensitive
                           and self.enum is None)

    def clean(self, value: object, path: str) -> object:
        """Check a value against this field and return it normalized; raise ValidationError."""
        kind = self.type
        if kind == "string" and isinstance(value, str):  # most fields: checked first
            self._check_string(value, path)
        elif kind == "integer" and isinstance(value, float) and value.is_integer():
            value = int(value)  # JSON Schema counts 3.0 as an integer
            self._check_range(value, path)
        elif not isinstance(value, _JSON_TYPES[kind]) or (kind == "integer"
                                                          and isinstance(value, bool)):
            raise _invalid(path, f"must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}")
        elif kind == "integer":
            self._check_range(value, path)
        elif kind == "array":
            value = self._clean_items(value, path)
        elif kind == "object":
            value = self._clean_object(value, path)
        if self.plain:
            return value
        if self.normalize is not None:
            value = self.normalize(value)
        if self.case_insensitive:
            value = value.lower()
        if self.enum is not None and value not in self.enum:
            raise _invalid(path, "must be one of " + ", ".join(self.enum))
        return value

    def json_schema(self) -> dict:
        """This field as JSON Schema (2020-12), for MCP tools and the OpenAPI document."""
        schema: dict[str, object] = {"type": self.type}
        keywords = {
            "description": self.description or None, "minLength": self.min_length,
            "maxLength": self.max_length, "pattern": self.pattern, "minimum": self.minimum,
            "maximum": self.maximum, "maxItems": self.max_items, "default": self.default,
            "enum": list(self.enum) if self.enum else None,
            "items": self.items.json_schema() if self.items else None,
        }
        schema.update((key, value) for key, value in keywords.items() if value is not None)
        if self.case_insensitive:
            # JSON Schema's enum is case-sensitive; a pattern says "any case" exactly.
            del schema["enum"]
            schema["pattern"] = "^(" + "|".join(
                "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else re.escape(c) for c in word)
                for word in self.enum
            ) + ")$"
        if self.schema is not None:
            schema.update(self.schema.json_schema())
        return schema

    def _check_string(self, value: str, path: str) -> None:
        """Length, pattern and well-formed Unicode."""
        if self.min_length is not None and len(value) < self.min_length:
            raise _invalid(path, "must not be empty" if self.min_length == 1
                           else f"must be at least {self.min_length} characters")
        if self.max_length is not None and len(value) > self.max_length:
            raise _invalid(path, f"must be at most {self.max_length} characters")
        if self.matcher is not None and not self.matcher.search(value):
            raise _invalid(path, self.pattern_rule)
        if not value.isascii() and _SURROGATES.search(value):
            raise _invalid(path, "must be valid Unicode (no lone surrogates)")

    def _check_range(self, value: int, path: str) -> None:
        """The integer's bounds."""
        if self.minimum is not None and value < self.minimum:
            raise _invalid(path, f"must be at least {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise _invalid(path, f"must be at most {self.maximum}")

    def _clean_items(self, value: list, path: str) -> list:
        """The array's length, then each item against `items`; a copy the caller cannot change."""
        if self.max_items is not None and len(value) > self.max_items:
            raise _invalid(path, f"must have at most {self.max_items} items")
        if self.items is None:
            return copy.deepcopy(value)
        return [self.items.clean(item, f"{path}[{index}]") for index, item in enumerate(value)]

    def _clean_object(self, value: dict, path: str) -> dict:
        """The object's nesting depth, then its declared fields; a copy the caller cannot change."""
        if self.max_depth is not None and _nesting_exceeds(value, self.max_depth):
            raise _invalid(path, f"must not nest deeper than {self.max_depth} levels")
        if self.schema is None:
            return copy.deepcopy(value)
        return self.schema.clean(value, prefix=path + ".")


@dataclass(frozen=True, slots=True)
class Schema:
    """A declared request body or query: a named set of fields; anything else is rejected."""

    name: str
    fields: tuple[Field, ...]
    min_fields: int = 0  #: how many fields a payload must set at least
    one_of: tuple[str, ...] = ()  #: of these fields, a payload must set at least one
    names: frozenset[str] = field(init=False, repr=False, compare=False)  #: of the fields
    by_name: dict[str, Field] = field(init=False, repr=False, compare=False)  #: the fields

    def __post_init__(self) -> None:
        """Derive names and by_name."""
        # Derived once, as the declaration is frozen: every request looks fields up by name.
        object.__setattr__(self, "names", frozenset(f.name for f in self.fields))
        object.__setattr__(self, "by_name", {f.name: f for f in self.fields})

    def clean(self, payload: Mapping[str, object], prefix: str = "") -> dict:
        """Validate a payload and return its cleaned fields, defaults filled in."""
        known = self.names
        if not known.issuperset(payload):
            unknown = sorted(key for key in payload if key not in known)
            names = ", ".join(prefix + name for name in unknown)
            raise ValidationError(
                f"unknown fields: {names}; allowed: {', '.join(sorted(known)) or 'none'}",
                fields=[prefix + name for name in unknown],
            )
        cleaned = {}
        for declared in self.fields:
            name = declared.name
            if name in payload:
                cleaned[name] = declared.clean(payload[name], prefix + name)
            elif declared.required:
                raise _invalid(prefix + name, "is required")
            elif declared.default is not None:
                # A shallow copy, as copy.copy makes it at a fraction of the cost: a new
                # list or dict, the same string or number.
                cleaned[name] = type(declared.default)(declared.default)
        if len(payload) < self.min_fields:
            rule = f"send at least {self.min_fields} of: " + ", ".join(f.name for f in self.fields)
            raise _invalid(prefix[:-1], rule) if prefix else ValidationError(rule)
        if self.one_of and not any(name in payload for name in self.one_of):
            first, *others = self.one_of
            raise _invalid(prefix + first, f"is required (or {' or '.join(others)})")
        return cleaned

    def json_schema(self, top_level_any_of: bool = True) -> dict:
        """The body as a closed JSON Schema object: declared fields only.

        `one_of` becomes an anyOf of required fields unless `top_level_any_of` is False:
        some MCP clients refuse anyOf at the top of a tool's input schema.
        """
        schema: dict[str, object] = {
            "type": "object",
            "properties": {f.name: f.json_schema() for f in self.fields},
            "additionalProperties": False,
        }
        required = [f.name for f in self.fields if f.required]
        if required:
            schema["required"] = required
        if self.min_fields:
            schema["minProperties"] = self.min_fields
        if self.one_of and top_level_any_of:
            schema["anyOf"] = [{"required": [name]} for name in self.one_of]
        return schema

    def field(self, name: str) -> Field | None:
        """The declared field of that name, if any."""
        return self.by_name.get(name)

    def partial(self, name: str) -> Schema:
        """The same fields, none required or defaulted, at least one sent: a partial update."""
        fields = tuple(dataclasses.replace(f, required=False, default=None) for f in self.fields)
        return Schema(name, fields, min_fields=1)


@functools.cache  # a handful of declared patterns, each checked on every request
def _ecma_anchored(pattern: str) -> re.Pattern:
    """A JSON Schema pattern compiled for Python's re, whose $ also matches before a final
    newline.

    In ECMA-262, the regex dialect of JSON Schema, $ is the very end only: \\Z in Python.
    """
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern)


def _invalid(path: str, rule: str) -> ValidationError:
    """A ValidationError naming the field and the rule it broke."""
    return ValidationError(f"{path}: {rule}", field=path)


def _nesting_exceeds(value: object, limit: int) -> bool:
    """Whether objects and arrays nest more than `limit` levels (stops looking past it)."""
    if not isinstance(value, (dict, list)):
        return False
    if limit == 0:
        return True
    children = value.values() if isinstance(value, dict) else value
    return any(_nesting_exceeds(child, limit - 1) for child in children)


def _normalize_path(path: str) -> str:
    """One spelling per directory: POSIX or Windows, redundant separators and dots removed."""
    if path.startswith("/"):
        return "/" + posixpath.normpath(path).lstrip("/")
    return ntpath.normpath(path)


def _unique(items: list) -> list:
    """The items with duplicates dropped, first occurrence kept."""
    return list(dict.fromkeys(items))


_MAX_SAFE_INTEGER = 2**53 - 1  # the largest integer every JSON reader holds exactly

WORK_DIRECTORY = Field(
    "work_directory", "string", required=True, min_length=1, max_length=1000,
    pattern=r"^(/|[A-Za-z]:[\\/])[^\x00-\x1f\x7f-\x9f\u2028\u2029]*$",
    pattern_rule="must be an absolute path (/... or C:\\...) without control characters",
    normalize=_normalize_path,
    description="Absolute directory the task applies to; stored normalized.",
)
PROMPT = Field(
    "prompt", "string", required=True, min_length=1, max_length=100_000,
    pattern=r"\S", pattern_rule="must not be only whitespace",
    description="What the agent is asked to do; stored verbatim.",
)
PRIORITY = Field(
    "priority", "string", enum=PRIORITIES, default="medium", case_insensitive=True,
    description="Claim order: high before medium before low; any case.",
)
TAG = Field("tag", "string", min_length=1, max_length=50)
TAGS = Field(
    "tags", "array", items=TAG, max_items=20, default=[], normalize=_unique,
    description="Labels; duplicates are dropped, order kept.",
)
METADATA = Field(
    "metadata", "object", max_depth=32, default={},
    description="Any JSON object, nested at most 32 levels.",
)
MAX_RETRIES = Field(
    "max_retries", "integer", minimum=0, maximum=100,
    description="Re-queues allowed after failures; defaults to the server's setting.",
)
WORKER_ID = Field(
    "worker_id", "string", min_length=1, max_length=100,
    pattern=r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]+$", pattern_rule="must be printable characters",
    description="Who holds (or claims) the task.",
)
LEASE_TOKEN = Field(
    "lease_token", "string", min_length=1, max_length=100,
    pattern=r"^[A-Za-z0-9_-]+$", pattern_rule="must be a lease_token as a claim returned it",
    description="The lease_token your claim returned: the report counts only while that "
                "claim's lease holds, so a late report can never touch a later holder's task.",
)
#: A report names who makes it: its lease's token (exact) or its worker id (a name only).
REPORTER_FIELDS = ("lease_token", "worker_id")
TASK_ID = Field(
    "task_id", "string", required=True,
    pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
    pattern_rule="must be a task id (a UUID)", description="The task's id.",
)
IDEMPOTENCY_KEY = Field(
    "idempotency_key", "string", min_length=1, max_length=200,
    # HTTP drops a header value's edge spaces and cannot carry control characters.
    pattern=r"^[!-~]([ -~]*[!-~])?$",
    pattern_rule="must be printable ASCII without leading or trailing spaces",
    description="A repeated create with the same key returns the first task.",
)
IDEMPOTENCY_HEADER = dataclasses.replace(IDEMPOTENCY_KEY, name="Idempotency-Key")
RESULT = Schema("TaskResult", (
    Field("status", "string", enum=("success", "failure"), default="success"),
    Field("output", "string", default=""),
    Field("duration_ms", "integer", minimum=0, maximum=_MAX_SAFE_INTEGER),
    dataclasses.replace(METADATA, default=None),
))

NOT_BEFORE = Field(
    "not_before", "string",
    pattern=r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]"
            r":([0-5][0-9]|60)(\.[0-9]{1,9})?Z$",
    pattern_rule="must be an RFC 3339 UTC time such as 2026-12-03T12:00:00Z",
    description="Not claimable before this time (RFC 3339, UTC).",
)
DELAY_SECONDS = Field(
    "delay_seconds", "integer", minimum=0, maximum=604_800,
    description="Not claimable for this many seconds from now (instead of not_before).",
)
DEPENDS_ON = Field(
    "depends_on", "array", items=dataclasses.replace(TASK_ID, name="depends_on"), max_items=50,
    default=[], normalize=_unique,
    description="Ids of existing tasks that must complete first; until then this one waits, "
                "blocked. One that fails for good, or is cancelled or deleted, cancels this one.",
)
TASK_CREATE = Schema("TaskCreate", (WORK_DIRECTORY, PROMPT, PRIORITY, TAGS, METADATA, MAX_RETRIES,
                                    NOT_BEFORE, DELAY_SECONDS, DEPENDS_ON))
# What a task depends on is fixed at creation, so no dependency can form a cycle.
TASK_UPDATE = Schema("TaskUpdate", tuple(
    f for f in TASK_CREATE.fields if f is not DEPENDS_ON)).partial("TaskUpdate")
# complete and fail may be anonymous while APP_TASK_ANONYMOUS_REPORTS is on (clients
# from before lease tokens send neither field); `_reporter_required` makes a body that
# needs one.
TASK_COMPLETE = Schema("TaskComplete", (
    dataclasses.replace(PROMPT, name="original_prompt", required=False,
                        description="When given, must equal the task's prompt."),
    LEASE_TOKEN,
    WORKER_ID,
    Field("result", "object", schema=RESULT,
          description='Defaults to {"status": "success", "output": ""}.'),
))
TASK_FAIL = Schema("TaskFail", (
    Field("error", "string", required=True, min_length=1, max_length=10_000),
    LEASE_TOKEN,
    WORKER_ID,
    Field("retry", "boolean", default=True,
          description="false makes the failure final whatever the retries left."),
))
TASK_HEARTBEAT = Schema("TaskHeartbeat", (
    LEASE_TOKEN,
    WORKER_ID,
    Field("progress", "string", max_length=4000,
          description="How far the task has got, e.g. the last lines of the agent's output; "
                      "kept on the task as progress, with progress_at."),
), one_of=REPORTER_FIELDS)
TASK_RELEASE = Schema("TaskRelease", (LEASE_TOKEN, WORKER_ID), one_of=REPORTER_FIELDS)
TASK_CANCEL = Schema("TaskCancel", (Field("reason", "string", max_length=1000),))
TASK_RETRY = Schema("TaskRetry", ())
WAIT = Field("wait", "integer", minimum=0, maximum=20, default=0)
CLAIM_QUERY = Schema("ClaimQuery", (
    dataclasses.replace(WORK_DIRECTORY, name="work_path",
                        description="The absolute directory to claim a task for."),
    dataclasses.replace(WORKER_ID, required=True),
    dataclasses.replace(WAIT, description="Seconds to wait for a task when none is waiting; "
                                          "0 answers at once."),
))
READ_QUERY = Schema("ReadQuery", (
    dataclasses.replace(WAIT, description="Seconds to wait for the task to finish (completed, "
                                          "failed or cancelled); 0 answers at once."),
))
_ONE_STATUS = "(" + "|".join(STATUSES) + ")"
TASK_FILTERS = (
    Field("status", "string", pattern=f"^{_ONE_STATUS}(,{_ONE_STATUS})*$",
          pattern_rule="must be one or more of " + ", ".join(STATUSES) + ", comma-separated",
          normalize=lambda text: ",".join(_unique(text.split(","))),
          description="One status, or several separated by commas: waiting,failed."),
    dataclasses.replace(PRIORITY, default=None),
    WORKER_ID,
    dataclasses.replace(WORK_DIRECTORY, required=False),
    dataclasses.replace(TAG, description="Only the tasks with this tag."),
    Field("blocked", "string", enum=("true", "false"),
          description="true: only waiting tasks blocked by a dependency; false: all others."),
    dataclasses.replace(TASK_ID, name="depends_on", required=False,
                        description="Only the tasks that depend on this one."),
    Field("q", "string", min_length=1, max_length=200, normalize=str.casefold,
          description="Text to find in the prompt, the error or the result's output, in any "
                      "case. A scan of the tasks: slower than the other filters."),
)
LIST_QUERY = Schema("ListQuery", (
    *TASK_FILTERS,
    Field("limit", "integer", minimum=1, maximum=1000, default=50,
          description="How many tasks a page holds at most."),
    Field("offset", "integer", minimum=0, maximum=_MAX_SAFE_INTEGER, default=0,
          description="How many of the matching tasks, newest first, to skip."),
))
BULK_LIMIT = 1000  # tasks one bulk call changes at most, so that it holds the lock briefly
TASK_BULK = Schema("TaskBulk", (
    Field("action", "string", required=True, enum=("retry", "cancel", "delete")),
    Field("filter", "object", required=True, schema=Schema("TaskFilter", TASK_FILTERS, min_fields=1),
          description="The list's filters; at least one, so that no call touches every task "
                      "by accident."),
))


def _start(values: dict) -> Callable[[float], float | None]:
    """Take not_before or delay_seconds out of cleaned values: the not_before they give,
    as a function of now (None: claimable at once). ValidationError for both, or for a
    date the calendar does not have."""
    at, seconds = values.pop("not_before", None), values.pop("delay_seconds", None)
    if at is not None and seconds is not None:
        raise _invalid("delay_seconds", "send not_before or delay_seconds, not both")
    if at is not None:
        try:
            moment = _parse_rfc3339(at)
        except ValueError:
            raise _invalid("not_before", "must be a date and time that exists") from None
        return lambda now: moment
    return lambda now: None if seconds is None else now + seconds


def _reporter_required(schema: Schema) -> Schema:
    """The same body with a reporter required: a lease_token or a worker_id."""
    return dataclasses.replace(schema, one_of=REPORTER_FIELDS)


#: The complete and fail bodies with a reporter required, by name: made once, since a
#: store whose anonymous_reports is off checks every report against one.
_REPORTER_REQUIRED = {body.name: _reporter_required(body) for body in (TASK_COMPLETE, TASK_FAIL)}


def _nullable(schema: dict) -> dict:
    """The schema, or null."""
    return {"anyOf": [schema, {"type": "null"}]}


# ---------------------------------------------------------------------------
# Logging: configured by main() only, so importing the module changes nothing
# ---------------------------------------------------------------------------

_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def _log_events(events: list[dict]) -> None:
    """Log the store's transitions, one line each."""
    if not events or not logger.isEnabledFor(logging.INFO):
        return
    for event in events:
        fields = {key: value for key, value in event.items() if key != "action"}
        logger.info("task %s", event["action"], extra=fields)


def _fields(record: logging.LogRecord) -> dict:
    """The fields a log call passed in `extra`."""
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRIBUTES}


class _PrettyFormatter(logging.Formatter):
    """One line for a person: time, level, message, then key=value fields."""

    def format(self, record: logging.LogRecord) -> str:
        pairs = "".join(
            f" {key}={_quote(value)}" for key, value in _fields(record).items() if value is not None
        )
        message = _escape_controls(record.getMessage())
        line = f"{_rfc3339(record.created)} {record.levelname:<7} {message}{pairs}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, msg and the fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": _rfc3339(record.created),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _quote(value: object) -> str:
    """A log value bare when it reads unambiguously, else as a JSON string, controls escaped."""
    text = str(value)
    if _BARE_VALUE.fullmatch(text):
        return text
    return _escape_controls(json.dumps(text, ensure_ascii=False))


#: Characters that could move a terminal's cursor, start an escape sequence or end
#: a line: C0, DEL, C1 and the Unicode line and paragraph separators. Request
#: values reach the log, so these are always escaped: one event, one line of text.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_BARE_VALUE = re.compile(r"[^\s\"=\\\x00-\x1f\x7f-\x9f\u2028\u2029]+")


def _escape_controls(text: str) -> str:
    """The text with every control character written as a \\uXXXX escape."""
    return _CONTROLS.sub(_as_unicode_escape, text)


def _as_unicode_escape(match: re.Match) -> str:
    """A matched character as a \\uXXXX escape."""
    return f"\\u{ord(match.group()):04x}"


def _configure_logging(config: Config) -> None:
    """Send every logger's records to stderr in the configured format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if config.log_format == "json" else _PrettyFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())


# ---------------------------------------------------------------------------
# The data file: what the store changed, written through to SQLite (optional).
# The store decides; the journal only records, in the store's order, from one
# writer thread that commits concurrent changes together (group commit).
# ---------------------------------------------------------------------------

_APPLICATION_ID = 0x4F524348  # "ORCH" in the file's header: this service's database
#: The schema's version, kept in PRAGMA user_version. Columns for Task fields added
#: later are added at open without raising it (an older version ignores them); raise
#: it for any other change, since an older version refuses a newer file.
#: 2: the rows are keyed by the task's number, not its id; and the sequence counter is
#: no longer saved with each change, since the rows carry every number still in use
#: (version 1 would trust its stale counter and hand out numbers that rows hold).
_SCHEMA_VERSION = 2
#: Python types SQLite keeps as they are; a field of any other type is stored as JSON.
_NATIVE_TYPES = {str: "TEXT", int: "INTEGER", float: "REAL", bool: "INTEGER"}

#: Rows one statement writes at most: 32 rows of 29 columns stay under the 999 parameters
#: SQLite allowed before 3.32.
_UPSERT_ROWS = 32
_SET_COUNTER = ("INSERT INTO meta (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value")


@dataclass(frozen=True, slots=True)
class _Column:
    """One column of the tasks table, and how it keeps a Task field."""

    name: str
    attribute: str  #: the Task field it stores
    declaration: str  #: its type and constraints, as CREATE TABLE and ALTER TABLE take them
    encode: Callable[[object], object] | None  #: applied to a value that is not None
    decode: Callable[[object], object] | None  #: applied to a stored value that is not None


def _columns(task_type: type) -> tuple[_Column, ...]:
    """The tasks table's columns, derived from the Task fields so that a new field gets one."""
    hints = typing.get_type_hints(task_type)
    return tuple(_column(item, hints[item.name]) for item in dataclasses.fields(task_type))


def _column(item: dataclasses.Field, hint: object) -> _Column:
    """The column for one Task field: native when SQLite has its type, JSON text otherwise."""
    if item.name == "queue_entry":
        # The entry's rank follows from the priority and its id is the row's own; only seq is news.
        return _Column("queue_seq", item.name, "INTEGER", _queue_seq, None)
    native = _native_type(hint)
    if native is None:
        # _ascii_json escapes all but ASCII, so even a lone surrogate in metadata, which
        # UTF-8 (and so SQLite) cannot carry, is stored as it came.
        encode, decode, sql_type = _ascii_json, json.loads, "TEXT"
    else:
        encode, decode, sql_type = None, (bool if native is bool else None), _NATIVE_TYPES[native]
    declaration = sql_type
    if item.name == "number":
        # The row's key is the task's number, not its random id: new rows go at the end of
        # the table, where a random key would rewrite a page of its index for each.
        declaration += " PRIMARY KEY"
    if item.name in ("id", "version"):
        declaration += " NOT NULL"
    default = _default(item)
    if default is not None:
        # Rows written before the field existed read back as its default.
        declaration += " DEFAULT " + _sql_literal(default if encode is None else encode(default))
    return _Column(item.name, item.name, declaration, encode, decode)


def _native_type(hint: object) -> type | None:
    """The one SQLite-native type a field holds besides None, or None when it must be JSON."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [option for option in typing.get_args(hint) if option is not type(None)]
    else:
        options = [hint]
    if len(options) == 1 and options[0] in _NATIVE_TYPES:
        return options[0]
    return None


def _default(item: dataclasses.Field) -> object:
    """A field's default value, or None when it has none."""
    if item.default is not dataclasses.MISSING:
        return item.default
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return None


def _sql_literal(value: object) -> str:
    """A value as SQL text, for a column's DEFAULT clause, where parameters are not allowed."""
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(int(value) if isinstance(value, bool) else value)


def _queue_seq(entry: tuple) -> int:
    """The seq of a (rank, seq, id) queue entry: the place in its queue a restart must keep."""
    return entry[1]


def _column_list(columns: tuple[_Column, ...]) -> str:
    """The columns' names, quoted, for an INSERT's or a SELECT's list."""
    return ", ".join(f'"{column.name}"' for column in columns)


def _upsert_statement(columns: tuple[_Column, ...], rows: int) -> str:
    """The statement that writes whole rows, each unless the table holds that version or a
    newer one."""
    names = _column_list(columns)
    marks = ", ".join(["(" + ", ".join("?" * len(columns)) + ")"] * rows)
    updates = ", ".join(f'"{column.name}" = excluded."{column.name}"'
                        for column in columns if column.name != "number")
    # The version guard makes a replayed row harmless: an older copy never overwrites a newer one.
    return (f"INSERT INTO tasks ({names}) VALUES {marks} "
            f"ON CONFLICT (number) DO UPDATE SET {updates} WHERE excluded.version > tasks.version")


def _run_in_one_transaction(connection: sqlite3.Connection,
                            statements: list[tuple[str, list]]) -> None:
    """Run each statement with its sets of parameters, all or none; on any error roll back
    and raise."""
    if len(statements) == 1 and len(statements[0][1]) == 1:
        # One statement run once is a transaction of its own, and the usual batch is one
        # upsert. BEGIN and COMMIT would be two more trips through SQLite, each letting
        # go of the GIL, which the writer then waits behind the request threads to get
        # back. (Run once per set of parameters, as for several deletions, each run
        # would commit on its own.)
        connection.executemany(*statements[0])
        return
    connection.execute("BEGIN IMMEDIATE")
    try:
        for sql, parameters in statements:
            connection.executemany(sql, parameters)
        connection.execute("COMMIT")
    except Exception:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


def _lock_beside(path: str) -> int:
    """Open and lock path + ".lock" without waiting; return its descriptor, or raise ConfigError.

    The lock is on a file of its own because SQLite keeps POSIX locks on the
    database itself, which ours must not disturb. The OS drops it when the
    process dies, so even a kill -9 leaves no stale lock behind.
    """
    try:
        descriptor = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise ConfigError(f"cannot use the database file {path}: {error.strerror}") from None
    try:
        _lock_exclusively(descriptor)
    except BlockingIOError:
        os.close(descriptor)
        raise ConfigError(f"the database file {path} is in use by another process") from None
    except OSError as error:
        os.close(descriptor)
        raise ConfigError(f"cannot lock the database file {path}: {error.strerror}") from None
    return descriptor


def _lock_exclusively(descriptor: int) -> None:
    """Lock an open file for this process without waiting; BlockingIOError when another holds it."""
    if fcntl is not None:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    try:
        msvcrt.locking(descriptor, msvcrt.LK_NBLCK, 1)
    except OSError as error:  # Windows reports a lock held elsewhere as a permission error
        raise BlockingIOError(error.errno, error.strerror) from None


def _connect(path: str, sync: str, columns: tuple[_Column, ...]) -> sqlite3.Connection:
    """Open the database, check that it is ours and not newer, and bring its schema up to date."""
    try:
        # It holds prompts and live lease tokens: a file we create is its owner's alone
        # (SQLite gives the -wal and -shm files the same permissions).
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        pass
    except OSError as error:
        raise ConfigError(f"cannot use the database file {path}: {error.strerror}") from None
    try:
        # Transactions are begun and ended explicitly; the writer thread uses the
        # connection after __init__, and close() after the writer has stopped.
        connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as error:
        raise ConfigError(f"cannot use the database file {path}: {error}") from None
    try:
        connection.execute("PRAGMA busy_timeout = 5000")
        _check_owner(connection, path)
        if _scalar(connection, "PRAGMA journal_mode = WAL") != "wal":
            raise ConfigError(f"cannot use the database file {path}: "
                              "its file system does not support write-ahead logging")
        connection.execute(f"PRAGMA synchronous = {sync.upper()}")
        _migrate(connection, columns)
    except sqlite3.Error as error:  # DatabaseError included: "file is not a database"
        connection.close()
        raise ConfigError(f"cannot use the database file {path}: {error}") from None
    except ConfigError:
        connection.close()
        raise
    return connection


def _check_owner(connection: sqlite3.Connection, path: str) -> None:
    """Refuse a file that another program wrote, or that a newer version of this one did."""
    application_id = _scalar(connection, "PRAGMA application_id")
    version = _scalar(connection, "PRAGMA user_version")
    tables = _scalar(connection, "SELECT count(*) FROM sqlite_master WHERE type = 'table'")
    if application_id != _APPLICATION_ID and (tables or application_id):
        raise ConfigError(f"{path} is not this service's database: another program wrote it")
    if version > _SCHEMA_VERSION:
        raise ConfigError(f"{path} was written by a newer version of the service "
                          f"(schema {version}; this version reads up to {_SCHEMA_VERSION})")


def _scalar(connection: sqlite3.Connection, sql: str) -> object:
    """The one value a query or pragma answers."""
    return connection.execute(sql).fetchone()[0]


def _migrate(connection: sqlite3.Connection, columns: tuple[_Column, ...]) -> None:
    """Create the tables, or bring an older file's up to date: the columns that newer Task
    fields need, and from version 1 the rows keyed by number."""
    connection.execute("BEGIN IMMEDIATE")
    declarations = ", ".join(f'"{column.name}" {column.declaration}' for column in columns)
    connection.execute(f"CREATE TABLE IF NOT EXISTS tasks ({declarations})")
    connection.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER)")
    present = {row[1] for row in connection.execute("PRAGMA table_info(tasks)")}
    for column in columns:
        if column.name not in present:
            connection.execute(f'ALTER TABLE tasks ADD COLUMN "{column.name}" {column.declaration}')
    if _scalar(connection, "PRAGMA user_version") == 1:
        # Version 1 keyed the rows by id. A table's key cannot be altered: copy the rows
        # into a table keyed by number, in this same transaction.
        names = _column_list(columns)
        connection.execute(f"CREATE TABLE tasks_by_number ({declarations})")
        connection.execute(f"INSERT INTO tasks_by_number ({names}) SELECT {names} FROM tasks")
        connection.execute("DROP TABLE tasks")
        connection.execute("ALTER TABLE tasks_by_number RENAME TO tasks")
    connection.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
    connection.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
    connection.execute("COMMIT")


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector, which would rescan a bulk load's new objects often."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _decode_column(tasks: list[dict], name: str, decode: Callable[[object], object]) -> None:
    """Decode one column of the loaded rows in place, each distinct stored value once.

    Rows that stored the same text share one decoded value (tags and metadata
    repeat a lot), which is safe because the store replaces a task's lists and
    dicts and never changes them in place.
    """
    decoded: dict[object, object] = {}
    for task in tasks:
        stored = task[name]
        if stored is not None:
            value = decoded.get(stored)
            if value is None:
                value = decoded[stored] = decode(stored)
            task[name] = value


class _Journal:
    """The store's tasks in a SQLite file, written through as whole rows by one thread.

    The store calls record() under its own lock, which only takes the changed
    tasks' column values and hands back a ticket, and wait(ticket) once it has
    released the lock. The writer commits everything queued by then in one
    transaction, so changes made at the same time share one sync to disk. A
    batch that fails fails its waiters and is written again with the next one.

        journal = _Journal("tasks.db")
        rows, counters = journal.load()
        with lock:
            ticket = journal.record([task], [], {"retries_total": 3})
        journal.wait(ticket)  # StorageError if the change could not be saved
        journal.close()
    """

    def __init__(self, path: str, sync: str = "full", retry_seconds: float = 1.0) -> None:
        """Open (creating if needed) and lock the file; ConfigError, naming it, if unusable."""
        if sync not in ("full", "normal"):
            raise ConfigError(f"the journal's sync must be full or normal, not {sync!r}")
        self.path = path  #: the database file
        #: While a failed batch is the last, how often an operation that changed nothing
        #: has it tried again: a full disk is not retried for every read.
        self.retry_seconds = retry_seconds
        self.commits = 0  #: batches committed; fewer than the records means group commit at work
        self._columns = _columns(Task)
        #: By how many rows they write: [n] writes n rows.
        self._upserts = [""] + [_upsert_statement(self._columns, n)
                                for n in range(1, _UPSERT_ROWS + 1)]
        #: Every column's value in one C call, a snapshot of the row; then only the
        #: encoded columns need work.
        self._values = operator.attrgetter(*(column.attribute for column in self._columns))
        self._number = [column.name for column in self._columns].index("number")  #: a row's key
        self._encoded = [(index, column.encode) for index, column in enumerate(self._columns)
                         if column.encode is not None]
        self._counters_on_disk: dict[str, int] = {}  # the writer's: skip rewriting the same
        # Before the lock file is made beside it; SQLite would only say it cannot open it.
        if os.path.isdir(path):
            raise ConfigError(f"cannot use the database file {path}: it is a directory")
        self._lock_descriptor = _lock_beside(path)
        try:
            self._connection = _connect(path, sync, self._columns)
        except BaseException:
            os.close(self._lock_descriptor)
            raise
        #: Appended by record() under the store's lock, which orders the tickets and the
        #: queue alike, so its order is the store's; only the writer pops from it.
        self._queue: deque[tuple[int, list[tuple], list[int], dict]] = deque()
        self._tickets = 0  # the last ticket handed out; guarded by the store's lock
        # The writer's own: what it took from the queue and has not committed yet.
        self._unsaved: dict[int, tuple | None] = {}  # number -> its latest row; None once deleted
        self._unsaved_counters: dict[str, int] = {}
        self._taken = 0  # the last ticket taken from the queue
        #: The journal's own lock (never the store's); it guards the attributes below,
        #: but for ticket_for_no_change's reads of the failure: a stale value there only
        #: fails one more caller, or delays a retry.
        self._guard = threading.Lock()
        self._wake = threading.Condition(self._guard)  # for the writer: a waiter wants a commit
        #: For the waiters, one per batch: the batch being written (the tickets up to _taken)
        #: and the next. A batch that settles wakes only its own waiters: each is one switch
        #: of threads, and waking the next batch's too would only send them back to sleep.
        self._this_batch = threading.Condition(self._guard)
        self._next_batch = threading.Condition(self._guard)
        self._asked = False  # a waiter wants a commit the writer has not started yet
        self._stopping = False
        self._closed = False
        self._committed = 0  # every ticket up to this one is on disk
        self._failed = 0  # the last ticket of the last batch that failed
        self._failed_at = 0.0  # when it failed (time.monotonic())
        self._failure = ""  # why that batch failed
        self._writer = threading.Thread(
            target=self._write, name="orchestrator-journal", daemon=True)
        self._writer.start()

    def load(self) -> tuple[list[dict], dict[str, int]]:
        """Every stored task row as a dict of column -> value, by number, and the counters by name.

        Call it before the first record(): it reads on the writer's connection.
        """
        names = [column.name for column in self._columns]
        selected = _column_list(self._columns)
        with _collector_paused():
            # The number is the table's key: SQLite reads the rows in that order, sorting nothing.
            rows = self._connection.execute(
                f"SELECT {selected} FROM tasks ORDER BY number").fetchall()
            tasks = [dict(zip(names, row)) for row in rows]
            for column in self._columns:
                if column.decode is not None:
                    _decode_column(tasks, column.name, column.decode)
        counters = dict(self._connection.execute("SELECT name, value FROM meta").fetchall())
        return tasks, counters

    def record(self, tasks: list[Task], deleted: list[int], counters: dict[str, int]) -> int:
        """Queue the changed tasks' rows, the numbers of deleted tasks, and counters; return
        the ticket to wait on.

        Call it under the store's lock. It takes each task's column values at
        once, so the store may change the task again as soon as the lock is
        released. It does no I/O and takes no lock, so it cannot stall the store.
        """
        self._tickets += 1
        # The store replaces a task's lists and dicts, never changes them in place, so
        # the values as they are now are a true snapshot of the row.
        rows = [self._values(task) for task in tasks]
        self._queue.append((self._tickets, rows, deleted, counters))
        return self._tickets

    def ticket_for_no_change(self) -> int:
        """The ticket an operation that changed nothing waits for (call it under the store's lock).

        That is the latest record()'s, since what the operation read may include
        it. But when that one's batch failed, at most once per retry_seconds, it
        is a new, empty record's: the writer then tries the failed changes again,
        so that reads answer again once the disk has room, with no write needed.
        """
        last_batch_failed = self._failed == self._tickets and self._committed < self._failed
        if last_batch_failed and time.monotonic() - self._failed_at >= self.retry_seconds:
            return self.record([], [], {})
        return self._tickets

    def wait(self, ticket: int) -> None:
        """Wake the writer and block until this ticket's batch commits; StorageError if it fails."""
        with self._guard:
            if not self._is_settled(ticket):
                self._asked = True
                self._wake.notify()
                while not self._is_settled(ticket):
                    (self._this_batch if ticket <= self._taken else self._next_batch).wait()
            if ticket <= self._committed:
                return
            failure = self._failure if ticket <= self._failed else "the journal is closed"
        raise StorageError(f"could not save the change to {self.path}: {failure}")

    def close(self) -> None:
        """Commit what is queued, stop the writer, close the file and release its lock; idempotent.

        Raises StorageError, once everything is released, when that last commit failed.
        """
        with self._guard:
            if self._stopping:
                return
            self._stopping = True
            self._wake.notify()
        self._writer.join()
        lost = len(self._unsaved) + len(self._unsaved_counters)
        try:
            # Only tidies up: the next open would replay the write-ahead log anyway.
            with contextlib.suppress(sqlite3.Error):
                self._connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._connection.close()
        finally:
            os.close(self._lock_descriptor)
            with self._guard:
                self._closed = True
                self._this_batch.notify_all()
                self._next_batch.notify_all()
        if lost:
            raise StorageError(
                f"could not save the last {lost} changes to {self.path}: {self._failure}")

    # -- the writer thread ---------------------------------------------------

    def _is_settled(self, ticket: int) -> bool:
        """Whether the ticket's batch was committed or failed, or none will come (guard held)."""
        return ticket <= self._committed or ticket <= self._failed or self._closed

    def _write(self) -> None:
        """The writer thread: whenever a waiter asks, commit all that is queued, until close()."""
        while True:
            with self._guard:
                while not self._asked and not self._stopping:
                    self._wake.wait()
                self._asked = False
                stopping = self._stopping
                self._take()  # under the guard, which waiters read _taken under
                # The next batch's condition becomes this batch's; the emptied one (its
                # waiters were all woken when it settled) waits for the batch after.
                self._this_batch, self._next_batch = self._next_batch, self._this_batch
            self._write_batch()
            if stopping:
                return

    def _write_batch(self) -> None:
        """Commit what was taken and what a failed batch left, and tell the waiters how it went."""
        if self._unsaved or self._unsaved_counters:
            try:
                self._commit()
            except sqlite3.Error as error:
                logger.error("could not save %d changes to %s: %s",
                             len(self._unsaved), self.path, error)
                self._settle(str(error))
                return
            except Exception as error:  # a bug, not the disk: the writer lives on for the waiters
                logger.exception("could not save %d changes to %s", len(self._unsaved), self.path)
                self._settle(f"{type(error).__name__}: {error}")
                return
            self._unsaved.clear()
            self._unsaved_counters.clear()
        self._settle(None)

    def _take(self) -> None:
        """Move everything queued into the unsaved changes; the latest change to a row wins."""
        # As many as there are now: under a steady stream of changes the batch still ends.
        for _ in range(len(self._queue)):
            ticket, rows, deleted, counters = self._queue.popleft()
            for row in rows:
                self._unsaved[row[self._number]] = row
            for number in deleted:
                self._unsaved[number] = None
            self._unsaved_counters.update(counters)
            self._taken = ticket

    def _commit(self) -> None:
        """Write the unsaved changes in one transaction; on any error roll it back and raise."""
        rows = [self._encoded_row(row) for row in self._unsaved.values() if row is not None]
        deleted = [(number,) for number, row in self._unsaved.items() if row is None]
        counters = [(name, value) for name, value in self._unsaved_counters.items()
                    if self._counters_on_disk.get(name) != value]
        # Each statement with its sets of parameters. Up to _UPSERT_ROWS rows in one
        # upsert: SQLite lets go of the GIL for each statement it runs, and a batch's
        # requests wait while the writer gets it back.
        chunks = [rows[start:start + _UPSERT_ROWS] for start in range(0, len(rows), _UPSERT_ROWS)]
        statements = [(self._upserts[len(chunk)], [[value for row in chunk for value in row]])
                      for chunk in chunks]
        if deleted:
            statements.append(("DELETE FROM tasks WHERE number = ?", deleted))
        if counters:
            statements.append((_SET_COUNTER, counters))
        _run_in_one_transaction(self._connection, statements)
        self._counters_on_disk.update(counters)
        self.commits += 1

    def _encoded_row(self, row: tuple) -> list:
        """A row's column values, JSON-encoded where the column holds JSON."""
        values = list(row)
        for index, encode in self._encoded:
            if values[index] is not None:
                values[index] = encode(values[index])
        return values

    def _settle(self, failure: str | None) -> None:
        """Publish that the tickets taken are committed, or that their batch failed and why."""
        with self._guard:
            if failure is None:
                self._committed = self._taken
            else:
                self._failed, self._failure = self._taken, failure
                self._failed_at = time.monotonic()
            self._this_batch.notify_all()


# ---------------------------------------------------------------------------
# The store: every task behind one lock; each operation is one step under it
# ---------------------------------------------------------------------------

class _SortedKeys:
    """Keys kept sorted in chunks: add and remove in O(log n + chunk), walk newest first.

    A plain sorted list would move every later key on each insert; chunks of
    at most 2 * CHUNK keys bound that work (the idea of sortedcontainers).
    """

    CHUNK = 256

    def __init__(self) -> None:
        self._chunks: list[list] = []
        self._maxima: list = []  # the last key of each chunk, for bisecting
        self._length = 0

    def __len__(self) -> int:
        return self._length

    def add(self, key: object) -> None:
        """Insert a key that is not present."""
        self._length += 1
        if not self._chunks:
            self._chunks.append([key])
            self._maxima.append(key)
            return
        if key > self._maxima[-1]:  # the common case: a new task is the newest
            index = len(self._chunks) - 1
            self._chunks[index].append(key)
            self._maxima[index] = key
            self._split(index)
            return
        index = min(bisect.bisect_left(self._maxima, key), len(self._chunks) - 1)
        chunk = self._chunks[index]
        bisect.insort(chunk, key)
        self._maxima[index] = chunk[-1]
        self._split(index)

    def _split(self, index: int) -> None:
        """Split a chunk that has grown past twice the chunk size."""
        chunk = self._chunks[index]
        if len(chunk) > 2 * self.CHUNK:
            self._chunks[index:index + 1] = [chunk[:self.CHUNK], chunk[self.CHUNK:]]
            self._maxima[index:index + 1] = [chunk[self.CHUNK - 1], chunk[-1]]

    def remove(self, key: object) -> None:
        """Remove a key that is present."""
        self._length -= 1
        index = bisect.bisect_left(self._maxima, key)
        chunk = self._chunks[index]
        del chunk[bisect.bisect_left(chunk, key)]
        if chunk:
            self._maxima[index] = chunk[-1]
        else:
            del self._chunks[index], self._maxima[index]

    def __reversed__(self) -> Iterator:
        for chunk in reversed(self._chunks):
            yield from reversed(chunk)

    def first(self) -> object | None:
        """The smallest key, or None when there is none."""
        return self._chunks[0][0] if self._chunks else None


@dataclass(slots=True)
class _Directory:
    """One work directory's tasks, counted as they change: what the page shows per queue."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))
    waiting: _SortedKeys = field(default_factory=_SortedKeys)  #: (number, id), oldest first
    holders: dict[str, int] = field(default_factory=dict)  #: worker id -> tasks it holds here


WORKER_MEMORY = 3600  #: seconds a worker is remembered after it was last seen
#: Upper bounds, in seconds, of the buckets of the task_wait and task_run histograms.
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200)


@dataclass(slots=True)
class _Histogram:
    """Durations counted into DURATION_BUCKETS (and one beyond), with their sum."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        """Count one duration in the first bucket whose bound it does not exceed."""
        self.counts[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.total += seconds

    def copy(self) -> _Histogram:
        """A copy to read once the lock is released."""
        return _Histogram(list(self.counts), self.total)


@dataclass(slots=True)
class _WorkerRecord:
    """What the store remembers of a worker it has seen: when, and how its reports went."""

    last_seen: float
    completed: int = 0
    failed: int = 0


def _due(heap: list, now: float) -> bool:
    """Whether the first entry of a (deadline, ...) heap has come due."""
    return bool(heap) and heap[0][0] <= now


def _pop_due(heap: list, now: float) -> Iterator[tuple]:
    """Pop the entries of a (deadline, ...) heap whose deadline has come."""
    while _due(heap, now):
        yield heapq.heappop(heap)


#: What a store operation hands a task out as: a snapshot (Task), or the API's dict.
_View = typing.TypeVar("_View")


class _Transaction:
    """Hold a store's lock for one operation, after applying what time has decided.

    Entering gives (now, events). Before the lock is released, what the
    operation changed is queued for the data file; once it is released, the
    operation waits until that is on disk, so that an answer never shows a
    change the disk has not got (StorageError when it cannot be saved). A
    refusal waits too: its 404 or 409 shows the store as it is, a deletion not
    yet committed included, and becomes a 503 when that cannot be saved. Then
    the events are logged. A class, not a @contextmanager generator: every
    operation goes through here, and the generator cost a microsecond more each
    time.
    """

    __slots__ = ("store", "events")

    def __init__(self, store: TaskStore) -> None:
        self.store = store
        self.events: list[dict] = []

    def __enter__(self) -> tuple[float, list[dict]]:
        """Take the lock and settle; (now, the list the operation appends its events to)."""
        self.store._lock.acquire()
        try:
            now = self.store._clock()
            self.store._settle(now, self.events)
        except BaseException:
            self.__exit__()
            raise
        return now, self.events

    def __exit__(self, *_: object) -> None:
        """Queue the changes, let the lock go and wait for the disk; then log the events."""
        store = self.store
        try:
            try:
                ticket = store._journal_ticket()
            finally:
                store._lock.release()
            if ticket is not None:
                store._journal.wait(ticket)
        finally:
            _log_events(self.events)


class TaskStore:
    """The thread-safe, in-memory store of tasks and their life cycle.

    Every method validates its input against the declarations above, then
    does its work in one step under the lock. With `path`, every change is
    also written to that SQLite file before the method returns, and a new
    store on the same file continues where the last one stopped (close() it
    when done). Time comes from `clock` (epoch seconds), so a test can expire a
    lease without sleeping:

        now = [1000.0]
        store = TaskStore(task_timeout=60, clock=lambda: now[0])
        task, _ = store.create({"work_directory": "/repo", "prompt": "fix it"})
        store.claim("/repo", "agent-1")
        now[0] += 61                      # the lease has expired
        store.get(task.id).status         # 'waiting', retry_count 1

    Methods raise ValidationError for bad input, NotFound for an unknown task,
    Conflict when the task's state or holder forbids the change, and
    StorageError when the data file could not be written. Opening a data file
    that cannot be used raises ConfigError.
    """

    def __init__(
        self,
        max_retries: int = 3,
        task_timeout: float = 3600,
        retention: float = 604_800,
        clock: Callable[[], float] = time.time,
        max_waiters: int = 6,
        max_workers: int = 10_000,
        path: str | None = None,
        sync: str = "full",
        directory_concurrency: int = 0,
        anonymous_reports: bool = True,
        retry_backoff: float = 0,
        retry_backoff_max: float = 600,
    ) -> None:
        self.max_retries = max_retries
        #: How many tasks of one directory may be working at once; 0: any number.
        self.directory_concurrency = directory_concurrency
        #: Whether complete and fail may name no reporter; off, they need a token or a worker id.
        self.anonymous_reports = anonymous_reports
        #: Seconds a re-queued failure waits before it is claimable, doubling with each
        #: retry up to retry_backoff_max; 0: claimable at once.
        self.retry_backoff = retry_backoff
        self.retry_backoff_max = retry_backoff_max
        self.task_timeout = task_timeout
        self.retention = retention  #: seconds finished tasks are kept; 0 keeps them forever
        self._clock = clock
        self._started_at = clock()
        self.max_waiters = max_waiters  #: claims that may wait at once; the rest answer at once
        self.max_workers = max_workers  #: workers remembered at most (the least recent go first)
        #: The lock guards every attribute below. Under it: change state, nothing
        #: else. Logging and JSON encoding happen after it is released.
        self._lock = threading.Lock()
        #: Notified, under the lock, when a waiting request may have what it waits for: a task
        #: entered a queue or freed its directory's slot (claims), finished or went (reads).
        self._may_wake = threading.Condition(self._lock)
        self._waiters = 0
        self._stopping = False
        self._tasks: dict[str, Task] = {}  # by id, in creation order
        self._by_status = {status: _SortedKeys() for status in STATUSES}  # (number, id)
        self._queues: dict[str, list[tuple]] = {}  # directory -> heap of (rank, seq, id)
        self._stale_entries = 0  # queue entries whose task left the queue
        self._delayed: list[tuple] = []  # heap of (not_before, seq, id): waiting, not yet due
        self._delayed_ids: set[str] = set()  # the tasks of its live entries
        self._blocked_ids: set[str] = set()  # waiting tasks with a dependency not completed
        self._dependents: dict[str, list[str]] = {}  # id -> tasks that were blocked by it
        self._directories: dict[str, _Directory] = {}  # only directories that have tasks
        self._holding: dict[str, set[str]] = {}  # worker id -> ids of the tasks it holds
        #: Workers seen in the last hour (claims and reports), least recently seen first.
        self._workers: OrderedDict[str, _WorkerRecord] = OrderedDict()
        self._leases: list[tuple[float, str]] = []  # heap of (lease_expires_at, id)
        self._finished: list[tuple[float, str]] = []  # heap of (completed_at, id)
        #: No entry of the three heaps above, and no worker, comes due before this time:
        #: most operations then look at this one number. It may be early, never late.
        self._next_due = -math.inf
        self._idempotency: dict[str, str] = {}  # key -> task id
        self._sequence = 0  # the last number handed out, for creation order and queue places
        self._completed_seconds = 0.0  # started -> completed, summed over completed tasks
        self._retries_total = 0
        self._expired_leases_total = 0
        # For /metrics, counted since this process started (the two above are kept in
        # the data file, since /statistics shows them).
        self._created_total = dict.fromkeys(PRIORITIES, 0)
        self._claimed_total = 0
        self._finished_total = dict.fromkeys(FINISHED, 0)
        self._wait_seconds = _Histogram()  # created -> claimed
        self._run_seconds = {status: _Histogram() for status in FINISHED}  # claimed -> finished
        self._directories_waiting = 0  # directories with a waiting task
        #: What the current operation changed, to be written to the data file: the task's
        #: number (its row's key) -> the task, or None once deleted.
        self._changed: dict[int, Task | None] = {}
        #: The data file, when there is one; it only records what the store decided.
        self._journal = None if path is None else _Journal(path, sync)
        if self._journal is not None:
            with _collector_paused():  # 100,000 new objects would set it off again and again
                self._restore(*self._journal.load())

    @classmethod
    def from_config(cls, config: Config) -> TaskStore:
        """A store with the configuration's settings; ConfigError when its data file is unusable."""
        # Long-poll claims hold a waitress thread each; two stay free for everything else.
        return cls(config.max_retries, config.task_timeout, config.retention,
                   max_waiters=max(0, config.threads - 2), path=config.data_file,
                   sync=config.data_sync, directory_concurrency=config.directory_concurrency,
                   anonymous_reports=config.anonymous_reports,
                   retry_backoff=config.retry_backoff, retry_backoff_max=config.retry_backoff_max)

    @property
    def path(self) -> str | None:
        """The data file, or None for a store that lives in memory only."""
        return None if self._journal is None else self._journal.path

    def close(self) -> None:
        """Wake waiting claims and close the data file (what is acknowledged is on disk already)."""
        self.stop_waiting()
        if self._journal is not None:
            self._journal.close()

    def __len__(self) -> int:
        """How many tasks the store holds."""
        with self._lock:
            return len(self._tasks)

    @property
    def waiting_requests(self) -> int:
        """How many requests are waiting right now: claims for a task, reads for an end."""
        with self._lock:
            return self._waiters

    # -- the operations ------------------------------------------------------

    def create(self, fields: Mapping[str, object], idempotency_key: str | None = None
               ) -> tuple[Task, bool]:
        """Queue a new task; return it and whether it was created (False: the key was seen)."""
        return self._create(fields, idempotency_key, Task.snapshot)

    # The REST routes call the _private forms of the busiest operations with `view` set
    # to Task.to_dict (or _claimed_dict): the answer is made under the lock, with no
    # snapshot copied first. Its metadata and result are the task's own, which is safe
    # because the store replaces them, never changes them, and the answer is encoded
    # to JSON at once.

    def _create(self, fields: Mapping[str, object], idempotency_key: str | None,
                view: Callable[[Task], _View]) -> tuple[_View, bool]:
        """create(), the task handed out through `view`."""
        values = TASK_CREATE.clean(fields)
        fingerprint = None
        if idempotency_key is not None:
            IDEMPOTENCY_HEADER.clean(idempotency_key, IDEMPOTENCY_HEADER.name)
            fingerprint = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()
        start = _start(values)
        task_id = _new_task_id()
        with self._transaction() as (now, events):
            if idempotency_key in self._idempotency:
                seen = self._tasks[self._idempotency[idempotency_key]]
                if seen.fingerprint != fingerprint:
                    raise Conflict(f"Idempotency-Key was already used with a different body, "
                                   f"by task {seen.id}", task_id=seen.id)
                return view(seen), False
            values["depends_on"] = tuple(values["depends_on"])
            values["tags"] = tuple(values["tags"])
            blocked_by = tuple(self._unfinished_dependencies(values["depends_on"]))
            task = Task(
                id=task_id,
                blocked_by=blocked_by,
                max_retries=values.pop("max_retries", self.max_retries),
                created_at=now,
                updated_at=now,
                number=self._next_sequence(),
                idempotency_key=idempotency_key,
                fingerprint=fingerprint,
                not_before=start(now),
                **values,
            )
            self._tasks[task.id] = task
            self._index(task)
            self._wait_on(task)
            self._place(task, self._next_sequence(), now)
            self._created_total[task.priority] += 1
            if idempotency_key is not None:
                self._idempotency[idempotency_key] = task.id
            self._touch(task)
            events.append(_event("created", task, prompt=_shorten(task.prompt)))
            return view(task), True

    def claim(self, work_path: str, worker_id: str, wait: float = 0) -> Task | None:
        """Hand the next waiting task of a directory to a worker, or None when none waits.

        Next means the highest priority, then the one that entered waiting first.
        With `wait`, an empty directory is waited on for up to that many seconds,
        unless max_waiters claims already wait (then it answers at once).
        """
        return self._claim(
            CLAIM_QUERY.clean({"work_path": work_path, "worker_id": worker_id, "wait": wait}),
            functools.partial(Task.snapshot, with_lease_token=True))

    def _claim(self, query: dict, view: Callable[[Task], _View]) -> _View | None:
        """claim(), its arguments already checked against CLAIM_QUERY (the REST route's are)."""
        lease_token = _new_lease_token()
        task = None
        try:
            with self._transaction() as (now, events):
                task = self._pop_queue(query["work_path"])
                if task is None and query["wait"] and self._waiters < self.max_waiters:
                    task, now = self._wait_until(lambda now: self._pop_queue(query["work_path"]),
                                                 query["wait"], events)
                self._note_worker(query["worker_id"], now)
                if task is None:
                    return None
                task.worker_id = query["worker_id"]  # before the status: the holder is indexed too
                self._set_status(task, WORKING, now)
                task.lease_token, task.token_started_at = lease_token, now
                task.started_at = now
                self._lease(task, now)
                self._claimed_total += 1
                self._wait_seconds.observe(now - task.created_at)
                events.append(_event("claimed", task))
                return view(task)
        except StorageError:  # raised on leaving the transaction, the claim made in memory
            if task is not None:
                self._hand_back_unsaved_claim(task.id, lease_token)
            raise

    def _hand_back_unsaved_claim(self, task_id: str, lease_token: str) -> None:
        """Queue a claimed task again, first of its priority, no retry used: its claim
        could not be saved, so its lease token reached no one, and held, the task would
        wait out its lease."""
        # Refused if the disk is still full (on disk with the next commit that succeeds),
        # or if another request has changed the task since.
        with contextlib.suppress(StorageError, Conflict, NotFound):
            self.release(task_id, {"lease_token": lease_token})

    def complete(self, task_id: str, fields: Mapping[str, object] | None = None) -> Task:
        """Record the holder's result; a result with status "failure" counts as a failure."""
        return self._complete(task_id, fields, Task.snapshot)

    def _complete(self, task_id: str, fields: Mapping[str, object] | None,
                  view: Callable[[Task], _View]) -> _View:
        """complete(), the task handed out through `view`."""
        values = self._report_body(TASK_COMPLETE).clean(fields or {})
        result = values.get("result") or RESULT.clean({})
        with self._transaction() as (now, events):
            task = self._held(task_id, values)
            if values.get("original_prompt", task.prompt) != task.prompt:
                raise Conflict("original_prompt does not match the task's prompt")
            task.result = result
            outcome = FAILED if result["status"] == "failure" else COMPLETED
            self._note_worker(task.worker_id, now, outcome)
            if outcome == FAILED:
                message = result["output"] or "the worker reported a failure"
                self._fail(task, message, True, now, events)
            else:
                self._finish(task, COMPLETED, now)
                events.append(_event("completed", task))
                self._settle_dependents(task, None, now, events)
            return view(task)

    def fail(self, task_id: str, fields: Mapping[str, object]) -> Task:
        """Record the holder's failure: re-queued while retries are left, else failed."""
        values = self._report_body(TASK_FAIL).clean(fields)
        with self._transaction() as (now, events):
            task = self._held(task_id, values)
            self._note_worker(task.worker_id, now, FAILED)
            self._fail(task, values["error"], values["retry"], now, events)
            return task.snapshot()

    def heartbeat(self, task_id: str, fields: Mapping[str, object]) -> Task:
        """Extend the holder's lease to a full task timeout from now."""
        values = TASK_HEARTBEAT.clean(fields)
        with self._transaction() as (now, _):
            task = self._held(task_id, values)
            self._note_worker(task.worker_id, now)
            self._lease(task, now)
            task.updated_at = now
            if "progress" in values:
                task.progress, task.progress_at = values["progress"], now
            return task.snapshot()

    def release(self, task_id: str, fields: Mapping[str, object]) -> Task:
        """Hand a held task back, first of its priority, without counting a retry.

        For a worker at fault rather than the task: it is stopping, or cannot
        start its agent.
        """
        values = TASK_RELEASE.clean(fields)
        with self._transaction() as (now, events):
            task = self._held(task_id, values)
            holder = task.worker_id
            self._note_worker(holder, now)
            # A negative place goes before every task that entered the queue normally.
            self._requeue(task, now, place=-self._next_sequence())
            events.append(_event("released", task, worker_id=holder))
            return task.snapshot()

    def cancel(self, task_id: str, fields: Mapping[str, object] | None = None) -> Task:
        """Stop a waiting or working task for good; the reason goes to error_message."""
        values = TASK_CANCEL.clean(fields or {})
        with self._transaction() as (now, events):
            task = self._find(task_id)
            self._require(task, CANCELLABLE, "cancel")
            self._cancel(task, values.get("reason"), now, events)
            return task.snapshot()

    def retry(self, task_id: str, fields: Mapping[str, object] | None = None) -> Task:
        """Put a failed or cancelled task back in the queue, even past max_retries: a person decided.

        Retrying a failure counts as a retry; bringing back a cancelled task does
        not, since no attempt failed, and keeps a start time of its own still to come.
        No backoff is added or kept.
        """
        TASK_RETRY.clean(fields or {})
        with self._transaction() as (now, events):
            task = self._find(task_id)
            self._require(task, RETRYABLE, "retry")
            missing = self._missing_dependency(task)
            if missing is not None:
                # The store does not keep whether the dependency completed before it
                # went; a task that never ran would wait for it forever.
                raise Conflict(f"task {task.id} depends on task {missing}, which is gone "
                               "(deleted, or dropped after retention); a task that has not run "
                               "cannot be retried without its dependencies")
            self._retry(task, now, events)
            return task.snapshot()

    def stop_waiting(self) -> None:
        """Wake every waiting claim, and make later ones answer at once: for shutdown."""
        with self._lock:
            self._stopping = True
            self._wake_waiters()

    def get(self, task_id: str, wait: float = 0) -> Task:
        """The task with that id; with `wait`, once it has finished or that many seconds
        have passed (at once when max_waiters requests already wait)."""
        return self._get(task_id, READ_QUERY.clean({"wait": wait}), Task.snapshot)

    def _get(self, task_id: str, query: dict, view: Callable[[Task], _View]) -> _View:
        """get(), its arguments already checked against READ_QUERY (the REST route's are)."""
        def finished(now: float) -> Task | None:
            task = self._find(task_id)  # NotFound once deleted
            return task if task.status in FINISHED else None

        with self._transaction() as (now, events):
            task = self._find(task_id)
            if task.status not in FINISHED and query["wait"] and self._waiters < self.max_waiters:
                task = self._wait_until(finished, query["wait"], events)[0] or task
            return view(task)

    def update(self, task_id: str, fields: Mapping[str, object]) -> Task:
        """Change a waiting task's fields; a new priority or directory keeps its place in time."""
        values = TASK_UPDATE.clean(fields)
        start = _start(values) if values.keys() & {"not_before", "delay_seconds"} else None
        with self._transaction() as (now, events):
            task = self._find(task_id)
            self._require(task, (WAITING,), "update")
            if start is not None:
                values["not_before"] = start(now)
            moves = values.keys() & {"priority", "work_directory", "not_before"}
            seq = task.queue_entry[1]  # its place in time survives the move
            if moves:
                self._unqueue(task)
                self._unindex(task)  # its directory's counts may change
            for name, value in values.items():
                setattr(task, name, tuple(value) if name == "tags" else value)
            if moves:
                self._index(task)
                self._place(task, seq, now)
            task.updated_at = now
            self._touch(task)
            events.append(_event("updated", task))
            return task.snapshot()

    def delete(self, task_id: str) -> None:
        """Remove a task in any state."""
        with self._transaction() as (now, events):
            self._delete(self._find(task_id), now, events)

    def list(self, filters: Mapping[str, object] | None = None) -> dict:
        """A page of tasks, newest first: {"tasks", "total", "limit", "offset", "has_more"}.

        Unfiltered, or filtered by status only, the page costs O(limit + offset);
        other filters (and the text search `q` above all) scan the tasks.
        """
        query = LIST_QUERY.clean(filters or {})
        limit, offset = query.pop("limit"), query.pop("offset")
        with self._transaction():
            matching, total = self._matching(query)
            if total is None:
                matching = list(matching)
                total = len(matching)
            page = list(itertools.islice(matching, offset, offset + limit))
            tasks = [task.snapshot() for task in page]
        return {
            "tasks": tasks,
            "total": total,
            "limit": limit,
            "offset": offset,
            "has_more": offset + len(tasks) < total,
        }

    def health(self) -> dict:
        """The few numbers /health shows: uptime, and how many tasks, waiting and working."""
        with self._transaction() as (now, _):
            return {
                "uptime_seconds": round(now - self._started_at, 3),
                "tasks": {"total": len(self._tasks), "waiting": len(self._by_status[WAITING]),
                          "working": len(self._by_status[WORKING])},
            }

    def statistics(self) -> dict:
        """Counts by status, success rate, retries, expired leases, mean duration; O(1)."""
        with self._transaction() as (now, _):
            counts = {status: len(self._by_status[status]) for status in STATUSES}
            total = len(self._tasks)
            completed_seconds = self._completed_seconds
            retries, expired = self._retries_total, self._expired_leases_total
            delayed, blocked = len(self._delayed_ids), len(self._blocked_ids)
        finished = counts[COMPLETED] + counts[FAILED]
        return {
            "total_tasks": total,
            **{f"{status}_tasks": count for status, count in counts.items()},
            "active_tasks": counts[WAITING] + counts[WORKING],
            "delayed_tasks": delayed,
            "blocked_tasks": blocked,
            "success_rate": round(counts[COMPLETED] / finished, 4) if finished else 0.0,
            "retries_total": retries,
            "expired_leases_total": expired,
            "average_duration_ms": (
                round(1000 * completed_seconds / counts[COMPLETED], 1) if counts[COMPLETED] else None
            ),
            "uptime_seconds": round(now - self._started_at, 3),
        }

    def metrics(self) -> dict:
        """The numbers /metrics shows: counts the store keeps as tasks change, so O(1)."""
        with self._transaction() as (now, _):
            return {
                "tasks": {status: len(self._by_status[status]) for status in STATUSES},
                "delayed": len(self._delayed_ids),
                "blocked": len(self._blocked_ids),
                "oldest_waiting_age": self._age_of_oldest(self._by_status[WAITING], now) or 0,
                "directories_waiting": self._directories_waiting,
                "workers_busy": len(self._holding),  # expired leases were settled above
                "uptime": now - self._started_at,
                "created": dict(self._created_total),
                "claimed": self._claimed_total,
                "finished": dict(self._finished_total),
                "retried": self._retries_total,
                "lease_expirations": self._expired_leases_total,
                "wait_seconds": self._wait_seconds.copy(),
                "run_seconds": {status: h.copy() for status, h in self._run_seconds.items()},
            }

    def directories(self) -> list[dict]:
        """Each work directory that has tasks, by name: counts by status, the age of its
        oldest waiting task, the workers holding its tasks. O(directories), never a scan."""
        with self._transaction() as (now, _):
            seen = [(name, dict(directory.counts), self._age_of_oldest(directory.waiting, now),
                     list(directory.holders)) for name, directory in self._directories.items()]
        return [{"work_directory": name, "counts": counts, "oldest_waiting_age_seconds": age,
                 "workers": sorted(holders)} for name, counts, age, holders in sorted(seen)]

    def workers(self) -> list[dict]:
        """The workers seen in the last WORKER_MEMORY seconds, most recent first: when, what
        they hold, and how many tasks they completed and failed."""
        with self._transaction():
            seen = [(worker_id, dataclasses.replace(record), list(self._holding.get(worker_id, ())))
                    for worker_id, record in reversed(self._workers.items())]
        return [{"worker_id": worker_id, "last_seen": _rfc3339(record.last_seen),
                 "holding": sorted(holding), "completed": record.completed,
                 "failed": record.failed} for worker_id, record, holding in seen]

    def bulk(self, fields: Mapping[str, object]) -> dict:
        """Retry, cancel or delete up to BULK_LIMIT tasks that match a (non-empty) filter.

        Tasks whose state forbids the action are skipped; `more` says whether
        matches beyond the limit were left for another call.
        """
        values = TASK_BULK.clean(fields)
        action, query = values["action"], values["filter"]
        with self._transaction() as (now, events):
            matching = list(itertools.islice(self._matching(query)[0], BULK_LIMIT + 1))
            changed = 0
            for task in matching[:BULK_LIMIT]:
                changed += self._bulk_one(action, task, now, events)
        return {"action": action, "changed": changed,
                "skipped": min(len(matching), BULK_LIMIT) - changed,
                "more": len(matching) > BULK_LIMIT}

    # -- one step under the lock ---------------------------------------------

    def _transaction(self) -> _Transaction:
        """One operation under the lock: `with self._transaction() as (now, events):`."""
        return _Transaction(self)

    def _journal_ticket(self) -> int | None:
        """Queue this operation's changes for the data file; the ticket to wait for (lock held).

        An operation that changed nothing still waits for the changes queued
        before it: what it read may include them. It may retry a failed batch.
        """
        if self._journal is None:
            return None
        if not self._changed:
            return self._journal.ticket_for_no_change()
        tasks, deleted = [], []
        for number, task in self._changed.items():
            if task is None:
                deleted.append(number)
            else:
                task.version += 1
                tasks.append(task)
        self._changed = {}
        # Not the sequence: every number and queue place still in use is in a row, and a
        # restart goes on above the highest (_restore). One that no row holds any more
        # may be handed out again, which nothing can tell. Left out, a batch of creates
        # is one statement, which the journal commits in one trip through SQLite.
        counters = {"retries_total": self._retries_total,
                    "expired_leases_total": self._expired_leases_total}
        return self._journal.record(tasks, deleted, counters)

    def _settle(self, now: float, events: list[dict]) -> None:
        """Queue the delayed tasks that are due, fail the leases that expired, drop
        finished tasks past retention, forget workers unseen for WORKER_MEMORY seconds.

        Every operation starts here, and mostly nothing is due: that case costs one
        comparison with _next_due.
        """
        if now < self._next_due:
            return
        if _due(self._delayed, now):
            self._queue_due(now)
        if _due(self._leases, now):
            self._expire_leases(now, events)
        if self.retention:
            self._drop_retained(now, events)
        self._forget_workers(now)
        self._next_due = self._earliest_deadline()

    def _earliest_deadline(self) -> float:
        """When the first of the heaps' entries, or of the workers, comes due.

        Each deadline is the very sum its check compares with now, so that
        rounding cannot put _next_due after it.
        """
        return min(
            self._delayed[0][0] if self._delayed else math.inf,
            self._leases[0][0] if self._leases else math.inf,
            self._finished[0][0] + self.retention if self.retention and self._finished
            else math.inf,
            next(iter(self._workers.values())).last_seen + WORKER_MEMORY if self._workers
            else math.inf,
        )

    def _due_by(self, deadline: float) -> None:
        """Note an entry that comes due at `deadline`, so that _settle looks for it then."""
        if deadline < self._next_due:
            self._next_due = deadline

    def _queue_due(self, now: float) -> None:
        """Move the delayed tasks whose not_before has come into their queues."""
        for entry in _pop_due(self._delayed, now):
            task = self._tasks.get(entry[2])
            if task is not None and task.queue_entry is entry:
                self._delayed_ids.discard(task.id)
                self._enqueue(task, entry[1])

    def _expire_leases(self, now: float, events: list[dict]) -> None:
        """Fail the tasks whose lease ran out: each is retried while retries are left."""
        for deadline, task_id in _pop_due(self._leases, now):
            task = self._tasks.get(task_id)
            if task is not None and task.status == WORKING and task.lease_expires_at == deadline:
                self._expired_leases_total += 1
                events.append(_event("lease expired", task))
                self._fail(task, "lease expired", True, now, events)

    def _drop_retained(self, now: float, events: list[dict]) -> None:
        """Remove the tasks that finished `retention` seconds ago or more.

        As with a deletion, a task retried to wait for one of them is cancelled.
        """
        while self._finished and self._finished[0][0] + self.retention <= now:
            finished_at, task_id = heapq.heappop(self._finished)
            task = self._tasks.get(task_id)
            if task is not None and task.status in FINISHED and task.completed_at == finished_at:
                self._remove(task)
                events.append(_event("dropped after retention", task))
                self._settle_dependents(task, "was dropped after retention", now, events)

    def _wait_until(self, ready: Callable[[float], Task | None], seconds: float,
                    events: list[dict]) -> tuple[Task | None, float]:
        """Sleep until ready(now) gives a task or `seconds` pass (lock held): a long-poll
        claim, or a read waiting for a task to finish.

        Returns the task (or None) and the time it was got. The wait itself is
        measured in real seconds: it is how long a request is held, whatever clock
        the store keeps. A lease that expires meanwhile ends a sleep, so that what
        its expiry changes (a task re-queued, or failed for good) is seen here.
        """
        give_up_at = time.monotonic() + seconds
        self._waiters += 1
        try:
            while not self._stopping:
                remaining = give_up_at - time.monotonic()
                if remaining <= 0:
                    break
                for deadlines in (self._leases, self._delayed):  # an expiry, a task due
                    if deadlines:
                        remaining = min(remaining, max(0.0, deadlines[0][0] - self._clock()))
                self._may_wake.wait(remaining)
                now = self._clock()
                self._settle(now, events)
                task = ready(now)
                if task is not None:
                    return task, now
            return None, self._clock()
        finally:
            self._waiters -= 1

    # -- reading and changing many (lock held) ----------------------------------

    def _matching(self, query: dict) -> tuple[Iterator[Task], int | None]:
        """The tasks that pass the filters, newest first, and how many when that is known
        without a scan (no filters but status)."""
        newest, total = self._newest(query.pop("status", None))
        if not query:
            return newest, total
        return (task for task in newest if _matches(task, query)), None

    def _newest(self, status: str | None) -> tuple[Iterator[Task], int]:
        """The tasks with one of the comma-separated statuses (any, for None), newest first,
        and how many."""
        if status is None:
            return reversed(self._tasks.values()), len(self._tasks)
        statuses = status.split(",")
        lanes = [reversed(self._by_status[status]) for status in statuses]
        keys = lanes[0] if len(lanes) == 1 else heapq.merge(*lanes, reverse=True)
        total = sum(len(self._by_status[status]) for status in statuses)
        return (self._tasks[task_id] for _, task_id in keys), total

    def _age_of_oldest(self, waiting: _SortedKeys, now: float) -> float | None:
        """Seconds since the oldest of these waiting tasks was created; None when none waits."""
        oldest = waiting.first()
        return None if oldest is None else round(now - self._tasks[oldest[1]].created_at, 3)

    def _bulk_one(self, action: str, task: Task, now: float, events: list[dict]) -> bool:
        """One task's part of a bulk action; False when its state forbids it."""
        if action == "delete":
            self._delete(task, now, events)
        elif action == "cancel" and task.status in CANCELLABLE:
            self._cancel(task, None, now, events)
        elif action == "retry" and task.status in RETRYABLE and (
                self._missing_dependency(task) is None):
            self._retry(task, now, events)
        else:
            return False
        return True

    # -- transitions (lock held) ---------------------------------------------

    def _fail(self, task: Task, message: str, retry: bool, now: float, events: list[dict]) -> None:
        """A failed attempt: back to waiting while retries are left and wanted, else failed."""
        task.error_message = message
        if retry and task.retry_count < task.max_retries:
            task.retry_count += 1
            self._retries_total += 1
            self._requeue(task, now, not_before=self._backoff(task, now))
            events.append(_event("re-queued", task, error=_shorten(message)))
        else:
            self._finish(task, FAILED, now)
            events.append(_event("failed", task, error=_shorten(message)))
            self._settle_dependents(task, "failed", now, events)

    def _delete(self, task: Task, now: float, events: list[dict]) -> None:
        """A task removed, in any state; the tasks waiting for it are cancelled."""
        self._remove(task)
        events.append(_event("deleted", task))
        self._settle_dependents(task, "was deleted", now, events)

    def _cancel(self, task: Task, reason: str | None, now: float, events: list[dict]) -> None:
        """A waiting or working task stopped for good; the reason, if any, as its error."""
        if task.status == WAITING:
            self._unqueue(task)
            task.blocked_by = ()  # it waits for nothing any more
        if reason is not None:
            task.error_message = reason
        self._finish(task, CANCELLED, now)
        events.append(_event("cancelled", task))
        self._settle_dependents(task, "was cancelled", now, events)

    def _retry(self, task: Task, now: float, events: list[dict]) -> None:
        """A failed or cancelled task queued again; only a failure counts as a retry."""
        # A task cancelled before its own start time comes back still delayed. Once an
        # attempt has failed, a not_before still to come is a backoff's: not kept.
        own_start = task.retry_count == 0 and task.not_before is not None and task.not_before > now
        if task.status == FAILED:
            task.retry_count += 1
            self._retries_total += 1
        task.blocked_by = () if _has_run(task) else tuple(
            self._unfinished_dependencies(task.depends_on, new=False))
        self._wait_on(task)
        self._requeue(task, now, not_before=task.not_before if own_start else None)
        events.append(_event("re-queued", task))

    def _unfinished_dependencies(self, depends_on: list[str], new: bool = True) -> list[str]:
        """Of a task's dependencies, those not completed yet; ValidationError for an id the
        store does not have. A new task may not depend on one that failed or was cancelled
        (Conflict); a retried one waits for it to be retried and complete."""
        unfinished = []
        for task_id in depends_on:
            dependency = self._tasks.get(task_id)
            if dependency is None:
                raise ValidationError(f"depends_on: there is no task {task_id}",
                                      field="depends_on")
            if new and dependency.status in (FAILED, CANCELLED):
                raise Conflict(f"depends on task {task_id}, which is {dependency.status}; "
                               "retry it first")
            if dependency.status != COMPLETED:
                unfinished.append(task_id)
        return unfinished

    def _missing_dependency(self, task: Task) -> str | None:
        """A dependency the store no longer has, if the task has not run: it cannot be retried."""
        if _has_run(task):
            return None
        return next((task_id for task_id in task.depends_on if task_id not in self._tasks), None)

    def _wait_on(self, task: Task) -> None:
        """Note the task among the dependents of each dependency that blocks it."""
        for task_id in task.blocked_by:
            self._dependents.setdefault(task_id, []).append(task.id)

    def _settle_dependents(self, task: Task, ended: str | None, now: float,
                           events: list[dict]) -> None:
        """What a task's end means for the tasks blocked by it: completed (ended None),
        one less dependency; failed, cancelled, deleted or dropped, each of them cancelled,
        and theirs in turn. O(dependents), without recursion however long the chain."""
        if task.id not in self._dependents:
            return  # most tasks: nothing waits for them
        cause = f"task {task.id} {ended}"  # named in every cancelled task's error
        pending = [(task.id, ended)]
        while pending:
            task_id, ended = pending.pop()
            for dependent_id in self._dependents.pop(task_id, ()):
                dependent = self._tasks.get(dependent_id)
                if (dependent is None or dependent.status != WAITING
                        or task_id not in dependent.blocked_by):
                    continue  # gone, or no longer waiting for it (cancelled, retried since)
                dependent.blocked_by = tuple(d for d in dependent.blocked_by if d != task_id)
                self._touch(dependent)
                if ended is None and not dependent.blocked_by:
                    self._blocked_ids.discard(dependent.id)
                    self._place(dependent, dependent.queue_entry[1], now)
                elif ended is not None:
                    self._unqueue(dependent)
                    dependent.blocked_by = ()
                    dependent.error_message = (
                        f"depends on task {task_id}, which {ended}" if task_id == task.id
                        else f"depends on task {task_id}, which was cancelled because {cause}")
                    self._finish(dependent, CANCELLED, now)
                    events.append(_event("cancelled", dependent,
                                         error=_shorten(dependent.error_message)))
                    pending.append((dependent.id, "was cancelled"))

    def _backoff(self, task: Task, now: float) -> float | None:
        """When a failed task may be claimed again: retry_backoff doubled with each retry,
        at most retry_backoff_max, give or take 10 % so that failures do not come back in
        step; None (at once) without a backoff."""
        if not self.retry_backoff:
            return None
        delay = min(self.retry_backoff_max, self.retry_backoff * 2 ** (task.retry_count - 1))
        return now + delay * random.uniform(0.9, 1.1)

    def _requeue(self, task: Task, now: float, place: int | None = None,
                 not_before: float | None = None) -> None:
        """Back to waiting, with no holder: at the back of its priority, or at `place`;
        claimable from `not_before`, or at once."""
        self._set_status(task, WAITING, now)
        task.worker_id = task.started_at = task.completed_at = task.lease_expires_at = None
        task.lease_token = task.token_started_at = task.progress = task.progress_at = None
        task.not_before = not_before
        self._place(task, self._next_sequence() if place is None else place, now)

    def _finish(self, task: Task, status: str, now: float) -> None:
        """Into a final state; retention counts from now."""
        self._wake_waiters()  # a read may wait for this
        self._finished_total[status] += 1
        if task.status == WORKING:
            self._run_seconds[status].observe(now - task.started_at)
        task.lease_expires_at = task.lease_token = task.token_started_at = None
        # Before the status: indexing a completed task adds its duration, which
        # needs completed_at.
        task.completed_at = now
        self._set_status(task, status, now)
        if self.retention:
            heapq.heappush(self._finished, (now, task.id))
            self._due_by(now + self.retention)

    def _lease(self, task: Task, now: float) -> None:
        """Give the holder a lease of one task timeout from now."""
        task.lease_expires_at = now + self.task_timeout
        heapq.heappush(self._leases, (task.lease_expires_at, task.id))
        self._due_by(task.lease_expires_at)
        self._touch(task)

    def _set_status(self, task: Task, status: str, now: float) -> None:
        """Move a task to another status, keeping the indexes and counters true."""
        self._unindex(task)
        task.status = status
        task.updated_at = now
        self._index(task)
        self._touch(task)

    def _remove(self, task: Task) -> None:
        """Forget a task entirely: indexes, queue entry and idempotency key."""
        self._wake_waiters()  # a read waiting for it answers 404
        if task.status == WAITING:
            self._unqueue(task)
        self._unindex(task)
        del self._tasks[task.id]
        self._idempotency.pop(task.idempotency_key, None)
        if self._journal is not None:
            self._changed[task.number] = None

    def _note_worker(self, worker_id: str, now: float, outcome: str | None = None) -> None:
        """Note a worker's claim or report (and a report's outcome); forget the stale ones."""
        record = self._workers.pop(worker_id, None) or _WorkerRecord(now)
        record.last_seen = now
        if outcome == COMPLETED:
            record.completed += 1
        elif outcome == FAILED:
            record.failed += 1
        self._workers[worker_id] = record  # now the most recently seen
        self._due_by(now + WORKER_MEMORY)
        if len(self._workers) > self.max_workers:
            self._workers.popitem(last=False)

    def _forget_workers(self, now: float) -> None:
        """Drop the workers unseen for WORKER_MEMORY seconds."""
        while self._workers:
            oldest = next(iter(self._workers.values()))
            if oldest.last_seen + WORKER_MEMORY > now:
                break
            self._workers.popitem(last=False)

    def _wake_waiters(self) -> None:
        """Let the waiting requests look again (lock held); nothing to do when none waits."""
        if self._waiters:
            self._may_wake.notify_all()

    def _touch(self, task: Task) -> None:
        """Note a changed task, to be written to the data file with this operation."""
        if self._journal is not None:
            self._changed[task.number] = task

    def _next_sequence(self) -> int:
        """The next number of the store's one sequence: creation order and queue places."""
        self._sequence += 1
        return self._sequence

    # -- indexes (lock held) -------------------------------------------------

    def _index(self, task: Task) -> None:
        """Count the task under its status, its directory and (while working) its holder."""
        key = (task.number, task.id)
        self._by_status[task.status].add(key)
        directory = self._directories.get(task.work_directory)
        if directory is None:
            directory = self._directories[task.work_directory] = _Directory()
        directory.counts[task.status] += 1
        if task.status == WAITING:
            directory.waiting.add(key)
            self._directories_waiting += directory.counts[WAITING] == 1
        elif task.status == WORKING:
            directory.holders[task.worker_id] = directory.holders.get(task.worker_id, 0) + 1
            self._holding.setdefault(task.worker_id, set()).add(task.id)
        elif task.status == COMPLETED:
            self._completed_seconds += task.completed_at - task.started_at

    def _unindex(self, task: Task) -> None:
        """Stop counting the task where _index counted it; forget an emptied directory."""
        key = (task.number, task.id)
        self._by_status[task.status].remove(key)
        directory = self._directories[task.work_directory]
        directory.counts[task.status] -= 1
        if task.status == WAITING:
            directory.waiting.remove(key)
            self._directories_waiting -= directory.counts[WAITING] == 0
        elif task.status == WORKING:
            _count_down(directory.holders, task.worker_id)
            held = self._holding[task.worker_id]
            held.discard(task.id)
            if not held:
                del self._holding[task.worker_id]
            if self.directory_concurrency:
                self._wake_waiters()  # a claim may have waited for this slot
        elif task.status == COMPLETED:
            self._completed_seconds -= task.completed_at - task.started_at
        if not any(directory.counts.values()):
            del self._directories[task.work_directory]

    def _place(self, task: Task, seq: int, now: float) -> None:
        """Put a waiting task in its queue, or aside: blocked until its dependencies have
        completed, or delayed until its not_before."""
        if task.blocked_by:
            task.queue_entry = (math.inf, seq, task.id)  # in no queue: keeps its place in time
            self._blocked_ids.add(task.id)
            return
        if task.not_before is None or task.not_before <= now:
            self._enqueue(task, seq)
            return
        task.queue_entry = (task.not_before, seq, task.id)  # its place in time, kept for later
        heapq.heappush(self._delayed, task.queue_entry)
        self._due_by(task.not_before)
        self._delayed_ids.add(task.id)

    def _enqueue(self, task: Task, seq: int) -> None:
        """Put a waiting task in its directory's queue at position `seq` of its priority."""
        task.queue_entry = (_PRIORITY_RANK[task.priority], seq, task.id)
        heapq.heappush(self._queues.setdefault(task.work_directory, []), task.queue_entry)
        self._wake_waiters()

    def _unqueue(self, task: Task) -> None:
        """Take a waiting task out of its queue: its entry goes stale, to be skipped later."""
        task.queue_entry = None
        self._delayed_ids.discard(task.id)
        self._blocked_ids.discard(task.id)
        self._stale_entries += 1
        if self._stale_entries > len(self._by_status[WAITING]) + 1024:
            self._compact_queues()

    def _pop_queue(self, directory: str) -> Task | None:
        """The next live task of a directory's queue, taken out of it; None when none waits,
        or when the directory already has as many working tasks as it may."""
        if self.directory_concurrency and directory in self._directories and (
            self._directories[directory].counts[WORKING] >= self.directory_concurrency
        ):
            return None
        heap = self._queues.get(directory)
        task = None
        while heap and task is None:
            entry = heapq.heappop(heap)
            candidate = self._tasks.get(entry[2])
            if candidate is not None and candidate.queue_entry is entry:
                task = candidate
                task.queue_entry = None
            else:
                self._stale_entries -= 1
        if heap is not None and not heap:
            del self._queues[directory]
        return task

    def _compact_queues(self) -> None:
        """Rebuild the queues without stale entries, so cancelled tasks do not pile up."""
        live = {}
        for directory, heap in self._queues.items():
            entries = [e for e in heap if self._tasks.get(e[2]) and self._tasks[e[2]].queue_entry is e]
            if entries:
                heapq.heapify(entries)
                live[directory] = entries
        self._queues = live
        self._delayed = [e for e in self._delayed if e[2] in self._delayed_ids
                         and self._tasks[e[2]].queue_entry is e]
        heapq.heapify(self._delayed)
        self._stale_entries = 0

    # -- the data file (at start) -------------------------------------------

    def _restore(self, rows: list[dict], counters: Mapping[str, int]) -> None:
        """Rebuild memory from the data file: tasks, queues, leases, retention, keys, counters.

        Rows come in creation order, so the newest-first indexes and the dict's
        order are as they were. A lease that ran out meanwhile expires at the
        first operation, counted as usual; a delayed task that came due meanwhile
        enters its queue then.
        """
        with self._lock:
            for row in rows:
                place = row.pop("queue_seq")
                task = Task(**row)
                task.tags = tuple(task.tags)
                task.depends_on, task.blocked_by = tuple(task.depends_on), tuple(task.blocked_by)
                if task.token_started_at != task.started_at:
                    task.lease_token = None  # left from an earlier claim: it fences nothing
                self._tasks[task.id] = task
                self._index(task)
                # Into lists first, made heaps once below: cheaper than a push per task.
                if task.status == WAITING and task.blocked_by:
                    task.queue_entry = (math.inf, place, task.id)
                    self._blocked_ids.add(task.id)
                    self._wait_on(task)
                elif task.status == WAITING and task.not_before is not None:
                    task.queue_entry = (task.not_before, place, task.id)
                    self._delayed.append(task.queue_entry)
                    self._delayed_ids.add(task.id)
                elif task.status == WAITING:
                    task.queue_entry = (_PRIORITY_RANK[task.priority], place, task.id)
                    self._queues.setdefault(task.work_directory, []).append(task.queue_entry)
                elif task.status == WORKING:
                    self._leases.append((task.lease_expires_at, task.id))
                elif self.retention:
                    self._finished.append((task.completed_at, task.id))
                if task.idempotency_key is not None:
                    self._idempotency[task.idempotency_key] = task.id
            for heap in (*self._queues.values(), self._leases, self._finished, self._delayed):
                heapq.heapify(heap)
            # A file from version 1 saved the counter, which may be higher than any row.
            self._sequence = max(counters.get("sequence", 0), self._highest_sequence_held())
            self._retries_total = counters.get("retries_total", 0)
            self._expired_leases_total = counters.get("expired_leases_total", 0)

    def _highest_sequence_held(self) -> int:
        """The highest number or queue place any task holds (lock held); 0 with no tasks."""
        numbers = (task.number for task in self._tasks.values())
        places = (abs(task.queue_entry[1]) for task in self._tasks.values()
                  if task.queue_entry is not None)  # abs: a released task's place is below 0
        return max(max(numbers, default=0), max(places, default=0))

    # -- lookups (lock held) -------------------------------------------------

    def _find(self, task_id: str) -> Task:
        """The task with that id, or NotFound."""
        task = self._tasks.get(task_id)
        if task is None:
            raise NotFound(f"task {_shorten(task_id)} not found")
        return task

    def _report_body(self, body: Schema) -> Schema:
        """A complete or fail body as this store takes it: anonymous, or naming its reporter."""
        return body if self.anonymous_reports else _REPORTER_REQUIRED[body.name]

    def _held(self, task_id: str, reporter: Mapping[str, object]) -> Task:
        """The working task a report is about, held by the reporter it names; Conflict otherwise.

        A lease token names one claim exactly, so it is checked first: a worker
        id names only a worker, which may have claimed the same task again since.
        """
        task = self._find(task_id)
        token = reporter.get("lease_token")
        if token is not None and not (task.status == WORKING and task.lease_token is not None
                                      and hmac.compare_digest(token, task.lease_token)):
            ended = f"the task is {task.status}" if task.status != WORKING else \
                "the task is held under another lease"
            raise Conflict(f"task {task.id}: this lease is over ({ended})")
        self._require(task, (WORKING,), "report on")
        worker_id = reporter.get("worker_id")
        if worker_id is not None and worker_id != task.worker_id:
            raise Conflict(f"task {task.id} is not held by worker {worker_id}")
        return task

    @staticmethod
    def _require(task: Task, statuses: tuple[str, ...], action: str) -> None:
        """Conflict unless the task is in one of the statuses."""
        if task.status not in statuses:
            raise Conflict(
                f"task {task.id} is {task.status}; can only {action} a "
                f"{' or '.join(statuses)} task"
            )


def _has_run(task: Task) -> bool:
    """Whether a finished task was claimed since it was last queued (it keeps started_at).

    It was claimed only once every dependency had completed, and a completed task
    stays completed: a dependency gone since, deleted or dropped after retention,
    had completed, and the task waits for none of them.
    """
    return task.started_at is not None


def _count_down(counts: dict[str, int], key: str) -> None:
    """Take one from a count, dropping it at zero so that the dict holds live keys only."""
    counts[key] -= 1
    if not counts[key]:
        del counts[key]


def _matches(task: Task, query: Mapping[str, object]) -> bool:
    """Whether a task passes the filters other than status."""
    return (
        query.get("priority", task.priority) == task.priority
        and query.get("worker_id", task.worker_id) == task.worker_id
        and query.get("work_directory", task.work_directory) == task.work_directory
        and ("tag" not in query or query["tag"] in task.tags)
        and ("q" not in query or _mentions(task, query["q"]))
        and query.get("blocked", "true" if task.blocked_by else "false")
        == ("true" if task.blocked_by else "false")
        and ("depends_on" not in query or query["depends_on"] in task.depends_on)
    )


def _mentions(task: Task, text: str) -> bool:
    """Whether casefolded text is in the task's prompt, error or result output, in any case."""
    output = task.result.get("output") if task.result else None
    return any(text in written.casefold()
               for written in (task.prompt, task.error_message, output) if written)


def _event(action: str, task: Task, **fields: object) -> dict:
    """A transition to log once the lock is released."""
    return {
        "action": action,
        "task_id": task.id,
        "work_directory": task.work_directory,
        "worker_id": task.worker_id,
        **fields,
    }


def _shorten(text: str, limit: int = 80) -> str:
    """Text cut to `limit` characters for logs and messages."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---------------------------------------------------------------------------
# The rate limiter: a sliding window of request counts per client address
# ---------------------------------------------------------------------------

@dataclass(slots=True)
class _Window:
    """One client's counts: the fixed window it is in, and the window before."""

    number: int  #: which fixed window: int(time // window)
    count: int = 0  #: requests counted in it
    previous: int = 0  #: requests counted in the window just before it


class RateLimiter:
    """A sliding-window limit of requests per client, in constant memory per client.

    The window slides by weighting the previous fixed window's count by how much
    of it still overlaps the last `window` seconds: two counters per client
    rather than a timestamp per request. For example, with a limit of 100 a
    minute, a client that sent 80 requests in the last minute-long window and
    30 so far in this one, 15 seconds in, has used 80 * (1 - 15/60) + 30 = 90:
    10 more fit now, and more as the old window's weight fades.

    Clients idle for two windows are forgotten, and at most `max_clients` are
    remembered (the least recently seen go first), so a flood of addresses
    cannot grow memory without bound.
    """

    def __init__(
        self,
        limit: int,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = 10_000,
    ) -> None:
        self.limit = limit
        self.window = window
        self.max_clients = max_clients
        self._clock = clock
        #: The lock guards _clients: each client's _Window, least recently seen first.
        self._lock = threading.Lock()
        self._clients: OrderedDict[str, _Window] = OrderedDict()

    def hit(self, client: str) -> int:
        """Count one request from a client; return how many are left, or raise RateLimited."""
        with self._lock:
            now = self._clock()
            counts = self._counts(client, int(now // self.window))
            elapsed = now - counts.number * self.window  # into the current window
            used = counts.previous * (1 - elapsed / self.window) + counts.count
            if used + 1 > self.limit:
                raise RateLimited(self._retry_after(counts, elapsed))
            counts.count += 1
            return max(0, math.floor(self.limit - used - 1))

    def refund(self, client: str) -> None:
        """Take back one request counted in the client's current window."""
        with self._lock:
            counts = self._clients.get(client)
            if counts is not None and counts.count:
                counts.count -= 1

    def __len__(self) -> int:
        """How many clients are remembered."""
        with self._lock:
            return len(self._clients)

    def _counts(self, client: str, current: int) -> _Window:
        """The client's counts rolled forward to the current window, marked most recent."""
        self._forget(current)
        counts = self._clients.pop(client, None) or _Window(current)
        if counts.number == current - 1:
            counts = _Window(current, previous=counts.count)
        elif counts.number < current - 1:
            counts = _Window(current)
        self._clients[client] = counts
        return counts

    def _forget(self, current: int) -> None:
        """Drop clients idle for two windows, and the least recent beyond max_clients."""
        while self._clients:
            oldest = next(iter(self._clients.values()))
            if oldest.number >= current - 1 and len(self._clients) < self.max_clients:
                break
            self._clients.popitem(last=False)

    def _retry_after(self, counts: _Window, elapsed: float) -> int:
        """Whole seconds (at least 1) until one more request fits."""
        if counts.count >= self.limit:
            # This window is full: wait for it to end, then for its weight to fade.
            wait = (self.window - elapsed) + self.window * (1 - (self.limit - 1) / counts.count)
        else:
            # The previous window's weight is what is over: wait for it to fade.
            wait = self.window * (1 - (self.limit - 1 - counts.count) / counts.previous) - elapsed
        return max(1, math.ceil(wait))


# ---------------------------------------------------------------------------
# HTTP: the envelope, the gate every request passes, the routes
# ---------------------------------------------------------------------------

request = bottle.request  # thread-local: the request being handled
response = bottle.response  # thread-local: the response being built


def _envelope(data: object = None, error: OrchestratorError | None = None) -> bytes:
    """The JSON body every response carries: {success, data, error, timestamp}."""
    response.content_type = "application/json"
    body = {
        "success": error is None,
        "data": data,
        "error": None if error is None else {
            "code": error.code, "message": error.message, "details": error.details,
        },
        "timestamp": _instant(time.time()),
    }
    return _utf8_json(body)


def _utf8_json(value: object) -> bytes:
    """JSON in UTF-8 with non-ASCII text as itself, so a prompt in any language reads as such.

    Control characters stay escaped (JSON escapes C0 itself; DEL, C1 and the line
    separators are escaped here), so `curl` output cannot drive a terminal. Text
    that is not valid Unicode (a lone surrogate inside metadata) cannot be UTF-8;
    then the whole body falls back to ASCII escapes, which JSON allows.
    """
    text = _unicode_json(value)
    if text.isascii() and "\x7f" not in text:  # JSON escaped C0 already: nothing left to do
        return text.encode()
    try:
        return _escape_controls(text).encode()
    except UnicodeEncodeError:
        return _ascii_json(value).encode()


def _error_envelope(error: OrchestratorError) -> bytes:
    """The status, headers and envelope of an error."""
    _apply_error_status(error)
    return _envelope(error=error)


def _apply_error_status(error: OrchestratorError) -> None:
    """Set the response's status and the headers the error calls for."""
    response.status = error.status
    for name, value in error.headers().items():
        response.set_header(name, value)


def _serve(
    gate: _Gate,
    requests: _RequestCounts,
    route: str,
    handler: Callable[..., object],
    render: Callable[[object], bytes] = _envelope,
    render_error: Callable[[OrchestratorError], bytes] = _error_envelope,
    **url_args: str,
) -> bytes:
    """Answer one request: the gate, the handler, and the protocol's body for either outcome.

    REST answers in the envelope; /mcp passes its own renderers for JSON-RPC.
    `route` is the path's template, which /metrics counts by.
    """
    started = time.perf_counter()
    try:
        gate.admit()
        body = render(handler(**url_args))
    except OrchestratorError as error:
        body = render_error(error)
    except Exception:
        logger.exception("unexpected error", extra={"method": request.method, "path": request.path})
        body = render_error(OrchestratorError())
    requests.count(request.method, route, response.status_code)
    if logger.isEnabledFor(logging.INFO):  # the record's fields cost more than the check
        logger.info("request", extra={
            "method": request.method,
            "path": request.path,
            "status": response.status_code,
            "duration_ms": round(1000 * (time.perf_counter() - started), 1),
            "client": request.environ.get("REMOTE_ADDR"),
        })
    return body


def _serve_routing_error(gate: _Gate, requests: _RequestCounts, error: bottle.HTTPError) -> bytes:
    """Bottle's own answers (no such route, wrong method, its last-resort 500) as envelopes."""
    def refuse() -> None:
        if error.status_code == 404:
            raise NotFound(f"no route for {request.method} {_shorten(request.path)}")
        if error.status_code == 405:
            raise MethodNotAllowed(error.headers["Allow"])
        raise OrchestratorError()
    # A 405 names a real path, which is one of ours; anything else is no route of ours.
    route = _route_template(request.path) if error.status_code == 405 else "unmatched"
    return _serve(gate, requests, route, refuse)


def _route_template(path: str) -> str:
    """The template of one of our paths: a task id becomes {task_id}."""
    return re.sub(TASK_ID.pattern.strip("^$"), "{task_id}", path)


class _RequestCounts:
    """Requests answered, by method, route template and status: for /metrics.

    Every label comes from a short fixed list, never from what a client sent,
    so that no client can grow the set of series.
    """

    METHODS = ("GET", "HEAD", "POST", "PATCH", "PUT", "DELETE", "OPTIONS")

    def __init__(self) -> None:
        #: Guards _counts; held for one dict update, never across I/O.
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str, int], int] = {}

    def count(self, method: str, route: str, status: int) -> None:
        """Count one answered request."""
        key = (method if method in self.METHODS else "other", route, status)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1

    def snapshot(self) -> dict[tuple[str, str, int], int]:
        """The counts so far."""
        with self._lock:
            return dict(self._counts)


class _Gate:
    """What a request must pass before its handler runs: host, origin, rate limit, API key,
    body size."""

    def __init__(self, config: Config) -> None:
        self.api_key = config.api_key
        self.max_body = config.max_body
        # A Config built in Python is not parsed: entries that mean nothing are left out.
        self.allowed_origins = {key for origin in config.allowed_origins
                                if (key := _origin_key(origin)) is not None}
        self.allowed_hosts = {(name, port) for name, port in map(_host_port, config.allowed_hosts)
                              if port != 0}
        self.limiter = RateLimiter(config.rate_limit) if config.rate_limit else None
        #: Wrong API keys per address where not every request counts (/mcp, /metrics).
        self.guesses = (RateLimiter(config.rate_limit)
                        if config.rate_limit and config.api_key is not None else None)
        self.loopback_only = _is_loopback(config.host)
        #: A loopback server always checks Host; one bound further out only when told
        #: which names are its own.
        self.checks_host = self.loopback_only or bool(config.allowed_hosts)
        self._own_hosts: set[str] = set()  #: Host values found to be ours: checked once each

    def admit(self) -> None:
        """Raise the error that refuses the current request, if any."""
        environ = request.environ  # read directly: each of Bottle's accessors costs a lookup
        if self.checks_host:
            self._check_host(environ.get("HTTP_HOST"))
        path = "/" + environ.get("PATH_INFO", "").lstrip("/")  # as Bottle routes it
        if path.startswith("/api/"):
            self._check_browser(environ)
            self.count_request()
            self._check_api_key()
        elif path in ("/metrics", "/mcp"):
            # Not every request counts: a scraper comes back every few seconds, and /mcp
            # counts tool calls (in the MCP section). Wrong keys do.
            self._check_browser(environ)
            self._check_api_key_counting_guesses()
        declared = environ.get("CONTENT_LENGTH")
        if declared:  # most requests without a body say nothing of its length
            self._check_body_size(declared)

    def _check_host(self, host: str | None) -> None:
        """DNS rebinding: a page whose name now resolves to us sends that name as Host.

        A browser sends no Origin with a same-origin GET, so only the Host shows
        it. A request with no Host at all (HTTP/1.0) is no browser's, and passes.
        """
        if host is None or host in self._own_hosts:
            return
        name, port = _host_port(host)
        if port != 0 and (
            _is_loopback(name) or (name, None) in self.allowed_hosts
            or (name, port) in self.allowed_hosts
        ):
            if len(self._own_hosts) < 64:  # the names clients use for us: a handful
                self._own_hosts.add(host)
            return
        raise Forbidden(f"host {json.dumps(_shorten(host))} is not allowed; "
                        "add it to APP_SECURITY_ALLOWED_HOSTS if it is this server's name")

    def _check_browser(self, environ: dict) -> None:
        """A browser page from another site must not reach the queue, with or without Origin."""
        origin = environ.get("HTTP_ORIGIN")
        if origin is not None:
            self._check_origin(environ, origin)
        site = environ.get("HTTP_SEC_FETCH_SITE")
        # An <img> or a link sends no Origin on a GET, but says where it comes from.
        if site in ("cross-site", "same-site") and (
            _origin_key(origin or "") not in self.allowed_origins
        ):
            raise Forbidden(f"a {site} request from a browser needs an allowed Origin")

    def _check_origin(self, environ: dict, origin: str) -> None:
        """A browser page from a foreign origin must not reach the queue."""
        own = _origin_key(f"{environ['wsgi.url_scheme']}://{_host_header(environ)}")
        if own is not None and self.loopback_only and not _is_loopback(own[1]):
            # DNS rebinding: a page whose name now resolves to 127.0.0.1 sends its own
            # name as both Origin and Host. A loopback server's own name is loopback.
            own = None
        key = _origin_key(origin)
        if key is None or (key != own and key not in self.allowed_origins):
            raise Forbidden(f"origin {_shorten(origin)} is not allowed")

    def count_request(self) -> None:
        """Count the request against its client address; RateLimited when over."""
        if self.limiter is None:
            return
        remaining = 0  # what a refused request is told
        try:
            remaining = self.limiter.hit(_client_address())
        finally:
            response.set_header("X-RateLimit-Limit", str(self.limiter.limit))
            response.set_header("X-RateLimit-Remaining", str(remaining))

    def _check_api_key_counting_guesses(self) -> None:
        """The API key, where a wrong one counts in the `guesses` window; RateLimited when over.

        Each request is counted as a guess before its key is looked at, and given
        back when the key is right: so an address that has spent the window is
        refused whatever its key (a 200 among the 429s would tell a guesser which key
        is right), even by requests racing for its last slot.
        """
        if self.guesses is None:
            self._check_api_key()
            return
        client = _client_address()
        self.guesses.hit(client)
        self._check_api_key()  # Unauthorized leaves the guess counted
        self.guesses.refund(client)

    def _check_api_key(self) -> None:
        """When a key is configured, require it as a bearer token (compared in constant time)."""
        if self.api_key is None:
            return
        scheme, _, token = (_header("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            raise Unauthorized("missing or wrong API key; send Authorization: Bearer <key>")

    def _check_body_size(self, declared: str) -> None:
        """Refuse a declared body over the limit before reading any of it."""
        if not _CONTENT_LENGTH.fullmatch(declared):
            raise ValidationError("Content-Length must be a number of bytes")
        if int(declared) > self.max_body:
            raise PayloadTooLarge(
                f"request body is {declared} bytes; the limit is {self.max_body}",
                limit=self.max_body,
            )


_CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")


def _client_address() -> str:
    """The address the rate limit counts the current request against."""
    return request.environ.get("REMOTE_ADDR") or "unknown"


def _header(name: str) -> str | None:
    """A request header as sent (Latin-1, per WSGI); None when absent.

    Bottle's own accessor decodes values as UTF-8 and raises on other bytes.
    """
    return request.environ.get("HTTP_" + name.upper().replace("-", "_"))


def _host_header(environ: dict) -> str:
    """The Host the client addressed (not X-Forwarded-Host, which anyone can send)."""
    return environ.get("HTTP_HOST") or f"{environ['SERVER_NAME']}:{environ['SERVER_PORT']}"


def _json_body() -> dict:
    """The request body as a JSON object; no body at all reads as {}."""
    payload = _read_json(default={})
    if not isinstance(payload, dict):
        raise ValidationError("request body must be a JSON object")
    return payload


def _read_json(default: object) -> object:
    """The request body parsed as JSON; `default` when there is no body at all."""
    length = int(request.environ.get("CONTENT_LENGTH") or 0)
    if length == 0:
        return default
    media_type = request.environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise UnsupportedMediaType(
            f"request body must be application/json, not {media_type or 'untyped'}"
        )
    raw = request.environ["wsgi.input"].read(length)
    try:
        text = raw.decode("utf-8")
        if text.startswith("\ufeff"):  # as json.loads refuses it
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        payload = _JSON_DECODER.decode(text)
    except UnicodeDecodeError:
        raise ValidationError("request body is not valid UTF-8") from None
    except RecursionError:
        raise ValidationError("request body nests too deeply") from None
    except ValueError as error:
        raise ValidationError(f"request body is not valid JSON: {error}") from None
    return payload


def _reject_constant(name: str) -> None:
    """NaN and Infinity are not JSON, whatever Python's parser allows."""
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    """A JSON number as a float; one too large for a double (1e400) would go out as Infinity."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{_shorten(text, 40)} is too large a number")
    return value


#: One decoder for every body: json.loads with hooks would build a new one per call.
_JSON_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def _query_pairs() -> Iterator[tuple[str, str]]:
    """The query string's (name, value) pairs, decoded as UTF-8; ValidationError naming a bad one.

    WSGI hands the query over as Latin-1 text; its bytes, %-escapes undone, are UTF-8.
    """
    raw = request.environ.get("QUERY_STRING", "").encode("latin-1")
    for pair in raw.split(b"&"):
        if not pair:
            continue
        name, _, value = pair.partition(b"=")
        if b"%" in pair or b"+" in pair:  # most queries have nothing to undo
            name, value = (unquote_to_bytes(part.replace(b"+", b" ")) for part in (name, value))
        try:
            name = name.decode("utf-8")
        except UnicodeDecodeError:
            raise ValidationError("query parameter names must be valid UTF-8") from None
        if not name:
            raise ValidationError("query parameter names must not be empty")
        try:
            yield name, value.decode("utf-8")
        except UnicodeDecodeError:
            raise _invalid(name, "must be valid UTF-8") from None


_INTEGER_TEXT = re.compile(r"-?[0-9]{1,4000}")


def _query(schema: Schema) -> dict:
    """The query string checked against its declaration, integers converted.

    A worker asks with the same query again and again (its directory, its id, its
    wait), so the last few queries found good are remembered with what they gave.
    """
    key = (schema.name, request.environ.get("QUERY_STRING", ""))
    checked = _checked_queries.get(key)
    if checked is None:
        checked = _check_query(schema)
        if len(_checked_queries) >= 256:  # a handful of workers, each with its own query
            _checked_queries.clear()
        _checked_queries[key] = checked
    return dict(checked)  # the values are strings and numbers: a copy shares nothing


#: (the schema's name, the query string) -> what _check_query gave for it.
_checked_queries: dict[tuple[str, str], dict] = {}


def _check_query(schema: Schema) -> dict:
    """The query string parsed and checked against its declaration.

    The store checks the same declaration again, for its Python callers. Both are
    needed: only here are unknown and repeated parameters seen (the store takes
    keyword arguments), and only there is a direct call from Python checked.
    """
    query: dict[str, object] = {}
    for name, value in _query_pairs():
        declared = schema.field(name)
        if name in query and declared is not None:  # an unknown name: schema.clean names it
            raise _invalid(name, "must be given at most once")
        if declared is not None and declared.type == "integer":
            # Python refuses to parse more than 4300 digits; far past any bound anyway.
            if not _INTEGER_TEXT.fullmatch(value):
                raise _invalid(name, "must be an integer")
            query[name] = int(value)
        else:
            query[name] = value
    return schema.clean(query)


# The hops of one request, e.g. POST /api/v1/tasks/{id}/complete:
#   waitress thread -> Bottle matches the rule -> _serve(gate, handler)
#     -> _Gate.admit (host, browser, rate limit, key, body size)
#     -> _call_route (the JSON body or query, parsed) -> _complete_task
#     -> TaskStore.complete (validates against TASK_COMPLETE, changes state under the lock)
#     -> Task.to_dict -> _envelope; any OrchestratorError -> _error_envelope.
#
# Each handler takes the store, the route's parsed query or body, and the URL's task id.

def _create_task(store: TaskStore, fields: dict) -> dict:
    """Create a task; a repeated Idempotency-Key returns the first one (200)."""
    task, created = store._create(fields, _header(IDEMPOTENCY_HEADER.name), Task.to_dict)
    if created:
        response.status = 201
        response.set_header("Location", f"/api/v1/tasks/{task['id']}")
    return task


def _claim_task(store: TaskStore, fields: dict) -> dict | None:
    """Claim the next waiting task of a directory, with its lease token; null when none waits."""
    if request.environ["REQUEST_METHOD"] == "HEAD":
        # Bottle answers HEAD with a GET route, and HEAD's answer has no body: the claim's
        # lease token, shown nowhere else, would be thrown away with the task held.
        raise MethodNotAllowed("GET")
    response.set_header("Cache-Control", "no-store")  # it may carry a lease token
    task = store._claim(fields, _claimed_dict)  # _query has checked them
    if task is None or _handed_back_if_gone(store, task):
        return None
    return task


def _claimed_dict(task: Task) -> dict:
    """A claimed task as the API shows it to its claimant: with its lease token."""
    shown = task.to_dict()
    shown["lease_token"] = task.lease_token
    return shown


def _handed_back_if_gone(store: TaskStore, task: dict) -> bool:
    """Release a just-claimed task if its claimant has hung up; whether it did.

    A long-poll claimant may leave while it waits (a worker stopped by Ctrl-C):
    no one would ever read this answer, so the task goes straight back, first in
    line, no retry used. Waitress sees a hang-up only with request lookahead on.
    """
    hung_up = request.environ.get("waitress.client_disconnected")
    if hung_up is None or not hung_up():
        return False
    store.release(task["id"], {"lease_token": task["lease_token"]})
    return True


def _complete_task(store: TaskStore, fields: dict, task_id: str) -> dict:
    """Report a held task done."""
    return store._complete(task_id, fields, Task.to_dict)


def _fail_task(store: TaskStore, fields: dict, task_id: str) -> dict:
    """Report a held task failed; it is queued again while retries are left."""
    return store.fail(task_id, fields).to_dict()


def _release_task(store: TaskStore, fields: dict, task_id: str) -> dict:
    """Hand a held task back to the queue, first of its priority, without counting a retry."""
    return store.release(task_id, fields).to_dict()


def _heartbeat_task(store: TaskStore, fields: dict, task_id: str) -> dict:
    """Extend the lease on a held task."""
    return store.heartbeat(task_id, fields).to_dict()


def _cancel_task(store: TaskStore, fields: dict, task_id: str) -> dict:
    """Cancel a waiting or working task."""
    return store.cancel(task_id, fields).to_dict()


def _retry_task(store: TaskStore, fields: dict, task_id: str) -> dict:
    """Queue a failed or cancelled task again."""
    return store.retry(task_id, fields).to_dict()


def _get_task(store: TaskStore, fields: dict, task_id: str) -> dict:
    """Read one task; with wait, once it has finished (or the wait is over)."""
    return store._get(task_id, fields, Task.to_dict)  # _query has checked them


def _update_task(store: TaskStore, fields: dict, task_id: str) -> dict:
    """Change a waiting task."""
    return store.update(task_id, fields).to_dict()


def _delete_task(store: TaskStore, fields: dict, task_id: str) -> dict:
    """Delete a task in any state."""
    store.delete(task_id)
    return {"id": task_id, "deleted": True}


def _list_tasks(store: TaskStore, fields: dict) -> dict:
    """List tasks, newest first."""
    page = store.list(fields)
    return {**page, "tasks": [task.to_dict() for task in page["tasks"]]}


def _bulk(store: TaskStore, fields: dict) -> dict:
    """Retry, cancel or delete up to BULK_LIMIT tasks that match a filter."""
    return store.bulk(fields)


def _directories(store: TaskStore, fields: dict) -> dict:
    """Each work directory: counts by status, oldest waiting age, the workers holding tasks."""
    return {"directories": store.directories()}


def _workers(store: TaskStore, fields: dict) -> dict:
    """The workers seen in the last WORKER_MEMORY seconds: when, what they hold, how their
    tasks went."""
    return {"workers": store.workers()}


def _statistics(store: TaskStore, fields: dict) -> dict:
    """Counts by status, success rate, retries and durations."""
    return store.statistics()


def _health(store: TaskStore, fields: dict) -> dict:
    """Liveness, version, uptime and queue depth."""
    response.set_header("Access-Control-Allow-Origin", "*")  # public, read-only
    return {"status": "healthy", "version": __version__, **store.health()}


@dataclass(frozen=True, slots=True)
class _Route:
    """One REST route, and what the OpenAPI document says of it."""

    method: str
    path: str
    handler: Callable[..., object]  #: its docstring's first line is the route's summary
    data: dict  #: JSON Schema of the envelope's data on success
    body: Schema | None = None
    query: Schema | None = None
    status: int = 200
    conflicts: bool = False  #: whether the task's state can refuse it (409)
    header: Field | None = None  #: a request header it reads


def _bottle_rule(path: str) -> str:
    """A route's path in Bottle's syntax: the task id matches only a UUID."""
    return path.replace("{task_id}", f"<task_id:re:{TASK_ID.pattern.strip('^$')}>")


def _call_route(route: _Route, store: TaskStore, **url_args: str) -> object:
    """Parse what the route declares (its query, or its JSON body), then run its handler."""
    if route.query is not None:
        fields = _query(route.query)
    elif request.query_string:
        # Read as nothing, a lease_token sent here would make a fenced report anonymous.
        names = sorted({name for name, _ in _query_pairs()})
        body = "; send its fields in the JSON body" if route.body is not None else ""
        raise ValidationError(f"this route takes no query parameters (got {', '.join(names)})"
                              + body, field=names[0])
    elif route.body is not None:
        fields = _json_body()
    else:
        fields = {}
    return route.handler(store, fields, **url_args)


_TASK_REF = {"$ref": "#/components/schemas/Task"}
_ROUTES = (
    _Route("POST", "/api/v1/tasks", _create_task, _TASK_REF, body=TASK_CREATE, status=201,
           conflicts=True, header=IDEMPOTENCY_HEADER),
    _Route("GET", "/api/v1/tasks", _list_tasks, {"$ref": "#/components/schemas/TaskPage"},
           query=LIST_QUERY),
    _Route("GET", "/api/v1/tasks/next", _claim_task,
           _nullable({"$ref": "#/components/schemas/ClaimedTask"}), query=CLAIM_QUERY),
    _Route("GET", "/api/v1/tasks/{task_id}", _get_task, _TASK_REF, query=READ_QUERY),
    _Route("PATCH", "/api/v1/tasks/{task_id}", _update_task, _TASK_REF, body=TASK_UPDATE,
           conflicts=True),
    _Route("DELETE", "/api/v1/tasks/{task_id}", _delete_task,
           {"$ref": "#/components/schemas/Deleted"}),
    _Route("POST", "/api/v1/tasks/{task_id}/complete", _complete_task, _TASK_REF,
           body=TASK_COMPLETE, conflicts=True),
    _Route("POST", "/api/v1/tasks/{task_id}/fail", _fail_task, _TASK_REF, body=TASK_FAIL,
           conflicts=True),
    _Route("POST", "/api/v1/tasks/{task_id}/release", _release_task, _TASK_REF,
           body=TASK_RELEASE, conflicts=True),
    _Route("POST", "/api/v1/tasks/{task_id}/heartbeat", _heartbeat_task, _TASK_REF,
           body=TASK_HEARTBEAT, conflicts=True),
    _Route("POST", "/api/v1/tasks/{task_id}/cancel", _cancel_task, _TASK_REF, body=TASK_CANCEL,
           conflicts=True),
    _Route("POST", "/api/v1/tasks/{task_id}/retry", _retry_task, _TASK_REF, body=TASK_RETRY,
           conflicts=True),
    _Route("POST", "/api/v1/tasks/bulk", _bulk, {"$ref": "#/components/schemas/BulkResult"},
           body=TASK_BULK),
    _Route("GET", "/api/v1/directories", _directories,
           {"$ref": "#/components/schemas/Directories"}),
    _Route("GET", "/api/v1/workers", _workers, {"$ref": "#/components/schemas/Workers"}),
    _Route("GET", "/api/v1/statistics", _statistics, {"$ref": "#/components/schemas/Statistics"}),
    _Route("GET", "/health", _health, {"$ref": "#/components/schemas/Health"}),
)


# ---------------------------------------------------------------------------
# /metrics: the queue's numbers in the Prometheus text format (version 0.0.4).
# Label values come from short fixed lists only, never a directory, worker, tag
# or task id: those would grow without bound, and a path can be private.
# ---------------------------------------------------------------------------

def _metrics_text(store: TaskStore, requests: _RequestCounts) -> str:
    """Every metric family, each with its HELP and TYPE before its samples."""
    numbers = store.metrics()
    lines: list[str] = []
    family = functools.partial(_metric_family, lines)
    family("tasks", "gauge", "Tasks in the store, by status.",
           [({"status": status}, count) for status, count in numbers["tasks"].items()])
    family("waiting_tasks", "gauge", "Waiting tasks, split by whether they can be claimed now.",
           [({"state": "claimable"},
             numbers["tasks"][WAITING] - numbers["delayed"] - numbers["blocked"]),
            ({"state": "blocked"}, numbers["blocked"]), ({"state": "delayed"}, numbers["delayed"])])
    family("oldest_waiting_task_age_seconds", "gauge",
           "Seconds since the oldest waiting task was created; 0 when none waits.",
           [({}, numbers["oldest_waiting_age"])])
    family("work_directories_waiting", "gauge", "Work directories with a waiting task.",
           [({}, numbers["directories_waiting"])])
    family("workers_busy", "gauge", "Workers holding an unexpired lease.",
           [({}, numbers["workers_busy"])])
    family("build_info", "gauge", "The running version, as a label; always 1.",
           [({"version": __version__}, 1)])
    family("uptime_seconds", "gauge", "Seconds since the store started.",
           [({}, numbers["uptime"])])
    family("tasks_created_total", "counter", "Tasks created, by priority.",
           [({"priority": priority}, n) for priority, n in numbers["created"].items()])
    family("tasks_claimed_total", "counter", "Claims that got a task.",
           [({}, numbers["claimed"])])
    family("tasks_finished_total", "counter", "Tasks that became completed, failed or cancelled.",
           [({"status": status}, n) for status, n in numbers["finished"].items()])
    family("tasks_retried_total", "counter", "Failed attempts queued again: after a failure, "
           "an expired lease, or a retry of a failed task (kept in the data file).",
           [({}, numbers["retried"])])
    family("lease_expirations_total", "counter",
           "Leases that expired (kept in the data file).", [({}, numbers["lease_expirations"])])
    family("http_requests_total", "counter",
           "Requests answered, by method, route template and status code.",
           [({"method": method, "route": route, "code": str(code)}, n)
            for (method, route, code), n in sorted(requests.snapshot().items())])
    family("task_wait_seconds", "histogram", "Seconds from a task's creation to its claim.",
           [({}, numbers["wait_seconds"])])
    family("task_run_seconds", "histogram",
           "Seconds from a claim to the task's final status, by that status.",
           [({"status": status}, h) for status, h in numbers["run_seconds"].items()])
    return "\n".join(lines) + "\n"


def _metric_family(lines: list[str], name: str, kind: str, description: str,
                   samples: list[tuple[dict[str, str], object]]) -> None:
    """Append one family: its HELP and TYPE, then a line per sample (three kinds for
    a histogram: its cumulative buckets, its sum and its count)."""
    name = "orchestrator_" + name
    lines += [f"# HELP {name} {description}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        if kind != "histogram":
            lines.append(f"{name}{_metric_labels(labels)} {_metric_number(value)}")
            continue
        cumulative = 0
        for bound, count in zip((*map(float, DURATION_BUCKETS), "+Inf"), value.counts):
            cumulative += count
            lines.append(f"{name}_bucket{_metric_labels({**labels, 'le': str(bound)})} "
                         f"{cumulative}")
        lines.append(f"{name}_sum{_metric_labels(labels)} {_metric_number(value.total)}")
        lines.append(f"{name}_count{_metric_labels(labels)} {cumulative}")


def _metric_labels(labels: dict[str, str]) -> str:
    """{name="value",...} with the format's escapes, or nothing for no labels."""
    if not labels:
        return ""
    escaped = (value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
               for value in labels.values())
    return "{" + ",".join(f'{name}="{value}"' for name, value in zip(labels, escaped)) + "}"


def _metric_number(value: int | float) -> str:
    """A sample value: integers as they are, other numbers as Python writes floats."""
    return str(value) if isinstance(value, int) else repr(float(value))


# ---------------------------------------------------------------------------
# Response schemas: what responses carry, as JSON Schema, for the MCP tools'
# output schemas and the OpenAPI document. Fields that a request also sets
# reuse its declaration.
# ---------------------------------------------------------------------------

_TIMESTAMP = {"type": "string", "format": "date-time", "description": "RFC 3339, UTC."}
_COUNT = {"type": "integer", "minimum": 0}
_TASK_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "format": "uuid"},
        **{f.name: f.json_schema() for f in (WORK_DIRECTORY, PROMPT, TAGS, METADATA)},
        "priority": {"type": "string", "enum": list(PRIORITIES)},  # stored in lower case
        "status": {"type": "string", "enum": list(STATUSES)},
        "worker_id": _nullable(WORKER_ID.json_schema()),
        "created_at": _TIMESTAMP,
        "updated_at": _TIMESTAMP,
        "started_at": _nullable(_TIMESTAMP),
        "completed_at": _nullable(_TIMESTAMP),
        "lease_expires_at": _nullable(_TIMESTAMP),
        "result": _nullable(RESULT.json_schema()),
        "error_message": {"type": ["string", "null"]},
        "progress": {"type": ["string", "null"]},
        "progress_at": _nullable(_TIMESTAMP),
        "not_before": _nullable(_TIMESTAMP),
        "depends_on": {"type": "array", "items": {"type": "string", "format": "uuid"}},
        "blocked_by": {"type": "array", "items": {"type": "string", "format": "uuid"},
                       "description": "Of depends_on, the tasks not completed yet."},
        "retry_count": _COUNT,
        "max_retries": MAX_RETRIES.json_schema(),
    },
    "additionalProperties": False,
}
_TASK_SCHEMA["required"] = list(_TASK_SCHEMA["properties"])
#: What a claim answers: the task, and the lease token that only its holder ever sees.
_CLAIMED_SCHEMA = {
    **_TASK_SCHEMA,
    "properties": {**_TASK_SCHEMA["properties"], "lease_token": {
        "type": "string", "description": "Send it with every report on this task: "
                                         "heartbeat, complete, fail, release."}},
    "required": [*_TASK_SCHEMA["required"], "lease_token"],
}
_PAGE_SCHEMA = {
    "type": "object",
    "properties": {
        "tasks": {"type": "array", "items": _TASK_SCHEMA},
        "total": _COUNT,
        "limit": LIST_QUERY.field("limit").json_schema(),
        "offset": LIST_QUERY.field("offset").json_schema(),
        "has_more": {"type": "boolean"},
    },
    "required": ["tasks", "total", "limit", "offset", "has_more"],
    "additionalProperties": False,
}
_STATISTICS_SCHEMA = {
    "type": "object",
    "properties": {
        **{name: _COUNT for name in (
            "total_tasks", *(f"{status}_tasks" for status in STATUSES), "active_tasks",
            "delayed_tasks", "blocked_tasks",
            "retries_total", "expired_leases_total",
        )},
        "success_rate": {"type": "number", "minimum": 0, "maximum": 1},
        "average_duration_ms": {"type": ["number", "null"], "minimum": 0},
        "uptime_seconds": {"type": "number", "minimum": 0},
    },
    "additionalProperties": False,
}
_STATISTICS_SCHEMA["required"] = list(_STATISTICS_SCHEMA["properties"])
_HEALTH_SCHEMA = {
    "type": "object",
    "properties": {
        "status": {"const": "healthy"},
        "version": {"type": "string"},
        "uptime_seconds": {"type": "number", "minimum": 0},
        "tasks": {
            "type": "object",
            "properties": {"total": _COUNT, "waiting": _COUNT, "working": _COUNT},
            "required": ["total", "waiting", "working"],
            "additionalProperties": False,
        },
    },
    "required": ["status", "version", "uptime_seconds", "tasks"],
    "additionalProperties": False,
}
def _closed(properties: dict) -> dict:
    """An object schema whose every property is required and nothing else allowed."""
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


_COUNTS_BY_STATUS = _closed({status: _COUNT for status in STATUSES})
_DIRECTORIES_SCHEMA = _closed({"directories": {"type": "array", "items": _closed({
    "work_directory": {"type": "string"},
    "counts": _COUNTS_BY_STATUS,
    "oldest_waiting_age_seconds": {"type": ["number", "null"], "minimum": 0},
    "workers": {"type": "array", "items": {"type": "string"}},
})}})
_WORKERS_SCHEMA = _closed({"workers": {"type": "array", "items": _closed({
    "worker_id": {"type": "string"},
    "last_seen": _TIMESTAMP,
    "holding": {"type": "array", "items": {"type": "string", "format": "uuid"}},
    "completed": _COUNT,
    "failed": _COUNT,
})}})
_BULK_SCHEMA = _closed({
    "action": TASK_BULK.field("action").json_schema(),
    "changed": _COUNT,
    "skipped": _COUNT,
    "more": {"type": "boolean", "description": "More tasks match: call again."},
})
_DELETED_SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "string"}, "deleted": {"const": True}},
    "required": ["id", "deleted"],
    "additionalProperties": False,
}


# ---------------------------------------------------------------------------
# MCP: the store as tools, on POST /mcp (Streamable HTTP, stateless, JSON
# responses only). Two eras share the endpoint. In the handshake revisions a
# client sends `initialize` first and then names the agreed version in the
# MCP-Protocol-Version header; in 2026-07-28 every request carries its version
# and capabilities in params._meta, mirrored in headers that must agree.
# ---------------------------------------------------------------------------

_MCP_MODERN_VERSION = "2026-07-28"
_MCP_HANDSHAKE_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26")  # newest first
_MCP_VERSIONS = (_MCP_MODERN_VERSION, *_MCP_HANDSHAKE_VERSIONS)
#: Revisions whose tools page makes invalid arguments a JSON-RPC error; later
#: ones return them as tool results, so that the model can correct itself.
_ARGUMENT_ERRORS_ARE_PROTOCOL_ERRORS = ("2025-03-26", "2025-06-18")


@dataclass(frozen=True, slots=True)
class _Era:
    """What a request's protocol revision changes; decided once per request, then passed down."""

    #: 2026-07-28: no handshake, _meta on every request, errors with HTTP statuses.
    modern: bool
    #: Invalid tool arguments are a JSON-RPC error rather than a tool result.
    strict_arguments: bool

    @classmethod
    def of(cls, version: str) -> _Era:
        """The era of a version named in the MCP-Protocol-Version header."""
        return cls(modern=version not in _MCP_HANDSHAKE_VERSIONS,
                   strict_arguments=version in _ARGUMENT_ERRORS_ARE_PROTOCOL_ERRORS)

_VERSION_KEY = "io.modelcontextprotocol/protocolVersion"
_CAPABILITIES_KEY = "io.modelcontextprotocol/clientCapabilities"
_SERVER_INFO = {
    "name": "simple-task-orchestrator",
    "title": "Simple Task Orchestrator",
    "version": __version__,
}
_CAPABILITIES = {"tools": {"listChanged": False}}
_TOOLS_TTL_MS = 300_000  # the tools change only when the server is upgraded
_INSTRUCTIONS = (
    "A shared queue of coding tasks, each a prompt for one absolute work directory. "
    "To work: call acquire_task with the directory you work in (work_path) and a stable "
    "worker_id; {\"task\": null} means nothing is waiting. The task comes with a "
    "lease_token: pass it back, with your worker_id, in every call about that task. Do the "
    "task's prompt in its work_directory. If it runs long, call heartbeat_task before "
    "lease_expires_at, or the task goes to another worker. Finish with complete_task "
    "(result.output: what you did) or fail_task (error: why). If you cannot work on it, "
    "release_task hands it back. create_task queues new work, for other agents too: to "
    "split a job into steps, create each with depends_on naming the steps before it (a "
    "step runs only once those have completed), then wait_for_task on the last one until "
    "it has finished, and read its result.output. list_tasks, get_task, list_directories "
    "and get_statistics show the queue."
)

_PARSE_ERROR, _INVALID_REQUEST, _METHOD_NOT_FOUND, _INVALID_PARAMS = -32700, -32600, -32601, -32602
_INTERNAL_ERROR, _HEADER_MISMATCH, _UNSUPPORTED_VERSION = -32603, -32020, -32022


class _RpcError(Exception):
    """A JSON-RPC error to answer with.

    `status` is its HTTP status. None means it answers a well-formed request:
    the handshake revisions send that with 200 (their SDK clients break on a
    4xx carrying one), 2026-07-28 with 404 for an unknown method, else 400.
    """

    def __init__(self, code: int, message: str, data: object = None,
                 status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data
        self.status = status


_ACQUIRED_SCHEMA = {
    "type": "object",
    "properties": {"task": _nullable(_CLAIMED_SCHEMA)},
    "required": ["task"],
    "additionalProperties": False,
}
_READ_ONLY = {"readOnlyHint": True, "openWorldHint": False}
_ADDITIVE = {"readOnlyHint": False, "destructiveHint": False, "idempotentHint": False,
             "openWorldHint": False}
_IDEMPOTENT = {**_ADDITIVE, "idempotentHint": True}
_DESTRUCTIVE = {**_ADDITIVE, "destructiveHint": True, "idempotentHint": True}


def _json_text(data: object, arguments: dict) -> str:
    """A tool result's text: its data as JSON."""
    return _unicode_json(data)


def _wait_text(data: dict, arguments: dict) -> str:
    """wait_for_task's text says first whether the task finished."""
    if data["status"] in FINISHED:
        said = f"Task {data['id']} finished: {data['status']}."
    else:
        said = (f"Task {data['id']} has not finished: it is {data['status']}. "
                "Call wait_for_task again to keep waiting.")
    return said + "\n" + _unicode_json(data)


def _acquire_text(data: dict, arguments: dict) -> str:
    """acquire_task's text says plainly when nothing was waiting."""
    if data["task"] is None:
        return f"No task is waiting in {arguments['work_path']} right now."
    return _unicode_json(data)


@dataclass(frozen=True, slots=True)
class _Tool:
    """One MCP tool: arguments from the declarations, the REST data as its output."""

    name: str
    title: str
    description: str
    arguments: Schema
    output: dict
    call: Callable[[TaskStore, dict], dict]
    hints: dict
    text: Callable[[object, dict], str] = _json_text  #: the result's text, from its data

    def definition(self) -> dict:
        """The tool as tools/list shows it."""
        return {
            "name": self.name,
            "title": self.title,
            "description": self.description,
            "inputSchema": self.arguments.json_schema(top_level_any_of=False),
            "outputSchema": self.output,
            "annotations": {"title": self.title, **self.hints},
        }


def _through_rest(handler: Callable[..., object]) -> Callable[[TaskStore, dict], object]:
    """A tool call that runs the REST route's handler, so both return the same data."""
    def call(store: TaskStore, arguments: dict) -> object:
        task_id = arguments.pop("task_id", None)
        if task_id is None:
            return handler(store, arguments)
        return handler(store, arguments, task_id)
    return call


def _create_by_tool(store: TaskStore, arguments: dict) -> dict:
    """create_task: the idempotency key travels as an argument, and no 201 is set."""
    key = arguments.pop("idempotency_key", None)
    return store._create(arguments, key, Task.to_dict)[0]


def _acquire_by_tool(store: TaskStore, arguments: dict) -> dict:
    """acquire_task: the REST claim's data as {"task": ...}, since tools answer objects."""
    return {"task": _claim_task(store, arguments)}


def _get_by_tool(store: TaskStore, arguments: dict) -> dict:
    """get_task: the REST read with READ_QUERY's defaults (no wait: wait_for_task waits)."""
    return _get_task(store, READ_QUERY.clean({}), arguments["task_id"])


def _with_task_id(name: str, body: Schema | None = None) -> Schema:
    """A tool's arguments: the task id, then the fields of the REST body (if any)."""
    if body is None:
        return Schema(name, (TASK_ID,))
    return Schema(name, (TASK_ID, *body.fields), one_of=body.one_of)


_PASS_THE_TOKEN = (" Pass the lease_token acquire_task gave you (and your worker_id); one of "
                   "the two is required, and the token makes sure the lease is still yours.")

_TOOLS = {tool.name: tool for tool in (
    _Tool("create_task", "Create a task",
          "Queue a prompt for agents working in an absolute directory. With an "
          "idempotency_key, repeating the call returns the first task instead of a second one.",
          Schema("create_task", (*TASK_CREATE.fields, IDEMPOTENCY_KEY)), _TASK_SCHEMA,
          _create_by_tool, _ADDITIVE),
    _Tool("acquire_task", "Acquire the next task",
          "Claim the next waiting task for your work directory: highest priority, then oldest. "
          "You hold it under a lease until lease_expires_at. The task comes with a lease_token: "
          "pass it to heartbeat_task, complete_task, fail_task and release_task. Returns "
          "{\"task\": null} when nothing is waiting.",
          CLAIM_QUERY, _ACQUIRED_SCHEMA, _acquire_by_tool, _ADDITIVE, _acquire_text),
    _Tool("complete_task", "Complete a task",
          "Report a task you hold as done, with its result. A result status of \"failure\" "
          "counts as a failed attempt." + _PASS_THE_TOKEN,
          _with_task_id("complete_task", _REPORTER_REQUIRED[TASK_COMPLETE.name]), _TASK_SCHEMA,
          _through_rest(_complete_task), _IDEMPOTENT),
    _Tool("fail_task", "Fail a task",
          "Report that a task you hold failed. It is queued again while retries are left "
          "(unless retry is false), else it becomes failed." + _PASS_THE_TOKEN,
          _with_task_id("fail_task", _REPORTER_REQUIRED[TASK_FAIL.name]), _TASK_SCHEMA,
          _through_rest(_fail_task), _ADDITIVE),
    _Tool("heartbeat_task", "Extend a lease",
          "Extend your lease on a task you hold, so that a long run keeps it; progress (optional) "
          "says how far you have got, for whoever watches the queue." + _PASS_THE_TOKEN,
          _with_task_id("heartbeat_task", TASK_HEARTBEAT), _TASK_SCHEMA,
          _through_rest(_heartbeat_task),
          _IDEMPOTENT),
    _Tool("release_task", "Release a task",
          "Hand a task you hold back to the queue, first in line, without using up a retry: "
          "for when you cannot work on it (not when it failed: use fail_task)." + _PASS_THE_TOKEN,
          _with_task_id("release_task", TASK_RELEASE), _TASK_SCHEMA, _through_rest(_release_task),
          _ADDITIVE),
    _Tool("cancel_task", "Cancel a task",
          "Stop a waiting or working task for good.",
          _with_task_id("cancel_task", TASK_CANCEL), _TASK_SCHEMA, _through_rest(_cancel_task),
          _DESTRUCTIVE),
    _Tool("retry_task", "Retry a failed or cancelled task",
          "Queue a failed or cancelled task again, even past its max_retries.",
          _with_task_id("retry_task", TASK_RETRY), _TASK_SCHEMA, _through_rest(_retry_task),
          _ADDITIVE),
    _Tool("get_task", "Get a task", "Read one task by id.",
          _with_task_id("get_task"), _TASK_SCHEMA, _get_by_tool,
          _READ_ONLY),
    _Tool("wait_for_task", "Wait for a task to finish",
          "Wait up to `wait` seconds (at most 20) for a task to be completed, failed or "
          "cancelled, then return it as it is: its result.output once completed. The text "
          "says whether it finished; if not, call again.",
          _with_task_id("wait_for_task", READ_QUERY), _TASK_SCHEMA, _through_rest(_get_task),
          _READ_ONLY, _wait_text),
    _Tool("update_task", "Update a waiting task",
          "Change a waiting task's prompt, priority, tags, metadata, max_retries or directory.",
          _with_task_id("update_task", TASK_UPDATE), _TASK_SCHEMA, _through_rest(_update_task),
          _IDEMPOTENT),
    _Tool("delete_task", "Delete a task", "Remove a task in any state.",
          _with_task_id("delete_task"), _DELETED_SCHEMA, _through_rest(_delete_task),
          _DESTRUCTIVE),
    _Tool("list_tasks", "List tasks",
          "A page of tasks, newest first, filtered by status, priority, worker_id, "
          "work_directory, tag, blocked, depends_on or text (q).",
          Schema("list_tasks", LIST_QUERY.fields), _PAGE_SCHEMA, _through_rest(_list_tasks),
          _READ_ONLY),
    _Tool("list_directories", "List work directories",
          "Each work directory that has tasks: counts by status, the age in seconds of its "
          "oldest waiting task, and the workers holding its tasks.",
          Schema("list_directories", ()), _DIRECTORIES_SCHEMA, _through_rest(_directories),
          _READ_ONLY),
    _Tool("get_statistics", "Queue statistics",
          "Counts by status, success rate, retries, expired leases and mean duration.",
          Schema("get_statistics", ()), _STATISTICS_SCHEMA, _through_rest(_statistics),
          _READ_ONLY),
)}
_TOOL_DEFINITIONS = [tool.definition() for tool in _TOOLS.values()]


def _answer_mcp(store: TaskStore, gate: _Gate) -> dict | None:
    """Answer the one JSON-RPC message of a POST /mcp; None for a notification (202)."""
    era = _Era.of(_header("MCP-Protocol-Version") or "2025-03-26")
    request_id = None
    try:
        message = _rpc_message()
        if "id" not in message:
            response.status = 202
            return None
        request_id = message["id"]
        meta = message.get("params", {}).get("_meta")
        if isinstance(meta, dict) and _VERSION_KEY in meta:
            # A body that names its version in _meta is 2026-07-28 in form, whatever the header.
            era = _Era.of(_MCP_MODERN_VERSION)
        if era.modern:
            _check_modern_request(message)  # so from here on, modern means 2026-07-28
        result = _call_method(store, gate, message, era)
    except _RpcError as error:
        return _rpc_error(request_id, error, era)
    if era.modern:
        result = {**result, "resultType": "complete",
                  "_meta": {"io.modelcontextprotocol/serverInfo": _SERVER_INFO}}
    return {"jsonrpc": "2.0", "id": request_id, "result": result}


def _rpc_message() -> dict:
    """The request body as one JSON-RPC 2.0 request or notification."""
    try:
        message = _read_json(default=None)
    except ValidationError as error:
        raise _RpcError(_PARSE_ERROR, f"Parse error: {error.message}", status=400) from None
    if isinstance(message, list):
        raise _RpcError(_INVALID_REQUEST, "batches are not supported: send one message per POST",
                        status=400)
    if not (isinstance(message, dict) and message.get("jsonrpc") == "2.0"
            and isinstance(message.get("method"), str)):
        raise _RpcError(_INVALID_REQUEST, 'expected a JSON-RPC 2.0 request: '
                        '{"jsonrpc": "2.0", "id": ..., "method": ...}', status=400)
    request_id = message.get("id", 0)
    if isinstance(request_id, bool) or not isinstance(request_id, (str, int)):
        raise _RpcError(_INVALID_REQUEST, "id must be a string or an integer", status=400)
    if not isinstance(message.get("params", {}), dict):
        raise _RpcError(_INVALID_REQUEST, "params must be an object", status=400)
    return message


def _check_modern_request(message: dict) -> None:
    """2026-07-28: the _meta the request needs, headers that agree with it, a known version."""
    params = message.get("params", {})
    meta = params.get("_meta")
    if not isinstance(meta, dict) or not {_VERSION_KEY, _CAPABILITIES_KEY} <= meta.keys():
        named = _header("MCP-Protocol-Version")
        unknown = (f"MCP-Protocol-Version {_shorten(named)} is none of "
                   f"{', '.join(_MCP_VERSIONS)}; read as {_MCP_MODERN_VERSION}, "
                   if named is not None and named not in _MCP_VERSIONS else "")
        raise _RpcError(_INVALID_PARAMS, f"{unknown}params._meta must carry {_VERSION_KEY} "
                        f"and {_CAPABILITIES_KEY}", status=400)
    mirrored = [("MCP-Protocol-Version", meta[_VERSION_KEY]), ("Mcp-Method", message["method"])]
    if message["method"] == "tools/call" and "name" in params:
        mirrored.append(("Mcp-Name", params["name"]))
    for header, body_value in mirrored:
        sent = _decode_header(_header(header))
        if sent != body_value:
            # JSON, not Python's repr: the client reads null, not None.
            raise _RpcError(_HEADER_MISMATCH, f"Header mismatch: {header} header value "
                            f"{json.dumps(sent)} does not match body value "
                            f"{json.dumps(body_value)}", status=400)
    if meta[_VERSION_KEY] != _MCP_MODERN_VERSION:
        raise _RpcError(_UNSUPPORTED_VERSION, "Unsupported protocol version", status=400,
                        data={"supported": list(_MCP_VERSIONS), "requested": meta[_VERSION_KEY]})


def _decode_header(value: str | None) -> str | None:
    """A header value, with the spec's =?base64?...?= form for non-ASCII text decoded."""
    if value and value.startswith("=?base64?") and value.endswith("?="):
        try:
            return base64.b64decode(value[9:-2], validate=True).decode("utf-8")
        except ValueError:  # binascii.Error and UnicodeDecodeError both are
            return None
    return value


def _call_method(store: TaskStore, gate: _Gate, message: dict, era: _Era) -> dict:
    """Run the request's method; _RpcError when it has none in this era."""
    params = message.get("params", {})
    method = message["method"]
    if method == "tools/call":
        return _call_tool(store, gate, params, era)
    if method == "tools/list":
        listing = {"tools": _TOOL_DEFINITIONS}
        if era.modern:
            listing.update(ttlMs=_TOOLS_TTL_MS, cacheScope="public")
        return listing
    if era.modern and method == "server/discover":
        return {"supportedVersions": list(_MCP_VERSIONS), "capabilities": _CAPABILITIES,
                "instructions": _INSTRUCTIONS, "ttlMs": _TOOLS_TTL_MS, "cacheScope": "public"}
    if not era.modern and method == "initialize":
        return _initialize(params)
    if not era.modern and method == "ping":
        return {}
    raise _RpcError(_METHOD_NOT_FOUND, f"Method not found: {method}")


def _initialize(params: dict) -> dict:
    """The handshake: the client's version when supported, else the newest handshake one."""
    requested = params.get("protocolVersion")
    return {
        "protocolVersion": (
            requested if requested in _MCP_HANDSHAKE_VERSIONS else _MCP_HANDSHAKE_VERSIONS[0]
        ),
        "capabilities": _CAPABILITIES,
        "serverInfo": _SERVER_INFO,
        "instructions": _INSTRUCTIONS,
    }


def _call_tool(store: TaskStore, gate: _Gate, params: dict, era: _Era) -> dict:
    """tools/call: business errors become tool results the model can read and act on."""
    name = params.get("name")
    if not isinstance(name, str):
        raise _RpcError(_INVALID_PARAMS, "params.name must be a string: the tool's name")
    tool = _TOOLS.get(name)
    if tool is None:
        raise _RpcError(_INVALID_PARAMS, f"Unknown tool: {_shorten(name)}")
    arguments = params.get("arguments")
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise _RpcError(_INVALID_PARAMS, "arguments must be an object")
    try:
        gate.count_request()  # tool calls are what touch the store, so they are what count
        cleaned = tool.arguments.clean(arguments)
        text_arguments = dict(cleaned)  # the call may take fields out of `cleaned`
        data = tool.call(store, cleaned)
    except ValidationError as error:
        if era.strict_arguments:
            raise _RpcError(_INVALID_PARAMS, error.message, data=error.details) from None
        return _tool_error(error)
    except OrchestratorError as error:
        return _tool_error(error)
    return {"content": [{"type": "text", "text": tool.text(data, text_arguments)}],
            "structuredContent": data, "isError": False}


def _tool_error(error: OrchestratorError) -> dict:
    """A failed tool call, its text starting with the error code."""
    return {"content": [{"type": "text", "text": f"{error.code}: {error.message}"}],
            "isError": True}


def _rpc_error(request_id: object, error: _RpcError, era: _Era) -> dict:
    """A JSON-RPC error response, its HTTP status set for the era."""
    status = error.status
    if status is None:
        status = (404 if error.code == _METHOD_NOT_FOUND else 400) if era.modern else 200
    response.status = status
    body = {"code": error.code, "message": error.message}
    if error.data is not None:
        body["data"] = error.data
    return {"jsonrpc": "2.0", "id": request_id, "error": body}


def _render_document(document: bytes) -> bytes:
    """A public JSON document, readable from any origin."""
    response.content_type = "application/json"
    response.set_header("Access-Control-Allow-Origin", "*")
    return document


def _render_metrics(text: str) -> bytes:
    """The Prometheus text exposition format, version 0.0.4."""
    response.content_type = "text/plain; version=0.0.4; charset=utf-8"
    return text.encode()


def _render_page(page: bytes) -> bytes:
    """The page at /, with the headers that keep it to its own script and this server."""
    response.content_type = "text/html; charset=utf-8"
    for name, value in _PAGE_HEADERS.items():
        response.set_header(name, value)
    return page


def _render_rpc(message: dict | None) -> bytes:
    """A JSON-RPC response as the body; nothing for a notification."""
    if message is None:
        return b""
    response.content_type = "application/json"
    return _utf8_json(message)


def _render_rpc_refusal(error: OrchestratorError) -> bytes:
    """A request the gate refused (origin, key, body) as a JSON-RPC error with no id."""
    _apply_error_status(error)
    code = _INTERNAL_ERROR if error.status >= 500 else _INVALID_REQUEST
    return _render_rpc({
        "jsonrpc": "2.0", "id": None,
        "error": {"code": code, "message": error.message,
                  "data": {"code": error.code, **error.details}},
    })


# ---------------------------------------------------------------------------
# The OpenAPI document: generated from the routes and the declarations, so it
# says exactly what validation enforces and what every response carries.
# ---------------------------------------------------------------------------

#: What any request can be answered with before or around its handler: a bad or too
#: large body (the gate), a refused host or origin, a wrong method, an unexpected error.
_GATE_STATUSES = [400, 403, 405, 413, 500]


def _openapi_document() -> dict:
    """The OpenAPI 3.1 document of the whole HTTP API."""
    paths: dict[str, dict] = {}
    for route in _ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    paths["/mcp"] = {"post": _mcp_operation()}
    paths["/"] = {"get": {
        "operationId": "page",
        "summary": "The page: the queue in a browser, live. It holds no data; it calls this API.",
        "responses": {
            "200": {"description": "One HTML document with its script and style inline.",
                    "content": {"text/html": {"schema": {"type": "string"}}}},
            **_error_responses(_GATE_STATUSES),
        },
    }}
    paths["/metrics"] = {"get": {
        "operationId": "metrics",
        "summary": "The queue's numbers for Prometheus: tasks by status, throughput, wait and "
                   "run times, requests. Needs the API key when one is set; a scrape is not "
                   "counted against the rate limit, a wrong key is.",
        "security": _OPTIONAL_BEARER,
        "responses": {
            "200": {"description": "The Prometheus text exposition format, version 0.0.4.",
                    "content": {"text/plain; version=0.0.4; charset=utf-8": {
                        "schema": {"type": "string"}}}},
            **_error_responses(sorted({*_GATE_STATUSES, 401, 429})),
        },
    }}
    paths["/openapi.json"] = {"get": {
        "operationId": "openapi",
        "summary": "This document.",
        "responses": {
            "200": {"description": "The OpenAPI document.", "headers": _PUBLIC_HEADERS,
                    "content": {"application/json": {"schema": {"type": "object"}}}},
            **_error_responses(_GATE_STATUSES),
        },
    }}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Simple Task Orchestrator",
            "version": __version__,
            "description": "A work queue of prompts for AI coding agents: clients create tasks, "
                           "workers claim them under a lease and report the result. With a "
                           "data file, a 2xx answer means the change is on disk.",
        },
        "paths": paths,
        "components": {
            "schemas": {
                "Task": _TASK_SCHEMA, "ClaimedTask": _CLAIMED_SCHEMA, "TaskPage": _PAGE_SCHEMA,
                "Statistics": _STATISTICS_SCHEMA, "Directories": _DIRECTORIES_SCHEMA,
                "Workers": _WORKERS_SCHEMA, "BulkResult": _BULK_SCHEMA,
                "Health": _HEALTH_SCHEMA, "Deleted": _DELETED_SCHEMA,
                "ErrorEnvelope": _error_envelope_schema(),
                **{route.body.name: route.body.json_schema() for route in _ROUTES if route.body},
            },
            "securitySchemes": {"bearerAuth": {
                "type": "http", "scheme": "bearer",
                "description": "Enforced only when the server has APP_SECURITY_API_KEY set.",
            }},
        },
    }


_OPTIONAL_BEARER = [{"bearerAuth": []}, {}]  # a key is needed only when one is configured
_PUBLIC_HEADERS = {"Access-Control-Allow-Origin": {"schema": {"const": "*"}}}
_RATE_HEADERS = {
    "X-RateLimit-Limit": {"description": "Requests allowed per minute.",
                          "schema": {"type": "integer"}},
    "X-RateLimit-Remaining": {"description": "Requests left in the window.",
                              "schema": {"type": "integer"}},
}


def _operation(route: _Route) -> dict:
    """One REST route as an OpenAPI operation."""
    guarded = route.path.startswith("/api/")
    # 403: the Host rule covers every route; 503: a data file that cannot be written.
    statuses = {*_GATE_STATUSES, 503}
    statuses |= {401, 429} if guarded else set()
    statuses |= {415} if route.body is not None else set()
    statuses |= {404} if "{task_id}" in route.path else set()
    statuses |= {409} if route.conflicts else set()
    success = {
        "description": "Success.",
        "headers": _RATE_HEADERS if guarded else _PUBLIC_HEADERS,
        "content": {"application/json": {"schema": _success_envelope_schema(route.data)}},
    }
    responses = {str(route.status): success}
    if route.status == 201:
        responses["201"] = {**success, "description": "Created.", "links": _task_links(),
                            "headers": {**_RATE_HEADERS,
                                        "Location": {"required": True, "schema": {"type": "string"}}}}
        responses["200"] = {**success, "description": "Seen before: the first task."}
    operation = {
        "operationId": route.handler.__name__.lstrip("_"),
        "summary": route.handler.__doc__.splitlines()[0],
        "parameters": _parameters(route),
        "responses": {**responses, **_error_responses(sorted(statuses))},
    }
    if route.body is not None:
        operation["requestBody"] = {
            "required": any(f.required for f in route.body.fields) or route.body.min_fields > 0,
            "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{route.body.name}"}}},
        }
    if guarded:
        operation["security"] = _OPTIONAL_BEARER
    return operation


def _task_links() -> dict:
    """Links from a created task to every operation on it, for clients and fuzzers."""
    return {
        route.handler.__name__.lstrip("_"): {
            "operationId": route.handler.__name__.lstrip("_"),
            "parameters": {"task_id": "$response.body#/data/id"},
        }
        for route in _ROUTES if "{task_id}" in route.path
    }


def _parameters(route: _Route) -> list[dict]:
    """The route's path, query and header parameters, from their declarations."""
    parameters = []
    if "{task_id}" in route.path:
        parameters.append({"name": "task_id", "in": "path", "required": True,
                           "description": TASK_ID.description, "schema": TASK_ID.json_schema()})
    declared = [("query", f) for f in route.query.fields] if route.query else []
    declared += [("header", route.header)] if route.header else []
    for where, declared_field in declared:
        parameters.append({"name": declared_field.name, "in": where,
                           "required": declared_field.required,
                           "description": declared_field.description,
                           "schema": declared_field.json_schema()})
    return parameters


def _success_envelope_schema(data: dict) -> dict:
    """The envelope of a success carrying `data`."""
    return {
        "type": "object",
        "properties": {"success": {"const": True}, "data": data, "error": {"type": "null"},
                       "timestamp": _TIMESTAMP},
        "required": ["success", "data", "error", "timestamp"],
        "additionalProperties": False,
    }


def _error_envelope_schema() -> dict:
    """The envelope of every error."""
    codes = sorted({OrchestratorError.code} | {c.code for c in OrchestratorError.__subclasses__()})
    error = {
        "type": "object",
        "properties": {"code": {"type": "string", "enum": codes}, "message": {"type": "string"},
                       "details": {"type": "object"}},
        "required": ["code", "message", "details"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {"success": {"const": False}, "data": {"type": "null"}, "error": error,
                       "timestamp": _TIMESTAMP},
        "required": ["success", "data", "error", "timestamp"],
        "additionalProperties": False,
    }


def _error_responses(statuses: list[int]) -> dict:
    """The error responses for these statuses, described by their error classes."""
    classes = {c.status: c for c in OrchestratorError.__subclasses__() if c.status != 500}
    headers = {
        401: {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}},
        405: {"Allow": {"required": True, "schema": {"type": "string"}}},
        429: {"Retry-After": {"required": True, "schema": {"type": "integer", "minimum": 1}},
              **_RATE_HEADERS},
    }
    envelope = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}}
    responses = {}
    for status in statuses:
        described = classes[status].__doc__ if status in classes else (
            "Something unexpected; the details are in the server's log.")
        responses[str(status)] = {"description": described, "content": dict(envelope),
                                  "headers": headers.get(status, {})}
    if 413 in statuses:  # waitress refuses a larger body itself, in plain text
        responses["413"]["content"]["text/plain"] = {"schema": {"type": "string"}}
    return responses


def _mcp_operation() -> dict:
    """POST /mcp, described but not modelled: its bodies are JSON-RPC 2.0 (see the MCP spec)."""
    request_schema = {
        "type": "object",
        "description": "One JSON-RPC 2.0 request or notification.",
        "properties": {"jsonrpc": {"const": "2.0"}, "id": {"type": ["string", "integer"]},
                       "method": {"type": "string"}, "params": {"type": "object"}},
        "required": ["jsonrpc", "method"],
    }
    answer = {"application/json": {"schema": {
        "type": "object", "description": "A JSON-RPC 2.0 response."}}}
    described = {
        "200": "The JSON-RPC response (errors too, for a well-formed request in the "
               "handshake revisions).",
        "400": "A JSON-RPC error: parse error, batch, invalid request, or (2026-07-28) "
               "invalid params, header mismatch or unsupported version.",
        "401": Unauthorized.__doc__, "403": Forbidden.__doc__,
        "404": "2026-07-28: no such method (JSON-RPC -32601).",
        "413": PayloadTooLarge.__doc__, "415": UnsupportedMediaType.__doc__,
        "429": "Too many wrong API keys: refused, right key or not, until the limit allows "
               "(tool calls over the limit are tool results).",
        "500": "Something unexpected; the details are in the server's log.",
        "503": StorageError.__doc__,
    }
    responses = {status: {"description": text, "content": answer}
                 for status, text in described.items()}
    responses["202"] = {"description": "A notification was accepted."}
    responses["405"] = _error_responses([405])["405"]
    return {
        "operationId": "mcp",
        "summary": "The MCP endpoint: the task tools over JSON-RPC (Streamable HTTP, stateless).",
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": request_schema}}},
        "responses": responses,
        "security": _OPTIONAL_BEARER,
    }


# ---------------------------------------------------------------------------
# Serving and the command line: waitress in a thread, the client commands, the worker
# ---------------------------------------------------------------------------

def create_app(config: Config | None = None, store: TaskStore | None = None) -> bottle.Bottle:
    """A fresh application over a store (a new one, from config, when none is given).

        store = TaskStore(clock=fake_clock)
        client = webtest.TestApp(create_app(Config(rate_limit=0), store))
        client.post_json("/api/v1/tasks", {"work_directory": "/repo", "prompt": "hi"})
    """
    config = config or Config()
    if store is None:
        store = TaskStore.from_config(config)
    gate = _Gate(config)
    requests = _RequestCounts()
    serve = functools.partial(_serve, gate, requests)
    app = bottle.Bottle()
    # Every route answers bytes it encoded itself: Bottle's JSON plugin would only look
    # at each answer, one more call per request, and pass it on.
    app.uninstall(bottle.JSONPlugin)
    for route in _ROUTES:
        handler = functools.partial(_call_route, route, store)
        app.route(_bottle_rule(route.path), route.method, functools.partial(serve, route.path, handler))
    document = _utf8_json(_openapi_document())
    app.route("/openapi.json", "GET",
              functools.partial(serve, "/openapi.json", lambda: document, _render_document))
    mcp = functools.partial(_answer_mcp, store, gate)
    app.route("/mcp", "POST",
              functools.partial(serve, "/mcp", mcp, _render_rpc, _render_rpc_refusal))
    metrics = functools.partial(_metrics_text, store, requests)
    app.route("/metrics", "GET", functools.partial(serve, "/metrics", metrics, _render_metrics))
    page = _PAGE.encode()
    app.route("/", "GET", functools.partial(serve, "/", lambda: page, _render_page))
    app.default_error_handler = functools.partial(_serve_routing_error, gate, requests)
    app.install(_WakeWaitersOnClose(store))
    return app


class _WakeWaitersOnClose:
    """A Bottle plugin whose only job: closing the app (at shutdown) wakes waiting claims."""

    api = 2

    def __init__(self, store: TaskStore) -> None:
        self.store = store

    def apply(self, callback: Callable, route: object) -> Callable:
        """Routes are left as they are."""
        return callback

    def close(self) -> None:
        """Bottle calls this from app.close()."""
        self.store.stop_waiting()


_WAITRESS_BODY_FACTOR = 4


class _Server:
    """A waitress server that runs in the calling thread until stop() is called."""

    def __init__(self, app: bottle.Bottle, config: Config) -> None:
        self._app = app
        self._map: dict = {}  # waitress's socket map, ours so that stop() can wake it
        self._wake = waitress.trigger.trigger(self._map)
        self._waitress = waitress.create_server(
            app,
            map=self._map,
            host=config.host,
            port=config.port,
            threads=config.threads,
            channel_timeout=config.timeout,
            # Waitress reads a body before the app runs, and answers a larger one with
            # plain text, often while the client is still sending (a broken pipe).
            # So it takes up to four times our limit, and the gate refuses that with
            # the envelope; only beyond it does waitress's own 413 answer.
            max_request_body_size=_WAITRESS_BODY_FACTOR * config.max_body + 1,
            # Reading one request ahead is how waitress sees a client hang up while its
            # request runs: a long-poll claim checks that before it hands a task over.
            channel_request_lookahead=1,
            ident="simple-task-orchestrator",
        )
        listening = getattr(self._waitress, "effective_listen", None) or [
            (self._waitress.effective_host, self._waitress.effective_port)
        ]
        host, port = listening[0]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        self._stopping = threading.Event()

    def run(self) -> None:
        """Serve until stop(); then let the requests in flight finish and close every socket."""
        while not self._stopping.is_set():
            waitress.wasyncore.loop(
                timeout=self._waitress.adj.asyncore_loop_timeout, map=self._map, count=1
            )
        self._finish()

    def stop(self) -> None:
        """Make run() return; safe from another thread or a signal handler."""
        self._stopping.set()
        self._wake.pull_trigger()

    def _finish(self) -> None:
        """Release long polls, let the requests in flight finish, close every socket."""
        self._app.close()
        self._waitress.task_dispatcher.shutdown()
        waitress.wasyncore.close_all(self._map)


@contextmanager
def running_server(config: Config | None = None, app: bottle.Bottle | None = None
                   ) -> Iterator[str]:
    """Serve an app on 127.0.0.1 at a free port in a background thread; yield its base URL.

        with running_server(Config(rate_limit=0)) as url:
            urllib.request.urlopen(url + "/health")
    """
    config = dataclasses.replace(config or Config(), host="127.0.0.1", port=0)
    store = TaskStore.from_config(config) if app is None else None  # ours to close
    server = _Server(create_app(config, store) if app is None else app, config)
    thread = threading.Thread(target=server.run, name="orchestrator-server", daemon=True)
    thread.start()
    try:
        yield server.url
    finally:
        server.stop()
        thread.join()
        if store is not None:
            store.close()


def _program() -> str:
    """How the user started us: `orchestrator` once installed, else `orchestrator.py`."""
    name = os.path.basename(sys.argv[0])
    return name if name.startswith("orchestrator") else "orchestrator.py"


def _argument_parser() -> argparse.ArgumentParser:
    """The command line's flags; each overrides its environment variable."""
    parser = argparse.ArgumentParser(
        prog=_program(),
        description="Serve the task orchestrator's REST API and MCP endpoint. Settings come "
                    "from APP_* environment variables (see README.md); these flags override them.",
        epilog="Other commands, each with its --help: work (run an agent on each task of a "
               "directory); add, ls, show, wait, cancel, retry, rm, stats, dirs, workers (the queue "
               "from a terminal); mcp-stdio (relay an MCP stdio client to /mcp).",
    )
    parser.add_argument("--host", help="listen address (APP_SERVER_HOST, default 127.0.0.1)")
    parser.add_argument("--port", help="listen port, 0 for any free one "
                                       "(APP_SERVER_PORT, default 8080)")
    parser.add_argument("--threads", help="worker threads (APP_SERVER_THREADS, default 8)")
    parser.add_argument("--data-file", metavar="PATH",
                        help="keep the tasks in this SQLite file across restarts "
                             "(APP_DATA_FILE; default: in memory only)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line: serve (the default), or a subcommand; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    commands = {"mcp-stdio": _main_mcp_stdio, "work": _main_work}
    try:
        if argv and argv[0] in commands:
            return commands[argv[0]](argv[1:])
        if argv and argv[0] in _CLIENT_COMMANDS:
            return _main_client(argv[0], argv[1:])
        if argv and not argv[0].startswith("-"):  # serving takes flags only: a mistyped command
            print(f"{_program()}: unknown command {argv[0]}; the commands are "
                  f"{', '.join([*_CLIENT_COMMANDS, *commands])} (none: serve)", file=sys.stderr)
            return 2
        return _main_serve(argv)
    except KeyboardInterrupt:  # Ctrl-C with no handler of its own: client commands, mcp-stdio
        return 130


def _pace_the_collector() -> None:
    """Keep the garbage collector's full passes short, however many tasks the store holds.

    A full pass scans every container object, and each task is one: with 100,000
    tasks a pass holds the GIL for about 80 ms, and every request waits. Tasks
    hold no reference cycles (a deleted task is freed by its reference count), so
    scanning them again finds nothing. So what is alive at startup (a data file's
    tasks included), and then whatever survives a full pass, is frozen
    (gc.freeze): later passes scan only what was made since. Cycles among frozen
    objects that become garbage wait for a thaw: once the frozen set has doubled
    since the last one, the next full pass scans everything once. Like a growing
    list's reallocation, that rare pause bounds what waits to be collected.
    For the serving process only: importing the module leaves the collector alone.
    """
    gc.freeze()
    thawed = {"frozen": gc.get_freeze_count()}  # how many were frozen after the last thaw

    def after_collection(phase: str, info: dict) -> None:
        if phase != "stop" or info["generation"] != 2:
            return
        frozen = gc.get_freeze_count()
        if frozen > 2 * thawed["frozen"]:
            gc.unfreeze()  # the next full pass scans everything
            return
        gc.freeze()
        if not frozen:  # this pass followed a thaw
            thawed["frozen"] = gc.get_freeze_count()

    gc.callbacks.append(after_collection)


def _main_serve(argv: list[str]) -> int:
    """Run the server until SIGINT or SIGTERM; exit status 2 for a bad setting."""
    args = _argument_parser().parse_args(argv)
    try:
        config = Config.from_env().with_flags(host=args.host, port=args.port,
                                              threads=args.threads, data_file=args.data_file)
        store = TaskStore.from_config(config)
    except ConfigError as error:
        print(f"{_program()}: {error}", file=sys.stderr)
        return 2
    try:
        server = _Server(create_app(config, store), config)
    except OSError as error:
        store.close()
        print(f"{_program()}: cannot listen on {config.host}:{config.port}: {error.strerror}",
              file=sys.stderr)
        return 1
    except ValueError:  # waitress could not resolve the host
        store.close()
        print(f"{_program()}: APP_SERVER_HOST (or --host) must be an address or a name of "
              f"this machine, not {config.host!r}", file=sys.stderr)
        return 2
    _configure_logging(config)
    _pace_the_collector()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: server.stop())
    if not _is_loopback(config.host) and config.api_key is None:
        logger.warning("listening on a non-loopback address without APP_SECURITY_API_KEY: "
                       "anyone who reaches this port can queue prompts for your agents")
    print(f"orchestrator {__version__} listening on {server.url}; {_keeping(store)}", flush=True)
    server.run()
    try:
        store.close()
    except StorageError as error:  # the last changes could not be saved; they were not acknowledged
        logger.error("%s", error.message)
    if store.path is None and len(store):
        logger.warning("stopped; %s", _kept(store))
    else:
        logger.info("stopped; %s", _kept(store))
    return 0


def _keeping(store: TaskStore) -> str:
    """The startup line's word on where the tasks live."""
    if store.path is None:
        return "tasks live in memory only (set APP_DATA_FILE to keep them)"
    return f"{_count(len(store), 'task')} loaded from {store.path}"


def _kept(store: TaskStore) -> str:
    """The shutdown line's word on what became of the tasks."""
    if store.path is not None:
        return f"{_count(len(store), 'task')} kept in {store.path}"
    if not len(store):
        return "no tasks were in memory"
    were, are = ("was", "is") if len(store) == 1 else ("were", "are")
    return (f"{_count(len(store), 'task')} {were} in memory and {are} gone "
            "(set APP_DATA_FILE to keep them)")


def _count(number: int, noun: str) -> str:
    """'1 task', '50 tasks'."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


# -- talking to a running server: shared by every client command ---------------

class _HelpWithDefaults(argparse.HelpFormatter):
    """--help that shows each option's default, where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        """The option's help, with its default unless that is None or False."""
        if action.default in (None, False, [], argparse.SUPPRESS) or "%(default)" in action.help:
            return action.help
        return action.help + " (default: %(default)s)"


def _flag(parse: Callable[[str], object]) -> Callable[[str], object]:
    """A setting's parser as an argparse type, so that a bad flag says what it must be."""
    def check(raw: str) -> object:
        try:
            return parse(raw)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"must be {error}") from None
    return check


def _directory(path: str) -> str:
    """A directory given on the command line, made absolute as the shell shows it.

    A relative path is taken from $PWD when that is where the process runs:
    through a symbolic link, `pwd` shows the link while the system's idea of the
    current directory is the real path, and a task added here must match a
    worker started with --work-path "$PWD".
    """
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        return os.path.normpath(path)
    here = os.environ.get("PWD", "")
    try:
        pwd_is_here = os.path.isabs(here) and os.path.samefile(here, ".")
    except OSError:  # gone, or not allowed to look
        pwd_is_here = False
    return os.path.normpath(os.path.join(here if pwd_is_here else os.getcwd(), path))


def _connection_flags(parser: argparse.ArgumentParser,
                      url_help: str = "the orchestrator's base URL") -> None:
    """--url and --token, as every client command takes them."""
    parser.add_argument("--url", type=_flag(_http_url),
                        default=os.environ.get("ORCHESTRATOR_URL") or _DEFAULT_URL,
                        help=url_help + " ($ORCHESTRATOR_URL when set, as the worker gives "
                                        "its agents)")
    parser.add_argument("--token", type=_flag(_api_key_text),
                        help="API key (default: $APP_SECURITY_API_KEY)")


def _api_key(parser: argparse.ArgumentParser, flag: str | None) -> str | None:
    """--token, else APP_SECURITY_API_KEY; read here, so that --help never shows it.

    A key no header can carry is a usage error (parser.error exits 2).
    """
    if flag is not None:
        return flag  # checked as the flags were parsed
    raw = os.environ.get("APP_SECURITY_API_KEY", "")
    if raw == "":  # unset, as Config.from_env counts it
        return None
    try:
        return _parse_setting("APP_SECURITY_API_KEY", _api_key_text, raw)
    except ConfigError as error:
        parser.error(str(error))


def _http_exchange(method: str, url: str, body: bytes | None, headers: dict[str, str],
                   timeout: float) -> tuple[int, bytes]:
    """One HTTP request: (status, body), error statuses included; OSError when unreachable."""
    outgoing = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(outgoing, timeout=timeout) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


class _Refused(Exception):
    """The server refused the API key (401): retrying cannot help."""


class _ApiClient:
    """The REST API as the client commands use it: JSON bodies in, (status, envelope) out."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url = url.rstrip("/")
        self.token = token

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 30,
             extra_headers: Mapping[str, str] | None = None) -> tuple[int, dict]:
        """One request; raises _Refused on a 401 and OSError when the server is unreachable."""
        headers = {"Accept": "application/json", **(extra_headers or {})}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None if body is None else json.dumps(body).encode()
        status, raw = _http_exchange(method, self.url + path, data, headers, timeout)
        if status == 401:
            raise _Refused("the server refused the API key (401): pass --token or set "
                           "APP_SECURITY_API_KEY")
        try:
            envelope = json.loads(raw)
        except ValueError:
            envelope = {"error": {"message": f"HTTP {status}, and not this API's JSON: is "
                                             f"{self.url} the orchestrator?"}}
        return status, envelope


def _error_message(envelope: dict, status: int) -> str:
    """The envelope's error message, or the bare status."""
    error = envelope.get("error") or {}
    return error.get("message") or f"HTTP {status}"


# -- add, ls, show, wait, cancel, retry, rm, stats, dirs, workers: the queue from a terminal

class _CommandFailed(Exception):
    """A client command cannot go on: the message to print, and the exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class _ClientCommand:
    """One client command: what --help says, its own flags, what it asks the API, how it
    prints the answer (unless --json)."""

    description: str
    flags: Callable[[argparse.ArgumentParser], None]
    run: Callable[[_ApiClient, argparse.Namespace], object]
    show: Callable[[object], str]


def _main_client(name: str, argv: list[str]) -> int:
    """Run one client command: 0 done, 1 the API refused, 2 a usage error or no server."""
    command = _CLIENT_COMMANDS[name]
    parser = argparse.ArgumentParser(prog=f"{_program()} {name}",
                                     description=command.description,
                                     formatter_class=_HelpWithDefaults)
    _connection_flags(parser)
    parser.add_argument("--json", action="store_true", help="print the API's data as JSON")
    command.flags(parser)
    args = parser.parse_args(argv)
    try:
        data = command.run(_ApiClient(args.url, _api_key(parser, args.token)), args)
    except _CommandFailed as failure:
        print(_escaped_for_terminal(f"{_program()} {name}: {failure}"), file=sys.stderr)
        return failure.status
    text = json.dumps(data, indent=2, ensure_ascii=False) if args.json else command.show(data)
    print(_escaped_for_terminal(text))
    return 0


def _ask(api: _ApiClient, method: str, path: str, body: dict | None = None,
         headers: Mapping[str, str] | None = None) -> object:
    """One API call: the envelope's data, or _CommandFailed with its message."""
    try:
        status, envelope = api.call(method, path, body, extra_headers=headers)
    except _Refused as refused:
        raise _CommandFailed(str(refused)) from None
    except OSError as error:
        raise _CommandFailed(f"cannot reach the orchestrator at {api.url} "
                             f"({getattr(error, 'reason', error)})", status=2) from None
    if not envelope.get("success"):
        raise _CommandFailed(_error_message(envelope, status))
    return envelope["data"]


def _each(api: _ApiClient, ids: list[str], action: Callable[[str], object]) -> list:
    """Act on each task id; every refusal is printed, and the command fails at the end."""
    done, refused = [], []
    for task_id in ids:
        try:
            done.append(action(task_id))
        except _CommandFailed as failure:
            if failure.status != 1:
                raise
            refused.append(str(failure) if task_id in str(failure) else f"{task_id}: {failure}")
    if refused:
        for answer in done:
            print(_escaped_for_terminal(f"{answer['id']}: {answer.get('status', 'deleted')}"))
        raise _CommandFailed("\n".join(refused))
    return done


def _add_flags(parser: argparse.ArgumentParser) -> None:
    """add's flags."""
    parser.add_argument("prompt", nargs="*", help="the prompt (default: standard input)")
    parser.add_argument("--dir", default=".", help="the work directory")
    parser.add_argument("--priority", help="high, medium or low (default: medium)")
    parser.add_argument("--tag", action="append", default=[], help="a tag; repeat for more")
    parser.add_argument("--max-retries", type=_flag(_integer(0, 100)),
                        help="re-queues after failures (default: the server's)")
    parser.add_argument("--key", help="an Idempotency-Key: adding twice queues it once")
    parser.add_argument("--delay", type=_flag(_integer(0, 604_800)), metavar="SECONDS",
                        help="not claimable before this many seconds from now")
    parser.add_argument("--after", type=_flag(_task_id), action="append", default=[],
                        metavar="ID", help="a task that must complete first; repeat for more")


def _add(api: _ApiClient, args: argparse.Namespace) -> dict:
    """Queue a task: the prompt from the arguments, else from standard input."""
    prompt = " ".join(args.prompt) if args.prompt else (
        "" if sys.stdin.isatty() else sys.stdin.read())
    if not prompt:
        raise _CommandFailed("give the prompt as arguments, or on standard input "
                             "(orchestrator add < prompt.md)", status=2)
    body = {"work_directory": _directory(args.dir), "prompt": prompt,
            "tags": args.tag, "depends_on": args.after}
    body.update((name, value) for name, value in (
        ("priority", args.priority), ("max_retries", args.max_retries),
        ("delay_seconds", args.delay)) if value is not None)
    key = {IDEMPOTENCY_HEADER.name: args.key} if args.key is not None else None
    return _ask(api, "POST", "/api/v1/tasks", body, headers=key)


def _ls_flags(parser: argparse.ArgumentParser) -> None:
    """ls's flags."""
    parser.add_argument("--status", help="one status, or several: waiting,failed")
    parser.add_argument("--dir", help="only this work directory")
    parser.add_argument("--tag", help="only tasks with this tag")
    parser.add_argument("--search", help="text in the prompt, error or output, in any case")
    parser.add_argument("--limit", type=_flag(_integer(1, 1000)), default=20,
                        help="how many, newest first")


def _ls(api: _ApiClient, args: argparse.Namespace) -> dict:
    """A page of tasks, newest first."""
    query = {"status": args.status, "tag": args.tag, "q": args.search, "limit": args.limit,
             "work_directory": args.dir and _directory(args.dir)}
    encoded = urllib.parse.urlencode({name: value for name, value in query.items() if value})
    return _ask(api, "GET", f"/api/v1/tasks?{encoded}")


def _task_id(raw: str) -> str:
    """A parser for a task id, so that a typo is a usage error, not a request."""
    if not _ecma_anchored(TASK_ID.pattern).search(raw):
        raise ValueError(f"a task id (a UUID, as ls prints them), not {raw!r}")
    return raw


def _ids_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of a command on tasks named by id."""
    parser.add_argument("ids", nargs="+", type=_flag(_task_id), metavar="ID", help="task ids")


def _retry_flags(parser: argparse.ArgumentParser) -> None:
    """retry's flags: ids, or --failed for every failed task (of --dir)."""
    parser.add_argument("ids", nargs="*", type=_flag(_task_id), metavar="ID", help="task ids")
    parser.add_argument("--failed", action="store_true",
                        help="every failed task instead (of --dir, when given)")
    parser.add_argument("--dir", help="with --failed: only this work directory")


def _retry(api: _ApiClient, args: argparse.Namespace) -> object:
    """Queue failed or cancelled tasks again: by id, or every failed one through bulk."""
    if args.failed and args.ids:
        raise _CommandFailed("give task ids or --failed, not both", status=2)
    if not (args.failed or args.ids):
        raise _CommandFailed("give task ids, or --failed (with --dir to keep to one "
                             "directory)", status=2)
    if args.ids:
        return _each(api, args.ids, lambda task_id: _ask(
            api, "POST", f"/api/v1/tasks/{task_id}/retry", {}))
    task_filter = {"status": FAILED}
    if args.dir is not None:
        task_filter["work_directory"] = _directory(args.dir)
    total = {"action": "retry", "changed": 0, "skipped": 0, "more": False}
    while True:  # one bulk call changes at most BULK_LIMIT tasks
        answer = _ask(api, "POST", "/api/v1/tasks/bulk", {"action": "retry", "filter": task_filter})
        total.update(changed=total["changed"] + answer["changed"], more=answer["more"],
                     skipped=total["skipped"] + answer["skipped"])
        if not (answer["more"] and answer["changed"]):
            return total


def _wait_flags(parser: argparse.ArgumentParser) -> None:
    """wait's flags."""
    parser.add_argument("id", type=_flag(_task_id), metavar="ID", help="a task id")
    parser.add_argument("--timeout", type=_flag(_seconds),
                        help="give up after this many seconds (default: wait as long as it takes)")


def _wait(api: _ApiClient, args: argparse.Namespace) -> dict:
    """Wait for a task to finish: its data once completed; _CommandFailed otherwise."""
    give_up_at = None if args.timeout is None else time.monotonic() + args.timeout
    while True:
        left = 20 if give_up_at is None else max(0.0, give_up_at - time.monotonic())
        asked = time.monotonic()
        task = _ask(api, "GET", f"/api/v1/tasks/{args.id}?wait={min(20, math.ceil(left))}")
        if task["status"] == COMPLETED:
            return task
        if task["status"] in FINISHED:
            why = f": {task['error_message']}" if task["error_message"] else ""
            raise _CommandFailed(f"{task['id']}: {task['status']}{why}")
        if give_up_at is not None and time.monotonic() >= give_up_at:
            raise _CommandFailed(f"{task['id']}: not finished after {args.timeout:g} s "
                                 f"(it is {task['status']})")
        if time.monotonic() - asked < 1:
            time.sleep(1)  # answered at once (every waiting slot taken): do not hammer it


#: Control characters a terminal would act on: those of the logs (_CONTROLS), but for
#: line breaks and tabs, which printed text needs.
_TERMINAL_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def _escaped_for_terminal(text: str) -> str:
    """Text to print, with _TERMINAL_CONTROLS as \\uXXXX escapes.

    Task text must not drive the terminal of whoever reads it (set its title,
    clear it, forge a line). JSON allows these escapes inside its strings too.
    """
    return _TERMINAL_CONTROLS.sub(_as_unicode_escape, text)


def _table(headers: tuple[str, ...], rows: list[tuple], flexible: tuple[int, ...] = ()) -> str:
    """Rows in aligned columns; the flexible ones, in turn, are cut to fit the output."""
    # Escaped before they are measured: a tab or an escape would upset the columns.
    cells = [tuple(_escape_controls(str(value).replace("\n", " ")) for value in row)
             for row in rows]
    widths = [max(map(_width, column)) for column in zip(headers, *cells)]
    columns = _output_columns()
    if columns is not None:
        for column in flexible:
            over = sum(widths) + 2 * (len(widths) - 1) - columns
            widths[column] = max(8, widths[column] - max(0, over))
    lines = []
    for row in (headers, *cells):
        fitted = [_fit(text, width) for text, width in zip(row, widths)]
        lines.append("  ".join(fitted).rstrip())
    return "\n".join(lines)


def _output_columns() -> int | None:
    """How wide a table may be: COLUMNS, else the terminal's width, else (None) unbounded.

    Into a pipe or a file, whole texts serve grep better than cut ones.
    """
    if os.environ.get("COLUMNS", "").isdigit() or sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return None


def _width(text: str) -> int:
    """The columns a text takes in a terminal: an East Asian wide character takes two."""
    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


def _fit(text: str, width: int) -> str:
    """Text padded to a width of columns, or cut to it with an ellipsis."""
    if _width(text) <= width:
        return text + " " * (width - _width(text))
    kept, used = [], 0
    for char in text:
        columns = _width(char)
        if used + columns > width - 1:
            break
        kept.append(char)
        used += columns
    return "".join(kept) + "…" + " " * (width - 1 - used)


def _age(timestamp: str | None) -> str:
    """How long ago an API timestamp was, shortly: 45s, 12m, 3h, 2d."""
    if timestamp is None:
        return "-"
    seconds = max(0, time.time() - _parse_rfc3339(timestamp))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _show_tasks(page: dict) -> str:
    """ls: a table, then how many more there are."""
    rows = [(task["id"], task["status"], task["priority"], _age(task["created_at"]),
             task["work_directory"], task["prompt"]) for task in page["tasks"]]
    table = _table(("ID", "STATUS", "PRIO", "AGE", "DIRECTORY", "PROMPT"), rows,
                   flexible=(5, 4))
    more = page["total"] - len(page["tasks"]) - page["offset"]
    return table + (f"\n… and {more} more (--limit)" if more > 0 else "")


def _show_task(task: dict) -> str:
    """show: every field, the long texts last."""
    result = task["result"] or {}
    fields = {**task, "result": {name: value for name, value in result.items()
                                 if name != "output"} or None}
    first = ("id", "status", "priority", "work_directory", "worker_id", "retry_count",
             "max_retries")
    texts = {"prompt": task["prompt"], "progress": task["progress"],
             "error": task["error_message"], "output": result.get("output")}
    names = [*first, *(name for name in fields if name not in first
                       and name not in ("prompt", "progress", "error_message"))]
    lines = [f"{name + ':':<17} {_plain(fields[name])}" for name in names]
    for name, text in texts.items():
        if text:
            lines += ["", f"{name}:", textwrap.indent(text, "  ")]
    return "\n".join(lines)


def _plain(value: object) -> str:
    """A value as the terminal shows it: - for nothing, lists with commas, objects as JSON."""
    if value is None or value == [] or value == {}:
        return "-"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _show_statuses(tasks: list[dict]) -> str:
    """cancel, retry by id, rm: one line per task."""
    return "\n".join(f"{task['id']}: {task.get('status', 'deleted')}" for task in tasks)


def _show_statistics(stats: dict) -> str:
    """stats: one line per number."""
    return "\n".join(f"{name + ':':<24} {_plain(value)}" for name, value in stats.items())


def _show_directories(data: dict) -> str:
    """dirs: a table."""
    rows = [(d["work_directory"], d["counts"][WAITING], d["counts"][WORKING],
             d["counts"][FAILED], "-" if d["oldest_waiting_age_seconds"] is None
             else f"{round(d['oldest_waiting_age_seconds'])}s", ",".join(d["workers"]) or "-")
            for d in data["directories"]]
    return _table(("DIRECTORY", "WAITING", "WORKING", "FAILED", "OLDEST", "WORKERS"), rows,
                  flexible=(0, 5))


def _show_workers(data: dict) -> str:
    """workers: a table."""
    rows = [(w["worker_id"], _age(w["last_seen"]), len(w["holding"]), w["completed"],
             w["failed"]) for w in data["workers"]]
    return _table(("WORKER", "SEEN", "HOLDING", "COMPLETED", "FAILED"), rows, flexible=(0,))


def _no_flags(parser: argparse.ArgumentParser) -> None:
    """A command with no flags of its own."""


_CLIENT_COMMANDS = {
    "add": _ClientCommand(
        "Queue a task for a work directory; prints its id. The prompt comes from the "
        "arguments or, when there are none, from standard input.",
        _add_flags, _add, lambda task: task["id"]),
    "ls": _ClientCommand("List tasks, newest first.", _ls_flags, _ls, _show_tasks),
    "show": _ClientCommand(
        "Show one task: every field, its prompt, progress, error and output.",
        lambda parser: parser.add_argument("id", type=_flag(_task_id), metavar="ID",
                                           help="a task id"),
        lambda api, args: _ask(api, "GET", f"/api/v1/tasks/{args.id}"), _show_task),
    "cancel": _ClientCommand(
        "Cancel waiting or working tasks.", _ids_flags,
        lambda api, args: _each(api, args.ids, lambda task_id: _ask(
            api, "POST", f"/api/v1/tasks/{task_id}/cancel", {})), _show_statuses),
    "retry": _ClientCommand(
        "Queue failed or cancelled tasks again: by id, or every failed one (--failed).",
        _retry_flags, _retry,
        lambda data: (f"retried {data['changed']}" if isinstance(data, dict)
                      else _show_statuses(data))),
    "rm": _ClientCommand(
        "Delete tasks, in any state.", _ids_flags,
        lambda api, args: _each(api, args.ids, lambda task_id: _ask(
            api, "DELETE", f"/api/v1/tasks/{task_id}")), _show_statuses),
    "wait": _ClientCommand(
        "Wait for a task to finish; exit status 0 when it completed, 1 otherwise.",
        _wait_flags, _wait, lambda task: _show_statuses([task])),
    "stats": _ClientCommand("The queue's statistics.", _no_flags,
                            lambda api, args: _ask(api, "GET", "/api/v1/statistics"),
                            _show_statistics),
    "dirs": _ClientCommand("Each work directory: its tasks by status, and who holds them.",
                           _no_flags, lambda api, args: _ask(api, "GET", "/api/v1/directories"),
                           _show_directories),
    "workers": _ClientCommand("The workers seen lately: what they hold, how they did.",
                              _no_flags, lambda api, args: _ask(api, "GET", "/api/v1/workers"),
                              _show_workers),
}


# -- mcp-stdio: for MCP clients that only start local processes ---------------

def _main_mcp_stdio(argv: list[str]) -> int:
    """Relay newline-delimited JSON-RPC between stdin/stdout and an MCP endpoint."""
    parser = argparse.ArgumentParser(
        prog=f"{_program()} mcp-stdio",
        description="Relay an MCP client that speaks stdio to a running orchestrator's /mcp, "
                    "so that every agent shares one queue. Stdout carries only protocol "
                    "messages; logs go to stderr. Exits when stdin closes.",
        formatter_class=_HelpWithDefaults,
    )
    _connection_flags(parser, url_help="the orchestrator, or its /mcp address")
    args = parser.parse_args(argv)
    _configure_logging(Config(log_level="warning"))
    relay = _StdioRelay(_mcp_address(args.url), _api_key(parser, args.token))
    for line in sys.stdin:
        if line.strip():
            reply = relay.forward(line.strip())
            if reply is not None:
                sys.stdout.write(json.dumps(reply) + "\n")
                sys.stdout.flush()
    return 0


def _mcp_address(url: str) -> str:
    """The /mcp address of an orchestrator given by its base URL (as `work` takes it) or as is."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path.rstrip("/")
    return urllib.parse.urlunsplit(parts._replace(
        path=path if path.endswith("/mcp") else path + "/mcp"))


class _StdioRelay:
    """Posts each stdio message to /mcp with the headers HTTP clients add, returns the reply."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url = url
        self.token = token
        self.negotiated: str | None = None  # the handshake version, once initialize answered

    def forward(self, line: str) -> dict | None:
        """The JSON-RPC reply to one message; None for a notification."""
        try:
            message = json.loads(line)
        except ValueError:
            return {"jsonrpc": "2.0", "id": None,
                    "error": {"code": _PARSE_ERROR, "message": "Parse error: not JSON"}}
        request_id = message.get("id") if isinstance(message, dict) else None
        try:
            reply = self._post(line.encode(), self._headers(message))
        except OSError as error:  # urllib's URLError is one
            logger.warning("cannot reach %s: %s", self.url, error)
            reply = {"error": {"code": _INTERNAL_ERROR,
                               "message": f"cannot reach the orchestrator at {self.url}: {error}"}}
        if not isinstance(message, dict) or "id" not in message:
            return None
        if "error" in reply or "result" in reply:
            reply = {**reply, "jsonrpc": "2.0", "id": request_id}
        result = reply.get("result")
        if message.get("method") == "initialize" and isinstance(result, dict):
            self.negotiated = result.get("protocolVersion")
        return reply

    def _headers(self, message: object) -> dict[str, str]:
        """Content type, key, and the protocol headers mirrored from the message."""
        headers = {"Content-Type": "application/json",
                   "Accept": "application/json, text/event-stream"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        params = message.get("params") if isinstance(message, dict) else None
        meta = params.get("_meta") if isinstance(params, dict) else None
        if isinstance(meta, dict) and _VERSION_KEY in meta:
            # Any text can be in the body; a header carries only what _encode_header makes safe.
            headers["MCP-Protocol-Version"] = _encode_header(str(meta[_VERSION_KEY]))
            headers["Mcp-Method"] = _encode_header(str(message.get("method")))
            if isinstance(params.get("name"), str):
                headers["Mcp-Name"] = _encode_header(params["name"])
        elif self.negotiated:
            headers["MCP-Protocol-Version"] = self.negotiated
        return headers

    def _post(self, body: bytes, headers: dict[str, str]) -> dict:
        """POST one message; the JSON-RPC reply, or a stand-in error for a non-JSON-RPC answer."""
        status, raw = _http_exchange("POST", self.url, body, headers, timeout=60)
        try:
            reply = json.loads(raw) if raw else {}
        except ValueError:
            reply = None
        if not raw or isinstance(reply, dict) and reply.get("jsonrpc") == "2.0":
            return reply or {}
        text = raw[:200].decode("utf-8", "replace")
        return {"error": {"code": _INTERNAL_ERROR,
                          "message": f"HTTP {status} from {self.url}: {text}"}}


def _encode_header(value: str) -> str:
    """A header value as is when plain ASCII, else in the spec's =?base64?...?= form."""
    if value.isascii() and value.isprintable() and value == value.strip() \
            and not value.startswith("=?base64?"):
        return value
    return "=?base64?" + base64.b64encode(value.encode()).decode() + "?="


# -- work: run an agent command on each task of one directory -----------------

def _main_work(argv: list[str]) -> int:
    """Claim tasks for a directory, run a command on each, report; see --help."""
    parser = argparse.ArgumentParser(
        prog=f"{_program()} work",
        usage="%(prog)s --work-path DIR [options] -- COMMAND [ARG ...]",
        description="Claim the tasks of one directory, one at a time; run COMMAND on each in "
                    "the task's directory with the prompt on its standard input (and in place "
                    "of {prompt} in any ARG); keep the lease alive while it runs; report exit "
                    "status 0 as completed (with its output) and anything else as failed.",
        epilog="A worker runs whatever prompts the queue holds: keep the server on loopback "
               "or behind an API key. Ctrl-C once: finish the current task, then exit. "
               "Twice: stop it now and hand the task back. Exit status: 0 done, 2 the "
               "command or the API key is wrong, 3 too many tasks failed in a row, 130 "
               "stopped by a second Ctrl-C.",
        formatter_class=_HelpWithDefaults,
    )
    default = {item.name: item.default for item in dataclasses.fields(_WorkerSettings)}
    _connection_flags(parser)
    parser.add_argument("--work-path", required=True, metavar="DIR",
                        help="the directory whose tasks to take")
    parser.add_argument("--worker-id", help="how this worker is named in the queue "
                                            "(default: HOST-PID)")
    parser.add_argument("--wait", type=_flag(_integer(0, 20)), default=default["wait"],
                        metavar="0-20",
                        help="seconds each claim waits for a task")
    parser.add_argument("--once", action="store_true",
                        help="handle one task (or none, if none comes within --wait), then exit")
    parser.add_argument("--max-output", type=_flag(_integer(1, MAX_REPORTED_OUTPUT)),
                        default=default["max_output"], metavar="BYTES",
                        help="how much of the end of the command's output to report "
                             f"(at most {MAX_REPORTED_OUTPUT})")
    parser.add_argument("--max-failures", type=_flag(_integer(0, 1_000_000)),
                        default=default["max_failures"], metavar="N", help="stop (exit status 3) after N tasks failed in a row; "
                                          "0: never")
    parser.add_argument("--grace", type=_flag(_seconds), default=default["grace"],
                        metavar="SECONDS",
                        help="how long a stopped command has after SIGTERM, before SIGKILL")
    parser.add_argument("--quiet", action="store_true",
                        help="do not show the command's output as it comes")
    parser.add_argument("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --, e.g. -- claude -p")
    _configure_logging(Config())
    work_path = _directory(args.work_path)
    program = shutil.which(command[0])
    if program is None:
        logger.error("cannot run %s: no such command, or it is not executable; "
                     "no task was claimed", command[0])
        return 2
    if not os.path.isdir(work_path):
        logger.error("no such directory: %s; no task was claimed", work_path)
        return 2
    settings = _WorkerSettings(
        work_path=work_path,
        worker_id=args.worker_id if args.worker_id is not None else _default_worker_id(),
        command=command, program=os.path.abspath(program), wait=args.wait, once=args.once, max_output=args.max_output,
        max_failures=args.max_failures, grace=args.grace, quiet=args.quiet,
    )
    return _Worker(_ApiClient(args.url, _api_key(parser, args.token)), settings).run()


def _default_worker_id() -> str:
    """HOST-PID: unique on a machine, and says where a worker runs."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class _WorkerSettings:
    """What `orchestrator.py work` was told on its command line."""

    work_path: str
    worker_id: str
    command: list[str]
    #: The file command[0] names, found from where the worker started: a relative
    #: ./agent is not looked for again in each task's directory, where a file of
    #: that name in the checkout would run instead.
    program: str | None = None
    wait: int = 20
    once: bool = False
    max_output: int = 65536
    max_failures: int = 3  #: consecutive failed tasks before the worker stops; 0: never
    grace: float = 10  #: seconds between SIGTERM and SIGKILL for a stopped command
    quiet: bool = False


#: The most of a command's output a report carries: escaped as JSON (6 bytes for some
#: bytes), it still fits the server's default body limit (APP_SERVER_MAX_BODY, 1 MiB).
MAX_REPORTED_OUTPUT = 131_072


class _Abort(Exception):
    """A second Ctrl-C: stop now."""


class _Broken(Exception):
    """The worker cannot go on (its command cannot start or fails every task, or --once
    cannot reach the server): its exit status."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Output:
    """The end of one of the command's output streams, shown as it comes unless quiet."""

    def __init__(self, limit: int, echo: object | None) -> None:
        self.limit = limit
        self.echo = echo  #: a binary stream to copy the output to, or None
        #: Guards `tail`: the reader thread appends, the heartbeat thread reads.
        self._lock = threading.Lock()
        self.tail = bytearray()

    def read_from(self, stream: object) -> None:
        """Read the stream to its end (in a thread of its own)."""
        while chunk := stream.read1(65536):
            if self.echo is not None:
                try:
                    self.echo.write(chunk)
                    self.echo.flush()
                except OSError:  # the worker's own output is closed (`| head`): read on
                    self.echo = None
            with self._lock:
                self.tail += chunk
                del self.tail[:-self.limit]

    def end_line(self) -> None:
        """End the echoed output's last line, so that the worker's next line starts afresh."""
        with self._lock:
            unfinished = self.tail and not self.tail.endswith(b"\n")
        if unfinished and self.echo is not None:
            self.echo.write(b"\n")
            self.echo.flush()

    def text(self, limit: int | None = None) -> str:
        """The last `limit` bytes (all that is kept by default) as text."""
        with self._lock:
            kept = bytes(self.tail if limit is None else self.tail[-limit:])
        return kept.decode("utf-8", "replace")


class _Worker:
    """Claims tasks for one directory, runs the command on each, keeps the lease, reports.

    The main thread only ever waits on one queue of events: Ctrl-C (put there by
    the signal handler, which SimpleQueue allows), a finished HTTP call, the
    command's exit, the end of a lease (cancelled, deleted or lost). Heartbeats
    run in a thread of their own.
    """

    def __init__(self, api: _ApiClient, settings: _WorkerSettings) -> None:
        self.api = api
        self.settings = settings
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._interrupts = 0
        self._failures_in_a_row = 0

    def run(self) -> int:
        """Work until the queue is empty (--once), Ctrl-C, or the worker is broken; the status."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)
        logger.info("working on %s as %s; Ctrl-C to stop", self.settings.work_path,
                    self.settings.worker_id)
        try:
            while not self._interrupts:
                task = self._claim()
                if task is not None:
                    self._work_on(task)
                if self.settings.once:
                    break
                if task is None and not self._interrupts:  # stopping: no pause first
                    # A claim can answer "nothing" at once (--wait 0, or every long-poll
                    # slot taken): pause, so that an idle worker never hammers the server.
                    self._pause(1.0)
        except _Refused as error:
            logger.error("%s", error)
            return 2
        except _Broken as broken:
            return broken.status
        except _Abort:
            return 130
        return 0

    def _on_signal(self, signum: int, frame: object) -> None:
        """Count Ctrl-C (or SIGTERM) and wake the main thread."""
        self._interrupts += 1
        self._events.put(("interrupt",))

    # -- claiming and reporting ------------------------------------------------

    def _claim(self) -> dict | None:
        """Long-poll the next task; None when none came, or when asked to stop."""
        query = urllib.parse.urlencode({"work_path": self.settings.work_path,
                                        "worker_id": self.settings.worker_id,
                                        "wait": self.settings.wait})
        answer = self._request("GET", f"/api/v1/tasks/next?{query}", None, claiming=True,
                               timeout=self.settings.wait + 15)
        if answer is None:
            logger.warning("stopping; no task was in hand")
            return None
        status, envelope = answer
        if status != 200:  # a wrong --url or --worker-id: asking again cannot help
            logger.error("the orchestrator at %s refused the claim (HTTP %d: %s); no task was "
                         "claimed", self.api.url, status, _error_message(envelope, status))
            raise _Broken(2)
        return envelope.get("data")

    def _report(self, task: dict, action: str, body: dict) -> str:
        """Report on the task, retrying while the server is unreachable; what became of it."""
        status, envelope = self._request("POST", f"/api/v1/tasks/{task['id']}/{action}",
                                         {**self._reporter(task), **body})
        if status == 200:
            return envelope["data"]["status"]
        return f"not recorded ({_error_message(envelope, status)})"

    def _reporter(self, task: dict) -> dict:
        """Who reports on a task: this worker, fenced to the lease its claim got."""
        return {"worker_id": self.settings.worker_id, "lease_token": task["lease_token"]}

    def _request(self, method: str, path: str, body: dict | None, claiming: bool = False,
                 timeout: float = 30) -> tuple[int, dict] | None:
        """A request, retried while the server is down, busy or limiting this client.

        A rate limit is waited out as the server says (Retry-After); anything
        else backs off, doubling to 10 s. A claim gives up (None) at once when a
        first Ctrl-C asks the worker to stop: the server gives back whatever it
        finds for a claimant that has hung up. With --once, a claim that cannot
        reach the server stops the worker (exit 2): a script is not left waiting.
        """
        delay = 1.0
        while True:
            try:
                answer = self._in_background(
                    functools.partial(self.api.call, method, path, body, timeout),
                    abandon_on_interrupt=claiming)
                if answer is None:
                    return None
                status, envelope = answer
            except OSError as error:
                reason = getattr(error, "reason", error)
                if claiming and self.settings.once:  # for scripts: a wrong --url fails now
                    logger.error("cannot reach the orchestrator at %s (%s); no task was "
                                 "claimed", self.api.url, reason)
                    raise _Broken(2) from None
                pause = delay
                logger.warning("cannot reach the orchestrator at %s (%s); retrying in %.0f s",
                               self.api.url, reason, pause)
            else:
                if status == 429:
                    details = (envelope.get("error") or {}).get("details") or {}
                    pause = float(details.get("retry_after") or delay)
                    logger.warning("rate limited by the orchestrator; retrying in %.0f s", pause)
                elif status >= 500:
                    pause = delay
                    logger.warning("the orchestrator answered HTTP %d (%s); retrying in %.0f s",
                                   status, _error_message(envelope, status), pause)
                else:
                    return status, envelope
            if self._pause(pause) and claiming:
                return None
            delay = min(delay * 2, 10)

    def _in_background(self, call: Callable[[], object],
                       abandon_on_interrupt: bool = False) -> object:
        """Run a blocking call in a thread, so that Ctrl-C is handled while it runs.

        With `abandon_on_interrupt` (a claim), a first Ctrl-C gives the call one
        more second, for an answer the server has just sent, then returns None
        and leaves it to die with the process.
        """
        def run() -> None:
            try:
                self._events.put(("done", call(), None))
            except Exception as error:  # handed to the main thread, which re-raises it
                self._events.put(("done", None, error))
        threading.Thread(target=run, daemon=True).start()
        deadline = None
        while True:
            try:
                event = self._events.get(
                    timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if event[0] == "interrupt" and abandon_on_interrupt and deadline is None:
                self._interrupted("stopping after this task, if the pending claim brings one")
                deadline = time.monotonic() + 1.0
            elif event[0] == "interrupt":
                self._interrupted("stopping once the pending request returns")
            elif event[0] == "done":
                if event[2] is not None:
                    raise event[2]
                return event[1]

    def _pause(self, seconds: float) -> bool:
        """Sleep, waking for Ctrl-C; whether the worker has been asked to stop."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                if self._events.get(timeout=remaining)[0] == "interrupt":
                    self._interrupted("stopping")
                    return True
            except queue.Empty:
                break
        return bool(self._interrupts)

    def _interrupted(self, first: str) -> None:
        """The first Ctrl-C lets work in hand finish; the second aborts."""
        if self._interrupts > 1:
            raise _Abort()
        logger.warning("%s; press Ctrl-C again to stop at once", first)

    # -- running the command ---------------------------------------------------

    def _work_on(self, task: dict) -> None:
        """Run the command on a claimed task and report how it went, whatever happens."""
        started = time.monotonic()
        logger.info("task %s claimed in %s: %s", task["id"], task["work_directory"],
                    _shorten(task["prompt"], 60))
        try:
            self._run_command(task, started)
        except (_Abort, _Refused, _Broken):
            raise
        except Exception:  # the worker's fault, not the task's: hand it back and go on
            logger.exception("task %s: the worker failed; handing the task back", task["id"])
            self._hand_back(task)

    def _run_command(self, task: dict, started: float) -> None:
        """Start the command, wait for it (keeping the lease), report its outcome."""
        argv = [part.replace("{prompt}", task["prompt"]) for part in self.settings.command]
        if any("\0" in part for part in argv):
            outcome = self._report(task, "fail", {"retry": False, "error": (
                "the prompt contains a NUL character, which cannot be passed as a "
                "command-line argument; take {prompt} out of the command to pass it on stdin")})
            self._log_task(task, f"not started, the prompt has a NUL character: {outcome}",
                           started)
            return
        try:
            process = subprocess.Popen(
                argv, executable=self.settings.program, cwd=task["work_directory"],
                start_new_session=True,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=self._agent_environment(task),
            )
        except OSError as error:
            self._cannot_start(task, argv, error, started)
            return
        self._supervise(task, process, started)

    def _agent_environment(self, task: dict) -> dict[str, str]:
        """The worker's environment, and what an agent needs to queue follow-up work with
        `orchestrator add`: the server's URL and, when the worker has one, its API key."""
        environment = {**os.environ, "ORCHESTRATOR_TASK_ID": task["id"],
                       "ORCHESTRATOR_URL": self.api.url}
        if self.api.token is not None:
            environment["APP_SECURITY_API_KEY"] = self.api.token
        return environment

    def _cannot_start(self, task: dict, argv: list[str], error: OSError, started: float) -> None:
        """A command that does not start: the task's fault only if its prompt is too long."""
        if error.errno == errno.E2BIG:
            outcome = self._report(task, "fail", {"retry": False, "error": (
                "the prompt is too long to pass as a command-line argument; take {prompt} "
                "out of the command to pass it on stdin")})
            self._log_task(task, f"not started, the prompt is too long for {{prompt}}: "
                                 f"{outcome}", started)
            return
        self._hand_back(task)
        logger.error("cannot start %s in %s: %s; the task was handed back, and the worker "
                     "stops", argv[0], task["work_directory"], error.strerror or error)
        raise _Broken(2)

    def _supervise(self, task: dict, process: subprocess.Popen, started: float) -> None:
        """Feed the prompt, show and keep the output, heartbeat, and report the exit."""
        echo = (None, None) if self.settings.quiet else (sys.stdout.buffer, sys.stderr.buffer)
        stdout = _Output(self.settings.max_output, echo[0])
        stderr = _Output(self.settings.max_output, echo[1])
        finished = threading.Event()
        threads = [
            threading.Thread(target=self._feed, args=(process, task["prompt"]), daemon=True),
            threading.Thread(target=stdout.read_from, args=(process.stdout,), daemon=True),
            threading.Thread(target=stderr.read_from, args=(process.stderr,), daemon=True),
        ]
        for thread in threads:
            thread.start()
        threading.Thread(target=self._await_exit, args=(process, threads), daemon=True).start()
        beats = threading.Thread(target=self._keep_lease, args=(task, finished, stdout, stderr),
                                 daemon=True)
        beats.start()
        try:
            ended = self._wait_for_command(process, task)
        except _Abort:
            self._stop(process)
            self._hand_back(task)
            raise
        finally:
            finished.set()  # stops the heartbeats
        stdout.end_line()
        stderr.end_line()
        if ended is not None:
            self._log_task(task, f"{ended}: command stopped, not reported", started)
        else:
            self._finish(task, process.returncode, stdout, stderr, started)

    @staticmethod
    def _feed(process: subprocess.Popen, prompt: str) -> None:
        """Write the prompt to the command's stdin and close it; a command may not read it all."""
        with contextlib.suppress(BrokenPipeError, OSError):
            process.stdin.write(prompt.encode("utf-8", "surrogatepass"))
        with contextlib.suppress(BrokenPipeError, OSError):
            process.stdin.close()

    def _await_exit(self, process: subprocess.Popen, readers: list[threading.Thread]) -> None:
        """Announce the command's exit once its output is read to the end.

        What the command left running in its process group is stopped first: the
        task is over, and such a process may hold the output open, whose end
        would then never come. One that left the group is waited for 5 s at most.
        """
        process.wait()
        if _group_alive(process.pid):
            logger.warning("the command left processes running; stopping them")
            self._stop(process)
        for reader in readers[1:]:
            reader.join(5)
        self._events.put(("exited",))

    def _wait_for_command(self, process: subprocess.Popen, task: dict) -> str | None:
        """Wait for the command to exit; None, or why it was stopped (the lease ended)."""
        ended = None
        while True:
            event = self._events.get()
            if event[0] == "exited":
                return ended
            if event[0] == "lease ended" and event[1] == task["id"] and ended is None:
                ended = event[2]
                logger.warning("task %s: %s; stopping the command", task["id"], ended)
                threading.Thread(target=self._stop, args=(process,), daemon=True).start()
            elif event[0] == "interrupt":
                self._interrupted("stopping after this task")

    def _keep_lease(self, task: dict, finished: threading.Event, stdout: _Output,
                    stderr: _Output) -> None:
        """Heartbeat, with the end of the output as progress, until finished or the lease ends.

        Every third of the lease, and at least every 5 s, so that a cancel
        reaches the command within seconds.
        """
        lease = _parse_rfc3339(task["lease_expires_at"]) - _parse_rfc3339(task["started_at"])
        while not finished.wait(max(min(lease / 3, 5), 0.05)):
            progress = _last_lines(stdout.text(8000) or stderr.text(8000))
            body = {**self._reporter(task), **({"progress": progress} if progress else {})}
            try:
                status, envelope = self.api.call("POST", f"/api/v1/tasks/{task['id']}/heartbeat",
                                                 body)
            except (OSError, _Refused) as error:
                logger.warning("heartbeat failed (%s); trying again", error)
                continue
            if status in (404, 409) and not finished.is_set():
                self._events.put(("lease ended", task["id"], _why_lease_ended(status, envelope)))
                return

    def _stop(self, process: subprocess.Popen) -> None:
        """Stop the command's whole process group: politely, then after the grace period not.

        Every member counts, not only the command: a helper that ignores SIGTERM
        outlives a command that does not.
        """
        for signum, grace in ((signal.SIGTERM, self.settings.grace), (signal.SIGKILL, 5)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signum)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                process.poll()  # a command that has exited leaves the group once reaped
                if not _group_alive(process.pid):
                    return
                time.sleep(0.05)

    def _finish(self, task: dict, status: int, stdout: _Output, stderr: _Output,
                started: float) -> None:
        """Report an exited command: completed on status 0, failed otherwise."""
        duration_ms = round(1000 * (time.monotonic() - started))
        if status == 0:
            result = {"status": "success", "output": stdout.text(), "duration_ms": duration_ms}
            outcome = self._report(task, "complete", {"result": result})
            self._failures_in_a_row = 0
        else:
            tail = stderr.text(2000).strip()
            error = f"exit status {status}: {tail}" if tail else f"exit status {status}"
            outcome = self._report(task, "fail", {"error": error})
            self._failures_in_a_row += 1
        outcome = {"waiting": "failed, queued again"}.get(outcome, outcome)
        self._log_task(task, f"exit status {status}, {outcome}", started)
        limit = self.settings.max_failures
        if status != 0 and limit and self._failures_in_a_row >= limit:
            logger.error("%d tasks failed in a row; stopping, since the agent itself may be "
                         "broken (check it, or raise --max-failures; 0 never stops)",
                         self._failures_in_a_row)
            raise _Broken(3)

    def _hand_back(self, task: dict) -> None:
        """Release the task without using up a retry: the worker is at fault, not the task."""
        try:
            status, envelope = self.api.call("POST", f"/api/v1/tasks/{task['id']}/release",
                                             self._reporter(task), timeout=5)
        except (OSError, _Refused) as error:
            logger.warning("could not hand task %s back (%s); its lease will expire",
                           task["id"], error)
            return
        if status == 200:
            logger.warning("task %s handed back to the queue (no retry used)", task["id"])
        else:
            logger.warning("could not hand task %s back: %s", task["id"],
                           _error_message(envelope, status))

    def _log_task(self, task: dict, outcome: str, started: float) -> None:
        """The line that ends a task: id, outcome, how long it ran."""
        logger.info("task %s: %s (ran %.1f s)", task["id"], outcome, time.monotonic() - started)


def _group_alive(group: int) -> bool:
    """Whether a process group has a member left (a zombie not yet reaped counts).

    The group's id is its first member's pid, which the system hands out to no
    new process while the group has members.
    """
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member that changed its user: alive, and not ours to stop
        return True
    return True


def _last_lines(text: str, limit: int = 4000) -> str:
    """The last few lines of some output, at most `limit` characters: a task's progress."""
    lines = text.rstrip().splitlines()[-5:]
    return "\n".join(lines)[-limit:]


def _why_lease_ended(status: int, envelope: dict) -> str:
    """Why a heartbeat was refused, in words: the task was deleted, cancelled, or is someone else's."""
    if status == 404:
        return "the task was deleted"
    if "is cancelled" in _error_message(envelope, status):
        return "the task was cancelled"
    return "the lease was lost"


# ---------------------------------------------------------------------------
# The page at /: one HTML document, its style and script inline, so that it
# works offline and wherever this file is copied. It is only a client of the
# REST API above. Task text is written by agents, so the script puts it in the
# page as text only, and the policy below lets no other script run.
# ---------------------------------------------------------------------------

def _inline_hash(html: str, tag: str) -> str:
    """The CSP source that allows exactly the page's one inline <script> or <style>."""
    body = re.search(f"<{tag}>(.*?)</{tag}>", html, re.DOTALL).group(1)
    return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"


_PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<link rel="icon" href="data:,">
<title>Task orchestrator</title>
<style>
:root {
  color-scheme: light dark;
  --bg: #f7f7f5; --panel: #ffffff; --text: #1d1d1b; --muted: #66665f; --line: #deded8;
  --accent: #2557b8; --danger: #b3261e; --focus: #f0a020;
  --waiting: #8a6d00; --working: #2557b8; --completed: #1e7b34; --failed: #b3261e;
  --cancelled: #66665f;
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #151513; --panel: #1f1f1c; --text: #ecece6; --muted: #a5a59c; --line: #3a3a35;
    --accent: #8fb2ff; --danger: #ff8a80; --focus: #f0b040;
    --waiting: #e6c04a; --working: #8fb2ff; --completed: #7bd08f; --failed: #ff8a80;
    --cancelled: #a5a59c;
  }
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--text);
       font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; }
header, main { max-width: 1400px; margin: 0 auto; padding: 0 16px; }
header { display: flex; flex-wrap: wrap; align-items: baseline; gap: 8px 16px; padding-top: 12px; }
h1 { font-size: 1.25rem; margin: 0; }
h2 { font-size: 1.05rem; margin: 0 0 8px; }
h3 { font-size: 0.95rem; margin: 12px 0 0; }
section { background: var(--panel); border: 1px solid var(--line); border-radius: 8px;
          padding: 12px; margin: 12px 0; }
.muted { color: var(--muted); }
.small { font-size: 0.8rem; }
.spacer { flex: 1; }
button, input, select, textarea { font: inherit; color: inherit; }
button { background: var(--panel); border: 1px solid var(--line); border-radius: 6px;
         padding: 4px 10px; cursor: pointer; }
button:hover { border-color: var(--accent); }
button.danger { color: var(--danger); }
button.link { border: 0; background: none; padding: 0; color: var(--accent); cursor: pointer;
              text-align: left; word-break: break-all; }
input, select, textarea { background: var(--bg); border: 1px solid var(--line);
                          border-radius: 6px; padding: 4px 8px; }
:focus-visible { outline: 3px solid var(--focus); outline-offset: 1px; }
#glance { display: grid; grid-template-columns: repeat(auto-fit, minmax(120px, 1fr)); gap: 8px; }
.stat { display: block; width: 100%; text-align: left; padding: 8px 10px;
        border: 1px solid var(--line); border-radius: 6px; }
.stat b { display: block; font-size: 1.5rem; font-variant-numeric: tabular-nums; }
.table { overflow-x: auto; }
table { width: 100%; border-collapse: collapse; }
th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid var(--line);
         vertical-align: top; }
th { font-weight: 600; color: var(--muted); font-size: 0.85rem; }
td.number, th.number { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr.task { cursor: pointer; }
tbody tr.task:hover, tbody tr.selected { background: color-mix(in srgb, var(--accent) 10%, transparent); }
.prompt { max-width: 60ch; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
td.directory { max-width: 32ch; overflow-wrap: anywhere; }
.nowrap { white-space: nowrap; }
.badge { display: inline-block; padding: 0 8px; border-radius: 999px; font-size: 0.8rem;
         border: 1px solid currentColor; white-space: nowrap; }
.waiting { color: var(--waiting); } .working { color: var(--working); }
.completed { color: var(--completed); } .failed { color: var(--failed); }
.cancelled { color: var(--cancelled); }
.filters { display: flex; flex-wrap: wrap; gap: 8px 16px; align-items: end; margin-bottom: 8px; }
.filters label, form label { display: flex; flex-direction: column; font-size: 0.85rem;
                             color: var(--muted); gap: 2px; }
fieldset { border: 0; padding: 0; margin: 0; display: flex; flex-wrap: wrap; gap: 4px 10px; }
.filters fieldset label { flex-direction: row; align-items: center; gap: 4px;
                          color: var(--text); font-size: inherit; }
legend { font-size: 0.85rem; color: var(--muted); padding: 0; margin-bottom: 2px; }
.pager { display: flex; gap: 8px; align-items: center; margin-top: 8px; }
.actions { display: flex; flex-wrap: wrap; gap: 6px; }
#add { display: grid; grid-template-columns: 2fr 1fr 1fr; gap: 8px; }
#add .wide { grid-column: 1 / -1; }
#add textarea { min-height: 5em; resize: vertical; }
.detail-head { position: sticky; top: -16px; background: var(--panel); padding: 8px 0;
               z-index: 1; }
dialog { background: var(--panel); color: var(--text); border: 1px solid var(--line);
         border-radius: 8px; padding: 16px; width: min(900px, 96vw); max-height: 92vh; }
dialog::backdrop { background: rgb(0 0 0 / 0.4); }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; margin: 8px 0; }
dt { color: var(--muted); }
dd { margin: 0; overflow-wrap: anywhere; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; background: var(--bg);
      border: 1px solid var(--line); border-radius: 6px; padding: 8px; margin: 4px 0 12px;
      max-height: 40vh; overflow: auto; }
.expired { color: var(--danger); font-weight: 600; }
#message { min-height: 1.4em; margin: 4px 0; }
#message.error { color: var(--danger); }
@media (max-width: 720px) {
  /* Narrow screens: each table row becomes a card, each cell a labelled line. */
  table thead { display: none; }
  table, tbody, tr, td { display: block; width: 100%; }
  tbody tr { border-bottom: 1px solid var(--line); padding: 6px 0; }
  td, td.number { border: 0; padding: 2px 0; text-align: left; display: flex; gap: 8px; }
  td[data-label]::before { content: attr(data-label); color: var(--muted); min-width: 7.5em;
                           flex: none; font-size: 0.85rem; }
  .prompt { max-width: none; white-space: normal; }
  #add { grid-template-columns: 1fr; }
  dl { grid-template-columns: 1fr; }
  dt { margin-top: 6px; }
}
</style>
</head>
<body>
<header>
  <h1>Task orchestrator</h1>
  <span class="muted" id="updated">loading…</span>
  <span class="spacer"></span>
  <button type="button" id="pause" aria-pressed="false">Pause refresh</button>
</header>
<main>
  <p id="message" role="status" aria-live="polite"></p>

  <section aria-labelledby="glance-title">
    <h2 id="glance-title">At a glance</h2>
    <div id="glance">
      <!-- a button per status comes first, made by buildStatusControls -->
      <div class="stat"><b id="oldest-waiting">–</b>oldest waiting</div>
      <div class="stat"><b id="busy-workers">–</b>workers busy</div>
    </div>
  </section>

  <section aria-labelledby="directories-title">
    <h2 id="directories-title">Directories</h2>
    <div class="table">
      <table>
        <thead><tr>
          <th scope="col">Directory</th><th scope="col" class="number">Waiting</th>
          <th scope="col" class="number">Working</th><th scope="col" class="number">Failed</th>
          <th scope="col">Oldest waiting</th>
          <th scope="col">Workers</th><th scope="col">Actions</th>
        </tr></thead>
        <tbody id="directories"></tbody>
      </table>
    </div>
  </section>

  <section aria-labelledby="tasks-title">
    <h2 id="tasks-title">Tasks</h2>
    <form class="filters" id="filters">
      <fieldset id="status-filter">
        <legend>Status</legend>
        <!-- a checkbox per status, made by buildStatusControls -->
      </fieldset>
      <label>Directory <input name="work_directory" list="directory-names" placeholder="any"></label>
      <label>Priority
        <select name="priority">
          <option value="">any</option><option>high</option><option>medium</option>
          <option>low</option>
        </select>
      </label>
      <label>Tag <input name="tag" size="10" placeholder="any"></label>
      <label>Search <input name="q" type="search" placeholder="prompt, error, output"></label>
      <button type="reset">Clear filters</button>
    </form>
    <datalist id="directory-names"></datalist>
    <div class="table">
      <table>
        <thead><tr>
          <th scope="col">Status</th><th scope="col">Priority</th>
          <th scope="col">Directory</th><th scope="col">Age</th><th scope="col">Prompt</th>
          <th scope="col">Worker</th>
          <th scope="col" class="number">Retries</th>
        </tr></thead>
        <tbody id="tasks"></tbody>
      </table>
    </div>
    <div class="pager">
      <button type="button" id="newer">Newer</button>
      <button type="button" id="older">Older</button>
      <span class="muted" id="range"></span>
    </div>
  </section>

  <section aria-labelledby="add-title">
    <h2 id="add-title">Add a task</h2>
    <form id="add">
      <label>Directory (absolute) <input name="work_directory" required list="directory-names"></label>
      <label>Priority
        <select name="priority"><option>medium</option><option>high</option><option>low</option></select>
      </label>
      <label>Tags (comma-separated) <input name="tags"></label>
      <label class="wide">Prompt <textarea name="prompt" required></textarea></label>
      <div class="wide"><button type="submit">Add task</button></div>
    </form>
  </section>
</main>

<dialog id="detail" aria-labelledby="detail-title">
  <div class="actions detail-head">
    <h2 id="detail-title">Task</h2>
    <span class="spacer"></span>
    <span class="actions" id="detail-actions"></span>
    <button type="button" id="detail-close" autofocus>Close</button>
  </div>
  <div id="detail-body"></div>
</dialog>

<dialog id="key-dialog" aria-labelledby="key-title">
  <form id="key-form" method="dialog">
    <h2 id="key-title">API key</h2>
    <p id="key-why"></p>
    <label>Key <input name="key" type="password" autocomplete="off" required></label>
    <button type="submit">Use this key</button>
  </form>
</dialog>

<script>
"use strict";
// Every piece of task text is written by agents: it only ever goes into the page as
// text (text nodes made by el), never as HTML.

const REFRESH_MS = 2000;
const PAGE_SIZE = 50;
const STATUSES = ["waiting", "working", "completed", "failed", "cancelled"];
// Which actions a status allows: the API's rules, so that no button is offered in vain.
const CANCELLABLE = ["waiting", "working"];
const RETRYABLE = ["failed", "cancelled"];
const FINISHED = ["completed", "failed", "cancelled"];
const KEY_STORAGE = "orchestrator-api-key";
const KEY_NEEDED = "This server needs its API key (APP_SECURITY_API_KEY). It is kept in " +
                   "this tab only, until the tab closes.";
const KEY_REFUSED = "That key was refused. Enter the server's API key (APP_SECURITY_API_KEY).";

const state = {
  paused: false,
  offset: 0,
  openTaskId: null,
  key: sessionStorage.getItem(KEY_STORAGE),
  keyRequest: null,  // the pending "ask for the key", shared by every refused request
  refreshTimer: null,
  typingTimer: null,
  refreshFailed: false,
};

const byId = (id) => document.getElementById(id);

// -- building the page from data ------------------------------------------------

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props || {})) {
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (value !== null && value !== undefined && value !== false) {
      node.setAttribute(name, value === true ? "" : String(value));
    }
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function duration(seconds) {
  const s = Math.abs(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

function ageText(seconds) {
  return seconds === null ? "—" : duration(Math.round(seconds));
}

function ago(iso) {
  const seconds = Math.round((Date.now() - Date.parse(iso)) / 1000);
  return duration(seconds) + (seconds >= 0 ? " ago" : " from now");
}

function when(iso) {
  if (!iso) return el("span", {class: "muted"}, "—");
  return el("time", {datetime: iso, title: new Date(iso).toLocaleString() + " (" + iso + ")"},
            ago(iso));
}

function badge(status) {
  return el("span", {class: "badge " + status}, status);
}

function say(text, isError) {
  const message = byId("message");
  message.textContent = text;
  message.className = isError ? "error" : "";
}

function buildStatusControls() {
  byId("glance").prepend(...STATUSES.map((status) => el("button", {
    type: "button", class: "stat", "data-status": status, title: `Show ${status} tasks`,
    onclick: () => filterBy({status: [status]}),
  }, el("b", {class: status}, "–"), status)));
  byId("status-filter").append(...STATUSES.map((status) => el("label", {},
    el("input", {type: "checkbox", name: "status", value: status}), " " + status)));
}

// -- talking to the REST API ----------------------------------------------------

async function api(method, path, body) {
  const headers = {"Accept": "application/json"};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (state.key) headers["Authorization"] = "Bearer " + state.key;
  const answer = await fetch(path, {
    method, headers, cache: "no-store", credentials: "omit",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (answer.status === 401) {
    await askForKey(state.key !== null);
    return api(method, path, body);
  }
  let envelope = null;
  try { envelope = await answer.json(); } catch (ignored) { /* not JSON: say the status */ }
  if (!envelope || !envelope.success) {
    const error = envelope && envelope.error;
    throw new Error(error ? `${error.code}: ${error.message}` : `HTTP ${answer.status}`);
  }
  return envelope.data;
}

function askForKey(refused) {
  // One question for every request that was refused meanwhile.
  if (!state.keyRequest) {
    state.keyRequest = new Promise((resolve) => {
      const dialog = byId("key-dialog");
      byId("key-why").textContent = refused ? KEY_REFUSED : KEY_NEEDED;
      dialog.addEventListener("close", () => {
        state.key = byId("key-form").elements.key.value.trim() || null;
        if (state.key) sessionStorage.setItem(KEY_STORAGE, state.key);
        byId("key-form").reset();
        state.keyRequest = null;
        resolve();
      }, {once: true});
      dialog.showModal();
    });
  }
  return state.keyRequest;
}

function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) if (value) search.set(name, value);
  return search.toString();
}

// -- the filters ----------------------------------------------------------------

function filters() {
  const form = byId("filters");
  const statuses = [...form.querySelectorAll("input[name=status]:checked")].map((box) => box.value);
  return {
    status: statuses.join(","),
    work_directory: form.elements.work_directory.value.trim(),
    priority: form.elements.priority.value,
    tag: form.elements.tag.value.trim(),
    q: form.elements.q.value.trim(),
  };
}

function filterBy(changes) {
  const form = byId("filters");
  if ("status" in changes) {
    for (const box of form.querySelectorAll("input[name=status]")) {
      box.checked = changes.status.includes(box.value);
    }
  }
  if ("work_directory" in changes) form.elements.work_directory.value = changes.work_directory;
  state.offset = 0;
  refresh();
  byId("tasks-title").scrollIntoView({block: "start", behavior: "smooth"});
}

// -- rendering: one function per panel ---------------------------------------------
// The page refreshes every 2 s. A panel is rebuilt only when its data has changed, so
// that a button is not replaced under the pointer or the keyboard focus; ages tick on
// in place (tickAges).

const shown = {};

function changed(panel, data) {
  const key = JSON.stringify(data);
  if (shown[panel] === key) return false;
  shown[panel] = key;
  return true;
}

function tickAges() {
  for (const time of document.querySelectorAll("time[datetime]")) {
    time.textContent = ago(time.dateTime);
  }
}

function renderGlance(stats, directories, workers) {
  for (const status of STATUSES) {
    document.querySelector(`.stat[data-status=${status}] b`).textContent = stats[status + "_tasks"];
  }
  const ages = directories.map((d) => d.oldest_waiting_age_seconds).filter((age) => age !== null);
  byId("oldest-waiting").textContent = ages.length ? ageText(Math.max(...ages)) : "—";
  byId("busy-workers").textContent =
    workers.filter((worker) => worker.holding.length > 0).length;
}

function directoryRow(d) {
  return el("tr", {},
    el("td", {}, el("button", {type: "button", class: "link", title: "Show this directory's tasks",
                               onclick: () => filterBy({work_directory: d.work_directory})},
                    d.work_directory)),
    el("td", {class: "number waiting", "data-label": "Waiting"}, d.counts.waiting),
    el("td", {class: "number working", "data-label": "Working"}, d.counts.working),
    el("td", {class: "number failed", "data-label": "Failed"}, d.counts.failed),
    el("td", {class: "age", "data-label": "Oldest waiting"}, ageText(d.oldest_waiting_age_seconds)),
    el("td", {"data-label": "Workers"}, d.workers.join(", ") || "—"),
    el("td", {}, el("span", {class: "actions"},
      d.counts.failed ? el("button", {type: "button", onclick: () => bulk(d, "retry", "failed")},
                           `Retry all failed (${d.counts.failed})`) : null,
      d.counts.waiting ? el("button", {type: "button", class: "danger",
                                       onclick: () => bulk(d, "cancel", "waiting")},
                            `Cancel all waiting (${d.counts.waiting})`) : null)),
  );
}

function renderDirectories(directories) {
  // Ages change every second: they are written in place, and do not count as a change.
  if (!changed("directories", directories.map((d) => ({...d, oldest_waiting_age_seconds: 0})))) {
    byId("directories").querySelectorAll("td.age").forEach((cell, i) => {
      cell.textContent = ageText(directories[i].oldest_waiting_age_seconds);
    });
    return;
  }
  const rows = directories.map(directoryRow);
  if (!rows.length) rows.push(el("tr", {}, el("td", {colspan: 7, class: "muted"}, "No tasks yet.")));
  byId("directories").replaceChildren(...rows);
}

function renderDirectoryNames(directories) {
  if (!changed("directory-names", directories.map((d) => d.work_directory))) return;
  byId("directory-names").replaceChildren(
    ...directories.map((d) => el("option", {value: d.work_directory})));
}

function openOnEnter(event, taskId) {
  if (event.key !== "Enter" && event.key !== " ") return;
  event.preventDefault();
  openTask(taskId);
}

function whyNotClaimable(task) {
  // A waiting task may not be claimable yet: blocked by dependencies, or delayed.
  if (task.status !== "waiting") return null;
  if (task.blocked_by.length) {
    return el("div", {class: "muted small"}, `blocked by ${task.blocked_by.length}`);
  }
  if (task.not_before && Date.parse(task.not_before) > Date.now()) {
    return el("div", {class: "muted small"}, "not before ", when(task.not_before));
  }
  return null;
}

function taskLinks(ids) {
  if (!ids.length) return "—";
  return ids.map((id) => el("button", {type: "button", class: "link", title: "Open this task",
                                       onclick: () => openTask(id)}, id.slice(0, 8)));
}

function taskRow(task) {
  return el("tr", {
    class: "task" + (task.id === state.openTaskId ? " selected" : ""), tabindex: 0,
    "data-task-id": task.id, "aria-label": `${task.status} task: ${task.prompt.slice(0, 60)}`,
    onclick: () => openTask(task.id), onkeydown: (event) => openOnEnter(event, task.id),
  },
    el("td", {}, badge(task.status), whyNotClaimable(task)),
    el("td", {"data-label": "Priority"}, task.priority),
    el("td", {class: "directory", "data-label": "Directory"}, task.work_directory),
    el("td", {class: "nowrap", "data-label": "Age"}, when(task.created_at)),
    el("td", {class: "prompt", title: task.prompt.slice(0, 500)}, task.prompt.slice(0, 120)),
    el("td", {class: "nowrap", "data-label": "Worker"}, task.worker_id || "—"),
    el("td", {class: "number", "data-label": "Retries"}, `${task.retry_count}/${task.max_retries}`),
  );
}

function renderTasks(page) {
  if (!changed("tasks", [page, state.openTaskId])) return;
  const focused = document.activeElement && document.activeElement.dataset.taskId;
  const rows = page.tasks.map(taskRow);
  if (!rows.length) rows.push(el("tr", {}, el("td", {colspan: 7, class: "muted"}, "No task matches.")));
  byId("tasks").replaceChildren(...rows);
  if (focused) {
    const again = byId("tasks").querySelector(`tr[data-task-id="${CSS.escape(focused)}"]`);
    if (again) again.focus();
  }
  const first = page.total ? page.offset + 1 : 0;
  byId("range").textContent = `${first}–${page.offset + page.tasks.length} of ${page.total}`;
  byId("newer").disabled = page.offset === 0;
  byId("older").disabled = !page.has_more;
}

function detailFacts(task, dependents) {
  const expired = task.lease_expires_at && Date.parse(task.lease_expires_at) <= Date.now();
  const facts = [
    ["Status", badge(task.status)],
    ["Priority", task.priority],
    ["Directory", task.work_directory],
    ["Worker", task.worker_id || "—"],
    ["Not before", when(task.not_before)],
    ["Lease expires", expired ? el("span", {class: "expired"}, "expired ", when(task.lease_expires_at))
                              : when(task.lease_expires_at)],
    ["Retries", `${task.retry_count} of ${task.max_retries}`],
    ["Created", when(task.created_at)],
    ["Started", when(task.started_at)],
    ["Finished", when(task.completed_at)],
    ["Updated", when(task.updated_at)],
    ["Tags", task.tags.join(", ") || "—"],
    ["Depends on", taskLinks(task.depends_on)],
    ["Blocked by", taskLinks(task.blocked_by)],
    ["Dependents", taskLinks(dependents.map((dependent) => dependent.id))],
  ];
  return el("dl", {}, facts.map(([name, value]) => [el("dt", {}, name), el("dd", {}, value)]));
}

function detailTexts(task) {
  const texts = [
    ["Progress", task.progress && `${task.progress}\n(${ago(task.progress_at)})`],
    ["Prompt", task.prompt],
    ["Error", task.error_message],
    ["Result output", task.result && task.result.output],
    ["Metadata", Object.keys(task.metadata).length ? JSON.stringify(task.metadata, null, 2) : null],
  ];
  return texts.filter(([, text]) => text).map(([name, text]) => [el("h3", {}, name),
                                                                 el("pre", {}, text)]);
}

function detailActions(task) {
  return [
    CANCELLABLE.includes(task.status) ? el("button", {type: "button", class: "danger",
      onclick: () => act(task, "cancel")}, "Cancel") : null,
    RETRYABLE.includes(task.status) ? el("button", {type: "button",
      onclick: () => act(task, "retry")}, "Retry") : null,
    FINISHED.includes(task.status) ? el("button", {type: "button", class: "danger",
      onclick: () => act(task, "delete")}, "Delete") : null,
  ].filter(Boolean);
}

function renderDetail(task, dependents) {
  if (!changed("detail", [task, dependents])) return;
  byId("detail-title").textContent = "Task " + task.id;
  byId("detail-body").replaceChildren(detailFacts(task, dependents), ...detailTexts(task).flat());
  byId("detail-actions").replaceChildren(...detailActions(task));
}

function renderDetailError(message) {
  delete shown.detail;
  byId("detail-body").replaceChildren(el("p", {}, message));
  byId("detail-actions").replaceChildren();
}

function renderUpdated() {
  const now = new Date();
  byId("updated").textContent = "updated " + now.toLocaleTimeString();
  byId("updated").title = now.toISOString();
}

// -- refreshing -----------------------------------------------------------------

async function refresh() {
  if (state.paused || document.hidden) return;
  const list = {...filters(), limit: PAGE_SIZE, offset: state.offset};
  try {
    const [stats, directories, workers, page] = await Promise.all([
      api("GET", "/api/v1/statistics"),
      api("GET", "/api/v1/directories"),
      api("GET", "/api/v1/workers"),
      api("GET", "/api/v1/tasks?" + query(list)),
    ]);
    renderGlance(stats, directories.directories, workers.workers);
    renderDirectories(directories.directories);
    renderDirectoryNames(directories.directories);
    renderTasks(page);
    if (state.openTaskId) await refreshDetail();
    tickAges();
    renderUpdated();
    if (state.refreshFailed) say("");  // the trouble is over; an action's message stays
    state.refreshFailed = false;
  } catch (error) {
    say(error.message, true);
    state.refreshFailed = true;
  }
}

async function refreshDetail() {
  try {
    const id = state.openTaskId;
    const [task, dependents] = await Promise.all([
      api("GET", `/api/v1/tasks/${id}`),
      api("GET", "/api/v1/tasks?" + query({depends_on: id, limit: 100})),
    ]);
    renderDetail(task, dependents.tasks);
  } catch (error) {
    renderDetailError(error.message);
  }
}

function loop() {
  clearTimeout(state.refreshTimer);
  refresh().finally(() => { state.refreshTimer = setTimeout(loop, REFRESH_MS); });
}

// -- actions (each one a REST call, so every rule of the API applies) -----------------

async function openTask(taskId) {
  state.openTaskId = taskId;
  await refreshDetail();
  const dialog = byId("detail");
  if (!dialog.open) dialog.showModal();
}

async function act(task, action) {
  if (action === "delete" && !confirm(`Delete this ${task.status} task for good?`)) return;
  try {
    if (action === "delete") {
      await api("DELETE", `/api/v1/tasks/${task.id}`);
      byId("detail").close();
    } else {
      await api("POST", `/api/v1/tasks/${task.id}/${action}`, {});
    }
    say(`Task ${task.id.slice(0, 8)}: ${action === "delete" ? "deleted" : action + " done"}.`);
  } catch (error) {
    say(error.message, true);
  }
  refresh();
}

async function bulk(directory, action, status) {
  const count = directory.counts[status];
  if (action === "cancel" &&
      !confirm(`Cancel all ${count} waiting tasks in ${directory.work_directory}?`)) return;
  const body = {action, filter: {work_directory: directory.work_directory, status}};
  try {
    let total = 0, answer;
    do {  // one call changes a bounded number of tasks
      answer = await api("POST", "/api/v1/tasks/bulk", body);
      total += answer.changed;
    } while (answer.more && answer.changed > 0);
    say(`${directory.work_directory}: ${action === "retry" ? "retried" : "cancelled"} ${total}.`);
  } catch (error) {
    say(error.message, true);
  }
  refresh();
}

async function addTask(event) {
  event.preventDefault();
  const form = event.target;
  const tags = form.elements.tags.value.split(",").map((tag) => tag.trim()).filter(Boolean);
  try {
    const task = await api("POST", "/api/v1/tasks", {
      work_directory: form.elements.work_directory.value.trim(),
      prompt: form.elements.prompt.value,
      priority: form.elements.priority.value,
      tags,
    });
    form.elements.prompt.value = "";
    say(`Task ${task.id.slice(0, 8)} added to ${task.work_directory}.`);
  } catch (error) {
    say(error.message, true);
  }
  refresh();
}

function togglePause() {
  state.paused = !state.paused;
  byId("pause").setAttribute("aria-pressed", String(state.paused));
  byId("pause").textContent = state.paused ? "Resume refresh" : "Pause refresh";
  if (!state.paused) loop();
}

function showPage(step) {
  state.offset = Math.max(0, state.offset + step * PAGE_SIZE);
  refresh();
}

function filtersChanged() {
  clearTimeout(state.typingTimer);  // wait for a pause in typing before asking again
  state.typingTimer = setTimeout(() => { state.offset = 0; refresh(); }, 300);
}

function detailClosed() {
  // The row that opened the detail may have been rebuilt meanwhile: focus its successor.
  const row = state.openTaskId &&
    byId("tasks").querySelector(`tr[data-task-id="${CSS.escape(state.openTaskId)}"]`);
  if (row) row.focus();
  state.openTaskId = null;
  delete shown.detail;
  for (const row of document.querySelectorAll("tr.selected")) row.classList.remove("selected");
}

// -- wiring -----------------------------------------------------------------------

buildStatusControls();
byId("filters").addEventListener("input", filtersChanged);
byId("filters").addEventListener("reset", () => setTimeout(filtersChanged, 0));
byId("filters").addEventListener("submit", (event) => event.preventDefault());
byId("add").addEventListener("submit", addTask);
byId("newer").addEventListener("click", () => showPage(-1));
byId("older").addEventListener("click", () => showPage(1));
byId("pause").addEventListener("click", togglePause);
byId("detail-close").addEventListener("click", () => byId("detail").close());
byId("detail").addEventListener("close", detailClosed);
document.addEventListener("visibilitychange", () => { if (!document.hidden) loop(); });
loop();
</script>
</body>
</html>
"""

_PAGE_HEADERS = {
    "Content-Security-Policy": "; ".join((
        "default-src 'none'",
        f"script-src {_inline_hash(_PAGE, 'script')}",
        f"style-src {_inline_hash(_PAGE, 'style')}",
        "connect-src 'self'",
        "img-src data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


if __name__ == "__main__":
    sys.exit(main())
