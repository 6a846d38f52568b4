"""Open the storage a gateway config names: an SQLite file or a PostgreSQL database.

The one place that turns ``storage:`` of gateway.yaml into a
:class:`~gateway.storage.base.Storage`, for ``gateway run`` and the admin
commands alike.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from gateway.config import StorageConfig
from gateway.errors import StorageError
from gateway.storage.base import Storage
from gateway.storage.sqlite import open_sqlite_storage
from gateway.storage.sqlite.engine import READER_THREADS

#: An admin command runs one query at a time: one reader thread, two connections.
ADMIN_CONNECTIONS = 1


@asynccontextmanager
async def open_configured_storage(
    storage: StorageConfig, *, admin: bool = False
) -> AsyncIterator[Storage]:
    """``async with open_configured_storage(config.storage) as store: ...``.

    ``admin``: a small pool, for a command next to the running gateway.
    Raises :class:`StorageError` in one line when the storage cannot be opened.
    """
    if storage.engine == "postgresql" and storage.url is not None:
        # Imported here: psycopg is most of an SQLite admin command's start-up otherwise.
        from gateway.storage.postgres import open_postgres_storage
        from gateway.storage.postgres.engine import POOL_SIZE

        async with open_postgres_storage(storage.url, pool_size=2 if admin else POOL_SIZE) as store:
            yield store
    elif storage.engine == "sqlite" and storage.sqlite_path is not None:
        async with open_sqlite_storage(
            storage.sqlite_path, readers=ADMIN_CONNECTIONS if admin else READER_THREADS
        ) as sqlite_store:
            yield sqlite_store
    else:  # the config parser never builds one; a caller's bug
        raise StorageError(f"storage: nothing to open for engine {storage.engine!r}")
