"""The reference client's contacts: trust on first use of each contact's keys.

A key record is signed by the contact's org, and the client checks that
signature (:mod:`gateway.client.reference`). That protects against anyone
between the client and the org, but not against the org (or someone holding
its signing key) swapping a user's keys. So the client also remembers the
keys it first saw for each address and refuses, with a clear warning, to use
different ones until the user says ``--accept-new-key`` (after checking with
the contact by other means). SSH's ``known_hosts`` is the model.

Theory of operation: :func:`decide_trust` is the whole policy, pure. A
:class:`ContactBook` holds the remembered keys in memory, applies the policy
in :meth:`ContactBook.remember`, and :meth:`ContactBook.save` writes them as
one JSON file, mode 0600, atomically (temporary file, fsync, rename)::

    {"v": 1, "kind": "gateway-contacts",
     "contacts": {"bob@globex.example": {"encryption_key": B64, "verify_key": B64,
                                          "first_seen": 1700000000000}}}

The file is private like the key file (it says who the user talks to) and
its integrity matters (a changed entry would be a silently accepted key), so
a file that group or others may read or write is refused. Two clients of the
same user writing it at the same moment: the last write wins, and the other's
new contacts are simply trusted again on their next use.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from gateway.core.address import Address
from gateway.core.encoding import b64url_decode_canonical, b64url_encode
from gateway.crypto.keys import PublicKeys
from gateway.errors import AddressError, ConfigError, Reason, RemoteError
from gateway.files import read_private, write_atomically

CONTACTS_FILE_VERSION: Final = 1
CONTACTS_FILE_KIND: Final = "gateway-contacts"
CONTACTS_FILE_MODE: Final = 0o600
CONTACTS_SUFFIX: Final = ".contacts.json"
MAX_CONTACTS: Final = 10_000  # a person's contacts; far more is a broken or hostile file
MAX_CONTACTS_FILE_BYTES: Final = 4 * 1024 * 1024  # ~250 bytes per contact, with room
KEY_BYTES: Final = 32
_ENTRY_FIELDS: Final = frozenset({"encryption_key", "verify_key", "first_seen"})
_FILE_FIELDS: Final = frozenset({"v", "kind", "contacts"})


class Trust(enum.StrEnum):
    """What :func:`decide_trust` concluded about a contact's keys."""

    NEW = "new"  # never seen: remembered now
    KNOWN = "known"  # the same keys as remembered
    REPLACED = "replaced"  # different keys, accepted on the user's word


class KeyChangedError(RemoteError):
    """A contact's keys differ from the ones remembered; refused until accepted."""

    default_reason = Reason.KEY_CHANGED

    def __init__(self, address: Address, first_seen_ms: int) -> None:
        self.address = address
        self.first_seen_ms = first_seen_ms
        seen = datetime.fromtimestamp(first_seen_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")
        super().__init__(
            f"WARNING: the keys of {address} have CHANGED since they were first seen "
            f"({seen}). This happens when {address} set up a new device or lost their keys, "
            "but it is also what an attack looks like. Check with them by other means; "
            "if the change is genuine, repeat with --accept-new-key."
        )


@dataclass(frozen=True, slots=True)
class Contact:
    """The keys remembered for one address, and since when."""

    address: Address
    encryption_key: bytes = field(repr=False)
    verify_key: bytes = field(repr=False)
    first_seen_ms: int

    @classmethod
    def of(cls, public: PublicKeys, *, first_seen_ms: int) -> Contact:
        return cls(public.address, public.encryption_key, public.verify_key, first_seen_ms)

    def matches(self, public: PublicKeys) -> bool:
        return (
            public.address == self.address
            and public.encryption_key == self.encryption_key
            and public.verify_key == self.verify_key
        )

    @property
    def public_keys(self) -> PublicKeys:
        return PublicKeys(self.address, self.encryption_key, self.verify_key)


def decide_trust(known: Contact | None, public: PublicKeys, *, accept_new_key: bool) -> Trust:
    """The trust-on-first-use policy; :class:`KeyChangedError` for an unaccepted change."""
    if known is None:
        return Trust.NEW
    if known.matches(public):
        return Trust.KNOWN
    if not accept_new_key:
        raise KeyChangedError(public.address, known.first_seen_ms)
    return Trust.REPLACED


def default_contacts_path(keys_file: Path) -> Path:
    """``alice.json`` -> ``alice.contacts.json``, beside the key file."""
    return keys_file.with_name(keys_file.stem + CONTACTS_SUFFIX)


class ContactBook:
    """The remembered keys of one user's contacts, backed by a 0600 JSON file."""

    def __init__(self, path: Path, contacts: dict[Address, Contact] | None = None) -> None:
        self.path = path
        self._contacts: dict[Address, Contact] = dict(contacts or {})
        self._dirty = False

    def __len__(self) -> int:
        return len(self._contacts)

    def get(self, address: Address) -> Contact | None:
        return self._contacts.get(address)

    def remember(self, public: PublicKeys, *, now_ms: int, accept_new_key: bool = False) -> Trust:
        """Check ``public`` against what is remembered and remember it if trusted.

        Raises :class:`KeyChangedError` (and remembers nothing) for changed keys
        unless ``accept_new_key``; an accepted change starts a new first-seen.
        """
        trust = decide_trust(self.get(public.address), public, accept_new_key=accept_new_key)
        if trust is not Trust.KNOWN:
            if trust is Trust.NEW and len(self._contacts) >= MAX_CONTACTS:
                raise ConfigError(f"{self.path}: more than {MAX_CONTACTS} contacts")
            self._contacts[public.address] = Contact.of(public, first_seen_ms=now_ms)
            self._dirty = True
        return trust

    @classmethod
    def load(cls, path: Path) -> ContactBook:
        """The book in ``path``; an empty one if the file does not exist yet."""
        data = _read_private(path)
        if data is None:
            return cls(path)
        try:
            obj = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError):
            raise ConfigError(f"{path}: not a contacts file (not JSON)") from None
        try:
            return cls(path, _parse(obj))
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def save(self) -> None:
        """Write the book if anything changed: 0600, atomically; ``ConfigError`` on failure."""
        if not self._dirty:
            return
        obj = {
            "v": CONTACTS_FILE_VERSION,
            "kind": CONTACTS_FILE_KIND,
            "contacts": {
                str(contact.address): {
                    "encryption_key": b64url_encode(contact.encryption_key),
                    "verify_key": b64url_encode(contact.verify_key),
                    "first_seen": contact.first_seen_ms,
                }
                for contact in sorted(self._contacts.values(), key=lambda c: c.address)
            },
        }
        data = (json.dumps(obj, indent=2) + "\n").encode("ascii")
        try:
            write_atomically(self.path, data, mode=CONTACTS_FILE_MODE, replace=True)
        except OSError as exc:
            raise ConfigError(
                f"{self.path}: cannot write the contacts file: {exc.strerror or exc}"
            ) from exc
        self._dirty = False


def _read_private(path: Path) -> bytes | None:
    try:
        return read_private(path, max_bytes=MAX_CONTACTS_FILE_BYTES, what="contacts file")
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the contacts file: {exc.strerror or exc}") from exc


def _parse(obj: object) -> dict[Address, Contact]:
    if not isinstance(obj, dict) or set(obj) != _FILE_FIELDS:
        raise ValueError(f"expected an object with exactly {sorted(_FILE_FIELDS)}")
    if obj["v"] != CONTACTS_FILE_VERSION or obj["kind"] != CONTACTS_FILE_KIND:
        raise ValueError(f"expected v {CONTACTS_FILE_VERSION} and kind {CONTACTS_FILE_KIND!r}")
    entries = obj["contacts"]
    if not isinstance(entries, dict):
        raise ValueError("'contacts' must be an object")
    if len(entries) > MAX_CONTACTS:
        raise ValueError(f"more than {MAX_CONTACTS} contacts")
    contacts: dict[Address, Contact] = {}
    for text, entry in entries.items():
        where = f"contacts.{str(text)[:80]}"
        try:
            address = Address.parse(text)
        except AddressError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if not isinstance(entry, dict) or set(entry) != _ENTRY_FIELDS:
            raise ValueError(f"{where}: expected exactly {sorted(_ENTRY_FIELDS)}")
        first_seen = entry["first_seen"]
        if type(first_seen) is not int or first_seen < 0:
            raise ValueError(f"{where}.first_seen: expected a time in Unix milliseconds")
        contacts[address] = Contact(
            address,
            _key(entry["encryption_key"], f"{where}.encryption_key"),
            _key(entry["verify_key"], f"{where}.verify_key"),
            first_seen,
        )
    return contacts


def _key(value: object, where: str) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected base64url text")
    try:
        raw = b64url_decode_canonical(value)
    except ValueError:
        raise ValueError(f"{where}: not unpadded base64url") from None
    if len(raw) != KEY_BYTES:
        raise ValueError(f"{where}: expected {KEY_BYTES} bytes, got {len(raw)}")
    return raw
