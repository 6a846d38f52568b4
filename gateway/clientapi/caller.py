"""Who is calling: the authenticated user, their group, and the rules read for the request."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.core.address import Address
from gateway.core.rules import CompiledRules, Group


@dataclass(frozen=True, slots=True)
class Caller:
    address: Address
    group: Group
    rules: CompiledRules  # the rules read for this request, used throughout it

    @property
    def user(self) -> str:
        return str(self.address)
