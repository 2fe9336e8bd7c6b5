"""Logging (SPEC §7): loguru to stderr, one JSON object a line or plain text, secrets redacted.

Structured fields are bound with `logger.bind(batch_id=..., attempt=..., request_id=...)`
or `logger.contextualize(...)`; they become keys of the JSON object.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import re
import sys
import urllib.parse
from collections.abc import Iterable
from datetime import UTC
from typing import Any, TextIO

from loguru import logger

REDACTED = "***"
# A secret this long is redacted wherever it appears; a shorter one only as a whole token, so a
# one-letter key does not turn every "k" of every line into "***" (and so reveal itself).
MIN_SECRET = 8
# Characters that continue a token: a short secret inside a longer word is not that secret.
_TOKEN_CHAR = "A-Za-z0-9"


def secret_forms(secret: str) -> set[str]:
    """The secret and the ways an API or a log writes it: JSON- and PHP-escaped (`\\/`),
    percent-encoded, HTML-escaped, base64 (also `secret:`, an HTTP basic credential), and each
    of these JSON-escaped once more (a log line is JSON)."""
    if not secret:
        return set()
    forms = {secret, html.escape(secret), html.escape(secret, quote=False)}
    escaped = json.dumps(secret)[1:-1]
    forms |= {escaped, escaped.replace("/", "\\/"), json.dumps(secret, ensure_ascii=False)[1:-1]}
    # each non-alphanumeric as \\u00XX, as encoders that escape <, >, &, ' or / write it
    unicode = "".join(c if c.isascii() and c.isalnum() else f"\\u{ord(c):04x}" for c in secret)
    forms |= {unicode, re.sub(r"\\u([0-9a-f]{4})", lambda m: "\\u" + m.group(1).upper(), unicode)}
    quoted_forms = (
        urllib.parse.quote(secret, safe=""),
        urllib.parse.quote(secret),
        urllib.parse.quote_plus(secret),
    )
    for quoted in quoted_forms:
        forms |= {quoted, re.sub("%[0-9A-F]{2}", lambda m: m.group().lower(), quoted)}
    raw = secret.encode()
    for blob in (raw, raw + b":"):
        for encoded in (base64.b64encode(blob), base64.urlsafe_b64encode(blob)):
            text = encoded.decode("ascii")
            forms |= {text, text.rstrip("=")}
    forms |= {json.dumps(form)[1:-1] for form in list(forms)}
    return {form for form in forms if form}


class Redactor:
    """Replaces every known secret, in each of its written forms, by `***`; secrets can be
    added once they are known. A form shorter than MIN_SECRET is replaced only as a whole token
    (not touching a letter or digit on either side): `Bearer k`, `key=k&`, `"k"`."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._forms: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self.add(*secrets)

    def add(self, *secrets: str) -> None:
        for secret in secrets:
            self._forms |= secret_forms(secret)
        if not self._forms:
            return
        # longer first, so a secret that contains another is replaced whole
        alternatives = [
            re.escape(form)
            if len(form) >= MIN_SECRET
            else f"(?<![{_TOKEN_CHAR}]){re.escape(form)}(?![{_TOKEN_CHAR}])"
            for form in sorted(self._forms, key=lambda form: (-len(form), form))
        ]
        self._pattern = re.compile("|".join(alternatives))

    def __call__(self, text: str) -> str:
        return text if self._pattern is None else self._pattern.sub(REDACTED, text)


_active = Redactor()


def redact(text: str) -> str:
    """`text` without any secret the logging set-up knows: for lines printed outside the log."""
    return _active(text)


def _json_line(record: dict[str, Any]) -> str:
    entry: dict[str, Any] = {
        "time": record["time"].astimezone(UTC).isoformat(timespec="milliseconds"),
        "level": record["level"].name,
        "message": record["message"],
    }
    for key, value in record["extra"].items():
        entry.setdefault(key, value)
    if record["exception"] is not None:
        exc_type, exc_value, _ = record["exception"]
        entry["exception"] = f"{exc_type.__name__ if exc_type else 'Error'}: {exc_value}"
    return json.dumps(entry, default=str, ensure_ascii=False)


def _text_line(record: dict[str, Any]) -> str:
    fields = " ".join(f"{key}={value}" for key, value in record["extra"].items())
    line = (
        f"{record['time'].astimezone(UTC):%Y-%m-%d %H:%M:%S.%f}"[:-3]
        + f" {record['level'].name:<8} {record['message']}"
    )
    if fields:
        line += f"  {fields}"
    if record["exception"] is not None:
        exc_type, exc_value, _ = record["exception"]
        line += f"  exception={exc_type.__name__ if exc_type else 'Error'}: {exc_value}"
    return line


def configure(
    level: str = "INFO",
    fmt: str = "json",
    *,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> Redactor:
    """Send every log line to `stream` (stderr) in `fmt`; returns the redactor in use."""
    global _active
    redact = _active = Redactor(secrets)
    render = _json_line if fmt == "json" else _text_line
    out = stream

    def sink(message: Any) -> None:
        target = out if out is not None else sys.stderr  # resolved late: pytest swaps stderr
        target.write(redact(render(message.record)) + "\n")
        target.flush()

    logger.remove()
    # diagnose=False: a traceback must never print local variables (they may hold the key).
    logger.add(sink, level=level, format="{message}", backtrace=False, diagnose=False)
    # Libraries (asyncpg, aiohttp) log through the standard library: one line each, in our format.
    logging.basicConfig(handlers=[_InterceptHandler()], level=logging.WARNING, force=True)
    return redact


class _InterceptHandler(logging.Handler):
    """Standard-library records become loguru lines: the message and the error, no traceback."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            message = f"{message}: {type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        logger.bind(library=record.name).log(level, message)
