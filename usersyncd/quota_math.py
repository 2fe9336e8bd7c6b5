"""The quota's arithmetic (SPEC G1, G2, §2), pure functions: no database, no clock.

Times are seconds on any one epoch; `span` is `window + margin`. `quota.py` feeds them the
ledger as the database sees it and acts on the answers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def grant_delay(starts: Sequence[float], now: float, limit: int, span: float) -> float:
    """Seconds from `now` until one more request may start; 0.0 if it may start now.

    `starts` are earlier start times (seconds, any epoch). A start holds its slot while
    `start + span > now`; older ones are ignored. With `limit` slots held, the answer is when
    enough of the oldest leave the span: `starts[-limit] + span - now`, always > 0, and a
    request at exactly `now + delay` is granted (no wait longer than needed, G2).
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    held = sorted(start for start in starts if start + span > now)
    if len(held) < limit:
        return 0.0
    frees_at = held[len(held) - limit] + span
    delay = frees_at - now
    # Rounding may leave now + delay a hair short of frees_at: step up until it is not.
    step = math.ulp(max(abs(now), abs(frees_at), delay))
    while now + delay < frees_at:
        delay += step
        step *= 2
    return delay


def pace_delay(grants: Sequence[float], now: float, limit: int, span: float) -> float:
    """Seconds from `now` until a paced request may start: one slot (`span / limit`) after the
    latest grant. Backfill is paced so that it never spends a window's quota in a burst and
    leaves a live change waiting for the window to turn (G11); at the same rate, it uses the
    whole quota (G2)."""
    if not grants:
        return 0.0
    return max(0.0, max(grants) + span / limit - now)


def pace_place(last: float | None, limit: int, span: float) -> float:
    """Where a paced grant made now stands in the pace, relative to now (<= 0): one slot after the
    previous one, so that a grant a little late (a sleep, a transaction) does not push every later
    one back; after a pause of more than a quarter slot, the pace starts again from about now."""
    slot = span / limit
    if last is None:
        return 0.0
    return min(0.0, max(last + slot, -slot / 4))


def others_seen(limit: int, remaining: int | None, api_limit: int | None, ours: int) -> int | None:
    """Requests of other clients on the account that the API counted when one of ours arrived.

    From its `X-RateLimit-Remaining` (`remaining`, counting that request): the API's count is
    `limit - remaining`, and `ours` of them were our own starts (that one included). None when
    there is nothing to believe: no header, or an `X-RateLimit-Limit` (`api_limit`) other than
    `limits.requests` says it describes another bucket (SPEC §2).
    """
    if remaining is None or (api_limit is not None and api_limit != limit):
        return None
    return min(max(limit - max(remaining, 0) - max(ours, 0), 0), limit)


def learnt_others(
    seen: Iterable[tuple[float, int]], now: float, limit: int, span: float
) -> tuple[int, float | None]:
    """How many requests per span to leave to other clients on the account, and in how many
    seconds that figure may drop with time alone (None: not until a response says so).

    `seen` holds (when, others) of responses (`others_seen`). Each figure counts one more than
    seen (none stays none): a client steady at any rate holds k or k + 1 requests in a window,
    depending on where its requests fall, and an answer may have seen the k. The figure is the
    highest of the last span, and the latest one always counts: a budget learnt is kept until a
    response shows more room (SPEC §2), and more room counts once no higher figure came for a
    whole span. At most `limit - 1`: one request per span still goes, and its answer tells when
    the room comes back.
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    observed = sorted(seen)
    if not observed:
        return 0, None
    cap = limit - 1

    def held(others: int) -> int:
        return min(others + 1, cap) if others > 0 else 0

    latest = held(observed[-1][1])
    recent = [(when, held(others)) for when, others in observed if when + span > now]
    figure = max([latest, *(others for _, others in recent)])
    if figure == latest:
        return figure, None  # the latest holds it: no drop with time
    last_high = max(when for when, others in recent if others == figure)
    return figure, max(last_high + span - now, 0.0)


def budget(limit: int, others: int) -> int:
    """Our own starts allowed per span when other clients use `others` of the account's `limit`."""
    return max(limit - max(others, 0), 1)


def isolate_budget(limit: int, share: float) -> int:
    """Isolation requests allowed per span: `share` of our budget, at least one (SPEC §2: a batch
    refused whole is searched for its culprits within `limits.isolate_share` of the quota)."""
    if not 0 < share <= 1:
        raise ValueError("share must be in (0, 1]")
    return max(1, math.floor(limit * share + 1e-9))


def isolate_delay(starts: Sequence[float], now: float, limit: int, share: float, span: float) -> float:
    """Seconds from `now` until one more isolation request may start, given the isolation
    requests' `starts`: the search waits while the rest of the backlog keeps its share."""
    return grant_delay(starts, now, isolate_budget(limit, share), span)


HELD = ("credentials", "configuration")  # pauses held until a probe works (SPEC §2)


def pause_refuses(pauses: Iterable[tuple[str, float | None]], probe: bool) -> str | None:
    """The pause that forbids sending a granted slot now, or None.

    `pauses` holds (reason, seconds left): a rate-limit pause with time left stops every request;
    a credentials or configuration pause stops every request but the probe it granted (SPEC §2:
    after 401/403 or 404 only a probe goes out until one works).
    """
    for reason, left in pauses:
        if reason == "rate_limited" and (left or 0.0) > 0:
            return reason
        if reason in HELD and not probe:
            return reason
    return None
