"""The gateway's own certificates in use, and their hot reload.

Theory of operation
-------------------
A :class:`CertificateHolder` owns the :class:`~gateway.pki.own.OwnCertificate`
in use for one listener's certificate: ``federation`` (the mTLS certificate,
served to peers and presented when dialing them) or ``client_api``. Whoever
builds a TLS context reads ``holder.current`` and builds from its bytes, so a
context holds one checked pair, never a file read later.

``await holder.reload()`` reads the certificate file, the key file and (for
the federation certificate) the org CA file ``tls.ca`` in a worker thread,
checks the pair (:func:`~gateway.pki.own.check_own_certificate`: it parses,
the key is the certificate's, it is valid now, it names this org and chains
to the org CA through the intermediates in the file) and lets OpenSSL load it
once. Only when all of that passed does it swap the reference, on the trio
thread, and tell subscribers, which install new TLS contexts: connections
accepted or dialed from then on use the new pair; open connections keep the
one they were made with. A pair that fails changes nothing: the old pair stays
in use, the failure is logged with what is wrong and counted in
``gateway_certificate_reloads_total{certificate, result="failure"}``. That
includes the half-written state of a renewal (a new key beside the old
certificate): the next look, after the second file lands, succeeds. The
expiry gauge (``gateway_certificate_not_after_timestamp_seconds``) follows
the pair in use, not the file on disk.

Triggers are those of the rules (:mod:`gateway.rules_runtime`):
:func:`watch_certificate_files` polls size, mtime and inode of the files and
reloads once a change has been stable for one poll interval and the content
really differs; ``gateway run`` also reloads every holder on SIGHUP.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import trio
from cryptography import x509

from gateway.errors import PKIError
from gateway.observability.metrics import CERTIFICATE_NOT_AFTER, CERTIFICATE_RELOADS
from gateway.pki.certs import load_ca_bundle_pem
from gateway.pki.dev import MAX_CERT_FILE_BYTES, read_private_key_file
from gateway.pki.own import OwnCertificate, check_own_certificate
from gateway.pki.tls import check_loadable

LOGGER = logging.getLogger("gateway.tls")

HISTORY_SIZE: Final = 20
DEFAULT_POLL_INTERVAL: Final = 2.0

Subscriber = Callable[[OwnCertificate], object]


@dataclass(frozen=True, slots=True)
class CertificateReloadRecord:
    """One load attempt of a certificate pair, good or bad."""

    at: float  # wall-clock Unix seconds
    certificate: str  # federation, client_api
    trigger: str  # initial, file, sighup, manual
    ok: bool
    summary: str  # the certificate loaded, or what is wrong

    @property
    def result(self) -> str:
        return "success" if self.ok else "failure"


@dataclass(frozen=True, slots=True)
class _Attempt:
    own: OwnCertificate | None
    fingerprint: str
    problem: str


def _read(path: Path, *, limit: int, what: str) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise PKIError(f"{path}: cannot read the {what} file: {exc.strerror or exc}") from exc
    if len(data) > limit:
        raise PKIError(f"{path}: larger than {limit} bytes; not a {what} file")
    return data


class CertificateHolder:
    """The checked certificate pair in use for one listener; swapped by :meth:`reload`."""

    def __init__(
        self,
        name: str,
        cert_file: Path,
        key_file: Path,
        *,
        org: str | None = None,
        ca_file: Path | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """Check and hold the pair now (``PKIError`` if it is bad): a gateway cannot serve
        without one. ``org`` and ``ca_file`` add the federation certificate's checks."""
        self.name = name
        self.cert_file = cert_file
        self.key_file = key_file
        self._org = org
        self._ca_file = ca_file
        self._wall_clock = wall_clock
        self._success = CERTIFICATE_RELOADS.labels(certificate=name, result="success")
        self._failure = CERTIFICATE_RELOADS.labels(certificate=name, result="failure")
        self._subscribers: list[Subscriber] = []
        self._history: collections.deque[CertificateReloadRecord] = collections.deque(
            maxlen=HISTORY_SIZE
        )
        self._lock = trio.Lock()
        attempt = self._attempt()
        if attempt.own is None:
            self._failure.inc()
            raise PKIError(attempt.problem)
        self._current: OwnCertificate = attempt.own
        self._fingerprint = attempt.fingerprint
        self._apply(attempt, "initial")

    # -- reading ------------------------------------------------------------------------
    @property
    def current(self) -> OwnCertificate:
        return self._current

    @property
    def watched_files(self) -> tuple[Path, ...]:
        extra = (self._ca_file,) if self._ca_file is not None else ()
        return (self.cert_file, self.key_file, *extra)

    @property
    def history(self) -> tuple[CertificateReloadRecord, ...]:
        return tuple(self._history)

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(new_pair)`` after every later swap; returns unsubscribe."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    # -- reloading ----------------------------------------------------------------------
    def _attempt(self) -> _Attempt:
        """Read and check everything; never raises for a bad or unreadable file."""
        fingerprint = hashlib.sha256()
        try:
            cert_pem = _read(self.cert_file, limit=MAX_CERT_FILE_BYTES, what="certificate")
            # Like every private key we read: refused when group or others may read it.
            key_pem = read_private_key_file(self.key_file)
            for data in (cert_pem, key_pem):
                fingerprint.update(hashlib.sha256(data).digest())
            cas: tuple[x509.Certificate, ...] = ()
            if self._ca_file is not None:
                ca_pem = _read(self._ca_file, limit=MAX_CERT_FILE_BYTES, what="org CA")
                fingerprint.update(hashlib.sha256(ca_pem).digest())
                cas = load_ca_bundle_pem(ca_pem, source=str(self._ca_file))
            own = check_own_certificate(
                cert_pem,
                key_pem,
                cert_source=str(self.cert_file),
                key_source=str(self.key_file),
                now=datetime.fromtimestamp(self._wall_clock(), tz=UTC),
                org=self._org,
                cas=cas,
            )
            check_loadable(own)
        except PKIError as exc:
            return _Attempt(None, fingerprint.hexdigest(), exc.message)
        except Exception as exc:  # a bug must not take down the gateway nor swap in a bad pair
            LOGGER.exception("%s certificate: unexpected error while checking it", self.name)
            return _Attempt(None, fingerprint.hexdigest(), f"internal error: {type(exc).__name__}")
        return _Attempt(own, fingerprint.hexdigest(), "")

    async def reload(
        self, *, trigger: str = "manual", only_if_changed: bool = False
    ) -> CertificateReloadRecord | None:
        """Check and swap in the pair on disk; keep the one in use if it is bad.

        With ``only_if_changed``, files equal to the last attempt's are no reload
        (``None``).
        """
        async with self._lock:
            attempt = await trio.to_thread.run_sync(self._attempt)
            if only_if_changed and attempt.fingerprint == self._fingerprint:
                return None
            self._fingerprint = attempt.fingerprint
            return self._apply(attempt, trigger)

    def _apply(self, attempt: _Attempt, trigger: str) -> CertificateReloadRecord:
        now = self._wall_clock()
        if attempt.own is None:
            self._failure.inc()
            record = CertificateReloadRecord(now, self.name, trigger, False, attempt.problem)
            self._history.append(record)
            LOGGER.error(
                "%s certificate (%s): the new pair is not used: %s; the pair in use (%s) stays",
                self.name,
                trigger,
                attempt.problem,
                self._current.describe(),
                extra={
                    "event": "certificate_reload",
                    "certificate": self.name,
                    "result": "failure",
                    "trigger": trigger,
                },
            )
            return record
        changed = trigger == "initial" or attempt.own.sha256 != self._current.sha256
        self._current = attempt.own
        self._success.inc()
        CERTIFICATE_NOT_AFTER.labels(self.name).set(attempt.own.not_after)
        record = CertificateReloadRecord(now, self.name, trigger, True, attempt.own.describe())
        self._history.append(record)
        LOGGER.info(
            "%s certificate (%s) %s: %s",
            self.name,
            trigger,
            "in use" if changed else "unchanged",
            attempt.own.describe(),
            extra={
                "event": "certificate_reload",
                "certificate": self.name,
                "result": "success",
                "trigger": trigger,
            },
        )
        if trigger != "initial" and changed:
            for callback in list(self._subscribers):
                try:
                    callback(attempt.own)
                except Exception:
                    LOGGER.exception(
                        "%s certificate: a subscriber failed after a reload", self.name
                    )
        return record


def _stat_all(paths: Sequence[Path]) -> tuple[tuple[int, int, int] | None, ...]:
    signature: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            signature.append(None)
        else:
            signature.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(signature)


async def watch_certificate_files(
    holders: Sequence[CertificateHolder],
    *,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Reload each holder when its files change; runs until cancelled.

    As for the rules: a change is acted on once stable for one ``poll_interval``
    (a renewal that writes the key, then the certificate, is not caught
    half-way unless it takes longer than that), and only if the content differs.
    """
    if poll_interval <= 0:
        raise ValueError("poll_interval must be positive")

    async def signatures() -> list[object]:
        return [
            await trio.to_thread.run_sync(_stat_all, holder.watched_files) for holder in holders
        ]

    seen = await signatures()
    pending: list[object | None] = [None] * len(holders)
    task_status.started()
    while True:
        await trio.sleep(poll_interval)
        now = await signatures()
        for index, holder in enumerate(holders):
            if now[index] == seen[index]:
                pending[index] = None
                continue
            if now[index] != pending[index]:
                pending[index] = now[index]  # changed since the last look: let it settle
                continue
            pending[index] = None
            seen[index] = now[index]
            await holder.reload(trigger="file", only_if_changed=True)


async def reload_all(holders: Sequence[CertificateHolder], *, trigger: str) -> None:
    """Reload every holder (SIGHUP), one after the other."""
    for holder in holders:
        await holder.reload(trigger=trigger)
