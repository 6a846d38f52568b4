"""Large envelopes' bytes in append-only segment files beside the SQLite database.

Theory of operation
-------------------
An envelope of at least :data:`SEGMENT_THRESHOLD_BYTES` is not written into its
``spool`` or ``mailbox`` row: the writer thread appends it to the current
segment file (``<db>.segments/<name>.seg``) and the row holds ``(segment,
seg_offset, seg_length)`` with an empty ``data``. One SQLite page of row
instead of ~17 overflow pages per 64 KiB, each written to the WAL, zeroed on
delete and checkpointed.

The engine calls this module around each group commit (:class:`SegmentStore`
is its :class:`~gateway.storage.sqlite.engine.CommitHooks`):

* **before COMMIT**: ``fdatasync`` every segment appended to in the batch (and
  the directory, if a segment was created), so a committed row never points
  at bytes that are not on disk. One sync per batch, not per envelope.
* **after COMMIT**, before any caller is woken: the ranges of the rows the
  batch deleted (a temporary trigger on the write connection reports every
  delete, whatever the path: ack, burn, forward, expiry, purge) are
  overwritten with zeros, adjacent ranges coalesced into one ``pwrite``; a
  segment left with no envelope (live counts are kept in memory, computed at
  open) is unlinked, after the database confirms no row names it.
* **after a rollback** (a failed op, a failed commit): the bytes the rolled
  back ops appended are referenced by nothing: the current segment is cut
  back to before them, any other range is zeroed, at once.

Zeros are written to the page cache, not synced per batch. Once synced (at
the segment's next sync for an append, at :meth:`sync_zeros` from ``scrub``,
or as soon as :data:`PUNCH_AFTER_BYTES` of zeros wait) their blocks are
punched out of the file (``fallocate(PUNCH_HOLE)``), so deleted envelopes give
their disk space back before their segment is unlinked. A crash between a COMMIT and its
zeroing, or before zeros reached the disk, leaves deleted bytes in a segment:
:meth:`recover`, run at every open under the write lock, zeroes every range no
committed row references, cuts each segment's unreferenced tail, and unlinks
segments nothing references. So a kill -9 loses nothing (rows only point at
synced bytes) and leaves nothing referenced that is missing.

Several processes (a gateway and an admin command) may write one database.
Each appends only to segments it created (``O_EXCL``, random names) and holds
an exclusive ``flock`` on them while it may still append or commit rows
naming them; recovery and unlinking skip any segment another process holds.

Readers (reader threads, the trio thread) ``pread`` ranges by opening the
segment for each read. A reader's snapshot may still show a row whose delete
committed after the snapshot began, and whose bytes are being zeroed: so the
writer bumps :attr:`SegmentStore.epoch` before it zeroes or unlinks, and a read
that saw the epoch move re-checks its rows in a fresh snapshot, dropping those
deleted meanwhile (a row still present then had its bytes intact when read).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import secrets
import sqlite3
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

from gateway.errors import StorageError, StorageFullError

LOGGER = logging.getLogger("gateway.storage")

# Envelopes this large or larger go to a segment. Measured (docs/performance.md,
# "Seventh round"): at 1 KiB a row is as fast or a little faster; from 4 KiB on
# (a row spills into overflow pages) a segment is faster: ~1.2x at 4 KiB,
# ~1.7x at 8 KiB, ~4-5x at 64 KiB.
SEGMENT_THRESHOLD_BYTES: Final = 4 * 1024
SEGMENT_ROLL_BYTES: Final = 64 * 1024 * 1024  # a new segment once the current one is this big
SEGMENT_SUFFIX: Final = ".seg"
FILE_MODE: Final = 0o600
DIR_MODE: Final = 0o700
_ZEROS: Final = bytes(1024 * 1024)  # one pwrite of zeros at most this long
_SCAN_CHUNK: Final = 1024 * 1024
# Zeroed ranges give their blocks back to the filesystem (a punched hole) once
# their zeros are synced: at the next sync of their segment anyway, at a scrub,
# or as soon as this many zeroed bytes wait, so a full disk gets room back.
PUNCH_AFTER_BYTES: Final = 1024 * 1024
_ZEROS_VIEW: Final = memoryview(_ZEROS)

# Envelopes found without their bytes (a segment file deleted or cut by hand) are
# logged once each and shown by a gauge; at most this many are remembered.
MAX_MISSING_TRACKED: Final = 1024

#: The envelope tables that may name a segment.
ENVELOPE_TABLES: Final = ("spool", "mailbox")
# The two questions asked of every table above; each is answered from the
# table's partial index of segment rows (schema migration 9), never a walk of
# all its rows (tests/integration/test_storage_segments.py checks the plans).
REFERENCED_SQL: Final = (
    "SELECT segment, seg_offset, seg_length FROM {table} WHERE segment IS NOT NULL"
)
NAMED_SQL: Final = "SELECT 1 FROM {table} WHERE segment = ? LIMIT 1"
#: Columns appended to a row read of ``data`` (:meth:`SegmentStore.resolve`).
REF_COLUMNS: Final = "segment, seg_offset, seg_length"

Row = tuple[Any, ...]


def segments_dir(db_path: str | os.PathLike[str]) -> Path:
    """Where the segments of the database at ``db_path`` live."""
    path = Path(db_path)
    return path.with_name(path.name + ".segments")


def _segment_name(path: Path) -> str | None:
    name = path.name
    if not name.endswith(SEGMENT_SUFFIX):
        return None
    stem = name[: -len(SEGMENT_SUFFIX)]
    return stem if stem and all(c in "0123456789abcdef" for c in stem) else None


def _open_for_read(directory: Path, segment: str) -> int | None:
    try:
        return os.open(directory / (segment + SEGMENT_SUFFIX), os.O_RDONLY)
    except FileNotFoundError:
        return None


def read_range(directory: Path, segment: str, offset: int, length: int) -> bytes | None:
    """The bytes of one range, or None if the segment is gone or too short."""
    fd = _open_for_read(directory, segment)
    if fd is None:
        return None
    try:
        data = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    return data if len(data) == length else None


@dataclass
class _Segment:
    """A segment this process appends to: its fd holds the flock."""

    name: str
    fd: int
    size: int


@dataclass
class _Batch:
    """What the current write transaction did to segments."""

    appended: list[tuple[str, int, int]] = field(default_factory=list)
    freed: list[tuple[str, int, int]] = field(default_factory=list)
    created: bool = False
    retired: list[_Segment] = field(default_factory=list)  # rolled, still locked to the commit


class SegmentStore:
    """The segment files of one database: writes on the writer thread, reads anywhere."""

    def __init__(
        self,
        db_path: str | os.PathLike[str],
        *,
        threshold: int = SEGMENT_THRESHOLD_BYTES,
        roll_bytes: int = SEGMENT_ROLL_BYTES,
    ) -> None:
        if threshold < 1 or roll_bytes < 1:
            raise ValueError("segment threshold and roll size must be positive")
        self.directory = segments_dir(db_path)
        self.threshold = threshold
        self.roll_bytes = roll_bytes
        self.epoch = 0  # bumped (writer thread) before any zeroing or unlink
        self._lock = threading.Lock()  # epoch and the counters, for metrics readers
        self._current: _Segment | None = None
        self._batch = _Batch()
        self._live: dict[str, list[int]] = {}  # segment -> [envelopes, bytes], from the rows
        self._unsynced_zeros: dict[str, list[tuple[int, int]]] = {}  # zeroed, to sync and punch
        self._unsynced_bytes = 0
        self._unzeroed: list[tuple[str, int, int]] = []  # zeroing failed (an I/O error)
        # (segment, offset) of rows found without their bytes, until the row goes.
        self._missing: set[tuple[str, int]] = set()

    # -- open and recovery (writer thread, in the engine's setup) ------------------
    def install(self, conn: sqlite3.Connection) -> None:
        """Report every deleted segment range of this connection to the store.

        Temporary triggers: they live on the write connection only, so
        another program's connection is not asked for the function.
        """
        conn.create_function("gateway_segment_freed", 3, self._freed, deterministic=False)
        for table in ENVELOPE_TABLES:
            conn.execute(
                f"CREATE TEMP TRIGGER IF NOT EXISTS {table}_segment_out "
                f"AFTER DELETE ON main.{table} WHEN OLD.segment IS NOT NULL BEGIN "
                "SELECT gateway_segment_freed(OLD.segment, OLD.seg_offset, OLD.seg_length); END"
            )

    def _freed(self, segment: str, offset: int, length: int) -> None:
        self._batch.freed.append((segment, offset, length))

    def recover(self, conn: sqlite3.Connection) -> None:
        """Zero what no committed row references, cut tails, unlink unreferenced segments.

        Runs in a write transaction, so no other process commits meanwhile;
        segments another process holds (its current ones) are left alone.
        """
        self.directory.mkdir(mode=DIR_MODE, exist_ok=True)
        refs = _referenced(conn)
        self._live = {
            name: [len(ranges), sum(length for _off, length in ranges)]
            for name, ranges in refs.items()
        }
        for path in sorted(self.directory.iterdir()):
            name = _segment_name(path)
            if name is None:
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # another process appends to it
                ranges = refs.get(name)
                if not ranges:
                    path.unlink(missing_ok=True)
                    continue
                _scrub_gaps(fd, ranges)
            finally:
                os.close(fd)
        _sync_dir(self.directory)

    def close(self) -> None:
        """At the writer's end: the current segment goes too if no row names it.

        Its count is exact or too high (only this process adds to it; another
        may delete from it), so a count of zero means no row names it.
        """
        current = self._current
        if current is not None:
            with self._lock:
                live = self._live.get(current.name, [0, 0])[0]
            if live <= 0:
                with contextlib.suppress(OSError):
                    (self.directory / (current.name + SEGMENT_SUFFIX)).unlink()
        for segment in (current, *self._batch.retired):
            if segment is not None:
                os.close(segment.fd)
        self._current = None
        self._batch = _Batch()

    # -- writes (writer thread, inside an op) --------------------------------------
    def append(self, data: bytes) -> tuple[str, int, int]:
        """Append ``data`` to the current segment: ``(segment, offset, length)``."""
        current = self._current
        if current is not None and current.size > 0 and current.size + len(data) > self.roll_bytes:
            self._batch.retired.append(current)
            current = self._current = None
        if current is None:
            current = self._current = self._create()
            self._batch.created = True
        offset = current.size
        try:
            _pwrite_all(current.fd, data, offset)
        except OSError as exc:
            # Nothing of a half-written envelope may stay (nor hold the disk).
            with contextlib.suppress(OSError):
                os.ftruncate(current.fd, offset)
            raise _storage_error(self.directory, exc) from exc
        current.size += len(data)
        ref = (current.name, offset, len(data))
        self._batch.appended.append(ref)
        return ref

    def _create(self) -> _Segment:
        while True:
            name = secrets.token_hex(8)
            path = self.directory / (name + SEGMENT_SUFFIX)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, FILE_MODE)
            except FileExistsError:
                continue
            except OSError as exc:
                raise _storage_error(path, exc) from exc
            fcntl.flock(fd, fcntl.LOCK_EX)  # nobody else has it yet: never waits
            return _Segment(name=name, fd=fd, size=0)

    # -- the engine's commit hooks (writer thread) ---------------------------------
    def mark(self) -> tuple[int, int]:
        return len(self._batch.appended), len(self._batch.freed)

    def rollback_to(self, mark: object) -> None:
        """One op was rolled back to its savepoint: forget its deletes, zero its bytes."""
        assert isinstance(mark, tuple)
        appended, freed = mark
        dropped = self._batch.appended[appended:]
        del self._batch.appended[appended:]
        del self._batch.freed[freed:]
        self._drop(dropped)

    def before_commit(self) -> None:
        """Make the batch's appended bytes durable before the commit that names them."""
        batch = self._batch
        if not batch.appended:
            return
        touched = {name for name, _off, _len in batch.appended}
        for segment in (self._current, *batch.retired):
            if segment is not None and segment.name in touched:
                os.fdatasync(segment.fd)
                # Zeros written there before are on the disk now too: give their blocks back.
                ranges = self._unsynced_zeros.pop(segment.name, None)
                if ranges:
                    self._unsynced_bytes -= sum(length for _off, length in ranges)
                    _punch(segment.fd, ranges)
        if batch.created:
            _sync_dir(self.directory)

    def after_commit(self, conn: sqlite3.Connection) -> None:
        """The batch is durable: count its appends, zero its deletes, unlink empties."""
        batch, self._batch = self._batch, _Batch()
        with self._lock:
            for name, _off, length in batch.appended:
                live = self._live.setdefault(name, [0, 0])
                live[0] += 1
                live[1] += length
            emptied: set[str] = set()
            for name, offset, length in batch.freed:
                self._missing.discard((name, offset))
                left = self._live.get(name)
                if left is not None:
                    left[0] -= 1
                    left[1] -= length
                    if left[0] <= 0:
                        emptied.add(name)
        self._release(batch.retired)
        try:
            if batch.freed:
                self._zero(batch.freed)
                if self._unsynced_bytes >= PUNCH_AFTER_BYTES:
                    self.sync_zeros()
            current = self._current.name if self._current is not None else None
            for name in sorted(emptied - {current}):
                self._unlink_if_unused(conn, name)
        except (OSError, sqlite3.Error) as exc:
            # The commit stands. What was not zeroed, punched or unlinked now is
            # at the next scrub or, at the latest, by the recovery at the next open.
            LOGGER.error(  # noqa: TRY400 -- one line: a disk fault, not a bug
                "segment files in %s: after a commit: %s", self.directory, exc
            )

    def after_rollback(self) -> None:
        """The whole batch was rolled back: its appended bytes are referenced by nothing."""
        batch, self._batch = self._batch, _Batch()
        self._drop(batch.appended)
        self._release(batch.retired)

    def _drop(self, appended: Sequence[tuple[str, int, int]]) -> None:
        """Undo appends no commit names: the current segment is cut back to before
        them (they are its last bytes), any other is zeroed."""
        current = self._current
        if current is not None:
            mine = [offset for name, offset, _len in appended if name == current.name]
            if mine:
                try:
                    os.ftruncate(current.fd, min(mine))
                    current.size = min(mine)
                    appended = [a for a in appended if a[0] != current.name]
                except OSError:
                    pass  # zeroed below instead
        self._zero(appended)

    def _release(self, retired: Sequence[_Segment]) -> None:
        for segment in retired:
            os.close(segment.fd)  # and with it the flock

    def _zero(self, ranges: Sequence[tuple[str, int, int]]) -> None:
        if not ranges:
            return
        with self._lock:
            self.epoch += 1
        for name, offset, length in _coalesce(ranges):
            path = self.directory / (name + SEGMENT_SUFFIX)
            try:
                fd = os.open(path, os.O_WRONLY)
            except FileNotFoundError:
                continue
            except OSError:
                self._unzeroed.append((name, offset, length))  # the next scrub tries again
                continue
            try:
                _pwrite_zeros(fd, offset, length)
            except OSError:
                self._unzeroed.append((name, offset, length))
                continue
            finally:
                os.close(fd)
            self._unsynced_zeros.setdefault(name, []).append((offset, length))
            self._unsynced_bytes += length

    def _unlink_if_unused(self, conn: sqlite3.Connection, name: str) -> None:
        path = self.directory / (name + SEGMENT_SUFFIX)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            self._forget(name)
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # another process still appends to it
            # Counts of a segment another process wrote may be stale: ask the rows.
            for table in ENVELOPE_TABLES:
                if conn.execute(NAMED_SQL.format(table=table), (name,)).fetchone() is not None:
                    return
            if name in self._unsynced_zeros:
                os.fdatasync(fd)  # its blocks go back to the filesystem holding zeros
            with self._lock:
                self.epoch += 1
            path.unlink(missing_ok=True)
            self._forget(name)
            dropped = self._unsynced_zeros.pop(name, [])
            self._unsynced_bytes -= sum(length for _off, length in dropped)
        finally:
            os.close(fd)

    def _forget(self, name: str) -> None:
        with self._lock:
            self._live.pop(name, None)

    def sync_zeros(self) -> None:
        """Push the zeros written since the last call to the disk, then punch their
        blocks out of the files (``scrub``, or enough zeros waiting)."""
        retry, self._unzeroed = self._unzeroed, []
        self._zero(retry)
        pending, self._unsynced_zeros = self._unsynced_zeros, {}
        self._unsynced_bytes = 0
        for name, ranges in sorted(pending.items()):
            try:
                fd = os.open(self.directory / (name + SEGMENT_SUFFIX), os.O_WRONLY)
            except FileNotFoundError:
                continue
            try:
                os.fdatasync(fd)
                _punch(fd, ranges)
            finally:
                os.close(fd)

    # -- reads (any thread) --------------------------------------------------------
    def resolve(
        self, conn: sqlite3.Connection, table: str, rows: list[Row], epoch: int
    ) -> list[Row]:
        """Rows read as ``(seq, ..., data, segment, seg_offset, seg_length)``, with
        ``data`` filled in from its segment and the three reference columns cut.

        ``epoch`` is :attr:`epoch` read before the rows' snapshot began. Rows
        deleted since the snapshot (their bytes may be zeros now) are left out.
        A row still there whose bytes are missing fails the read with a
        :class:`StorageError` naming its envelope and file (and is logged once).
        """
        out: list[Row] = []
        missing: set[int] = set()
        fds: dict[str, int | None] = {}  # each segment opened once per read
        try:
            for row in rows:
                segment = row[-3]
                if segment is None:
                    out.append(row[:-3])
                    continue
                if segment not in fds:
                    fds[segment] = _open_for_read(self.directory, segment)
                fd = fds[segment]
                data = os.pread(fd, row[-1], row[-2]) if fd is not None else b""
                if len(data) != row[-1]:
                    missing.add(row[0])
                out.append((*row[:-4], data))
        except OSError as exc:  # not a missing file: permissions, an I/O error
            raise _storage_error(self.directory, exc) from exc
        finally:
            for fd in fds.values():
                if fd is not None:
                    os.close(fd)
        if not missing and self.epoch == epoch:
            return out
        if not any(row[-3] is not None for row in rows):
            return out
        # Something was zeroed or unlinked meanwhile: keep the rows a fresh
        # snapshot still holds (their bytes were intact when read above).
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.execute("BEGIN")
        sql = f"SELECT seq FROM {table} WHERE seq IN (SELECT value FROM json_each(?))"  # noqa: S608
        seqs = json.dumps([row[0] for row in rows])
        present = {seq for (seq,) in conn.execute(sql, (seqs,))}
        if missing & present:
            lost = [row for row in rows if row[0] in missing and row[0] in present]
            self._report_missing(table, lost)
            named = "; ".join(
                f"{row[1]} (row {row[0]}) in {self._path(row[-3])}" for row in lost[:3]
            )
            more = f"; and {len(lost) - 3} more" if len(lost) > 3 else ""
            raise StorageError(
                f"segment files: the bytes of {len(lost)} {table} envelope(s) are missing: "
                f"{named}{more}"
            )
        return [row for row in out if row[0] in present]

    def _path(self, segment: str) -> Path:
        return self.directory / (segment + SEGMENT_SUFFIX)

    def _report_missing(self, table: str, lost: Sequence[Row]) -> None:
        """Log each envelope found without its bytes once, and remember it for the gauge."""
        for row in lost:
            key = (row[-3], row[-2])
            with self._lock:
                if key in self._missing or len(self._missing) >= MAX_MISSING_TRACKED:
                    continue
                self._missing.add(key)
            LOGGER.error(
                "segment file %s: the bytes of %s envelope %s (row %s, %s bytes at %s) are "
                "missing; its %s cannot be read past it until it expires or is removed",
                self._path(row[-3]),
                table,
                row[1],
                row[0],
                row[-1],
                row[-2],
                "lane" if table == "spool" else "mailbox",
            )

    def missing(self) -> int:
        """Envelopes found without their bytes and still in the database (up to
        :data:`MAX_MISSING_TRACKED`), since this store opened."""
        with self._lock:
            return len(self._missing)

    # -- figures -------------------------------------------------------------------
    def stats(self) -> tuple[int, int, int]:
        """(segment files with live envelopes, their envelopes, their bytes)."""
        with self._lock:
            live = [v for v in self._live.values() if v[0] > 0]
            return len(live), sum(v[0] for v in live), sum(v[1] for v in live)


def _storage_error(path: Path, exc: OSError) -> StorageError:
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    kind = StorageFullError if full else StorageError
    return kind(f"storage {path}: {exc.strerror or exc}")


def _referenced(conn: sqlite3.Connection) -> dict[str, list[tuple[int, int]]]:
    refs: dict[str, list[tuple[int, int]]] = {}
    for table in ENVELOPE_TABLES:
        for name, offset, length in conn.execute(REFERENCED_SQL.format(table=table)):
            refs.setdefault(name, []).append((offset, length))
    for ranges in refs.values():
        ranges.sort()
    return refs


def _scrub_gaps(fd: int, ranges: list[tuple[int, int]]) -> None:
    """Zero every byte of the file outside ``ranges`` (sorted); cut the tail after them."""
    changed = False
    position = 0
    gaps: list[tuple[int, int]] = []
    for offset, length in ranges:
        if offset > position:
            changed |= _zero_if_dirty(fd, position, offset - position)
            gaps.append((position, offset - position))
        position = max(position, offset + length)
    if os.fstat(fd).st_size > position:
        os.ftruncate(fd, position)
        changed = True
    if changed:
        os.fdatasync(fd)
    _punch(fd, gaps)


def _zero_if_dirty(fd: int, offset: int, length: int) -> bool:
    end = offset + length
    dirty = False
    while offset < end:
        chunk = os.pread(fd, min(_SCAN_CHUNK, end - offset), offset)
        if not chunk:
            break
        if chunk.count(0) != len(chunk):
            _pwrite_zeros(fd, offset, len(chunk))
            dirty = True
        offset += len(chunk)
    return dirty


def _coalesce(ranges: Sequence[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    merged: list[tuple[str, int, int]] = []
    for name, offset, length in sorted(ranges):
        if merged:
            last_name, last_offset, last_length = merged[-1]
            if last_name == name and last_offset + last_length >= offset:
                end = max(last_offset + last_length, offset + length)
                merged[-1] = (name, last_offset, end - last_offset)
                continue
        merged.append((name, offset, length))
    return merged


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _pwrite_zeros(fd: int, offset: int, length: int) -> None:
    while length > 0:
        step = min(length, len(_ZEROS))
        _pwrite_all(fd, _ZEROS_VIEW[:step], offset)
        offset += step
        length -= step


_FALLOC_FL_KEEP_SIZE: Final = 0x01
_FALLOC_FL_PUNCH_HOLE: Final = 0x02


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.fallocate64
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return cast("Callable[[int, int, int, int], int]", function)


_FALLOCATE: Final = _load_fallocate()


def _punch(fd: int, ranges: Sequence[tuple[int, int]]) -> None:
    """Give the blocks of zeroed ranges back to the filesystem (reads still see zeros).

    Only after the zeros were synced, so the old bytes were overwritten on
    the disk first. Where the filesystem cannot punch holes, the zeros stay.
    """
    if _FALLOCATE is None:
        return
    for _name, offset, length in _coalesce([("", o, n) for o, n in ranges]):
        if _FALLOCATE(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
            return  # EOPNOTSUPP and the like: zeros are enough


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
