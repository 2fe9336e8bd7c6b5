"""Shortcuts taken for CPU per user (issue 9) keep the behaviour they stand in for."""

from __future__ import annotations

import ssl
import sys
from typing import Any

import email_validator
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr

from usersyncd import api, config, db, records


def test_special_use_names_are_email_validators() -> None:
    """The names written out in records are the library's (an upgrade that changes them fails here)."""
    assert sorted(records.SPECIAL_USE_DOMAIN_NAMES) == sorted(email_validator.SPECIAL_USE_DOMAIN_NAMES)


def test_email_validator_not_imported_by_the_daemon() -> None:
    """Start-up does not import email-validator: only an address the fast path leaves to it does."""
    import subprocess

    code = "import sys, usersyncd.cli, usersyncd.daemon; print('email_validator' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _client(url: str) -> api.ExternalUserApi:
    values: dict[str, Any] = {"url": url, "key": SecretStr("k"), "auth": "bearer"}
    return api.ExternalUserApi(config.ApiConfig(**values))


async def test_https_api_checks_certificates() -> None:
    """An https API gets a verifying TLS context; a plain-http one none (it never uses TLS)."""
    async with _client("https://api.test") as secure:
        context = secure._client._transport._pool._ssl_context  # type: ignore[attr-defined]
        assert isinstance(context, ssl.SSLContext)
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    async with _client("http://127.0.0.1:9") as plain:
        context = plain._client._transport._pool._ssl_context  # type: ignore[attr-defined]
        assert context is None or context.verify_mode == ssl.CERT_NONE


@pytest.mark.parametrize(
    ("values", "literal"),
    [
        ([], "{}"),
        (["1", "22"], '{"1","22"}'),
        ([""], '{""}'),
        (['a"b', "c\\d"], '{"a\\"b","c\\\\d"}'),
        (["x", None], '{"x",NULL}'),
        (["NULL"], '{"NULL"}'),
    ],
)
def test_text_array_literal(values: list[str | None], literal: str) -> None:
    """Every element quoted (NULL alone is not), quotes and backslashes escaped."""
    assert db.text_array(values) == literal


@given(st.lists(st.text().map(lambda s: s.replace("\x00", ""))))
def test_text_array_quotes_every_element(values: list[str]) -> None:
    """The literal splits back into the values (the parser's rules: quoted, backslash escapes)."""
    literal = db.text_array(values)
    assert literal[0] == "{" and literal[-1] == "}"
    parsed: list[str] = []
    body, i = literal[1:-1], 0
    while i < len(body):
        assert body[i] == '"'
        i += 1
        out = []
        while body[i] != '"':
            if body[i] == "\\":
                i += 1
            out.append(body[i])
            i += 1
        parsed.append("".join(out))
        i += 1
        if i < len(body):
            assert body[i] == ","
            i += 1
    assert parsed == values
