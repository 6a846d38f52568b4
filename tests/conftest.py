"""Shared fixtures for all three depths of tests."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from gateway.devnet import DEFAULT_PORT_RANGE, PORT_RANGE_ENV
from gateway.storage.postgres import open_postgres_storage
from gateway.storage.sqlite import open_sqlite_storage
from tests.postgres_for_tests import empty_tables, fresh_database

MAX_WORKERS = 4  # the Makefile's --maxprocesses


def _worker_port_range() -> None:
    """Each pytest-xdist worker picks the ports of its gateways in its own part of
    gateway.devnet's range (the processes and commands it starts inherit it), so two
    workers never choose the same port for two gateways."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw") or not worker[2:].isdigit():
        return
    index = int(worker[2:]) % MAX_WORKERS
    low, high = DEFAULT_PORT_RANGE
    size = (high - low + 1) // MAX_WORKERS
    os.environ[PORT_RANGE_ENV] = f"{low + index * size}-{low + (index + 1) * size - 1}"


_worker_port_range()


@pytest.fixture(scope="session")
def postgres_session_url() -> Iterator[str]:
    """One database for the whole session (see tests/postgres_for_tests.py)."""
    with fresh_database() as url:
        yield url


@pytest.fixture
def postgres_url(postgres_session_url: str) -> str:
    """The session's database, emptied of rows for this test."""
    empty_tables(postgres_session_url)
    return postgres_session_url


# -- the storage engines, for the contract tests that run on both ---------------------
ENGINES = ("sqlite", "postgresql")


@pytest.fixture(params=ENGINES)
def storage_engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def open_store(
    storage_engine: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Callable[[], AbstractAsyncContextManager[Any]]:
    """Opens the engine's store on one database (the same one each call: reopen tests)."""
    if storage_engine == "sqlite":
        path = tmp_path / "gateway.db"
        return lambda: open_sqlite_storage(path)
    url = request.getfixturevalue("postgres_url")
    return lambda: open_postgres_storage(url)


@pytest.fixture
async def engine_store(
    open_store: Callable[[], AbstractAsyncContextManager[Any]],
) -> AsyncIterator[Any]:
    """A store of each engine in turn (SqliteStorage, PostgresStorage)."""
    async with open_store() as opened:
        yield opened
