"""Logging: JSON lines with structured fields, text format, levels, secret redaction."""

from __future__ import annotations

import base64
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


SHORT_KEY_LINE = "unknown IANA time zone lane=backfill outcome=ok response_request_id=fake-5 keep kk k1 1k"


def test_a_short_key_is_redacted_only_as_a_whole_token() -> None:
    """Issue 12: with api.key = "k", words holding a "k" stay readable (no "un***nown")."""
    redact = log.Redactor(["k"])
    assert redact(SHORT_KEY_LINE) == SHORT_KEY_LINE


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Authorization: Bearer k", "Authorization: Bearer ***"),
        ("GET /v2?key=k&page=2", "GET /v2?key=***&page=2"),
        ('{"api_key": "k"}', '{"api_key": "***"}'),
        ("X-Api-Key: k", "X-Api-Key: ***"),
        # HTTP basic with the key as user name: base64("k:")
        ("Authorization: Basic azo=", "Authorization: Basic ***"),
        ("k", "***"),
    ],
)
def test_a_short_key_standing_as_a_token_is_still_redacted(text: str, expected: str) -> None:
    """The rule for a key under MIN_SECRET characters: replaced where it stands alone
    (not touching a letter or digit), which is how a header, a query or JSON carries it."""
    assert log.Redactor(["k"])(text) == expected


def test_a_long_secret_is_redacted_even_inside_a_word() -> None:
    """From MIN_SECRET characters on, a secret is replaced wherever it appears."""
    assert log.Redactor(["s3cr3t-Key"])("xxs3cr3t-Keyyy") == "xx***yy"


KEY = 'Ab/cd+Ef=gh"ij\\kl'  # the characters each encoding treats differently


@pytest.mark.parametrize(
    "form",
    [
        KEY,
        KEY.replace("\\", "\\\\").replace('"', '\\"').replace("/", "\\/"),  # PHP json_encode
        json.dumps(KEY)[1:-1],  # JSON
        "Ab%2Fcd%2BEf%3Dgh%22ij%5Ckl",  # percent-encoded
        "Ab%2fcd%2bEf%3dgh%22ij%5ckl",  # lower-case hex
        base64.b64encode(KEY.encode()).decode(),
        base64.urlsafe_b64encode(KEY.encode()).decode().rstrip("="),
        base64.b64encode(f"{KEY}:".encode()).decode(),  # HTTP basic, the key as user name
        "Ab\\u002fcd\\u002bEf\\u003dgh\\u0022ij\\u005ckl",  # \u-escaped specials
    ],
)
def test_every_written_form_of_a_secret_is_redacted(form: str) -> None:
    """An API echoing the key JSON-escaped, percent-encoded or base64 has it redacted in the
    message, a bound field (error_excerpt) and the exception, in both formats (G9)."""
    for fmt in ("json", "text"):
        out = io.StringIO()
        log.configure("INFO", fmt, secrets=[KEY], stream=out)
        logger.bind(error_excerpt=f'{{"error": "bad key {form}"}}').warning(f"echo {form}")
        try:
            raise RuntimeError(f"boom {form}")
        except RuntimeError:
            logger.exception("failed")
        text = out.getvalue()
        for written in {form, json.dumps(form)[1:-1]}:
            assert written not in text, (fmt, text)
        assert text.count(log.REDACTED) >= 3


def test_redact_uses_the_configured_secrets() -> None:
    """Lines printed outside the log (a config error, a traceback) use the same redactor."""
    log.configure("INFO", "json", secrets=["printed-secret-1"], stream=io.StringIO())
    assert log.redact("error: printed-secret-1") == "error: ***"
