"""What each answer of the API does to a batch: one handler per `OutcomeKind` (SPEC §2's table).

A handler gets the job (`SyncUserBatch`) and the `Answer`; it records, dead-letters, splits,
pauses (raising `SendAgain`: the same users go again, no attempt spent) or spends an attempt
(raising `TransientDeliveryError`: tenacity decides whether another comes).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
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


class Unwind(SendAgain):
    """Sending was paused for the configuration: the whole batch goes again, from the top (a
    half being isolated does not retry alone)."""


@dataclass
class Isolation:
    """The search for the culprits of one batch refused whole (SPEC §2): single records refused
    alone are held back until a part of the batch is accepted (then they are the culprits) or
    `retry.config_errors` of them in a row meet one and the same error with nothing accepted
    (then the configuration is wrong: sending pauses and nobody is dead-lettered)."""

    accepted: set[str] = field(default_factory=set)  # user ids of parts the API accepted
    pending: list[tuple[Member, api.Outcome, int]] = field(default_factory=list)
    streak_key: tuple[int | None, str | None] | None = None
    streak: int = 0
    requests: int = 0  # isolation requests sent (the search's cost)


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
    isolation = job.isolation
    if isolation is not None:  # a part accepted: the records refused alone are the culprits
        isolation.accepted.update(m.user_id for m in members)
        await _dead_letter_pending(job, answer.state, isolation)
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


async def on_not_found(job: SyncUserBatch, answer: Answer) -> None:
    """404: the account id or the path is wrong, not the records: every replica pauses until a
    probe works; nothing is dead-lettered, the whole batch goes again."""
    await job.quota.pause(  # logs CRITICAL once
        "configuration",
        job.config.retry.backoff,
        "HTTP 404: the account is unknown or the path is wrong (api.account_id, api.batch_path)",
    )
    raise Unwind()


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
    refused whole, naming no record, is split in halves until the culprits are alone."""
    batch, members, outcome = answer.state.batch, answer.members, answer.outcome
    assert batch is not None
    named = [members[i] for i in outcome.rejected_indices if i < len(members)]
    if named and len(named) < len(members):
        await job.dead_letter(batch, "rejected", named, outcome, answer.attempt_no)
        rest = [m for m in members if m not in named]
        await job.send_part(answer.state, rest, answer.attempt_no)
        return
    if named:  # every record named
        await job.dead_letter(batch, "rejected", members, outcome, answer.attempt_no)
        return
    if len(members) == 1:
        await _refused_alone(job, answer.state, members[0], outcome, answer.attempt_no)
        return
    if job.isolation is not None:  # a half refused within a search: search on in it
        await _isolate(job, answer.state, members, outcome, answer.attempt_no)
        return
    isolation = job.isolation = Isolation()
    answer.log.bind(outcome="rejected", status=outcome.status).warning(
        "batch refused whole, naming no record: isolating the culprits by halves"
    )
    try:
        await _isolate(job, answer.state, members, outcome, answer.attempt_no)
        # nothing accepted, too few refusals alike to blame the configuration: the records
        await _dead_letter_pending(job, answer.state, isolation)
    finally:
        job.isolation = None
    answer.log.bind(isolate_requests=isolation.requests).info("culprits isolated")


async def _isolate(
    job: SyncUserBatch, state: State, members: list[Member], outcome: api.Outcome, attempt_no: int
) -> None:
    """`members` were refused together: send the first half; if the API takes it, the second
    half holds a culprit and is split at once (a request saved), else it is sent too. A record
    is only ever dead-lettered on its own refusal, never inferred (a refusal may not recur)."""
    isolation = job.isolation
    assert isolation is not None
    half = len(members) // 2
    first, second = members[:half], members[half:]
    isolation.requests += 1
    await job.send_part(state, first, attempt_no, kind="isolate")
    if len(second) == 1 or not all(m.user_id in isolation.accepted for m in first):
        isolation.requests += 1
        await job.send_part(state, second, attempt_no, kind="isolate")
    else:
        await _isolate(job, state, second, outcome, attempt_no)


async def _refused_alone(
    job: SyncUserBatch, state: State, member: Member, outcome: api.Outcome, attempt_no: int
) -> None:
    """One record refused by itself: a culprit once a part of its batch was accepted; held back
    while none was; `retry.config_errors` alike in a row with none accepted: the configuration."""
    batch = state.batch
    assert batch is not None
    isolation = job.isolation
    if isolation is None:  # a batch of one: nothing to compare it with
        await job.dead_letter(batch, "rejected", [member], outcome, attempt_no)
        return
    key = (outcome.status, outcome.body_excerpt)
    isolation.streak = isolation.streak + 1 if key == isolation.streak_key else 1
    isolation.streak_key = key
    isolation.pending.append((member, outcome, attempt_no))
    if isolation.accepted:
        await _dead_letter_pending(job, state, isolation)
    elif isolation.streak >= job.config.retry.config_errors:
        isolation.pending.clear()  # back to the queue with the batch: nobody is dead-lettered
        excerpt = " ".join((outcome.body_excerpt or "").split())[:200]
        await job.quota.pause(  # logs CRITICAL once
            "configuration",
            job.config.retry.backoff,
            f"HTTP {outcome.status} for {isolation.streak} single records in a row, nothing accepted:"
            f" the configuration, not the records ({excerpt})",
        )
        raise Unwind()


async def _dead_letter_pending(job: SyncUserBatch, state: State, isolation: Isolation) -> None:
    batch = state.batch
    assert batch is not None
    pending, isolation.pending = isolation.pending, []
    for member, outcome, attempt_no in pending:
        await job.dead_letter(batch, "rejected", [member], outcome, attempt_no)


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
    api.OutcomeKind.NOT_FOUND: on_not_found,
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
