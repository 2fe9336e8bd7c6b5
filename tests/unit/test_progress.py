"""Progress output: a live bar on a terminal, plain lines elsewhere (a CI log, the journal)."""

from __future__ import annotations

import io
import time

from usersyncd import progress


def test_not_a_terminal_gets_plain_lines_without_carriage_returns() -> None:
    """Off a terminal: no \\r redraws; a line at the start, at most one per interval, one at the end."""
    out = io.StringIO()  # isatty() is False
    with progress.Progress("users", 1000, out, every=0.05) as bar:
        began = time.monotonic()
        for done in range(0, 1001, 10):
            bar.update(done, f"{done // 100} requests")
            time.sleep(0.001)
        elapsed = time.monotonic() - began
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0].startswith("0/1,000 users (0 %)")
    assert lines[-1] == "1,000/1,000 users (100 %)  10 requests"
    assert 2 <= len(lines) <= elapsed / 0.05 + 3  # not one line per update


def test_terminal_gets_a_live_bar() -> None:
    """On a terminal the bar is drawn in place (rich) and ends at the total."""
    out = io.StringIO()
    with progress.Progress("users", 50, out, terminal=True) as bar:
        bar.update(50, "5 requests")
    text = out.getvalue()
    assert "50/50" in text and "5 requests" in text
    assert "\x1b" in text  # drawn with terminal control codes, not plain lines
