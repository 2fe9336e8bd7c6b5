"""records.py: payload building, validation, content hash, redaction."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import hashlib
import json
import uuid
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from usersyncd import records

FIELDS = {"email": "email", "name": "name", "time_zone": "time_zone"}


def row(**values: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"email": "John.Doe@Example.com", "name": "John", "time_zone": "UTC"}
    return base | values


def test_build_payload_maps_api_fields_to_columns() -> None:
    """Each API field takes the value of the column it is mapped to."""
    payload = records.build_payload(
        {"mail": "a@example.com", "full_name": "Ann"}, {"email": "mail", "name": "full_name"}
    )
    assert payload == {"email": "a@example.com", "name": "Ann"}


def test_build_payload_nests_dotted_fields() -> None:
    """Dotted API names build nested objects, sharing a parent and at any depth."""
    fields = {
        "email": "email",
        "custom_fields.plan": "plan",
        "custom_fields.seats": "seats",
        "a.b.c": "deep",
    }
    payload = records.build_payload(
        {"email": "a@example.com", "plan": "pro", "seats": 3, "deep": True}, fields
    )
    assert payload == {
        "email": "a@example.com",
        "custom_fields": {"plan": "pro", "seats": 3},
        "a": {"b": {"c": True}},
    }


def test_build_payload_sends_nulls_so_a_cleared_field_is_cleared() -> None:
    """A null value is sent as null, nested ones too: the API ends with the row as it is (G3)."""
    fields = {"email": "email", "name": "name", "custom_fields.plan": "plan"}
    payload = records.build_payload({"email": "a@example.com", "name": None, "plan": None}, fields)
    assert payload == {"email": "a@example.com", "name": None, "custom_fields": {"plan": None}}


def test_build_payload_converts_values_to_json() -> None:
    """Dates become ISO 8601, decimals and UUIDs strings, arrays lists; JSON scalars stay."""
    ident = uuid.UUID("12345678-1234-5678-1234-567812345678")
    fields = {k: k for k in ("email", "at", "day", "price", "uid", "tags", "n", "x", "ok")}
    values = {
        "email": "a@example.com",
        "at": datetime.datetime(2024, 5, 1, 12, 30, tzinfo=datetime.UTC),
        "day": datetime.date(2024, 5, 1),
        "price": decimal.Decimal("9.90"),
        "uid": ident,
        "tags": ("vip", decimal.Decimal("1")),
        "n": 3,
        "x": 1.5,
        "ok": False,
    }
    assert records.build_payload(values, fields) == {
        "email": "a@example.com",
        "at": "2024-05-01T12:30:00+00:00",
        "day": "2024-05-01",
        "price": "9.90",
        "uid": "12345678-1234-5678-1234-567812345678",
        "tags": ["vip", "1"],
        "n": 3,
        "x": 1.5,
        "ok": False,
    }


def test_build_payload_refuses_a_field_that_is_both_value_and_parent() -> None:
    """A mapping with 'custom_fields' and 'custom_fields.plan' is refused whatever the data."""
    fields = {"email": "email", "custom_fields": "cf", "custom_fields.plan": "plan"}
    with pytest.raises(ValueError, match="custom_fields"):
        records.build_payload({"email": "a@example.com", "cf": None, "plan": "pro"}, fields)


def test_validate_returns_the_payload_of_a_good_row() -> None:
    """A valid row yields its payload, the email exactly as the user wrote it."""
    assert records.validate("1", row(), FIELDS) == {
        "email": "John.Doe@Example.com",
        "name": "John",
        "time_zone": "UTC",
    }


@pytest.mark.parametrize("email", [None, "", "   "])
def test_validate_reports_a_missing_email(email: str | None) -> None:
    """A null or blank email is 'missing'."""
    assert records.validate("7", row(email=email), FIELDS) == records.Invalid("7", "email", "missing")


@pytest.mark.parametrize(
    "email", ["john", "john@", "@example.com", "a b@example.com", "a@b..com", "a@localhost"]
)
def test_validate_reports_an_invalid_email(email: str) -> None:
    """A syntactically invalid address is refused with the validator's reason on one line."""
    result = records.validate("7", row(email=email), FIELDS)
    assert isinstance(result, records.Invalid)
    assert (result.user_id, result.field) == ("7", "email")
    assert result.reason.startswith("not a valid email address: ")
    assert "\n" not in result.reason


def test_validate_reports_a_non_string_email() -> None:
    """An email column of another type is refused, naming the type."""
    result = records.validate("7", row(email=42), FIELDS)
    assert result == records.Invalid("7", "email", "not a string but int")


def test_validate_never_resolves_dns_for_email() -> None:
    """A domain that does not exist passes: deliverability is not checked."""
    result = records.validate("7", row(email="x@no-such-domain-for-usersyncd.example"), FIELDS)
    assert isinstance(result, dict)


@pytest.mark.parametrize(
    "zone", ["Mars/Base", "", "localtime", "/etc/localtime", "../etc/passwd", "Factory", "utc"]
)
def test_validate_reports_an_unknown_time_zone(zone: str) -> None:
    """Anything but an IANA zone name (paths, 'localtime', wrong case, '') is refused."""
    result = records.validate("9", row(time_zone=zone), FIELDS)
    assert result == records.Invalid("9", "time_zone", f"unknown IANA time zone {zone!r}")


@pytest.mark.parametrize("zone", ["UTC", "America/New_York", "Europe/Paris", "Etc/GMT+5"])
def test_validate_accepts_iana_time_zones(zone: str) -> None:
    """IANA zone names pass and are sent as they are."""
    result = records.validate("9", row(time_zone=zone), FIELDS)
    assert isinstance(result, dict) and result["time_zone"] == zone


def test_validate_allows_a_null_time_zone() -> None:
    """A null time zone is valid and sent as null."""
    result = records.validate("9", row(time_zone=None), FIELDS)
    assert result == {"email": "John.Doe@Example.com", "name": "John", "time_zone": None}


def test_validate_skips_time_zone_when_not_mapped() -> None:
    """Without a time_zone mapping no column is checked as a zone."""
    fields = {"email": "email", "zone_label": "time_zone"}
    result = records.validate("9", row(time_zone="not a zone"), fields)
    assert result == {"email": "John.Doe@Example.com", "zone_label": "not a zone"}


def test_validate_reports_a_string_longer_than_the_limit() -> None:
    """A string of 256 characters is refused; 255 passes."""
    assert isinstance(records.validate("3", row(name="x" * 255), FIELDS), dict)
    result = records.validate("3", row(name="x" * 256), FIELDS)
    assert result == records.Invalid("3", "name", "longer than 255 characters")


def test_validate_names_the_dotted_field_that_is_too_long() -> None:
    """A long value in a nested or list field is reported under its dotted API name."""
    fields = FIELDS | {"custom_fields.plan": "plan", "tags": "tags"}
    result = records.validate("3", row(plan="p" * 300, tags=None), fields)
    assert result == records.Invalid("3", "custom_fields.plan", "longer than 255 characters")
    result = records.validate("3", row(plan="pro", tags=["ok", "t" * 300]), fields)
    assert result == records.Invalid("3", "tags", "longer than 255 characters")


def test_validate_reports_email_before_time_zone() -> None:
    """With several problems, the email is reported first."""
    result = records.validate("5", row(email=None, time_zone="Mars/Base"), FIELDS)
    assert isinstance(result, records.Invalid) and result.field == "email"


def test_validate_reports_a_non_finite_number() -> None:
    """NaN has no JSON form, so it is refused rather than breaking the whole request."""
    result = records.validate("5", row(score=float("nan")), FIELDS | {"score": "score"})
    assert result == records.Invalid("5", "score", "not a finite number (nan)")


def test_validate_reports_an_unsupported_value_type() -> None:
    """A column type with no JSON form (bytea) is refused, naming the type."""
    result = records.validate("5", row(blob=b"\x00"), FIELDS | {"blob": "blob"})
    assert result == records.Invalid("5", "blob", "unsupported value type bytes")


def test_invalid_is_immutable() -> None:
    """An Invalid cannot be changed after the fact."""
    invalid = records.Invalid("1", "email", "missing")
    with pytest.raises(dataclasses.FrozenInstanceError):
        invalid.reason = "other"  # type: ignore[misc]


def test_content_hash_ignores_key_order() -> None:
    """Equal payloads hash equal whatever the order of their keys, nested ones included."""
    one = {"email": "a@example.com", "name": "Ann", "custom_fields": {"plan": "pro", "seats": 2}}
    two = {"custom_fields": {"seats": 2, "plan": "pro"}, "name": "Ann", "email": "a@example.com"}
    assert records.content_hash(one) == records.content_hash(two)
    assert len(records.content_hash(one)) == 32


def test_content_hash_changes_with_any_value() -> None:
    """A changed, added or retyped value changes the hash."""
    base = {"email": "a@example.com", "name": "Ann"}
    hashes = {
        records.content_hash(base),
        records.content_hash(base | {"name": "Anne"}),
        records.content_hash(base | {"time_zone": "UTC"}),
        records.content_hash(base | {"name": 1}),
        records.content_hash(base | {"name": "1"}),
    }
    assert len(hashes) == 5


def test_content_hash_is_stable() -> None:
    """The hash is SHA-256 of canonical JSON, so it survives restarts and other replicas."""
    payload = {"name": "Zoë", "email": "z@example.com"}
    canonical = '{"email":"z@example.com","name":"Zoë"}'.encode()
    assert records.content_hash(payload) == hashlib.sha256(canonical).digest()


def test_redacted_sample_masks_every_string() -> None:
    """Strings keep their first character (emails their domain); shape and non-strings stay."""
    payload = {
        "email": "john@example.com",
        "name": "John",
        "time_zone": "America/New_York",
        "custom_fields": {"plan": "pro", "seats": 3},
        "tags": ["vip", "beta"],
        "note": "",
        "active": True,
    }
    assert records.redacted_sample(payload) == {
        "email": "j***@example.com",
        "name": "J***",
        "time_zone": "A***",
        "custom_fields": {"plan": "p***", "seats": 3},
        "tags": ["v***", "b***"],
        "note": "",
        "active": True,
    }


_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)  # beyond 64 bits: orjson refuses those
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),  # any code point: controls, U+2028, astral, lone surrogates
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=1500, deadline=None)
@given(st.dictionaries(st.text(max_size=12), _JSON_VALUES, max_size=6))
@example({"email": "a@example.com", "small": 1e-05, "big": 1e16, "ctl": "\x00\x1f\x7f\u2028"})
def test_canonical_json_is_the_stored_hash_format(payload: dict) -> None:
    """The hash's bytes are json.dumps' as before orjson (no stored hash changes): the same
    bytes, or the same error for a value neither can write."""
    try:
        before = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
            "utf-8"
        )
    except UnicodeEncodeError:
        with pytest.raises(UnicodeEncodeError):
            records.canonical_json(payload)
        return
    assert records.canonical_json(payload) == before


def test_canonical_json_uses_orjson_for_plain_payloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The common payload never reaches json.dumps (the slow path this replaced)."""
    payload = {"email": "a@example.com", "name": "Zoë", "tags": ["a", "b"], "n": 3}
    before = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    monkeypatch.setattr(records.json, "dumps", None)
    assert records.canonical_json(payload) == before


@settings(max_examples=800, deadline=None)
@given(st.lists(st.dictionaries(st.text(max_size=12), _JSON_VALUES, max_size=6), max_size=5))
@example([{"email": "a@example.com", "small": 1e-05}])
def test_compact_json_is_what_httpx_sent(subscribers: list) -> None:
    """The request body: the bytes httpx's `json=` wrote (json.dumps, compact, UTF-8), or
    for floats the same values (1e-05 may read 0.00001); keys keep their order."""
    body = {"batches": [{"subscribers": subscribers}]}
    try:
        before = json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:
        with pytest.raises(UnicodeEncodeError):
            records.compact_json(body)
        return
    after = records.compact_json(body)
    assert json.loads(after) == json.loads(before)
    assert list(json.loads(after)["batches"][0]["subscribers"]) == subscribers
    if not records._has_float(body):
        assert after == before
