"""``gateway client``: the reference end-to-end encrypted client, on the command line.

``login`` signs in through the org's IdP with the device flow (it prints a
code and a URL, and waits) and saves the session beside the key file
(``NAME.session.json``, mode 0600, or ``--session``); the other commands use
that session when no token is given, and refresh it when it expires.
``keygen`` makes a user's key file (mode 0600); ``publish`` has the gateway
sign and publish its public half; ``send`` looks up, checks and remembers the
recipient's keys, seals and submits, and prints the envelope id; ``recv``
opens, verifies and acknowledges, one JSON line per message; ``status`` reads
a sent envelope's delivery status. Where to reach the gateway and as whom
comes from ``--server``, ``--token``, ``--keys`` and ``--ca``, or from
``GATEWAY_URL``, ``GATEWAY_TOKEN``, ``GATEWAY_KEYS`` and ``GATEWAY_CA`` (the
environment keeps the token out of ``ps``). See
:mod:`gateway.client.reference` for whom the client trusts for a key.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar

from gateway.cli.common import Registrar, UsageError, set_handler
from gateway.core.address import Address, normalize_domain
from gateway.core.durations import parse_duration
from gateway.core.keytext import parse_signing_key
from gateway.errors import AddressError

if TYPE_CHECKING:
    from gateway.client.api import ClientSession
    from gateway.client.reference import Inbox, ReferenceClient, Sent

ENV_URL: Final = "GATEWAY_URL"
ENV_TOKEN: Final = "GATEWAY_TOKEN"  # noqa: S105 - a variable name, not a token
ENV_KEYS: Final = "GATEWAY_KEYS"
ENV_CA: Final = "GATEWAY_CA"
ENV_SESSION: Final = "GATEWAY_SESSION"
MAX_WAIT_SECONDS: Final = 60  # the client API's longest long-poll
MAX_MESSAGE_BYTES: Final = 64 * 1024  # read from stdin with "-": a chat message, not a file
EXIT_PROBLEMS: Final = 1

_T = TypeVar("_T")


def register(subparsers: Registrar) -> None:
    parser = subparsers.add_parser(
        "client",
        help="the reference end-to-end encrypted client",
        description="Send and receive end-to-end encrypted messages through a gateway's "
        "client API. The gateway never sees the text or the secret keys.",
    )
    commands = parser.add_subparsers(title="client commands", metavar="COMMAND")

    login = commands.add_parser(
        "login",
        help="sign in through the org's identity provider (device flow)",
        description="Ask the gateway for a device code, print the code and the URL where to "
        "enter it (on any device with a browser), wait until the sign-in there is done, and "
        "save the session (mode 0600). Other commands then use it, refreshing it as needed.",
    )
    _common(login, keys=False)
    login.add_argument("--keys", metavar="FILE", help=f"our key file (default: ${ENV_KEYS})")
    login.add_argument(
        "--provider", metavar="NAME", help="the provider in gateway.yaml (needed with several)"
    )
    login.add_argument(
        "--browser",
        action="store_true",
        help="sign in here with a browser (authorization code flow with PKCE and a loopback "
        "redirect) instead of the device flow",
    )
    login.add_argument(
        "--open", action="store_true", help="with --browser: open the URL in the default browser"
    )
    login.add_argument(
        "--idp-ca",
        metavar="FILE",
        help="with --browser: CA of the IdP's certificate (default: the system's CAs)",
    )
    set_handler(login, run_login)

    logout = commands.add_parser(
        "logout",
        help="end the saved session at the gateway and delete its file",
        description="Sign out: the gateway forgets the session, and its file is removed.",
    )
    _common(logout, keys=False)
    logout.add_argument("--keys", metavar="FILE", help=f"our key file (default: ${ENV_KEYS})")
    set_handler(logout, run_logout)

    keygen = commands.add_parser(
        "keygen",
        help="make a user's key file (mode 0600)",
        description="Generate a user's encryption and signing keys into FILE (mode 0600). "
        "Prints the public keys as JSON.",
    )
    keygen.add_argument("--user", required=True, metavar="ADDR", help="alice@acme.example")
    keygen.add_argument("--out", metavar="FILE", help=f"the key file (default: ${ENV_KEYS})")
    keygen.add_argument("--force", action="store_true", help="replace an existing key file")
    set_handler(keygen, run_keygen)

    publish = commands.add_parser(
        "publish",
        help="publish our public keys (the gateway signs them with the org key)",
        description="Publish the public half of --keys; the gateway answers it signed by the "
        "org signing key, which the client checks.",
    )
    _common(publish)
    set_handler(publish, run_publish)

    send = commands.add_parser(
        "send",
        help="send one message; prints the envelope id",
        description="Look up the recipient's key record, check the org's signature and that "
        "the keys are the ones seen before, seal MESSAGE, submit it and print the envelope id.",
    )
    _common(send)
    send.add_argument("--to", required=True, metavar="ADDR", help="bob@globex.example")
    send.add_argument(
        "--ttl", metavar="D", help="lifetime like 15m, 1d (default: the group's default TTL)"
    )
    send.add_argument(
        "--burn-on-read", action="store_true", help="delete it once the recipient has read it"
    )
    send.add_argument("message", metavar="MESSAGE", help='the text ("-" reads it from stdin)')
    set_handler(send, run_send)

    recv = commands.add_parser(
        "recv",
        help="read, verify and acknowledge our messages; one JSON line each",
        description="Fetch the mailbox (waiting up to --wait seconds for a message), verify "
        "each sender's signature, open, acknowledge, and print one JSON line per message: "
        '{"id", "from", "sent", "text"}. Problems go to stderr and make the exit status 1.',
    )
    _common(recv)
    recv.add_argument(
        "--wait",
        type=_wait_seconds,
        default=0,
        metavar="S",
        help=f"long-poll up to S seconds (0-{MAX_WAIT_SECONDS}, default 0)",
    )
    set_handler(recv, run_recv)

    status = commands.add_parser(
        "status",
        help="the delivery status of an envelope we sent",
        description='Print {"id", "status", "at"} of an envelope we sent.',
    )
    _common(status, keys=False)
    status.add_argument("envelope_id", metavar="ID")
    set_handler(status, run_status)

    set_handler(parser, _usage)


def _common(parser: argparse.ArgumentParser, *, keys: bool = True) -> None:
    parser.add_argument(
        "--server", metavar="URL", help=f"the client API, https://HOST:PORT (default: ${ENV_URL})"
    )
    parser.add_argument(
        "--token", metavar="T", help=f"bearer token (default: ${ENV_TOKEN}; prefer it)"
    )
    parser.add_argument(
        "--ca", metavar="FILE", help=f"CA of the gateway's certificate (default: ${ENV_CA})"
    )
    parser.add_argument(
        "--session",
        metavar="FILE",
        help=f"the saved sign-in session (default: ${ENV_SESSION}, or NAME.session.json "
        "beside the key file); used when no token is given",
    )
    if not keys:
        return
    parser.add_argument("--keys", metavar="FILE", help=f"our key file (default: ${ENV_KEYS})")
    parser.add_argument(
        "--contacts",
        metavar="FILE",
        help="remembered contact keys (default: NAME.contacts.json beside the key file)",
    )
    parser.add_argument(
        "--org-key",
        action="append",
        default=[],
        metavar="ORG=ed25519:KEY",
        help="check ORG's key records with this key instead of the one the gateway's rules "
        "pin (repeatable)",
    )
    parser.add_argument(
        "--accept-new-key",
        action="store_true",
        help="accept a contact's keys that differ from those remembered (check with them first)",
    )


def _usage(_args: argparse.Namespace) -> int:
    raise UsageError(
        "client: name a command: login, logout, keygen, publish, send, recv or status "
        "(see `gateway client --help`)"
    )


def _wait_seconds(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 0 <= int(text) <= MAX_WAIT_SECONDS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number 0-{MAX_WAIT_SECONDS}")
    return int(text)


# -- the options, resolved -------------------------------------------------------------
def _setting(args: argparse.Namespace, name: str, env: str, *, flag: str) -> str:
    value = getattr(args, name, None) or os.environ.get(env)
    if not value:
        raise UsageError(f"client: give {flag} or set {env}")
    return str(value)


def _keys_path(args: argparse.Namespace, name: str = "keys", flag: str = "--keys") -> Path:
    return Path(_setting(args, name, ENV_KEYS, flag=flag))


def _org_keys(args: argparse.Namespace) -> dict[str, bytes]:
    pinned: dict[str, bytes] = {}
    for item in args.org_key:
        org, sep, key = item.partition("=")
        if not sep:
            raise UsageError(f"client: --org-key {item!r}: expected ORG=ed25519:KEY")
        try:
            pinned[normalize_domain(org)] = parse_signing_key(key)
        except (AddressError, ValueError) as exc:
            raise UsageError(f"client: --org-key {item!r}: {exc}") from None
    return pinned


def _address(text: str, flag: str) -> Address:
    try:
        return Address.parse(text)
    except AddressError as exc:
        raise UsageError(f"client: {flag}: {exc}") from None


def _server(args: argparse.Namespace) -> str:
    server = _setting(args, "server", ENV_URL, flag="--server")
    if not server.startswith(("https://", "http://")):
        raise UsageError(f"client: --server {server!r}: expected https://HOST:PORT")
    return server


def _ca(args: argparse.Namespace) -> Path | None:
    ca = args.ca or os.environ.get(ENV_CA)
    return Path(ca) if ca else None


def _session_path(args: argparse.Namespace) -> Path | None:
    """The session file: --session, $GATEWAY_SESSION, or beside the key file."""
    from gateway.client.signin import default_session_path

    chosen = getattr(args, "session", None) or os.environ.get(ENV_SESSION)
    if chosen:
        return Path(chosen)
    keys = getattr(args, "keys", None) or os.environ.get(ENV_KEYS)
    return default_session_path(Path(keys)) if keys else None


def _session(args: argparse.Namespace) -> ClientSession:
    from gateway.client.api import ClientSession
    from gateway.client.signin import SavedSession, session_refresher

    server = _server(args)
    ca_file = _ca(args)
    token = getattr(args, "token", None) or os.environ.get(ENV_TOKEN)
    if token:
        return ClientSession(server, token, ca_file=ca_file)
    path = _session_path(args)
    if path is None or not path.exists():
        raise UsageError(
            f"client: give --token or set {ENV_TOKEN}, or sign in with `gateway client login`"
        )
    saved = SavedSession.load(path)
    return ClientSession(
        server,
        saved.session_token,
        ca_file=ca_file,
        refresh=session_refresher(path, saved, ca_file=ca_file),
    )


def run_login(args: argparse.Namespace) -> int:
    import trio

    from gateway.client.browser import browser_login
    from gateway.client.signin import device_login

    server = _server(args)
    path = _session_path(args)
    if path is None:
        raise UsageError(f"client: give --session or --keys (or set {ENV_SESSION} or {ENV_KEYS})")

    def show(started: dict[str, object]) -> None:
        complete = started.get("verification_uri_complete")
        print(
            f"To sign in, open {started.get('verification_uri')} and enter the code "
            f"{started.get('user_code')}" + (f"\n(or open {complete})" if complete else ""),
            file=sys.stderr,
            flush=True,
        )
        print("waiting for the sign-in to finish ...", file=sys.stderr, flush=True)

    def show_url(url: str) -> None:
        print(f"To sign in, open in your browser:\n{url}", file=sys.stderr, flush=True)
        if args.open:
            import webbrowser

            webbrowser.open(url)
        print("waiting for the sign-in to finish ...", file=sys.stderr, flush=True)

    if args.browser:
        saved = trio.run(
            partial(
                browser_login,
                server,
                ca_file=_ca(args),
                idp_ca_file=Path(args.idp_ca) if args.idp_ca else None,
                provider=args.provider,
                on_url=show_url,
            )
        )
    else:
        saved = trio.run(
            partial(device_login, server, ca_file=_ca(args), provider=args.provider, on_code=show)
        )
    saved.save(path)
    print(
        f"signed in as {saved.address} (group {saved.group}); session saved to {path}",
        file=sys.stderr,
    )
    return 0


def run_logout(args: argparse.Namespace) -> int:
    import trio

    from gateway.client.api import ClientSession
    from gateway.client.signin import SavedSession

    path = _session_path(args)
    if path is None or not path.exists():
        raise UsageError("client: no saved session to sign out of")
    saved = SavedSession.load(path)

    async def sign_out() -> None:
        async with ClientSession(_server(args), saved.session_token, ca_file=_ca(args)) as api:
            await api.sign_out()

    try:
        trio.run(sign_out)
    finally:
        path.unlink(missing_ok=True)
    print(f"signed out; removed {path}", file=sys.stderr)
    return 0


def _with_client(
    args: argparse.Namespace, action: Callable[[ReferenceClient], Awaitable[_T]]
) -> _T:
    """Run ``action`` with a client built from the options; saves the contacts after."""
    import trio

    from gateway.client.contacts import ContactBook, default_contacts_path
    from gateway.client.reference import ReferenceClient
    from gateway.crypto.keys import UserKeys

    keys_file = _keys_path(args)
    keys = UserKeys.load(keys_file)
    contacts_file = Path(args.contacts) if args.contacts else default_contacts_path(keys_file)
    contacts = ContactBook.load(contacts_file)
    org_keys = _org_keys(args)
    session = _session(args)

    async def run() -> _T:
        async with session:
            client = ReferenceClient(session, keys, contacts, org_keys=org_keys)
            return await action(client)

    try:
        return trio.run(run)
    finally:
        contacts.save()


# -- commands -------------------------------------------------------------------------
def run_keygen(args: argparse.Namespace) -> int:
    from gateway.crypto.keys import UserKeys

    address = _address(args.user, "--user")
    out = _keys_path(args, "out", "--out")
    keys = UserKeys.generate(address)
    keys.save(out, overwrite=args.force)
    print(json.dumps(keys.public().to_json()))
    print(f"keys of {address} written to {out} (mode 0600); keep it private", file=sys.stderr)
    return 0


def run_publish(args: argparse.Namespace) -> int:
    from gateway.crypto.keys import UserKeys

    async def publish(client: ReferenceClient) -> int:
        return await client.publish()

    _with_client(args, publish)
    keys = UserKeys.load(_keys_path(args))
    print(f"published the keys of {keys.address}, signed by {keys.address.org}")
    return 0


def _read_message(text: str) -> str:
    if text != "-":
        return text
    data = sys.stdin.buffer.read(MAX_MESSAGE_BYTES + 1)
    if len(data) > MAX_MESSAGE_BYTES:
        raise UsageError(f"client: the message on stdin is over {MAX_MESSAGE_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError("client: the message on stdin is not UTF-8") from None


def run_send(args: argparse.Namespace) -> int:
    from gateway.client.contacts import Trust

    to = _address(args.to, "--to")
    try:
        ttl = parse_duration(args.ttl) if args.ttl is not None else None
    except ValueError as exc:
        raise UsageError(f"client: --ttl: {exc}") from None
    if ttl == 0:
        raise UsageError("client: --ttl must be longer than 0s")
    text = _read_message(args.message)
    sent = _with_client(
        args,
        partial(
            _send,
            to=to,
            text=text,
            ttl=ttl,
            burn_on_read=args.burn_on_read,
            accept_new_key=args.accept_new_key,
        ),
    )
    print(sent.envelope_id)
    notes = [f"{sent.status} for {sent.recipient}"]
    if sent.burn_on_read:
        notes.append("burn-on-read")
    if sent.trust is Trust.NEW:
        notes.append(f"first message to {sent.recipient}: their keys are now remembered")
    elif sent.trust is Trust.REPLACED:
        notes.append(f"the new keys of {sent.recipient} are now remembered")
    print("; ".join(notes), file=sys.stderr)
    return 0


async def _send(
    client: ReferenceClient,
    *,
    to: Address,
    text: str,
    ttl: int | None,
    burn_on_read: bool,
    accept_new_key: bool,
) -> Sent:
    return await client.send(
        to, text, ttl_seconds=ttl, burn_on_read=burn_on_read, accept_new_key=accept_new_key
    )


def run_recv(args: argparse.Namespace) -> int:
    async def receive(client: ReferenceClient) -> Inbox:
        return await client.receive(wait=args.wait, accept_new_key=args.accept_new_key)

    inbox = _with_client(args, receive)
    for message in inbox.messages:
        print(json.dumps(message.to_json(), ensure_ascii=False), flush=True)
    for problem in inbox.problems:
        print(
            f"gateway: warning: envelope {problem.envelope_id} from {problem.sender}: "
            f"{problem.message}",
            file=sys.stderr,
        )
    return EXIT_PROBLEMS if inbox.problems else 0


def run_status(args: argparse.Namespace) -> int:
    import trio

    session = _session(args)

    async def status() -> dict[str, object]:
        async with session:
            return await session.status(args.envelope_id)

    print(json.dumps(trio.run(status)))
    return 0
