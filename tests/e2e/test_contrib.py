"""What ships for Prometheus users: alert rules that load and fire, a dashboard and alerts that
only name metrics the daemon exports, and a /metrics scrape that promtool finds clean."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from helpers import fast

from usersyncd.fakeapi import FakeApi

pytestmark = [pytest.mark.e2e, pytest.mark.db]

CONTRIB = Path(__file__).resolve().parents[2] / "contrib"
ALERTS = CONTRIB / "prometheus" / "alerts.yml"
DASHBOARD = CONTRIB / "grafana" / "usersyncd.json"
METRIC = re.compile(r"\busersyncd_[a-z_]+")
SUFFIXES = ("_bucket", "_count", "_sum", "_created")


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip(
            "PROMTOOL MISSING: install Debian's `prometheus` package (.ci/run does) to check the rules"
        )
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_alert_rules_load_and_fire() -> None:
    """`promtool check rules` accepts the rules; `promtool test rules` shows them firing (and not)."""
    tool = promtool()
    check = subprocess.run([tool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run(
        [tool, "test", "rules", "alerts_test.yml"],
        cwd=ALERTS.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert test.returncode == 0, test.stdout + test.stderr


def test_dashboard_is_valid_grafana_json() -> None:
    """The dashboard parses, every panel has a query, and the panels the issue names are there."""
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    titles = {panel["title"] for panel in board["panels"]}
    for wanted in (
        "Quota used vs limit (current window)",
        "Backlog by lane",
        "Drain ETA at full quota",
        "Requests by outcome",
        "Dead letters by kind",
        "Paused",
        "Database up",
    ):
        assert wanted in titles
    assert all(panel["targets"] and all(t["expr"] for t in panel["targets"]) for panel in board["panels"])


async def test_metrics_scrape_is_clean_and_covers_what_contrib_uses(
    conn: asyncpg.Connection,
    database_url: str,
    fake_api: FakeApi,
    seed: Any,
    make_config: Callable[..., Path],
    spawn: Any,
) -> None:
    """A real daemon's /metrics passes `promtool check metrics`, and exports every metric that the
    dashboard and the alert rules name (a renamed metric would leave a blank panel, a silent alert)."""
    tool = promtool()
    await seed(conn, 2000)
    port = free_port()
    config = make_config(database_url, fake_api.url, **fast(http={"listen": f"127.0.0.1:{port}"}))
    daemon = await spawn(config)
    await fake_api.wait_for(lambda api: len(api.state) == 2000, timeout=60)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        scrape = (await client.get("/metrics")).text
    assert await daemon.stop() == 0

    lint = await asyncio.to_thread(
        subprocess.run, [tool, "check", "metrics"], input=scrape, capture_output=True, text=True, timeout=60
    )
    assert lint.returncode == 0 and not lint.stdout.strip(), lint.stdout + lint.stderr

    exported = set(re.findall(r"^(usersyncd_[a-z_]+)", scrape, flags=re.MULTILINE))
    assert 'usersyncd_users_dead_lettered_total{kind="exhausted"} 0.0' in scrape  # there before any
    used = set(METRIC.findall(DASHBOARD.read_text(encoding="utf-8"))) | set(
        METRIC.findall(ALERTS.read_text(encoding="utf-8"))
    )
    missing = {
        name for name in used if name not in exported and not any(name + s in exported for s in SUFFIXES)
    }
    assert not missing, f"contrib names metrics the daemon does not export: {sorted(missing)}"
