"""Sign-in for the reference client: the device flow through the gateway, and the saved session.

``gateway client login`` calls :func:`device_login`: it asks the gateway for a
device code (``POST /v1/sessions/device``), shows the user the code and the
URL (``on_code``), and polls ``POST /v1/sessions`` every ``interval`` seconds
(five more after a ``slow_down``, RFC 8628 3.5) until the user approved,
refused, or the code expired. The session it gets is saved in a 0600 JSON
file (:class:`SavedSession`): the session token, the refresh token and when
each ends.

The other commands use that file when no ``--token`` is given:
:func:`session_refresher` gives :class:`~gateway.client.api.ClientSession` a
way to trade the refresh token for a new pair when the gateway answers
``session_expired``, and saves the new pair at once (the old refresh token is
spent). A refusal there (``refresh_refused``: disabled at the IdP, or
``session_expired``: the session ended) means signing in again.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import trio

from gateway.client.api import ClientAPIError, ClientSession
from gateway.errors import ConfigError

SESSION_FILE_MODE: Final = 0o600
SESSION_SUFFIX: Final = ".session.json"
MAX_SESSION_FILE_BYTES: Final = 16 * 1024
DEFAULT_INTERVAL: Final = 5
SLOW_DOWN_STEP: Final = 5  # RFC 8628 3.5
MAX_INTERVAL: Final = 60
MAX_LOGIN_SECONDS: Final = 30 * 60  # a device code outlives no real sign-in longer

OnCode = Callable[[dict[str, Any]], None]
Clock = Callable[[], float]


def default_session_path(keys_file: Path) -> Path:
    """``alice.json`` -> ``alice.session.json``, beside the key file."""
    return keys_file.with_name(keys_file.stem + SESSION_SUFFIX)


@dataclass(frozen=True)
class SavedSession:
    server: str
    address: str
    group: str
    session_token: str
    refresh_token: str
    expires_at: float  # Unix seconds
    refresh_expires_at: float

    @classmethod
    def from_answer(cls, server: str, answer: dict[str, Any], *, now: float) -> SavedSession:
        try:
            return cls(
                server=server,
                address=str(answer["address"]),
                group=str(answer["group"]),
                session_token=str(answer["session_token"]),
                refresh_token=str(answer["refresh_token"]),
                expires_at=now + float(answer["expires_in"]),
                refresh_expires_at=now + float(answer["refresh_expires_in"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"the gateway's session answer is malformed: {exc}") from None

    def save(self, path: Path) -> None:
        """Write 0600, atomically (a reader never sees half a file)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SESSION_FILE_MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(asdict(self), handle)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> SavedSession:
        try:
            with path.open("rb") as handle:
                data = handle.read(MAX_SESSION_FILE_BYTES + 1)
        except OSError as exc:
            raise ConfigError(
                f"{path}: no session ({exc.strerror or exc}): sign in with `gateway client login`"
            ) from None
        try:
            obj = json.loads(data)
            return cls(**obj)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: not a session file: {exc}") from None


async def device_login(
    server: str,
    *,
    ca_file: Path | None,
    provider: str | None,
    on_code: OnCode,
    clock: Clock = time.time,
) -> SavedSession:
    """Sign in with the device flow through the gateway at ``server``."""
    async with ClientSession(server, "", ca_file=ca_file) as session:
        started = await session.start_device_sign_in(provider)
        on_code(started)
        interval = min(int(started.get("interval") or DEFAULT_INTERVAL), MAX_INTERVAL)
        deadline = trio.current_time() + min(
            float(started.get("expires_in") or MAX_LOGIN_SECONDS), MAX_LOGIN_SECONDS
        )
        while True:
            await trio.sleep(interval)
            try:
                answer = await session.open_session(
                    {
                        "grant_type": "device_code",
                        "device_code": started["device_code"],
                        **({"provider": started["provider"]} if "provider" in started else {}),
                    }
                )
            except ClientAPIError as exc:
                if exc.code == "slow_down":
                    interval = min(interval + SLOW_DOWN_STEP, MAX_INTERVAL)
                elif exc.code != "authorization_pending":
                    raise
                if trio.current_time() > deadline:
                    raise
                continue
            return SavedSession.from_answer(server, answer, now=clock())


def session_refresher(
    path: Path, saved: SavedSession, *, ca_file: Path | None, clock: Clock = time.time
) -> Callable[[], Awaitable[str]]:
    """A refresh for :class:`ClientSession`: trades the refresh token, saves, returns the token."""
    current = [saved]

    async def refresh() -> str:
        async with ClientSession(current[0].server, "", ca_file=ca_file) as session:
            answer = await session.open_session(
                {"grant_type": "refresh_token", "refresh_token": current[0].refresh_token}
            )
        renewed = SavedSession.from_answer(current[0].server, answer, now=clock())
        renewed.save(path)
        current[0] = renewed
        return renewed.session_token

    return refresh
