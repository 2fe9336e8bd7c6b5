"""What each answer of the API does to a batch: one handler per `OutcomeKind` (SPEC §2's table).

A handler gets the job (`SyncUserBatch`) and the `Answer`; it records, dead-letters, splits,
pauses (raising `SendAgain`: the same users go again, no attempt spent) or spends an attempt
(raising `TransientDeliveryError`: tenacity decides whether another comes).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from usersyncd import api
from usersyncd.errors import TransientDeliveryError
from usersyncd.former import Member, State
from usersyncd.quota import Slot

if TYPE_CHECKING:
    from usersyncd.worker import SyncUserBatch

MAX_PAUSE = 24 * 3600.0  # seconds; a Retry-After beyond this is taken as this
# answers that show the API took the key: it judged the records (SPEC §2's "unacceptable" rows)
CREDENTIALS_PROVEN = (400, 409, 413, 422)


class SendAgain(Exception):
    """Sending was paused (429, 401/403): the same users go again, no attempt spent."""


class OutcomeError(Exception):
    """The answer behind a TransientDeliveryError (its __cause__): Retry-After, the last error."""

    def __init__(self, outcome: api.Outcome) -> None:
        super().__init__(outcome.error)
        self.outcome = outcome


@dataclass(frozen=True)
class Answer:
    """One request's answer and what it was about."""

    state: State
    slot: Slot
    members: list[Member]
    outcome: api.Outcome
    attempt_no: int
    log: Any  # the loguru logger bound to the batch, attempt and request


Handler = Callable[["SyncUserBatch", Answer], Awaitable[None]]


async def on_ok(job: SyncUserBatch, answer: Answer) -> None:
    """Accepted: remember what was sent; the batch is done once none of its users is left."""
    batch, members = answer.state.batch, answer.members
    assert batch is not None
    job.metrics.users_synced.inc(len(members))  # accepted: counted before the bookkeeping
    await job.record_sent(batch, members)
    sent = {m.user_id for m in members}
    batch.user_ids = [u for u in batch.user_ids if u not in sent]
    if not batch.user_ids:
        await job.queue.finish(batch, "done", http_status=answer.outcome.status)
    answer.log.bind(outcome="ok", status=answer.outcome.status).info("batch delivered")


async def on_rate_limited(job: SyncUserBatch, answer: Answer) -> None:
    """429: every replica pauses until Retry-After (or a window); the batch keeps its attempts."""
    retry_after = answer.outcome.retry_after
    wait = min(job.config.limits.window if retry_after is None else retry_after, MAX_PAUSE)
    await job.quota.pause("rate_limited", wait, f"HTTP 429; retry in {wait:.1f} s")  # logs WARNING
    raise SendAgain()


async def on_unauthorized(job: SyncUserBatch, answer: Answer) -> None:
    """401/403: every replica pauses until a probe proves the key; nothing is dead-lettered."""
    await job.quota.pause(  # logs CRITICAL
        "credentials", job.config.retry.backoff, f"HTTP {answer.outcome.status}: API credentials refused"
    )
    raise SendAgain()


async def on_too_large(job: SyncUserBatch, answer: Answer) -> None:
    """413: the halves go apart; a single record still too large is dead-lettered."""
    batch, members = answer.state.batch, answer.members
    assert batch is not None
    if len(members) == 1:
        await job.dead_letter(batch, "too_large", members, answer.outcome, answer.attempt_no)
        return
    half = len(members) // 2
    answer.log.bind(outcome="too_large").warning("batch too large; splitting into halves")
    for part in (members[:half], members[half:]):
        await job.send_part(answer.state, part, answer.attempt_no)


async def on_rejected(job: SyncUserBatch, answer: Answer) -> None:
    """400/409/422: the records the API names are dead-lettered and the rest sent; a batch
    refused whole is dead-lettered whole."""
    batch, members, outcome = answer.state.batch, answer.members, answer.outcome
    assert batch is not None
    named = [members[i] for i in outcome.rejected_indices if i < len(members)]
    if named and len(named) < len(members):
        await job.dead_letter(batch, "rejected", named, outcome, answer.attempt_no)
        rest = [m for m in members if m not in named]
        await job.send_part(answer.state, rest, answer.attempt_no)
        return
    await job.dead_letter(batch, "rejected", members, outcome, answer.attempt_no)


async def on_transient(job: SyncUserBatch, answer: Answer) -> None:
    """5xx, timeout: the attempt is spent (persisted, so a restart continues the count)."""
    batch, outcome = answer.state.batch, answer.outcome
    assert batch is not None
    await job.queue.spend_attempt(
        batch,
        next_in=retry_delay(job.config.retry.backoff, outcome.retry_after),
        status=outcome.status,
        error=(outcome.error or "")[:500],
    )
    raise TransientDeliveryError(outcome.error or f"HTTP {outcome.status}") from OutcomeError(outcome)


HANDLERS: dict[api.OutcomeKind, Handler] = {
    api.OutcomeKind.OK: on_ok,
    api.OutcomeKind.RATE_LIMITED: on_rate_limited,
    api.OutcomeKind.UNAUTHORIZED: on_unauthorized,
    api.OutcomeKind.TOO_LARGE: on_too_large,
    api.OutcomeKind.REJECTED: on_rejected,
    api.OutcomeKind.TRANSIENT: on_transient,
}


def proves_credentials(outcome: api.Outcome) -> bool:
    """Did the API accept the key? A 2xx, or a 4xx that judged the records (SPEC §2). A 5xx,
    a timeout, 404 (configuration) or 429 says nothing about the key."""
    if outcome.kind is api.OutcomeKind.OK:
        return True
    return outcome.status in CREDENTIALS_PROVEN


def error_text(outcome: api.Outcome) -> str:
    """What a failure records of an answer: its one-line error and the body's excerpt."""
    error = outcome.error or f"HTTP {outcome.status}"
    return f"{error}: {outcome.body_excerpt}" if outcome.body_excerpt else error


def retry_delay(backoff: float, retry_after: float | None) -> float:
    """Seconds before the next attempt: the backoff, or the API's Retry-After when longer."""
    if retry_after is None:
        return backoff
    return max(backoff, min(retry_after, MAX_PAUSE))
