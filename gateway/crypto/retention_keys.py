"""The compliance officer's retention key file, and the org signature over archive exports.

The retention key is an X25519 key pair (docs/retention.md). Its **secret**
lives in a file on the compliance officer's machine, never on a gateway::

    {"v": 1, "kind": "gateway-retention-key", "id": "acme-2026",
     "secret": B64, "public_key": "x25519:..."}

written 0600 like a user's key file (:func:`gateway.files.write_atomically`)
and refused when group or others may read it. The public key and the id go
into the rules (``retention.key``).

An archive export is signed with the org's Ed25519 signing key over
``"gateway-retention-export-v1" 0x00 || SHA-256(body)``, so a file can be
checked offline against the org key a partner or auditor already trusts
(``gateway peer card`` prints it).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from nacl.exceptions import CryptoError
from nacl.signing import SigningKey, VerifyKey

from gateway.core.encoding import b64url_decode_canonical, b64url_encode
from gateway.core.envelope import RETENTION_KEY_ID_RE
from gateway.core.keytext import format_retention_key, parse_retention_key
from gateway.crypto.envelope_crypto import generate_retention_key, retention_public_key
from gateway.errors import PKIError
from gateway.files import read_private, write_atomically

KEY_FILE_KIND: Final = "gateway-retention-key"
KEY_FILE_VERSION: Final = 1
KEY_FILE_MODE: Final = 0o600
MAX_KEY_FILE_BYTES: Final = 4096
EXPORT_SIGNING_DOMAIN: Final = b"gateway-retention-export-v1\x00"
_FIELDS: Final = frozenset({"v", "kind", "id", "secret", "public_key"})


@dataclass(frozen=True, slots=True)
class RetentionKeyPair:
    """A retention key pair with its id. Lives on the compliance officer's machine only."""

    id: str
    secret: bytes = field(repr=False)
    public_key: bytes

    @classmethod
    def generate(cls, key_id: str) -> RetentionKeyPair:
        if not RETENTION_KEY_ID_RE.fullmatch(key_id):
            raise ValueError(
                f"invalid retention key id {key_id!r}: 1-64 of A-Z a-z 0-9 . _ -, "
                "starting with a letter or digit"
            )
        secret, public = generate_retention_key()
        return cls(key_id, secret, public)

    def save(self, path: Path, *, overwrite: bool = False) -> None:
        data = json.dumps(
            {
                "v": KEY_FILE_VERSION,
                "kind": KEY_FILE_KIND,
                "id": self.id,
                "secret": b64url_encode(self.secret),
                "public_key": format_retention_key(self.public_key),
            },
            indent=2,
            sort_keys=True,
        )
        try:
            write_atomically(path, (data + "\n").encode(), mode=KEY_FILE_MODE, replace=overwrite)
        except FileExistsError:
            raise PKIError(f"{path}: exists; refusing to overwrite a retention key") from None
        except OSError as exc:
            raise PKIError(f"{path}: cannot write: {exc.strerror or exc}") from exc

    @classmethod
    def load(cls, path: Path) -> RetentionKeyPair:
        """Read a key file written by :meth:`save`; ``PKIError`` saying what is wrong."""
        try:
            data = read_private(path, max_bytes=MAX_KEY_FILE_BYTES, what="retention key file")
        except FileNotFoundError:
            raise PKIError(f"{path}: no such retention key file") from None
        except ValueError as exc:
            raise PKIError(f"{path}: {exc}") from None
        except OSError as exc:
            raise PKIError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        try:
            return _parse_key_file(data)
        except ValueError as exc:
            raise PKIError(f"{path}: {exc}") from None


def _parse_key_file(data: bytes) -> RetentionKeyPair:
    obj = json.loads(data)  # ValueError (JSONDecodeError, UnicodeDecodeError) on garbage
    if not isinstance(obj, dict) or obj.keys() != _FIELDS:
        raise ValueError("not a retention key file (fields)")
    if obj["v"] != KEY_FILE_VERSION or obj["kind"] != KEY_FILE_KIND:
        raise ValueError("not a retention key file (kind or version)")
    key_id, secret_text, public_text = obj["id"], obj["secret"], obj["public_key"]
    if not isinstance(key_id, str) or not RETENTION_KEY_ID_RE.fullmatch(key_id):
        raise ValueError("bad id")
    if not isinstance(secret_text, str) or not isinstance(public_text, str):
        raise ValueError("bad key fields")
    secret = b64url_decode_canonical(secret_text)
    public = parse_retention_key(public_text)
    if len(secret) != 32 or retention_public_key(secret) != public:
        raise ValueError("the public key does not match the secret (damaged?)")
    return RetentionKeyPair(key_id, secret, public)


def sign_export(org_signing_seed: bytes, body_sha256: bytes) -> bytes:
    """The org's Ed25519 signature over an export's body digest."""
    return SigningKey(org_signing_seed).sign(EXPORT_SIGNING_DOMAIN + body_sha256).signature


def export_signature_verifies(org_verify_key: bytes, body_sha256: bytes, signature: bytes) -> bool:
    try:
        VerifyKey(org_verify_key).verify(EXPORT_SIGNING_DOMAIN + body_sha256, signature)
    except (CryptoError, ValueError, TypeError):
        return False
    return True


def default_key_path(key_id: str) -> Path:
    """Where keygen writes unless told: ``./retention-<id>.key``."""
    return Path(os.curdir) / f"retention-{key_id}.key"
