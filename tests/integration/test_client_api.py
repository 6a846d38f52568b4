"""The client API over real sockets on 127.0.0.1, a real SQLite store and real rules.

Each test gets its own gateway half: rules written to ``tmp_path`` and loaded
by a :class:`RulesHolder`, a fresh SQLite file, the HTTP server on port 0 and
an httpx client. Refusals are checked for their reason code *and* for leaving
storage untouched.

Time: the long-poll's waiting primitive is tested on trio's autojump clock;
through HTTP, the timeout runs on the autojump clock too (nothing but the
long-poll has a deadline then), while the wake-by-arrival test runs on the
real clock (the submission that wakes it waits on storage threads, which the
autojump clock would skip past) and asserts it returned long before its wait.
"""

from __future__ import annotations

import itertools
import secrets
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
import yaml
from jsonschema import Draft202012Validator
from nacl.signing import SigningKey
from prometheus_client import REGISTRY
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from gateway.clientapi import (
    MAX_BATCH_ENVELOPES,
    MAX_WAIT_SECONDS,
    ClientAPI,
    MailboxWaiters,
    TooManyWatches,
)
from gateway.clientapi.tokens import issue_token, revoke_tokens
from gateway.core.address import Address
from gateway.core.envelope import (
    Envelope,
    b64url_encode,
    decode_envelope,
    encode_envelope,
    new_envelope_id,
)
from gateway.core.keytext import format_signing_key
from gateway.core.ratelimit import RateLimiter
from gateway.crypto.key_records import sign_key_record, verify_key_record
from gateway.crypto.keys import UserKeys
from gateway.errors import KeyRecordError, PeerAuthError
from gateway.http import HTTPServer, Router
from gateway.observability.audit import AuditSink
from gateway.pki import dev
from gateway.pki.tls import client_api_server_context
from gateway.reserve import Reserve
from gateway.rules_runtime import RulesHolder
from gateway.storage.base import Bound, EnvelopeRecord
from gateway.storage.sqlite import SqliteStorage, open_sqlite_storage
from tests.certs_for_tests import CertAuthority

HOST = "127.0.0.1"
ORG = "acme.example"
GLOBEX = "globex.example"
# The gw fixture's segment threshold: a 600-byte ciphertext is stored as ~1,100
# bytes (JSON, base64url) and stays in its row; an 800-byte one (~1,360) goes to a
# segment file, so both places are exercised.
SEGMENT_AT_BYTES = 1_200
SEGMENT_AT_SIZE = 700  # ciphertext bytes above which an envelope lands in a segment
NOW_MS = 1_800_000_000_000
HOUR_MS = 3_600_000
HTTP_TIMEOUT = 120.0  # seconds; longer than any long-poll here
USERS = ("alice", "bob", "carol", "dave", "erin")

_names = itertools.count()


def peer_entry(org: str, signing_key: bytes) -> str:
    pem = CertAuthority.create(f"{org} CA").cert_pem.decode("ascii")
    indented = "".join(f"      {line}\n" for line in pem.splitlines())
    return (
        f"  {org}:\n"
        f"    endpoint: https://gw.{org}:8443\n"
        f"    ca_pem: |\n{indented}"
        f"    signing_key: {format_signing_key(signing_key)}\n"
    )


def rules_text(globex_verify_key: bytes, *, members: str = "alice, bob, dave") -> str:
    # Groups first: the line numbers of their limits do not depend on the PEMs.
    return (
        "version: 1\n"
        f"org: {ORG}\n"
        "default: deny\n"
        "groups:\n"
        "  engineering:\n"
        f"    members: [{members}]\n"
        f"    send_to: [{GLOBEX}]\n"
        "    limits:\n"
        "      max_envelope_bytes: 1000\n"
        "      ttl: {min: 1m, default: 1h, max: 1d}\n"
        "  secure:\n"
        "    members: [erin]\n"
        f"    send_to: [{GLOBEX}]\n"
        "    limits:\n"
        "      burn_on_read: required\n"
        "  legal:\n"
        "    members: [carol]\n"
        "peers:\n"
        + peer_entry(GLOBEX, globex_verify_key)
        + peer_entry("initech.example", SigningKey.generate().verify_key.encode())
    )


def line_of(text: str, needle: str) -> int:
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in the rules")


def envelope(
    sender: str,
    recipient: str,
    *,
    size: int = 100,
    ttl_ms: int = HOUR_MS,
    burn_on_read: bool = False,
    created: int = NOW_MS,
    envelope_id: str | None = None,
) -> Envelope:
    """An envelope as a client would submit it. The gateway never opens one, so the
    ciphertext and signature are random bytes of the right sizes."""
    return Envelope(
        version=1,
        id=envelope_id or new_envelope_id(),
        sender=Address.parse(sender),
        recipient=Address.parse(recipient),
        created=created,
        expires=created + ttl_ms,
        burn_on_read=burn_on_read,
        ciphertext=secrets.token_bytes(size),
        signature=secrets.token_bytes(64),
    )


def record_of(env: Envelope) -> EnvelopeRecord:
    """The mailbox row a receiver would write for ``env``."""
    return EnvelopeRecord(
        envelope_id=env.id,
        sender=str(env.sender),
        recipient=str(env.recipient),
        created_ms=env.created,
        expires_ms=env.expires,
        burn_on_read=env.burn_on_read,
        data=encode_envelope(env),
    )


def sample(metric: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(metric, labels) or 0.0


@dataclass
class Gateway:
    """One client API on a socket, and everything behind it."""

    client: httpx.AsyncClient
    store: SqliteStorage
    holder: RulesHolder
    waiters: MailboxWaiters
    rules_path: Path
    rules_text: str
    org_seed: bytes
    globex_seed: bytes
    tokens: dict[str, str]
    spooled: list[str] = field(default_factory=list)
    remote_records: dict[str, bytes | Exception | None] = field(default_factory=dict)
    lookups: list[Address] = field(default_factory=list)

    def auth(self, user: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.tokens[user]}"}

    async def submit(self, user: str, env: Envelope) -> httpx.Response:
        return await self.client.post(
            "/v1/envelopes", content=encode_envelope(env), headers=self.auth(user)
        )

    async def mailbox(self, user: str) -> list[str]:
        """Ids in ``user``'s mailbox, straight from storage."""
        entries = await self.store.mailbox_fetch(f"{user}@{ORG}", limit=500)
        return [entry.envelope_id for entry in entries]

    async def spooled_ids(self) -> list[str]:
        return [summary.envelope_id for summary in await self.store.spool_list()]

    async def assert_nothing_stored(self, env: Envelope) -> None:
        assert await self.store.status_get(env.id) is None
        assert env.id not in await self.spooled_ids()
        if env.recipient.org == ORG:
            assert env.id not in await self.mailbox(env.recipient.user)


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path, bytes]:
    now = datetime.now(UTC)
    ca = dev.issue_ca(ORG, now=now)
    leaf = dev.issue_client_api_cert(ca, HOST, now=now)
    cert, key = tmp_path / "client-api.pem", tmp_path / "client-api.key"
    cert.write_bytes(leaf.cert_pem())
    key.write_bytes(leaf.key_pem())
    key.chmod(0o600)
    return cert, key, ca.cert_pem()


async def _start(
    tmp_path: Path,
    *,
    ssl_context: ssl.SSLContext | None,
    client_verify: ssl.SSLContext | None,
    lane_bound: Bound | None = None,
    mailbox_bound: Bound | None = None,
    submit_rate: RateLimiter | None = None,
    reserve: Reserve | None = None,
    max_wait_seconds: float = MAX_WAIT_SECONDS,
    make_rules: Callable[[bytes], str] = rules_text,
    audit: AuditSink | None = None,
    with_archive: bool = False,
) -> AsyncIterator[Gateway]:
    globex_seed = secrets.token_bytes(32)
    org_seed = secrets.token_bytes(32)
    text = make_rules(bytes(SigningKey(globex_seed).verify_key))
    rules_path = tmp_path / "rules.yaml"
    rules_path.write_text(text)
    holder = RulesHolder.load(rules_path)
    waiters = MailboxWaiters()
    async with open_sqlite_storage(
        tmp_path / "gateway.sqlite3", segment_threshold=SEGMENT_AT_BYTES
    ) as store:
        tokens = {
            user: await issue_token(store, Address.of(user, ORG), at_ms=NOW_MS) for user in USERS
        }
        gateway: Gateway | None = None

        async def lookup(address: Address) -> bytes | None:
            assert gateway is not None
            gateway.lookups.append(address)
            found = gateway.remote_records.get(str(address))
            if isinstance(found, Exception):
                raise found
            return found

        def on_spooled(peer: str) -> None:
            assert gateway is not None
            gateway.spooled.append(peer)

        api = ClientAPI(
            org=ORG,
            rules=holder,
            storage=store,
            org_signing_seed=org_seed,
            waiters=waiters,
            clock_ms=lambda: NOW_MS,
            on_spooled=on_spooled,
            remote_key_lookup=lookup,
            lane_bound=lane_bound,
            mailbox_bound=mailbox_bound,
            submit_rate=submit_rate,
            reserve=reserve,
            max_wait_seconds=max_wait_seconds,
            audit=audit,
            archive=store.archive if with_archive else None,
        )
        router = Router()
        api.add_routes(router)
        server = HTTPServer(f"client-test-{next(_names)}", router, ssl_context=ssl_context)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve, HOST, 0)
            scheme = "https" if ssl_context is not None else "http"
            async with httpx.AsyncClient(
                base_url=f"{scheme}://{HOST}:{port}",
                timeout=HTTP_TIMEOUT,
                verify=client_verify if client_verify is not None else True,
            ) as client:
                gateway = Gateway(
                    client=client,
                    store=store,
                    holder=holder,
                    waiters=waiters,
                    rules_path=rules_path,
                    rules_text=text,
                    org_seed=org_seed,
                    globex_seed=globex_seed,
                    tokens=tokens,
                )
                yield gateway
            nursery.cancel_scope.cancel()


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gateway]:
    async for gateway in _start(tmp_path, ssl_context=None, client_verify=None):
        yield gateway


# -- authentication ------------------------------------------------------------------------
async def test_me_tells_the_group_and_its_limits(gw: Gateway) -> None:
    answer = await gw.client.get("/v1/me", headers=gw.auth("alice"))
    assert answer.status_code == 200
    assert answer.json() == {
        "address": "alice@acme.example",
        "group": "engineering",
        "limits": {
            "max_envelope_bytes": 1000,
            "ttl": {"min": 60, "default": 3600, "max": 86400},
            "burn_on_read": "optional",
        },
    }
    erin = (await gw.client.get("/v1/me", headers=gw.auth("erin"))).json()
    assert erin["group"] == "secure"
    assert erin["limits"]["burn_on_read"] == "required"


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer not-a-token",
        "Basic dXNlcjpwYXNz",
        # Well-formed, never issued (a constant: test ids must be the same in every
        # process that collects them, pytest-xdist's workers).
        "Bearer gwt_DyVtKb7rOT9ZW4fEJc2m8ydDWq4H1SCIrTrL4koLg3M",
    ],
)
async def test_a_missing_or_unknown_token_is_401_and_stores_nothing(
    gw: Gateway, authorization: str | None
) -> None:
    env = envelope("alice@acme.example", "bob@acme.example")
    headers = {} if authorization is None else {"authorization": authorization}
    for method, path, body in (
        ("GET", "/v1/me", None),
        ("POST", "/v1/envelopes", encode_envelope(env)),
        ("GET", "/v1/mailbox", None),
        ("GET", f"/v1/status/{env.id}", None),
        ("GET", "/v1/keys/alice@acme.example", None),
    ):
        answer = await gw.client.request(method, path, content=body, headers=headers)
        assert answer.status_code == 401, (method, path)
        assert answer.json() == {"error": "unauthorized"}
        assert answer.headers["www-authenticate"].startswith("Bearer")
    await gw.assert_nothing_stored(env)


async def test_a_revoked_token_is_refused(gw: Gateway) -> None:
    assert (await gw.client.get("/v1/me", headers=gw.auth("alice"))).status_code == 200
    assert await revoke_tokens(gw.store, Address.of("alice", ORG)) == 1
    env = envelope("alice@acme.example", "bob@acme.example")
    answer = await gw.submit("alice", env)
    assert answer.status_code == 401
    assert answer.json() == {"error": "unauthorized"}
    await gw.assert_nothing_stored(env)
    # Bob's token is untouched.
    assert (await gw.client.get("/v1/me", headers=gw.auth("bob"))).status_code == 200


async def test_a_user_removed_from_the_rules_is_refused_with_no_group(gw: Gateway) -> None:
    assert (await gw.client.get("/v1/me", headers=gw.auth("dave"))).status_code == 200
    removed = gw.rules_text.replace("alice, bob, dave", "alice, bob")
    gw.rules_path.write_text(removed)
    record = await gw.holder.reload()
    assert record is not None
    assert record.ok
    env = envelope("dave@acme.example", "bob@acme.example")
    for answer in (
        await gw.client.get("/v1/me", headers=gw.auth("dave")),
        await gw.submit("dave", env),
        await gw.client.get("/v1/mailbox", headers=gw.auth("dave")),
    ):
        assert answer.status_code == 403
        assert answer.json() == {"error": "no_group"}
    await gw.assert_nothing_stored(env)


# -- submissions -----------------------------------------------------------------------------
async def test_a_local_envelope_is_delivered_with_the_group_and_wakes_nothing_else(
    gw: Gateway,
) -> None:
    before = sample("gateway_clientapi_submissions_total", result="accepted")
    env = envelope("alice@acme.example", "bob@acme.example")
    answer = await gw.submit("alice", env)
    assert answer.status_code == 202
    assert answer.json() == {"id": env.id, "status": "delivered"}
    assert await gw.mailbox("bob") == [env.id]
    (entry,) = await gw.store.mailbox_fetch("bob@acme.example", limit=10)
    stored = decode_envelope(entry.data)
    assert stored == env.with_group("engineering")  # the group asserted, nothing else changed
    assert gw.spooled == []
    assert await gw.spooled_ids() == []
    assert sample("gateway_clientapi_submissions_total", result="accepted") == before + 1


async def test_a_remote_envelope_is_spooled_and_its_sender_woken(gw: Gateway) -> None:
    env = envelope("alice@acme.example", "zed@globex.example")
    answer = await gw.submit("alice", env)
    assert answer.status_code == 202
    assert answer.json() == {"id": env.id, "status": "queued"}
    assert gw.spooled == [GLOBEX]
    (entry,) = await gw.store.spool_take(GLOBEX, max_items=10, max_bytes=10**6)
    assert entry.envelope_id == env.id
    assert entry.recipient == "zed@globex.example"
    assert decode_envelope(entry.data).group == "engineering"
    status = await gw.store.status_get(env.id)
    assert status is not None
    assert status.status == "queued"


async def test_a_client_supplied_group_is_replaced_by_the_senders(gw: Gateway) -> None:
    env = envelope("alice@acme.example", "zed@globex.example").with_group("legal")
    assert (await gw.submit("alice", env)).status_code == 202
    (entry,) = await gw.store.spool_take(GLOBEX, max_items=10, max_bytes=10**6)
    assert decode_envelope(entry.data).group == "engineering"


REFUSALS: dict[str, tuple[str, Callable[[], Envelope], int, str]] = {
    # name: (token of, envelope, status, reason)
    "from another user": (
        "alice",
        lambda: envelope("bob@acme.example", "zed@globex.example"),
        403,
        "sender_mismatch",
    ),
    "from another org": (
        "alice",
        lambda: envelope("alice@globex.example", "bob@acme.example"),
        403,
        "sender_mismatch",
    ),
    "over the group's size": (
        "alice",
        lambda: envelope("alice@acme.example", "zed@globex.example", size=1001),
        403,
        "too_large",
    ),
    "ttl under the minimum": (
        "alice",
        lambda: envelope("alice@acme.example", "zed@globex.example", ttl_ms=59_000),
        403,
        "ttl_out_of_bounds",
    ),
    "ttl a second over the maximum": (
        "alice",
        lambda: envelope("alice@acme.example", "bob@acme.example", ttl_ms=86_401_000),
        403,
        "ttl_out_of_bounds",
    ),
    "burn-on-read missing where required": (
        "erin",
        lambda: envelope("erin@acme.example", "zed@globex.example"),
        403,
        "burn_on_read_required",
    ),
    "a segmented group to a peer": (
        "carol",
        lambda: envelope("carol@acme.example", "zed@globex.example"),
        403,
        "peer_not_allowed",
    ),
    "a peer the group may not reach": (
        "alice",
        lambda: envelope("alice@acme.example", "zed@initech.example"),
        403,
        "peer_not_allowed",
    ),
    "an org that is no peer": (
        "alice",
        lambda: envelope("alice@acme.example", "zed@umbrella.example"),
        403,
        "unknown_peer",
    ),
    "an unknown local recipient": (
        "alice",
        lambda: envelope("alice@acme.example", "nobody@acme.example"),
        403,
        "recipient_unknown",
    ),
    "expired": (
        "alice",
        lambda: envelope("alice@acme.example", "bob@acme.example", created=NOW_MS - 2 * HOUR_MS),
        400,
        "expired",
    ),
    "created in the future": (
        "alice",
        lambda: envelope("alice@acme.example", "bob@acme.example", created=NOW_MS + HOUR_MS),
        400,
        "envelope_bad_time",
    ),
}

RULE_LINES = {
    "too_large": "max_envelope_bytes: 1000",
    "ttl_out_of_bounds": "ttl: {min: 1m",
    "burn_on_read_required": "burn_on_read: required",
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
async def test_each_refusal_has_its_reason_and_stores_nothing(gw: Gateway, case: str) -> None:
    user, make, status, reason = REFUSALS[case]
    env = make()
    before = sample("gateway_clientapi_submissions_total", result=reason)
    answer = await gw.submit(user, env)
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert body["error"] == reason
    if reason in RULE_LINES:
        assert body["rule"] == f"rules.yaml:{line_of(gw.rules_text, RULE_LINES[reason])}"
    await gw.assert_nothing_stored(env)
    assert gw.spooled == []
    assert sample("gateway_clientapi_submissions_total", result=reason) == before + 1


async def test_the_ttl_is_judged_in_whole_seconds_rounded_down_like_a_receiver(
    gw: Gateway,
) -> None:
    just_under_a_minute = envelope("alice@acme.example", "bob@acme.example", ttl_ms=59_999)
    answer = await gw.submit("alice", just_under_a_minute)
    assert answer.json()["error"] == "ttl_out_of_bounds"
    within_the_last_second = envelope("alice@acme.example", "bob@acme.example", ttl_ms=86_400_999)
    assert (await gw.submit("alice", within_the_last_second)).status_code == 202


async def test_policy_denials_are_counted_by_direction_and_reason(gw: Gateway) -> None:
    labels = {"direction": "outbound", "reason": "too_large"}
    before = sample("gateway_policy_denials_total", **labels)
    env = envelope("alice@acme.example", "zed@globex.example", size=5000)
    assert (await gw.submit("alice", env)).status_code == 403
    assert sample("gateway_policy_denials_total", **labels) == before + 1


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "envelope_malformed"),
        (b"{}", "envelope_malformed"),
        (b'{"v": 3}', "envelope_bad_version"),
        (b"[]", "envelope_malformed"),
    ],
)
async def test_a_malformed_envelope_is_400_with_its_reason(
    gw: Gateway, body: bytes, reason: str
) -> None:
    answer = await gw.client.post("/v1/envelopes", content=body, headers=gw.auth("alice"))
    assert answer.status_code == 400
    assert answer.json()["error"] == reason
    assert await gw.spooled_ids() == []
    assert await gw.mailbox("bob") == []


async def test_a_retry_with_the_same_id_is_answered_again_and_stored_once(gw: Gateway) -> None:
    local = envelope("alice@acme.example", "bob@acme.example")
    remote = envelope("alice@acme.example", "zed@globex.example")
    for env, status in ((local, "delivered"), (remote, "queued")):
        for _ in range(2):
            answer = await gw.submit("alice", env)
            assert answer.status_code == 202
            assert answer.json() == {"id": env.id, "status": status}
    assert await gw.mailbox("bob") == [local.id]
    assert await gw.spooled_ids() == [remote.id]
    assert gw.spooled == [GLOBEX]  # woken for the envelope spooled now, not for the retry


async def test_an_id_another_user_holds_is_a_conflict_that_reveals_nothing(gw: Gateway) -> None:
    alices = envelope("alice@acme.example", "bob@acme.example")
    assert (await gw.submit("alice", alices)).status_code == 202
    bobs = envelope("bob@acme.example", "alice@acme.example", envelope_id=alices.id)
    answer = await gw.submit("bob", bobs)
    assert answer.status_code == 409
    assert answer.json()["error"] == "envelope_id_conflict"
    assert "delivered" not in answer.text
    assert await gw.mailbox("alice") == []


# -- batches -------------------------------------------------------------------------------------
async def test_a_batch_answers_each_envelope_in_order_with_at_most_two_commits(
    gw: Gateway,
) -> None:
    local = [envelope("alice@acme.example", "bob@acme.example") for _ in range(20)]
    remote = [envelope("alice@acme.example", f"u{i}@globex.example") for i in range(20)]
    too_large = envelope("alice@acme.example", "bob@acme.example", size=2000)
    not_mine = envelope("bob@acme.example", "alice@acme.example")
    items: list[object] = [
        *(e.to_json() for e in local[:10]),
        too_large.to_json(),
        *(e.to_json() for e in remote),
        {"v": 1, "id": "x"},
        not_mine.to_json(),
        *(e.to_json() for e in local[10:]),
        local[0].to_json(),  # the same envelope twice in one batch
    ]
    commits = gw.store.commits
    answer = await gw.client.post(
        "/v1/envelopes/batch", json={"envelopes": items}, headers=gw.auth("alice")
    )
    assert answer.status_code == 200
    results = answer.json()["results"]
    assert len(results) == len(items)
    assert gw.store.commits - commits <= 2  # one for the mailboxes, one for the spool
    expected: list[object] = [
        *({"id": e.id, "status": "delivered"} for e in local[:10]),
        {"id": too_large.id, "error": "too_large", "rule": results[10].get("rule")},
        *({"id": e.id, "status": "queued"} for e in remote),
    ]
    assert results[: len(expected)] == expected
    assert results[10]["rule"] == f"rules.yaml:{line_of(gw.rules_text, 'max_envelope_bytes')}"
    malformed = results[len(expected)]
    assert malformed["id"] == "x"
    assert malformed["error"] == "envelope_malformed"
    assert results[len(expected) + 1] == {
        "id": not_mine.id,
        "error": "sender_mismatch",
        "message": results[len(expected) + 1]["message"],
    }
    assert results[len(expected) + 2 :] == [
        *({"id": e.id, "status": "delivered"} for e in local[10:]),
        {"id": local[0].id, "status": "delivered"},
    ]
    assert sorted(await gw.mailbox("bob")) == sorted(e.id for e in local)
    assert sorted(await gw.spooled_ids()) == sorted(e.id for e in remote)
    assert gw.spooled == [GLOBEX]
    await gw.assert_nothing_stored(too_large)
    await gw.assert_nothing_stored(not_mine)


@pytest.mark.parametrize(
    "body",
    [
        {"envelopes": []},
        {"envelopes": "nope"},
        {"envelopes": [{}] * (MAX_BATCH_ENVELOPES + 1)},
        {"envelopes": [], "extra": 1},
        [],
    ],
)
async def test_a_batch_out_of_bounds_is_refused_whole(gw: Gateway, body: object) -> None:
    answer = await gw.client.post("/v1/envelopes/batch", json=body, headers=gw.auth("alice"))
    assert answer.status_code == 400
    assert answer.json()["error"] == "protocol_error"


async def test_a_full_batch_is_accepted(gw: Gateway) -> None:
    batch = [
        envelope("alice@acme.example", "zed@globex.example") for _ in range(MAX_BATCH_ENVELOPES)
    ]
    answer = await gw.client.post(
        "/v1/envelopes/batch",
        json={"envelopes": [e.to_json() for e in batch]},
        headers=gw.auth("alice"),
    )
    assert answer.status_code == 200
    assert {r["status"] for r in answer.json()["results"]} == {"queued"}
    assert len(await gw.spooled_ids()) == MAX_BATCH_ENVELOPES


# -- mailbox -------------------------------------------------------------------------------------
async def test_fetch_returns_oldest_first_within_the_limit_and_never_the_expired(
    gw: Gateway,
) -> None:
    sent = [envelope("alice@acme.example", "bob@acme.example") for _ in range(5)]
    for env in sent:
        assert (await gw.submit("alice", env)).status_code == 202
    answer = await gw.client.get("/v1/mailbox?limit=3", headers=gw.auth("bob"))
    assert answer.status_code == 200
    assert [e["id"] for e in answer.json()["envelopes"]] == [e.id for e in sent[:3]]
    got = Envelope.from_json(answer.json()["envelopes"][0])
    assert got == sent[0].with_group("engineering")

    # An envelope past its expiry that the sweeper has not removed yet is not handed out.
    stale = envelope("zed@globex.example", "bob@acme.example", created=NOW_MS - HOUR_MS)
    outcome = await gw.store.mailbox_put_local([record_of(stale)], at_ms=NOW_MS)
    assert outcome.stored == (stale.id,)
    answer = await gw.client.get("/v1/mailbox", headers=gw.auth("bob"))
    assert [e["id"] for e in answer.json()["envelopes"]] == [e.id for e in sent]
    # Only bob's own mailbox is ever visible.
    other = await gw.client.get("/v1/mailbox", headers=gw.auth("alice"))
    assert other.json() == {"envelopes": []}


@pytest.mark.parametrize(
    "query",
    ["wait=61", "wait=-1", "wait=abc", "limit=0", "limit=501", "limit=1&limit=2", "limt=5", "x"],
)
async def test_mailbox_query_out_of_bounds_is_400(gw: Gateway, query: str) -> None:
    answer = await gw.client.get(f"/v1/mailbox?{query}", headers=gw.auth("bob"))
    assert answer.status_code == 400
    assert answer.json()["error"] == "protocol_error"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/me"),
        ("POST", "/v1/envelopes"),
        ("POST", "/v1/envelopes/batch"),
        ("POST", "/v1/mailbox/ack"),
        ("GET", "/v1/status/Y0VQNSb3qOmpkGlnGVxvfg"),
        ("PUT", "/v1/keys"),
        ("GET", "/v1/keys/bob@acme.example"),
        ("GET", "/v1/orgs/acme.example"),
    ],
)
async def test_a_query_parameter_an_endpoint_does_not_take_is_400(
    gw: Gateway, method: str, path: str
) -> None:
    env = envelope("alice@acme.example", "bob@acme.example")
    answer = await gw.client.request(
        method, f"{path}?debug=1", content=encode_envelope(env), headers=gw.auth("alice")
    )
    assert answer.status_code == 400
    assert answer.json()["error"] == "protocol_error"
    assert "'debug'" in answer.json()["message"]
    await gw.assert_nothing_stored(env)
    # The token is checked first: a stranger learns nothing about the endpoint.
    anonymous = await gw.client.request(method, f"{path}?debug=1")
    assert anonymous.status_code == 401


async def test_ack_deletes_only_the_callers_envelopes(gw: Gateway) -> None:
    to_bob = [envelope("alice@acme.example", "bob@acme.example") for _ in range(3)]
    to_alice = envelope("bob@acme.example", "alice@acme.example")
    for env in to_bob:
        await gw.submit("alice", env)
    await gw.submit("bob", to_alice)

    answer = await gw.client.post(
        "/v1/mailbox/ack",
        json={"ids": [to_bob[0].id, to_bob[1].id, to_bob[0].id, to_alice.id]},
        headers=gw.auth("bob"),
    )
    assert answer.status_code == 200
    assert answer.json() == {"deleted": 2}  # alice's envelope is not bob's to delete
    assert await gw.mailbox("bob") == [to_bob[2].id]
    assert await gw.mailbox("alice") == [to_alice.id]
    again = await gw.client.post(
        "/v1/mailbox/ack", json={"ids": [to_bob[0].id]}, headers=gw.auth("bob")
    )
    assert again.json() == {"deleted": 0}


@pytest.mark.parametrize(
    "body", [{"ids": "x"}, {"ids": ["not an id"]}, {"ids": [1]}, {"id": []}, {"ids": ["A"] * 501}]
)
async def test_a_bad_ack_is_400(gw: Gateway, body: object) -> None:
    answer = await gw.client.post("/v1/mailbox/ack", json=body, headers=gw.auth("bob"))
    assert answer.status_code == 400


def database_bytes(gw: Gateway) -> bytes:
    """The SQLite file, its journals and its segment files, as they are on disk now."""
    files = [p for p in gw.rules_path.parent.iterdir() if p.name.startswith("gateway.sqlite3")]
    assert files
    files = [f for p in files for f in (sorted(p.iterdir()) if p.is_dir() else [p])]
    return b"".join(path.read_bytes() for path in files)


@pytest.mark.parametrize("size", [600, 800])
async def test_a_burn_on_read_envelope_is_gone_for_good_after_ack(gw: Gateway, size: int) -> None:
    env = envelope("alice@acme.example", "bob@acme.example", burn_on_read=True, size=size)
    # The envelope is stored as JSON: its ciphertext as base64url text.
    needle = b64url_encode(env.ciphertext)[:64].encode("ascii")
    assert (await gw.submit("alice", env)).status_code == 202
    assert needle in database_bytes(gw)  # the search below can see it
    segments = gw.rules_path.parent / "gateway.sqlite3.segments"
    in_segment = any(needle in part.read_bytes() for part in segments.iterdir())
    assert in_segment == (size > SEGMENT_AT_SIZE)
    fetched = await gw.client.get("/v1/mailbox", headers=gw.auth("bob"))
    (got,) = fetched.json()["envelopes"]
    assert got["burn_on_read"] is True
    answer = await gw.client.post("/v1/mailbox/ack", json={"ids": [env.id]}, headers=gw.auth("bob"))
    assert answer.json() == {"deleted": 1}
    assert (await gw.client.get("/v1/mailbox", headers=gw.auth("bob"))).json() == {"envelopes": []}
    # Gone from the database's files too, once the journal is checkpointed.
    assert await gw.store.scrub()
    assert needle not in database_bytes(gw)


# -- statuses ------------------------------------------------------------------------------------
async def test_a_status_is_visible_to_its_sender_only(gw: Gateway) -> None:
    env = envelope("alice@acme.example", "zed@globex.example")
    await gw.submit("alice", env)
    answer = await gw.client.get(f"/v1/status/{env.id}", headers=gw.auth("alice"))
    assert answer.status_code == 200
    assert answer.json() == {"id": env.id, "status": "queued", "at": NOW_MS}
    for user in ("bob", "carol"):
        other = await gw.client.get(f"/v1/status/{env.id}", headers=gw.auth(user))
        assert other.status_code == 404
        assert other.json() == {"error": "not_found"}
    unknown = await gw.client.get(f"/v1/status/{new_envelope_id()}", headers=gw.auth("alice"))
    assert unknown.status_code == 404
    garbage = await gw.client.get("/v1/status/not-an-id", headers=gw.auth("alice"))
    assert garbage.status_code == 400
    assert garbage.json()["error"] == "envelope_bad_id"


# -- long-poll ----------------------------------------------------------------------------------
async def test_a_long_poll_is_woken_by_an_arrival_long_before_its_wait(gw: Gateway) -> None:
    env = envelope("alice@acme.example", "bob@acme.example")
    answers: list[httpx.Response] = []

    async def poll() -> None:
        answers.append(await gw.client.get("/v1/mailbox?wait=30", headers=gw.auth("bob")))

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll)
        while gw.waiters.watchers("bob@acme.example") == 0:
            await trio.testing.wait_all_tasks_blocked(cushion=0.001)
        async with httpx.AsyncClient(base_url=gw.client.base_url, timeout=HTTP_TIMEOUT) as other:
            answer = await other.post(
                "/v1/envelopes", content=encode_envelope(env), headers=gw.auth("alice")
            )
        assert answer.status_code == 202
    elapsed = trio.current_time() - start
    assert elapsed < 5, elapsed
    (polled,) = answers
    assert polled.status_code == 200
    assert [e["id"] for e in polled.json()["envelopes"]] == [env.id]
    assert gw.waiters.watched_users == 0


async def test_a_long_poll_is_woken_by_a_federation_delivery(gw: Gateway) -> None:
    env = envelope("zed@globex.example", "bob@acme.example").with_group("partners")
    answers: list[httpx.Response] = []

    async def poll() -> None:
        answers.append(await gw.client.get("/v1/mailbox?wait=30", headers=gw.auth("bob")))

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll)
        while gw.waiters.watchers("bob@acme.example") == 0:
            await trio.testing.wait_all_tasks_blocked(cushion=0.001)
        # What the federation receiver does: one durable commit, then notify.
        outcome = await gw.store.deliver(
            GLOBEX, "txn-1", b"\x00" * 32, {env.id: "accepted"}, [record_of(env)], at_ms=NOW_MS
        )
        gw.waiters.notify(outcome.recipients)
    assert trio.current_time() - start < 5
    assert [e["id"] for e in answers[0].json()["envelopes"]] == [env.id]


async def test_a_long_poll_returns_empty_at_its_timeout(
    gw: Gateway, autojump_clock: trio.testing.MockClock
) -> None:
    # No client timeout: on the autojump clock any other deadline would be jumped to
    # while the server waits for its storage threads.
    async with httpx.AsyncClient(base_url=gw.client.base_url, timeout=None) as client:
        start = trio.current_time()
        answer = await client.get("/v1/mailbox?wait=30", headers=gw.auth("bob"))
        elapsed = trio.current_time() - start
    assert answer.status_code == 200
    assert answer.json() == {"envelopes": []}
    assert 30 <= elapsed < 31, elapsed
    assert gw.waiters.watched_users == 0


async def test_a_wait_past_the_gateways_long_poll_max_is_held_that_long_at_most(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # limits.long_poll_max: 5s. A client may still ask for any wait the protocol
    # allows (docs/openapi.yaml: 0-60); it gets an answer after 5 s, not a 400.
    async for gw in _start(tmp_path, ssl_context=None, client_verify=None, max_wait_seconds=5):
        async with httpx.AsyncClient(base_url=gw.client.base_url, timeout=None) as client:
            start = trio.current_time()
            answer = await client.get("/v1/mailbox?wait=60", headers=gw.auth("bob"))
            elapsed = trio.current_time() - start
        assert (answer.status_code, answer.json()) == (200, {"envelopes": []})
        assert 5 <= elapsed < 6, elapsed
        refused = await gw.client.get("/v1/mailbox?wait=61", headers=gw.auth("bob"))
        assert refused.status_code == 400


async def test_wait_zero_answers_at_once(gw: Gateway) -> None:
    answer = await gw.client.get("/v1/mailbox?wait=0", headers=gw.auth("bob"))
    assert answer.json() == {"envelopes": []}
    assert gw.waiters.watched_users == 0


# -- the waiting primitive, on the virtual clock -----------------------------------------------
async def test_waiters_wake_on_notify_and_time_out_at_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    waiters = MailboxWaiters()
    woken_at: dict[str, float] = {}

    async def wait(user: str) -> None:
        with waiters.watch(user) as watch:
            start = trio.current_time()
            woke = await watch.wait_until(start + 30)
            woken_at[user] = trio.current_time() - start if woke else -1.0

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait, "bob@acme.example")
        nursery.start_soon(wait, "carol@acme.example")
        await trio.sleep(1)
        waiters.notify(["bob@acme.example", "nobody@acme.example"])
    assert woken_at == {"bob@acme.example": 1.0, "carol@acme.example": -1.0}
    assert waiters.watched_users == 0


async def test_a_notify_between_watch_and_wait_is_not_lost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    waiters = MailboxWaiters()
    with waiters.watch("bob@acme.example") as watch:
        waiters.notify(["bob@acme.example"])  # the arrival lands before the wait begins
        start = trio.current_time()
        assert await watch.wait_until(start + 30)
        assert trio.current_time() == start
    # A watch taken after the notify waits for the next one.
    with waiters.watch("bob@acme.example") as later:
        assert not later.woken


async def test_waiters_are_bounded_per_user_and_closed_for_shutdown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    waiters = MailboxWaiters(max_watches_per_user=2)
    with waiters.watch("bob@acme.example"), waiters.watch("bob@acme.example"):
        with pytest.raises(TooManyWatches), waiters.watch("bob@acme.example"):
            pass
        with waiters.watch("carol@acme.example"):
            assert waiters.watchers("bob@acme.example") == 2
    assert waiters.watched_users == 0

    results: list[bool] = []

    async def wait() -> None:
        with waiters.watch("bob@acme.example") as watch:
            results.append(await watch.wait_until(trio.current_time() + 30))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.sleep(2)
        waiters.close()
    assert results == [True]
    with waiters.watch("bob@acme.example") as watch:
        assert watch.woken  # after close, every wait ends at once


async def test_a_closed_gateway_answers_long_polls_at_once(
    gw: Gateway, autojump_clock: trio.testing.MockClock
) -> None:
    gw.waiters.close()
    async with httpx.AsyncClient(base_url=gw.client.base_url, timeout=None) as client:
        start = trio.current_time()
        answer = await client.get("/v1/mailbox?wait=30", headers=gw.auth("bob"))
    assert answer.json() == {"envelopes": []}
    assert trio.current_time() - start < 1


# -- key records ---------------------------------------------------------------------------------
async def test_published_keys_come_back_signed_by_the_org(gw: Gateway) -> None:
    keys = UserKeys.generate(Address.of("alice", ORG)).public()
    answer = await gw.client.put("/v1/keys", json=keys.to_json(), headers=gw.auth("alice"))
    assert answer.status_code == 200
    org_key = bytes(SigningKey(gw.org_seed).verify_key)
    assert verify_key_record(answer.content, org_verify_key=org_key, expected_address=keys.address)
    assert answer.json()["issued"] == NOW_MS

    looked_up = await gw.client.get("/v1/keys/alice@acme.example", headers=gw.auth("bob"))
    assert looked_up.status_code == 200
    assert looked_up.content == answer.content
    assert (
        verify_key_record(looked_up.content, org_verify_key=org_key, expected_address=keys.address)
        == keys
    )
    # Republishing replaces the record.
    newer = UserKeys.generate(keys.address).public()
    await gw.client.put("/v1/keys", json=newer.to_json(), headers=gw.auth("alice"))
    again = await gw.client.get("/v1/keys/alice@acme.example", headers=gw.auth("bob"))
    assert verify_key_record(again.content, org_verify_key=org_key, expected_address=newer.address)
    assert (
        verify_key_record(again.content, org_verify_key=org_key, expected_address=newer.address)
        == newer
    )


async def test_keys_can_be_published_for_oneself_only(gw: Gateway) -> None:
    bobs = UserKeys.generate(Address.of("bob", ORG)).public()
    answer = await gw.client.put("/v1/keys", json=bobs.to_json(), headers=gw.auth("alice"))
    assert answer.status_code == 403
    assert answer.json()["error"] == "forbidden"
    assert await gw.store.user_keys_get("bob@acme.example") is None
    bad = await gw.client.put(
        "/v1/keys", json={"address": "alice@acme.example"}, headers=gw.auth("alice")
    )
    assert bad.status_code == 400
    assert bad.json()["error"] == "key_record_malformed"


async def test_local_key_lookups_that_find_nothing_are_404(gw: Gateway) -> None:
    for address in ("bob@acme.example", "mallory@acme.example"):
        answer = await gw.client.get(f"/v1/keys/{address}", headers=gw.auth("alice"))
        assert answer.status_code == 404
        assert answer.json() == {"error": "not_found"}
    garbage = await gw.client.get("/v1/keys/not-an-address", headers=gw.auth("alice"))
    assert garbage.status_code == 400
    assert garbage.json()["error"].startswith("address_")


@pytest.mark.parametrize(
    ("path", "reason", "normal"),
    [
        ("/v1/keys/Alice@acme.example", "address_malformed", "alice@acme.example"),
        ("/v1/keys/alice@ACME.example", "address_malformed", "alice@acme.example"),
        ("/v1/keys/alice@acme.example.", "address_malformed", "alice@acme.example"),
        ("/v1/orgs/ACME.example", "address_bad_domain", "acme.example"),
        ("/v1/orgs/globex.example.", "address_bad_domain", "globex.example"),
    ],
)
async def test_addresses_and_orgs_in_paths_must_be_in_normal_form(
    gw: Gateway, path: str, reason: str, normal: str
) -> None:
    # One resource, one URL: a spelling that would fold to another is refused, saying which.
    answer = await gw.client.get(path, headers=gw.auth("alice"))
    assert answer.status_code == 400
    assert answer.json()["error"] == reason
    assert f"(use {normal})" in answer.json()["message"]
    assert gw.lookups == []


async def test_a_peers_key_record_is_fetched_and_checked_against_its_pinned_key(
    gw: Gateway,
) -> None:
    zed = UserKeys.generate(Address.of("zed", GLOBEX)).public()
    record = sign_key_record(zed, org_signing_seed=gw.globex_seed, issued_ms=NOW_MS - 5)
    gw.remote_records["zed@globex.example"] = record.encode()
    answer = await gw.client.get("/v1/keys/zed@globex.example", headers=gw.auth("alice"))
    assert answer.status_code == 200
    globex_key = bytes(SigningKey(gw.globex_seed).verify_key)
    assert verify_key_record(
        answer.content, org_verify_key=globex_key, expected_address=zed.address
    )
    assert gw.lookups == [zed.address]

    # Signed by anyone but globex's pinned key: refused, never passed on.
    forged = sign_key_record(zed, org_signing_seed=gw.org_seed, issued_ms=NOW_MS)
    gw.remote_records["zed@globex.example"] = forged.encode()
    refused = await gw.client.get("/v1/keys/zed@globex.example", headers=gw.auth("alice"))
    assert refused.status_code == 502
    assert refused.json() == {"error": "key_record_invalid"}
    with pytest.raises(KeyRecordError):
        verify_key_record(forged.encode(), org_verify_key=globex_key, expected_address=zed.address)

    # A genuine record for someone else, served for zed: refused.
    yan = UserKeys.generate(Address.of("yan", GLOBEX)).public()
    swapped = sign_key_record(yan, org_signing_seed=gw.globex_seed, issued_ms=NOW_MS)
    gw.remote_records["zed@globex.example"] = swapped.encode()
    assert (
        await gw.client.get("/v1/keys/zed@globex.example", headers=gw.auth("alice"))
    ).status_code == 502


async def test_remote_key_lookup_failures(gw: Gateway) -> None:
    gw.remote_records["nobody@globex.example"] = None
    gw.remote_records["down@globex.example"] = PeerAuthError("peer unreachable")
    cases = {
        "nobody@globex.example": (404, "not_found"),
        "down@globex.example": (502, "peer_unavailable"),
        "zed@umbrella.example": (404, "unknown_peer"),
    }
    for address, (status, reason) in cases.items():
        answer = await gw.client.get(f"/v1/keys/{address}", headers=gw.auth("alice"))
        assert answer.status_code == status, address
        assert answer.json() == {"error": reason}
    # An org that is no peer is never asked.
    assert [str(a) for a in gw.lookups] == ["nobody@globex.example", "down@globex.example"]


async def test_put_keys_refuses_an_oversized_body(gw: Gateway) -> None:
    answer = await gw.client.put("/v1/keys", content=b" " * 20_000, headers=gw.auth("alice"))
    assert answer.status_code == 413


# -- over TLS ------------------------------------------------------------------------------------
async def test_the_api_over_tls_with_the_client_api_certificate(
    tmp_path: Path, tls_files: tuple[Path, Path, bytes]
) -> None:
    cert, key, ca_pem = tls_files
    server_context = client_api_server_context(cert_file=cert, key_file=key)
    client_context = ssl.create_default_context(cadata=ca_pem.decode("ascii"))
    async for gateway in _start(tmp_path, ssl_context=server_context, client_verify=client_context):
        assert str(gateway.client.base_url).startswith("https://")
        answer = await gateway.client.get("/v1/me", headers=gateway.auth("alice"))
        assert answer.status_code == 200
        assert answer.json()["address"] == "alice@acme.example"
        env = envelope("alice@acme.example", "bob@acme.example")
        assert (await gateway.submit("alice", env)).status_code == 202


# -- the OpenAPI file describes what the server really answers ---------------------------------
OPENAPI = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"


@pytest.fixture(scope="module")
def openapi() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(OPENAPI.read_text())
    assert document["openapi"].startswith("3.1")
    return document


def conforms(openapi: dict[str, Any], path: str, method: str, status: int, body: object) -> None:
    """Validate ``body`` against the documented response schema (refs resolved in the file)."""
    response = openapi["paths"][path][method]["responses"][str(status)]
    if "$ref" in response:
        response = openapi["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    schema = response["content"]["application/json"]["schema"]
    registry: Registry[Any] = Registry().with_resource(
        "urn:openapi", DRAFT202012.create_resource(openapi)
    )
    pointer = _pointer(openapi, schema)
    Draft202012Validator({"$ref": "urn:openapi#" + pointer}, registry=registry).validate(body)


def _pointer(openapi: dict[str, Any], schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        return str(schema["$ref"]).removeprefix("#")
    # An inline schema: find where it sits in the document.
    for path, operations in openapi["paths"].items():
        for method, operation in operations.items():
            for status, response in operation.get("responses", {}).items():
                content = response.get("content", {}).get("application/json", {})
                if content.get("schema") is schema:
                    escaped = path.replace("~", "~0").replace("/", "~1")
                    return (
                        f"/paths/{escaped}/{method}/responses/{status}"
                        "/content/application~1json/schema"
                    )
    raise AssertionError("schema not found in the document")


async def test_answers_match_the_openapi_file(gw: Gateway, openapi: dict[str, Any]) -> None:
    me = await gw.client.get("/v1/me", headers=gw.auth("alice"))
    conforms(openapi, "/v1/me", "get", 200, me.json())

    env = envelope("alice@acme.example", "bob@acme.example")
    submitted = await gw.submit("alice", env)
    conforms(openapi, "/v1/envelopes", "post", 202, submitted.json())
    too_large = await gw.submit(
        "alice", envelope("alice@acme.example", "bob@acme.example", size=5000)
    )
    conforms(openapi, "/v1/envelopes", "post", 403, too_large.json())

    batch = await gw.client.post(
        "/v1/envelopes/batch",
        json={"envelopes": [envelope("alice@acme.example", "z@globex.example").to_json(), {}]},
        headers=gw.auth("alice"),
    )
    conforms(openapi, "/v1/envelopes/batch", "post", 200, batch.json())

    mailbox = await gw.client.get("/v1/mailbox?limit=5", headers=gw.auth("bob"))
    conforms(openapi, "/v1/mailbox", "get", 200, mailbox.json())
    ack = await gw.client.post("/v1/mailbox/ack", json={"ids": [env.id]}, headers=gw.auth("bob"))
    conforms(openapi, "/v1/mailbox/ack", "post", 200, ack.json())

    status = await gw.client.get(f"/v1/status/{env.id}", headers=gw.auth("alice"))
    conforms(openapi, "/v1/status/{id}", "get", 200, status.json())

    keys = UserKeys.generate(Address.of("alice", ORG)).public()
    record = await gw.client.put("/v1/keys", json=keys.to_json(), headers=gw.auth("alice"))
    conforms(openapi, "/v1/keys", "put", 200, record.json())
    looked_up = await gw.client.get("/v1/keys/alice@acme.example", headers=gw.auth("bob"))
    conforms(openapi, "/v1/keys/{address}", "get", 200, looked_up.json())

    refused = await gw.client.get("/v1/me")
    conforms(openapi, "/v1/me", "get", 401, refused.json())
