"""Length-prefixed records: the part the binary framings share (pure; no I/O).

Both binary bodies, the federation transaction (docs/protocol.md §3a) and the
client batch (docs/client-api.md, "The binary batch"), end in ``count`` times
``u32 length | that many bytes``, big-endian, nothing after the last record.
:func:`split_records` walks that tail with every length checked against what
is left of the body *before* anything is sliced or sized by it, so a lying
length or count costs nothing; the caller's ``refuse`` turns a broken frame
into its own error (a ``400``). :func:`decode_record_json` is the one strict
JSON reading of a record: the canonical envelope encoding is ASCII, so nothing
else is read further.
"""

from __future__ import annotations

import json
import json.scanner
import struct
from collections.abc import Callable, Iterable
from typing import Final, NoReturn

LENGTH_BYTES: Final = 4  # the u32 before each record (and a frame's count)

_U32: Final = struct.Struct(">I")
unpack_u32: Final = _U32.unpack_from
pack_u32: Final = _U32.pack

Refuse = Callable[[str], NoReturn]


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


# One decoder, built once: json.loads with an option builds a new one per call (~2 µs).
_DECODER: Final = json.JSONDecoder(parse_constant=_no_constant)
_decode_json = _DECODER.decode
# Its scanner alone (C): a canonical record has no whitespace around its value,
# so decode()'s whitespace matching is skipped (0.6 µs of 3 for a 1 KiB record).
_scan_once: Final[Callable[[str, int], tuple[object, int]]] = json.scanner.make_scanner(
    _DECODER  # type: ignore[arg-type]  # typeshed types the class, not its argument
)


def decode_record_json(data: bytes) -> object:
    """A record's JSON value; ``ValueError`` when it is not JSON in ASCII (or nests too deep)."""
    try:
        text = data.decode("ascii")
        try:
            value, end = _scan_once(text, 0)
        except StopIteration:
            end = -1
        if end == len(text):
            return value
        return _decode_json(text)  # whitespace around, or not JSON: the full reading says
    except RecursionError:
        raise ValueError("nested too deep") from None


# How a canonical envelope encoding begins: its second member is the ciphertext.
_CIPHERTEXT_HEADS: Final = (
    b'{"burn_on_read":false,"ciphertext":"',
    b'{"burn_on_read":true,"ciphertext":"',
)


def decode_envelope_record_json(data: bytes) -> object:
    """:func:`decode_record_json` for a record that should be a canonical envelope encoding.

    The same value for any record, but the ciphertext, most of a large
    record, is not run through the JSON string scanner: in the canonical
    form it is the second member, base64url without a quote or an escape, so
    it ends at the next quote. The rest is parsed as JSON with an empty
    string in its place, and the ciphertext put back. A record that does not
    begin so, or whose ciphertext holds a backslash, is parsed whole. The
    caller still compares the record with the canonical encoding of what it
    holds, which catches anything this reading lets through (a key twice).
    """
    for head in _CIPHERTEXT_HEADS:
        if data.startswith(head):
            start = len(head)
            end = data.find(b'"', start)
            if end < 0 or data.find(b"\\", start, end) >= 0:
                break
            obj = decode_record_json(data[:start] + data[end:])
            if type(obj) is not dict or obj.get("ciphertext") != "":
                break
            obj["ciphertext"] = data[start:end].decode("ascii")
            return obj
    return decode_record_json(data)


def frame_records(records: Iterable[bytes]) -> list[bytes]:
    """The parts of ``records`` as a frame carries them (each after its u32 length)."""
    parts: list[bytes] = []
    for record in records:
        parts.append(pack_u32(len(record)))
        parts.append(record)
    return parts


def split_records(
    body: bytes, offset: int, count: int, refuse: Refuse, *, what: str = "envelope"
) -> list[bytes]:
    """The ``count`` records of ``body`` from ``offset`` on, which must end the body exactly.

    ``refuse(message)`` is called (and must raise) for a frame that is not
    sound; messages name the record (``#1`` is the first) and the byte offset.
    """
    end = len(body)
    # Every record takes at least its length: checked before any list is made.
    if count * LENGTH_BYTES > end - offset:
        refuse(f"{count} {what}s cannot fit in the {end - offset} bytes left at offset {offset}")
    records: list[bytes] = []
    for index in range(count):
        if end - offset < LENGTH_BYTES:
            refuse(f"the body ends inside the length of {what} #{index + 1} (offset {offset})")
        (length,) = unpack_u32(body, offset)
        offset += LENGTH_BYTES
        if length > end - offset:
            refuse(
                f"{what} #{index + 1}'s length {length} (at offset {offset - LENGTH_BYTES}) "
                "runs past the end of the body"
            )
        records.append(body[offset : offset + length])
        offset += length
    if offset != end:
        refuse(f"{end - offset} byte(s) follow the last {what} (from offset {offset})")
    return records
