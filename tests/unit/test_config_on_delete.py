"""source.on_delete, source.reconcile_every and api.unsubscribe_path (SPEC §5, G12)."""

from __future__ import annotations

from typing import Any

import pytest

from usersyncd.config import ConfigError, load_config

BASE = {"database.url": "postgresql://u@localhost/app", "api.url": "https://api.example.com"}


def load(**overrides: Any) -> Any:
    return load_config(None, environ={}, overrides={**BASE, **overrides})


def test_defaults_ignore_deletions_and_reconcile_hourly() -> None:
    """By default nothing is sent for a deleted user, and the pass runs every hour."""
    config = load()
    assert (config.source.on_delete, config.source.reconcile_every, config.api.unsubscribe_path) == (
        "ignore",
        3600.0,
        "",
    )


def test_unsubscribe_needs_the_unsubscribe_path_named_in_one_line() -> None:
    """on_delete = "unsubscribe" without api.unsubscribe_path: one line naming that key."""
    with pytest.raises(ConfigError) as caught:
        load(**{"source.on_delete": "unsubscribe"})
    assert str(caught.value).startswith('api.unsubscribe_path: required by source.on_delete = "unsubscribe"')


def test_unsubscribe_path_takes_the_account_id_like_the_batch_path() -> None:
    """{account_id} is replaced; an unknown placeholder or a missing account id is refused."""
    config = load(
        **{
            "source.on_delete": "unsubscribe",
            "api.account_id": 9999999,
            "api.unsubscribe_path": "/v2/{account_id}/unsubscribes/batches",
        }
    )
    assert config.api.resolve(config.api.unsubscribe_path) == "/v2/9999999/unsubscribes/batches"
    with pytest.raises(ConfigError, match=r"api.unsubscribe_path: uses \{account_id\}"):
        load(**{"api.unsubscribe_path": "/v2/{account_id}/unsubscribes/batches"})
    with pytest.raises(ConfigError, match="api.unsubscribe_path: must start with '/'"):
        load(**{"api.unsubscribe_path": "unsubscribes"})


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("source.on_delete", "delete", "source.on_delete: Input should be 'ignore' or 'unsubscribe'"),
        ("source.reconcile_every", -1, "source.reconcile_every: Input should be greater than or equal to 0"),
    ],
)
def test_bad_values_are_one_line(key: str, value: Any, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(**{key: value})
    assert str(caught.value) == problem
