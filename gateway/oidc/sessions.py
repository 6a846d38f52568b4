"""Gateway sessions: a verified sign-in exchanged for a short-lived session token and a refresh.

Theory of operation
-------------------
A client signs in through the gateway: it asks for a device code
(:meth:`SessionService.start_device`), shows the user code and URL, and polls
(:meth:`SessionService.complete_device`); the gateway polls the IdP's token
endpoint with that device code, verifies the ID token it gets
(:mod:`.idtoken`), maps the user claim to a local address, checks that the
rules admit the user (:func:`admit`: a group, and the group's authentication
strength), and stores a session. A client that ran the authorization code
flow with PKCE itself hands over the ID token (and the IdP's refresh token)
instead (:meth:`SessionService.sign_in_with_id_token`).

The session answers with two random tokens, kept only as SHA-256 hashes:

* ``gws_...``: the session token, the bearer for every client API call,
  valid for ``oidc.session_ttl`` (minutes);
* ``gwr_...``: the refresh token, good once, until ``oidc.refresh_ttl``.

A refresh asks the IdP again with the IdP's refresh token the session holds:
a user disabled at the IdP (or whose grant was revoked) is refused there
(``refresh_refused``), the session is deleted, and the user has lost access
within one session lifetime. A refresh that the IdP answers with a new ID
token re-reads the groups claim and the acr/amr from it, and re-runs
:func:`admit`; a session without an IdP refresh token cannot be refreshed.

A device code is good for one exchange: the gateway remembers, for as long
as a device code lives, the hashes of those it has exchanged (bounded, per
node) and refuses them again without asking the IdP (``device_code_invalid``);
the IdP refuses them too. Every sign-in and refresh is counted by provider and
result (``gateway_oidc_signins_total``, ``gateway_oidc_session_refreshes_total``).
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final, Protocol

from gateway.config import OIDCConfig
from gateway.core.address import Address
from gateway.core.encoding import b64url_encode
from gateway.core.rules import CompiledRules, Group
from gateway.errors import AddressError, Reason, SignInError
from gateway.observability.metrics import OIDC_SESSION_REFRESHES, OIDC_SIGNINS, bounded
from gateway.oidc.idp import IdP, TokenAnswer
from gateway.oidc.idtoken import VerifiedIdToken, map_user
from gateway.oidc.members import IdPMemberships
from gateway.storage.base import SessionRecord, Storage

log = logging.getLogger("gateway.oidc")

SESSION_PREFIX: Final = "gws_"
REFRESH_PREFIX: Final = "gwr_"
TOKEN_RANDOM_BYTES: Final = 32
SESSION_TOKEN_LENGTH: Final = len(SESSION_PREFIX) + 43
MAX_SPENT_DEVICE_CODES: Final = 10_000  # remembered per node; the IdP refuses replays too
SPENT_DEVICE_CODE_MS: Final = 30 * 60 * 1000  # longer than any IdP keeps a device code
MAX_DEVICE_CODE_LENGTH: Final = 2048
OK: Final = "ok"


class RulesSource(Protocol):
    @property
    def current(self) -> CompiledRules: ...


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode("ascii")).digest()


def _new_token(prefix: str) -> str:
    return prefix + b64url_encode(secrets.token_bytes(TOKEN_RANDOM_BYTES))


_SESSION_TOKEN_RE: Final = re.compile(r"gws_[A-Za-z0-9_-]{43}")
_REFRESH_TOKEN_RE: Final = re.compile(r"gwr_[A-Za-z0-9_-]{43}")


def is_session_token(token: str) -> bool:
    return _SESSION_TOKEN_RE.fullmatch(token) is not None


@dataclass(frozen=True)
class SignedIn:
    """What a client gets for a sign-in or a refresh (docs/client-api.md, "Sign-in")."""

    session_token: str
    expires_in: int
    refresh_token: str
    refresh_expires_in: int
    address: str
    group: str

    def to_json(self) -> dict[str, Any]:
        return {
            "session_token": self.session_token,
            "token_type": "Bearer",
            "expires_in": self.expires_in,
            "refresh_token": self.refresh_token,
            "refresh_expires_in": self.refresh_expires_in,
            "address": self.address,
            "group": self.group,
        }


def admit(
    rules: CompiledRules,
    user: str,
    *,
    claims: Mapping[str, frozenset[str]],
    acr: str | None,
    amr: tuple[str, ...],
) -> Group:
    """The rules' group for ``user`` signed in with these claims; ``SignInError`` saying why not.

    The group is the one whose ``members`` name the user or whose
    ``members_from`` matches a claim; none is ``no_group``, two are
    ``group_conflict`` (naming both, and why), and a group whose ``requires``
    this sign-in's ``acr``/``amr`` does not meet is ``mfa_required``.
    """
    groups = rules.groups_for(user, claims)
    if not groups:
        shown = "; ".join(f"{name}: {sorted(values)}" for name, values in claims.items() if values)
        raise SignInError(
            f"{user} is in no group of the rules"
            + (f" (IdP claims {shown} match none)" if shown else ""),
            reason=Reason.NO_GROUP,
        )
    if len(groups) > 1:
        why = ", ".join(
            f"{g.name} ({'named in members' if user in g.members else _claim_reason(g, claims)})"
            for g in groups
        )
        raise SignInError(
            f"{user} would be in two groups, {why}; a user is in one group at most: "
            "ask an admin to fix the rules or the IdP's groups",
            reason=Reason.GROUP_CONFLICT,
        )
    group = groups[0]
    if group.requires is not None and not group.requires.met_by(acr, amr):
        raise SignInError(
            f"group {group.name} requires a stronger sign-in ({group.requires}); this one "
            f"has acr {acr or 'none'} and amr {', '.join(amr) or 'none'}: sign in again "
            "with multi-factor authentication",
            reason=Reason.MFA_REQUIRED,
        )
    return group


def _claim_reason(group: Group, claims: Mapping[str, frozenset[str]]) -> str:
    matched = [str(m) for m in group.members_from if m.value in claims.get(m.claim, ())]
    return "IdP claim " + ", ".join(matched)


class SessionService:
    """Sign-in, refresh, sign-out and authentication of session tokens."""

    def __init__(
        self,
        *,
        org: str,
        config: OIDCConfig,
        idps: Mapping[str, IdP],
        storage: Storage,
        rules: RulesSource,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        memberships: IdPMemberships | None = None,
    ) -> None:
        self._org = org
        self._members = memberships if memberships is not None else IdPMemberships()
        self._config = config
        self._idps = dict(idps)
        self._storage = storage
        self._rules = rules
        self._clock_ms = clock_ms
        self._spent: OrderedDict[bytes, int] = OrderedDict()  # device code hash -> until ms

    @property
    def providers(self) -> tuple[str, ...]:
        return tuple(self._idps)

    def provider_info(self) -> list[dict[str, Any]]:
        """Name, issuer, client id and scopes of each provider: public facts."""
        return [
            {
                "name": idp.provider.name,
                "issuer": idp.provider.issuer,
                "client_id": idp.provider.client_id,
                "scopes": list(idp.provider.scopes),
            }
            for idp in self._idps.values()
        ]

    async def load_memberships(self) -> int:
        """Fill the IdP memberships from the stored sessions (at start-up); how many users."""
        rows = await self._storage.session_groups()
        return self._members.load(
            (user, {idp.provider.groups_claim: frozenset(groups)})
            for user, provider, groups in rows
            if (idp := self._idps.get(provider)) is not None
        )

    def idp(self, name: str | None) -> IdP:
        """The provider called ``name``; with only one configured, ``None`` picks it."""
        if name is None and len(self._idps) == 1:
            return next(iter(self._idps.values()))
        idp = self._idps.get(name) if isinstance(name, str) else None
        if idp is None:
            raise SignInError(
                f"no sign-in provider {name!r}; this gateway has: {', '.join(self._idps)}",
                reason=Reason.TOKEN_ISSUER,
            )
        return idp

    def _count_signin(self, provider: str, result: str) -> None:
        OIDC_SIGNINS.labels(bounded(provider, self._idps), result).inc()

    # -- sign-in -------------------------------------------------------------------
    async def start_device(self, provider: str | None) -> dict[str, Any]:
        idp = self.idp(provider)
        started = await idp.start_device_flow()
        answer: dict[str, Any] = {"provider": idp.provider.name}
        for name in ("device_code", "user_code", "verification_uri", "verification_uri_complete"):
            if isinstance(started.get(name), str):
                answer[name] = started[name]
        for name in ("expires_in", "interval"):
            value = started.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                answer[name] = value
        answer.setdefault("interval", 5)  # RFC 8628 3.2
        return answer

    def _spend_device_code(self, device_code: str, now_ms: int) -> None:
        while self._spent and next(iter(self._spent.values())) < now_ms:
            self._spent.popitem(last=False)
        while len(self._spent) >= MAX_SPENT_DEVICE_CODES:
            self._spent.popitem(last=False)
        self._spent[_hash(device_code)] = now_ms + SPENT_DEVICE_CODE_MS

    def _check_device_code(self, device_code: str) -> None:
        if (
            not isinstance(device_code, str)
            or not device_code.isascii()
            or not 0 < len(device_code) <= MAX_DEVICE_CODE_LENGTH
        ):
            raise SignInError("not a device code", reason=Reason.DEVICE_CODE_INVALID)
        spent_until = self._spent.get(_hash(device_code))
        if spent_until is not None and spent_until >= self._clock_ms():
            raise SignInError(
                "this device code was already exchanged", reason=Reason.DEVICE_CODE_INVALID
            )

    async def complete_device(self, provider: str | None, device_code: str) -> SignedIn:
        idp = self.idp(provider)
        name = idp.provider.name
        try:
            self._check_device_code(device_code)
            answer = await idp.poll_device(device_code)
            self._spend_device_code(device_code, self._clock_ms())
            return await self._open_session(idp, answer, nonce=None)
        except SignInError as exc:
            if exc.reason not in (Reason.AUTHORIZATION_PENDING, Reason.SLOW_DOWN):
                self._count_signin(name, exc.reason.value)
            raise

    async def sign_in_with_id_token(
        self,
        provider: str | None,
        id_token: str,
        *,
        idp_refresh_token: str | None = None,
        nonce: str | None = None,
    ) -> SignedIn:
        """For a client that ran the code flow with PKCE itself and brings its tokens."""
        idp = self.idp(provider)
        try:
            answer = TokenAnswer(id_token=id_token, refresh_token=idp_refresh_token)
            return await self._open_session(idp, answer, nonce=nonce)
        except SignInError as exc:
            self._count_signin(idp.provider.name, exc.reason.value)
            raise

    async def _open_session(self, idp: IdP, answer: TokenAnswer, *, nonce: str | None) -> SignedIn:
        if answer.id_token is None:
            raise SignInError("the IdP gave no ID token", reason=Reason.TOKEN_MALFORMED)
        token = await idp.verify(answer.id_token, nonce=nonce)
        address = map_user(token, idp.provider, self._org)
        groups = token.groups(idp.provider.groups_claim)
        group = admit(
            self._rules.current,
            address.user,
            claims={idp.provider.groups_claim: groups},
            acr=token.acr,
            amr=token.amr,
        )
        now_ms = self._clock_ms()
        session_token, refresh_token = _new_token(SESSION_PREFIX), _new_token(REFRESH_PREFIX)
        record = SessionRecord(
            session_id=b64url_encode(secrets.token_bytes(16)),
            user=str(address),
            provider=idp.provider.name,
            access_hash=_hash(session_token),
            access_expires_ms=now_ms + int(self._config.session_ttl * 1000),
            refresh_hash=_hash(refresh_token),
            refresh_expires_ms=now_ms + int(self._config.refresh_ttl * 1000),
            created_ms=now_ms,
            idp_refresh_token=answer.refresh_token,
            idp_groups=tuple(sorted(groups))[:256],
            acr=token.acr,
            amr=token.amr[:256],
        )
        await self._storage.session_put(record)
        self._members.set(record.user, {idp.provider.groups_claim: groups})
        self._count_signin(idp.provider.name, OK)
        log.info("signed in %s through %s (group %s)", address, idp.provider.name, group.name)
        return self._signed_in(record, session_token, refresh_token, group, now_ms)

    def _signed_in(
        self, record: SessionRecord, session_token: str, refresh_token: str, group: Group, now: int
    ) -> SignedIn:
        return SignedIn(
            session_token=session_token,
            expires_in=max(0, (record.access_expires_ms - now) // 1000),
            refresh_token=refresh_token,
            refresh_expires_in=max(0, (record.refresh_expires_ms - now) // 1000),
            address=record.user,
            group=group.name,
        )

    # -- refresh -----------------------------------------------------------------
    async def refresh(self, refresh_token: str) -> SignedIn:
        if not isinstance(refresh_token, str) or not _REFRESH_TOKEN_RE.fullmatch(refresh_token):
            raise SignInError("not a refresh token", reason=Reason.SESSION_EXPIRED)
        try:
            record = await self._storage.session_by_refresh(_hash(refresh_token))
        except ValueError:
            record = None
        if record is None:
            OIDC_SESSION_REFRESHES.labels("other", Reason.SESSION_EXPIRED.value).inc()
            raise SignInError("no session has this refresh token", reason=Reason.SESSION_EXPIRED)
        provider = bounded(record.provider, self._idps)
        try:
            signed_in = await self._refresh(record)
        except SignInError as exc:
            OIDC_SESSION_REFRESHES.labels(provider, exc.reason.value).inc()
            if exc.reason is not Reason.IDP_UNAVAILABLE:
                await self._storage.session_delete(record.session_id)
                if exc.reason is Reason.REFRESH_REFUSED:
                    self._members.drop(record.user)  # disabled at the IdP: in no group now
                log.info("session of %s ended at refresh: %s", record.user, exc.reason.value)
            raise
        OIDC_SESSION_REFRESHES.labels(provider, OK).inc()
        return signed_in

    async def _refresh(self, record: SessionRecord) -> SignedIn:
        now_ms = self._clock_ms()
        if record.refresh_expires_ms <= now_ms:
            raise SignInError("the session has ended; sign in again", reason=Reason.SESSION_EXPIRED)
        idp = self._idps.get(record.provider)
        if idp is None or record.idp_refresh_token is None:
            raise SignInError(
                "this session cannot be re-checked at its IdP; sign in again",
                reason=Reason.SESSION_EXPIRED,
            )
        answer = await idp.refresh(record.idp_refresh_token)
        groups, acr, amr = frozenset(record.idp_groups), record.acr, record.amr
        if answer.id_token is not None:
            token: VerifiedIdToken = await idp.verify(answer.id_token)
            if str(map_user(token, idp.provider, self._org)) != record.user:
                raise SignInError("the IdP now names another user", reason=Reason.USER_UNMAPPED)
            groups = token.groups(idp.provider.groups_claim)
            acr, amr = token.acr or acr, token.amr or amr
        user = Address.parse(record.user)
        group = admit(
            self._rules.current,
            user.user,
            claims={idp.provider.groups_claim: groups},
            acr=acr,
            amr=amr,
        )
        session_token, refresh_token = _new_token(SESSION_PREFIX), _new_token(REFRESH_PREFIX)
        renewed = replace(
            record,
            access_hash=_hash(session_token),
            access_expires_ms=now_ms + int(self._config.session_ttl * 1000),
            refresh_hash=_hash(refresh_token),
            idp_refresh_token=answer.refresh_token or record.idp_refresh_token,
            idp_groups=tuple(sorted(groups))[:256],
            acr=acr,
            amr=amr[:256],
        )
        await self._storage.session_put(renewed)
        self._members.set(record.user, {idp.provider.groups_claim: groups})
        return self._signed_in(renewed, session_token, refresh_token, group, now_ms)

    # -- use -----------------------------------------------------------------------
    async def authenticate(self, session_token: str, rules: CompiledRules) -> tuple[Address, Group]:
        """The user and group (under ``rules``) of a live session token; ``SignInError`` if none."""
        if not is_session_token(session_token):
            raise SignInError("not a session token", reason=Reason.UNAUTHORIZED)
        record = await self._storage.session_by_access(_hash(session_token))
        if record is None:
            raise SignInError("no such session", reason=Reason.UNAUTHORIZED)
        if record.access_expires_ms <= self._clock_ms():
            raise SignInError(
                "the session token has expired; refresh it", reason=Reason.SESSION_EXPIRED
            )
        idp = self._idps.get(record.provider)
        try:
            address = Address.parse(record.user)
        except AddressError:
            idp = None
        if idp is None:  # a provider no longer configured, or a row we did not write
            raise SignInError("no such session", reason=Reason.UNAUTHORIZED)
        group = admit(
            rules,
            address.user,
            claims={idp.provider.groups_claim: frozenset(record.idp_groups)},
            acr=record.acr,
            amr=record.amr,
        )
        return address, group

    async def sign_out(self, session_token: str) -> bool:
        if not is_session_token(session_token):
            return False
        record = await self._storage.session_by_access(_hash(session_token))
        if record is None:
            return False
        return await self._storage.session_delete(record.session_id)
