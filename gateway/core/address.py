"""Addresses: ``user@org``.

Allowed characters (ASCII only; the whole address is lower-cased):

* **user**: 1-64 characters of ``a-z 0-9 . _ -``; starts and ends with a letter
  or digit; no two dots in a row.
* **org**: a DNS name of at least two labels, at most 253 characters. Each
  label is 1-63 characters of ``a-z 0-9 -`` and neither starts nor ends with
  ``-``. The last label is not all digits (no IP addresses). International
  names are written in their ``xn--`` form. One trailing dot is dropped.

Upper case is folded to lower case, so ``Alice@ACME.example`` and
``alice@acme.example`` are one address: two users who differ only in case would
be an invitation to impersonation. Anything else is refused with an
:class:`~gateway.errors.AddressError` whose reason says which part was wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.errors import AddressError, Reason

MAX_USER_LENGTH = 64
MAX_DOMAIN_LENGTH = 253
MAX_ADDRESS_LENGTH = MAX_USER_LENGTH + 1 + MAX_DOMAIN_LENGTH

_USER_RE = re.compile(r"[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?")
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def normalize_user(user: str) -> str:
    """Return the canonical form of a user name, or raise ``AddressError``."""
    if not isinstance(user, str) or not user.isascii():
        raise AddressError(f"user name {user!r} is not ASCII", reason=Reason.ADDRESS_BAD_USER)
    folded = user.lower()
    if not _USER_RE.fullmatch(folded) or ".." in folded:
        raise AddressError(
            f"user name {user!r} is not 1-64 of a-z 0-9 . _ - starting and ending "
            "with a letter or digit",
            reason=Reason.ADDRESS_BAD_USER,
        )
    return folded


def normalize_domain(domain: str) -> str:
    """Return the canonical form of an org domain, or raise ``AddressError``."""
    if not isinstance(domain, str) or not domain.isascii():
        raise AddressError(
            f"domain {domain!r} is not ASCII (write international names as xn--)",
            reason=Reason.ADDRESS_BAD_DOMAIN,
        )
    folded = domain.lower()
    if folded.endswith("."):
        folded = folded[:-1]
    if not folded or len(folded) > MAX_DOMAIN_LENGTH:
        raise AddressError(
            f"domain {domain!r} is empty or longer than {MAX_DOMAIN_LENGTH} characters",
            reason=Reason.ADDRESS_BAD_DOMAIN,
        )
    labels = folded.split(".")
    if len(labels) < 2:
        raise AddressError(
            f"domain {domain!r} needs at least two labels (like acme.example)",
            reason=Reason.ADDRESS_BAD_DOMAIN,
        )
    for label in labels:
        if not _LABEL_RE.fullmatch(label):
            raise AddressError(
                f"domain {domain!r} has an invalid label {label!r}",
                reason=Reason.ADDRESS_BAD_DOMAIN,
            )
    if labels[-1].isdigit():
        raise AddressError(
            f"domain {domain!r} looks like an IP address", reason=Reason.ADDRESS_BAD_DOMAIN
        )
    return folded


def is_valid_domain(domain: str) -> bool:
    try:
        normalize_domain(domain)
    except AddressError:
        return False
    return True


@dataclass(frozen=True, slots=True, order=True)
class Address:
    """A normalized ``user@org``. Build it with :meth:`parse` or :meth:`of`."""

    user: str
    org: str

    @classmethod
    def parse(cls, text: str) -> Address:
        if not isinstance(text, str):
            raise AddressError("address is not a string", reason=Reason.ADDRESS_MALFORMED)
        if not text or len(text) > MAX_ADDRESS_LENGTH + 1:
            raise AddressError("address is empty or too long", reason=Reason.ADDRESS_MALFORMED)
        user, sep, org = text.rpartition("@")
        if not sep or not user or "@" in user:
            raise AddressError(
                f"address {text!r} is not of the form user@org", reason=Reason.ADDRESS_MALFORMED
            )
        return cls(normalize_user(user), normalize_domain(org))

    @classmethod
    def of(cls, user: str, org: str) -> Address:
        return cls(normalize_user(user), normalize_domain(org))

    def __str__(self) -> str:
        return f"{self.user}@{self.org}"
