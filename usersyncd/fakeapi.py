"""A real HTTP fake of the Drip-style subscriber batch API (SPEC §2), on loopback.

Used in-process by the tests (same event loop), by `usersyncd demo` and, as
`python -m usersyncd.fakeapi`, by benchmarks that need it in another process.
It enforces the quota by *arrival time*, as the real API does, and records every request.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import BasicAuth, web

_NOT_JSON = object()  # sentinel: body did not parse (distinct from a JSON `null`)
_MAX_READ = 64 * 1024 * 1024  # read bodies this big ourselves so *we* answer 413, not aiohttp


@dataclass
class RecordedRequest:
    """One request to the batch endpoint, as the fake saw it."""

    arrived: float  # time.monotonic() at arrival
    wall: float  # time.time() at arrival
    status: int  # 0 while still being processed
    headers: dict[str, str]  # request headers, lower-case names
    emails: list[str]
    subscribers: list[dict[str, Any]]
    body_bytes: int
    request_id: str | None  # the client's X-Request-Id


@dataclass(frozen=True)
class _Fault:
    status: int
    headers: dict[str, str]
    body: bytes
    content_type: str | None
    delay: float


def _errors(*errors: dict[str, Any]) -> dict[str, Any]:
    return {"errors": list(errors)}


def _subscribers_of(payload: Any) -> list[dict[str, Any]]:
    """Every subscriber dict found in a (possibly invalid) payload, for the record."""
    if not isinstance(payload, dict) or not isinstance(payload.get("batches"), list):
        return []
    found: list[dict[str, Any]] = []
    for batch in payload["batches"]:
        if isinstance(batch, dict) and isinstance(batch.get("subscribers"), list):
            found.extend(s for s in batch["subscribers"] if isinstance(s, dict))
    return found


def _invalid_reason(payload: Any, max_batch: int) -> str | None:
    """Why the payload is not one well-formed batch, or None if it is."""
    if payload is _NOT_JSON:
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


class FakeApi:
    """The fake server. All state is per instance; attributes may be changed at runtime."""

    def __init__(
        self,
        *,
        api_key: str = "test-key",
        auth: str = "bearer",
        batch_path: str = "/subscribers/batches",
        limit_requests: int | None = None,
        window: float = 3600.0,
        max_batch: int = 1000,
        max_body_bytes: int | None = None,
        retry_after_on_429: bool = False,
        rate_limit_remaining_header: bool = False,
    ) -> None:
        if auth not in ("bearer", "basic") and not (auth.startswith("header:") and auth[7:]):
            raise ValueError(f"auth must be 'bearer', 'basic' or 'header:NAME', not {auth!r}")
        if window <= 0:
            raise ValueError("window must be > 0")
        self.api_key = api_key
        self.auth = auth
        self.batch_path = batch_path
        self.limit_requests = limit_requests
        self.window = window
        self.max_batch = max_batch
        self.max_body_bytes = max_body_bytes
        self.retry_after_on_429 = retry_after_on_429
        self.rate_limit_remaining_header = rate_limit_remaining_header
        self.latency = 0.0
        self.reject_emails: set[str] = set()
        self.requests: list[RecordedRequest] = []
        self.state: dict[str, dict[str, Any]] = {}
        self.sends: collections.Counter[str] = collections.Counter()
        self.violations = 0
        self.max_in_window = 0
        self.concurrent_conflicts = 0
        self.accepted = 0
        self._statuses: collections.Counter[int] = collections.Counter()
        self._faults: collections.deque[_Fault] = collections.deque()
        self._recent: collections.deque[float] = collections.deque()  # arrivals in the window
        self._busy: dict[str, str] = {}  # email -> request id of the in-flight request holding it
        self._open = 0  # handlers currently running
        self._seq = 0
        self._runner: web.AppRunner | None = None
        self._url: str | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:PORT (only once started)."""
        if self._url is None:
            raise RuntimeError("FakeApi is not started")
        return self._url

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Bind and serve; returns the base URL."""
        if self._runner is not None:
            raise RuntimeError("FakeApi already started")
        client_max = max(_MAX_READ, (self.max_body_bytes or 0) + 1)
        app = web.Application(client_max_size=client_max)
        app.router.add_post(self.batch_path, self._handle_batch)
        app.router.add_get("/_fake/stats", self._handle_stats)
        app.router.add_get("/_fake/state", self._handle_state)
        # short shutdown grace: stop() must not hang on requests held open by `latency`
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host  # IPv6 literal
        self._url = f"http://{shown}:{bound_port}"
        return self._url

    async def stop(self) -> None:
        """Stop serving (idempotent); recorded data stays readable."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        self._url = None

    async def __aenter__(self) -> FakeApi:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- test helpers ----------------------------------------------------------------------

    def script(
        self,
        status: int,
        *,
        times: int = 1,
        headers: dict[str, str] | None = None,
        body: bytes | str | dict[str, Any] | None = None,
        delay: float = 0.0,
    ) -> None:
        """Queue `times` identical faults, answered FIFO ahead of every other check."""
        if not 100 <= status <= 599 or times < 1 or delay < 0:
            raise ValueError("script needs 100 <= status <= 599, times >= 1, delay >= 0")
        content_type: str | None
        if isinstance(body, dict):
            raw, content_type = json.dumps(body).encode(), "application/json"
        elif isinstance(body, str):
            raw, content_type = body.encode(), "text/plain"
        elif isinstance(body, bytes):
            raw, content_type = body, "application/octet-stream"
        elif status >= 400:
            raw = json.dumps(_errors({"code": "scripted", "status": status})).encode()
            content_type = "application/json"
        elif status in (204, 304):  # these must not carry a body
            raw, content_type = b"", None
        else:
            raw, content_type = b"{}", "application/json"
        fault = _Fault(status, dict(headers or {}), raw, content_type, delay)
        self._faults.extend([fault] * times)

    def stats(self) -> dict[str, Any]:
        """JSON-able summary (statuses keyed by int code; answered requests only)."""
        return {
            "requests": len(self.requests),
            "accepted": self.accepted,
            "violations": self.violations,
            "max_in_window": self.max_in_window,
            "concurrent_conflicts": self.concurrent_conflicts,
            "statuses": dict(sorted(self._statuses.items())),
            "users_received": sum(self.sends.values()),
            "distinct_users": len(self.state),
            "in_flight": self._open,
        }

    async def wait_for(
        self,
        predicate: Callable[[FakeApi], bool],
        timeout: float,
        interval: float = 0.02,
    ) -> None:
        """Poll until predicate(self) is true; TimeoutError (with stats) after `timeout` s."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"fake API condition not met in {timeout}s: {self.stats()}")
            await asyncio.sleep(interval)

    def max_arrivals_in_any_window(self, window: float | None = None) -> int:
        """Most arrivals within any `window` seconds, over all recorded requests."""
        span = self.window if window is None else window
        times = sorted(r.arrived for r in self.requests)
        best, first = 0, 0
        for last, t in enumerate(times):
            while t - times[first] >= span:  # same rule as the live check: (t - window, t]
                first += 1
            best = max(best, last - first + 1)
        return best

    # ---- request handling ------------------------------------------------------------------

    def _arrive(self, now: float) -> tuple[bool, int]:
        """Count an arrival; returns (is a violation, arrivals in window including it)."""
        while self._recent and self._recent[0] <= now - self.window:
            self._recent.popleft()
        before = len(self._recent)
        self._recent.append(now)
        self.max_in_window = max(self.max_in_window, before + 1)
        violation = self.limit_requests is not None and before >= self.limit_requests
        if violation:
            self.violations += 1  # counted whatever the answer: the arrival itself broke quota
        return violation, before + 1

    def _authorized(self, request: web.Request) -> bool:
        if self.auth.startswith("header:"):
            return request.headers.get(self.auth[7:]) == self.api_key
        scheme, _, cred = request.headers.get("Authorization", "").partition(" ")
        if self.auth == "bearer":
            return scheme.lower() == "bearer" and cred == self.api_key
        try:
            basic = BasicAuth.decode(request.headers.get("Authorization", ""))
        except ValueError:
            return False
        return bool(basic.login == self.api_key and basic.password == "")

    async def _handle_batch(self, request: web.Request) -> web.StreamResponse:
        arrived, wall = time.monotonic(), time.time()
        self._seq += 1
        rid = f"fake-{self._seq}"
        violation, in_window = self._arrive(arrived)
        headers = {k.lower(): v for k, v in request.headers.items()}
        rec = RecordedRequest(arrived, wall, 0, headers, [], [], 0, headers.get("x-request-id"))
        self.requests.append(rec)  # appended now, so the list is in arrival order
        self._open += 1
        try:
            resp = await self._answer(request, rec, rid, violation, in_window)
        finally:
            self._open -= 1
        if "X-Request-Id" not in resp.headers:  # a scripted fault may bring its own
            resp.headers["X-Request-Id"] = rid
        rec.status = resp.status
        self._statuses[resp.status] += 1
        return resp

    async def _answer(
        self, request: web.Request, rec: RecordedRequest, rid: str, violation: bool, in_window: int
    ) -> web.StreamResponse:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return web.json_response(_errors({"code": "payload_too_large"}), status=413)
        rec.body_bytes = len(body)
        try:
            payload: Any = json.loads(body)
        except ValueError:
            payload = _NOT_JSON
        rec.subscribers = _subscribers_of(payload)
        rec.emails = [s["email"] for s in rec.subscribers if isinstance(s.get("email"), str)]

        if self._faults:
            fault = self._faults.popleft()
            if fault.delay:
                await asyncio.sleep(fault.delay)
            resp = web.Response(status=fault.status, body=fault.body or None)
            if fault.content_type:
                resp.headers["Content-Type"] = fault.content_type
            resp.headers.update(fault.headers)  # the script's headers win
            return resp
        if not self._authorized(request):
            return web.json_response(_errors({"code": "authentication_failed"}), status=401)
        if violation:
            secs = int(self.window) if self.window == int(self.window) else self.window
            headers = {"Retry-After": str(secs)} if self.retry_after_on_429 else None
            msg = "rate limit exceeded, try again in an hour"
            return web.json_response(
                _errors({"code": "too_many_requests", "message": msg}), status=429, headers=headers
            )
        if self.max_body_bytes is not None and len(body) > self.max_body_bytes:
            return web.json_response(_errors({"code": "payload_too_large"}), status=413)
        reason = _invalid_reason(payload, self.max_batch)
        if reason is not None:
            err = {"code": "invalid_batch", "message": reason}
            return web.json_response(_errors(err), status=422)
        subs: list[dict[str, Any]] = payload["batches"][0]["subscribers"]
        rejected = [
            {"code": "validation_failed", "index": i, "email": s["email"]}
            for i, s in enumerate(subs)
            if s["email"] in self.reject_emails
        ]
        if rejected:
            return web.json_response(_errors(*rejected), status=422)
        emails = list(dict.fromkeys(s["email"] for s in subs))  # unique, in batch order
        clashes = [e for e in emails if e in self._busy]
        if clashes:
            self.concurrent_conflicts += 1
            errs = [{"code": "concurrent_update", "email": e} for e in clashes]
            return web.json_response(_errors(*errs), status=409)

        for e in emails:
            self._busy[e] = rid
        try:
            if self.latency > 0:
                await asyncio.sleep(self.latency)  # held open, emails marked in flight
            for sub in subs:
                self.state[sub["email"]] = dict(sub)
                self.sends[sub["email"]] += 1
            self.accepted += 1
        finally:
            for e in emails:
                self._busy.pop(e, None)
        headers = None
        if self.rate_limit_remaining_header and self.limit_requests is not None:
            headers = {"X-RateLimit-Remaining": str(max(0, self.limit_requests - in_window))}
        return web.json_response({}, status=202, headers=headers)

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _handle_state(self, request: web.Request) -> web.Response:
        return web.json_response({"state": self.state, "sends": dict(self.sends)})


# ---- separate process ----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """`python -m usersyncd.fakeapi`: serve until SIGTERM/SIGINT, then exit 0."""
    p = argparse.ArgumentParser(prog="python -m usersyncd.fakeapi", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--requests", dest="limit_requests", type=int, metavar="N", help="quota")
    p.add_argument("--window", type=float, default=3600.0, help="quota window, seconds")
    p.add_argument("--api-key", default="test-key")
    p.add_argument("--auth", default="bearer", help="bearer | basic | header:NAME")
    p.add_argument("--latency", type=float, default=0.0, help="seconds each request is held")
    p.add_argument("--max-batch", type=int, default=1000)
    p.add_argument("--max-body-bytes", type=int)
    p.add_argument("--batch-path", default="/subscribers/batches")
    p.add_argument("--retry-after-on-429", action="store_true")
    p.add_argument("--rate-limit-remaining-header", action="store_true")
    opts = vars(p.parse_args(argv))  # dests equal FakeApi's keyword names
    host, port, latency = opts.pop("host"), opts.pop("port"), opts.pop("latency")
    try:
        fake = FakeApi(**opts)
    except ValueError as exc:
        p.error(str(exc))  # exits 2
    fake.latency = latency
    return asyncio.run(_serve(fake, host, port))


async def _serve(fake: FakeApi, host: str, port: int) -> int:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    url = await fake.start(host, port)
    print(f"listening on {url}", flush=True)  # the parent reads this one line
    try:
        await stopping.wait()
    finally:
        await fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
