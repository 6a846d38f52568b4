"""The benchmark's defaults, apart from its machinery so that ``gateway --help`` and
every other command start without importing it (the clients, httpx, psycopg)."""

from __future__ import annotations

from typing import Final

DEFAULT_ENVELOPES: Final = 20_000
DEFAULT_SIZE: Final = 1024
DEFAULT_WINDOW: Final = 256
DEFAULT_DURATION: Final = 300.0
DEFAULT_SAMPLE: Final = 100
STORAGES: Final = ("sqlite", "postgresql")
