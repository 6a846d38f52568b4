"""PostgreSQL databases for ``gateway bench --storage postgresql``: made fresh, dropped after.

The bench needs an empty database per org. It connects to the server with
the admin URL (``--postgres URL``, default :data:`DEFAULT_ADMIN_URL` or the
``GATEWAY_BENCH_POSTGRES`` environment variable), creates
``gateway_bench_<random>_<label>`` for each org and drops them when the run
ends, whatever happened.
"""

from __future__ import annotations

import os
import secrets
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import psycopg

from gateway.errors import GatewayError

ADMIN_URL_ENV: Final = "GATEWAY_BENCH_POSTGRES"
DEFAULT_ADMIN_URL: Final = "postgresql://postgres@127.0.0.1:5432/postgres"


class BenchDatabaseError(GatewayError):
    """The bench could not make or drop its databases."""


def default_admin_url() -> str:
    return os.environ.get(ADMIN_URL_ENV, DEFAULT_ADMIN_URL)


def _with_database(url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


def _connect(url: str) -> psycopg.Connection[tuple[object, ...]]:
    import psycopg  # here: only a PostgreSQL bench needs it

    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BenchDatabaseError(
            f"bench: cannot reach PostgreSQL with the admin URL ({first}); give "
            f"--postgres URL or set {ADMIN_URL_ENV}"
        ) from exc


@contextmanager
def fresh_databases(admin_url: str, labels: Sequence[str]) -> Iterator[dict[str, str]]:
    """One new database per label, as ``{label: postgresql:// URL}``; dropped on exit."""
    run = secrets.token_hex(4)
    for label in labels:
        if not label.isidentifier() or not label.isascii():
            raise ValueError(f"database label {label!r} must be an ASCII identifier")
    names = {label: f"gateway_bench_{run}_{label}" for label in labels}
    made: list[str] = []
    try:
        with _connect(admin_url) as admin:
            for name in names.values():
                admin.execute(f"CREATE DATABASE {name}".encode())
                made.append(name)
        yield {label: _with_database(admin_url, name) for label, name in names.items()}
    finally:
        if made:
            with _connect(admin_url) as admin:
                for name in made:
                    admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)".encode())
