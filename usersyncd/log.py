"""Logging (SPEC §7): loguru to stderr, one JSON object a line or plain text, secrets redacted.

Structured fields are bound with `logger.bind(batch_id=..., attempt=..., request_id=...)`
or `logger.contextualize(...)`; they become keys of the JSON object.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from datetime import UTC
from typing import Any, TextIO

from loguru import logger

REDACTED = "***"


class Redactor:
    """Replaces every known secret in a line; secrets can be added once they are known."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: list[str] = []
        self.add(*secrets)

    def add(self, *secrets: str) -> None:
        for secret in secrets:
            if secret and secret not in self._secrets:
                self._secrets.append(secret)
        self._secrets.sort(key=len, reverse=True)  # a longer secret first, if one contains another

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text


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
    redact = Redactor(secrets)
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
