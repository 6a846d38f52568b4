"""``gateway demo``: two orgs on loopback, the whole product in one narrated run.

Theory of operation
-------------------
Everything happens for real, in a temporary directory: two orgs are set up
as an admin would (``gateway init``'s code, peer cards pasted into rules, see
:mod:`gateway.devnet`), both gateways run as ``gateway run`` processes talking
mTLS to each other, and three users run the reference client
(:mod:`gateway.client.reference`) in this process with their own keys. The
script:

1. sets up acme.example and globex.example, exchanges their peer cards and
   writes rules: engineering at acme (alice) may talk with partners at globex
   (bob); legal at acme (carol) is segmented;
2. starts both gateways, issues tokens, generates and publishes keys;
3. alice writes to bob (bob's keys fetched by acme from globex, checked
   against globex's org key pinned in acme's rules); bob reads it and
   answers; alice reads the answer;
4. carol tries to write to bob and is refused by acme's rules, with the
   reason and the rule shown;
5. alice sends a burn-on-read message; bob reads it, and a second fetch
   shows it is gone;
6. stops the gateways, then searches every file of both orgs' directories
   (config, keys, data) and both logs for the exact UTF-8 bytes of every
   message text (:func:`find_plaintext`), with a positive control to show
   the search does read the database.

Every step checks that what it narrates happened; the first one that did not
raises :class:`DemoFailed`, and the demo exits 1. Processes are stopped and
the directory removed in every case, also on Ctrl-C (``KeyboardInterrupt``
unwinds through ``DevNet.close``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TextIO

import trio

from gateway.client.api import ClientAPIError, ClientSession
from gateway.client.contacts import ContactBook
from gateway.client.reference import Received, ReferenceClient
from gateway.core.address import Address
from gateway.core.keytext import format_retention_key
from gateway.crypto.keys import UserKeys
from gateway.crypto.retention_keys import RetentionKeyPair
from gateway.devnet import DevNet, DevOrg, gateway_command

ACME: Final = "acme.example"
GLOBEX: Final = "globex.example"
HELLO: Final = "Hi Bob, the prototype schematics are ready for your review."
REPLY: Final = "Thanks Alice! I will go through them this afternoon."
SEGMENTED: Final = "Bob, could you send me the draft of the partnership contract?"
BURN: Final = "The door code for Friday's workshop is 4815. Forget it after reading."
MESSAGES: Final = (HELLO, REPLY, SEGMENTED, BURN)

#: Longest wait for a message to cross from one org to the other.
DELIVERY_TIMEOUT: Final = 30.0
#: Longest long-poll per fetch while waiting for a message.
POLL_SECONDS: Final = 5
STATUS_POLL_INTERVAL: Final = 0.05
SEARCH_CHUNK_BYTES: Final = 1024 * 1024
CLIENT_TIMEOUT: Final = 15.0


class DemoFailed(Exception):
    """A step did not happen as narrated."""


# -- the plaintext search (pure enough to test on its own) ----------------------------------
@dataclass(frozen=True, slots=True)
class PlaintextHit:
    path: Path
    text: str


@dataclass(frozen=True, slots=True)
class SearchReport:
    files: int
    bytes: int
    hits: tuple[PlaintextHit, ...] = field(default=())


def _files_under(root: Path) -> Iterator[Path]:
    """Every regular file at or under ``root``; symbolic links are not followed."""
    try:
        mode = root.lstat().st_mode
    except FileNotFoundError:
        return
    if stat.S_ISREG(mode):
        yield root
        return
    if not stat.S_ISDIR(mode):
        return
    for directory, _dirs, names in os.walk(root, followlinks=False):
        for name in sorted(names):
            path = Path(directory) / name
            if stat.S_ISREG(path.lstat().st_mode):
                yield path


def find_plaintext(roots: Iterable[Path], texts: Iterable[str]) -> SearchReport:
    """Search every file under ``roots`` for the exact UTF-8 bytes of each of ``texts``.

    Case-sensitive, byte for byte; files are read in chunks with an overlap
    as long as the longest text, so a text split across two chunks is found.
    """
    needles = {text: text.encode("utf-8") for text in texts}
    if not needles or not all(needles.values()):
        raise ValueError("find_plaintext needs at least one non-empty text")
    overlap = max(len(needle) for needle in needles.values()) - 1
    files = size = 0
    hits: list[PlaintextHit] = []
    for root in roots:
        for path in _files_under(root):
            files += 1
            found: set[str] = set()
            tail = b""
            with path.open("rb") as handle:
                while chunk := handle.read(SEARCH_CHUNK_BYTES):
                    size += len(chunk)
                    window = tail + chunk
                    found.update(t for t, needle in needles.items() if needle in window)
                    tail = window[-overlap:] if overlap else b""
            hits.extend(PlaintextHit(path, text) for text in needles if text in found)
    return SearchReport(files, size, tuple(hits))


# -- narration -------------------------------------------------------------------------------
class Narrator:
    def __init__(self, out: TextIO, steps: int) -> None:
        self._out = out
        self._steps = steps
        self._step = 0

    def step(self, title: str) -> None:
        self._step += 1
        self._print(f"\n[{self._step}/{self._steps}] {title}")

    def say(self, text: str) -> None:
        self._print(f"      {text}")

    def ok(self, text: str) -> None:
        self._print(f"   ok {text}")

    def _print(self, text: str) -> None:
        print(text, file=self._out, flush=True)


STEPS: Final = 9
RETENTION_KEY_ID: Final = "acme-demo"


# -- the users -------------------------------------------------------------------------------
@dataclass
class User:
    name: str
    client: ReferenceClient
    session: ClientSession

    @property
    def address(self) -> Address:
        return self.client.address


def _make_user(org: DevOrg, name: str, token: str, clients_dir: Path) -> User:
    address = Address.of(name, org.org)
    keys = UserKeys.generate(address)
    keys_file = clients_dir / f"{name}.keys.json"
    keys.save(keys_file)
    contacts = ContactBook.load(clients_dir / f"{name}.contacts.json")
    session = ClientSession(org.client_url, token, ca_file=org.ca_file, timeout=CLIENT_TIMEOUT)
    return User(name, ReferenceClient(session, keys, contacts), session)


async def _wait_for(user: User, envelope_id: str) -> Received:
    """Read ``user``'s mailbox until ``envelope_id`` arrives; fail after the timeout."""
    with trio.move_on_after(DELIVERY_TIMEOUT):
        while True:
            inbox = await user.client.receive(wait=POLL_SECONDS)
            if inbox.problems:
                raise DemoFailed(f"{user.address} could not open: {inbox.problems[0].message}")
            for message in inbox.messages:
                if message.envelope_id == envelope_id:
                    return message
    raise DemoFailed(f"{envelope_id} did not reach {user.address} in {DELIVERY_TIMEOUT:.0f} s")


async def _wait_for_status(user: User, envelope_id: str, wanted: str) -> None:
    status = None
    with trio.move_on_after(DELIVERY_TIMEOUT):
        while True:
            status = (await user.client.status(envelope_id))["status"]
            if status == wanted:
                return
            await trio.sleep(STATUS_POLL_INTERVAL)  # the API has no status push
    raise DemoFailed(f"{envelope_id} stayed {status}, never {wanted}")


def _expect_text(message: Received, sender: Address, text: str) -> None:
    if message.sender != sender or message.text != text:
        raise DemoFailed(f"{message.envelope_id} did not open to the text {sender} sent")


def _quote(text: str) -> str:
    return f"\u201c{text}\u201d"


# -- the conversation (async: the users' clients) ----------------------------------------------
async def _conversation(
    say: Narrator, acme: DevOrg, globex: DevOrg, tokens: dict[str, str], clients_dir: Path
) -> None:
    alice = _make_user(acme, "alice", tokens["alice"], clients_dir)
    carol = _make_user(acme, "carol", tokens["carol"], clients_dir)
    bob = _make_user(globex, "bob", tokens["bob"], clients_dir)
    async with alice.session, carol.session, bob.session:
        say.step("Users generate their keys and publish them")
        for user in (alice, carol, bob):
            await user.client.publish()
            say.ok(
                f"{user.address}: keys generated on the client; the public half published, "
                f"signed by {user.address.org}'s org key"
            )

        say.step("alice writes to bob at globex.example")
        sent = await alice.client.send(bob.address, HELLO)
        say.say(f"alice: {_quote(HELLO)}")
        say.say(
            "acme fetched bob's key record from globex over mTLS; alice's client checked "
            "globex's signature with the key pinned in acme's rules and remembered bob's keys"
        )
        say.ok(f"sealed for bob and accepted by acme: envelope {sent.envelope_id} ({sent.status})")
        await _wait_for_status(alice, sent.envelope_id, "forwarded")
        say.ok("acme forwarded it to globex over mTLS: status forwarded")
        report = find_plaintext([acme.directory, globex.directory], MESSAGES)
        if report.hits:
            raise DemoFailed(f"plaintext on disk: {report.hits[0].path}")
        if not find_plaintext([globex.directory], [sent.envelope_id]).hits:
            raise DemoFailed("the envelope's id is not in globex's files: the search is blind")
        say.ok(
            f"while it waits in bob's mailbox: its id is in globex's database, its text in none "
            f"of {report.files} files"
        )
        got = await _wait_for(bob, sent.envelope_id)
        _expect_text(got, alice.address, HELLO)
        say.ok(f"bob read it (signature of alice checked, then opened): {_quote(got.text)}")

        say.step("bob answers alice")
        answer = await bob.client.send(alice.address, REPLY)
        say.say(f"bob: {_quote(REPLY)}")
        got = await _wait_for(alice, answer.envelope_id)
        _expect_text(got, bob.address, REPLY)
        say.ok(f"alice read it: {_quote(got.text)}")

        say.step("carol (legal, segmented) tries to write to bob")
        try:
            refused = await carol.client.send(bob.address, SEGMENTED)
        except ClientAPIError as exc:
            if exc.status != 403 or exc.code != "peer_not_allowed":
                raise DemoFailed(f"carol was refused, but not by policy: {exc}") from exc
            say.ok(
                f"denied by acme's gateway: {exc.code}"
                + (f" (rule {exc.rule})" if exc.rule else "")
                + "; nothing was stored or sent"
            )
        else:
            raise DemoFailed(f"carol's message was accepted ({refused.status}): rules not enforced")

        say.step("alice sends a burn-on-read message")
        burn = await alice.client.send(bob.address, BURN, burn_on_read=True)
        got = await _wait_for(bob, burn.envelope_id)
        _expect_text(got, alice.address, BURN)
        if not got.burn_on_read:
            raise DemoFailed("the message arrived without its burn-on-read flag")
        say.ok(f"bob read it once: {_quote(got.text)}")
        again = await bob.session.fetch(wait=0)
        if any(envelope.id == burn.envelope_id for envelope in again):
            raise DemoFailed("the burn-on-read message is still in bob's mailbox")
        say.ok("a second fetch does not return it: deleted for good on acknowledgement")


# -- the whole demo ----------------------------------------------------------------------------
def _rules(acme: DevOrg, globex: DevOrg, retention_key: RetentionKeyPair) -> None:
    acme.write_rules(
        peers=[globex],
        groups={
            "engineering": {
                "members": ["alice"],
                "send_to": [GLOBEX],
                "receive_from": [f"{GLOBEX}/partners"],
                "retention": {"outbound": "required", "keep": "7y"},
            },
            "legal": {"members": ["carol"]},
        },
        retention={
            "key": {
                "id": retention_key.id,
                "public_key": format_retention_key(retention_key.public_key),
            }
        },
    )
    globex.write_rules(
        peers=[acme],
        groups={"partners": {"members": ["bob"], "send_to": [ACME], "receive_from": [ACME]}},
    )


def _demo(net: DevNet, base: Path, say: Narrator) -> None:
    say.step("Two orgs, set up as an admin would, in " + str(base))
    acme, globex = net.add_org(ACME), net.add_org(GLOBEX)
    for org in (acme, globex):
        say.ok(f"gateway init --org {org.org}: a CA, gateway certificates, an org signing key")
    officer = base / "officer"  # the compliance officer's machine, away from the gateways
    officer.mkdir(mode=0o700)
    retention_key = RetentionKeyPair.generate(RETENTION_KEY_ID)
    retention_key.save(officer / f"{RETENTION_KEY_ID}.key")
    say.ok(
        f"gateway retention keygen (offline): acme's retention key {RETENTION_KEY_ID}; "
        "only its public half goes into acme's rules"
    )
    _rules(acme, globex, retention_key)
    say.ok("peer cards exchanged and pasted into each other's rules (CA, pin, signing key)")
    say.say(
        "acme.example: engineering (alice, under retention for 7 years) <-> "
        "globex.example/partners; legal (carol): none"
    )
    say.say("globex.example: partners (bob) <-> acme.example")

    say.step("Both gateways start as real processes, mTLS between them")
    for org in (acme, globex):
        net.start(org.org)
        say.ok(
            f"{org.org}: federation {org.federation}, client API {org.client}, "
            f"metrics {org.metrics}"
        )
    tokens = {"alice": acme.issue_token("alice"), "carol": acme.issue_token("carol")}
    tokens["bob"] = globex.issue_token("bob")
    say.ok("client tokens issued (gateway token issue) for alice, carol and bob")

    clients_dir = base / "clients"
    clients_dir.mkdir(mode=0o700)
    trio.run(_conversation, say, acme, globex, tokens, clients_dir)

    say.step("Proof: the gateways never saw a message text")
    for org in (acme, globex):
        code = net.processes[org.org].stop()
        if code != 0:
            raise DemoFailed(f"{org.org}'s gateway did not stop cleanly (exit {code})")
    say.ok("both gateways stopped cleanly")
    searched = [acme.directory, globex.directory] + [p.log_path for p in net.processes.values()]
    report = find_plaintext(searched, MESSAGES)
    if report.hits:
        hit = report.hits[0]
        raise DemoFailed(f"the text {_quote(hit.text)} is in {hit.path}")
    control = find_plaintext([acme.directory], ["alice@acme.example"])
    if not control.hits:
        raise DemoFailed("alice's address is not found in acme's files: the search is blind")
    say.ok(
        f"searched {report.files} files ({report.bytes:,} bytes: configs, keys, databases with "
        "their journals, both logs) for the exact bytes of the 4 texts: not one found"
    )
    say.ok("control: the same search does find alice's address in acme's database")
    _officer_opens_the_archive(acme, officer, say)


def _officer_opens_the_archive(acme: DevOrg, officer: Path, say: Narrator) -> None:
    say.step("The compliance officer opens acme's archive offline")
    export = officer / "acme-archive.jsonl"
    _gateway("retention", "export", "-c", str(acme.config_path), "--out", str(export))
    say.ok(
        "gateway retention export: acme's archive, signed by acme's org key "
        "(ciphertext only: the gateway holds no retention secret)"
    )
    if find_plaintext([export], MESSAGES).hits:
        raise DemoFailed("the export holds plaintext")
    key_file = officer / f"{RETENTION_KEY_ID}.key"
    opened = _gateway("retention", "open", str(export), "--key", str(key_file))
    messages = [json.loads(line) for line in opened.splitlines()]
    texts = {message["text"] for message in messages}
    if texts != {HELLO, BURN}:
        raise DemoFailed(f"the archive opened to {len(texts)} other text(s) than alice sent")
    say.ok(
        f"gateway retention open --key {key_file.name}: chain and signature checked, "
        f"{len(messages)} messages of alice opened"
    )
    for message in messages:
        say.say(f"{message['from']} -> {message['to']}: {_quote(message['text'])}")
    say.ok(
        "the burn-on-read message is gone from bob's mailbox but kept in the archive: "
        "retention overrides burn-on-read for the archive copy only"
    )


def _gateway(*args: str) -> str:
    done = subprocess.run(
        gateway_command(*args), capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise DemoFailed(f"gateway {args[0]} {args[1]} failed: {done.stderr.strip()}")
    return done.stdout


def run_demo(*, out: TextIO = sys.stdout, keep: Path | None = None) -> int:
    """Run the demo; 0 if everything happened as narrated, 1 otherwise.

    With ``keep``, work there (it must not exist) and leave it for inspection;
    otherwise in a temporary directory that is removed.
    """
    say = Narrator(out, STEPS)
    print(
        "gateway demo: two orgs on loopback, real mTLS, real end-to-end encryption",
        file=out,
        flush=True,
    )
    with contextlib.ExitStack() as stack:
        if keep is None:
            base = Path(tempfile.mkdtemp(prefix="gateway-demo-"))
            stack.callback(shutil.rmtree, base, ignore_errors=True)
        else:
            base = keep
            base.mkdir(mode=0o700, parents=True, exist_ok=False)
        net = stack.enter_context(DevNet(base))  # stops every process, also on Ctrl-C
        try:
            _demo(net, base, say)
        except DemoFailed as exc:
            print(f"\nFAILED: {exc}", file=out, flush=True)
            for name, proc in net.processes.items():
                print(f"--- last lines of {name}'s log ---\n{proc.log_tail(15)}", file=out)
            return 1
    print("\nEverything happened as narrated.", file=out, flush=True)
    return 0
