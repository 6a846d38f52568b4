"""Request bodies, path segments and queries of the client API: parsed strictly or refused."""

from __future__ import annotations

from gateway.core.address import Address, normalize_domain
from gateway.core.encoding import loads_strict
from gateway.errors import AddressError, ProtocolError, Reason
from gateway.http import Request


def json_body(body: bytes, what: str) -> object:
    """The body as strict JSON (no duplicate keys, no NaN); ``ProtocolError`` otherwise."""
    try:
        return loads_strict(body)
    except ValueError:
        raise ProtocolError(f"{what}: request body is not JSON") from None


def object_body(body: bytes, what: str, fields: set[str]) -> dict[str, object]:
    obj = json_body(body, what)
    if not isinstance(obj, dict) or set(obj) != fields:
        names = ", ".join(repr(name) for name in sorted(fields))
        raise ProtocolError(f"{what}: body must be a JSON object with exactly {names}")
    return obj


def normal_address(text: str) -> Address:
    """``text`` as an address, which it must spell in its normal form; ``AddressError``.

    One resource has one URL: ``Alice@ACME.example`` is refused (saying what to
    use), not folded, exactly as an envelope's ``from`` and ``to`` are.
    """
    address = Address.parse(text)
    if str(address) != text:
        raise AddressError(
            f"address {text[:80]!r} is not in normal form (use {address})",
            reason=Reason.ADDRESS_MALFORMED,
        )
    return address


def normal_domain(text: str) -> str:
    """``text`` as an org domain, which it must spell in its normal form; ``AddressError``."""
    org = normalize_domain(text)
    if org != text:
        raise AddressError(
            f"domain {text[:80]!r} is not in normal form (use {org})",
            reason=Reason.ADDRESS_BAD_DOMAIN,
        )
    return org


def int_query(request: Request, name: str, default: int, low: int, high: int) -> int:
    values = request.query.get(name)
    if not values:
        return default
    text = values[0]
    if len(values) > 1 or not text.isascii() or not text.isdigit() or len(text) > len(str(high)):
        raise ProtocolError(f"query parameter {name!r} must be one whole number {low}-{high}")
    value = int(text)
    if not low <= value <= high:
        raise ProtocolError(f"query parameter {name!r} must be within {low}-{high}, got {value}")
    return value
