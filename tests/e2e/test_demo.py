"""`usersyncd demo` runs the whole pipeline with no config and no server, and says so."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_demo_passes_and_reports() -> None:
    """A small demo: exit 0, the closing report says in sync, nothing over the quota, live changes arrived."""
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
    assert out.rstrip().endswith("demo passed")
    # stdout is a pipe here, as in a CI log or the journal: plain progress lines, no redraws
    assert "\r" not in out and "\x1b" not in out
    assert "users at the API" in out
