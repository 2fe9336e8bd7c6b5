"""What the fake API records and checks, shared by the server and its out-of-process proxy."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

NOT_JSON = object()  # sentinel: body did not parse (distinct from a JSON `null`)

# Settings a test may change at runtime, on a FakeApi or through a FakeApiProcess
KNOBS = (
    "api_key",
    "auth",
    "limit_requests",
    "window",
    "latency",
    "reject_emails",
    "max_body_bytes",
    "rate_limit_remaining_header",
    "retry_after_on_429",
    "flavour",
    "account_id",
)

FLAVOURS = ("indexed", "drip")  # indexed: names each bad record (today's); drip: as Drip answers (SPEC §2)
DRIP_RATE_LIMITED = {"message": "API rate limit exceeded. Please try again in an hour."}
DRIP_NOT_FOUND = {
    "errors": [{"code": "not_found_error", "message": "The resource you requested was not found"}]
}
DRIP_UNAUTHORIZED = {
    "errors": [{"code": "authorization_error", "message": "You are not authorized to access this resource"}]
}
DRIP_EMAIL_INVALID = {
    "errors": [{"code": "email_error", "attribute": "email", "message": "Email is invalid"}]
}
DRIP_EMAIL_TAKEN = {
    "errors": [
        {"code": "uniqueness_error", "attribute": "new_email", "message": "New email has already been taken"}
    ]
}
_NOT_MERGED = ("email", "new_email", "tags", "remove_tags", "status")


@dataclass
class RecordedRequest:
    """One request to the batch endpoint, as the fake saw it."""

    arrived: float  # time.monotonic() at arrival (system-wide: comparable across processes)
    wall: float  # time.time() at arrival
    status: int  # 0 while still being processed
    headers: dict[str, str]  # request headers, lower-case names
    emails: list[str]
    subscribers: list[dict[str, Any]]
    body_bytes: int
    request_id: str | None  # the client's X-Request-Id
    ended: float | None = None  # time.monotonic() when the answer was ready; None while open
    path: str = ""  # the request's path (the drip flavour has two counted endpoints)


def check_auth(auth: str) -> None:
    if auth not in ("bearer", "basic") and not (auth.startswith("header:") and auth[7:]):
        raise ValueError(f"auth must be 'bearer', 'basic' or 'header:NAME', not {auth!r}")


def check_flavour(flavour: str) -> None:
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {', '.join(FLAVOURS)}, not {flavour!r}")


def rename_clash(state: dict[str, dict[str, Any]], subs: list[dict[str, Any]]) -> bool:
    """Would a `new_email` in this batch land on an email another subscriber holds? Drip
    renames `email`'s subscriber; when there is none, it takes `new_email` as the subscriber
    ("this address will be used to create a new subscriber"; one that exists is updated, as
    any create-or-update by email): so a rename sent again after it landed is no clash."""
    targets: set[str] = set()
    for sub in subs:
        new = sub.get("new_email")
        if isinstance(new, str) and new != sub["email"]:
            if (new in state and sub["email"] in state) or new in targets:
                return True
            targets.add(new)
    return False


def apply_drip(state: dict[str, dict[str, Any]], subs: list[dict[str, Any]], sends: Any) -> None:
    """A Drip batch on the stored subscribers: fields merged, renames moved, tags added and
    removed (kept sorted); an unsubscribed one stays so unless sent with "status": "active"."""
    for sub in subs:
        email, new = sub["email"], sub.get("new_email")
        key = new if isinstance(new, str) and new else email
        # a rename moves `email`'s subscriber; with none under `email`, `new_email`'s is taken
        record = state.pop(email) if key != email and email in state else state.get(key)
        record = dict(record) if record is not None else {"status": "active"}
        for name, value in sub.items():
            if name in _NOT_MERGED:
                continue
            if isinstance(value, dict) and isinstance(record.get(name), dict):
                record[name] = {**record[name], **value}
            else:
                record[name] = value
        if "tags" in sub or "remove_tags" in sub or "tags" in record:
            tags = set(record.get("tags") or ()) | set(sub.get("tags") or ())
            record["tags"] = sorted(tags - set(sub.get("remove_tags") or ()))
        if sub.get("status") == "active":
            record["status"] = "active"
        record["email"] = key
        state[key] = record
        sends[key] += 1


def apply_unsubscribes(state: dict[str, dict[str, Any]], emails: list[str]) -> None:
    """Drip's batch unsubscribe: each known subscriber's status becomes "unsubscribed"."""
    for email in emails:
        if email in state:
            state[email] = {**state[email], "status": "unsubscribed"}


def check_window(window: float) -> None:
    if not window > 0:
        raise ValueError("window must be > 0")


def errors(*errs: dict[str, Any]) -> dict[str, Any]:
    return {"errors": list(errs)}


def emails_of(subscribers: list[dict[str, Any]]) -> list[str]:
    return [s["email"] for s in subscribers if isinstance(s.get("email"), str)]


def subscribers_of(payload: Any) -> list[dict[str, Any]]:
    """Every subscriber dict found in a (possibly invalid) payload, for the record."""
    if not isinstance(payload, dict) or not isinstance(payload.get("batches"), list):
        return []
    found: list[dict[str, Any]] = []
    for batch in payload["batches"]:
        if isinstance(batch, dict) and isinstance(batch.get("subscribers"), list):
            found.extend(s for s in batch["subscribers"] if isinstance(s, dict))
    return found


def invalid_reason(payload: Any, max_batch: int) -> str | None:
    """Why the payload is not one well-formed batch, or None if it is."""
    if payload is NOT_JSON:
        return "body is not JSON"
    if not isinstance(payload, dict) or not isinstance(payload.get("batches"), list):
        return "body must be an object with a 'batches' list"
    if len(payload["batches"]) != 1:
        return f"exactly one batch expected, got {len(payload['batches'])}"
    batch = payload["batches"][0]
    if not isinstance(batch, dict) or not isinstance(batch.get("subscribers"), list):
        return "batch must be an object with a 'subscribers' list"
    subs = batch["subscribers"]
    if not 1 <= len(subs) <= max_batch:
        return f"a batch holds 1..{max_batch} subscribers, got {len(subs)}"
    for i, sub in enumerate(subs):
        if not isinstance(sub, dict) or not isinstance(sub.get("email"), str):
            return f"subscribers[{i}] must be an object with a string 'email'"
    return None


def max_arrivals_in_any_window(requests: list[RecordedRequest], span: float) -> int:
    """Most arrivals within any `span` seconds, over these requests."""
    times = sorted(r.arrived for r in requests)
    best, first = 0, 0
    for last, t in enumerate(times):
        while t - times[first] >= span:  # same rule as the live check: (t - window, t]
            first += 1
        best = max(best, last - first + 1)
    return best


class Recording:
    """What both fakes tell of what they recorded: the server in this process (`FakeApi`) and the
    proxy of one in another (`FakeApiProcess`, whose recorded attributes bring themselves up to
    date from the journal when read)."""

    requests: list[RecordedRequest]
    state: dict[str, dict[str, Any]]
    accepted: int
    violations: int
    max_in_window: int
    concurrent_conflicts: int
    window: float
    _statuses: Counter[int]
    _received: int
    _open: int

    def stats(self) -> dict[str, Any]:
        """JSON-able summary (statuses keyed by int code; answered requests only)."""
        requests = len(self.requests)  # first: on the proxy, this read brings the rest up to date
        return {
            "requests": requests,
            "accepted": self.accepted,
            "violations": self.violations,
            "max_in_window": self.max_in_window,
            "concurrent_conflicts": self.concurrent_conflicts,
            "statuses": dict(sorted(self._statuses.items())),
            "users_received": self._received,
            "distinct_users": len(self.state),
            "in_flight": self._open,
        }

    async def wait_for(
        self, predicate: Callable[[Self], bool], timeout: float, interval: float = 0.02
    ) -> None:
        """Poll until predicate(self) is true; TimeoutError (with stats) after `timeout` s."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"fake API condition not met in {timeout}s: {self.stats()}")
            await asyncio.sleep(interval)

    def max_arrivals_in_any_window(self, window: float | None = None) -> int:
        """Most arrivals within any `window` seconds, over all recorded requests."""
        return max_arrivals_in_any_window(self.requests, self.window if window is None else window)
