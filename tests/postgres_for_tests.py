"""A real PostgreSQL database for the tests, created per test session and dropped after.

Every machine of this project (and CI) runs PostgreSQL 15 on 127.0.0.1:5432
with trust auth for the user ``postgres``. The tests never skip for want of
it: a server that is not there fails the run with a message saying so
(``GATEWAY_TEST_POSTGRES`` points the tests at another server, as a
``postgresql://`` URL of its maintenance database).

One database per session (``gw_test_<random>``: runs on one server never see
each other's data), emptied between tests with ``TRUNCATE`` (much faster
than a database per test); tests that need a database of their own (schema
versions) get one from :func:`fresh_database`.
"""

from __future__ import annotations

import os
import secrets
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest

ADMIN_URL_ENV = "GATEWAY_TEST_POSTGRES"
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def admin_url() -> str:
    return os.environ.get(ADMIN_URL_ENV, DEFAULT_ADMIN_URL)


def _connect_admin() -> psycopg.Connection[tuple[object, ...]]:
    url = admin_url()
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        where = "in CI" if os.environ.get("CI") == "true" else "on this machine"
        pytest.fail(
            f"PostgreSQL is not reachable at {url} {where} ({str(exc).strip().splitlines()[0]}); "
            "the storage tests need it (start it with `pg_ctlcluster "
            "--skip-systemctl-redirect $(ls /etc/postgresql) main start`, or set "
            f"{ADMIN_URL_ENV})",
            pytrace=False,
        )


def database_url(name: str) -> str:
    """The admin URL with its database replaced by ``name`` (a postgresql:// URL,
    as gateway.yaml takes it)."""
    parts = urllib.parse.urlsplit(admin_url())
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


@contextmanager
def fresh_database() -> Iterator[str]:
    """A new, empty database for the block; its URL. Dropped afterwards."""
    name = "gw_test_" + secrets.token_hex(6)
    with _connect_admin() as admin:
        admin.execute(f"CREATE DATABASE {name}".encode())
    try:
        yield database_url(name)
    finally:
        with _connect_admin() as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)".encode())


def empty_tables(url: str) -> None:
    """Remove every row of the gateway's tables (keeping the schema and its version)."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
            "AND tablename <> 'schema_version'"
        ).fetchall()
        if rows:
            tables = ", ".join(str(row[0]) for row in rows)
            conn.execute(f"TRUNCATE {tables} RESTART IDENTITY".encode())


def database_name(url: str) -> str:
    return urllib.parse.urlsplit(url).path.lstrip("/")


def cut_off(url: str) -> None:
    """The database goes away: new connections refused, open ones terminated."""
    name = database_name(url)
    with _connect_admin() as admin:
        admin.execute(f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS false".encode())
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )


def bring_back(url: str) -> None:
    """The database returns."""
    with _connect_admin() as admin:
        admin.execute(f"ALTER DATABASE {database_name(url)} WITH ALLOW_CONNECTIONS true".encode())
