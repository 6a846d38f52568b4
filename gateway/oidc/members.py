"""Who the IdP says each signed-in user is: the directory behind ``members_from``.

The rules' evaluator asks :meth:`IdPMemberships.claims_of` for users that no
``members`` list names (:class:`gateway.core.rules.IdPMembers`), so a user
whose group comes from an IdP claim can also *receive*: from a colleague or a
peer, and be seen by the key directory, like any other member.

It holds, per user, the claim values of their latest sign-in or refresh
(``{groups_claim: {...}}``), set by :class:`~gateway.oidc.sessions.SessionService`;
a user whose refresh the IdP refused (disabled there) is dropped. At start-up
it is filled from the stored sessions (:meth:`load`), so a restart does not
make such users unknown to peers. Bounded: one entry per user with a session.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from gateway.core.address import Address
from gateway.errors import AddressError

Claims = Mapping[str, frozenset[str]]


class IdPMemberships:
    def __init__(self) -> None:
        self._claims: dict[str, Claims] = {}

    def claims_of(self, user: str) -> Claims:
        return self._claims.get(user, {})

    def set(self, address: str, claims: Claims) -> None:
        user = _user(address)
        if user is not None:
            self._claims[user] = {name: frozenset(values) for name, values in claims.items()}

    def drop(self, address: str) -> None:
        user = _user(address)
        if user is not None:
            self._claims.pop(user, None)

    def load(self, rows: Iterable[tuple[str, Claims]]) -> int:
        """Fill from stored sessions, oldest first (so the newest wins); how many users."""
        for address, claims in rows:
            self.set(address, claims)
        return len(self._claims)

    def __len__(self) -> int:
        return len(self._claims)


def _user(address: str) -> str | None:
    try:
        return Address.parse(address).user
    except AddressError:
        return None
