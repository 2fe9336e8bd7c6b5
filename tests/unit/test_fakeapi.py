"""The fake subscriber API (usersyncd.fakeapi) behaves like the real one, as SPEC §2 describes."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from usersyncd.fakeapi import FakeApi, FakeApiProcess, RecordedRequest

PATH = "/subscribers/batches"
AUTH = {"Authorization": "Bearer test-key"}
REPO = Path(__file__).resolve().parents[2]


def batch(*emails: str, **fields: Any) -> dict[str, Any]:
    """A one-batch request body for these emails."""
    return {"batches": [{"subscribers": [{"email": e, **fields} for e in emails]}]}


@pytest.fixture
async def fake() -> AsyncIterator[FakeApi]:
    async with FakeApi() as api:
        yield api


@pytest.fixture
async def client(fake: FakeApi) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fake.url, headers=AUTH) as c:
        yield c


async def test_accepts_batch_applies_state_and_counts_sends(fake: FakeApi, client: httpx.AsyncClient) -> None:
    """A valid batch gets 202 {}, lands in state (last write wins) and bumps sends."""
    r = await client.post(PATH, json=batch("a@x.io", "b@x.io", name="Ann"))
    assert (r.status_code, r.json()) == (202, {})
    r = await client.post(PATH, json=batch("a@x.io", name="Bob"))
    assert r.status_code == 202
    assert fake.state == {
        "a@x.io": {"email": "a@x.io", "name": "Bob"},
        "b@x.io": {"email": "b@x.io", "name": "Ann"},
    }
    assert fake.sends == {"a@x.io": 2, "b@x.io": 1}
    st = fake.stats()
    assert (st["requests"], st["accepted"], st["users_received"], st["distinct_users"]) == (
        2,
        2,
        3,
        2,
    )
    assert st["statuses"] == {202: 2} and st["in_flight"] == 0
    assert [r.emails for r in fake.requests] == [["a@x.io", "b@x.io"], ["a@x.io"]]


@pytest.mark.parametrize(
    ("auth", "good", "bad"),
    [
        ("bearer", {"Authorization": "Bearer K"}, {"Authorization": "Bearer nope"}),
        ("basic", httpx.BasicAuth("K", ""), httpx.BasicAuth("K", "pw")),
        ("header:X-Api-Key", {"X-Api-Key": "K"}, {"X-Api-Key": "k"}),
    ],
)
async def test_auth_modes_accept_right_and_reject_wrong_or_missing(auth: str, good: Any, bad: Any) -> None:
    """Each auth mode accepts its own credential and answers 401 to a wrong or missing one."""
    async with FakeApi(api_key="K", auth=auth) as api, httpx.AsyncClient(base_url=api.url) as c:

        async def post(cred: Any) -> httpx.Response:
            if isinstance(cred, httpx.BasicAuth):
                return await c.post(PATH, json=batch("a@x.io"), auth=cred)
            return await c.post(PATH, json=batch("a@x.io"), headers=cred)

        assert (await post(good)).status_code == 202
        wrong, missing = await post(bad), await post({})
        for r in (wrong, missing):
            assert r.status_code == 401
            assert r.json() == {"errors": [{"code": "authentication_failed"}]}
        assert api.sends == {"a@x.io": 1}


async def test_api_key_can_be_revoked_and_restored_at_runtime(
    fake: FakeApi, client: httpx.AsyncClient
) -> None:
    """Changing api_key makes the old key fail with 401 until it is restored."""
    fake.api_key = "rotated"
    assert (await client.post(PATH, json=batch("a@x.io"))).status_code == 401
    fake.api_key = "test-key"
    assert (await client.post(PATH, json=batch("a@x.io"))).status_code == 202


async def test_rolling_window_counts_violations_by_arrival() -> None:
    """With limit 3 per 0.5 s, the 4th quick request is a 429 violation; later ones pass."""
    async with (
        FakeApi(limit_requests=3, window=0.5) as api,
        httpx.AsyncClient(base_url=api.url, headers=AUTH) as c,
    ):
        codes = [(await c.post(PATH, json=batch(f"u{i}@x.io"))).status_code for i in range(3)]
        over = await c.post(PATH, json=batch("u3@x.io"))
        assert codes == [202, 202, 202] and over.status_code == 429
        assert "Retry-After" not in over.headers
        assert (api.violations, api.max_in_window) == (1, 4)
        assert "u3@x.io" not in api.state
        await asyncio.sleep(0.55)  # every earlier arrival has left the window
        assert (await c.post(PATH, json=batch("u3@x.io"))).status_code == 202
        assert api.violations == 1 and api.state["u3@x.io"] == {"email": "u3@x.io"}
        assert api.max_arrivals_in_any_window() == 4
        assert api.max_arrivals_in_any_window(0.5) == 4
        assert api.max_arrivals_in_any_window(1e-9) == 1


async def test_max_arrivals_in_any_window_uses_the_sliding_rule(fake: FakeApi) -> None:
    """The recomputation slides over sorted arrivals; an arrival exactly `window` later is out."""
    for t in (10.0, 10.5, 11.0, 11.2, 12.0, 0.0):  # deliberately unsorted
        fake.requests.append(RecordedRequest(t, 0.0, 202, {}, [], [], 0, None))
    assert fake.max_arrivals_in_any_window(1.0) == 3  # 10.5, 11.0, 11.2
    assert fake.max_arrivals_in_any_window(2.0) == 4  # 10.0 .. 11.2 (12.0 is exactly 2 later)
    assert fake.max_arrivals_in_any_window(100.0) == 6


async def test_429_retry_after_and_rate_limit_remaining_headers() -> None:
    """Opt-in headers: X-RateLimit-Remaining on 2xx, Retry-After: <window> on 429."""
    api = FakeApi(limit_requests=2, window=60, retry_after_on_429=True)
    api.rate_limit_remaining_header = True
    async with (
        api,
        httpx.AsyncClient(base_url=api.url, headers=AUTH) as c,
    ):
        r1 = await c.post(PATH, json=batch("a@x.io"))
        r2 = await c.post(PATH, json=batch("b@x.io"))
        r3 = await c.post(PATH, json=batch("c@x.io"))
    assert r1.headers["X-RateLimit-Remaining"] == "1"
    assert r2.headers["X-RateLimit-Remaining"] == "0"
    assert r3.status_code == 429 and r3.headers["Retry-After"] == "60"
    assert "X-RateLimit-Remaining" not in r3.headers


async def test_script_answers_fifo_with_headers_body_and_times(
    fake: FakeApi, client: httpx.AsyncClient
) -> None:
    """Scripted faults are answered in FIFO order, `times` each, before auth, and still count."""
    fake.script(500, times=2, body="<html>oops</html>")
    fake.script(429, headers={"Retry-After": "7", "X-Request-Id": "theirs"}, body={"e": 1})
    fake.script(503, delay=0.2)
    fake.api_key = "wrong"  # scripted answers come before the auth check
    answers = [await client.post(PATH, json=batch("a@x.io")) for _ in range(2)]
    assert [(r.status_code, r.text) for r in answers] == [(500, "<html>oops</html>")] * 2
    r = await client.post(PATH, json=batch("a@x.io"))
    assert (r.status_code, r.json(), r.headers["Retry-After"]) == (429, {"e": 1}, "7")
    assert r.headers["X-Request-Id"] == "theirs"
    t0 = time.monotonic()
    r = await client.post(PATH, json=batch("a@x.io"))
    assert r.status_code == 503 and time.monotonic() - t0 >= 0.2
    assert r.json()["errors"][0]["code"] == "scripted"
    fake.api_key = "test-key"
    assert (await client.post(PATH, json=batch("a@x.io"))).status_code == 202
    assert fake.stats()["statuses"] == {202: 1, 429: 1, 500: 2, 503: 1}
    assert fake.max_in_window == 5 and fake.sends == {"a@x.io": 1}


async def test_body_larger_than_max_body_bytes_is_413() -> None:
    """A body over max_body_bytes gets 413 and nothing is applied."""
    async with (
        FakeApi(max_body_bytes=200) as api,
        httpx.AsyncClient(base_url=api.url, headers=AUTH) as c,
    ):
        big = await c.post(PATH, json=batch(*(f"user{i}@example.com" for i in range(20))))
        small = await c.post(PATH, json=batch("a@x.io"))
    assert (big.status_code, small.status_code) == (413, 202)
    assert api.requests[0].body_bytes > 200 and list(api.state) == ["a@x.io"]


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        json.dumps({"batches": []}).encode(),
        json.dumps({"batches": [batch("a@x.io")["batches"][0]] * 2}).encode(),
        json.dumps(batch()).encode(),
        json.dumps(batch("a@x.io", "b@x.io", "c@x.io")).encode(),  # max_batch is 2 here
        json.dumps({"batches": [{"subscribers": [{"name": "no email"}]}]}).encode(),
        json.dumps({"batches": [{"subscribers": [{"email": 42}]}]}).encode(),
        json.dumps({"batches": [{"subscribers": ["a@x.io"]}]}).encode(),
    ],
    ids=[
        "not-json",
        "no-batch",
        "two-batches",
        "empty",
        "over-max",
        "no-email",
        "int-email",
        "str-record",
    ],
)
async def test_invalid_batch_is_422(content: bytes) -> None:
    """Malformed bodies get 422 invalid_batch with a message, and nothing is applied."""
    async with FakeApi(max_batch=2) as api, httpx.AsyncClient(base_url=api.url, headers=AUTH) as c:
        r = await c.post(PATH, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    err = r.json()["errors"][0]
    assert err["code"] == "invalid_batch" and err["message"]
    assert api.state == {} and api.accepted == 0


async def test_reject_emails_names_each_offending_index(fake: FakeApi, client: httpx.AsyncClient) -> None:
    """Emails in reject_emails give 422 naming index and email; nothing of that request lands."""
    fake.reject_emails = {"bad@x.io", "worse@x.io"}
    r = await client.post(PATH, json=batch("ok@x.io", "bad@x.io", "ok2@x.io", "worse@x.io"))
    assert r.status_code == 422
    assert r.json() == {
        "errors": [
            {"code": "validation_failed", "index": 1, "email": "bad@x.io"},
            {"code": "validation_failed", "index": 3, "email": "worse@x.io"},
        ]
    }
    assert fake.state == {}


async def test_concurrent_update_of_one_subscriber_is_409(fake: FakeApi, client: httpx.AsyncClient) -> None:
    """While a request holding a@ is in flight (latency), another one with a@ gets 409."""
    fake.latency = 2.0  # the clash must arrive while it is open, on a busy machine too
    first = asyncio.create_task(client.post(PATH, json=batch("a@x.io", name="first")))
    await fake.wait_for(lambda f: f.stats()["in_flight"] == 1, timeout=2)
    clash = await client.post(PATH, json=batch("c@x.io", "a@x.io"))
    other = await client.post(PATH, json=batch("d@x.io"))
    assert clash.status_code == 409
    assert clash.json() == {"errors": [{"code": "concurrent_update", "email": "a@x.io"}]}
    assert (await first).status_code == 202 and other.status_code == 202
    assert fake.concurrent_conflicts == 1
    assert set(fake.state) == {"a@x.io", "d@x.io"}
    fake.latency = 0
    assert (await client.post(PATH, json=batch("a@x.io"))).status_code == 202


async def test_request_ids_returned_and_clients_recorded(fake: FakeApi, client: httpx.AsyncClient) -> None:
    """Every answer has the fake's own X-Request-Id; the client's id and headers are recorded."""
    wall = time.time()
    ok = await client.post(PATH, json=batch("a@x.io"), headers={"X-Request-Id": "cli-1"})
    bad = await client.post(PATH, content=b"{", headers={"User-Agent": "usersyncd/0.1.0"})
    assert (ok.headers["X-Request-Id"], bad.headers["X-Request-Id"]) == ("fake-1", "fake-2")
    first, second = fake.requests
    assert (first.request_id, second.request_id) == ("cli-1", None)
    assert (first.status, second.status) == (202, 422)
    assert first.headers["authorization"] == "Bearer test-key"
    assert second.headers["user-agent"] == "usersyncd/0.1.0" and second.body_bytes == 1
    assert first.arrived <= second.arrived and abs(first.wall - wall) < 5
    assert first.subscribers == [{"email": "a@x.io"}]


async def test_http_stats_and_state_endpoints(fake: FakeApi, client: httpx.AsyncClient) -> None:
    """GET /_fake/stats and /_fake/state expose the same data over HTTP, without counting."""
    await client.post(PATH, json=batch("a@x.io", name="Ann"))
    stats = (await client.get("/_fake/stats")).json()
    state = (await client.get("/_fake/state")).json()
    assert stats == json.loads(json.dumps(fake.stats()))
    assert stats["requests"] == 1 and stats["statuses"] == {"202": 1}
    assert state == {
        "state": {"a@x.io": {"email": "a@x.io", "name": "Ann"}},
        "sends": {"a@x.io": 1},
    }
    assert len(fake.requests) == 1


async def test_wait_for_returns_or_times_out_with_stats(fake: FakeApi) -> None:
    """wait_for returns once the predicate holds and raises TimeoutError naming the stats."""
    await fake.wait_for(lambda f: f.stats()["requests"] == 0, timeout=0.1)
    with pytest.raises(TimeoutError, match="'requests': 0"):
        await fake.wait_for(lambda f: f.stats()["requests"] > 0, timeout=0.05)


async def test_constructor_rejects_unknown_auth_and_url_needs_start() -> None:
    """A bad auth mode is a ValueError; url before start is a RuntimeError."""
    with pytest.raises(ValueError, match="auth"):
        FakeApi(auth="digest")
    with pytest.raises(RuntimeError):
        _ = FakeApi().url


async def test_runs_as_separate_process_until_sigterm() -> None:
    """`python -m usersyncd.fakeapi` prints its URL once, serves, and exits 0 on SIGTERM."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "usersyncd.fakeapi", "--port", "0", "--requests", "10", "--window", "2"),
        *("--api-key", "K"),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        assert line.startswith("listening on http://127.0.0.1:")
        url = line.split()[-1]
        async with httpx.AsyncClient(base_url=url) as c:
            r = await c.post(PATH, json=batch("a@x.io"), headers={"Authorization": "Bearer K"})
            stats = (await c.get("/_fake/stats")).json()
        assert r.status_code == 202 and stats["accepted"] == 1
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert await proc.stdout.read() == b""  # exactly one line was printed
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# ---- FakeApiProcess: the fake in a child process, with FakeApi's attributes -------------------


@pytest.fixture
async def remote() -> AsyncIterator[FakeApiProcess]:
    async with FakeApiProcess(limit_requests=3, window=60) as api:
        yield api


async def test_process_mirrors_requests_state_and_counters(remote: FakeApiProcess) -> None:
    """What the child recorded reads like FakeApi's attributes, in arrival order, up to date."""
    async with httpx.AsyncClient(base_url=remote.url, headers=AUTH) as c:
        ok = await c.post(PATH, json=batch("a@x.io", "b@x.io", name="Ann"), headers={"X-Request-Id": "r1"})
        assert ok.status_code == 202
        assert remote.state == {
            "a@x.io": {"email": "a@x.io", "name": "Ann"},
            "b@x.io": {"email": "b@x.io", "name": "Ann"},
        }  # read right after the answer: already there
        await c.post(PATH, content=b"{")
        await c.post(PATH, json=batch("a@x.io", name="Bob"))
        over = await c.post(PATH, json=batch("c@x.io"))
    assert over.status_code == 429
    first, bad, third, fourth = remote.requests
    assert (first.request_id, first.emails, first.status) == ("r1", ["a@x.io", "b@x.io"], 202)
    assert first.headers["authorization"] == "Bearer test-key" and first.body_bytes > 0
    assert first.arrived <= first.ended <= bad.arrived <= third.arrived <= fourth.arrived  # type: ignore[operator]
    assert abs(first.wall - time.time()) < 30 and bad.status == 422 and bad.subscribers == []
    assert remote.sends == {"a@x.io": 2, "b@x.io": 1} and remote.state["a@x.io"]["name"] == "Bob"
    assert (remote.accepted, remote.violations, remote.max_in_window) == (2, 1, 4)
    assert remote.stats() == {
        "requests": 4,
        "accepted": 2,
        "violations": 1,
        "max_in_window": 4,
        "concurrent_conflicts": 0,
        "statuses": {202: 2, 422: 1, 429: 1},
        "users_received": 3,
        "distinct_users": 2,
        "in_flight": 0,
    }
    assert remote.max_arrivals_in_any_window() == 4 and remote.max_arrivals_in_any_window(1e-9) == 1
    with pytest.raises(AttributeError):
        remote.state = {}  # recorded by the child: read-only here
    with pytest.raises(AttributeError, match="not a runtime setting"):
        remote.max_in_windw = 3  # type: ignore[attr-defined]
    remote.requests.clear()  # a test may forget what came so far
    async with httpx.AsyncClient(base_url=remote.url, headers=AUTH) as c:
        await c.post(PATH, json=batch("d@x.io"))
    assert [r.emails for r in remote.requests] == [["d@x.io"]] and remote.requests[0].status == 429


async def test_process_settings_are_written_through(remote: FakeApiProcess) -> None:
    """Each setting a test changes takes effect in the child before the next line runs."""
    async with httpx.AsyncClient(base_url=remote.url, headers=AUTH) as c:
        remote.limit_requests, remote.api_key = None, "rotated"
        assert (await c.post(PATH, json=batch("a@x.io"))).status_code == 401
        remote.api_key = "test-key"
        remote.reject_emails = {"bad@x.io"}
        r = await c.post(PATH, json=batch("ok@x.io", "bad@x.io"))
        assert r.json() == {"errors": [{"code": "validation_failed", "index": 1, "email": "bad@x.io"}]}
        assert {"ok@x.io", "bad@x.io"} - remote.reject_emails == {"ok@x.io"}
        remote.reject_emails = set()
        remote.max_body_bytes = 50
        assert (await c.post(PATH, json=batch("long-address@example.com"))).status_code == 413
        remote.max_body_bytes = None
        remote.limit_requests, remote.window, remote.retry_after_on_429 = 1, 30, True
        remote.rate_limit_remaining_header = True
        r = await c.post(PATH, json=batch("ok@x.io"))
        assert r.status_code == 429 and r.headers["Retry-After"] == "30"
        remote.window = 1e-6  # every earlier arrival leaves the window
        r = await c.post(PATH, json=batch("ok@x.io"))
        assert (r.status_code, r.headers["X-RateLimit-Remaining"]) == (202, "0")
        remote.auth = "header:X-Api-Key"
        assert (await c.post(PATH, json=batch("ok@x.io"))).status_code == 401
    assert (remote.window, remote.auth, remote.max_body_bytes) == (1e-6, "header:X-Api-Key", None)
    with pytest.raises(ValueError, match="window"):
        remote.window = 0
    with pytest.raises(ValueError, match="auth"):
        remote.auth = "digest"
    assert (remote.window, remote.auth) == (1e-6, "header:X-Api-Key")  # a refused value changes nothing


async def test_process_script_latency_conflicts_and_wait_for(remote: FakeApiProcess) -> None:
    """Scripted faults (bytes, text, JSON, delay), latency and 409s work across the process."""
    remote.limit_requests = None
    remote.script(500, times=2, body=b"\x00raw")
    remote.script(429, headers={"Retry-After": "7"}, body={"e": 1})
    remote.script(503, body="<html>", delay=0.2)
    with pytest.raises(ValueError, match="status"):
        remote.script(99)
    async with httpx.AsyncClient(base_url=remote.url, headers=AUTH) as c:
        answers = [await c.post(PATH, json=batch("a@x.io")) for _ in range(4)]
        assert [(r.status_code, r.content) for r in answers] == [
            (500, b"\x00raw"),
            (500, b"\x00raw"),
            (429, b'{"e": 1}'),
            (503, b"<html>"),
        ]
        slow = remote.requests[3]
        assert slow.ended is not None and slow.ended - slow.arrived >= 0.2
        remote.latency = 2.0  # the clash must arrive while it is open, on a busy machine too
        first = asyncio.create_task(c.post(PATH, json=batch("a@x.io")))
        await remote.wait_for(lambda api: api.stats()["in_flight"] == 1, timeout=5)
        assert remote.requests[-1].status == 0 and remote.requests[-1].ended is None
        clash = await c.post(PATH, json=batch("a@x.io"))
        assert clash.status_code == 409 and (await first).status_code == 202
    assert remote.concurrent_conflicts == 1 and remote.requests[4].status == 202
    with pytest.raises(TimeoutError, match="'requests': 6"):
        await remote.wait_for(lambda api: len(api.requests) > 6, timeout=0.1)


async def test_process_journal_comes_in_bounded_chunks(remote: FakeApiProcess) -> None:
    """Many big requests are replayed completely, a chunk at a time."""
    remote.limit_requests = None
    async with httpx.AsyncClient(base_url=remote.url, headers=AUTH) as c:
        for n in range(12):
            await c.post(PATH, json=batch(*(f"u{n}-{i}@x.io" for i in range(1000))))
        page = (await c.get("/_fake/journal", params={"since": 0})).json()
    assert page["more"] and 0 < page["next"] < 12 * 4
    assert len(remote.state) == 12_000 and remote.accepted == 12
    assert [len(r.subscribers) for r in remote.requests] == [1000] * 12


async def test_process_data_stays_readable_after_stop_and_it_is_gone() -> None:
    """stop() reads everything first; the child has exited (no process is left behind)."""
    api = FakeApiProcess()
    await api.start()
    async with httpx.AsyncClient(base_url=api.url, headers=AUTH) as c:
        await c.post(PATH, json=batch("a@x.io"))
    await api.stop()
    assert api.state == {"a@x.io": {"email": "a@x.io"}} and len(api.requests) == 1
    assert api._proc is not None and api._proc.returncode is not None


def test_process_ends_when_its_parent_dies(tmp_path: Path) -> None:
    """A parent killed with SIGKILL (no teardown) leaves no fake API process behind."""
    code = (
        "import os, sys\n"
        "from usersyncd.fakeapi import FakeApiProcess\n"
        "api = FakeApiProcess(); api.wait_ready()\n"
        "print(api._proc.pid, flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    parent = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert parent.returncode == -signal.SIGKILL, parent.stderr
    child = int(parent.stdout.split()[0])
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False
