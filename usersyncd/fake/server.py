"""A real HTTP fake of the Drip-style subscriber batch API (SPEC §2), on loopback.

It enforces the quota by *arrival time*, as the real API does, and records every request. It
runs in-process (`usersyncd demo`, the fake's own unit tests) or in a process of its own
(`python -m usersyncd.fakeapi`, driven by `FakeApiProcess` in end-to-end tests and benchmarks),
where a busy test cannot delay its arrival stamps. For that proxy it keeps an append-only
journal of what happened (`GET /_fake/journal?since=N`) and takes settings and scripted faults
over HTTP (`POST /_fake/config`, `POST /_fake/script`).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import mmap
import struct
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import BasicAuth, web

from usersyncd.fake import model
from usersyncd.fake.model import RecordedRequest

_MAX_READ = 64 * 1024 * 1024  # read bodies this big ourselves so *we* answer 413, not aiohttp
_JOURNAL_CHUNK = 5000  # subscribers per journal answer: keeps the fake's loop free for arrivals


@dataclass(frozen=True)
class _Fault:
    status: int
    headers: dict[str, str]
    body: bytes
    content_type: str | None
    delay: float


class FakeApi(model.Recording):
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
        flavour: str = "indexed",
        account_id: str = "9999999",
    ) -> None:
        model.check_auth(auth)
        model.check_window(window)
        model.check_flavour(flavour)
        self.flavour = flavour  # "drip": Drip's paths and answers (SPEC §2); "indexed": names bad records
        self.account_id = account_id  # the drip flavour's one account: another in a path is a 404
        self.probes = 0  # GETs of /v2/user and /v2/accounts/{id}: outside the quota, not in `requests`
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
        self._received = 0  # sum(sends.values()), kept as it grows: stats() stays cheap
        self._statuses: collections.Counter[int] = collections.Counter()
        self._faults: collections.deque[_Fault] = collections.deque()
        self._recent: collections.deque[float] = collections.deque()  # arrivals in the window
        self._busy: dict[str, str] = {}  # email -> request id of the in-flight request holding it
        self._open = 0  # handlers currently running
        self._seq = 0
        self._journal: list[dict[str, Any]] = []
        self._journal_length: mmap.mmap | None = None
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
        app.router.add_post("/v2/{account_id}/subscribers/batches", self._handle_drip_subscribers)
        app.router.add_post("/v2/{account_id}/unsubscribes/batches", self._handle_drip_unsubscribes)
        app.router.add_get("/v2/user", self._handle_drip_probe)
        app.router.add_get("/v2/accounts/{account_id}", self._handle_drip_probe)
        app.router.add_get("/_fake/stats", self._handle_stats)
        app.router.add_get("/_fake/state", self._handle_state)
        app.router.add_get("/_fake/journal", self._handle_journal)
        app.router.add_post("/_fake/config", self._handle_config)
        app.router.add_post("/_fake/script", self._handle_script)
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

    def publish_journal_length(self, path: str) -> None:
        """Keep the journal's length in this 8-byte file (shared memory): a proxy in another
        process reads it to learn, without a request, whether anything happened."""
        with open(path, "r+b") as f:
            self._journal_length = mmap.mmap(f.fileno(), 8)
        struct.pack_into("<Q", self._journal_length, 0, len(self._journal))

    # ---- test helpers ----------------------------------------------------------------------

    def configure(self, **knobs: Any) -> dict[str, Any]:
        """Change runtime settings (model.KNOBS) at once, after checking them all."""
        unknown = set(knobs) - set(model.KNOBS)
        if unknown:
            raise ValueError(f"unknown setting(s): {sorted(unknown)}")
        if "auth" in knobs:
            model.check_auth(knobs["auth"])
        if "window" in knobs:
            model.check_window(knobs["window"])
        if "flavour" in knobs:
            model.check_flavour(knobs["flavour"])
        if "reject_emails" in knobs:
            knobs["reject_emails"] = set(knobs["reject_emails"])
        for name, value in knobs.items():
            setattr(self, name, value)
        return {name: getattr(self, name) for name in knobs}

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
            raw = json.dumps(model.errors({"code": "scripted", "status": status})).encode()
            content_type = "application/json"
        elif status in (204, 304):  # these must not carry a body
            raw, content_type = b"", None
        else:
            raw, content_type = b"{}", "application/json"
        fault = _Fault(status, dict(headers or {}), raw, content_type, delay)
        self._faults.extend([fault] * times)

    # ---- request handling ------------------------------------------------------------------

    def _note(self, event: dict[str, Any]) -> None:
        """Append to the journal (the proxy replays it in this order)."""
        self._journal.append(event)
        if self._journal_length is not None:
            struct.pack_into("<Q", self._journal_length, 0, len(self._journal))

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

    async def _handle_drip_subscribers(self, request: web.Request) -> web.StreamResponse:
        if self.flavour != "drip":
            raise web.HTTPNotFound()
        return await self._handle_batch(request, "subscribers")

    async def _handle_drip_unsubscribes(self, request: web.Request) -> web.StreamResponse:
        if self.flavour != "drip":
            raise web.HTTPNotFound()
        return await self._handle_batch(request, "unsubscribes")

    async def _handle_drip_probe(self, request: web.Request) -> web.StreamResponse:
        """GET /v2/user, /v2/accounts/{id}: the key (and the account) work? Outside the quota."""
        if self.flavour != "drip":
            raise web.HTTPNotFound()
        self.probes += 1
        self._note({"k": "probe"})
        if not self._authorized(request):
            return web.json_response(model.DRIP_UNAUTHORIZED, status=401)
        account = request.match_info.get("account_id")
        if account is None:
            return web.json_response({"users": [{"email": "owner@example.com", "time_zone": "UTC"}]})
        if account != self.account_id:
            return web.json_response(model.DRIP_NOT_FOUND, status=404)
        return web.json_response({"accounts": [{"id": self.account_id, "name": "Fake account"}]})

    async def _handle_batch(self, request: web.Request, endpoint: str = "") -> web.StreamResponse:
        arrived, wall = time.monotonic(), time.time()
        self._seq += 1
        rid = f"fake-{self._seq}"
        violation, in_window = self._arrive(arrived)
        headers = {k.lower(): v for k, v in request.headers.items()}
        rec = RecordedRequest(
            arrived, wall, 0, headers, [], [], 0, headers.get("x-request-id"), path=request.path
        )
        index = len(self.requests)
        self.requests.append(rec)  # appended now, so the list is in arrival order
        self._note(
            {"k": "arrive", "i": index, "arrived": arrived, "wall": wall, "headers": headers,
             "request_id": rec.request_id, "violation": violation, "in_window": in_window,
             "path": rec.path}
        )  # fmt: skip
        self._open += 1
        try:
            if endpoint:
                resp = await self._answer_drip(request, rec, index, rid, violation, in_window, endpoint)
            else:
                resp = await self._answer(request, rec, index, rid, violation, in_window)
        finally:
            self._open -= 1
        if "X-Request-Id" not in resp.headers:  # a scripted fault may bring its own
            resp.headers["X-Request-Id"] = rid
        rec.status, rec.ended = resp.status, time.monotonic()
        self._statuses[resp.status] += 1
        self._note({"k": "end", "i": index, "status": rec.status, "ended": rec.ended})
        return resp

    async def _answer(
        self,
        request: web.Request,
        rec: RecordedRequest,
        index: int,
        rid: str,
        violation: bool,
        in_window: int,
    ) -> web.StreamResponse:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return web.json_response(model.errors({"code": "payload_too_large"}), status=413)
        rec.body_bytes = len(body)
        try:
            payload: Any = json.loads(body)
        except ValueError:
            payload = model.NOT_JSON
        rec.subscribers = model.subscribers_of(payload)
        rec.emails = model.emails_of(rec.subscribers)
        self._note({"k": "body", "i": index, "body_bytes": rec.body_bytes, "subscribers": rec.subscribers})

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
            return web.json_response(model.errors({"code": "authentication_failed"}), status=401)
        if violation:
            secs = int(self.window) if self.window == int(self.window) else self.window
            headers = {"Retry-After": str(secs)} if self.retry_after_on_429 else None
            msg = "rate limit exceeded, try again in an hour"
            return web.json_response(
                model.errors({"code": "too_many_requests", "message": msg}), status=429, headers=headers
            )
        if self.max_body_bytes is not None and len(body) > self.max_body_bytes:
            return web.json_response(model.errors({"code": "payload_too_large"}), status=413)
        reason = model.invalid_reason(payload, self.max_batch)
        if reason is not None:
            err = {"code": "invalid_batch", "message": reason}
            return web.json_response(model.errors(err), status=422)
        subs: list[dict[str, Any]] = payload["batches"][0]["subscribers"]
        rejected = [
            {"code": "validation_failed", "index": i, "email": s["email"]}
            for i, s in enumerate(subs)
            if s["email"] in self.reject_emails
        ]
        if rejected:
            return web.json_response(model.errors(*rejected), status=422)
        emails = list(dict.fromkeys(s["email"] for s in subs))  # unique, in batch order
        clashes = [e for e in emails if e in self._busy]
        if clashes:
            self.concurrent_conflicts += 1
            self._note({"k": "conflict", "i": index})
            errs = [{"code": "concurrent_update", "email": e} for e in clashes]
            return web.json_response(model.errors(*errs), status=409)

        for e in emails:
            self._busy[e] = rid
        try:
            if self.latency > 0:
                await asyncio.sleep(self.latency)  # held open, emails marked in flight
            for sub in subs:  # the same list as rec.subscribers: the proxy applies those
                self.state[sub["email"]] = dict(sub)
                self.sends[sub["email"]] += 1
            self._received += len(subs)
            self.accepted += 1
            self._note({"k": "apply", "i": index})
        finally:
            for e in emails:
                self._busy.pop(e, None)
        headers = None
        if self.rate_limit_remaining_header and self.limit_requests is not None:
            headers = {"X-RateLimit-Remaining": str(max(0, self.limit_requests - in_window))}
        return web.json_response({}, status=202, headers=headers)

    async def _read_payload(self, request: web.Request, rec: RecordedRequest, index: int) -> Any:
        """The body as JSON (model.NOT_JSON if not), recorded; None if too large to read."""
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return None
        rec.body_bytes = len(body)
        try:
            payload: Any = json.loads(body)
        except ValueError:
            payload = model.NOT_JSON
        rec.subscribers = model.subscribers_of(payload)
        rec.emails = model.emails_of(rec.subscribers)
        self._note({"k": "body", "i": index, "body_bytes": rec.body_bytes, "subscribers": rec.subscribers})
        return payload

    def _scripted(self) -> _Fault | None:
        return self._faults.popleft() if self._faults else None

    async def _answer_drip(
        self,
        request: web.Request,
        rec: RecordedRequest,
        index: int,
        rid: str,
        violation: bool,
        in_window: int,
        endpoint: str,
    ) -> web.StreamResponse:
        """Drip's answers (SPEC §2, "The real Drip API"): 201 {} / 204, a 422 naming no record."""
        payload = await self._read_payload(request, rec, index)
        fault = self._scripted()
        if fault is not None:
            return await self._fault_response(fault)
        if not self._authorized(request):
            return web.json_response(model.DRIP_UNAUTHORIZED, status=401)
        if request.match_info["account_id"] != self.account_id:
            return web.json_response(model.DRIP_NOT_FOUND, status=404)
        limit = self.limit_requests
        if violation:
            assert limit is not None
            headers = {"X-RateLimit-Limit": str(limit), "X-RateLimit-Remaining": "0"}
            return web.json_response(model.DRIP_RATE_LIMITED, status=429, headers=headers)
        if payload is None or (self.max_body_bytes is not None and rec.body_bytes > self.max_body_bytes):
            return web.json_response(model.errors({"code": "payload_too_large"}), status=413)
        reason = model.invalid_reason(payload, self.max_batch)
        if reason is not None:
            err = {"code": "invalid_error", "attribute": "batches", "message": reason}
            return web.json_response(model.errors(err), status=422)
        subs: list[dict[str, Any]] = payload["batches"][0]["subscribers"]
        if endpoint == "subscribers":
            if any(s["email"] in self.reject_emails for s in subs):
                return web.json_response(model.DRIP_EMAIL_INVALID, status=422)  # the whole batch
            if model.rename_clash(self.state, subs):
                return web.json_response(model.DRIP_EMAIL_TAKEN, status=422)
        emails = list(dict.fromkeys(s["email"] for s in subs))
        clashes = [e for e in emails if e in self._busy]
        if clashes:
            self.concurrent_conflicts += 1
            self._note({"k": "conflict", "i": index})
            errs = [{"code": "concurrent_update", "email": e} for e in clashes]
            return web.json_response(model.errors(*errs), status=409)
        for e in emails:
            self._busy[e] = rid
        try:
            if self.latency > 0:
                await asyncio.sleep(self.latency)
            if endpoint == "subscribers":
                model.apply_drip(self.state, subs, self.sends)
                self._received += len(subs)
            else:
                model.apply_unsubscribes(self.state, emails)
            self.accepted += 1
            self._note({"k": "apply", "i": index, "op": endpoint})
        finally:
            for e in emails:
                self._busy.pop(e, None)
        headers = None
        if self.rate_limit_remaining_header and limit is not None:
            headers = {
                "X-RateLimit-Limit": str(limit),
                "X-RateLimit-Remaining": str(max(0, limit - in_window)),
            }
        if endpoint == "unsubscribes":
            return web.Response(status=204, headers=headers)
        return web.json_response({}, status=201, headers=headers)

    async def _fault_response(self, fault: _Fault) -> web.Response:
        if fault.delay:
            await asyncio.sleep(fault.delay)
        resp = web.Response(status=fault.status, body=fault.body or None)
        if fault.content_type:
            resp.headers["Content-Type"] = fault.content_type
        resp.headers.update(fault.headers)  # the script's headers win
        return resp

    # ---- the fake's own endpoints ----------------------------------------------------------

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _handle_state(self, request: web.Request) -> web.Response:
        return web.json_response({"state": self.state, "sends": dict(self.sends)})

    async def _handle_journal(self, request: web.Request) -> web.Response:
        """Events from `since` on, a bounded chunk at a time (`more` says there is more)."""
        since = int(request.query.get("since", "0"))
        end, weight = since, 0
        while end < len(self._journal) and weight < _JOURNAL_CHUNK:
            weight += 1 + len(self._journal[end].get("subscribers", ()))
            end += 1
        events = self._journal[since:end]
        return web.json_response({"events": events, "next": end, "more": end < len(self._journal)})

    async def _handle_config(self, request: web.Request) -> web.Response:
        try:
            applied = self.configure(**await request.json())
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        if "reject_emails" in applied:
            applied["reject_emails"] = sorted(applied["reject_emails"])
        return web.json_response(applied)

    async def _handle_script(self, request: web.Request) -> web.Response:
        spec = await request.json()
        wrapped = spec.pop("body", None)  # {"json": ...} | {"text": ...} | {"base64": ...} | null
        try:
            body = None
            if wrapped is not None:
                [(kind, value)] = wrapped.items()
                body = base64.b64decode(value) if kind == "base64" else value
            self.script(spec.pop("status"), body=body, **spec)
        except (ValueError, TypeError, KeyError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"queued": len(self._faults)})
