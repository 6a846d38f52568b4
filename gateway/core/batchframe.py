"""The binary client batch, ``application/vnd.gateway.batch.v1`` (pure; no I/O).

docs/client-api.md ("The binary batch") is the normative text, with a test
vector; this module is its executable form. A body is

    magic "GWBT" | framing version 0x01 | flags 0x00 | u32 count
    | count x (u32 len | envelope bytes)

big-endian, nothing before or after: the record part of the federation
framing (docs/protocol.md §3a, :mod:`gateway.core.records`) without the orgs,
which the bearer token already names. Each record is one envelope in its
canonical encoding (docs/envelope.md §1), the bytes the gateway keeps for it
(with the sender's group put in, :func:`~gateway.core.envelope.with_group_member`).

Here only the frame is read: a frame that is not sound raises
:class:`~gateway.errors.ProtocolError` (``400``, nothing judged or stored),
each length checked before anything is sized by it, and the message names
the record and the byte offset. What a record holds is judged by the client
API, slot by slot, like an element of a JSON batch.

The same framing answers ``GET /v1/mailbox`` to a client that asks for it
(docs/client-api.md, "The binary answer"): each record is a stored envelope's
bytes as kept, oldest first. A submitted batch holds 1 to 256 envelopes
(:func:`decode_batch`); an answer may hold none, the empty mailbox, which is
the 10-byte header with count 0 (:func:`decode_answer`, 0 to ``limit``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, NoReturn

from gateway.core.records import LENGTH_BYTES, frame_records, pack_u32, split_records, unpack_u32
from gateway.errors import ProtocolError

MEDIA_TYPE_BATCH_V1: Final = "application/vnd.gateway.batch.v1"
MAGIC: Final = b"GWBT"
FRAMING_VERSION: Final = 1
FLAGS: Final = 0  # reserved: a gateway refuses any other value
HEADER_BYTES: Final = len(MAGIC) + 2 + LENGTH_BYTES  # magic, version, flags, count: 10


def encode_batch(records: Sequence[bytes]) -> bytes:
    """A binary batch body around envelopes already in their canonical encoding.

    Also a mailbox answer: there ``records`` may be empty (count 0).
    """
    head = MAGIC + bytes((FRAMING_VERSION, FLAGS)) + pack_u32(len(records))
    return b"".join([head, *frame_records(records)])


def _refuse(message: str) -> NoReturn:
    raise ProtocolError(f"binary batch: {message}")


def decode_batch(body: bytes, *, max_envelopes: int) -> list[bytes]:
    """The records of a submitted batch body (1 to ``max_envelopes``); ``ProtocolError`` if none."""
    return _decode(body, 1, max_envelopes, "a batch")


def decode_answer(body: bytes, *, max_envelopes: int) -> list[bytes]:
    """The records of a binary mailbox answer: 0 (an empty mailbox) to ``max_envelopes``.

    ``max_envelopes`` is the ``limit`` the fetch asked for: an answer with more
    is not sound. ``ProtocolError`` for a frame that is not.
    """
    return _decode(body, 0, max_envelopes, "an answer")


def _decode(body: bytes, fewest: int, most: int, what: str) -> list[bytes]:
    if len(body) < HEADER_BYTES:
        _refuse(f"{len(body)} bytes is shorter than the {HEADER_BYTES}-byte header")
    if body[: len(MAGIC)] != MAGIC:
        _refuse("it does not begin with the magic bytes 'GWBT' (offset 0)")
    version, flags = body[4], body[5]
    if version != FRAMING_VERSION:
        _refuse(f"framing version {version} at offset 4 is not spoken (only {FRAMING_VERSION})")
    if flags != FLAGS:
        _refuse(f"flags at offset 5 must be 0, got {flags}")
    (count,) = unpack_u32(body, 6)
    if not fewest <= count <= most:
        _refuse(f"the count at offset 6 is {count}; {what} holds {fewest} to {most} envelopes")
    return split_records(body, HEADER_BYTES, count, _refuse)
