"""The fake API in a child process, seen through the attributes of an in-process `FakeApi`.

A test's own event loop is often busy (comparing 100,000 rows, reading logs); a fake sharing it
stamps arrivals late and its quota measurements lie. `FakeApiProcess` runs
`python -m usersyncd.fakeapi` instead and mirrors it: settings are written through at once
(`POST /_fake/config`), scripted faults too (`POST /_fake/script`), and what the fake recorded is
replayed from its append-only journal (`GET /_fake/journal?since=N`) into local copies whenever
one is read. The fake publishes the journal's length in a shared 8-byte file, so a read with
nothing new costs no request; a read after anything the daemon saw sees it (the fake journals an
answer before it sends it).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import http.client
import json
import mmap
import os
import select
import struct
import subprocess
import sys
import tempfile
from typing import Any

from usersyncd.fake import model
from usersyncd.fake.model import RecordedRequest


class _Knob:
    """A runtime setting: read from the local copy, written through to the fake at once."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: FakeApiProcess | None, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return obj._knobs[self.name]

    def __set__(self, obj: FakeApiProcess, value: Any) -> None:
        obj.configure(**{self.name: value})


class _Recorded:
    """Something the fake records: brought up to date from its journal on every read."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: FakeApiProcess | None, owner: type | None = None) -> Any:
        if obj is None:
            return self
        obj._refresh()
        return getattr(obj, "_" + self.name)

    def __set__(self, obj: FakeApiProcess, value: Any) -> None:
        raise AttributeError(f"{self.name} is recorded by the fake API process; it cannot be set")


class FakeApiProcess(model.Recording):
    """`python -m usersyncd.fakeapi` in a child process, with FakeApi's attributes.

    `launch()` starts the process without waiting; `wait_ready()` (or `await start()`) waits
    for its URL. `close()` ends it; it also ends by itself when this process dies (its stdin
    closes). Recorded data stays readable after `close()`.
    """

    api_key = _Knob()
    auth = _Knob()
    limit_requests = _Knob()
    window = _Knob()
    latency = _Knob()
    reject_emails = _Knob()  # a frozenset: assign a new set to change it
    max_body_bytes = _Knob()
    rate_limit_remaining_header = _Knob()
    retry_after_on_429 = _Knob()
    flavour = _Knob()  # "indexed" | "drip"
    account_id = _Knob()  # the drip flavour's account

    requests = _Recorded()  # list[RecordedRequest] in arrival order, updated in place
    state = _Recorded()
    sends = _Recorded()
    violations = _Recorded()
    max_in_window = _Recorded()
    concurrent_conflicts = _Recorded()
    accepted = _Recorded()
    probes = _Recorded()

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
        self.batch_path = batch_path
        self.max_batch = max_batch
        self._knobs: dict[str, Any] = {
            "api_key": api_key,
            "auth": auth,
            "limit_requests": limit_requests,
            "window": window,
            "latency": 0.0,
            "reject_emails": frozenset(),
            "max_body_bytes": max_body_bytes,
            "rate_limit_remaining_header": rate_limit_remaining_header,
            "retry_after_on_429": retry_after_on_429,
            "flavour": flavour,
            "account_id": account_id,
        }
        self._requests: list[RecordedRequest] = []  # what tests see (and may clear)
        self._by_index: list[RecordedRequest] = []  # what the journal's indexes refer to
        self._state: dict[str, dict[str, Any]] = {}
        self._sends: collections.Counter[str] = collections.Counter()
        self._violations = self._max_in_window = self._concurrent_conflicts = self._accepted = 0
        self._probes = 0
        self._received = self._open = 0
        self._statuses: collections.Counter[int] = collections.Counter()
        self._next = 0  # journal events replayed so far
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: http.client.HTTPConnection | None = None
        self._length: mmap.mmap | None = None
        self._length_path: str | None = None
        self._url: str | None = None
        self._closed = False

    def __setattr__(self, name: str, value: Any) -> None:
        """Settings and private state only: anything else would change nothing in the child."""
        if not (name.startswith("_") or name in vars(type(self)) or name in ("batch_path", "max_batch")):
            raise AttributeError(f"{name!r} is not a runtime setting of the fake API (see model.KNOBS)")
        if name in ("batch_path", "max_batch") and name in vars(self):
            raise AttributeError(f"{name} is fixed once the fake API process is made")
        super().__setattr__(name, value)

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:PORT (only once ready)."""
        if self._url is None:
            raise RuntimeError("the fake API process is not ready")
        return self._url

    def launch(self) -> None:
        """Start the process; do not wait for it."""
        if self._proc is not None:
            raise RuntimeError("FakeApiProcess already launched")
        fd, self._length_path = tempfile.mkstemp(prefix="usersyncd-fake-", suffix=".len")
        with os.fdopen(fd, "r+b") as f:
            f.write(bytes(8))
            f.flush()
            self._length = mmap.mmap(f.fileno(), 8, access=mmap.ACCESS_READ)
        k = self._knobs
        args = [
            *("--api-key", k["api_key"], "--auth", k["auth"], "--window", repr(k["window"])),
            *("--batch-path", self.batch_path, "--max-batch", str(self.max_batch)),
            *("--flavour", k["flavour"], "--account-id", k["account_id"]),
            *("--journal-length", self._length_path, "--exit-on-stdin-eof"),
        ]
        if k["limit_requests"] is not None:
            args += ["--requests", str(k["limit_requests"])]
        if k["max_body_bytes"] is not None:
            args += ["--max-body-bytes", str(k["max_body_bytes"])]
        args += ["--retry-after-on-429"] if k["retry_after_on_429"] else []
        args += ["--rate-limit-remaining-header"] if k["rate_limit_remaining_header"] else []
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "usersyncd.fakeapi", *args],
            stdin=subprocess.PIPE,  # never written: its end tells the fake that we are gone
            stdout=subprocess.PIPE,
        )

    def wait_ready(self, timeout: float = 30.0) -> str:
        """Wait for the fake's 'listening on URL' line; returns the URL."""
        if self._url is not None:
            return self._url
        if self._proc is None:
            self.launch()
        assert self._proc is not None and self._proc.stdout is not None
        readable, _, _ = select.select([self._proc.stdout], [], [], timeout)
        line = self._proc.stdout.readline().decode() if readable else ""
        if not line.startswith("listening on "):
            self.close(refresh=False)
            raise RuntimeError(f"the fake API process did not start in {timeout} s: {line!r}")
        self._url = line.split()[-1]
        host, port = self._url.removeprefix("http://").rsplit(":", 1)
        self._conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=60)
        return self._url

    async def start(self, timeout: float = 30.0) -> str:
        """Launch if needed and wait for the URL (in a thread: the loop keeps running)."""
        return await asyncio.to_thread(self.wait_ready, timeout)

    def close(self, refresh: bool = True) -> None:
        """End the process (idempotent); with `refresh`, read what it recorded first."""
        if self._closed or self._proc is None:
            return
        try:
            if refresh and self._url is not None and self._proc.poll() is None:
                self._refresh()
        finally:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
            proc = self._proc
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
            if self._length is not None:
                self._length.close()
            if self._length_path is not None:
                os.unlink(self._length_path)

    async def stop(self) -> None:
        """Read what the fake recorded, then end it."""
        await asyncio.to_thread(self.close)

    async def __aenter__(self) -> FakeApiProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- the FakeApi interface -------------------------------------------------------------

    def configure(self, **knobs: Any) -> None:
        """Change runtime settings in the fake at once (model.KNOBS)."""
        unknown = set(knobs) - set(model.KNOBS)
        if unknown:
            raise AttributeError(f"not a setting of the fake API: {sorted(unknown)}")
        if "reject_emails" in knobs:
            knobs["reject_emails"] = sorted(knobs["reject_emails"])
        applied = self._call("POST", "/_fake/config", knobs)
        if "reject_emails" in applied:
            applied["reject_emails"] = frozenset(applied["reject_emails"])
        self._knobs.update(applied)

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
        wrapped: dict[str, Any] | None
        if isinstance(body, bytes):
            wrapped = {"base64": base64.b64encode(body).decode()}
        elif isinstance(body, str):
            wrapped = {"text": body}
        else:
            wrapped = None if body is None else {"json": body}
        spec = {"status": status, "times": times, "headers": headers, "body": wrapped, "delay": delay}
        self._call("POST", "/_fake/script", spec)

    # ---- the journal -----------------------------------------------------------------------

    def _refresh(self) -> None:
        """Replay the fake's journal from where we are, if it grew."""
        if self._closed or self._url is None or self._length is None:
            return
        if struct.unpack_from("<Q", self._length)[0] <= self._next:
            return
        while True:
            page = self._call("GET", f"/_fake/journal?since={self._next}")
            for event in page["events"]:
                self._replay(event)
            self._next = page["next"]
            if not page["more"]:
                return

    def _replay(self, event: dict[str, Any]) -> None:
        kind = event["k"]
        if kind == "arrive":
            rec = RecordedRequest(
                event["arrived"],
                event["wall"],
                0,
                event["headers"],
                [],
                [],
                0,
                event["request_id"],
                path=event.get("path", ""),
            )
            self._requests.append(rec)
            self._by_index.append(rec)
            self._open += 1
            self._violations += event["violation"]
            self._max_in_window = max(self._max_in_window, event["in_window"])
            return
        if kind == "probe":
            self._probes += 1
            return
        rec = self._by_index[event["i"]]
        if kind == "body":
            rec.body_bytes, rec.subscribers = event["body_bytes"], event["subscribers"]
            rec.emails = model.emails_of(rec.subscribers)
        elif kind == "apply" and event.get("op") == "unsubscribes":
            model.apply_unsubscribes(self._state, rec.emails)
            self._accepted += 1
        elif kind == "apply" and event.get("op") == "subscribers":
            model.apply_drip(self._state, rec.subscribers, self._sends)
            self._received += len(rec.subscribers)
            self._accepted += 1
        elif kind == "apply":
            for sub in rec.subscribers:
                self._state[sub["email"]] = dict(sub)
                self._sends[sub["email"]] += 1
            self._received += len(rec.subscribers)
            self._accepted += 1
        elif kind == "conflict":
            self._concurrent_conflicts += 1
        elif kind == "end":
            rec.status, rec.ended = event["status"], event["ended"]
            self._statuses[rec.status] += 1
            self._open -= 1

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        """One request to the fake's own endpoints; a 400 is a ValueError."""
        if self._conn is None or self._closed:
            raise RuntimeError("the fake API process is not running")
        body = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        for attempt in (1, 2):
            try:
                self._conn.request(method, path, body=body, headers=headers)
                resp = self._conn.getresponse()
                data = resp.read()
                break
            except (http.client.HTTPException, OSError) as exc:
                self._conn.close()  # a kept-alive connection the fake closed: reconnect once
                exited = self._proc.poll() if self._proc is not None else None
                if attempt == 2 or exited is not None:
                    raise RuntimeError(f"the fake API process is gone (exit {exited}): {exc}") from exc
        if resp.status == 400:
            raise ValueError(json.loads(data)["error"])
        if resp.status != 200:
            raise RuntimeError(f"fake API {method} {path}: HTTP {resp.status} {data[:200]!r}")
        return json.loads(data)
