"""The worker's decisions as plain functions: which answers prove the key, how forming rounds
grow, which errors are one batch's own."""

from __future__ import annotations

import asyncpg
import pytest

from usersyncd import api, former, outcomes, reading, worker
from usersyncd.errors import TransientDeliveryError


def outcome(kind: api.OutcomeKind, status: int | None) -> api.Outcome:
    return api.Outcome(
        kind=kind,
        status=status,
        duration_ms=1.0,
        request_id="r",
        response_request_id=None,
        error=None,
        body_excerpt=None,
        retry_after=None,
        rate_limit_remaining=None,
    )


@pytest.mark.parametrize(
    ("kind", "status", "proves"),
    [
        (api.OutcomeKind.OK, 201, True),
        (api.OutcomeKind.REJECTED, 422, True),
        (api.OutcomeKind.REJECTED, 400, True),
        (api.OutcomeKind.REJECTED, 409, True),
        (api.OutcomeKind.TOO_LARGE, 413, True),
        (api.OutcomeKind.REJECTED, 404, False),
        (api.OutcomeKind.TRANSIENT, 503, False),
        (api.OutcomeKind.TRANSIENT, None, False),
        (api.OutcomeKind.RATE_LIMITED, 429, False),
        (api.OutcomeKind.UNAUTHORIZED, 401, False),
    ],
)
def test_only_answers_about_the_records_prove_the_credentials(
    kind: api.OutcomeKind, status: int | None, proves: bool
) -> None:
    """A probe resumes sending on a 2xx or a 4xx that judged the records, never on a 5xx, a
    timeout, a 404 or a 429."""
    assert outcomes.proves_credentials(outcome(kind, status)) is proves


def test_forming_rounds_grow_with_the_share_dropped() -> None:
    """The first round asks for what is missing; later rounds scale by taken/kept, never below
    what is missing and never above FORM_ROUND_MAX."""
    assert former.form_round(1000, 0, 0) == 1000
    assert former.form_round(990, 1000, 10) == former.FORM_ROUND_MAX
    assert former.form_round(50, 1000, 950) == 53
    assert former.form_round(500, 1000, 0) == 5000
    assert former.form_round(10, 10, 10) == 10


@pytest.mark.parametrize(
    ("error", "one_batch"),
    [
        (ValueError("ordinal must be >= 1"), True),
        (RuntimeError("builder broke"), True),
        (asyncpg.exceptions.CharacterNotInRepertoireError("invalid byte sequence"), True),
        (asyncpg.exceptions.UndefinedColumnError("column does not exist"), False),
        (asyncpg.exceptions.ConnectionDoesNotExistError("gone"), False),
        (TimeoutError(), False),
        (TransientDeliveryError("HTTP 503"), False),
        (worker.Stopping(), False),
    ],
)
def test_errors_confined_to_one_batch(error: Exception, one_batch: bool) -> None:
    """Data errors and bugs on one batch's rows are its own; the connection, our SQL, the API
    and shutdown are not."""
    assert worker.confined(error) is one_batch


def test_data_errors_are_what_reading_fewer_rows_can_avoid() -> None:
    assert reading.is_data_error(ValueError("ordinal must be >= 1"))
    assert reading.is_data_error(asyncpg.exceptions.CharacterNotInRepertoireError("x"))
    assert not reading.is_data_error(asyncpg.exceptions.UndefinedTableError("x"))
    assert not reading.is_data_error(OSError("connection reset"))
