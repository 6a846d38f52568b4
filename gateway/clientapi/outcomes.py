"""The outcome of one submitted envelope: refused, allowed (to store), or stored."""

from __future__ import annotations

import os
from dataclasses import dataclass

from gateway.core.envelope import Envelope
from gateway.core.rules import Decision, Mark
from gateway.errors import Reason


@dataclass(frozen=True, slots=True)
class Refused:
    envelope_id: str | None
    status: int  # HTTP status of a single submission
    reason: Reason
    message: str | None = None  # for the client about its own input; never a policy detail
    rule: Mark | None = None
    decision: Decision | None = None  # the rules' refusal, for the audit log

    def to_json(self, *, with_id: bool) -> dict[str, object]:
        body: dict[str, object] = {"id": self.envelope_id} if with_id else {}
        body["error"] = self.reason.value
        if self.rule is not None:
            body["rule"] = rule_text(self.rule)
        if self.message is not None:
            body["message"] = self.message
        return body


@dataclass(frozen=True, slots=True)
class Allowed:
    env: Envelope  # as submitted
    peer: str | None  # the recipient's org; None for a local recipient
    data: bytes  # its stored form: encode_envelope() with the sender's group asserted


@dataclass(frozen=True, slots=True)
class Stored:
    envelope_id: str
    status: str


Outcome = Refused | Stored


@dataclass(frozen=True, slots=True)
class Submitted:
    """A well-formed envelope and, from a batch, the JSON object it was parsed from.

    ``data``: from a binary batch, the record as received, which is the
    canonical encoding of ``raw`` (checked): what is stored, group put in.
    """

    env: Envelope
    raw: dict[str, object] | None = None
    data: bytes | None = None


def rule_text(mark: Mark) -> str:
    # The file's name only: clients need not learn the gateway's directory layout.
    return f"{os.path.basename(mark.file)}:{mark.line}"
