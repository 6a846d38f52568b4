"""The embedded storage engine: one SQLite file in WAL mode, group-committed.

``async with open_sqlite_storage(path) as store:`` gives a
:class:`~gateway.storage.base.Storage`. See :mod:`.engine` for the threads and
commits, :mod:`.schema` for the tables and migrations, :mod:`.store` for the
queries, and docs/storage.md for durability and secure delete.
"""

from gateway.storage.sqlite.engine import SqliteEngine, open_sqlite_engine
from gateway.storage.sqlite.schema import LATEST_VERSION, MIGRATIONS, Migration, migrate
from gateway.storage.sqlite.store import SqliteStorage, open_sqlite_storage

__all__ = [
    "LATEST_VERSION",
    "MIGRATIONS",
    "Migration",
    "SqliteEngine",
    "SqliteStorage",
    "migrate",
    "open_sqlite_engine",
    "open_sqlite_storage",
]
