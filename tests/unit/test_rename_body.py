"""The body sent for a user given what the API last accepted (SPEC G12): renames, the rename
whose answer was lost, and tags removed since the last accepted send."""

from __future__ import annotations

from typing import Any

from usersyncd import records
from usersyncd.records import Prior


def body(payload: dict[str, Any], prior: Prior, *, rename: bool = True) -> records.Subscriber:
    return records.subscriber(payload, prior, rename=rename)


def test_unchanged_email_goes_as_it_is() -> None:
    sub = body({"email": "a@x.io", "name": "A"}, Prior("a@x.io", None, None))
    assert sub == records.Subscriber({"email": "a@x.io", "name": "A"}, "a@x.io", None, False)


def test_never_sent_goes_as_it_is() -> None:
    assert body({"email": "a@x.io"}, records.NEVER_SENT).body == {"email": "a@x.io"}


def test_a_changed_email_renames_the_subscriber() -> None:
    sub = body({"email": "new@x.io", "name": "A"}, Prior("old@x.io", None, None))
    assert sub.body == {"email": "old@x.io", "new_email": "new@x.io", "name": "A"}
    assert list(sub.body)[:2] == ["email", "new_email"]
    assert (sub.email, sub.pending, sub.again) == ("new@x.io", "new@x.io", False)


def test_rename_none_sends_the_new_email_alone() -> None:
    sub = body({"email": "new@x.io"}, Prior("old@x.io", "x@x.io", None), rename=False)
    assert sub == records.Subscriber({"email": "new@x.io"}, "new@x.io", None, False)


def test_a_rename_whose_answer_was_lost_is_sent_again_as_the_rename() -> None:
    """The API holds old@ or new@: the same rename lands on either (Drip takes new_email when
    email is gone)."""
    sub = body({"email": "new@x.io"}, Prior("old@x.io", "new@x.io", None))
    assert sub.body == {"email": "old@x.io", "new_email": "new@x.io"}
    assert (sub.email, sub.pending, sub.again) == ("new@x.io", None, False)  # kept, not started


def test_back_to_the_old_email_after_a_lost_rename_renames_back() -> None:
    sub = body({"email": "old@x.io"}, Prior("old@x.io", "new@x.io", None))
    assert sub.body == {"email": "new@x.io", "new_email": "old@x.io"}
    assert (sub.email, sub.pending, sub.again) == ("old@x.io", None, False)


def test_a_third_email_after_a_lost_rename_finishes_that_rename_first() -> None:
    """One request cannot rename from two possible emails: the pending rename is finished
    (with the row's other fields) and the user goes once more for the third email."""
    sub = body({"email": "third@x.io", "name": "A"}, Prior("old@x.io", "new@x.io", None))
    assert sub.body == {"email": "old@x.io", "new_email": "new@x.io", "name": "A"}
    assert (sub.email, sub.pending, sub.again) == ("new@x.io", None, True)


def test_tags_removed_since_the_last_accepted_send_go_as_remove_tags() -> None:
    sub = body({"email": "a@x.io", "tags": ["b", "c"]}, Prior("a@x.io", None, ["a", "b", "a", "d"]))
    assert sub.body == {"email": "a@x.io", "tags": ["b", "c"], "remove_tags": ["a", "d"]}


def test_a_null_tags_column_removes_every_tag_sent() -> None:
    sub = body({"email": "a@x.io", "tags": None}, Prior("a@x.io", None, ["a"]))
    assert sub.body == {"email": "a@x.io", "tags": None, "remove_tags": ["a"]}


def test_no_remove_tags_when_none_was_dropped_or_tags_are_not_mapped() -> None:
    assert (
        "remove_tags" not in body({"email": "a@x.io", "tags": ["a", "b"]}, Prior("a@x.io", None, ["a"])).body
    )
    assert "remove_tags" not in body({"email": "a@x.io"}, Prior("a@x.io", None, ["a"])).body


def test_a_rename_carries_remove_tags_too() -> None:
    sub = body({"email": "n@x.io", "tags": []}, Prior("o@x.io", None, ["a"]))
    assert sub.body == {"email": "o@x.io", "new_email": "n@x.io", "tags": [], "remove_tags": ["a"]}


def test_unchanged_needs_the_same_hash_under_the_same_email_and_no_pending_rename() -> None:
    payload = {"email": "a@x.io"}
    digest = records.content_hash(payload)
    assert Prior("a@x.io", None, None).unchanged(payload, digest, digest)
    assert Prior(None, None, None).unchanged(payload, digest, digest)  # sent before emails were kept
    assert not Prior("a@x.io", None, None).unchanged(payload, b"other", digest)
    # a third email's pending rename was finished first: same data, another email at the API
    assert not Prior("b@x.io", None, None).unchanged(payload, digest, digest)
    assert not Prior("a@x.io", "b@x.io", None).unchanged(payload, digest, digest)
