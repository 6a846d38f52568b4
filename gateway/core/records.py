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
_decode_json = json.JSONDecoder(parse_constant=_no_constant).decode


def decode_record_json(data: bytes) -> object:
    """A record's JSON value; ``ValueError`` when it is not JSON in ASCII (or nests too deep)."""
    try:
        return _decode_json(data.decode("ascii"))
    except RecursionError:
        raise ValueError("nested too deep") from None


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
