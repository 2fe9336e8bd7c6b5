"""Subscriber records: building the API payload from a row, validating it, hashing it.

Pure functions, no I/O: the worker calls them on the rows it fetched at send time.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import functools
import hashlib
import importlib.resources
import json
import math
import re
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import orjson

MAX_FIELD_LENGTH = 255  # characters; the API's limit for string fields
EMAIL = "email"  # the API field every subscriber must have
TIME_ZONE = "time_zone"  # the API field checked against the IANA database
TAGS = "tags"  # a list the API adds to; those sent before and dropped since go as remove_tags
NEW_EMAIL = "new_email"  # with EMAIL the old one: the API renames that subscriber (G12)
REMOVE_TAGS = "remove_tags"
_EXCERPT = 64  # characters of a bad value quoted in a reason
_MASK = "***"
_TOO_LONG = f"longer than {MAX_FIELD_LENGTH} characters"

# The common address, checked without email-validator: ASCII dot-atom local part, ASCII
# hostname labels of at most 63 characters with single hyphens inside (so no Punycode "xn--" or
# reserved "ab--" label), a TLD of letters that is no special-use name (.test, .local, ...:
# never globally deliverable, and each is one label). It only ever says "valid" where
# email-validator does (tests/unit/test_email_fast_path.py); anything else goes to
# email-validator, which words the reason.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LABEL = r"(?=[A-Za-z0-9-]{1,63}\.)[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*\."
# email-validator's SPECIAL_USE_DOMAIN_NAMES (a unit test keeps them equal): written out, so
# that the library is imported only for an address the pattern leaves to it (~25 ms per start)
SPECIAL_USE_DOMAIN_NAMES = ("arpa", "invalid", "local", "localhost", "onion", "test")
_SPECIAL_USE = "|".join(map(re.escape, SPECIAL_USE_DOMAIN_NAMES))
assert "." not in _SPECIAL_USE, "a dotted special-use name: the pattern checks the TLD alone"
_PLAIN_EMAIL = re.compile(
    rf"{_ATEXT}+(?:\.{_ATEXT}+)*@(?:{_LABEL})+(?!(?i:{_SPECIAL_USE})\Z)[A-Za-z]{{1,63}}"
)
_EMAIL_MAX = 254  # email-validator's limit on the whole address (characters, here ASCII)
_SCALARS = frozenset({str, bool, int, float})  # exact types: skips isinstance for the usual


@dataclasses.dataclass(frozen=True)
class Invalid:
    """Why one user cannot be sent: the API field and a one-line reason."""

    user_id: str
    field: str
    reason: str


def build_payload(row: Mapping[str, Any], fields: Mapping[str, str]) -> dict[str, Any]:
    """The subscriber object for `row`: API field -> JSON value, nulls left out.

    Raises KeyError for a mapped column missing from the row, TypeError for a value with
    no JSON form (`validate` turns it into an `Invalid`) and ValueError for a mapping where
    one API field is both a value and the parent of a dotted one.
    """
    return _nest((api_field, to_json(row[column])) for api_field, column in fields.items())


def validate(user_id: str, row: Mapping[str, Any], fields: Mapping[str, str]) -> dict[str, Any] | Invalid:
    """The payload of `row`, or the first problem found (email, time zone, then each field)."""
    email = row[fields[EMAIL]]
    if type(email) is not str or not _plain_email(email):  # the usual address needs no more
        problem = _email_problem(email)
        if problem:
            return Invalid(user_id, EMAIL, problem)
    zone_column = fields.get(TIME_ZONE)
    if zone_column is not None:
        problem = _time_zone_problem(row[zone_column])
        if problem:
            return Invalid(user_id, TIME_ZONE, problem)
    payload: dict[str, Any] = {}
    for api_field, column in fields.items():
        value = row[column]
        kind = type(value)
        if kind is str:  # the usual value: to_json keeps it, only its length can be wrong
            if len(value) > MAX_FIELD_LENGTH:
                return Invalid(user_id, api_field, _TOO_LONG)
        elif not (value is None or kind is int or kind is bool):
            try:
                value = to_json(value)
            except TypeError as exc:
                return Invalid(user_id, api_field, str(exc))
            problem = _value_problem(value)
            if problem:
                return Invalid(user_id, api_field, problem)
        payload[api_field] = value
    return payload if _flat(fields) else _nest(payload.items())


def content_hash(payload: Mapping[str, Any]) -> bytes:
    """SHA-256 of the payload's canonical JSON: equal payloads, equal hash, key order aside."""
    return hashlib.sha256(canonical_json(payload)).digest()


def canonical_json(payload: Any) -> bytes:
    """Compact UTF-8 JSON with sorted keys: the bytes `json.dumps(sort_keys=True,
    separators=(",", ":"), ensure_ascii=False)` gives, the format of every stored hash. orjson
    writes exactly these ~10x faster, except floats (1e-05 is 0.00001 there) and the values it
    refuses (an int beyond 64 bits, a lone surrogate), which keep json's answer."""
    if not _has_float(payload):
        try:
            return orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:
            pass
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class Prior(NamedTuple):
    """What `sync_state` keeps of what the API last accepted for a user (G12). (NamedTuples:
    one of each per user sent, created twice as fast as a frozen dataclass.)"""

    email: str | None  # the email the API keys its subscriber by; None: never sent (or sent before 0010)
    pending: str | None  # a rename to this one may have landed unanswered: the API holds one of the two
    tags: list[Any] | None  # the tags last sent

    def unchanged(self, payload: Mapping[str, Any], sent_hash: bytes | None, digest: bytes) -> bool:
        """The API holds exactly this payload already, under its email (G4)."""
        return (
            sent_hash == digest
            and self.pending is None
            and self.email in (None, payload[EMAIL])  # None: sent before emails were kept
        )


NEVER_SENT = Prior(None, None, None)


class Subscriber(NamedTuple):
    """What goes to the API for one user, and what the API holds once it accepts it."""

    body: dict[str, Any]
    email: str  # the email the API keys the subscriber by once this is accepted
    pending: str | None  # a rename this body starts: its NEW is kept before sending (`Prior.pending`)
    again: bool  # the row's email is not `email` yet: the user goes once more after this


def subscriber(payload: dict[str, Any], prior: Prior, *, rename: bool) -> Subscriber:
    """The body for `payload` given what the API last accepted (G12).

    An email changed since the last accepted send goes as {"email": OLD, "new_email": NEW}: the
    API renames OLD's subscriber (or, OLD gone, takes NEW as it is; Drip documents the latter, so
    a rename sent twice lands once). A rename whose answer never came leaves the subscriber under
    OLD or NEW (`prior.pending`); what goes next lands right either way: NEW's payload as the
    rename again; the row back at OLD as NEW renamed to OLD; a third email as the rename to NEW
    first (`again`: the third goes next time, once the API holds NEW for certain). Tags sent
    before and no longer in the payload go as remove_tags (a null `tags` column removes them all).
    """
    email = payload[EMAIL]
    old, alt = prior.email, prior.pending
    tagged = bool(prior.tags) and TAGS in payload
    if (not rename or old is None or (old == email and alt is None)) and not tagged:
        return Subscriber(payload, email, None, False)  # the usual: the row's payload as it is
    body, holds, pending = payload, email, None
    if rename and old is not None and (old != email or alt is not None):
        if alt is None:
            key, new, pending = old, email, email
        elif email == old:  # back to OLD while a rename to alt may have landed
            key, new = alt, old
        else:  # alt is NEW, or a third email: the API holds OLD or alt, so rename to alt first
            key, new = old, alt
        body = {EMAIL: key, NEW_EMAIL: new} | {k: v for k, v in payload.items() if k != EMAIL}
        holds = new
    if tagged:
        assert prior.tags is not None
        current = payload[TAGS] if isinstance(payload[TAGS], list) else []
        removed: list[Any] = []
        for tag in prior.tags:
            if tag not in current and tag not in removed:
                removed.append(tag)
        if removed:
            body = {**body, REMOVE_TAGS: removed}
    return Subscriber(body, holds, pending, holds != email)


def tags_json(payload: Mapping[str, Any]) -> str | None:
    """The payload's tags as `sync_state.sent_tags` keeps them (JSON), None without any."""
    tags = payload.get(TAGS)
    return None if tags is None else canonical_json(tags).decode("utf-8")


def redacted_sample(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The payload's shape for a dry-run log: strings cut to their first character (+ domain)."""
    return {key: _redact(value) for key, value in payload.items()}


def to_json(value: Any) -> Any:
    """A column value as a JSON value (dates ISO 8601, decimals and UUIDs as strings)."""
    if value is None or type(value) in _SCALARS or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, datetime.date | datetime.time):  # datetime is a date
        return value.isoformat()
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, list | tuple):  # PostgreSQL arrays, e.g. tags
        return [to_json(item) for item in value]
    if isinstance(value, Mapping):  # json/jsonb with a decoding codec
        return {str(key): to_json(item) for key, item in value.items()}
    raise TypeError(f"unsupported value type {type(value).__name__}")


def compact_json(value: Any) -> bytes:
    """Compact UTF-8 JSON as httpx writes a `json=` body (keys in their order), by orjson;
    floats and the values orjson refuses keep json's answer (NaN is an error there)."""
    if not _has_float(value):
        try:
            return orjson.dumps(value)
        except orjson.JSONEncodeError:
            pass
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def _has_float(value: Any) -> bool:
    """A float anywhere inside: exact types first (a payload is mostly strings)."""
    if type(value) is dict:  # a payload: skips the Mapping ABC check
        items: Iterable[Any] = value.values()
    elif isinstance(value, Mapping):
        items = value.values()
    else:
        items = value if isinstance(value, list | tuple) else (value,)
    for item in items:
        kind = type(item)
        if kind is str or kind is int or kind is bool or item is None:
            continue
        if isinstance(item, float) or (isinstance(item, Mapping | list | tuple) and _has_float(item)):
            return True
    return False


def _nest(values: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """Dotted API names become nested objects. A null is sent as null: a field cleared in the
    table is cleared at the API too (G3: the API holds the latest state of every mapped field)."""
    values = list(values)
    names = [api_field for api_field, _ in values]
    _check_shape(names)
    if not any("." in api_field for api_field in names):
        return dict(values)
    payload: dict[str, Any] = {}
    for api_field, value in values:
        *parents, leaf = api_field.split(".")
        node = payload
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return payload


def _flat(fields: Mapping[str, Any]) -> bool:
    """No dotted API name (the payload is the pairs as they are). Checks the shape once per
    mapping: the answer is kept for this very mapping object (a config's, never changed)."""
    known = _FLAT.get(id(fields))
    if known is not None and known[0] is fields:
        return known[1]
    names = tuple(fields)
    _check_shape(list(names))
    flat = not any("." in api_field for api_field in names)
    if len(_FLAT) >= _FLAT_MAX:
        _FLAT.clear()
    _FLAT[id(fields)] = (fields, flat)  # holds the mapping: its id is not reused meanwhile
    return flat


_FLAT: dict[int, tuple[Mapping[str, Any], bool]] = {}
_FLAT_MAX = 64


def _check_shape(api_fields: list[str]) -> None:
    """Refuse a mapping where one API field is both a value and a parent, whatever the data."""
    names = set(api_fields)
    for api_field in api_fields:
        parts = api_field.split(".")
        for depth in range(1, len(parts)):
            parent = ".".join(parts[:depth])
            if parent in names:
                raise ValueError(f"API field {api_field!r} nests inside {parent!r}, a value")


def _email_problem(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return "missing"
    if not isinstance(value, str):
        return f"not a string but {type(value).__name__}"
    if _plain_email(value):
        return None
    import email_validator  # here, not at the top: see SPECIAL_USE_DOMAIN_NAMES

    try:
        # never DNS: the syntax is ours to check, deliverability is the API's business
        email_validator.validate_email(value, check_deliverability=False)
    except email_validator.EmailNotValidError as exc:
        return f"not a valid email address: {_one_line(str(exc))}"
    return None


def _plain_email(value: str) -> bool:
    """A plain ASCII address email-validator accepts: True only when certain (then ~0.4 µs).
    Its domain is at most 252 characters then (below email-validator's 253)."""
    return len(value) <= _EMAIL_MAX and _PLAIN_EMAIL.fullmatch(value) is not None


def _time_zone_problem(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        return f"not a string but {type(value).__name__}"
    if value not in _iana_zones():
        return f"unknown IANA time zone {_excerpt(value)}"
    return None


def _value_problem(value: Any) -> str | None:
    """A string too long or a float JSON cannot carry, anywhere inside the value."""
    if isinstance(value, str) and len(value) > MAX_FIELD_LENGTH:
        return _TOO_LONG
    if isinstance(value, float) and not math.isfinite(value):
        return f"not a finite number ({value})"
    if isinstance(value, list):
        return next(filter(None, map(_value_problem, value)), None)
    if isinstance(value, dict):
        return next(filter(None, map(_value_problem, value.values())), None)
    return None


@functools.cache
def _iana_zones() -> frozenset[str]:
    """Zone names from the tzdata package: the same list on every host (no 'localtime', paths)."""
    text = importlib.resources.files("tzdata").joinpath("zones").read_text(encoding="utf-8")
    # "Factory" is tzdata's placeholder for an unset zone, not a place
    return frozenset(line.strip() for line in text.splitlines() if line.strip()) - {"Factory"}


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        return _mask(value)
    if isinstance(value, list):
        return [_redact(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _redact(item) for key, item in value.items()}
    return value


def _mask(text: str) -> str:
    if not text:
        return text
    local, at, domain = text.rpartition("@")
    if at and local:
        return f"{local[0]}{_MASK}@{domain}"
    return f"{text[0]}{_MASK}"


def _excerpt(value: str) -> str:
    """A quoted, one-line, bounded rendering of a bad value."""
    return repr(value if len(value) <= _EXCERPT else value[:_EXCERPT] + "…")


def _one_line(text: str) -> str:
    return " ".join(text.split())
