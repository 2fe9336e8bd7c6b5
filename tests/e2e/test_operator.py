"""What an operator sees: status, check, --dry-run, and the health/metrics endpoint."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from helpers import drip_api, fast, speak_drip, usersyncd

from usersyncd.fakeapi import FakeApi

pytestmark = [pytest.mark.e2e, pytest.mark.db]

EXAMPLE_CONFIG = Path(__file__).resolve().parents[2] / "config.example.toml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_health_readiness_and_metrics(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """/healthz is up, /readyz follows the credentials pause, /metrics counts requests and users."""
    await seed(conn, 3000)
    port = free_port()
    config = make_config(database_url, fake_api.url, **fast(http={"listen": f"127.0.0.1:{port}"}))
    daemon = await spawn(config)
    await fake_api.wait_for(lambda api: len(api.state) == 3000, timeout=30)
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, timeout=5) as client:
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        metrics = (await client.get("/metrics")).text
        assert 'usersyncd_requests_total{outcome="ok"} 3.0' in metrics
        assert "usersyncd_users_synced_total 3000.0" in metrics
        assert "usersyncd_quota_limit 10.0" in metrics
        assert 'usersyncd_paused{reason="credentials"} 0.0' in metrics

        fake_api.api_key = "rotated"  # credentials stop working
        await conn.execute("UPDATE users SET name = 'x', updated_at = clock_timestamp() WHERE id = 1")
        for _ in range(100):
            ready = await client.get("/readyz")
            if ready.status_code == 503:
                break
            await asyncio.sleep(0.1)
        assert ready.status_code == 503 and "credentials" in ready.text
        for _ in range(100):  # the gauges come from a snapshot up to a few seconds old
            if 'usersyncd_paused{reason="credentials"} 1.0' in (await client.get("/metrics")).text:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the credentials pause never reached /metrics")
        assert (await client.get("/healthz")).status_code == 200  # alive, just not ready

        fake_api.api_key = "test-key"
        await fake_api.wait_for(lambda api: api.state["user1@example.com"]["name"] == "x", timeout=15)
        for _ in range(100):
            if (await client.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("never ready again after the credentials came back")
    assert await daemon.stop() == 0


async def test_status_reports_backlog_quota_and_workers(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """`status --json` while a backlog drains: backlog, quota used/limit, next slot, ETA, a live process."""
    await seed(conn, 40_000)
    config = make_config(
        database_url, fake_api.url, **fast(limits={"requests": 5, "window": 4.0, "margin": 0.1})
    )
    daemon = await spawn(config)
    await fake_api.wait_for(lambda api: len(api.requests) >= 5, timeout=30)
    result = await usersyncd("status", "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["quota_limit"] == 5
    assert 1 <= status["quota_used"] <= 5
    assert status["backlog"] >= 40_000 - 5_000 - 1000 * status["quota_used"]
    assert status["drain_eta"] > 4.0  # more than a window of work is left
    assert len(status["live_processes"]) == 1
    assert set(status["cursors"]) == {"live", "backfill"}
    text = await usersyncd("status", "--config", str(config))
    assert "requests in the current 4 s window" in text.stdout and "drain ETA" in text.stdout
    assert await daemon.stop() == 0


async def test_check_names_what_is_wrong(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
) -> None:
    """`check` passes on a good set-up; a missing table or column is one clear FAIL line and exit 1."""
    await seed(conn, 10)
    config = str(make_config(database_url, fake_api.url))
    unprobed = await usersyncd("check", "--config", config, "--api")
    assert unprobed.returncode == 1  # asked to check the API and could not: never a silent pass
    assert "FAIL API not probed: api.probe_path is not set" in unprobed.stdout
    assert not fake_api.requests  # nothing spent without --spend-slot
    good = await usersyncd("check", "--config", config, "--api", "--spend-slot")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "ok   index on (updated_at, id)" in good.stdout
    assert "to an empty batch, as expected: the key and the path work" in good.stdout
    assert len(fake_api.requests) == 1  # --spend-slot costs exactly one request

    no_table = await usersyncd(
        "check",
        "--config",
        str(make_config(database_url, fake_api.url, source={"table": "public.people"})),
    )
    assert no_table.returncode == 1
    assert "FAIL source.table: table public.people does not exist" in no_table.stdout

    no_column = await usersyncd(
        "check",
        "--config",
        str(make_config(database_url, fake_api.url, source={"fields": {"email": "mail"}})),
    )
    assert no_column.returncode == 1
    assert "source.fields.email: column 'mail' does not exist" in no_column.stdout
    assert "Traceback" not in no_table.stderr + no_column.stderr


async def test_run_with_missing_table_is_a_clear_error(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """`run` against a database without the source table: exit 1, one line saying so."""
    daemon = await spawn(make_config(database_url, fake_api.url))
    assert await daemon.wait(timeout=30) == 1
    assert "source.table: table public.users does not exist" in daemon.text()
    assert "Traceback" not in daemon.text()


async def test_dry_run_sends_nothing_and_changes_nothing(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """--dry-run logs counts and a redacted sample; no request, no cursor, no staged user."""
    await seed(conn, 2500, invalid_email_every=100)
    daemon = await spawn(make_config(database_url, fake_api.url, **fast()), "run", "--dry-run")
    assert await daemon.wait(timeout=60) == 0, daemon.text()[-2000:]
    report = next(e for e in daemon.logs() if e.get("message", "").startswith("dry run"))
    assert report["rows_read"] == 2500
    assert report["users_to_send"] == 2475 and report["invalid"] == {"email": 25}
    assert report["batches"] == 3
    assert "@example.com" in report["sample"]["email"] and "user" not in report["sample"]["email"]
    assert fake_api.requests == []
    assert await conn.fetchval("SELECT to_regclass('usersync.cursors')") is None


async def test_dry_run_counts_null_versions_and_the_users_to_unsubscribe(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """After a sync, 5 rows changed with updated_at set NULL (G14) and 7 deleted (G12): --dry-run
    counts the 5 to send (read by id, as the daemon's sweep does) and the 7 gone, to unsubscribe
    with on_delete = "unsubscribe" and only counted with "ignore"; it sends nothing."""
    speak_drip(fake_api)
    await seed(conn, 300)
    drip = drip_api(fake_api)
    unsubscribing = make_config(
        database_url,
        fake_api.url,
        **fast(
            api={**drip, "unsubscribe_path": "/v2/{account_id}/unsubscribes/batches"},
            source={"on_delete": "unsubscribe"},
        ),
    )
    synced = await spawn(unsubscribing, "run", "--once")
    assert await synced.wait(timeout=60) == 0, synced.text()[-2000:]
    assert len(fake_api.state) == 300
    sent = len(fake_api.requests)
    await conn.execute("ALTER TABLE users ALTER COLUMN updated_at DROP NOT NULL")
    await conn.execute(
        "UPDATE users SET name = name || ' (null)', updated_at = NULL WHERE id BETWEEN 11 AND 15"
    )
    await conn.execute("DELETE FROM users WHERE id BETWEEN 101 AND 107")

    reports = []
    for config in (unsubscribing, make_config(database_url, fake_api.url, **fast(api=drip))):
        daemon = await spawn(config, "run", "--dry-run")
        assert await daemon.wait(timeout=60) == 0, daemon.text()[-2000:]
        reports.append(next(e for e in daemon.logs() if e.get("message", "").startswith("dry run")))
    unsubscribe, ignore = reports
    assert unsubscribe["users_to_send"] == 5 and unsubscribe["null_updated_at"] == 5
    assert unsubscribe["users_gone"] == 7 and unsubscribe["users_to_unsubscribe"] == 7
    assert unsubscribe["batches"] == 2  # one of subscribers, one of unsubscribes
    assert ignore["users_gone"] == 7 and ignore["users_to_unsubscribe"] == 0 and ignore["batches"] == 1
    assert len(fake_api.requests) == sent


async def test_example_config_runs_and_stops_on_ctrl_c(
    conn: asyncpg.Connection, database_url: str, seed: Any, tmp_path: Path
) -> None:
    """`run --config config.example.toml` (database and key from the environment) starts, logs
    readiness, and on Ctrl-C (SIGINT) stops cleanly with exit 0."""
    await seed(conn, 5)
    example = EXAMPLE_CONFIG
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("USER_API", "USERSYNCD_"))},
        "USERSYNCD_DATABASE_URL": database_url,
        "USER_API_KEY": "example-key-1234",
    }
    log_path = tmp_path / "example.log"
    with open(log_path, "wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "usersyncd",
            "run",
            "--config",
            str(example),
            "--set",
            "http.listen=''",  # port 9187 may be taken on a test machine
            stdout=log_file,
            stderr=log_file,
            env=env,
        )
        try:
            for _ in range(300):
                if "usersyncd ready" in log_path.read_text():
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail(log_path.read_text()[-2000:])
            proc.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(proc.wait(), 40) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    text = log_path.read_text()
    assert "usersyncd stopped" in text and "Traceback" not in text
    assert "example-key-1234" not in text
