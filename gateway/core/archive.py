"""The retention archive's records and their hash chain, as pure values (docs/retention.md).

A retained envelope is archived whole, as the canonical bytes the gateway
stored (header, ciphertext, every wrapped key, the retention copy and the
sender's signature): only the retention key's secret, held offline by the
compliance officer, opens its retention copy. The gateway adds what it knows
of the envelope (group, direction, when archived, when it may be deleted) and
chains each record to the one before it, like the audit log::

    hash = SHA-256("gateway-retention-archive-v1" 0x00 || lv(seq) || lv(envelope_id)
                   || lv(group) || lv(direction) || lv(sender) || lv(recipient)
                   || lv(key_id) || lv(archived_ms) || lv(delete_after_ms)
                   || lv(wrap) || lv(envelope) || prev)

with ``lv(x) = u32(len(x)) || x``, integers as decimal ASCII, ``prev`` the
previous record's 32-byte hash (32 zero bytes for the first), and ``wrap``
empty for an outbound record (its retention copy is in the envelope) and, for
an inbound one, the retention copy the recipient's client made with the
content key it opened (docs/retention.md, "Inbound").

A record that carries the **sender's key** (``sender_key``: the key record,
signed by the sender's org, whose verify key the gateway checked the
envelope's signature with when it archived it, and that org's verify key; see
:func:`sender_key_blob`) is hashed under the domain
``"gateway-retention-archive-v2" 0x00`` with ``lv(sender_key)`` after
``lv(envelope)``; a record without one (archived by an older version, or
whose sender had published no key) keeps the v1 hash, so older chains still
verify. With it, an export proves offline who signed each envelope. Deleting
expired records from the head leaves the rest verifiable: the oldest left
names its predecessor's hash, and every later one links to it. (An archive
that deletion emptied starts a new chain from the zero hash; the sequence
numbers go on, so the gap shows.)

An **export** is a JSON Lines file: a header line, one line per record, and a
trailer with the SHA-256 of every byte before it, signed with the org's
Ed25519 signing key (the caller signs; this module only builds and checks),
so the file proves itself offline (:func:`read_export`).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

ARCHIVE_DOMAIN: Final = b"gateway-retention-archive-v1\x00"
ARCHIVE_DOMAIN_V2: Final = b"gateway-retention-archive-v2\x00"  # records with a sender key
EXPORT_KIND: Final = "gateway-retention-export"
EXPORT_VERSION: Final = 2  # 2: records carry ``sender_key``
READABLE_EXPORT_VERSIONS: Final = (1, 2)
TRAILER_KIND: Final = "end"
ZERO_HASH: Final = bytes(32)
DIRECTIONS: Final = ("outbound", "inbound")
MAX_SENDER_KEY_BYTES: Final = 8192  # a key record is ~400 bytes, its org key ~50
MAX_EXPORT_LINE_BYTES: Final = 4 * 1024 * 1024  # an envelope of 1 MiB is ~1.4 MB of base64url
_U32 = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class ArchiveItem:
    """What a service hands the archive for one retained envelope."""

    envelope_id: str
    group: str
    direction: str  # outbound: a sender under retention; inbound: a recipient under it
    sender: str
    recipient: str
    key_id: str
    delete_after_ms: int
    envelope: bytes  # the canonical bytes as stored
    wrap: bytes = b""  # inbound: the recipient's retention copy of the content key
    sender_key: bytes = b""  # sender_key_blob(): the key that verified the signature


@dataclass(frozen=True, slots=True)
class ArchiveRecord:
    """One archived envelope, as the archive holds it, chained."""

    seq: int
    envelope_id: str
    group: str
    direction: str
    sender: str
    recipient: str
    key_id: str
    archived_ms: int
    delete_after_ms: int
    envelope: bytes
    prev: bytes
    hash: bytes
    wrap: bytes = b""
    sender_key: bytes = b""

    def expected_hash(self) -> bytes:
        return record_hash(
            self.seq,
            ArchiveItem(
                self.envelope_id,
                self.group,
                self.direction,
                self.sender,
                self.recipient,
                self.key_id,
                self.delete_after_ms,
                self.envelope,
                self.wrap,
                self.sender_key,
            ),
            archived_ms=self.archived_ms,
            prev=self.prev,
        )

    def to_json(self) -> dict[str, object]:
        return {
            "seq": self.seq,
            "envelope_id": self.envelope_id,
            "group": self.group,
            "direction": self.direction,
            "sender": self.sender,
            "recipient": self.recipient,
            "key_id": self.key_id,
            "archived": self.archived_ms,
            "delete_after": self.delete_after_ms,
            # The exact stored bytes (ASCII JSON), as a string: hashed as they are.
            "envelope": self.envelope.decode("ascii"),
            "wrap": self.wrap.hex(),
            # Canonical ASCII JSON too (sender_key_blob), or "" when none was recorded.
            "sender_key": self.sender_key.decode("ascii"),
            "prev": self.prev.hex(),
            "hash": self.hash.hex(),
        }

    @classmethod
    def from_json(cls, obj: object) -> ArchiveRecord:
        """A record from an export line; ``ValueError`` saying what is wrong."""
        if not isinstance(obj, dict):
            raise ValueError("a record must be an object")
        try:
            record = cls(
                seq=_int(obj["seq"]),
                envelope_id=_str(obj["envelope_id"]),
                group=_str(obj["group"]),
                direction=_str(obj["direction"]),
                sender=_str(obj["sender"]),
                recipient=_str(obj["recipient"]),
                key_id=_str(obj["key_id"]),
                archived_ms=_int(obj["archived"]),
                delete_after_ms=_int(obj["delete_after"]),
                envelope=_str(obj["envelope"]).encode("ascii"),
                prev=bytes.fromhex(_str(obj["prev"])),
                hash=bytes.fromhex(_str(obj["hash"])),
                wrap=bytes.fromhex(_str(obj["wrap"])),
                # Absent from exports of version 1 (no sender keys then).
                sender_key=_str(obj.get("sender_key", "")).encode("ascii"),
            )
        except (KeyError, UnicodeEncodeError) as exc:
            raise ValueError(f"a record is missing or has a bad field ({exc})") from None
        if len(record.prev) != 32 or len(record.hash) != 32:
            raise ValueError(f"record {record.seq}: prev and hash are 32 bytes")
        return record


def record_hash(seq: int, item: ArchiveItem, *, archived_ms: int, prev: bytes) -> bytes:
    """The chain hash of a record (see the module docstring)."""
    fields = [
        str(seq).encode(),
        item.envelope_id.encode(),
        item.group.encode(),
        item.direction.encode(),
        item.sender.encode(),
        item.recipient.encode(),
        item.key_id.encode(),
        str(archived_ms).encode(),
        str(item.delete_after_ms).encode(),
        item.wrap,
        item.envelope,
    ]
    if item.sender_key:
        digest = hashlib.sha256(ARCHIVE_DOMAIN_V2)
        fields.append(item.sender_key)
    else:
        digest = hashlib.sha256(ARCHIVE_DOMAIN)
    for field in fields:
        digest.update(_U32.pack(len(field)))
        digest.update(field)
    digest.update(prev)
    return digest.digest()


# -- sender keys ---------------------------------------------------------------------


def sender_key_blob(*, org_key: str, record: bytes) -> bytes:
    """What an archive record keeps of its sender's key: canonical ASCII JSON.

    ``record`` is the sender's key record as its org signed it (JSON bytes,
    docs/client-api.md "Key records"); ``org_key`` the verify key the gateway
    checked that signature with (``ed25519:...``: its own org's, or the key its
    rules pin for the sender's org). ``ValueError`` if ``record`` is not JSON.
    """
    parsed = json.loads(record)
    return json.dumps(
        {"org_key": org_key, "record": parsed},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    ).encode("ascii")


def parse_sender_key(blob: bytes) -> tuple[str, object]:
    """``(org_key, record object)`` of a :func:`sender_key_blob`; ``ValueError`` otherwise."""
    if len(blob) > MAX_SENDER_KEY_BYTES:
        raise ValueError("the recorded sender key is too long")
    obj = json.loads(blob)
    if not isinstance(obj, dict) or set(obj) != {"org_key", "record"}:
        raise ValueError("the recorded sender key is not {org_key, record}")
    return _str(obj["org_key"]), obj["record"]


def check_chain(records: Sequence[ArchiveRecord]) -> list[str]:
    """Problems with ``records`` (in seq order): each hash, and each link between neighbours."""
    problems = []
    for index, record in enumerate(records):
        if record.expected_hash() != record.hash:
            problems.append(f"record {record.seq}: its hash does not match its content")
        if (
            index
            and records[index - 1].seq + 1 == record.seq
            and (record.prev != records[index - 1].hash)
        ):
            problems.append(f"record {record.seq}: does not follow record {record.seq - 1}")
    return problems


# -- exports -----------------------------------------------------------------------


def _line(obj: dict[str, object]) -> bytes:
    return (
        json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"
    )


def header_line(header: dict[str, object]) -> bytes:
    """An export's first line."""
    return _line({"kind": EXPORT_KIND, "v": EXPORT_VERSION, **header})


def record_line(record: ArchiveRecord) -> bytes:
    """One record's line of an export."""
    return _line(record.to_json())


def export_lines(header: dict[str, object], records: Iterable[ArchiveRecord]) -> Iterator[bytes]:
    """The header line and one line per record (the caller appends :func:`trailer_line`)."""
    yield header_line(header)
    for record in records:
        yield record_line(record)


def trailer_line(*, count: int, body_sha256: bytes, signature: bytes, org_key: str) -> bytes:
    """The last line: how many records, the SHA-256 of every line before, its signature."""
    return _line(
        {
            "kind": TRAILER_KIND,
            "count": count,
            "sha256": body_sha256.hex(),
            "signature": signature.hex(),
            "org_key": org_key,
        }
    )


@dataclass(frozen=True, slots=True)
class Export:
    """A parsed export: the header, the records, and what the trailer claims."""

    header: dict[str, object]
    records: tuple[ArchiveRecord, ...]
    body_sha256: bytes  # computed over the bytes read
    claimed_sha256: bytes
    signature: bytes
    org_key: str


def read_export(data: bytes) -> Export:
    """Parse an export and check its shape and its SHA-256; ``ValueError`` otherwise.

    The signature and the chain are the caller's to check (it holds the org key
    it trusts; :func:`check_chain`).
    """
    lines = data.split(b"\n")
    if len(lines) < 3 or lines[-1] != b"":
        raise ValueError("not an export: expected a header, records and a trailer, one per line")
    lines = lines[:-1]
    if any(len(line) > MAX_EXPORT_LINE_BYTES for line in lines):
        raise ValueError("not an export: a line is too long")
    try:
        header = json.loads(lines[0])
        trailer = json.loads(lines[-1])
    except ValueError:
        raise ValueError("not an export: the header or trailer is not JSON") from None
    if not isinstance(header, dict) or header.get("kind") != EXPORT_KIND:
        raise ValueError("not an export: the first line is not its header")
    if header.get("v") not in READABLE_EXPORT_VERSIONS:
        raise ValueError(f"export version {header.get('v')!r} is not supported")
    if not isinstance(trailer, dict) or trailer.get("kind") != TRAILER_KIND:
        raise ValueError("the export is cut short: no trailer line")
    body = b"".join(line + b"\n" for line in lines[:-1])
    records = []
    for number, line in enumerate(lines[1:-1], start=2):
        try:
            records.append(ArchiveRecord.from_json(json.loads(line)))
        except ValueError as exc:
            raise ValueError(f"line {number}: {exc}") from None
    try:
        count = _int(trailer["count"])
        claimed = bytes.fromhex(_str(trailer["sha256"]))
        signature = bytes.fromhex(_str(trailer["signature"]))
        org_key = _str(trailer["org_key"])
    except (KeyError, ValueError):
        raise ValueError("the trailer line is malformed") from None
    if count != len(records):
        raise ValueError(f"the trailer counts {count} records, the file holds {len(records)}")
    return Export(
        header, tuple(records), hashlib.sha256(body).digest(), claimed, signature, org_key
    )


def _int(value: object) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r:.40}")
    return value


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r:.40}")
    return value
