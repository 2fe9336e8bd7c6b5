"""Logging: JSON lines with structured fields, text format, levels, secret redaction."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
from loguru import logger

from usersyncd import log


@pytest.fixture(autouse=True)
def _restore_logger() -> Iterator[None]:
    yield
    logger.remove()


def test_json_lines_carry_structured_fields() -> None:
    """Each JSON line has time, level, message and the bound fields."""
    out = io.StringIO()
    log.configure("INFO", "json", stream=out)
    logger.bind(batch_id=7, attempt="2/3", request_id="r-1").info("batch sent")
    entry = json.loads(out.getvalue().splitlines()[0])
    assert entry["message"] == "batch sent"
    assert entry["level"] == "INFO"
    assert entry["batch_id"] == 7 and entry["attempt"] == "2/3" and entry["request_id"] == "r-1"
    assert entry["time"].endswith("+00:00")


def test_level_filters() -> None:
    """Lines below the configured level are not written."""
    out = io.StringIO()
    log.configure("WARNING", "json", stream=out)
    logger.info("quiet")
    logger.warning("loud")
    messages = [json.loads(line)["message"] for line in out.getvalue().splitlines()]
    assert messages == ["loud"]


def test_text_format() -> None:
    """The text format is one readable line with key=value fields."""
    out = io.StringIO()
    log.configure("DEBUG", "text", stream=out)
    logger.bind(batch_id=3).debug("claimed")
    line = out.getvalue().strip()
    assert "DEBUG" in line and "claimed" in line and "batch_id=3" in line
    assert not line.startswith("{")


def test_secrets_are_redacted_everywhere() -> None:
    """The API key is replaced in messages, fields and exception text, in both formats."""
    for fmt in ("json", "text"):
        out = io.StringIO()
        log.configure("INFO", fmt, secrets=["SECRET-KEY-42"], stream=out)
        logger.bind(header="Bearer SECRET-KEY-42").info("auth with SECRET-KEY-42")
        try:
            raise RuntimeError("boom SECRET-KEY-42")
        except RuntimeError:
            logger.exception("failed")
        text = out.getvalue()
        assert "SECRET-KEY-42" not in text
        assert text.count(log.REDACTED) >= 3


def test_redactor_learns_secrets_later() -> None:
    """A secret added after set-up (a key read from a file) is redacted from then on."""
    out = io.StringIO()
    redact = log.configure("INFO", "json", stream=out)
    redact.add("late-secret")
    logger.info("value late-secret")
    assert "late-secret" not in out.getvalue()
