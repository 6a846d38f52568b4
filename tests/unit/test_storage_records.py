"""The trusted construction of storage records (``EnvelopeRecord._from_trusted``).

Hot paths build records without the per-field checks when the values are known
valid: rows of our own database and envelopes that passed the envelope checks.
These tests hold every such path to the checked constructor: the same value,
the same repr (without the data), and the public constructors still refuse.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

import pytest

from gateway.core.address import MAX_DOMAIN_LENGTH, Address
from gateway.core.envelope import (
    SIGNATURE_BYTES,
    Envelope,
    decode_envelope,
    encode_envelope,
    new_envelope_id,
)
from gateway.storage.base import (
    MAX_TIME_MS,
    EnvelopeRecord,
    MailboxEntry,
    SpoolEntry,
    SpoolItem,
    envelope_record,
    spool_item,
)
from gateway.storage.sqlite.store import _mailbox_entry, _spool_entry

DATA = b"opaque envelope bytes \x00\xff"
RECORD: dict[str, Any] = {
    "envelope_id": "e1",
    "sender": "alice@acme.example",
    "recipient": "bob@globex.example",
    "created_ms": 1_700_000_000_000,
    "expires_ms": 1_700_000_600_000,
    "burn_on_read": True,
    "data": DATA,
}
VALUES: dict[type[EnvelopeRecord], dict[str, Any]] = {
    EnvelopeRecord: RECORD,
    SpoolItem: {**RECORD, "peer": "globex.example"},
    SpoolEntry: {**RECORD, "peer": "globex.example", "seq": 7, "spooled_ms": 1_700_000_000_500},
    MailboxEntry: {**RECORD, "seq": 7, "stored_ms": 1_700_000_000_500},
}


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SlottedEntry(SpoolEntry):
    """A record class whose fields live in slots, not in the instance ``__dict__``."""

    note: str


VALUES[SlottedEntry] = {**VALUES[SpoolEntry], "note": "slots"}


def assert_same_record(trusted: EnvelopeRecord, checked: EnvelopeRecord) -> None:
    assert type(trusted) is type(checked)
    assert trusted == checked
    assert hash(trusted) == hash(checked)
    assert repr(trusted) == repr(checked)
    assert "data=" not in repr(trusted)
    assert repr(DATA) not in repr(trusted)
    # Every field set, and nothing else: == would not notice an extra attribute.
    names = [f.name for f in dataclasses.fields(checked)]
    assert [getattr(trusted, name) for name in names] == [getattr(checked, name) for name in names]
    assert vars(trusted) == vars(checked)
    assert trusted.size == len(checked.data)


@pytest.mark.parametrize("kind", list(VALUES), ids=lambda kind: kind.__name__)
def test_the_trusted_path_builds_the_checked_value(kind: type[EnvelopeRecord]) -> None:
    values = VALUES[kind]
    trusted = kind._from_trusted(**values)
    assert_same_record(trusted, kind(**values))
    with pytest.raises(dataclasses.FrozenInstanceError):
        trusted.envelope_id = "e2"  # type: ignore[misc]


def test_slotted_records_keep_their_fields_in_slots() -> None:
    # Its bases have no slots, so it still has a __dict__; a field put there
    # would be hidden by the slot of the same name.
    assert set(vars(SlottedEntry)["__slots__"]) == {
        f.name for f in dataclasses.fields(SlottedEntry)
    }
    trusted = SlottedEntry._from_trusted(**VALUES[SlottedEntry])
    assert vars(trusted) == {}
    assert (trusted.note, trusted.seq) == ("slots", 7)


def test_trusted_records_have_independent_fields() -> None:
    # The keyword arguments' dict becomes the instance dict: never shared.
    values = VALUES[SpoolEntry]
    first = SpoolEntry._from_trusted(**values)
    second = SpoolEntry._from_trusted(**{**values, "seq": 8})
    assert (first.seq, second.seq) == (7, 8)
    assert vars(first) is not vars(second)


@pytest.mark.parametrize(
    ("kind", "changes", "message"),
    [
        (EnvelopeRecord, {"data": "text"}, "data of e1"),
        (SpoolItem, {"peer": "x" * (MAX_DOMAIN_LENGTH + 1)}, "peer of e1"),
        (SpoolEntry, {"created_ms": MAX_TIME_MS + 1}, "created_ms of e1"),
        (SpoolEntry, {"burn_on_read": 1}, "burn_on_read of e1"),
        (MailboxEntry, {"sender": ""}, "sender of e1"),
        (MailboxEntry, {"envelope_id": 42}, "envelope_id must be a string"),
        (SlottedEntry, {"expires_ms": -1}, "expires_ms of e1"),
    ],
)
def test_public_constructors_still_refuse_bad_values(
    kind: type[EnvelopeRecord], changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        kind(**{**VALUES[kind], **changes})


# -- row mappers -----------------------------------------------------------------
def test_spool_rows_map_to_the_checked_entry() -> None:
    values = VALUES[SpoolEntry]
    times = (values["created_ms"], values["expires_ms"], values["spooled_ms"])
    row = (7, "e1", "globex.example", "alice@acme.example", "bob@globex.example", *times, 1, DATA)
    entry = _spool_entry(row)
    assert_same_record(entry, SpoolEntry(**values))
    assert type(entry.burn_on_read) is bool  # stored as 0/1


def test_mailbox_rows_map_to_the_checked_entry() -> None:
    values = {**VALUES[MailboxEntry], "burn_on_read": False}
    times = (values["created_ms"], values["expires_ms"], values["stored_ms"])
    row = (7, "e1", "bob@globex.example", "alice@acme.example", *times, 0, DATA)
    entry = _mailbox_entry(row)
    assert_same_record(entry, MailboxEntry(**values))
    assert entry.burn_on_read is False


# -- records of a decoded envelope -------------------------------------------------
def decoded_envelope(*, burn_on_read: bool) -> tuple[Envelope, bytes]:
    built = Envelope(
        version=1,
        id=new_envelope_id(),
        sender=Address.parse("Alice@ACME.example"),
        recipient=Address.parse("bob@globex.example"),
        created=1_700_000_000_000,
        expires=1_700_000_600_000,
        burn_on_read=burn_on_read,
        ciphertext=secrets.token_bytes(100),
        signature=secrets.token_bytes(SIGNATURE_BYTES),
        group="staff",
    )
    data = encode_envelope(built)
    return decode_envelope(data), data


def checked_fields(envelope: Envelope, data: bytes) -> dict[str, Any]:
    return {
        "envelope_id": envelope.id,
        "sender": "alice@acme.example",
        "recipient": "bob@globex.example",
        "created_ms": envelope.created,
        "expires_ms": envelope.expires,
        "burn_on_read": envelope.burn_on_read,
        "data": data,
    }


@pytest.mark.parametrize("burn_on_read", [False, True])
def test_envelope_record_equals_the_checked_record(burn_on_read: bool) -> None:
    envelope, data = decoded_envelope(burn_on_read=burn_on_read)
    record = envelope_record(envelope, data)
    assert_same_record(record, EnvelopeRecord(**checked_fields(envelope, data)))


@pytest.mark.parametrize("burn_on_read", [False, True])
def test_spool_item_equals_the_checked_item(burn_on_read: bool) -> None:
    envelope, data = decoded_envelope(burn_on_read=burn_on_read)
    item = spool_item(envelope, data, envelope.recipient.org)
    checked = SpoolItem(**checked_fields(envelope, data), peer="globex.example")
    assert_same_record(item, checked)


@pytest.mark.parametrize("peer", ["", "x" * (MAX_DOMAIN_LENGTH + 1), None, b"globex.example"])
def test_spool_item_still_checks_its_peer(peer: object) -> None:
    envelope, data = decoded_envelope(burn_on_read=False)
    with pytest.raises(ValueError, match=f"peer of {envelope.id}"):
        spool_item(envelope, data, peer)  # type: ignore[arg-type]


@pytest.mark.parametrize("data", ["text", bytearray(b"bytes"), memoryview(b"bytes"), None])
def test_records_of_an_envelope_still_check_their_data(data: object) -> None:
    envelope, _data = decoded_envelope(burn_on_read=False)
    with pytest.raises(ValueError, match=f"data of {envelope.id}"):
        envelope_record(envelope, data)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"data of {envelope.id}"):
        spool_item(envelope, data, "globex.example")  # type: ignore[arg-type]
