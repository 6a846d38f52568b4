"""A user's key pairs, their public half, and the 0600 key file (docs/envelope.md).

Each user holds two 32-byte secrets: an X25519 secret key (encryption: senders
seal to its public key) and an Ed25519 seed (signing: recipients verify with
its verify key). :class:`UserKeys` never shows them in a ``repr``.

The key file is JSON::

    {"v": 1, "kind": "gateway-user-keys", "address": "alice@acme.example",
     "encryption_secret": B64, "signing_seed": B64,
     "encryption_key": B64, "verify_key": B64}

with every key in unpadded base64url. The public keys are redundant and are
checked against the secrets on load, which catches a damaged or hand-edited
file. :meth:`UserKeys.save` writes it atomically with mode 0600 (a temporary
file, fsync, then a hard link that fails if the target exists, or a rename
when overwriting is asked for); :meth:`UserKeys.load` refuses a file that group
or others may read or write.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from gateway.core.address import Address
from gateway.core.encoding import b64url_decode_canonical, b64url_encode
from gateway.crypto.envelope_crypto import KEY_BYTES, derive_public_keys, generate_secret
from gateway.errors import AddressError, PKIError, ProtocolError, Reason
from gateway.files import read_private, write_atomically

KEY_FILE_VERSION = 1
KEY_FILE_KIND = "gateway-user-keys"
KEY_FILE_MODE = 0o600
MAX_KEY_FILE_BYTES = 16 * 1024  # a real one is about 300 bytes

_PUBLIC_FIELDS = frozenset({"address", "encryption_key", "verify_key"})
_FILE_FIELDS = frozenset(
    {"v", "kind", "address", "encryption_secret", "signing_seed", "encryption_key", "verify_key"}
)


@dataclass(frozen=True, slots=True)
class PublicKeys:
    """What others need to write to ``address`` and to check its signatures."""

    address: Address
    encryption_key: bytes  # X25519 public key, 32 bytes
    verify_key: bytes  # Ed25519 verify key, 32 bytes

    def to_json(self) -> dict[str, object]:
        return {
            "address": str(self.address),
            "encryption_key": b64url_encode(self.encryption_key),
            "verify_key": b64url_encode(self.verify_key),
        }

    @classmethod
    def from_json(cls, obj: object) -> PublicKeys:
        """Strict parse; ``ProtocolError`` (``key_record_malformed``) on anything else."""
        try:
            fields = _exact_fields(obj, _PUBLIC_FIELDS, "public keys")
            return cls(
                address=_address(fields, "public keys"),
                encryption_key=_key(fields, "encryption_key", "public keys"),
                verify_key=_key(fields, "verify_key", "public keys"),
            )
        except ValueError as exc:
            raise ProtocolError(str(exc), reason=Reason.KEY_RECORD_MALFORMED) from None


@dataclass(frozen=True, slots=True)
class UserKeys:
    """A user's secret keys. Lives in the client only, never in a gateway."""

    address: Address
    encryption_secret: bytes = field(repr=False)  # X25519 secret key
    signing_seed: bytes = field(repr=False)  # Ed25519 seed

    @classmethod
    def generate(cls, address: Address) -> UserKeys:
        return cls(address, generate_secret(), generate_secret())

    def public(self) -> PublicKeys:
        encryption_key, verify_key = derive_public_keys(self.encryption_secret, self.signing_seed)
        return PublicKeys(self.address, encryption_key, verify_key)

    def to_file_json(self) -> dict[str, object]:
        public = self.public()
        return {
            "v": KEY_FILE_VERSION,
            "kind": KEY_FILE_KIND,
            "address": str(self.address),
            "encryption_secret": b64url_encode(self.encryption_secret),
            "signing_seed": b64url_encode(self.signing_seed),
            "encryption_key": b64url_encode(public.encryption_key),
            "verify_key": b64url_encode(public.verify_key),
        }

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write the key file with mode 0600, atomically; ``PKIError`` on failure.

        Refuses to replace an existing file unless ``overwrite``.
        """
        target = Path(path)
        data = (json.dumps(self.to_file_json(), indent=2, sort_keys=True) + "\n").encode("ascii")
        try:
            write_atomically(target, data, mode=KEY_FILE_MODE, replace=overwrite)
        except FileExistsError:
            raise PKIError(f"{target}: key file exists; refusing to overwrite it") from None
        except OSError as exc:
            raise PKIError(f"{target}: cannot write key file: {exc.strerror or exc}") from exc

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> UserKeys:
        """Read a key file written by :meth:`save`; ``PKIError`` saying what is wrong."""
        source = Path(path)
        data = _read_private(source)
        try:
            obj = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError):
            raise PKIError(f"{source}: not a key file (not JSON)") from None
        try:
            return _parse_key_file(obj)
        except ValueError as exc:
            raise PKIError(f"{source}: {exc}") from None


# -- file helpers --------------------------------------------------------------


def _read_private(path: Path) -> bytes:
    try:
        return read_private(path, max_bytes=MAX_KEY_FILE_BYTES, what="key file")
    except FileNotFoundError:
        raise PKIError(f"{path}: no such key file") from None
    except ValueError as exc:
        raise PKIError(f"{path}: {exc}") from None
    except OSError as exc:
        raise PKIError(f"{path}: cannot read key file: {exc.strerror or exc}") from exc


def _parse_key_file(obj: object) -> UserKeys:
    fields = _exact_fields(obj, _FILE_FIELDS, "key file")
    version = fields["v"]
    if type(version) is not int or version != KEY_FILE_VERSION or fields["kind"] != KEY_FILE_KIND:
        raise ValueError(f"key file: expected v {KEY_FILE_VERSION} and kind {KEY_FILE_KIND!r}")
    keys = UserKeys(
        address=_address(fields, "key file"),
        encryption_secret=_key(fields, "encryption_secret", "key file"),
        signing_seed=_key(fields, "signing_seed", "key file"),
    )
    public = keys.public()
    if public.encryption_key != _key(fields, "encryption_key", "key file") or (
        public.verify_key != _key(fields, "verify_key", "key file")
    ):
        raise ValueError("key file: public keys do not match the secret keys (damaged?)")
    return keys


# -- strict JSON helpers (ValueError saying what and where) ---------------------


def _exact_fields(obj: object, expected: frozenset[str], what: str) -> dict[str, object]:
    if not isinstance(obj, dict):
        raise ValueError(f"{what}: expected a JSON object")
    unknown = sorted(str(key)[:40] for key in obj if key not in expected)
    if unknown:
        raise ValueError(f"{what}: unknown field(s): {', '.join(unknown[:5])}")
    missing = sorted(expected - obj.keys())
    if missing:
        raise ValueError(f"{what}: missing field(s): {', '.join(missing)}")
    return obj


def _address(fields: dict[str, object], what: str) -> Address:
    text = fields["address"]
    if not isinstance(text, str):
        raise ValueError(f"{what}: field 'address' must be a string")
    try:
        address = Address.parse(text)
    except AddressError as exc:
        raise ValueError(f"{what}: field 'address': {exc}") from None
    if str(address) != text:
        raise ValueError(f"{what}: field 'address' is not in normal form (use {address})")
    return address


def _key(fields: dict[str, object], name: str, what: str) -> bytes:
    text = fields[name]
    if not isinstance(text, str):
        raise ValueError(f"{what}: field {name!r} must be a string")
    try:
        raw = b64url_decode_canonical(text)
    except ValueError:
        raise ValueError(f"{what}: field {name!r} is not unpadded base64url") from None
    if len(raw) != KEY_BYTES:
        raise ValueError(f"{what}: field {name!r} must be {KEY_BYTES} bytes, got {len(raw)}")
    return raw
