"""api.py: response classification and one request against a mocked API."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import respx
from hypothesis import given, settings
from hypothesis import strategies as st
from loguru import logger
from pydantic import SecretStr

import usersyncd
from usersyncd import api, config, errors

URL = "https://api.test"
PATH = "/subscribers/batches"
NOW = 1_700_000_000.0
SUBSCRIBERS = [{"email": "a@example.com", "name": "Ann"}, {"email": "b@example.com"}]
K = api.OutcomeKind


def api_config(**overrides: Any) -> config.ApiConfig:
    values: dict[str, Any] = {"url": URL, "key": SecretStr("k"), "auth": "bearer"} | overrides
    return config.ApiConfig(**values)


@pytest.fixture
async def client() -> AsyncIterator[api.ExternalUserApi]:
    async with api.ExternalUserApi(api_config()) as instance:
        yield instance


@pytest.fixture
def logs() -> Iterator[list[str]]:
    """Every loguru record emitted during the test, serialized with its extra fields."""
    lines: list[str] = []
    sink = logger.add(lines.append, level="TRACE", serialize=True)
    yield lines
    logger.remove(sink)


def records_of(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line)["record"] for line in lines]


# --- classify -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (200, K.OK),
        (201, K.OK),
        (202, K.OK),
        (204, K.OK),
        (429, K.RATE_LIMITED),
        (500, K.TRANSIENT),
        (502, K.TRANSIENT),
        (503, K.TRANSIENT),
        (504, K.TRANSIENT),
        (599, K.TRANSIENT),
        (None, K.TRANSIENT),
        (400, K.REJECTED),
        (404, K.NOT_FOUND),
        (409, K.REJECTED),
        (422, K.REJECTED),
        (410, K.REJECTED),
        (418, K.REJECTED),
        (408, K.TRANSIENT),
        (413, K.TOO_LARGE),
        (401, K.UNAUTHORIZED),
        (403, K.UNAUTHORIZED),
        (100, K.TRANSIENT),
        (301, K.TRANSIENT),
        (304, K.TRANSIENT),
    ],
)
def test_classify_follows_the_spec_table(status: int | None, kind: api.OutcomeKind) -> None:
    """Each status of SPEC §2's table maps to its outcome kind."""
    assert api.classify(status, {}, b"", now=NOW)[0] is kind


def test_classify_treats_5xx_garbage_as_transient() -> None:
    """A 5xx with an HTML or binary body is still transient, with no indices."""
    result = api.classify(502, {"Content-Type": "text/html"}, b"<html>\xff\xfe oops", now=NOW)
    assert result == (K.TRANSIENT, None, None, ())


@pytest.mark.parametrize("status", [429, 503, 500])
def test_classify_reads_retry_after_seconds(status: int) -> None:
    """Retry-After as delta-seconds is the wait, for 429 and 5xx."""
    assert api.classify(status, {"Retry-After": "120"}, b"", now=NOW)[1] == 120.0


def test_classify_reads_retry_after_http_date() -> None:
    """Retry-After as an HTTP date is the time left until it."""
    date = email.utils.formatdate(NOW + 90, usegmt=True)
    assert api.classify(429, {"Retry-After": date}, b"", now=NOW)[1] == 90.0


def test_classify_clamps_a_past_retry_after_date_to_zero() -> None:
    """A date already passed means no wait, never a negative one."""
    date = email.utils.formatdate(NOW - 30, usegmt=True)
    assert api.classify(503, {"Retry-After": date}, b"", now=NOW)[1] == 0.0


def test_classify_reads_x_ratelimit_reset_as_epoch() -> None:
    """X-RateLimit-Reset above 10^9 is a Unix time: the wait is the time left until it."""
    headers = {"X-RateLimit-Reset": str(int(NOW + 300))}
    assert api.classify(429, headers, b"", now=NOW)[1] == 300.0


def test_classify_reads_x_ratelimit_reset_as_epoch_milliseconds() -> None:
    """X-RateLimit-Reset above 10^12 is a Unix time in milliseconds."""
    headers = {"X-RateLimit-Reset": str(int((NOW + 45) * 1000))}
    assert api.classify(429, headers, b"", now=NOW)[1] == 45.0


def test_classify_reads_x_ratelimit_reset_as_delta() -> None:
    """A small X-RateLimit-Reset is a delay in seconds."""
    assert api.classify(429, {"X-RateLimit-Reset": "60"}, b"", now=NOW)[1] == 60.0


def test_classify_prefers_retry_after_to_reset() -> None:
    """Retry-After wins over X-RateLimit-Reset when both are present."""
    headers = {"Retry-After": "5", "X-RateLimit-Reset": "60"}
    assert api.classify(429, headers, b"", now=NOW)[1] == 5.0


@pytest.mark.parametrize("value", ["soon", "-5", "nan", "inf", ""])
def test_classify_falls_back_to_reset_when_retry_after_is_garbage(value: str) -> None:
    """An unreadable Retry-After is ignored in favour of X-RateLimit-Reset."""
    headers = {"Retry-After": value, "X-RateLimit-Reset": "60"}
    assert api.classify(429, headers, b"", now=NOW)[1] == 60.0


def test_classify_has_no_retry_after_without_headers_or_outside_429_5xx() -> None:
    """No header means no wait; a Retry-After on a 2xx, 4xx or timeout is ignored."""
    assert api.classify(429, {}, b"", now=NOW)[1] is None
    for status in (200, 400, 401, 413, None):
        assert api.classify(status, {"Retry-After": "9"}, b"", now=NOW)[1] is None


def test_classify_reads_headers_case_insensitively() -> None:
    """Header names match whatever their case."""
    headers = {"retry-after": "7", "x-ratelimit-remaining": "3"}
    assert api.classify(429, headers, b"", now=NOW)[1:3] == (7.0, 3)


@pytest.mark.parametrize(
    ("value", "expected"), [("7", 7), (" 0 ", 0), ("abc", None), ("-1", None), ("1.5", None)]
)
def test_classify_reads_x_ratelimit_remaining(value: str, expected: int | None) -> None:
    """X-RateLimit-Remaining is read on any response when it is a non-negative integer."""
    assert api.classify(201, {"X-RateLimit-Remaining": value}, b"", now=NOW)[2] == expected


def test_classify_reads_rejected_indices() -> None:
    """Integer indices in {"errors": [...]} come back de-duplicated and sorted."""
    body = json.dumps(
        {
            "errors": [
                {"index": 3, "message": "bad email"},
                {"index": 1},
                {"index": 3},
                {"index": "2"},
                {"index": True},
                {"index": 1.5},
                {"index": -1},
                {"message": "no index"},
                "not an object",
            ]
        }
    ).encode()
    assert api.classify(422, {}, body, now=NOW) == (K.REJECTED, None, None, (1, 3))


@pytest.mark.parametrize(
    "body", [b"", b"<html>Bad Request</html>", b"[1, 2]", b'{"errors": "nope"}', b"\xff\xfe"]
)
def test_classify_names_no_records_for_other_bodies(body: bytes) -> None:
    """A body that is not {"errors": [{"index": ...}]} rejects the whole batch."""
    assert api.classify(400, {}, body, now=NOW) == (K.REJECTED, None, None, ())


def test_classify_reads_indices_only_for_rejections() -> None:
    """The same errors body on a 5xx names no records."""
    body = b'{"errors": [{"index": 0}]}'
    assert api.classify(500, {}, body, now=NOW)[3] == ()


@settings(max_examples=200, deadline=None)
@given(
    status=st.one_of(st.none(), st.integers(100, 599)),
    headers=st.dictionaries(
        st.sampled_from(["Retry-After", "X-RateLimit-Reset", "X-RateLimit-Remaining", "X"]),
        st.text(max_size=40),
    ),
    body=st.binary(max_size=200),
)
def test_classify_never_raises_and_never_waits_negatively(
    status: int | None, headers: dict[str, str], body: bytes
) -> None:
    """Any status, headers and body classify without error; waits and counts are >= 0."""
    kind, retry_after, remaining, indices = api.classify(status, headers, body, now=NOW)
    assert kind in set(api.OutcomeKind)
    assert retry_after is None or retry_after >= 0
    assert remaining is None or remaining >= 0
    assert list(indices) == sorted(set(indices))


# --- ExternalUserApi.send -------------------------------------------------------------------


async def test_send_posts_the_batch_envelope(
    client: api.ExternalUserApi, respx_mock: respx.MockRouter
) -> None:
    """The subscribers go in {"batches": [{"subscribers": [...]}]} as JSON; 201 is OK."""
    route = respx_mock.post(URL + PATH).respond(201, headers={"X-Request-Id": "srv-1"})
    outcome = await client.send(SUBSCRIBERS, batch_id=4, attempt=1)
    request = route.calls.last.request
    assert json.loads(request.content) == {"batches": [{"subscribers": SUBSCRIBERS}]}
    assert request.headers["Content-Type"] == "application/json"
    assert outcome.kind is K.OK and outcome.status == 201
    assert outcome.error is None and outcome.body_excerpt is None
    assert outcome.response_request_id == "srv-1"
    assert outcome.duration_ms >= 0


async def test_send_identifies_itself_with_a_new_request_id_each_time(
    client: api.ExternalUserApi, respx_mock: respx.MockRouter
) -> None:
    """Each call sends User-Agent usersyncd/VERSION and a fresh X-Request-Id it reports back."""
    route = respx_mock.post(URL + PATH).respond(202)
    first = await client.send(SUBSCRIBERS)
    second = await client.send(SUBSCRIBERS)
    sent = [call.request.headers for call in route.calls]
    assert [headers["User-Agent"] for headers in sent] == [f"usersyncd/{usersyncd.__version__}"] * 2
    assert [headers["X-Request-Id"] for headers in sent] == [first.request_id, second.request_id]
    assert first.request_id != second.request_id and len(first.request_id) == 32


@pytest.mark.parametrize(
    ("auth", "header", "value"),
    [
        ("bearer", "Authorization", "Bearer k"),
        ("basic", "Authorization", "Basic " + base64.b64encode(b"k:").decode()),
        ("header:X-Api-Key", "X-Api-Key", "k"),
    ],
)
async def test_send_authenticates_as_configured(
    auth: str, header: str, value: str, respx_mock: respx.MockRouter
) -> None:
    """Each auth mode puts the key in its header on the wire, and only there."""
    route = respx_mock.post(URL + PATH).respond(201)
    async with api.ExternalUserApi(api_config(auth=auth)) as instance:
        await instance.send(SUBSCRIBERS)
    headers = route.calls.last.request.headers
    assert headers[header] == value
    if header != "Authorization":
        assert "Authorization" not in headers


def test_missing_key_is_a_config_error() -> None:
    """Without a key the client refuses to start, naming api.key."""
    with pytest.raises(errors.ConfigError, match=r"api\.key"):
        api.ExternalUserApi(api_config(key=SecretStr("")))


async def test_send_reports_a_timeout_as_transient(
    client: api.ExternalUserApi, respx_mock: respx.MockRouter
) -> None:
    """A read timeout is TRANSIENT with no status and a one-line cause."""
    respx_mock.post(URL + PATH).mock(side_effect=httpx.ReadTimeout("timed out"))
    outcome = await client.send(SUBSCRIBERS)
    assert (outcome.kind, outcome.status) == (K.TRANSIENT, None)
    assert outcome.error == "timeout after 30.0 s"


async def test_send_bounds_the_whole_request_by_the_timeout() -> None:
    """A server that never answers is cut off at api.timeout as TRANSIENT, status None."""

    async def stall(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(201)

    transport = httpx.MockTransport(stall)
    async with api.ExternalUserApi(api_config(timeout=0.05), transport=transport) as instance:
        outcome = await instance.send(SUBSCRIBERS)
    assert (outcome.kind, outcome.status) == (K.TRANSIENT, None)
    assert outcome.error is not None and outcome.error.startswith("timeout after 0.05 s")
    assert outcome.duration_ms < 2000


async def test_send_reports_a_connection_error_as_transient(
    client: api.ExternalUserApi, respx_mock: respx.MockRouter
) -> None:
    """A refused connection is TRANSIENT with no status, and says so."""
    respx_mock.post(URL + PATH).mock(side_effect=httpx.ConnectError("Connection refused"))
    outcome = await client.send(SUBSCRIBERS)
    assert (outcome.kind, outcome.status) == (K.TRANSIENT, None)
    assert outcome.error == "connection error: Connection refused"


async def test_send_reports_rate_limit_headers(
    client: api.ExternalUserApi, respx_mock: respx.MockRouter
) -> None:
    """A 429 carries its Retry-After and X-RateLimit-Remaining into the outcome."""
    respx_mock.post(URL + PATH).respond(
        429, headers={"Retry-After": "3600", "X-RateLimit-Remaining": "0"}, text="slow down"
    )
    outcome = await client.send(SUBSCRIBERS)
    assert outcome.kind is K.RATE_LIMITED
    assert (outcome.retry_after, outcome.rate_limit_remaining) == (3600.0, 0)
    assert (outcome.error, outcome.body_excerpt) == ("HTTP 429", "slow down")


@pytest.mark.parametrize("header", ["X-Request-Id", "X-Amzn-RequestId", "Request-Id"])
async def test_send_reports_the_api_request_id(
    header: str, client: api.ExternalUserApi, respx_mock: respx.MockRouter
) -> None:
    """The API's own request id is read from any of the usual headers."""
    respx_mock.post(URL + PATH).respond(500, headers={header: "abc-123"})
    outcome = await client.send(SUBSCRIBERS)
    assert outcome.response_request_id == "abc-123"


async def test_send_keeps_only_rejected_indices_inside_the_batch(
    client: api.ExternalUserApi, respx_mock: respx.MockRouter
) -> None:
    """A 422 naming records 1 and 5 of a two-record batch names only record 1."""
    respx_mock.post(URL + PATH).respond(422, json={"errors": [{"index": 1}, {"index": 5}]})
    outcome = await client.send(SUBSCRIBERS)
    assert (outcome.kind, outcome.rejected_indices) == (K.REJECTED, (1,))


async def test_send_keeps_a_bounded_storable_body_excerpt(
    client: api.ExternalUserApi, respx_mock: respx.MockRouter
) -> None:
    """A failed body is cut to 2048 characters, NUL replaced (PostgreSQL text cannot hold it)."""
    respx_mock.post(URL + PATH).respond(400, content=b"\x00" + b"e" * 5000)
    outcome = await client.send(SUBSCRIBERS)
    assert outcome.body_excerpt == "\ufffd" + "e" * 2047


async def test_send_logs_one_line_per_request(
    client: api.ExternalUserApi, respx_mock: respx.MockRouter, logs: list[str]
) -> None:
    """An OK request logs one INFO 'api request' with its fields and no subscriber data."""
    respx_mock.post(URL + PATH).respond(201, headers={"X-Request-Id": "srv-9"})
    outcome = await client.send(SUBSCRIBERS, batch_id=12, attempt=2)
    [record] = records_of(logs)
    assert (record["level"]["name"], record["message"]) == ("INFO", "api request")
    assert record["extra"] == {
        "method": "POST",
        "path": PATH,
        "status": 201,
        "duration_ms": round(outcome.duration_ms, 1),
        "request_id": outcome.request_id,
        "response_request_id": "srv-9",
        "batch_id": 12,
        "attempt": 2,
        "users": 2,
        "outcome": "ok",
    }
    assert "a@example.com" not in logs[0]


async def test_send_logs_failures_as_warnings_with_the_cause(
    client: api.ExternalUserApi, respx_mock: respx.MockRouter, logs: list[str]
) -> None:
    """A failed request logs a WARNING carrying the error and a 200-character body excerpt."""
    respx_mock.post(URL + PATH).respond(503, text="x" * 1000)
    await client.send(SUBSCRIBERS)
    [record] = records_of(logs)
    assert record["level"]["name"] == "WARNING"
    assert record["extra"]["outcome"] == "transient"
    assert record["extra"]["error"] == "HTTP 503"
    assert record["extra"]["error_excerpt"] == "x" * 200


@pytest.mark.parametrize("auth", ["bearer", "basic", "header:X-Api-Key"])
async def test_the_key_never_leaves(auth: str, respx_mock: respx.MockRouter, logs: list[str]) -> None:
    """A 401 echoing the key yields an outcome, logs and repr without it (G9)."""
    key = "SECRET-KEY-123"

    def echo(request: httpx.Request) -> httpx.Response:
        echoed = {"error": f"bad key {key}", "headers": dict(request.headers)}
        return httpx.Response(401, json=echoed, headers={"X-Request-Id": f"r-{key}"})

    respx_mock.post(URL + PATH).mock(side_effect=echo)
    async with api.ExternalUserApi(api_config(key=SecretStr(key), auth=auth)) as instance:
        outcome = await instance.send(SUBSCRIBERS)
        assert key not in repr(instance)
    assert outcome.kind is K.UNAUTHORIZED
    assert outcome.body_excerpt is not None and "bad key ***" in outcome.body_excerpt
    assert key not in repr(outcome)
    assert all(key not in str(value) for value in vars(outcome).values())
    assert logs and all(key not in line for line in logs)
    assert base64.b64encode(f"{key}:".encode()).decode() not in outcome.body_excerpt


ODD_KEY = "Ab/cd+Ef=gh-123"  # characters JSON (PHP-style), percent and base64 encodings change


@pytest.mark.parametrize(
    "echoed",
    [
        ODD_KEY.replace("/", "\\/"),  # PHP's json_encode escapes '/'
        "Ab%2Fcd%2BEf%3Dgh-123",
        "Ab%2fcd%2bEf%3dgh-123",
        base64.b64encode(ODD_KEY.encode()).decode(),
        base64.b64encode(f"{ODD_KEY}:".encode()).decode(),  # the basic credential as sent
    ],
)
async def test_an_echoed_key_in_any_encoding_never_reaches_the_excerpt_or_the_log(
    echoed: str, respx_mock: respx.MockRouter, logs: list[str]
) -> None:
    """An API echoing the key JSON-escaped, percent-encoded or base64 in its body or request id:
    the outcome's error and excerpt (what `failures.error` and the request log keep) and the log
    line's error_excerpt hold *** instead (G9)."""
    body = f'{{"error": "invalid key {echoed}", "key": "{echoed}"}}'.encode()
    respx_mock.post(URL + PATH).mock(
        return_value=httpx.Response(401, content=body, headers={"X-Request-Id": f"r-{echoed}"})
    )
    async with api.ExternalUserApi(api_config(key=SecretStr(ODD_KEY), auth="basic")) as instance:
        outcome = await instance.send(SUBSCRIBERS)
    stored = " ".join(str(value) for value in vars(outcome).values())
    assert echoed not in stored and ODD_KEY not in stored
    assert outcome.body_excerpt is not None and "invalid key ***" in outcome.body_excerpt
    warning = next(r for r in records_of(logs) if r["message"] == "api request")
    assert "***" in warning["extra"]["error_excerpt"]
    assert all(echoed not in line and ODD_KEY not in line for line in logs)


async def test_a_short_key_leaves_the_rest_of_the_answer_readable(respx_mock: respx.MockRouter) -> None:
    """Issue 12: with key "k", the API's request id "fake-5" and its words stay as they are; the
    key where it stands alone is still replaced."""
    body = b'{"error": "unknown token k", "hint": "check the key"}'
    respx_mock.post(URL + PATH).mock(
        return_value=httpx.Response(401, content=body, headers={"X-Request-Id": "fake-5"})
    )
    async with api.ExternalUserApi(api_config(key=SecretStr("k"))) as instance:
        outcome = await instance.send(SUBSCRIBERS)
    assert outcome.response_request_id == "fake-5"
    assert outcome.body_excerpt == '{"error": "unknown token ***", "hint": "check the key"}'


async def test_send_reports_the_rate_limit_it_counts_down(
    client: api.ExternalUserApi, respx_mock: respx.MockRouter
) -> None:
    """X-RateLimit-Limit comes with Remaining into the outcome and the ledger fields: the quota
    believes Remaining only for its own limit (SPEC §2); absent, it is None."""
    route = respx_mock.post(URL + PATH)
    route.respond(201, headers={"X-RateLimit-Limit": "3600", "X-RateLimit-Remaining": "12"}, json={})
    outcome = await client.send(SUBSCRIBERS)
    assert (outcome.rate_limit_limit, outcome.rate_limit_remaining) == (3600, 12)
    fields = outcome.ledger_fields()
    assert (fields["rate_limit_limit"], fields["rate_limit_remaining"]) == (3600, 12)
    route.respond(201, headers={"X-RateLimit-Remaining": "7", "X-RateLimit-Limit": "lots"}, json={})
    outcome = await client.send(SUBSCRIBERS)
    assert (outcome.rate_limit_limit, outcome.rate_limit_remaining) == (None, 7)
