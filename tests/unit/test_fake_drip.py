"""The fake API's drip flavour answers as Drip documents (SPEC §2, "The real Drip API")."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from usersyncd.fakeapi import FakeApi, FakeApiProcess

ACCOUNT = "1234567"
SUBS = f"/v2/{ACCOUNT}/subscribers/batches"
UNSUBS = f"/v2/{ACCOUNT}/unsubscribes/batches"
KEY = httpx.BasicAuth("test-key", "")


def batch(*subscribers: dict[str, Any]) -> dict[str, Any]:
    return {"batches": [{"subscribers": list(subscribers)}]}


@pytest.fixture
async def fake() -> AsyncIterator[FakeApi]:
    async with FakeApi(flavour="drip", account_id=ACCOUNT, auth="basic", limit_requests=100) as api:
        yield api


@pytest.fixture
async def client(fake: FakeApi) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fake.url, auth=KEY) as c:
        yield c


async def test_batch_answers_201_and_merges_fields(fake: FakeApi, client: httpx.AsyncClient) -> None:
    r = await client.post(
        SUBS, json=batch({"email": "a@x.io", "first_name": "Ann", "custom_fields": {"plan": "pro"}})
    )
    assert (r.status_code, r.json()) == (201, {})
    r = await client.post(
        SUBS, json=batch({"email": "a@x.io", "last_name": "Lee", "custom_fields": {"seat": 3}})
    )
    assert r.status_code == 201
    assert fake.state["a@x.io"] == {
        "email": "a@x.io",
        "status": "active",
        "first_name": "Ann",
        "last_name": "Lee",
        "custom_fields": {"plan": "pro", "seat": 3},
    }
    assert fake.sends["a@x.io"] == 2 and fake.requests[0].path == SUBS


async def test_basic_auth_and_account(fake: FakeApi, client: httpx.AsyncClient) -> None:
    async with httpx.AsyncClient(base_url=fake.url, auth=httpx.BasicAuth("wrong", "")) as bad:
        assert (await bad.post(SUBS, json=batch({"email": "a@x.io"}))).status_code == 401
        assert (await bad.get("/v2/user")).status_code == 401
    r = await client.post("/v2/7654321/subscribers/batches", json=batch({"email": "a@x.io"}))
    assert r.status_code == 404
    assert r.json() == {
        "errors": [{"code": "not_found_error", "message": "The resource you requested was not found"}]
    }
    assert (await client.get("/v2/accounts/7654321")).status_code == 404
    assert (await client.get(f"/v2/accounts/{ACCOUNT}")).status_code == 200
    assert (await client.get("/v2/user")).status_code == 200
    assert fake.state == {} and fake.probes == 4
    assert len(fake.requests) == 2  # the GETs are outside the quota: not recorded as requests
    fake.account_id = "7654321"  # pointed at the account the client names: accepted
    assert (
        await client.post("/v2/7654321/subscribers/batches", json=batch({"email": "a@x.io"}))
    ).status_code == 201


async def test_one_bad_email_refuses_the_whole_batch(fake: FakeApi, client: httpx.AsyncClient) -> None:
    fake.reject_emails = {"bad@x.io"}
    r = await client.post(SUBS, json=batch({"email": "a@x.io"}, {"email": "bad@x.io"}))
    assert r.status_code == 422
    assert r.json() == {
        "errors": [{"code": "email_error", "attribute": "email", "message": "Email is invalid"}]
    }
    assert fake.state == {}  # nothing of it applied


async def test_rename_moves_the_record_and_refuses_a_taken_email(
    fake: FakeApi, client: httpx.AsyncClient
) -> None:
    await client.post(SUBS, json=batch({"email": "a@x.io", "first_name": "A"}, {"email": "b@x.io"}))
    r = await client.post(SUBS, json=batch({"email": "a@x.io", "new_email": "c@x.io"}))
    assert r.status_code == 201
    assert set(fake.state) == {"b@x.io", "c@x.io"}
    assert fake.state["c@x.io"] == {"email": "c@x.io", "status": "active", "first_name": "A"}
    r = await client.post(SUBS, json=batch({"email": "c@x.io", "new_email": "b@x.io"}, {"email": "d@x.io"}))
    assert r.status_code == 422 and r.json()["errors"][0]["code"] == "uniqueness_error"
    assert r.json()["errors"][0]["attribute"] == "new_email" and "index" not in r.json()["errors"][0]
    assert set(fake.state) == {"b@x.io", "c@x.io"}  # the whole batch refused


async def test_rename_sent_again_after_it_landed_updates_the_renamed_one(
    fake: FakeApi, client: httpx.AsyncClient
) -> None:
    """Drip: with no subscriber under `email`, `new_email` is the subscriber (created or
    updated): a rename whose answer was lost and that is sent again lands once, no clash."""
    await client.post(SUBS, json=batch({"email": "a@x.io", "first_name": "A", "tags": ["t"]}))
    rename = {"email": "a@x.io", "new_email": "c@x.io", "last_name": "Z"}
    assert (await client.post(SUBS, json=batch(rename))).status_code == 201
    assert (await client.post(SUBS, json=batch(rename))).status_code == 201  # a@ is gone now
    assert fake.state == {
        "c@x.io": {"email": "c@x.io", "status": "active", "first_name": "A", "last_name": "Z", "tags": ["t"]}
    }
    r = await client.post(SUBS, json=batch({"email": "nobody@x.io", "new_email": "e@x.io"}))
    assert r.status_code == 201 and set(fake.state) == {"c@x.io", "e@x.io"}  # created under new_email


async def test_a_swap_is_refused_whole(fake: FakeApi, client: httpx.AsyncClient) -> None:
    await client.post(
        SUBS, json=batch({"email": "a@x.io", "first_name": "A"}, {"email": "b@x.io", "first_name": "B"})
    )
    before = {e: dict(s) for e, s in fake.state.items()}
    swap = batch({"email": "a@x.io", "new_email": "b@x.io"}, {"email": "b@x.io", "new_email": "a@x.io"})
    r = await client.post(SUBS, json=swap)
    assert r.status_code == 422 and r.json() == {
        "errors": [
            {
                "code": "uniqueness_error",
                "attribute": "new_email",
                "message": "New email has already been taken",
            }
        ]
    }
    assert fake.state == before


async def test_tags_unsubscribes_and_reactivation(fake: FakeApi, client: httpx.AsyncClient) -> None:
    await client.post(SUBS, json=batch({"email": "a@x.io", "tags": ["z", "b"]}, {"email": "b@x.io"}))
    await client.post(SUBS, json=batch({"email": "a@x.io", "tags": ["c"], "remove_tags": ["z"]}))
    assert fake.state["a@x.io"]["tags"] == ["b", "c"]
    r = await client.post(UNSUBS, json=batch({"email": "a@x.io"}, {"email": "b@x.io"}))
    assert r.status_code == 204 and r.content == b""
    assert {e: s["status"] for e, s in fake.state.items()} == {
        "a@x.io": "unsubscribed",
        "b@x.io": "unsubscribed",
    }
    await client.post(
        SUBS, json=batch({"email": "a@x.io", "first_name": "A"}, {"email": "b@x.io", "status": "active"})
    )
    assert fake.state["a@x.io"]["status"] == "unsubscribed"  # stays, without "status": "active"
    assert fake.state["b@x.io"]["status"] == "active"
    assert fake.accepted == 4 and len(fake.requests) == 4  # the unsubscribe counted like a batch


async def test_429_is_drips(fake: FakeApi, client: httpx.AsyncClient) -> None:
    fake.limit_requests = 1
    await client.post(UNSUBS, json=batch({"email": "a@x.io"}))  # counted against the same quota
    r = await client.post(SUBS, json=batch({"email": "a@x.io"}))
    assert r.status_code == 429
    assert r.json() == {"message": "API rate limit exceeded. Please try again in an hour."}
    assert "Retry-After" not in r.headers
    assert (r.headers["X-RateLimit-Limit"], r.headers["X-RateLimit-Remaining"]) == ("1", "0")
    assert (await client.get("/v2/user")).status_code == 200  # outside the quota


async def test_indexed_flavour_has_no_drip_paths() -> None:
    async with FakeApi() as api, httpx.AsyncClient(base_url=api.url) as c:
        assert (await c.post(SUBS, json=batch({"email": "a@x.io"}))).status_code == 404


async def test_process_mirrors_the_drip_flavour() -> None:
    async with FakeApiProcess(flavour="drip", account_id=ACCOUNT, auth="basic") as remote:
        async with httpx.AsyncClient(base_url=remote.url, auth=KEY) as c:
            await c.post(SUBS, json=batch({"email": "a@x.io", "tags": ["t"]}, {"email": "b@x.io"}))
            await c.post(SUBS, json=batch({"email": "a@x.io", "new_email": "c@x.io"}))
            await c.post(UNSUBS, json=batch({"email": "b@x.io"}))
            await c.get(f"/v2/accounts/{ACCOUNT}")
            remote.account_id = "42"
            assert (await c.post(SUBS, json=batch({"email": "d@x.io"}))).status_code == 404
        assert remote.state == {
            "c@x.io": {"email": "c@x.io", "status": "active", "tags": ["t"]},
            "b@x.io": {"email": "b@x.io", "status": "unsubscribed"},
        }
        assert remote.probes == 1 and [r.status for r in remote.requests] == [201, 201, 204, 404]
        assert remote.flavour == "drip" and remote.requests[2].path == UNSUBS
