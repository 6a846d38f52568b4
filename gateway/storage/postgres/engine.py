"""The PostgreSQL engine: a bounded pool of sync psycopg connections driven from trio.

Theory of operation
-------------------
psycopg 3's async API runs on asyncio only, so the gateway uses its **sync**
API on worker threads: every op is a plain function of a connection, run by
``trio.to_thread.run_sync`` under a :class:`trio.CapacityLimiter` as large as
the :class:`psycopg_pool.ConnectionPool`, so no thread ever waits for a
connection that another thread of ours holds, and at most
:data:`POOL_SIZE` ops touch the server at once.

Writes: each op runs in its own transaction (``BEGIN ... COMMIT``) on a
connection whose session has ``synchronous_commit = on``: ``COMMIT`` returns
only once the commit record is flushed to the server's WAL, so *returned*
means *durable*, as for SQLite. There is no group commit here: the server
does its own (concurrent commits share WAL flushes). A write cannot be
cancelled once it runs (its caller waits for the outcome, so it never leaves
the database in a state it cannot know); waiting for a thread slot can be.

Concurrency between writers (threads of this node, or other nodes on the
same database) is the database's job: constraints, row locks on counter rows
(:mod:`.schema`) and ``ON CONFLICT``. An op that PostgreSQL aborts for a
deadlock or a serialization failure is rolled back and run again, up to
:data:`MAX_ATTEMPTS` times: ops must have no effect outside their connection.

Errors: psycopg errors are translated into
:class:`~gateway.errors.StorageError` where they leave the thread
(:class:`~gateway.errors.StorageFullError` for SQLSTATE 53100, disk full),
never with the DSN's password. A lost connection fails the op (its commit may
or may not have happened: the caller answers "try again", never "accepted");
the pool checks each connection before handing it out and replaces broken
ones, so the engine recovers by itself when the server comes back.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Final, TypeVar

import psycopg
import psycopg.conninfo
import psycopg_pool
import trio

from gateway.errors import StorageError, StorageFullError

LOGGER = logging.getLogger("gateway.storage")

T = TypeVar("T")
Connection = psycopg.Connection[tuple[Any, ...]]
Op = Callable[[Connection], T]

POOL_SIZE: Final = 8  # connections (and worker threads) per gateway process
CONNECT_TIMEOUT_S: Final = 5  # libpq connect_timeout: a server that does not answer
POOL_TIMEOUT_S: Final = 3.0  # wait this long for a connection before the op fails
OPEN_TIMEOUT_S: Final = 10.0  # the pool's first connections, at start
MAX_ATTEMPTS: Final = 3  # runs of one op that meets deadlocks or serialization failures
_DISK_FULL: Final = "53100"
_RETRY_STATES: Final = frozenset({"40001", "40P01"})  # serialization failure, deadlock


def describe(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error:
        return "postgresql://(unreadable URL)"
    user = str(params.get("user") or "")
    host = str(params.get("host") or "localhost")
    port = str(params.get("port") or "")
    dbname = str(params.get("dbname") or "")
    where = f"{host}:{port}" if port else host
    return f"postgresql://{user + '@' if user else ''}{where}/{dbname}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def storage_error(name: str, exc: psycopg.Error | psycopg_pool.PoolTimeout) -> StorageError:
    """Our error for a psycopg one: one line, no DSN, full disk told apart."""
    if isinstance(exc, psycopg_pool.PoolTimeout):
        return StorageError(f"storage {name}: no database connection within {POOL_TIMEOUT_S:g}s")
    kind = StorageFullError if getattr(exc, "sqlstate", None) == _DISK_FULL else StorageError
    return kind(f"storage {name}: {type(exc).__name__}: {_first_line(exc)}")


def _configure(conn: Connection) -> None:
    """Every pooled connection: commits durable before they return."""
    conn.execute("SET synchronous_commit TO on")


class PostgresEngine:
    """The pool and the thread limiter of one database. Build with :func:`open_postgres_engine`."""

    def __init__(self, url: str, *, pool_size: int) -> None:
        self.name = describe(url)
        self._url = url
        self._limiter = trio.CapacityLimiter(pool_size)
        self._pool: psycopg_pool.ConnectionPool[Connection] = psycopg_pool.ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            open=False,
            timeout=POOL_TIMEOUT_S,
            kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S},
            configure=_configure,
            check=psycopg_pool.ConnectionPool.check_connection,
            reconnect_timeout=30.0,
            name="gateway-storage",
        )
        self._closing = False
        self.commits = 0  # write transactions committed by this process
        # Names this engine in the mailbox notifications it sends (.arrivals), so
        # that its own listener can tell them from other nodes'.
        self.instance_id = secrets.token_hex(8)

    # -- trio side -------------------------------------------------------------
    async def write(self, fn: Op[T], *, cancellable: bool = False) -> T:
        """Run ``fn(conn)`` in one transaction; return its value once committed (durable).

        With ``cancellable`` (probes whose outcome nobody needs once the
        caller gave up) the caller may leave while the op still runs.
        """
        return await self._run(self._write_in_thread, fn, cancellable=cancellable)

    async def read(self, fn: Op[T]) -> T:
        """Run ``fn(conn)`` outside a transaction (autocommit: each statement one snapshot)."""
        return await self._run(self._read_in_thread, fn, cancellable=True)

    async def _run(self, runner: Callable[[Op[T]], T], fn: Op[T], *, cancellable: bool) -> T:
        if self._closing:
            raise StorageError(f"storage {self.name} is closed")
        try:
            return await trio.to_thread.run_sync(
                runner, fn, limiter=self._limiter, abandon_on_cancel=cancellable
            )
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            raise storage_error(self.name, exc) from exc

    # -- thread side -----------------------------------------------------------
    def _write_in_thread(self, fn: Op[T]) -> T:
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                with self._pool.connection() as conn, conn.transaction():
                    result = fn(conn)
            except psycopg.Error as exc:
                if exc.sqlstate not in _RETRY_STATES or attempt == MAX_ATTEMPTS:
                    raise
                LOGGER.debug("storage: %s; running the transaction again", _first_line(exc))
                continue
            self.commits += 1
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _read_in_thread(self, fn: Op[T]) -> T:
        with self._pool.connection() as conn:
            return fn(conn)

    def connect_direct(self, **options: Any) -> Connection:
        """A connection of its own, outside the pool (autocommit); in a thread.

        For a session that outlives ops, such as ``LISTEN`` (.arrivals).
        """
        return psycopg.connect(
            self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, **options
        )

    # -- life --------------------------------------------------------------------
    async def _start(self, setup: Op[object]) -> None:
        await trio.to_thread.run_sync(self._start_in_thread, setup)

    def _start_in_thread(self, setup: Op[object]) -> None:
        # One plain connection first: a wrong DSN or a server that is down is
        # told in one line now, not as a pool timeout later.
        try:
            conn = psycopg.connect(self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
        except psycopg.Error as exc:
            raise StorageError(f"storage {self.name}: cannot connect: {_first_line(exc)}") from exc
        with conn:
            _check_server(conn, self.name)
            setup(conn)
        try:
            self._pool.open(wait=True, timeout=OPEN_TIMEOUT_S)
        except psycopg_pool.PoolTimeout as exc:
            self._pool.close()
            raise StorageError(
                f"storage {self.name}: cannot open the connection pool within {OPEN_TIMEOUT_S:g}s"
            ) from exc

    async def aclose(self) -> None:
        """Refuse new ops and close the pool (ops running finish first)."""
        if self._closing:
            return
        self._closing = True
        await trio.to_thread.run_sync(self._pool.close)


def _check_server(conn: Connection, name: str) -> None:
    row = conn.execute("SELECT current_setting('server_version_num')::int").fetchone()
    if row is None or int(row[0]) < 130000:
        raise StorageError(f"storage {name}: PostgreSQL 13 or newer is needed")
    fsync = conn.execute("SHOW fsync").fetchone()
    if fsync is not None and fsync[0] != "on":
        LOGGER.warning("storage %s: the server runs with fsync off: commits are not durable", name)


@asynccontextmanager
async def open_postgres_engine(
    url: str, *, setup: Op[object], pool_size: int = POOL_SIZE
) -> AsyncIterator[PostgresEngine]:
    """Connect, run ``setup(conn)`` (migrations; in autocommit mode), open the pool.

    Raises :class:`~gateway.errors.StorageError` with one clear line for a
    wrong URL, a server that cannot be reached, or a refused schema.
    """
    if not isinstance(pool_size, int) or not 1 <= pool_size <= 64:
        raise ValueError(f"pool_size must be 1..64, got {pool_size!r}")
    try:
        psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise StorageError(f"storage: the PostgreSQL URL is not valid: {_first_line(exc)}") from exc
    engine = PostgresEngine(url, pool_size=pool_size)
    try:
        await engine._start(setup)
    except psycopg.Error as exc:
        raise storage_error(engine.name, exc) from exc
    try:
        yield engine
    finally:
        with trio.CancelScope(shield=True):
            await engine.aclose()
