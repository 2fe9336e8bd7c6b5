"""`usersyncd demo` runs the whole pipeline with no config and no server, and says so."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_demo_passes_and_reports() -> None:
    """A small demo against the Drip fake: exit 0, and the closing report says the API mirrors
    the table (renamed user moved, deleted user unsubscribed, the refused record dead-lettered
    alone after isolation), nothing over the quota, live changes arrived."""
    result = subprocess.run(
        [sys.executable, "-m", "usersyncd", "demo", "--users", "6000"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "every one equal to its row: yes" in out
    assert "over the quota             0" in out
    assert "live changes during it     5 of 5 arrived" in out
    assert "1 retried after a 503" in out
    assert re.search(
        r"renamed +user\d+@example\.com -> renamed\d+@example\.com: one subscriber, under the new email", out
    )
    assert re.search(r"deleted +user\d+@example\.com: unsubscribed", out)
    assert re.search(r"refused by the API +noreply@example\.com, .*batch of \d+ refused whole", out)
    extra = re.search(
        r"dead-lettered `rejected` \(422 'Email is invalid'\), (\d+) extra requests to find it", out
    )
    assert extra and int(extra[1]) > 0, out
    assert "open failures              11 (10 invalid, 1 refused by the API)" in out
    assert out.rstrip().endswith("demo passed")
    # stdout is a pipe here, as in a CI log or the journal: plain progress lines, no redraws
    assert "\r" not in out and "\x1b" not in out
    assert "users at the API" in out
