"""The plain-address fast path gives email-validator's verdicts, word for word, on any input."""

from __future__ import annotations

import email_validator
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from usersyncd import records


def reference_problem(value: str) -> str | None:
    """`records._email_problem` as it was before the fast path: email-validator on everything."""
    if not value.strip():
        return "missing"
    try:
        email_validator.validate_email(value, check_deliverability=False)
    except email_validator.EmailNotValidError as exc:
        return f"not a valid email address: {' '.join(str(exc).split())}"
    return None


CORPUS = [
    "user1@example.com",
    "First.Last+tag@Sub.Example.COM",
    "POSTMASTER@EXAMPLE.ORG",
    "a!#$%&'*+/=?^_`{|}~-z@example.com",
    "a..b@example.com",
    ".a@example.com",
    "a.@example.com",
    "a@example.com.",
    "a@.example.com",
    "a@example..com",
    "a@-example.com",
    "a@example-.com",
    "a@ex--ample.com",
    "a@xn--bcher-kva.ch",
    "a@xn--zz.com",
    "a@ab--cd.com",
    "a@bücher.ch",
    "a@BÜCHER.ch",
    "ü@example.com",
    "a@example.c0m",
    "a@example.123",
    "a@1.2.3.4",
    "a@[1.2.3.4]",
    "a@[IPv6:::1]",
    '"a b"@example.com',
    '"a@b"@example.com',
    "a@b@example.com",
    "a b@example.com",
    " a@example.com",
    "a@example.com ",
    "a@example.com\n",
    "Name <a@example.com>",
    "a@localhost",
    "a@example",
    "a@foo.test",
    "a@foo.TEST",
    "a@foo.Localhost",
    "a@foo.testing",
    "a@localhost.com",
    "a@a-b-c.com",
    "a@a-.b.com",
    "a@foo.local",
    "a@x.onion",
    "a@4.3.2.1.in-addr.arpa",
    "a@invalid",
    "a@foo.invalid",
    "a@mytest.com",
    "a@" + "l" * 63 + ".com",
    "a@" + "l" * 64 + ".com",
    "a@" + ".".join(["l" * 63] * 4) + ".com",
    "x" * 64 + "@example.com",
    "x" * 65 + "@example.com",
    "x" * 241 + "@example.com",
    "x" * 242 + "@example.com",
    "a@exa_mple.com",
    "a@example.com\u200b",
    "a\uff20example.com",
    "@example.com",
    "a@",
    "a",
]


@pytest.mark.parametrize("address", CORPUS)
def test_corpus_verdicts_are_email_validators(address: str) -> None:
    assert records._email_problem(address) == reference_problem(address)


def test_plain_addresses_take_the_fast_path() -> None:
    assert records._plain_email("user1@example.com")
    assert records._plain_email("First.Last+tag@Sub.Example.COM")
    assert not records._plain_email("a@xn--bcher-kva.ch")  # IDNA: email-validator's
    assert not records._plain_email("a@foo.test")


_LOCAL_CHARS = "abcXYZ09.!#$%&'*+/=?^_`{|}~-\"\\ @<>()[],;:ü\u0301\u200b\x00\t"
_DOMAIN_CHARS = "abcXYZ09.-_[]:ü\u00df\u0660ä\u200d"
_LABELS = [
    "com",
    "COM",
    "example",
    "ex-ample",
    "xn--bcher-kva",
    "xn--zz",
    "ab--cd",
    "test",
    "local",
    "localhost",
    "invalid",
    "onion",
    "arpa",
    "123",
    "1",
    "c0m",
    "l" * 63,
    "l" * 64,
    "bücher",
    "IPv6:::1",
    "",
    "-a",
    "a-",
]
locals_ = st.one_of(
    st.text(_LOCAL_CHARS, min_size=0, max_size=70),
    st.sampled_from(["user", "a.b", "x" * 64, "x" * 240, '"q"', '"a b"', "ü", "a..b", ".a", "a."]),
)
domains = st.one_of(
    st.text(_DOMAIN_CHARS, min_size=0, max_size=40),
    st.lists(st.sampled_from(_LABELS), min_size=1, max_size=5).map(".".join),
    st.lists(st.sampled_from(_LABELS), min_size=1, max_size=4).map(lambda ls: ".".join(ls) + "."),
    st.sampled_from(["[1.2.3.4]", "[IPv6:::1]", "1.2.3.4", "example.com", "EXAMPLE.COM"]),
)


@settings(max_examples=3000, deadline=None)
@given(local=locals_, at=st.sampled_from(["@", "@", "@", "", "@@", "\uff20"]), domain=domains)
@example(local="a", at="@", domain="example.com")
def test_any_address_gets_email_validators_verdict(local: str, at: str, domain: str) -> None:
    address = local + at + domain
    assert records._email_problem(address) == reference_problem(address)


@settings(max_examples=2000, deadline=None)
@given(st.text(min_size=1, max_size=80))
def test_any_text_gets_email_validators_verdict(text: str) -> None:
    assert records._email_problem(text) == reference_problem(text)
