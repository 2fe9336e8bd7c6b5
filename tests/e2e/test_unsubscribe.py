"""Deletions and rows leaving the filter (G12) on the real process, against the Drip-flavoured
fake: with source.on_delete = "unsubscribe" exactly the users whose row was deleted (found by
the reconciliation pass) or updated out of source.filter (found by the poller) are unsubscribed,
nobody else; a row that comes back is subscribed again with "status": "active"."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from helpers import DRIP_ACCOUNT, drip_api, fast, speak_drip, usersyncd

from usersyncd.fakeapi import FakeApiProcess

pytestmark = [pytest.mark.e2e, pytest.mark.db]

USERS = 300
UNSUBS = f"/v2/{DRIP_ACCOUNT}/unsubscribes/batches"


async def test_deleted_and_filtered_out_users_are_unsubscribed_and_come_back_active(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApiProcess,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """30 rows deleted and 20 updated out of the filter: those 50 unsubscribed at the API, every
    other user still active, no other email in an unsubscribe request; one deleted row inserted
    again: active again, sent with "status": "active"; 0 quota violations."""
    speak_drip(fake_api)
    fake_api.limit_requests = 10
    await seed(conn, USERS)
    await conn.execute("ALTER TABLE users ADD COLUMN active boolean NOT NULL DEFAULT true")
    config = make_config(
        database_url,
        fake_api.url,
        **fast(
            api=drip_api(fake_api, unsubscribe_path="/v2/{account_id}/unsubscribes/batches"),
            source={"filter": "active", "on_delete": "unsubscribe", "reconcile_every": 1.0},
        ),
    )
    daemon = await spawn(config)
    await fake_api.wait_for(lambda api: len(api.state) == USERS, timeout=60)

    deleted = list(range(10, 310, 10))[:30]  # 30 rows, no other change: the reconcile pass's
    filtered = list(range(5, 205, 10))[:20]  # 20 rows updated out of the filter: the poller's
    await conn.execute("DELETE FROM users WHERE id = ANY($1::bigint[])", deleted)
    await conn.execute(
        "UPDATE users SET active = false, updated_at = clock_timestamp() WHERE id = ANY($1::bigint[])",
        filtered,
    )
    gone = {f"user{i}@example.com" for i in deleted + filtered}

    def unsubscribed(api: FakeApiProcess) -> set[str]:
        return {email for email, sub in api.state.items() if sub.get("status") == "unsubscribed"}

    await fake_api.wait_for(lambda api: unsubscribed(api) == gone, timeout=60)
    sent_to_unsubscribe = [e for r in fake_api.requests if r.path == UNSUBS for e in r.emails]
    assert sorted(sent_to_unsubscribe) == sorted(gone)  # each once, nobody else
    assert all(sub["status"] == "active" for email, sub in fake_api.state.items() if email not in gone)

    before = len(fake_api.requests)
    await conn.execute(
        "INSERT INTO users (id, email, name, time_zone) VALUES (10, 'user10@example.com', 'Back', 'UTC')"
    )
    await fake_api.wait_for(lambda api: api.state["user10@example.com"]["status"] == "active", timeout=30)
    assert await daemon.stop() == 0
    came_back = [s for r in fake_api.requests[before:] for s in r.subscribers]
    assert came_back == [
        {"email": "user10@example.com", "name": "Back", "time_zone": "UTC", "status": "active"}
    ]
    assert unsubscribed(fake_api) == gone - {"user10@example.com"}
    assert fake_api.violations == 0 and fake_api.concurrent_conflicts == 0
    assert await conn.fetchval("SELECT count(*) FROM usersync.failures") == 0
    ledger = await conn.fetchval("SELECT count(*) FROM usersync.requests WHERE kind <> 'external'")
    assert ledger == len(fake_api.requests)  # every request, unsubscribes included, in the ledger
    # what an operator sees: history tells the unsubscribe requests, status has nobody left to do
    history = await usersyncd("history", "--config", str(config), "--json")
    actions = [r["action"] for r in json.loads(history.stdout)]
    assert actions.count("unsubscribe") == sum(r.path == UNSUBS for r in fake_api.requests)
    shown = await usersyncd("status", "--config", str(config))
    assert "gone:           0 to unsubscribe (on_delete = unsubscribe); last reconcile pass" in shown.stdout


async def test_a_row_back_after_an_unanswered_unsubscribe_is_subscribed_active(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApiProcess,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """A deleted user's unsubscribe lands at the API but its answer never comes (slower than
    api.timeout); then the same row comes back: it is sent again, with "status": "active", so the
    API holds it subscribed (found by the chaos soak: the subscriber stayed unsubscribed)."""
    speak_drip(fake_api)
    await seed(conn, 20)
    config = make_config(
        database_url,
        fake_api.url,
        **fast(
            api=drip_api(fake_api, unsubscribe_path="/v2/{account_id}/unsubscribes/batches", timeout=0.5),
            source={"on_delete": "unsubscribe", "reconcile_every": 0.5},
            retry={"attempts": 3, "backoff": 3.0},  # the row comes back before the retry
        ),
    )
    daemon = await spawn(config)
    await fake_api.wait_for(lambda api: len(api.state) == 20, timeout=60)
    fake_api.latency = 1.0  # answers now come after api.timeout: the unsubscribe lands unanswered
    row = await conn.fetchrow("DELETE FROM users WHERE id = 5 RETURNING email, name, time_zone")
    await fake_api.wait_for(
        lambda api: api.state["user5@example.com"]["status"] == "unsubscribed", timeout=30
    )
    fake_api.latency = 0.0
    # the same row back: the API held exactly this payload before the unsubscribe
    await conn.execute("INSERT INTO users (id, email, name, time_zone) VALUES (5, $1, $2, $3)", *row.values())

    def settled(api: FakeApiProcess) -> bool:
        sub = api.state["user5@example.com"]
        return sub["status"] == "active"

    try:
        await fake_api.wait_for(settled, timeout=30)
    except TimeoutError:
        pytest.fail(
            f"{fake_api.state['user5@example.com']}\n"
            + "\n".join(
                line
                for line in daemon.text().splitlines()
                if "reconcile pass" not in line and '"DEBUG"' not in line
            )[-6000:]
        )
    assert await daemon.stop() == 0
    assert all(sub["status"] == "active" for sub in fake_api.state.values())
    assert fake_api.violations == 0
