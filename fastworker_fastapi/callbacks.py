"""Completion callbacks: delivery to app endpoints, webhooks and FastWorker listeners.

```
task final + outbox entry ──► listener ──► job table ──► N delivery loops ──► "/path"  app
(one store write: status      (this         (bounded;     │ one attempt       http(s) webhook
 and delivery "pending")       process's)    full: failed) │ under a deadline  tcp://  nng Pair0
                                                           │
                        retry timer ◄──────────────────────┘ connection error, timeout, 5xx,
                   (exponential backoff)                       408, 429 (other 4xx: final)
```

The outbox is the task's own record in the store: its final status and a pending delivery
(with its delivery id) are written together, and every attempt's outcome is written back.
A process that dies with callbacks outstanding leaves them in the store; whichever process
recovers its tasks (or the next start) delivers them, with the same delivery id.

Delivery is at-least-once: an attempt whose outcome is unknown (timeout, lost connection) is
repeated, always with the same delivery id, so a receiver dedupes on it. A job waiting for
its retry holds no delivery loop, so a slow or failing receiver delays other callbacks by
at most one loop out of `concurrency`. At shutdown (after the scheduler has drained, so the
callbacks of tasks that finished during the drain are included), waiting retries are tried at
once; what is still pending when the shutdown budget is spent stays in the outbox for the next
start with a durable store, and is recorded as failed with the memory store.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import httpx
from fastapi import Depends, FastAPI, HTTPException
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastworker.tasks.models import TaskStatus
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from fastworker_fastapi.errors import (
    CallbackSignatureError,
    ConfigurationError,
    InvalidTaskOptionsError,
)
from fastworker_fastapi.records import CallbackDelivery, utcnow

if TYPE_CHECKING:
    from anyio.abc import TaskGroup
    from starlette.applications import Starlette

    from fastworker_fastapi.events import EventHub
    from fastworker_fastapi.records import TaskRecord
    from fastworker_fastapi.stores.base import TaskStore

__all__ = [
    "ATTEMPT_HEADER",
    "CALLBACK_CLIENT",
    "CALLBACK_SCOPE_KEY",
    "DELIVERY_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "CallbackDispatcher",
    "CallbackSettings",
    "ReplayGuard",
    "TaskCallback",
    "VerifiedCallback",
    "sign_callback",
    "verified_callback",
    "verify_callback_signature",
]

logger = logging.getLogger("fastworker_fastapi")

DELIVERY_HEADER = "X-FastWorker-Delivery"
"""The delivery id: the same on every attempt of one callback; dedupe on it."""
TIMESTAMP_HEADER = "X-FastWorker-Timestamp"
"""Unix time (seconds) of the attempt; part of the signed content, so old messages go stale."""
ATTEMPT_HEADER = "X-FastWorker-Attempt"
"""1 for the first attempt, 2 for the first retry, ...; signed, so a retry is a new message."""
SIGNATURE_HEADER = "X-FastWorker-Signature"
"""`v2=<hex HMAC-SHA256(key, lines "v2", timestamp, delivery id, attempt, target; body)>`."""
CALLBACK_SCOPE_KEY = "fastworker.callback"
"""`request.scope["extensions"]` key present only on in-process callback requests."""
CALLBACK_CLIENT = ("fastworker.callback", 0)
"""The client address of in-process callback requests: not loopback, not any IP."""

_MAX_ADDRESS_LENGTH = 2048
_USER_AGENT = "fastworker-fastapi callbacks"

F = TypeVar("F", bound=Callable[..., Any])


# -- settings -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class CallbackSettings:
    """How completion callbacks are delivered: `FastWorker(app, callbacks=CallbackSettings(...))`.

    - `secret`: key of the HMAC-SHA256 signature of webhooks. Required for http(s) webhooks
      (receivers must be able to tell our messages from forged ones). App-path callbacks never
      use it: they are signed with a random key that never leaves the process.
    - `app_paths`: app paths that may receive callbacks besides the routes declared as
      receivers (`fw.callback_route(...)`, routes with a `VerifiedCallback` parameter); any
      other app path is refused at submission.
    - `allowed_hosts`: hosts that http(s) and tcp:// callbacks may go to (exact names or IPs,
      or `*.example.com` for subdomains). Empty: none. A callback address may come from user
      input; this keeps it from reaching internal hosts.
    - `loopback_listeners`: also allow `tcp://` callbacks to this host (`127.0.0.1`, `::1`,
      `localhost`), where FastWorker's callback listeners usually run (as in all of
      FastWorker's own examples). Only nng Pair0 listeners can take such a message. Off by
      default: turn it on only when callback addresses never come from untrusted input.
    - `max_attempts`: attempts per callback, the first included.
    - `retry_delay`, `retry_backoff`, `retry_backoff_max`: wait `retry_delay * retry_backoff **
      (n - 1)` seconds (at most `retry_backoff_max`) after the n-th failed attempt.
    - `timeout`: seconds one attempt may take (connect, send, answer).
    - `concurrency`: delivery loops, i.e. attempts in flight at once.
    - `max_queue`: callbacks outstanding at once (queued, in flight or waiting for a retry);
      beyond it a callback is recorded as failed, never silently dropped.
    - `signature_tolerance`: how old (or how far in the future) a signed timestamp may be
      before `callback_route` / `VerifiedCallback` reject the message as stale.
    - `app_base_url`: scheme and host of in-process requests to app paths (what
      `request.url` shows; make it a host your `TrustedHostMiddleware` accepts). By default a
      reserved name (`.invalid`) that no real client can send as the app's own authority.
    - `shutdown_timeout`: seconds callback delivery may take at shutdown, after the tasks
      have drained; what is still undelivered then is kept (durable store) or recorded failed.
    """

    secret: str | bytes | None = None
    allowed_hosts: Collection[str] = ()
    max_attempts: int = 5
    retry_delay: float = 1.0
    retry_backoff: float = 2.0
    retry_backoff_max: float = 60.0
    timeout: float = 10.0
    concurrency: int = 8
    max_queue: int = 10_000
    signature_tolerance: float = 300.0
    app_base_url: str = "http://fastworker.invalid"
    loopback_listeners: bool = False
    app_paths: Collection[str] = ()
    shutdown_timeout: float = 5.0
    _hosts: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.allowed_hosts, str):
            raise ConfigurationError(
                "allowed_hosts must be a collection of host names, not one string: "
                f"use allowed_hosts=({self.allowed_hosts!r},)"
            )
        _check(self.max_attempts >= 1, f"max_attempts must be >= 1, got {self.max_attempts!r}")
        _check(_finite(self.retry_delay, 0), f"retry_delay must be >= 0, got {self.retry_delay!r}")
        _check(
            _finite(self.retry_backoff, 1),
            f"retry_backoff must be >= 1, got {self.retry_backoff!r}",
        )
        _check(
            _finite(self.retry_backoff_max, 0),
            f"retry_backoff_max must be >= 0, got {self.retry_backoff_max!r}",
        )
        _check(
            _finite(self.timeout, 0) and self.timeout > 0,
            f"timeout must be > 0 seconds, got {self.timeout!r}",
        )
        _check(self.concurrency >= 1, f"concurrency must be >= 1, got {self.concurrency!r}")
        _check(self.max_queue >= 1, f"max_queue must be >= 1, got {self.max_queue!r}")
        _check(
            _finite(self.signature_tolerance, 0),
            f"signature_tolerance must be >= 0, got {self.signature_tolerance!r}",
        )
        _check(
            _finite(self.shutdown_timeout, 0),
            f"shutdown_timeout must be >= 0, got {self.shutdown_timeout!r}",
        )
        if isinstance(self.app_paths, str):
            raise ConfigurationError(
                f"app_paths must be a collection of paths, not one string: use "
                f"app_paths=({self.app_paths!r},)"
            )
        _check(
            all(isinstance(p, str) and p.startswith("/") and "?" not in p for p in self.app_paths),
            f"app_paths must be paths like '/hooks/done' (no query), got {self.app_paths!r}",
        )
        object.__setattr__(self, "app_paths", frozenset(self.app_paths))
        _check(
            self.secret is None or len(self.secret) > 0,
            "secret must not be empty; use None for no webhooks",
        )
        base = urlsplit(self.app_base_url)
        _check(
            base.scheme in ("http", "https") and bool(base.hostname) and base.path in ("", "/"),
            f"app_base_url must look like 'http://localhost', got {self.app_base_url!r}",
        )
        hosts = frozenset(h.strip().lower().rstrip(".") for h in self.allowed_hosts)
        _check(all(hosts), "allowed_hosts must not contain empty names")
        object.__setattr__(self, "allowed_hosts", tuple(self.allowed_hosts))  # hashable
        object.__setattr__(self, "_hosts", hosts)

    def retry_delay_for(self, attempts: int) -> float:
        """Seconds to wait after `attempts` failed attempts."""
        return float(
            min(self.retry_delay * self.retry_backoff ** (attempts - 1), self.retry_backoff_max)
        )

    def host_allowed(self, host: str) -> bool:
        """True if `host` is on the allow-list (exactly, or under a `*.domain` entry)."""
        host = host.lower().rstrip(".")
        if host in self._hosts:
            return True
        return any(
            entry.startswith("*.") and host.endswith(entry[1:]) and host != entry[2:]
            for entry in self._hosts
        )


_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


def _finite(value: float, minimum: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value >= minimum


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigurationError(message)


# -- the payload ------------------------------------------------------------------------------


class TaskCallback(BaseModel):
    """FastWorker's completion message: declare it as the body of a receiving route."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "task_id": "0b8e5d1c-3f57-4c2b-9c53-6f0d2f7d2a11",
                "status": "success",
                "result": {"report_id": 7},
                "error": None,
                "started_at": "2026-11-27T18:00:00.001Z",
                "completed_at": "2026-11-27T18:00:00.120Z",
                "callback_data": {"user_id": 42},
            }
        }
    )

    task_id: str
    status: TaskStatus = Field(description="success, failure or cancelled.")
    result: Any = Field(default=None, description="The return value of a successful task.")
    error: str | None = Field(
        default=None, description="'ErrorType: message'; a timeout says TaskTimeout."
    )
    started_at: datetime | None = None
    completed_at: datetime | None = None
    callback_data: dict[str, Any] | None = Field(
        default=None, description="What the submitter passed as callback_data."
    )

    @classmethod
    def from_record(cls, record: TaskRecord) -> TaskCallback:
        assert record.callback is not None
        return cls(
            task_id=record.id,
            status=record.status,
            result=record.result,
            error=record.error,
            started_at=record.started_at,
            completed_at=record.completed_at,
            callback_data=record.callback.data,
        )


# -- signatures -------------------------------------------------------------------------------


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def _mac(
    key: bytes, timestamp: int, delivery_id: str, attempt: int, target: str, body: bytes
) -> str:
    # Newlines separate the fields: none of them can hold one (headers and callback addresses
    # never do), so two different messages never sign the same bytes.
    signed = f"v2\n{timestamp}\n{delivery_id}\n{attempt}\n{target}\n".encode() + body
    return hmac.new(key, signed, hashlib.sha256).hexdigest()


class ReplayGuard:
    """The signed messages a receiver accepted, kept until they go stale; bounded.

    `verify_callback_signature` records each accepted message (its delivery id and attempt)
    here and refuses the same message again while its timestamp is within the tolerance (after
    that it is refused as stale anyway). At most `max_entries` are kept: beyond that the oldest
    is forgotten, so size it above the callbacks you receive per tolerance window.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ConfigurationError(f"max_entries must be >= 1, got {max_entries!r}")
        self.max_entries = max_entries
        self._seen: OrderedDict[str, float] = OrderedDict()  # key -> when it goes stale
        self._lock = threading.Lock()  # sync endpoints verify from worker threads

    def __len__(self) -> int:
        return len(self._seen)

    def accept(self, key: str, *, stale_at: float, now: float) -> bool:
        """Record `key`; False if it was already recorded and is not stale yet."""
        with self._lock:
            seen = self._seen
            while seen:
                oldest, expiry = next(iter(seen.items()))
                if expiry > now:
                    break
                del seen[oldest]
            previous = seen.get(key)
            if previous is not None and previous > now:
                return False
            seen[key] = stale_at
            seen.move_to_end(key)
            if len(seen) > self.max_entries:
                seen.popitem(last=False)
            return True


_default_guard = ReplayGuard()


def sign_callback(
    secret: str | bytes,
    body: bytes,
    *,
    delivery_id: str,
    target: str,
    attempt: int = 1,
    timestamp: int | None = None,
) -> dict[str, str]:
    """The signature headers for `body` sent to `target` (the callback address: an app path
    or a webhook URL); what the sender adds, useful to test receivers."""
    ts = int(time.time()) if timestamp is None else int(timestamp)
    return {
        DELIVERY_HEADER: delivery_id,
        TIMESTAMP_HEADER: str(ts),
        ATTEMPT_HEADER: str(attempt),
        SIGNATURE_HEADER: f"v2={_mac(_key(secret), ts, delivery_id, attempt, target, body)}",
    }


def verify_callback_signature(
    secret: str | bytes,
    body: bytes,
    headers: Mapping[str, str],
    *,
    target: str,
    tolerance: float = 300.0,
    now: float | None = None,
    replay_guard: ReplayGuard | None = None,
) -> str:
    """Check a received callback and return its delivery id; `CallbackSignatureError` if not.

    Give the raw body (before JSON parsing), the request headers and `target`: the callback
    address this receiver was registered under (its URL exactly as given to
    `delay_with_callback`). The signature covers the timestamp, the delivery id, the attempt,
    the target and the body, so none can be changed and a message sent to one receiver is
    refused by another; a timestamp more than `tolerance` seconds from now is refused as
    stale, and a message already accepted (same delivery id and attempt) as a replay.
    Accepted messages are remembered in `replay_guard` (by default one per process).
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    values = []
    for name in (DELIVERY_HEADER, TIMESTAMP_HEADER, ATTEMPT_HEADER, SIGNATURE_HEADER):
        value = lowered.get(name.lower())
        if not value:
            raise CallbackSignatureError(f"missing {name} header: not a signed callback")
        values.append(value)
    delivery_id, raw_ts, raw_attempt, signature = values
    try:
        timestamp, attempt = int(raw_ts), int(raw_attempt)
    except ValueError:
        raise CallbackSignatureError(
            f"{TIMESTAMP_HEADER} and {ATTEMPT_HEADER} must be integers, got {raw_ts!r} and "
            f"{raw_attempt!r}"
        ) from None
    expected = _mac(_key(secret), timestamp, delivery_id, attempt, target, body)
    offered = [p.strip()[3:] for p in signature.split(",") if p.strip().startswith("v2=")]
    if not any(hmac.compare_digest(expected, candidate) for candidate in offered):
        raise CallbackSignatureError(
            f"callback signature does not match: wrong secret, sent to another target than "
            f"{target!r}, or the body or headers were changed"
        )
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise CallbackSignatureError(
            f"stale callback: signed {current - timestamp:.0f}s from now, beyond the "
            f"{tolerance:g}s tolerance (a replay, or clocks out of sync)"
        )
    guard = _default_guard if replay_guard is None else replay_guard
    if not guard.accept(f"{delivery_id}\n{attempt}", stale_at=timestamp + tolerance, now=current):
        raise CallbackSignatureError(
            f"replayed callback: delivery {delivery_id!r} (attempt {attempt}) was already accepted"
        )
    return delivery_id


# -- the receiving side ------------------------------------------------------------------------


def _dispatcher_of(request: Request) -> CallbackDispatcher:
    extension = getattr(request.app.state, "fastworker", None)
    dispatcher = getattr(extension, "callbacks", None)
    if not isinstance(dispatcher, CallbackDispatcher):
        raise ConfigurationError(
            "VerifiedCallback needs a FastWorker extension attached to this app "
            "(FastWorker(app) or fw.init_app(app))"
        )
    return dispatcher


def _request_target(request: Request) -> str:
    """The target a request was sent to, as the in-process sender signs it."""
    query = request.scope.get("query_string", b"")
    path: str = request.scope["path"]
    return f"{path}?{query.decode('latin-1')}" if query else path


async def verified_callback(request: Request) -> TaskCallback:
    """Dependency: the request's `TaskCallback`, after checking its signature (401 if bad)."""
    dispatcher = _dispatcher_of(request)
    body = await request.body()
    dispatcher.verify_request(body, request)
    try:
        return TaskCallback.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False), body=body) from None


VerifiedCallback = Annotated[TaskCallback, Depends(verified_callback)]
"""`callback: VerifiedCallback` in a route: a signed, validated completion message."""


# -- delivery ----------------------------------------------------------------------------------

Kind = Literal["app", "webhook", "tcp"]


class _AttemptError(Exception):
    """One attempt failed; `final` when repeating it cannot help (a 4xx answer)."""

    def __init__(self, message: str, *, final: bool = False) -> None:
        super().__init__(message)
        self.final = final


@dataclass(slots=True, eq=False)
class _Job:
    id: str
    record: TaskRecord  # the latest record the store returned
    kind: Kind
    address: str
    body: bytes
    wake: anyio.Event | None = None

    @property
    def delivery(self) -> CallbackDelivery:
        assert self.record.delivery is not None
        return self.record.delivery


class CallbackDispatcher:
    """Delivers the callbacks of one extension; started and stopped by `FastWorker.run()`."""

    def __init__(self, settings: CallbackSettings) -> None:
        self.settings = settings
        # Webhooks are signed with the configured secret, which their receivers hold. App-path
        # callbacks are posted by this process to its own app, so they are signed with a key
        # that never leaves it: holding the webhook secret is no help in forging them.
        self._webhook_key = _key(settings.secret) if settings.secret is not None else None
        self._app_key = secrets.token_bytes(32)
        self._guard = ReplayGuard()
        self._started = False
        self._app: Starlette | None = None
        self._receivers: tuple[int, list[re.Pattern[str]]] = (-1, [])

    # -- submission -------------------------------------------------------------------------

    def validate_address(self, address: str) -> None:
        """Refuse (422) an address that cannot or must not receive callbacks."""
        self._classify(address)

    def _classify(self, address: str) -> Kind:
        if len(address) > _MAX_ADDRESS_LENGTH:
            raise InvalidTaskOptionsError(
                f"callback address is longer than {_MAX_ADDRESS_LENGTH} characters"
            )
        if any(c.isspace() or not c.isprintable() for c in address):
            raise InvalidTaskOptionsError(
                f"callback address {address!r} contains whitespace or control characters"
            )
        if address.startswith("/"):
            parts = urlsplit(address)
            if address.startswith("//") or "\\" in address or parts.scheme or parts.netloc:
                raise InvalidTaskOptionsError(
                    f"callback address {address!r} is not an app path like '/hooks/done'"
                )
            if self._app is None:
                raise InvalidTaskOptionsError(
                    f"app-path callback {address!r} needs the extension attached to an app "
                    "(FastWorker(app) or fw.init_app(app))"
                )
            path = _app_url(address).path  # what the app will see: dot segments resolved
            if path not in self.settings.app_paths and not self._is_receiver(path):
                raise InvalidTaskOptionsError(
                    f"app-path callback {address!r} does not go to a callback receiver: declare "
                    "the route with fw.callback_route(...) or a `callback: VerifiedCallback` "
                    "parameter, or list the path in CallbackSettings(app_paths=...)"
                )
            return "app"
        try:
            parts = urlsplit(address)
            port = parts.port
        except ValueError:
            raise InvalidTaskOptionsError(f"callback address {address!r} is malformed") from None
        scheme, host = parts.scheme.lower(), parts.hostname
        if scheme not in ("http", "https", "tcp"):
            raise InvalidTaskOptionsError(
                f"callback address {address!r} is not supported: use an app path "
                "('/hooks/done'), an http(s) URL or a FastWorker listener ('tcp://host:port')"
            )
        if not host or parts.username is not None or parts.password is not None:
            raise InvalidTaskOptionsError(
                f"callback address {address!r} needs a host and must not carry credentials"
            )
        loopback_ok = scheme == "tcp" and self.settings.loopback_listeners
        if not (loopback_ok and host.lower() in _LOOPBACK) and not self.settings.host_allowed(host):
            hint = ""
            if scheme == "tcp" and host.lower() in _LOOPBACK:
                hint = (
                    " (or, when callback addresses never come from untrusted input, "
                    "CallbackSettings(loopback_listeners=True))"
                )
            raise InvalidTaskOptionsError(
                f"callback host {host!r} is not allowed: add it to "
                f"CallbackSettings(allowed_hosts=...) if it is meant to receive callbacks{hint}"
            )
        if scheme == "tcp":
            if port is None or parts.path not in ("", "/") or parts.query or parts.fragment:
                raise InvalidTaskOptionsError(
                    f"tcp callback address {address!r} must look like 'tcp://host:port'"
                )
            return "tcp"
        if self.settings.secret is None:
            raise InvalidTaskOptionsError(
                "webhook callbacks need CallbackSettings(secret=...) so that receivers can "
                "verify them"
            )
        return "webhook"

    # -- receiving ---------------------------------------------------------------------------

    def _is_receiver(self, path: str) -> bool:
        """True if a POST route declared as a callback receiver matches `path`."""
        app = self._app
        assert app is not None
        routes = app.router.routes
        count, patterns = self._receivers
        if count != len(routes):  # routes were added: look again
            patterns = [
                route.path_regex
                for route in routes
                if isinstance(route, APIRoute)
                and "POST" in (route.methods or ())
                and _declares_receiver(route.dependant)
            ]
            self._receivers = (len(routes), patterns)
        return any(pattern.match(path) for pattern in patterns)

    def sign(
        self, body: bytes, *, delivery_id: str, target: str, timestamp: int | None = None
    ) -> dict[str, str]:
        """The headers of an app-path callback to `target`, signed with this start's app key:
        what the in-process sender adds; use it to test receiving routes."""
        return sign_callback(
            self._app_key, body, delivery_id=delivery_id, target=target, timestamp=timestamp
        )

    def verify(self, body: bytes, headers: Mapping[str, str], *, target: str) -> str:
        """Check an app-path callback sent to `target` (the path and query the request was
        sent to) with this extension's app key, tolerance and replay guard."""
        return verify_callback_signature(
            self._app_key,
            body,
            headers,
            target=target,
            tolerance=self.settings.signature_tolerance,
            replay_guard=self._guard,
        )

    def verify_request(self, body: bytes, request: Request) -> str:
        """`verify` for `request`, answering 401 (whatever exception handlers the app has)."""
        try:
            return self.verify(body, request.headers, target=_request_target(request))
        except CallbackSignatureError as exc:
            raise HTTPException(status_code=401, detail=str(exc)) from None

    def route(self, app: Starlette | None, path: str, **options: Any) -> Callable[[F], F]:
        """Decorator adding a POST route at `path` that only runs for signed callbacks."""
        if not isinstance(app, FastAPI):
            raise ConfigurationError(
                "callback_route needs the extension attached to a FastAPI app "
                "(FastWorker(app) or fw.init_app(app)); elsewhere declare "
                "`callback: VerifiedCallback` in a route, or call fw.callbacks.verify(body, "
                "headers) in a plain Starlette endpoint"
            )

        async def verify(request: Request) -> None:
            self.verify_request(await request.body(), request)

        verify._fastworker_receiver = True  # type: ignore[attr-defined]

        dependencies = [Depends(verify), *options.pop("dependencies", ())]

        def decorator(func: F) -> F:
            app.post(path, dependencies=dependencies, **options)(func)
            return func

        return decorator

    # -- lifecycle ---------------------------------------------------------------------------

    def start(
        self, task_group: TaskGroup, store: TaskStore, hub: EventHub, app: Starlette | None
    ) -> None:
        """Start the delivery loops in `task_group` and listen for finished tasks."""
        settings = self.settings
        self._store = store
        self._app = app
        self._jobs: dict[str, _Job] = {}
        self._waiting: set[_Job] = set()
        self._send, self._receive = anyio.create_memory_object_stream[_Job](settings.max_queue)
        self._closing = False
        self._deadline = math.inf
        self._drained = anyio.Event()
        self._stopped = anyio.Event()
        self._scope = anyio.CancelScope()
        headers = {"user-agent": _USER_AGENT}
        # Made at the first webhook (in a thread): its TLS context costs tens of
        # milliseconds, which every start would pay, and most apps send no webhooks.
        self._webhooks: httpx.AsyncClient | None = None
        self._webhooks_lock = anyio.Lock()
        self._sockets: set[Any] = set()  # tcp:// sends in flight, closed when time is up
        self._app_key = secrets.token_bytes(32)  # a new one each start
        self._in_app: httpx.AsyncClient | None = None
        if app is not None:
            self._in_app = httpx.AsyncClient(
                transport=httpx.ASGITransport(
                    app=_MarkCallbacks(app), raise_app_exceptions=False, client=CALLBACK_CLIENT
                ),
                base_url=settings.app_base_url,
                headers=headers,
            )
        self._remove_listener = hub.add_listener(
            self._on_change, final_only=True, with_callback=True
        )
        task_group.start_soon(self._main)
        self._started = True

    async def aclose(self) -> None:
        """Deliver what is pending within `settings.shutdown_timeout`, then keep the rest in
        the outbox (durable store) or record it failed; called after the tasks have drained."""
        if not self._started:
            return
        self._started = False
        self._closing = True
        deadline = anyio.current_time() + self.settings.shutdown_timeout
        self._deadline = deadline
        for job in tuple(self._waiting):  # last chance: retry now rather than after a backoff
            assert job.wake is not None
            job.wake.set()
        if not self._jobs:
            self._drained.set()
        with anyio.CancelScope(deadline=deadline):
            await self._drained.wait()
        self._remove_listener()
        for sock in tuple(self._sockets):  # an unreachable listener does not hold shutdown
            sock.close()
        self._scope.cancel()
        await self._stopped.wait()
        with anyio.CancelScope(shield=True):
            for job in tuple(self._jobs.values()):
                if self._store.durable:  # stays in the outbox for the next start
                    await self._write(job, owner=None)
                    continue
                await self._fail(
                    job,
                    f"still pending at shutdown when CallbackSettings.shutdown_timeout "
                    f"({self.settings.shutdown_timeout:g}s) ran out "
                    f"(after {job.delivery.attempts} attempts)",
                )
        self._send.close()
        self._receive.close()
        if self._webhooks is not None:
            await self._webhooks.aclose()
            self._webhooks = None
        if self._in_app is not None:
            await self._in_app.aclose()

    async def _main(self) -> None:
        try:
            with self._scope:
                async with anyio.create_task_group() as task_group:
                    self._task_group = task_group
                    for _ in range(self.settings.concurrency):
                        task_group.start_soon(self._loop)
        finally:
            self._stopped.set()

    # -- the pipeline -------------------------------------------------------------------------

    def _on_change(self, record: TaskRecord) -> None:
        """Hub listener: a finished task of ours whose callback is still in the outbox."""
        delivery = record.delivery
        if (
            delivery is None
            or not delivery.open
            or record.owner != self._store.owner
            or delivery.delivery_id is None
            or delivery.delivery_id in self._jobs
            or not self._started
        ):
            return
        assert record.callback is not None
        delivery_id = delivery.delivery_id
        if len(self._jobs) >= self.settings.max_queue:
            self._task_group.start_soon(
                self._fail_unqueued,
                record,
                f"callback queue full: {len(self._jobs)} callbacks outstanding "
                f"(CallbackSettings.max_queue={self.settings.max_queue})",
            )
            return
        address = record.callback.address
        try:
            kind = self._classify(address)
            body = TaskCallback.from_record(record).model_dump_json().encode()
        except Exception as exc:  # validated at submission; still, never leave it pending
            self._task_group.start_soon(
                self._fail_unqueued, record, f"cannot send to {address!r}: {exc}"
            )
            return
        job = _Job(delivery_id, record, kind, address, body)
        self._jobs[delivery_id] = job
        self._send.send_nowait(job)  # never blocks: buffer size == max_queue >= len(jobs)

    async def _fail_unqueued(self, record: TaskRecord, error: str) -> None:
        logger.warning("callback of task %s not sent: %s", record.id, error)
        assert record.delivery is not None
        await self._store.update(
            record.id,
            record.owner,
            record.attempts,
            delivery=replace(record.delivery, state="failed", last_error=error),
        )

    async def _write(self, job: _Job, **changes: Any) -> None:
        """Write this job's task record (delivery state, owner); one writer per job."""
        record = job.record
        updated = await self._store.update(record.id, record.owner, record.attempts, **changes)
        if updated is not None:
            job.record = updated

    async def _set(self, job: _Job, **delivery_changes: Any) -> None:
        await self._write(job, delivery=replace(job.delivery, **delivery_changes))

    async def _loop(self) -> None:
        async for job in self._receive:
            await self._attempt(job)

    async def _attempt(self, job: _Job) -> None:
        timeout = min(self.settings.timeout, self._deadline - anyio.current_time())
        if timeout <= 0:  # pragma: no cover - a loop racing the shutdown deadline
            return  # no time left for an attempt: aclose settles it
        await self._set(job, attempts=job.delivery.attempts + 1, state="delivering")
        try:
            if job.kind == "tcp":
                await self._send_tcp(job, timeout)
            else:
                with anyio.fail_after(timeout):
                    await self._post(job, timeout)
        except _AttemptError as exc:
            await self._failed_attempt(job, str(exc), final=exc.final)
        except TimeoutError:
            await self._failed_attempt(job, f"timed out after {timeout:g}s")
        except httpx.TransportError as exc:
            await self._failed_attempt(job, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a broken receiver must not stop a delivery loop
            logger.exception("callback attempt for task %s failed", job.record.id)
            await self._failed_attempt(job, f"{type(exc).__name__}: {exc}")
        else:
            await self._set(job, state="delivered", delivered_at=utcnow(), last_error=None)
            self._finish(job)

    async def _webhook_client(self) -> httpx.AsyncClient:
        async with self._webhooks_lock:  # concurrent first deliveries make one client
            if self._webhooks is None:
                settings = self.settings
                self._webhooks = await anyio.to_thread.run_sync(
                    functools.partial(
                        httpx.AsyncClient,
                        timeout=settings.timeout,
                        follow_redirects=False,
                        limits=httpx.Limits(max_connections=settings.concurrency),
                        headers={"user-agent": _USER_AGENT},
                    )
                )
            return self._webhooks

    async def _post(self, job: _Job, timeout: float) -> None:
        key: bytes | None = self._webhook_key
        target = job.address
        if job.kind == "app":
            client, key = self._in_app, self._app_key
            target = _app_target(_app_url(job.address))
        else:
            client = self._webhooks or await self._webhook_client()
        assert client is not None and key is not None
        headers = sign_callback(
            key, job.body, delivery_id=job.id, target=target, attempt=job.delivery.attempts
        )
        headers["content-type"] = "application/json"
        request = client.build_request(
            "POST", job.address, content=job.body, headers=headers, timeout=timeout
        )
        response = await client.send(request, stream=True)
        try:
            status = response.status_code
            if 200 <= status < 300:
                return
            detail = f"HTTP {status} from {job.address}"
            snippet = await _read_some(response, 200)
            if snippet:
                detail = f"{detail}: {snippet}"
            retryable = status in (408, 429) or status >= 500
            raise _AttemptError(detail, final=not retryable)
        finally:
            await response.aclose()

    async def _send_tcp(self, job: _Job, timeout: float) -> None:
        import pynng  # here: apps without tcp:// callbacks never load nng

        with pynng.Pair0() as sock:
            self._sockets.add(sock)  # aclose closes it when the shutdown budget is spent
            # A non-blocking dial: a blocking one would stall the event loop on a slow host;
            # without a peer, the send waits (nng keeps dialing) until the timeout.
            sock.dial(job.address, block=False)
            # pynng turns an anyio cancellation into a bare CancelledError that escapes anyio's
            # scopes, so the send runs shielded, bounded by asyncio's own timeout (which pynng
            # handles); `timeout` is already clipped to the shutdown deadline.
            try:
                with anyio.CancelScope(shield=True):
                    async with asyncio.timeout(timeout):
                        await sock.asend(job.body)
            except pynng.Closed:
                raise _AttemptError("not sent: shutdown_timeout for callbacks ran out") from None
            finally:
                self._sockets.discard(sock)

    async def _failed_attempt(self, job: _Job, error: str, *, final: bool = False) -> None:
        delivery = job.delivery
        if final:
            await self._fail(job, f"{error} (not retried)")
            return
        if delivery.attempts >= self.settings.max_attempts:
            await self._fail(job, f"{error} (gave up after {delivery.attempts} attempts)")
            return
        delay = self.settings.retry_delay_for(delivery.attempts)
        if self._closing and anyio.current_time() + delay >= self._deadline:
            if self._store.durable:  # the next start tries again
                await self._set(job, state="retrying", last_error=error)
                await self._write(job, owner=None)
                self._finish(job)
                return
            await self._fail(job, f"{error} (no time left for another attempt before shutdown)")
            return
        await self._set(job, state="retrying", last_error=error)
        job.wake = anyio.Event()
        self._waiting.add(job)  # now, so that a shutdown starting before it sleeps wakes it
        self._task_group.start_soon(self._retry_later, job, delay)

    async def _retry_later(self, job: _Job, delay: float) -> None:
        assert job.wake is not None
        try:
            with anyio.move_on_after(delay):
                await job.wake.wait()
        finally:
            self._waiting.discard(job)
        self._send.send_nowait(job)

    async def _fail(self, job: _Job, error: str) -> None:
        await self._set(job, state="failed", last_error=error)
        logger.warning("callback of task %s to %s failed: %s", job.record.id, job.address, error)
        self._finish(job)

    def _finish(self, job: _Job) -> None:
        self._jobs.pop(job.id, None)
        if self._closing and not self._jobs:
            self._drained.set()


def _app_url(address: str) -> httpx.URL:
    """The URL an app path is requested at (as httpx sends it: dot segments resolved)."""
    return httpx.URL("http://app" + address)


def _app_target(url: httpx.URL) -> str:
    """What an app-path callback's signature covers: the path and query the app sees."""
    query = url.query.decode("ascii")
    return f"{url.path}?{query}" if query else url.path


def _declares_receiver(dependant: Dependant) -> bool:
    """True if a route's dependencies include the callback check (`VerifiedCallback`, or
    the one `callback_route` adds)."""
    for dependency in dependant.dependencies:
        call = dependency.call
        if call is verified_callback or getattr(call, "_fastworker_receiver", False):
            return True
        if _declares_receiver(dependency):
            return True
    return False


class _MarkCallbacks:
    """Wraps the app for in-process callback requests: adds the `fastworker.callback` scope
    extension (which no outside client can set) with the delivery id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers", ()))
        mark = {"delivery_id": headers.get(DELIVERY_HEADER.lower().encode(), b"").decode("latin-1")}
        extensions = {**(scope.get("extensions") or {}), CALLBACK_SCOPE_KEY: mark}
        await self.app({**scope, "extensions": extensions}, receive, send)


async def _read_some(response: httpx.Response, limit: int) -> str:
    """At most `limit` characters of an error answer: enough to say why, never the whole."""
    data = b""
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) >= limit:
            break
    text = data[:limit].decode("utf-8", "replace").strip()
    try:  # FastAPI answers {"detail": ...}: show just that
        detail = json.loads(text).get("detail")
    except (ValueError, AttributeError):
        return text
    return str(detail) if detail is not None else text
