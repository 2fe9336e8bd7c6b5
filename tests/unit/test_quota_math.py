"""Quota arithmetic (G1, G2): grant_delay alone, and a simulated stream of acquirers."""

from __future__ import annotations

import heapq

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from usersyncd.quota import grant_delay, pace_delay


def test_free_while_fewer_than_limit_in_span() -> None:
    """Fewer than `limit` starts within the span: a request may start now."""
    assert grant_delay([], 10.0, 3, 5.0) == 0.0
    assert grant_delay([6.0, 7.0], 10.0, 3, 5.0) == 0.0


def test_starts_older_than_span_are_ignored() -> None:
    """A start exactly one span ago (or older) no longer holds a slot."""
    assert grant_delay([5.0, 6.0, 7.0], 10.0, 3, 5.0) == 0.0
    assert grant_delay([5.5, 6.0, 7.0], 10.0, 3, 5.0) == 0.5
    assert grant_delay([1.0, 4.0, 5.0, 6.0, 7.0, 8.0], 10.0, 3, 5.0) == 1.0


def test_waits_for_the_oldest_start_that_must_leave() -> None:
    """With the span full, the wait ends when the limit-th newest start leaves it."""
    assert grant_delay([6.0, 7.0, 8.0], 10.0, 3, 5.0) == 1.0
    assert grant_delay([6.0, 7.0, 8.0, 9.0], 10.0, 3, 5.0) == 2.0  # 4 held (external rows)
    assert grant_delay([9.5], 10.0, 1, 5.0) == 4.5


def test_unsorted_starts_and_starts_ahead_of_now() -> None:
    """Order does not matter; a start stamped after `now` still holds a slot."""
    assert grant_delay([8.0, 6.0, 7.0], 10.0, 3, 5.0) == 1.0
    assert grant_delay([9.0, 10.5], 10.0, 2, 5.0) == 4.0


def test_limit_must_be_positive() -> None:
    """A limit below one is a programming error."""
    with pytest.raises(ValueError):
        grant_delay([], 0.0, 0, 1.0)


def test_large_epoch_rounding_still_grants_at_now_plus_delay() -> None:
    """At epoch-sized times, a retry at exactly now + delay is granted despite float rounding."""
    starts = [1_700_000_000.1 + i * 0.013 for i in range(50)]
    now = starts[-1] + 0.0007
    delay = grant_delay(starts, now, 50, 3636.0)
    assert delay > 0
    assert grant_delay(starts, now + delay, 50, 3636.0) == 0.0


def simulate(arrivals: list[float], limit: int, span: float) -> list[float]:
    """Acquirers arriving at `arrivals`; a denied one tries again at now + delay. Grant times."""
    pending = [(t, i) for i, t in enumerate(arrivals)]
    heapq.heapify(pending)
    granted: list[float] = []
    while pending:
        now, who = heapq.heappop(pending)
        delay = grant_delay(granted, now, limit, span)
        if delay == 0.0:
            granted.append(now)
            continue
        assert delay > 0
        # G2: no longer than needed. At now + delay, with nothing else granted, it is allowed ...
        assert grant_delay(granted, now + delay, limit, span) == 0.0
        # ... and it is the moment the limit-th newest start leaves the span, not later.
        held = [start for start in granted if start + span > now]
        assert delay <= held[-limit] + span - now + 1e-9 * max(1.0, abs(now))
        heapq.heappush(pending, (now + delay, who))
    return granted


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(min_value=1, max_value=12),
    span=st.floats(min_value=0.001, max_value=5000.0, allow_nan=False, allow_infinity=False),
    origin=st.floats(min_value=-1e9, max_value=2e9, allow_nan=False, allow_infinity=False),
    gaps=st.lists(
        st.floats(min_value=0.0, max_value=100.0, allow_nan=False, allow_infinity=False),
        min_size=1,
        max_size=60,
    ),
)
def test_simulated_acquirers_never_exceed_the_quota(
    limit: int, span: float, origin: float, gaps: list[float]
) -> None:
    """Any arrivals: no half-open span holds more than `limit` grants; every arrival is granted."""
    arrivals = []
    t = origin
    for gap in gaps:
        t += gap
        arrivals.append(t)
    granted = simulate(arrivals, limit, span)
    assert len(granted) == len(arrivals)
    assert granted == sorted(granted)
    # The (limit+1)-th start comes no earlier than one span after the first (G1).
    for first, later in zip(granted, granted[limit:], strict=False):
        assert later >= first + span


@settings(max_examples=100, deadline=None)
@given(
    limit=st.integers(min_value=1, max_value=8),
    span=st.floats(min_value=0.01, max_value=100.0, allow_nan=False, allow_infinity=False),
    burst=st.integers(min_value=1, max_value=40),
)
def test_a_burst_drains_at_full_quota(limit: int, span: float, burst: int) -> None:
    """A backlog arriving at once goes out `limit` per span, each group exactly a span apart."""
    granted = simulate([0.0] * burst, limit, span)
    for index, start in enumerate(granted):
        assert start == pytest.approx((index // limit) * span, rel=1e-9, abs=1e-9)


def test_pace_waits_one_slot_after_the_latest_grant() -> None:
    """A paced request starts one slot (span / limit) after the latest grant, at once if none."""
    from usersyncd.quota import pace_delay

    assert pace_delay([], 10.0, 5, 5.0) == 0.0
    assert pace_delay([9.5], 10.0, 5, 5.0) == pytest.approx(0.5)
    assert pace_delay([3.0, 8.0], 10.0, 5, 5.0) == 0.0


def test_pace_place_is_anchored_on_the_previous_grant() -> None:
    """A grant a little late takes its place in the pace, so lateness does not add up; after a
    long pause the pace starts again from about now."""
    from usersyncd.quota import pace_place

    slot = 1.0
    assert pace_place(None, 5, 5.0) == 0.0
    assert pace_place(-1.05, 5, 5.0) == pytest.approx(-0.05)  # 50 ms late: placed on time
    assert pace_place(-30.0, 5, 5.0) == pytest.approx(-slot / 4)  # idle: restart near now


@settings(max_examples=200, deadline=None)
@given(
    lateness=st.lists(st.floats(min_value=0.0, max_value=0.2), min_size=20, max_size=60),
    limit=st.integers(min_value=1, max_value=20),
)
def test_paced_grants_keep_the_rate_despite_lateness(lateness: list[float], limit: int) -> None:
    """Granting each paced request a little late (up to a fifth of a slot) never slows the
    average pace: n grants span no more than (n - 1) slots plus one lateness."""
    from usersyncd.quota import pace_delay, pace_place

    span = 10.0
    slot = span / limit
    now, places, grants = 0.0, [], []
    for late in lateness:
        wait = pace_delay(places[-1:], now, limit, span)
        now += wait + late * slot
        grants.append(now)
        places.append(now + pace_place(places[-1] - now if places else None, limit, span))
    assert grants[-1] - grants[0] <= (len(lateness) - 1) * slot + 0.2 * slot + 1e-9


# -- a shared account (SPEC §2, issue 7 item 12) ---------------------------------------------


def test_others_seen_from_remaining() -> None:
    """The API's count minus our own starts in its window; nothing without the header or when
    X-RateLimit-Limit names another limit."""
    from usersyncd.quota_math import others_seen

    assert others_seen(10, 4, None, 1) == 5
    assert others_seen(10, 4, 10, 1) == 5  # the same limit: believed
    assert others_seen(10, 4, 1000, 1) is None  # another bucket's remaining
    assert others_seen(10, None, 10, 1) is None
    assert others_seen(10, 9, None, 3) == 0  # we counted more than the API: nobody else
    assert others_seen(10, 0, None, 0) == 10


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(min_value=1, max_value=100),
    remaining=st.integers(min_value=0, max_value=120),
    ours=st.integers(min_value=0, max_value=120),
)
def test_others_seen_is_bounded_and_lower_remaining_means_more(limit: int, remaining: int, ours: int) -> None:
    from usersyncd.quota_math import others_seen

    seen = others_seen(limit, remaining, None, ours)
    assert seen is not None and 0 <= seen <= limit
    assert others_seen(limit, max(remaining - 1, 0), None, ours) >= seen  # type: ignore[operator]
    assert others_seen(limit, remaining, None, ours + 1) <= seen  # type: ignore[operator]


def test_learnt_others_keeps_the_latest_and_the_highest_of_the_span() -> None:
    """One more than seen (a steady client's count varies by one with the phase), the highest
    of the span, the latest however old; at most limit - 1."""
    from usersyncd.quota_math import learnt_others

    assert learnt_others([], 100.0, 10, 5.0) == (0, None)
    assert learnt_others([(99.0, 0)], 100.0, 10, 5.0) == (0, None)  # nobody else: no guard
    assert learnt_others([(0.0, 4)], 100.0, 10, 5.0) == (5, None)  # long ago, and still kept
    assert learnt_others([(97.0, 6), (99.0, 2)], 100.0, 10, 5.0) == (7, 2.0)  # 6 leaves at 102
    assert learnt_others([(97.0, 6), (99.0, 2)], 102.0, 10, 5.0) == (3, None)
    assert learnt_others([(50.0, 6), (99.0, 2)], 100.0, 10, 5.0) == (3, None)  # more room shown
    assert learnt_others([(99.0, 9)], 100.0, 10, 5.0) == (9, None)  # one per span still goes
    assert learnt_others([(99.0, 10)], 100.0, 1, 5.0) == (0, None)


times = st.integers(min_value=0, max_value=1000).map(float)


@settings(max_examples=400, deadline=None)
@given(
    seen=st.lists(st.tuples(times, st.integers(min_value=0, max_value=20)), max_size=12),
    limit=st.integers(min_value=1, max_value=20),
    span=st.integers(min_value=1, max_value=300).map(float),
    now=times,
    later=st.integers(min_value=0, max_value=2000).map(float),
)
def test_learnt_others_properties(
    seen: list[tuple[float, int]], limit: int, span: float, now: float, later: float
) -> None:
    """Never below a figure of the last span or the latest one (one more, capped at limit - 1):
    a lower figure wins at once; with time alone it only drops, exactly when it said it may."""
    from usersyncd.quota_math import learnt_others

    seen = [(when, others) for when, others in seen if when <= now]  # answers come before now
    figure, drop_in = learnt_others(seen, now, limit, span)
    cap = limit - 1

    def held(others: int) -> int:
        return min(others + 1, cap) if others else 0

    latest = held(max(seen)[1]) if seen else 0
    assert latest <= figure <= cap
    for when, others in seen:
        if when + span > now:
            assert figure >= held(others)
    assert figure in {held(others) for _, others in seen} | {0}
    after, _ = learnt_others(seen, now + later, limit, span)
    assert after <= figure
    if drop_in is None:
        assert after == figure
    else:
        assert drop_in > 0
        assert learnt_others(seen, now + drop_in - 0.5, limit, span)[0] == figure
        assert learnt_others(seen, now + drop_in, limit, span)[0] < figure


def share_world(
    limit: int,
    every: int,
    window: int,
    margin: int,
    horizon: int,
    stop_at: int | None = None,
    paced: bool = False,
) -> tuple[list[float], int]:
    """Our backlog (greedy, or paced one slot apart) on an account another client uses once every
    `every` ticks (0: never) until `stop_at`. The API counts arrivals in (t - window, t] and
    answers at once with X-RateLimit-Remaining. Our start times, and the most arrivals the API
    ever counted in its window."""
    from usersyncd.quota_math import budget, learnt_others, others_seen

    span = window + margin
    theirs = list(range(-2 * window, horizon, every)) if every else []
    theirs = [t for t in theirs if stop_at is None or t < stop_at]
    ours: list[float] = []
    seen: list[tuple[float, int]] = []

    def in_window(times: list[float] | list[int], t: float) -> int:
        return sum(1 for u in times if t - window < u <= t)

    now = 0.0
    while now < horizon:
        learnt, drop_in = learnt_others(seen, now, limit, span)
        allowed = budget(limit, learnt)
        delay = grant_delay(ours, now, allowed, span)
        if paced:
            delay = max(delay, pace_delay(ours[-1:], now, allowed, span))
        if delay > 0:
            now += max(min(delay, drop_in if drop_in is not None else delay), 1e-9)
            continue
        ours.append(now)
        mine = in_window(ours, now)
        remaining = max(limit - in_window(theirs, now) - mine, 0)
        seen.append((now, others_seen(limit, remaining, None, mine)))  # type: ignore[arg-type]
    counted = max(in_window(ours, t) + in_window(theirs, t) for t in sorted({*ours, *theirs}) if t >= 0)
    return ours, counted


@settings(max_examples=150, deadline=None)
@given(
    limit=st.integers(min_value=2, max_value=12),
    share=st.floats(min_value=0.0, max_value=1.0),
    period=st.integers(min_value=1, max_value=40),
    margin=st.integers(min_value=1, max_value=5),
)
def test_a_shared_account_is_never_overrun_and_its_room_is_used(
    limit: int, share: float, period: int, margin: int
) -> None:
    """Another client steadily using `others` of the account: after our first answer, the API
    never counts more than `limit` (G1), and we use the rest but one: `limit - others - 1` per
    span (G2, with the guard for the phase); when the other client stops, we come back to the
    whole account within two spans."""
    others = min(int(share * limit), limit - 1)
    window = max(others, 1) * period
    span = window + margin
    every = period if others else 0
    ours, counted = share_world(limit, every, window, margin, horizon=8 * span)
    assert counted <= limit
    for start in range(2 * span, 7 * span, span):
        assert sum(1 for t in ours if start <= t < start + span) >= max(limit - others - 1, 1)
    stop = 3 * span
    ours, counted = share_world(limit, every, window, margin, horizon=8 * span, stop_at=stop)
    assert counted <= limit
    back = stop + window + 2 * span
    assert sum(1 for t in ours if back <= t < back + span) == limit


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(min_value=2, max_value=12),
    every=st.integers(min_value=1, max_value=60),
    window=st.integers(min_value=1, max_value=240),
    margin=st.integers(min_value=1, max_value=5),
    paced=st.booleans(),
)
def test_any_steady_rate_is_never_overrun(
    limit: int, every: int, window: int, margin: int, paced: bool
) -> None:
    """Another client at any steady rate of at least one request per window (one every `every`
    ticks: its count in a window is k or k + 1 with the phase), greedy or paced: the API never
    counts more than `limit`, as long as the other client leaves us one request per window."""
    most = -(-window // every)  # the other client's count in a window: at most ceil(window / every)
    if every > window or most > limit - 1:
        return
    ours, counted = share_world(limit, every, window, margin, horizon=6 * (window + margin), paced=paced)
    assert counted <= limit
    assert len(ours) >= 5 * max(limit - most - 1, 1)  # and the rest is used
