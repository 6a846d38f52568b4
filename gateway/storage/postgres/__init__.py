"""The PostgreSQL storage engine: one database shared by the gateway's nodes.

``async with open_postgres_storage(url) as store:`` gives a
:class:`~gateway.storage.base.Storage`. See :mod:`.engine` for the pool,
threads and errors, :mod:`.schema` for the tables and migrations,
:mod:`.store` for the queries, and docs/storage.md for durability and what
deleted envelopes leave behind.
"""

from gateway.storage.postgres.engine import PostgresEngine, describe, open_postgres_engine
from gateway.storage.postgres.schema import LATEST_VERSION, MIGRATIONS, migrate
from gateway.storage.postgres.store import PostgresStorage, open_postgres_storage

__all__ = [
    "LATEST_VERSION",
    "MIGRATIONS",
    "PostgresEngine",
    "PostgresStorage",
    "describe",
    "migrate",
    "open_postgres_engine",
    "open_postgres_storage",
]
