"""Prometheus metrics (SPEC §8): counters fed by the worker, gauges from a snapshot of the
database (the one `usersyncd status` shows), read at most every few seconds however many scrape."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401 - re-exported for http.py
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from usersyncd.api import OutcomeKind
from usersyncd.status import Status

OUTCOMES = tuple(kind.value for kind in OutcomeKind)
DEAD_LETTER_KINDS = ("invalid", "rejected", "exhausted", "too_large", "error")
READY_TIMEOUT = 2.0  # seconds for the readiness check's database round trip
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # seconds


class Metrics:
    """One registry per daemon (no global state: tests can run several)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("usersyncd_requests", "Batch requests by outcome.", ["outcome"], registry=r)
        self.users_synced = Counter("usersyncd_users_synced", "Users the API accepted.", registry=r)
        self.unsubscribed = Counter(
            "usersyncd_users_unsubscribed", "Users whose unsubscribe the API accepted (G12).", registry=r
        )
        self.gone = Gauge(
            "usersyncd_gone_users",
            "Users the API holds subscribed whose row is deleted or filtered out (G12).",
            registry=r,
        )
        self.dead_lettered = Counter(
            "usersyncd_users_dead_lettered", "Users put in failures.", ["kind"], registry=r
        )
        self.retries = Counter(
            "usersyncd_retries", "Batch attempts that failed and will be retried.", registry=r
        )
        self.request_duration = Histogram(
            "usersyncd_request_duration_seconds",
            "Duration of batch requests.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.quota_used = Gauge("usersyncd_quota_used", "Requests started in the current window.", registry=r)
        self.quota_limit = Gauge("usersyncd_quota_limit", "Requests allowed per window.", registry=r)
        self.quota_next_slot = Gauge(
            "usersyncd_quota_next_slot_seconds", "Seconds until a slot frees.", registry=r
        )
        self.quota_waits = Gauge(
            "usersyncd_quota_waits", "Slot requests that had to wait (this process).", registry=r
        )
        self.backlog = Gauge(
            "usersyncd_backlog_users", "Users waiting to be sent, by lane.", ["lane"], registry=r
        )
        self.drain_eta = Gauge(
            "usersyncd_drain_eta_seconds", "Seconds to send the whole backlog at full quota.", registry=r
        )
        self.queued_batches = Gauge(
            "usersyncd_queued_batches", "Open batches (in flight or awaiting retry).", registry=r
        )
        self.open_failures = Gauge(
            "usersyncd_open_failures", "Open entries in the failures table.", registry=r
        )
        self.paused = Gauge(
            "usersyncd_paused", "1 while sending is paused, by reason.", ["reason"], registry=r
        )
        self.up = Gauge("usersyncd_database_up", "1 when the last database read worked.", registry=r)
        # every known label value exists from the start at 0, so rates and alerts see a series
        # before the first event of its kind (a missing series is not a zero in PromQL)
        for outcome in OUTCOMES:
            self.requests.labels(outcome=outcome)
        for kind in DEAD_LETTER_KINDS:
            self.dead_lettered.labels(kind=kind)
        self.snapshot_age = Gauge(
            "usersyncd_snapshot_age_seconds", "Age of the database snapshot behind the gauges.", registry=r
        )

    def observe_request(self, outcome: str, duration_ms: float) -> None:
        self.requests.labels(outcome=outcome).inc()
        self.request_duration.observe(duration_ms / 1000.0)

    def update(self, status: Status, *, quota_waits: int = 0) -> None:
        self.quota_used.set(status.quota_used)
        self.quota_limit.set(status.quota_limit)
        self.quota_next_slot.set(status.next_slot_in)
        self.quota_waits.set(quota_waits)
        self.backlog.labels(lane="live").set(status.live_ready)
        self.backlog.labels(lane="backfill").set(status.backfill_ready)
        self.backlog.labels(lane="in_batches").set(status.in_batches)
        self.drain_eta.set(status.drain_eta)
        self.queued_batches.set(status.open_batches)
        self.open_failures.set(status.open_failures)
        self.gone.set(status.gone)
        for reason in ("rate_limited", "credentials", "configuration"):
            self.paused.labels(reason=reason).set(1 if status.paused == reason else 0)
        self.up.set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class SnapshotCache:
    """The latest `read()`, reused for `max_age` seconds; one read at a time, shared by every
    caller, and never cancelled by a caller that stops waiting (the next one gets its result)."""

    def __init__(self, read: Callable[[], Awaitable[Status]], *, max_age: float) -> None:
        self._read = read
        self.max_age = max_age
        self.value: Status | None = None
        self.taken_at: float | None = None  # loop time of the last read that worked
        self.failed: BaseException | None = None  # the last read's error, None when it worked
        self.reads = 0  # reads started (for tests and curious operators)
        self._tried_at = float("-inf")
        self._task: asyncio.Task[None] | None = None

    async def get(self, timeout: float) -> Status | None:
        """The snapshot, refreshed first if older than `max_age` and a read ends within `timeout`;
        else the last one (None before any read worked)."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._tried_at >= self.max_age and (self._task is None or self._task.done()):
            self._tried_at = loop.time()
            self.reads += 1
            self._task = asyncio.create_task(self._refresh(), name="metrics snapshot")
        if self._task is not None and not self._task.done():
            await asyncio.wait({self._task}, timeout=timeout)  # wait() never cancels it
        return self.value

    def age(self) -> float | None:
        if self.taken_at is None:
            return None
        return asyncio.get_running_loop().time() - self.taken_at

    async def _refresh(self) -> None:
        try:
            self.value = await self._read()
        except Exception as exc:  # the database is down: the gauges keep their last values
            self.failed = exc
        else:
            self.failed = None
            self.taken_at = asyncio.get_running_loop().time()
