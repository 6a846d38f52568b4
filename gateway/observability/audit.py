"""The audit log: an append-only, hash-chained file of the gateway's decisions.

Theory of operation
-------------------
The log is a file of JSON lines, one record per line::

    {"seq": 7, "ts": "2025-01-31T12:00:00.123Z", "kind": "policy_denial",
     ..., "prev": "<hex sha256>", "hash": "<hex sha256>"}

``hash`` is the SHA-256 of the record's *canonical bytes*: the record without
``hash``, as JSON with sorted keys and no whitespace (UTF-8). ``prev`` is the
previous record's ``hash``; the first record of a chain has 64 zeros
(:data:`GENESIS`). ``seq`` counts up by one from 1 across rotations. Changing a
byte breaks that record's hash; removing or reordering records breaks the next
record's ``prev`` (and ``seq``): :func:`verify_files` finds the first bad one.
What a chain without a key cannot show is a rewrite of the whole tail from
some record on, or a truncation: anchor the last hash elsewhere (``gateway
audit verify`` prints it) to cover those.

Several processes append to one file: the gateway (denials, reloads) and
CLI commands (token issue and revoke, spool purge). Every append takes an
exclusive ``flock`` on a lock file beside the log (``audit.log.lock``, never
renamed, so rotation cannot race with it), reads the last record's ``seq`` and
``hash``, appends the batch, flushes and fsyncs, then unlocks: concurrent
appenders keep one chain.

Rotation: when the file has reached ``max_bytes``, the next append renames it
to ``audit.log.<UTC timestamp>`` and starts a new file whose first record is
``audit_rotated`` with ``prev`` = the old file's last hash and
``previous_file`` = its name: verify the files in order and the chain runs
through (or verify one file alone with ``--from-hash``).

Several gateway nodes of one org each keep a chain of their own (the
``node`` field of every record names it): :func:`group_chains` splits the
files given to ``gateway audit verify`` by node, and each chain is walked.

A record never holds a payload, a ciphertext, a token or key material: the
kinds and their fields are listed in :data:`KINDS`, field names that smell of
secrets are refused (:data:`FORBIDDEN_FIELDS`), and every string is bounded.

In the gateway, :class:`AuditWriter` keeps file I/O off the trio loop: decisions
go into a bounded channel, one task takes them out in order and appends each
batch in a worker thread (one lock and one fsync per batch, so a burst of
denials costs a few fsyncs). Denials wait for room in the channel
(backpressure: an auditor prefers a slower refusal to a missing record);
reload records, produced where waiting is not possible, are dropped when the
channel is full, counted in ``gateway_audit_records_dropped_total`` and
logged. A batch that cannot be written (disk full, damaged last record) is
logged, counted in ``gateway_audit_write_failures_total`` and retried.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import getpass
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

import trio

from gateway.core.encoding import loads_strict
from gateway.errors import LocalError
from gateway.files import fsync_directory
from gateway.observability.metrics import (
    AUDIT_RECORDS_DROPPED,
    AUDIT_RECORDS_WRITTEN,
    AUDIT_WRITE_FAILURES,
)

LOGGER = logging.getLogger("gateway.audit")

GENESIS: Final = "0" * 64
DEFAULT_FILENAME: Final = "audit.log"
LOCK_SUFFIX: Final = ".lock"
DEFAULT_MAX_BYTES: Final = 64 * 1024 * 1024  # rotate past this size
MIN_MAX_BYTES: Final = 4096  # a smaller bound would rotate on every record
MAX_RECORD_BYTES: Final = 16 * 1024  # one line; bounds reading the tail
MAX_FIELD_CHARS: Final = 512  # one string field; longer ones are cut
MAX_LIST_ITEMS: Final = 256  # one list field (peers of a reload)
QUEUE_CAPACITY: Final = 4096  # records waiting for the writer
MAX_BATCH: Final = 512  # records per lock + fsync
RETRY_INTERVAL: Final = 5.0  # seconds between attempts at a batch that failed
FLUSH_TIMEOUT: Final = 5.0  # seconds to write what is queued when the gateway stops
FILE_MODE: Final = 0o600

#: Every kind of record and what it says (docs/audit.md has the fields).
KINDS: Final = frozenset(
    {
        "policy_denial",  # the rules refused an envelope (client API or a peer's)
        "retention_mismatch",  # a client refused an envelope: its retention copy did not match
        "retention_not_archived",  # inbound retention: acknowledged unarchived (unread, v1)
        "retention_export",  # `gateway retention export`: which range, how many records
        "retention_hold_added",  # `gateway retention hold add`
        "retention_hold_removed",  # `gateway retention hold remove`
        "rules_reload",  # a load of the rules: trigger, result, sha256
        "peer_added",  # a reload added a peer
        "peer_removed",  # a reload removed a peer
        "peer_trust_changed",  # a reload changed a peer's CA or pins
        "token_issued",
        "token_revoked",
        "spool_purged",
        "audit_rotated",  # first record of a file after rotation
        "audit_torn_tail",  # an unfinished line (a crash mid-append) was cut off
    }
)
#: Field names a record must never carry: content and secrets have no business here.
FORBIDDEN_FIELDS: Final = frozenset(
    {
        "payload",
        "ciphertext",
        "data",
        "body",
        "token",
        "key",
        "private_key",
        "secret",
        "password",
        "plaintext",
    }
)
#: Fields the chain owns; callers cannot set them.
CHAIN_FIELDS: Final = frozenset({"seq", "ts", "kind", "prev", "hash"})

_HEX64 = re.compile(r"[0-9a-f]{64}")
_FIELD_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")

AuditValue = str | int | bool | None | Sequence[str]


class AuditError(LocalError):
    """The audit log cannot be appended to (unreadable, damaged last record, bad record)."""


# -- records (pure) ------------------------------------------------------------------


def canonical_bytes(record: Mapping[str, object]) -> bytes:
    """The bytes a record's hash covers: JSON, sorted keys, no whitespace, UTF-8."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )


def record_hash(record: Mapping[str, object]) -> str:
    return hashlib.sha256(canonical_bytes(record)).hexdigest()


def utc_timestamp(at: float) -> str:
    """``2025-01-31T12:00:00.123Z`` (UTC, milliseconds)."""
    whole = int(at)
    millis = int((at - whole) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


def _clean_value(name: str, value: object) -> str | int | bool | list[str] | None:
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, str):
        return value[:MAX_FIELD_CHARS]
    if isinstance(value, list | tuple | frozenset | set):
        items = sorted(value) if isinstance(value, frozenset | set) else list(value)
        if not all(isinstance(item, str) for item in items):
            raise ValueError(f"audit field {name!r}: a list must hold strings only")
        return [item[:MAX_FIELD_CHARS] for item in items[:MAX_LIST_ITEMS]]
    raise ValueError(
        f"audit field {name!r}: {type(value).__name__} is not a string, number, "
        "boolean, null or list of strings"
    )


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One decision to record, before the chain gives it ``seq``, ``prev`` and ``hash``."""

    kind: str
    at: float  # wall-clock time of the decision, Unix seconds
    fields: Mapping[str, object] = field(default_factory=dict)

    @classmethod
    def of(cls, kind: str, *, at: float, **fields: AuditValue) -> AuditEvent:
        """A checked event; ``ValueError`` for an unknown kind or a field that may not be."""
        if kind not in KINDS:
            raise ValueError(f"unknown audit record kind {kind!r}")
        clean: dict[str, object] = {}
        for name, value in fields.items():
            if not _FIELD_NAME.fullmatch(name) or name in CHAIN_FIELDS:
                raise ValueError(f"audit field name {name!r} is not allowed")
            if name in FORBIDDEN_FIELDS or name.endswith(("_key", "_token")):
                raise ValueError(f"audit field {name!r} could hold a secret or content")
            clean[name] = _clean_value(name, value)
        return cls(kind, at, clean)


def seal_record(event: AuditEvent, *, seq: int, prev: str) -> dict[str, object]:
    """The record of ``event`` as the ``seq``-th of a chain whose last hash is ``prev``."""
    record: dict[str, object] = dict(event.fields)
    record.update(seq=seq, ts=utc_timestamp(event.at), kind=event.kind, prev=prev)
    record["hash"] = record_hash(record)
    return record


def record_line(record: Mapping[str, object]) -> bytes:
    """One line of the file: the canonical JSON with ``hash``, and a newline."""
    line = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return line.encode("utf-8") + b"\n"


# -- verifying (pure over lines) ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChainBreak:
    """The first record that does not fit the chain."""

    file: str
    line: int
    seq: int | None  # None when the line is not a record at all
    problem: str

    def __str__(self) -> str:
        which = f"record seq {self.seq}" if self.seq is not None else "not a record"
        return f"{self.file}:{self.line}: {which}: {self.problem}"


@dataclass(frozen=True, slots=True)
class ChainReport:
    """What :func:`verify_files` found: a count and the chain's ends, or the first break."""

    records: int
    files: int
    first_seq: int | None
    last_seq: int | None
    last_hash: str
    broken: ChainBreak | None = None

    @property
    def intact(self) -> bool:
        return self.broken is None


def parse_record(line: bytes) -> dict[str, object]:
    """A line as a record; ``ValueError`` saying what is wrong with its form."""
    if len(line) > MAX_RECORD_BYTES:
        raise ValueError(f"longer than {MAX_RECORD_BYTES} bytes")
    try:
        record = loads_strict(line)
    except ValueError as exc:
        raise ValueError(f"not a JSON record ({exc})") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    seq = record.get("seq")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise ValueError("no valid 'seq'")
    for name in ("prev", "hash"):
        value = record.get(name)
        if not isinstance(value, str) or not _HEX64.fullmatch(value):
            raise ValueError(f"no valid {name!r}")
    if not isinstance(record.get("kind"), str) or not isinstance(record.get("ts"), str):
        raise ValueError("no 'kind' or 'ts'")
    return record


class _Walker:
    """Walks records in order, remembering where the chain stands."""

    def __init__(self, from_hash: str | None) -> None:
        self.expected_prev = from_hash or GENESIS
        self.expected_seq: int | None = None if from_hash else 1
        self.records = 0
        self.first_seq: int | None = None

    def step(self, line: bytes) -> tuple[int | None, str | None]:
        """``(seq, problem)`` for the next line; problem None when it fits."""
        try:
            record = parse_record(line)
        except ValueError as exc:
            return None, str(exc)
        seq = record["seq"]
        assert isinstance(seq, int)
        if record_hash(record) != record["hash"]:
            return seq, "its hash does not match its content (the record was changed)"
        if record["prev"] != self.expected_prev:
            return seq, (
                "its prev is not the previous record's hash (a record before it was "
                "removed, changed or reordered"
                + (
                    ", or the chain starts earlier: pass that file first or --from-hash"
                    if self.records == 0
                    else ""
                )
                + ")"
            )
        if self.expected_seq is not None and seq != self.expected_seq:
            return (
                seq,
                f"seq {seq} where {self.expected_seq} was due (records removed or reordered)",
            )
        hash_value = record["hash"]
        assert isinstance(hash_value, str)
        self.expected_prev = hash_value
        self.expected_seq = seq + 1
        self.records += 1
        if self.first_seq is None:
            self.first_seq = seq
        return seq, None


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as handle:
        yield from enumerate(handle, start=1)


def verify_files(paths: Sequence[Path], *, from_hash: str | None = None) -> ChainReport:
    """Walk the chain through ``paths`` in order (oldest first).

    The first file must start the chain (``prev`` = zeros) unless ``from_hash``
    gives the hash its first record follows. ``OSError`` if a file cannot be read.
    """
    if from_hash is not None and not _HEX64.fullmatch(from_hash):
        raise ValueError("--from-hash must be 64 lowercase hex digits")
    walker = _Walker(from_hash)
    for path in paths:
        last_number = 0
        seq: int | None
        problem: str | None
        for number, raw in _lines(path):
            last_number = number
            if not raw.endswith(b"\n"):
                seq, problem = None, "the last line is unfinished (no newline)"
            else:
                seq, problem = walker.step(raw.rstrip(b"\n"))
            if problem is not None:
                return ChainReport(
                    walker.records,
                    len(paths),
                    walker.first_seq,
                    None,
                    walker.expected_prev,
                    ChainBreak(str(path), number, seq, problem),
                )
        if last_number == 0 and len(paths) > 1:
            return ChainReport(
                walker.records,
                len(paths),
                walker.first_seq,
                None,
                walker.expected_prev,
                ChainBreak(str(path), 1, None, "the file is empty"),
            )
    last_seq = walker.expected_seq - 1 if walker.records and walker.expected_seq else None
    return ChainReport(walker.records, len(paths), walker.first_seq, last_seq, walker.expected_prev)


def chain_node(path: Path) -> str | None:
    """The ``node`` named by the first record of ``path`` (None: no node, or no record).

    Each gateway node keeps a chain of its own; a record names its node.
    """
    with path.open("rb") as handle:
        first = handle.readline(MAX_RECORD_BYTES + 1)
    try:
        node = parse_record(first.rstrip(b"\n")).get("node")
    except ValueError:
        return None
    return node if isinstance(node, str) else None


def group_chains(paths: Sequence[Path]) -> list[tuple[str | None, list[Path]]]:
    """``paths`` split into one chain per node, each in the order given.

    An org running several gateway nodes has one audit chain per node (and its
    rotated files); :func:`verify_files` walks each. Files of one node stay
    in the order given (oldest first). Chains come in the order their first
    file was given.
    """
    chains: dict[str | None, list[Path]] = {}
    for path in paths:
        chains.setdefault(chain_node(path), []).append(path)
    return list(chains.items())


# -- appending (blocking: a worker thread in the gateway, directly in the CLI) ------------


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + LOCK_SUFFIX)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _read_tail(fd: int, size: int) -> tuple[bytes, int]:
    """The last complete line (without newline) and how many bytes follow it unfinished."""
    if size == 0:
        return b"", 0
    start = max(0, size - (MAX_RECORD_BYTES + 2))
    chunk = os.pread(fd, size - start, start)
    cut = chunk.rfind(b"\n")
    if cut < 0:
        if start == 0:
            return b"", len(chunk)  # only an unfinished first line
        raise AuditError("the audit log's last record is longer than any record can be")
    torn = len(chunk) - cut - 1
    before = chunk.rfind(b"\n", 0, cut)
    if before < 0 and start > 0:
        raise AuditError("the audit log's last record is longer than any record can be")
    return chunk[before + 1 : cut], torn


def _chain_end(path: Path, fd: int) -> tuple[int, str, int]:
    """``(last seq, last hash, torn bytes)`` of the open log ``fd``."""
    size = os.fstat(fd).st_size
    last, torn = _read_tail(fd, size)
    if not last:
        return 0, GENESIS, torn
    try:
        record = parse_record(last)
    except ValueError as exc:
        raise AuditError(
            f"{path}: the last record is damaged ({exc}); run `gateway audit verify {path}` "
            "and move the file aside to start a new chain"
        ) from None
    seq, hash_value = record["seq"], record["hash"]
    assert isinstance(seq, int)
    assert isinstance(hash_value, str)
    return seq, hash_value, torn


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _rotated_name(path: Path, at: float) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(at)) + f"{int(at * 1000) % 1000:03d}Z"
    candidate = path.with_name(f"{path.name}.{stamp}")
    number = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.{stamp}-{number}")
        number += 1
    return candidate


def _open_log(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, FILE_MODE)


def append_events(
    path: Path,
    events: Sequence[AuditEvent],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    wall_clock: float | None = None,
) -> list[dict[str, object]]:
    """Append ``events`` to the chain in ``path``, durably; return the records written.

    Blocking: takes the lock file, may rotate, fsyncs. ``AuditError`` if the
    log cannot be continued, ``OSError`` for the file system's own failures.
    """
    if max_bytes < MIN_MAX_BYTES:
        raise ValueError(f"max_bytes must be at least {MIN_MAX_BYTES}")
    if not events:
        return []
    path.parent.mkdir(parents=True, exist_ok=True)
    now = time.time() if wall_clock is None else wall_clock
    with _locked(path):
        fd = _open_log(path)
        try:
            seq, prev, torn = _chain_end(path, fd)
            pending: list[AuditEvent] = []
            if torn:
                # A crash cut a line short: it was never a record (never fsynced whole).
                os.ftruncate(fd, os.fstat(fd).st_size - torn)
                pending.append(AuditEvent.of("audit_torn_tail", at=now, discarded_bytes=torn))
                LOGGER.warning("audit log %s: cut off %d bytes of an unfinished line", path, torn)
            if os.fstat(fd).st_size >= max_bytes and seq > 0:
                rotated = _rotated_name(path, now)
                os.fsync(fd)
                os.close(fd)
                fd = -1
                os.rename(path, rotated)
                fd = _open_log(path)
                fsync_directory(path.parent)
                pending.append(AuditEvent.of("audit_rotated", at=now, previous_file=rotated.name))
                LOGGER.info("audit log %s rotated to %s", path, rotated.name)
            records: list[dict[str, object]] = []
            for event in [*pending, *events]:
                seq += 1
                record = seal_record(event, seq=seq, prev=prev)
                prev = str(record["hash"])
                records.append(record)
            _write_all(fd, b"".join(record_line(r) for r in records))
            os.fsync(fd)
        finally:
            if fd >= 0:
                os.close(fd)
    AUDIT_RECORDS_WRITTEN.inc(len(records))
    return records


def local_actor() -> str:
    """Who runs this command: the login name, or ``uid:N`` when there is none."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return f"uid:{os.getuid()}"


def append_event(
    path: Path,
    kind: str,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    node: str | None = None,
    **fields: AuditValue,
) -> dict[str, object]:
    """One record, now, by this process: what the CLI commands use.

    Adds ``source: cli``, ``actor`` (the login name) and ``node`` (the node whose
    config the command ran with). ``AuditError`` if it cannot be written.
    """
    fields = {"source": "cli", "actor": local_actor(), **fields}
    if node is not None:
        fields["node"] = node
    event = AuditEvent.of(kind, at=time.time(), **fields)
    try:
        (record,) = append_events(path, [event], max_bytes=max_bytes)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise AuditError(f"{path}: no space left to append an audit record") from exc
        raise AuditError(f"{path}: cannot append an audit record: {exc.strerror or exc}") from exc
    return record


# -- the gateway's writer ------------------------------------------------------------------


class AuditSink(Protocol):
    """What the receiver and the client API need: record a decision, waiting for room."""

    async def record(self, kind: str, **fields: AuditValue) -> None: ...


class ReloadLike(Protocol):
    """What :meth:`AuditWriter.record_reload` reads of a rules_runtime ``ReloadRecord``."""

    @property
    def trigger(self) -> str: ...
    @property
    def result(self) -> str: ...
    @property
    def sha256(self) -> str | None: ...
    @property
    def summary(self) -> str: ...
    @property
    def issue_count(self) -> int: ...
    @property
    def added_peers(self) -> tuple[str, ...]: ...
    @property
    def dropped_peers(self) -> tuple[str, ...]: ...


class NoAudit:
    """An :class:`AuditSink` that records nothing (tests, tools without a log)."""

    async def record(self, kind: str, **fields: AuditValue) -> None:
        AuditEvent.of(kind, at=0.0, **fields)  # still refuse a field that may not be


class AuditWriter:
    """Appends the gateway's records in order from one task; see the module docstring.

    Start :meth:`run` in the nursery (``await nursery.start(writer.run)``);
    producers call :meth:`record` (waits for room) or :meth:`record_nowait`
    (drops and counts when full). When :meth:`run` is cancelled it writes what
    is queued, for at most :data:`FLUSH_TIMEOUT` seconds.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        capacity: int = QUEUE_CAPACITY,
        wall_clock: Callable[[], float] = time.time,
        node: str | None = None,
    ) -> None:
        if max_bytes < MIN_MAX_BYTES:
            raise ValueError(f"max_bytes must be at least {MIN_MAX_BYTES}")
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.path = path
        self._max_bytes = max_bytes
        self._wall_clock = wall_clock
        # Every record names the gateway node that wrote it (several nodes, one org).
        self._node: dict[str, AuditValue] = {"node": node} if node is not None else {}
        self._send, self._receive = trio.open_memory_channel[AuditEvent](capacity)

    async def record(self, kind: str, **fields: AuditValue) -> None:
        await self._send.send(AuditEvent.of(kind, at=self._wall_clock(), **self._node, **fields))

    def record_nowait(self, kind: str, **fields: AuditValue) -> bool:
        """Queue a record without waiting; False (counted, logged) if the queue is full."""
        event = AuditEvent.of(kind, at=self._wall_clock(), **self._node, **fields)
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            pass
        else:
            return True
        AUDIT_RECORDS_DROPPED.inc()
        LOGGER.error(
            "audit queue full: a %s record was dropped",
            kind,
            extra={"event": "audit_dropped", "kind": kind},
        )
        return False

    def record_reload(self, reload: ReloadLike, peers_now: Container[str]) -> None:
        """The records of one rules load: ``rules_reload``, then a record per peer the
        reload added, removed, or now trusts through another CA or pins. Called on the
        trio thread where waiting is not possible: a full queue drops (and counts)."""
        self.record_nowait(
            "rules_reload",
            trigger=reload.trigger,
            result=reload.result,
            sha256=reload.sha256,
            summary=reload.summary,
            issue_count=reload.issue_count,
            peers_added=list(reload.added_peers),
            peers_dropped=list(reload.dropped_peers),
        )
        for peer in reload.added_peers:
            self.record_nowait("peer_added", peer=peer, rules_sha256=reload.sha256)
        for peer in reload.dropped_peers:
            kind = "peer_trust_changed" if peer in peers_now else "peer_removed"
            self.record_nowait(kind, peer=peer, rules_sha256=reload.sha256)

    def _batch(self, first: AuditEvent) -> list[AuditEvent]:
        batch = [first]
        while len(batch) < MAX_BATCH:
            try:
                batch.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                break
        return batch

    async def _write(self, batch: list[AuditEvent]) -> None:
        """Write ``batch``, retrying until it is written (or cancelled)."""
        while True:
            problem = await trio.to_thread.run_sync(self._append, batch)
            if problem is None:
                return
            AUDIT_WRITE_FAILURES.inc()
            LOGGER.error(
                "audit log %s: %d record(s) not written, trying again in %ss: %s",
                self.path,
                len(batch),
                RETRY_INTERVAL,
                problem,
                extra={"event": "audit_write_failed"},
            )
            await trio.sleep(RETRY_INTERVAL)

    def _append(self, batch: list[AuditEvent]) -> str | None:
        """Append in a worker thread; the problem as text, or None when written."""
        try:
            append_events(self.path, batch, max_bytes=self._max_bytes)
        except AuditError as exc:
            return str(exc)
        except OSError as exc:
            return f"{exc.strerror or exc}"
        return None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        batch: list[AuditEvent] = []
        try:
            while True:
                batch = self._batch(await self._receive.receive())
                await self._write(batch)
                batch = []
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(FLUSH_TIMEOUT):
                while True:
                    try:
                        batch.extend(self._batch(self._receive.receive_nowait()))
                    except trio.WouldBlock:
                        break
                if batch:
                    await self._write(batch)
