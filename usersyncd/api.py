"""`ExternalUserApi`: one request to the batch endpoint and its outcome, nothing about retries.

The retry, pause and dead-letter decisions belong to the worker; this module only says what
happened (SPEC §2's table), and never lets the API key out (G9).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import email.utils
import enum
import json
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import httpx
from loguru import logger

import usersyncd.config
import usersyncd.log
import usersyncd.records

BODY_EXCERPT = 2048  # characters of a failed response kept for the failures table
LOG_EXCERPT = 200  # characters of the cause on a log line
MAX_BODY = 1024 * 1024  # bytes read from a response; the rest is dropped unread
EPOCH_THRESHOLD = 1e9  # X-RateLimit-Reset above this is a Unix time, below it a delay
EPOCH_MS_THRESHOLD = 1e12  # above this, a Unix time in milliseconds
REDACTED = usersyncd.log.REDACTED
_RESPONSE_ID_HEADERS = ("x-request-id", "x-amzn-requestid", "request-id")


class OutcomeKind(enum.StrEnum):
    OK = "ok"
    TRANSIENT = "transient"
    REJECTED = "rejected"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"  # 404: the account id or the path is wrong, not the records (SPEC §2)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one request did; every text field is already free of the key."""

    kind: OutcomeKind
    status: int | None  # None: timeout or connection error
    duration_ms: float
    request_id: str  # the X-Request-Id we sent
    response_request_id: str | None
    error: str | None  # one line: "HTTP 503", "read timeout after 30.0 s", ...
    body_excerpt: str | None  # first BODY_EXCERPT characters of a non-2xx body
    retry_after: float | None  # seconds to wait, for 429 and 5xx when the API said
    rate_limit_remaining: int | None
    rejected_indices: tuple[int, ...] = ()  # for REJECTED; () means the whole batch
    rate_limit_limit: int | None = None  # X-RateLimit-Limit: which limit Remaining counts down (SPEC §2)

    def ledger_fields(self) -> dict[str, object]:
        """What the request ledger keeps of it (`Quota.record(slot, **outcome.ledger_fields())`)."""
        return {
            "status": self.status,
            "outcome": self.kind.value,
            "duration_ms": self.duration_ms,
            "request_id": self.request_id,
            "response_request_id": self.response_request_id,
            "error": self.error,
            "rate_limit_remaining": self.rate_limit_remaining,
            "rate_limit_limit": self.rate_limit_limit,
        }


def classify(
    status: int | None, headers: Mapping[str, str], body: bytes, *, now: float | None = None
) -> tuple[OutcomeKind, float | None, int | None, tuple[int, ...]]:
    """(kind, retry_after, rate_limit_remaining, rejected_indices) of a response (SPEC §2)."""
    lowered = {name.lower(): value for name, value in headers.items()}
    kind = _kind(status)
    retry_after = None
    if status is not None and (status == 429 or 500 <= status <= 599):
        retry_after = _retry_after(lowered, time.time() if now is None else now)
    remaining = _non_negative_int(lowered.get("x-ratelimit-remaining"))
    indices = _rejected_indices(body) if kind is OutcomeKind.REJECTED else ()
    return kind, retry_after, remaining, indices


class ExternalUserApi:
    """The subscriber batch endpoint, through one pooled httpx client."""

    def __init__(
        self,
        config: usersyncd.config.ApiConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        key = config.require_key()
        headers = {
            "User-Agent": config.agent,
            "Content-Type": "application/json",
        }
        auth: httpx.Auth | None = None
        if config.auth == "bearer":
            headers["Authorization"] = f"Bearer {key}"
        elif config.auth == "basic":
            auth = httpx.BasicAuth(key, "")  # Drip's scheme: the key as user name
        else:
            headers[config.auth.removeprefix("header:")] = key
        self._config = config
        # the key in every form an API may echo it (as sent in a basic Authorization header,
        # JSON-escaped PHP-style, percent-encoded): what it says goes to the log and `failures`
        self._redact = usersyncd.log.Redactor([key])
        self._client = httpx.AsyncClient(
            base_url=config.url,
            timeout=config.timeout,
            # certificates are always checked over https; a plain-http URL (the fake, a local
            # proxy) never uses TLS, and building the context costs ~40 ms of CPU at each start
            verify=httpx.URL(config.url).scheme == "https",
            headers=headers,
            auth=auth,
            transport=transport,
        )

    async def send(
        self,
        subscribers: Sequence[Mapping[str, Any]],
        *,
        batch_id: int | None = None,
        attempt: int | None = None,
        action: str = "subscribe",
        deadline: float | None = None,
    ) -> Outcome:
        """POST one batch (`action` "unsubscribe": to api.unsubscribe_path, G12); HTTP and
        transport failures come back as an Outcome, never raise. `deadline` (the event loop's
        time; default: api.timeout from now) ends the whole exchange: the quota's ledger relies
        on it (`Slot.deadline`)."""
        path = self._config.resolve(
            self._config.unsubscribe_path if action == "unsubscribe" else self._config.batch_path
        )
        request_id = uuid.uuid4().hex
        body = {"batches": [{"subscribers": list(subscribers)}]}
        started = time.perf_counter()
        try:
            # one deadline for the whole exchange: httpx's timeout is per read, and a slow
            # trickle of bytes would otherwise hold a worker (and shutdown) indefinitely
            if deadline is None:
                deadline = asyncio.get_running_loop().time() + self._config.timeout
            async with asyncio.timeout_at(deadline):
                content, response = await self._post(path, body, request_id)
        except (httpx.RequestError, TimeoutError) as exc:  # timeouts, refused connections
            outcome = Outcome(
                kind=OutcomeKind.TRANSIENT,
                status=None,
                duration_ms=_elapsed_ms(started),
                request_id=request_id,
                response_request_id=None,
                error=self._redact(self._describe(exc)),
                body_excerpt=None,
                retry_after=None,
                rate_limit_remaining=None,
            )
        else:
            outcome = self._outcome(response, content, request_id, started, len(subscribers))
        self._log(outcome, path=path, batch_id=batch_id, attempt=attempt, users=len(subscribers))
        return outcome

    async def _post(self, path: str, body: Any, request_id: str) -> tuple[bytes, httpx.Response]:
        headers = {"X-Request-Id": request_id}
        # the bytes httpx's json= writes, by orjson (JSON encoding was a tenth of the daemon's CPU)
        content = usersyncd.records.compact_json(body)
        async with self._client.stream("POST", path, content=content, headers=headers) as response:
            return await _read_capped(response), response

    async def probe(self) -> Probe:
        """GET `api.probe_path` (outside the batch quota): do the key, the account and the URL work?"""
        path = self._config.resolve(self._config.probe_path)
        if not self._config.probe_path:
            raise ValueError("api.probe_path is not set")
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._config.timeout):
                async with self._client.stream(
                    "GET", path, headers={"X-Request-Id": uuid.uuid4().hex}
                ) as response:
                    content = await _read_capped(response)
        except (httpx.RequestError, TimeoutError) as exc:
            why = self._redact(self._describe(exc))
            return Probe(path, None, _elapsed_ms(started), f"no answer ({why}): check api.url", None)
        return Probe(
            path,
            response.status_code,
            _elapsed_ms(started),
            probe_meaning(response.status_code),
            None if response.is_success else self._excerpt(content),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        config = self._config
        return f"ExternalUserApi(url={config.url!r}, batch_path={config.batch_path!r}, auth={config.auth!r})"

    def _outcome(
        self, response: httpx.Response, content: bytes, request_id: str, started: float, users: int
    ) -> Outcome:
        status = response.status_code
        kind, retry_after, remaining, indices = classify(status, response.headers, content)
        ok = kind is OutcomeKind.OK
        return Outcome(
            kind=kind,
            status=status,
            duration_ms=_elapsed_ms(started),
            request_id=request_id,
            response_request_id=self._response_request_id(response.headers),
            error=None if ok else f"HTTP {status}",
            body_excerpt=None if ok else self._excerpt(content),
            retry_after=retry_after,
            rate_limit_remaining=remaining,
            # an index beyond the batch is not about this batch
            rejected_indices=tuple(index for index in indices if index < users),
            rate_limit_limit=_non_negative_int(response.headers.get("x-ratelimit-limit")),
        )

    def _describe(self, exc: httpx.RequestError | TimeoutError) -> str:
        timeout = self._config.timeout
        if isinstance(exc, TimeoutError):
            return f"timeout after {timeout} s (whole request)"
        if isinstance(exc, httpx.ConnectTimeout):
            return f"connect timeout after {timeout} s"
        if isinstance(exc, httpx.WriteTimeout):
            return f"write timeout after {timeout} s"
        if isinstance(exc, httpx.PoolTimeout):
            return f"pool timeout after {timeout} s"
        if isinstance(exc, httpx.TimeoutException):
            return f"timeout after {timeout} s"
        cause = _one_line(str(exc)) or type(exc).__name__
        if isinstance(exc, httpx.ConnectError):
            return f"connection error: {cause}"
        return f"{type(exc).__name__}: {cause}"

    def _response_request_id(self, headers: httpx.Headers) -> str | None:
        for name in _RESPONSE_ID_HEADERS:
            if name in headers:
                return self._redact(_one_line(headers[name]))[:LOG_EXCERPT]
        return None

    def _excerpt(self, content: bytes) -> str | None:
        # NUL cannot be stored in a PostgreSQL text column
        text = self._redact(content.decode("utf-8", errors="replace")).replace("\x00", "\ufffd")
        return text[:BODY_EXCERPT] or None

    def _log(
        self, outcome: Outcome, *, path: str, batch_id: int | None, attempt: int | None, users: int
    ) -> None:
        fields: dict[str, Any] = {
            "method": "POST",
            "path": path,
            "status": outcome.status,
            "duration_ms": round(outcome.duration_ms, 1),
            "request_id": outcome.request_id,
            "response_request_id": outcome.response_request_id,
            "batch_id": batch_id,
            "attempt": attempt,
            "users": users,
            "outcome": outcome.kind.value,
        }
        if outcome.kind is not OutcomeKind.OK:
            fields["error"] = (outcome.error or "")[:LOG_EXCERPT]
            if outcome.body_excerpt:
                fields["error_excerpt"] = _one_line(outcome.body_excerpt)[:LOG_EXCERPT]
        level = "INFO" if outcome.kind is OutcomeKind.OK else "WARNING"
        logger.bind(**fields).log(level, "api request")


@dataclasses.dataclass(frozen=True)
class Probe:
    """What a GET of the probe path said."""

    path: str
    status: int | None  # None: no answer (timeout, connection refused, TLS)
    duration_ms: float
    meaning: str  # one line an operator can act on
    body_excerpt: str | None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status <= 299


def probe_meaning(status: int) -> str:
    """What an answer to the probe means for the configuration."""
    if 200 <= status <= 299:
        return "the key and the account work"
    if status in (401, 403):
        return f"HTTP {status}: the API refused the key (api.key / api.key_file)"
    if status == 404:
        return "HTTP 404: the account is unknown or the path is wrong (api.account_id, api.probe_path)"
    if status == 429:
        return "HTTP 429: rate-limited on the probe endpoint; try again later"
    if 500 <= status <= 599:
        return f"HTTP {status}: the API is failing; try again later"
    return f"HTTP {status}: unexpected answer (api.url, api.probe_path)"


def _kind(status: int | None) -> OutcomeKind:
    if status is None:
        return OutcomeKind.TRANSIENT
    if 200 <= status <= 299:
        return OutcomeKind.OK
    if status == 429:
        return OutcomeKind.RATE_LIMITED
    if status in (401, 403):
        return OutcomeKind.UNAUTHORIZED
    if status == 413:
        return OutcomeKind.TOO_LARGE
    if status == 404:
        return OutcomeKind.NOT_FOUND
    if status == 408:  # the server gave up waiting for us: the batch itself is fine
        return OutcomeKind.TRANSIENT
    if 400 <= status <= 499:
        return OutcomeKind.REJECTED
    return OutcomeKind.TRANSIENT  # 5xx, and 1xx/3xx that a batch POST should never get


def _retry_after(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds from Retry-After (delay or HTTP date), else from X-RateLimit-Reset."""
    value = headers.get("retry-after", "").strip()
    if value:
        delay = _non_negative_float(value)
        if delay is not None:
            return delay
        try:
            moment = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            moment = None
        if moment is not None:
            if moment.tzinfo is None:  # "-0000": the RFC's GMT all the same
                moment = moment.replace(tzinfo=datetime.UTC)
            return max(0.0, moment.timestamp() - now)
    reset = _non_negative_float(headers.get("x-ratelimit-reset", "").strip())
    if reset is None:
        return None
    if reset > EPOCH_MS_THRESHOLD:
        return max(0.0, reset / 1000 - now)
    if reset > EPOCH_THRESHOLD:
        return max(0.0, reset - now)
    return reset


def _rejected_indices(body: bytes) -> tuple[int, ...]:
    """Indices named by {"errors": [{"index": i}, ...]}; anything else names none."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ()
    errors = document.get("errors") if isinstance(document, dict) else None
    if not isinstance(errors, list):
        return ()
    indices = {
        error["index"]
        for error in errors
        if isinstance(error, dict)
        and type(error.get("index")) is int  # not bool, not float
        and error["index"] >= 0
    }
    return tuple(sorted(indices))


def _non_negative_float(value: str | None) -> float | None:
    try:
        number = float(value) if value else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) and number >= 0 else None


def _non_negative_int(value: str | None) -> int | None:
    try:
        number = int(value.strip()) if value else None
    except ValueError:
        return None
    return number if number is not None and number >= 0 else None


async def _read_capped(response: httpx.Response) -> bytes:
    """The body, up to MAX_BODY bytes: a runaway error page must not fill memory."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size >= MAX_BODY:
            break
    return b"".join(chunks)[:MAX_BODY]


def _elapsed_ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def _one_line(text: str) -> str:
    return " ".join(text.split())
