"""The SQLite engine: one writer thread that group-commits, a few reader threads.

Theory of operation
-------------------
SQLite allows one writer at a time, and a durable commit (WAL,
``synchronous=FULL``) costs one fsync however much it carries. So all writes go
through **one writer thread** that owns the only write connection. A write is a
plain function of that connection (an *op*). Trio tasks queue ops; the writer
takes *every* op that is waiting (up to :data:`MAX_BATCH_OPS`) and runs them in
one ``BEGIN IMMEDIATE ... COMMIT``. An op that raises is rolled back alone and
gets its exception, the others commit: the batch first runs with no
savepoints (they make SQLite copy each changed page to a sub-journal, about
half the cost of an op), and only if an op fails is it rolled back and
replayed with each op inside its own ``SAVEPOINT``. So an op may run twice
and must have no effect outside its connection.
Only after the ``COMMIT`` returns are the waiting tasks woken (through the trio
token's ``run_sync_soon``), so *returned* always means *durable*. While one
commit syncs, the next batch gathers: under load, one fsync serves many
writers (group commit). :attr:`SqliteEngine.commits` counts the commits, so a
test can prove the batching.

Reads run on **reader threads**, each owning one connection for its whole life
(``query_only``), so no connection is ever touched by two threads. In WAL mode
readers never block the writer, and each read is one short transaction, so it
sees one consistent snapshot that includes every write already returned.
(Dedicated threads rather than ``trio.to_thread`` with thread-local
connections: trio's thread cache retires idle threads, which would churn
connections and leave no thread able to close them at shutdown.)

**Small reads inline.** A read known to touch a few rows through an index
(a token by its hash, the first envelopes of a lane or a mailbox) may run
with :meth:`SqliteEngine.read_small` on a connection owned by the trio thread
itself: tens of microseconds from the page cache, against two thread
switches (a queue hand-off and a wake-up of the event loop, ~0.2 ms each on a
busy machine) for a reader thread. That connection never waits for a lock
(``busy_timeout`` 0): a read that meets one (a checkpoint resetting the WAL)
is run on a reader thread instead, so the event loop is never held waiting.

Bounds: at most :data:`MAX_PENDING_WRITES` ops queued or running (callers wait
beyond that, so memory stays bounded), at most :data:`MAX_PENDING_READS` reads.
A slot is given back when the op finishes, not when its caller stops waiting.

Cancellation: a read can be cancelled at any time (it has no effects). A write
cannot be cancelled once queued: its caller waits, shielded, for the outcome,
so a cancelled caller never leaves the database in a state it cannot know.
Waiting for a free slot is cancellable as usual.

Errors: ``sqlite3`` errors are translated into :class:`~gateway.errors.StorageError`
where they reach the trio side; other exceptions raised by an op (our own
``ValueError`` or ``StorageError``) pass through unchanged. If a commit fails,
every op of its batch fails.

Shutdown: new ops are refused, queued ops finish, readers close, then the
writer closes last, so SQLite checkpoints the WAL and removes it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final, Generic, Protocol, TypeVar

import outcome
import trio

from gateway.errors import StorageError, StorageFullError

T = TypeVar("T")

MAX_PENDING_WRITES: Final = 4096  # write ops queued or running at once
MAX_BATCH_OPS: Final = 512  # ops per commit; the rest wait for the next one
MAX_PENDING_READS: Final = 1024
READER_THREADS: Final = 4
MAX_READER_THREADS: Final = 64
BUSY_TIMEOUT_MS: Final = 5_000  # wait this long for another process's write lock
ANALYSIS_LIMIT: Final = 400  # rows per index read by the ANALYZE of PRAGMA optimize
JOURNAL_SIZE_LIMIT_BYTES: Final = 64 * 1024 * 1024  # WAL is cut back to this after a checkpoint
MIN_SQLITE_VERSION: Final = (3, 35, 0)  # RETURNING
FILE_MODE: Final = 0o600  # ciphertext and token hashes: owner only (WAL and shm inherit it)

WriteOp = Callable[[sqlite3.Connection], T]
ReadOp = Callable[[sqlite3.Connection], T]


class CommitHooks(Protocol):
    """What the writer tells a side store (segment files) around each transaction.

    All run on the writer thread. ``before_commit`` may raise: the batch then
    fails as a failed commit does (and ``after_rollback`` follows).
    """

    def mark(self) -> object: ...
    def rollback_to(self, mark: object) -> None: ...
    def before_commit(self) -> None: ...
    def after_commit(self, conn: sqlite3.Connection) -> None: ...
    def after_rollback(self) -> None: ...
    def close(self) -> None: ...


class _NoHooks:
    def mark(self) -> object:
        return None

    def rollback_to(self, mark: object) -> None:
        pass

    def before_commit(self) -> None:
        pass

    def after_commit(self, conn: sqlite3.Connection) -> None:
        pass

    def after_rollback(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Stop:
    """Tells a thread to finish."""


_STOP: Final = _Stop()


class _Job(Generic[T]):
    """One op on its way to a thread and its outcome on the way back."""

    __slots__ = ("alone", "done", "fn", "result", "slots")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], T],
        *,
        slots: trio.Semaphore | None,
        alone: bool = False,
    ) -> None:
        self.fn = fn
        self.slots = slots
        self.alone = alone  # runs outside any transaction, in no batch (checkpoints)
        self.result: outcome.Outcome[T] | None = None
        self.done = trio.Event()


def _wake(jobs: Sequence[_Job[object]]) -> None:
    """Runs in the trio thread: hand each job's outcome back and free its slot."""
    for job in jobs:
        job.done.set()
        if job.slots is not None:
            job.slots.release()


_BUSY_CODES: Final = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})


def connect(
    path: str, *, reader: bool, busy_timeout_ms: int = BUSY_TIMEOUT_MS
) -> sqlite3.Connection:
    """A connection with the gateway's PRAGMAs. Call it in the thread that will own it."""
    if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
        wanted = ".".join(map(str, MIN_SQLITE_VERSION))
        raise StorageError(f"SQLite {sqlite3.sqlite_version} is too old: {wanted} or newer needed")
    conn = sqlite3.connect(
        path,
        timeout=busy_timeout_ms / 1000,
        isolation_level=None,  # we issue BEGIN/COMMIT ourselves
        check_same_thread=True,
    )
    try:
        _configure(conn, path, reader=reader, busy_timeout_ms=busy_timeout_ms)
    except BaseException:
        conn.close()
        raise
    return conn


def _configure(conn: sqlite3.Connection, path: str, *, reader: bool, busy_timeout_ms: int) -> None:
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    if not reader:
        (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if str(mode).lower() != "wal":
            raise StorageError(f"storage {path}: cannot use WAL mode (got {mode!r})")
        conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT_BYTES}")
    # FULL: in WAL mode, every commit syncs the WAL, so a returned write
    # survives power loss, not only a crash of the process.
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA trusted_schema = OFF")
    (secure,) = conn.execute("PRAGMA secure_delete = ON").fetchone()
    if secure != 1:
        raise StorageError(f"storage {path}: this SQLite cannot overwrite deleted data")
    if reader:
        conn.execute("PRAGMA query_only = ON")


_SQLITE_FULL: Final = 13  # "database or disk is full" (sqlite3.SQLITE_FULL, 3.11+)


def _is_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):  # a segment file's sync (gateway.storage.sqlite.segments)
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF == _SQLITE_FULL


def _storage_error(path: str, exc: sqlite3.Error) -> StorageError:
    kind = StorageFullError if _is_full(exc) else StorageError
    return kind(f"storage {path}: {type(exc).__name__}: {exc}")


def _translate(path: str, result: outcome.Outcome[T]) -> T:
    try:
        return result.unwrap()
    except sqlite3.Error as exc:
        raise _storage_error(path, exc) from exc


class SqliteEngine:
    """The threads and connections of one SQLite database. Build with :func:`open_sqlite_engine`."""

    def __init__(self, path: str, *, readers: int, hooks: CommitHooks | None = None) -> None:
        self.path = path
        self.hooks: CommitHooks = hooks if hooks is not None else _NoHooks()
        self._readers = readers
        self._token = trio.lowlevel.current_trio_token()
        self._write_queue: queue.SimpleQueue[_Job[object] | _Stop] = queue.SimpleQueue()
        self._read_queue: queue.SimpleQueue[_Job[object] | _Stop] = queue.SimpleQueue()
        self._write_slots = trio.Semaphore(MAX_PENDING_WRITES)
        self._read_slots = trio.Semaphore(MAX_PENDING_READS)
        self._writer: threading.Thread | None = None
        self._reader_threads: list[threading.Thread] = []
        self._inline: sqlite3.Connection | None = None  # the trio thread's own reader
        self._closing = False
        self._closed = False
        self._broken: BaseException | None = None  # set by the writer after a fatal error
        self.commits = 0  # committed write transactions (written by the writer thread only)
        self.ops_committed = 0  # ops in them

    # -- trio side -------------------------------------------------------------
    async def write(self, fn: WriteOp[T], *, cancellable: bool = False) -> T:
        """Run ``fn(conn)`` in the next group commit; return its value once durable.

        The caller waits for the outcome even if cancelled, unless
        ``cancellable`` (for probes whose outcome nobody needs once the caller
        gave up): the op still runs, and its slot is given back when it ends.
        """
        return await self._submit_write(fn, alone=False, cancellable=cancellable)

    async def write_alone(self, fn: WriteOp[T]) -> T:
        """Run ``fn(conn)`` on the write connection outside any transaction (checkpoints)."""
        return await self._submit_write(fn, alone=True)

    async def read(self, fn: ReadOp[T]) -> T:
        """Run ``fn(conn)`` on a reader connection, in one read transaction."""
        await self._read_slots.acquire()
        if self._closing:
            self._read_slots.release()
            raise StorageError(f"storage {self.path} is closed")
        job: _Job[T] = _Job(fn, slots=self._read_slots)
        self._read_queue.put(job)  # type: ignore[arg-type]
        await job.done.wait()
        assert job.result is not None
        return _translate(self.path, job.result)

    async def read_small(self, fn: ReadOp[T]) -> T:
        """Run a small read (a few rows through an index) on the trio thread, if it can.

        ``fn`` runs in one read transaction on the trio thread's own connection:
        it blocks the event loop while it runs, so only ops bounded to a few
        rows belong here. If that connection meets a lock it does not wait: the
        read goes to a reader thread, as :meth:`read` does.
        """
        if self._closing:
            raise StorageError(f"storage {self.path} is closed")
        try:
            conn = self._inline
            if conn is None:
                conn = self._inline = connect(self.path, reader=True, busy_timeout_ms=0)
            return _run_read(conn, fn)
        except sqlite3.Error as exc:
            busy = isinstance(exc, sqlite3.OperationalError) and exc.sqlite_errorcode in _BUSY_CODES
            if not busy:
                raise _storage_error(self.path, exc) from exc
        return await self.read(fn)

    async def _submit_write(self, fn: WriteOp[T], *, alone: bool, cancellable: bool = False) -> T:
        await self._write_slots.acquire()
        # Checked after the last await: close() queues its stop in the same
        # thread, so a job queued here is always ahead of it.
        if self._closing:
            self._write_slots.release()
            raise StorageError(f"storage {self.path} is closed")
        job: _Job[T] = _Job(fn, slots=self._write_slots, alone=alone)
        self._write_queue.put(job)  # type: ignore[arg-type]
        with trio.CancelScope(shield=not cancellable):
            await job.done.wait()
        assert job.result is not None
        return _translate(self.path, job.result)

    async def _start(self, setup: WriteOp[object]) -> None:
        init: _Job[object] = _Job(setup, slots=None)
        self._writer = threading.Thread(
            target=self._writer_main, args=(init,), name="gateway-storage-writer", daemon=True
        )
        self._writer.start()
        with trio.CancelScope(shield=True):
            await init.done.wait()
        assert init.result is not None
        try:
            _translate(self.path, init.result)
            ready: list[_Job[object]] = []
            for index in range(self._readers):
                job: _Job[object] = _Job(lambda conn: None, slots=None)
                thread = threading.Thread(
                    target=self._reader_main,
                    args=(job,),
                    name=f"gateway-storage-reader-{index}",
                    daemon=True,
                )
                thread.start()
                self._reader_threads.append(thread)
                ready.append(job)
            with trio.CancelScope(shield=True):
                for job in ready:
                    await job.done.wait()
            for job in ready:
                assert job.result is not None
                _translate(self.path, job.result)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.aclose()
            raise

    async def aclose(self) -> None:
        """Refuse new ops, finish queued ones, close readers, then the writer."""
        if self._closed:
            return
        self._closed = self._closing = True
        if self._inline is not None:
            self._inline.close()
            self._inline = None
        readers = list(self._reader_threads)
        for _ in readers:
            self._read_queue.put(_STOP)
        for thread in readers:
            await trio.to_thread.run_sync(thread.join)
        if self._writer is not None:
            self._write_queue.put(_STOP)
            await trio.to_thread.run_sync(self._writer.join)

    # -- thread side -----------------------------------------------------------
    def _hand_back(self, jobs: Sequence[_Job[object]]) -> None:
        # If the trio run is over, nobody is waiting any more.
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(_wake, jobs)

    def _reader_main(self, ready: _Job[object]) -> None:
        try:
            conn = connect(self.path, reader=True)
        except BaseException as exc:
            ready.result = outcome.Error(exc)
            self._hand_back([ready])
            conn = None
        else:
            ready.result = outcome.Value(None)
            self._hand_back([ready])
        try:
            while True:
                job = self._read_queue.get()
                if isinstance(job, _Stop):
                    return
                if conn is None:
                    job.result = outcome.Error(StorageError(f"storage {self.path}: no reader"))
                else:
                    job.result = outcome.capture(_run_read, conn, job.fn)
                self._hand_back([job])
        finally:
            if conn is not None:
                conn.close()

    def _writer_main(self, init: _Job[object]) -> None:
        try:
            conn = connect(self.path, reader=False)
        except BaseException as exc:
            init.result = outcome.Error(exc)
            self._hand_back([init])
            return
        try:
            init.result = outcome.capture(init.fn, conn)
            self._hand_back([init])
            if isinstance(init.result, outcome.Value):
                self._write_loop(conn)
        finally:
            with contextlib.suppress(sqlite3.Error):  # only a hint for the query planner
                # Bounded, as SQLite advises: an ANALYZE that optimize decides on
                # reads about this many rows per index instead of all of them (a
                # million spooled: 1.5 ms, not 210 ms at the close of every
                # admin command, `gateway peers` included).
                conn.execute(f"PRAGMA analysis_limit = {ANALYSIS_LIMIT}")
                conn.execute("PRAGMA optimize")
            conn.close()
            self.hooks.close()

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        while True:
            first = self._write_queue.get()
            if isinstance(first, _Stop):
                return
            batch: list[_Job[object]] = []
            after: _Job[object] | _Stop | None = None
            job: _Job[object] | _Stop = first
            while True:
                if isinstance(job, _Stop) or job.alone:
                    after = job
                    break
                batch.append(job)
                if len(batch) >= MAX_BATCH_OPS:
                    break
                try:
                    job = self._write_queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._run_batch(conn, batch)
            if isinstance(after, _Stop):
                return
            if after is not None:
                after.result = (
                    outcome.Error(self._broken_error())
                    if self._broken is not None
                    else outcome.capture(after.fn, conn)
                )
                self._hand_back([after])

    def _broken_error(self) -> StorageError:
        error = StorageError(f"storage {self.path}: the writer failed earlier: {self._broken}")
        error.__cause__ = self._broken
        return error

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Job[object]]) -> None:
        if self._broken is not None:
            for job in batch:
                job.result = outcome.Error(self._broken_error())
            self._hand_back(batch)
            return
        try:
            if not self._run_optimistic(conn, batch):
                # One op failed: undo the batch and replay it, each op in its
                # own savepoint, so the failure is rolled back alone.
                for job in batch:
                    job.result = None
                conn.execute("BEGIN IMMEDIATE")
                for job in batch:
                    conn.execute("SAVEPOINT op")
                    mark = self.hooks.mark()
                    job.result = outcome.capture(job.fn, conn)
                    if isinstance(job.result, outcome.Error):
                        # The op's own changes go; the batch's stay.
                        conn.execute("ROLLBACK TO op")
                        self.hooks.rollback_to(mark)
                    conn.execute("RELEASE op")
            self.hooks.before_commit()
            conn.execute("COMMIT")
        except (sqlite3.Error, OSError) as exc:
            # BEGIN, a savepoint, a segment sync or the commit failed (disk
            # full, I/O error, another process holding the lock too long):
            # nothing of this batch is durable, so no op of it may report success.
            self._abandon(conn, batch, exc)
        except BaseException as exc:  # a bug in the loop itself: fail loudly, never hang
            self._broken = exc
            self._abandon(conn, batch, exc)
        else:
            self.commits += 1
            self.ops_committed += len(batch)
            try:
                # Deleted envelopes' segment bytes are zeroed before anyone is told.
                self.hooks.after_commit(conn)
            except BaseException as exc:  # the commit stands; the writer cannot go on
                self._broken = exc
        self._hand_back(batch)

    def _run_optimistic(self, conn: sqlite3.Connection, batch: list[_Job[object]]) -> bool:
        """Run the batch's ops in one transaction with no savepoints; True if all succeeded.

        A savepoint is cheap to open but makes SQLite copy every page an op
        changes to a sub-journal (a temp file once past 64 KiB): about half of
        an op's time. Ops almost never fail, so the batch runs without them;
        on the rare failure the transaction is rolled back and the caller
        replays the batch with savepoints. A single failing op needs no
        replay: rolled back, it has its outcome, and an empty transaction is
        left for the caller's ``COMMIT``.
        """
        conn.execute("BEGIN IMMEDIATE")
        for job in batch:
            job.result = outcome.capture(job.fn, conn)
            if isinstance(job.result, outcome.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                self.hooks.after_rollback()
                if len(batch) > 1:
                    return False
                conn.execute("BEGIN IMMEDIATE")
                return True
        return True

    def _abandon(
        self, conn: sqlite3.Connection, batch: list[_Job[object]], exc: BaseException
    ) -> None:
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error as rollback_exc:
            self._broken = rollback_exc  # the connection's state is unknown now
        try:
            self.hooks.after_rollback()
        except BaseException as hook_exc:
            self._broken = hook_exc
        for job in batch:
            if job.result is None or isinstance(job.result, outcome.Value):
                kind = StorageFullError if _is_full(exc) else StorageError
                error = kind(f"storage {self.path}: commit failed: {exc}")
                error.__cause__ = exc
                job.result = outcome.Error(error)


def _run_read(conn: sqlite3.Connection, fn: ReadOp[T]) -> T:
    conn.execute("BEGIN")
    try:
        return fn(conn)
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")


def _prepare_file(path: Path) -> str:
    if str(path) == ":memory:" or str(path).startswith("file:"):
        raise StorageError(f"storage path {path} must be a plain file path")
    if not path.parent.is_dir():
        raise StorageError(f"storage {path}: directory {path.parent} does not exist")
    try:
        # Create it owner-only before SQLite does (SQLite would honour the umask).
        fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        os.close(fd)
    except OSError as exc:
        raise StorageError(f"storage {path}: cannot open: {exc.strerror}") from exc
    return str(path)


@asynccontextmanager
async def open_sqlite_engine(
    path: str | os.PathLike[str],
    *,
    setup: WriteOp[object],
    readers: int = READER_THREADS,
    hooks: CommitHooks | None = None,
) -> AsyncIterator[SqliteEngine]:
    """Start the writer (which runs ``setup(conn)`` first, e.g. migrations) and readers.

    ``setup`` runs outside any transaction and manages its own. Everything is
    closed on exit, even when the body is cancelled.
    """
    if not isinstance(readers, int) or not 1 <= readers <= MAX_READER_THREADS:
        raise ValueError(f"readers must be 1..{MAX_READER_THREADS}, got {readers!r}")
    engine = SqliteEngine(_prepare_file(Path(path)), readers=readers, hooks=hooks)
    await engine._start(setup)
    try:
        yield engine
    finally:
        with trio.CancelScope(shield=True):
            await engine.aclose()
