"""The federation rules in force, and their hot reload.

Theory of operation
-------------------
A :class:`RulesHolder` owns the :class:`CompiledRules` in force. Whoever
decides reads ``holder.current`` once per decision and keeps that object for
the whole decision, so it sees either the old rules or the new ones, never a
mix.

``await holder.reload()`` reads the rules file and the CA files it names,
validates everything and compiles the indexes, all in a worker thread so that
a large file does not stall the event loop. Only when all of that succeeded
does it replace the reference, in one assignment on the trio thread: the swap
is atomic for every later decision. A file that does not validate (or cannot
be read) changes nothing: the last good rules stay in force, every issue is
logged with its ``file:line:column`` and the failure is counted in
``gateway_rules_reloads_total{result="failure"}``. Every attempt, good or
bad, is logged and kept in a short in-memory history (:class:`ReloadRecord`)
with the SHA-256 of the rules file's content. Reloads are serialized. While
one is parsing, cyclic garbage collection is paused process-wide (see
:func:`gateway.core.yamlmarks.paused_gc`): about a second for a file of
100,000 members, during which memory only grows by what that load allocates.

After a swap, subscribers hear which peers lost their standing: removed from
the rules, or trusted through a different CA or pins. The federation listener
closes those peers' open connections; new connections look at ``current`` and
are refused.

Two things trigger reloads in a running gateway: :func:`watch_rules_file`,
which polls the size, mtime and inode of the rules file and of its CA files
(no extra dependency, no inotify) and reloads once a change has been stable
for one poll interval and the content hash really differs; and
:func:`watch_sighup`, which reloads on SIGHUP whatever the content (and, in
``gateway run``, the gateway's own certificates too: :mod:`gateway.tls_runtime`).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from gateway.core.rules import CompiledRules, IdPMembers, ReadFile, Rules, load_rules
from gateway.errors import RulesError
from gateway.observability.metrics import RULES_LOADED_TIMESTAMP, RULES_RELOADS

logger = logging.getLogger("gateway.rules")

HISTORY_SIZE = 50  # reload records kept in memory
MAX_RECORDED_ISSUES = 20  # issues kept per record and logged per failure
DEFAULT_POLL_INTERVAL = 2.0  # seconds between looks at the rules file

_RELOADS_SUCCESS = RULES_RELOADS.labels(result="success")
_RELOADS_FAILURE = RULES_RELOADS.labels(result="failure")

PeersDropped = Callable[[frozenset[str]], object]
ReloadListener = Callable[["ReloadRecord"], object]


def read_bytes(path: str) -> bytes:
    return Path(path).read_bytes()


@dataclass(frozen=True, slots=True)
class ReloadRecord:
    """One load attempt of the rules, good or bad."""

    at: float  # wall-clock time, Unix seconds
    trigger: str  # initial, file, sighup, manual
    ok: bool
    sha256: str | None  # of the rules file's content; None if it could not be read
    summary: str  # "N groups, N members, N peers", or the first issue
    issues: tuple[str, ...] = ()  # the first MAX_RECORDED_ISSUES issues of a failure
    issue_count: int = 0
    dropped_peers: tuple[str, ...] = ()
    added_peers: tuple[str, ...] = ()  # peers the new rules name that the old did not

    @property
    def result(self) -> str:
        return "success" if self.ok else "failure"


@dataclass(frozen=True, slots=True)
class _Attempt:
    compiled: CompiledRules | None
    sha256: str | None
    fingerprint: str  # rules file and CA files together: what "unchanged" means
    issues: tuple[str, ...]


def _attempt(path: str, read_file: ReadFile, idp_members: IdPMembers | None = None) -> _Attempt:
    """Read, validate and compile; never raises for a bad or unreadable file."""
    try:
        content = read_file(path)
    except OSError as exc:
        issue = f"{path}: cannot read the rules file: {exc.strerror or exc}"
        return _Attempt(None, None, f"unreadable: {issue}", (issue,))
    sha256 = hashlib.sha256(content).hexdigest()
    fingerprint = hashlib.sha256(sha256.encode("ascii"))

    def read_and_remember(ca_path: str) -> bytes:
        data = read_file(ca_path)
        fingerprint.update(b"\0" + ca_path.encode() + b"\0" + hashlib.sha256(data).digest())
        return data

    try:
        compiled = CompiledRules(
            load_rules(content, filename=path, read_file=read_and_remember),
            idp_members=idp_members,
        )
    except RulesError as exc:
        return _Attempt(None, sha256, fingerprint.hexdigest(), tuple(exc.issues))
    except Exception as exc:  # a bug must not take down the gateway nor swap in half-checked rules
        logger.exception("rules loader failed unexpectedly on %s", path)
        issue = f"{path}: internal error while loading the rules: {type(exc).__name__}"
        return _Attempt(None, sha256, fingerprint.hexdigest(), (issue,))
    return _Attempt(compiled, sha256, fingerprint.hexdigest(), ())


def dropped_peers(old: Rules, new: Rules) -> frozenset[str]:
    """Peers of ``old`` that ``new`` removes or trusts through another CA or pins."""
    return frozenset(
        org
        for org, peer in old.peers.items()
        if (now := new.peers.get(org)) is None or now.trust != peer.trust
    )


class RulesHolder:
    """The compiled rules in force, swapped atomically by :meth:`reload`."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        compiled: CompiledRules,
        *,
        read_file: ReadFile = read_bytes,
        wall_clock: Callable[[], float] = time.time,
        history_size: int = HISTORY_SIZE,
        idp_members: IdPMembers | None = None,
    ) -> None:
        """Hold ``compiled`` (loaded from ``path``); :meth:`load` is the usual way in."""
        self._path = os.fspath(path)
        self._read_file = read_file
        self._idp_members = idp_members
        self._wall_clock = wall_clock
        self._current = compiled
        self._sha256 = ""
        self._fingerprint = ""
        self._history: collections.deque[ReloadRecord] = collections.deque(maxlen=history_size)
        self._subscribers: list[PeersDropped] = []
        self._record_listeners: list[ReloadListener] = []
        self._lock = trio.Lock()

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        read_file: ReadFile = read_bytes,
        wall_clock: Callable[[], float] = time.time,
        history_size: int = HISTORY_SIZE,
        idp_members: IdPMembers | None = None,
    ) -> RulesHolder:
        """Load the rules at start-up; ``RulesError`` with every issue if they are bad.

        Synchronous: the gateway cannot serve before it has rules.
        """
        path = os.fspath(path)
        attempt = _attempt(path, read_file, idp_members)
        if attempt.compiled is None:
            _RELOADS_FAILURE.inc()
            raise RulesError(list(attempt.issues))
        holder = cls(
            path,
            attempt.compiled,
            read_file=read_file,
            wall_clock=wall_clock,
            history_size=history_size,
            idp_members=idp_members,
        )
        holder._apply(attempt, "initial")
        return holder

    # -- reading ------------------------------------------------------------------------
    @property
    def current(self) -> CompiledRules:
        return self._current

    @property
    def path(self) -> str:
        return self._path

    @property
    def sha256(self) -> str:
        """SHA-256 of the rules file content in force."""
        return self._sha256

    @property
    def history(self) -> tuple[ReloadRecord, ...]:
        """The recent attempts, oldest first."""
        return tuple(self._history)

    @property
    def watched_files(self) -> tuple[str, ...]:
        """The rules file and the CA files of the rules in force."""
        return (self._path, *self._current.rules.ca_files)

    def subscribe(self, callback: PeersDropped) -> Callable[[], None]:
        """Call ``callback(dropped_peers)`` after every reload that swaps rules in (the set
        may be empty); returns an unsubscribe function."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def subscribe_records(self, callback: ReloadListener) -> Callable[[], None]:
        """Call ``callback(record)`` after every later load attempt, good or bad (the
        audit log); synchronous, on the trio thread. Returns an unsubscribe function."""
        self._record_listeners.append(callback)

        def unsubscribe() -> None:
            if callback in self._record_listeners:
                self._record_listeners.remove(callback)

        return unsubscribe

    def _tell_listeners(self, record: ReloadRecord) -> None:
        for callback in list(self._record_listeners):
            try:
                callback(record)
            except Exception:
                logger.exception("a rules reload listener failed")

    # -- reloading ----------------------------------------------------------------------
    async def reload(
        self, *, trigger: str = "manual", only_if_changed: bool = False
    ) -> ReloadRecord | None:
        """Load, validate and swap in the rules file; keep the old rules if it is bad.

        With ``only_if_changed``, content equal to the last attempt's (rules
        file and CA files) is no reload and returns ``None``.
        """
        async with self._lock:
            attempt = await trio.to_thread.run_sync(
                _attempt, self._path, self._read_file, self._idp_members
            )
            if only_if_changed and attempt.fingerprint == self._fingerprint:
                return None
            return self._apply(attempt, trigger)

    def _apply(self, attempt: _Attempt, trigger: str) -> ReloadRecord:
        now = self._wall_clock()
        self._fingerprint = attempt.fingerprint
        if attempt.compiled is None:
            _RELOADS_FAILURE.inc()
            record = ReloadRecord(
                at=now,
                trigger=trigger,
                ok=False,
                sha256=attempt.sha256,
                summary=attempt.issues[0] if attempt.issues else "invalid rules",
                issues=attempt.issues[:MAX_RECORDED_ISSUES],
                issue_count=len(attempt.issues),
            )
            self._history.append(record)
            self._tell_listeners(record)
            logger.error(
                "rules %s (%s) failed with %d issue(s), sha256 %s; the rules in force "
                "(sha256 %s) stay",
                self._path,
                trigger,
                len(attempt.issues),
                attempt.sha256 or "-",
                self._sha256 or "-",
                extra={
                    "event": "rules_reload",
                    "result": "failure",
                    "trigger": trigger,
                    "sha256": attempt.sha256,
                    "issue_count": len(attempt.issues),
                },
            )
            for issue in attempt.issues[:MAX_RECORDED_ISSUES]:
                logger.error("%s", issue)
            if len(attempt.issues) > MAX_RECORDED_ISSUES:
                logger.error("... and %d more", len(attempt.issues) - MAX_RECORDED_ISSUES)
            return record

        old = self._current
        dropped = (
            dropped_peers(old.rules, attempt.compiled.rules)
            if trigger != "initial"
            else frozenset()
        )
        added = (
            frozenset(attempt.compiled.rules.peers) - frozenset(old.rules.peers)
            if trigger != "initial"
            else frozenset()
        )
        self._current = attempt.compiled  # the swap: one reference, read once per decision
        self._sha256 = attempt.sha256 or ""
        _RELOADS_SUCCESS.inc()
        RULES_LOADED_TIMESTAMP.set(now)
        summary = attempt.compiled.rules.summary()
        record = ReloadRecord(
            at=now,
            trigger=trigger,
            ok=True,
            sha256=attempt.sha256,
            summary=summary,
            dropped_peers=tuple(sorted(dropped)),
            added_peers=tuple(sorted(added)),
        )
        self._history.append(record)
        self._tell_listeners(record)
        logger.info(
            "rules %s (%s) loaded: %s, sha256 %s%s",
            self._path,
            trigger,
            summary,
            attempt.sha256,
            f"; peers dropped: {', '.join(sorted(dropped))}" if dropped else "",
            extra={
                "event": "rules_reload",
                "result": "success",
                "trigger": trigger,
                "sha256": attempt.sha256,
                "peers_added": sorted(added),
                "peers_dropped": sorted(dropped),
            },
        )
        if trigger != "initial":
            # Every swap, not only those that drop peers: a peer that was added needs
            # its CA in the federation listener's context before it can connect.
            for callback in list(self._subscribers):
                try:
                    callback(dropped)
                except Exception:
                    logger.exception("a rules subscriber failed after a reload")
        return record


def _stat_all(paths: Sequence[str]) -> tuple[tuple[int, int, int] | None, ...]:
    signature: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            signature.append(None)
        else:
            signature.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(signature)


async def _signature(holder: RulesHolder) -> tuple[object, ...]:
    files = holder.watched_files
    return (files, await trio.to_thread.run_sync(_stat_all, files))


async def watch_rules_file(
    holder: RulesHolder,
    *,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Reload ``holder`` when its rules file or CA files change; runs until cancelled.

    A change is acted on once it has been stable for one ``poll_interval`` (an
    editor that writes in several steps is not caught half-way), and only if
    the content differs from the last attempt.
    """
    if poll_interval <= 0:
        raise ValueError("poll_interval must be positive")
    seen = await _signature(holder)
    task_status.started()
    pending: tuple[object, ...] | None = None
    while True:
        await trio.sleep(poll_interval)
        now = await _signature(holder)
        if now == seen:
            pending = None
            continue
        if now != pending:
            pending = now  # changed since the last look: let it settle
            continue
        pending = None
        seen = now  # taken before reading: a write during the reload is seen next time
        await holder.reload(trigger="file", only_if_changed=True)


async def watch_sighup(
    holder: RulesHolder,
    *,
    also: Sequence[Callable[[str], Awaitable[object]]] = (),
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Reload ``holder`` on every SIGHUP, then call each of ``also`` with the trigger
    (the certificates' reload); runs until cancelled (main thread only)."""
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        task_status.started()
        async for _ in signals:
            await holder.reload(trigger="sighup")
            for reload_more in also:
                await reload_more("sighup")
