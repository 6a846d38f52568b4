"""Load federation rules from YAML text: every problem found, each pointing at its place.

:func:`load_rules` parses the text with positions (:mod:`gateway.core.yamlmarks`),
then checks it in one pass that never stops at the first problem: every issue
becomes one line ``FILE:LINE:COLUMN: key.path: message`` (1-based), and if
there is any, :class:`~gateway.errors.RulesError` carries them all in file
order. Only a file without a single issue becomes :class:`Rules`.

The loader does no I/O of its own: a peer's ``ca:`` names a file relative to
the rules file, which it asks the injected ``read_file(path) -> bytes`` for.

Checks the JSON Schema beside the examples cannot express (a reference to an
undefined peer, a user in two groups, TTL bounds in the wrong order, a CA that
is not a CA, a peer equal to our own org, duplicate YAML keys) live only here.
"""

from __future__ import annotations

import difflib
import os.path
import re
from collections.abc import Callable, Iterable
from types import MappingProxyType
from typing import Any

from gateway.core.address import normalize_domain, normalize_user
from gateway.core.durations import format_duration, format_period, parse_duration, parse_period
from gateway.core.envelope import RETENTION_KEY_ID_RE
from gateway.core.keytext import parse_retention_key, parse_signing_key
from gateway.core.rules.model import (
    DEFAULT_MAX_ENVELOPE_BYTES,
    DEFAULT_MEMBER_CLAIM,
    DEFAULT_TTL,
    GROUP_NAME_RE,
    MAX_CLAIM_VALUE_LENGTH,
    MAX_KEEP_SECONDS,
    MAX_PEER_ENDPOINTS,
    MAX_PREVIOUS_RETENTION_KEYS,
    MAX_TTL_SECONDS,
    MIN_ENVELOPE_BYTES,
    MIN_KEEP_SECONDS,
    MIN_TTL_SECONDS,
    PROTOCOL_MAX_ENVELOPE_BYTES,
    RULES_VERSION,
    WILDCARD,
    BurnOnRead,
    ClaimMatch,
    Group,
    GroupRetention,
    Limits,
    Mark,
    OrgRetention,
    Peer,
    PeerRef,
    RetentionKey,
    Rules,
    SignInRequirement,
    TtlBounds,
)
from gateway.core.yamlmarks import (
    START,
    MarkedList,
    MarkedMap,
    Position,
    YamlSyntaxError,
    format_path,
    load_marked,
    paused_gc,
)
from gateway.errors import AddressError, PKIError, RulesError
from gateway.pki.certs import bundle_pem, bundle_sha256, load_ca_bundle_pem, parse_pin

ReadFile = Callable[[str], bytes]

MAX_RULES_FILE_BYTES = 64 * 1024 * 1024
MAX_REPORTED_ISSUES = 1000  # past this, one closing line says how many more there are

_ROOT_KEYS = ("version", "org", "default", "retention", "peers", "groups")
_ROOT_REQUIRED = ("version", "org", "default", "groups")
_PEER_KEYS = ("endpoint", "ca", "ca_pem", "pins", "signing_key")
_PEER_REQUIRED = ("endpoint", "signing_key")
_GROUP_KEYS = (
    "members",
    "members_from",
    "send_to",
    "receive_from",
    "limits",
    "retention",
    "requires",
)
_GROUP_REQUIRED = ()  # members, members_from or both: checked in Reader.group
_CLAIM_MATCH_KEYS = ("claim", "value")
_REQUIRES_KEYS = ("acr", "amr")
_LIMIT_KEYS = ("max_envelope_bytes", "ttl", "burn_on_read")
_TTL_KEYS = ("min", "default", "max")
_ORG_RETENTION_KEYS = ("key", "previous")
_RETENTION_KEY_KEYS = ("id", "public_key")
_GROUP_RETENTION_KEYS = ("outbound", "inbound", "keep")
_RETENTION_REQUIRED = "required"
_RETENTION_OFF = "off"
_RETENTION_CHOICES = (_RETENTION_REQUIRED, _RETENTION_OFF)
_DEFAULT_POLICY = "deny"
_BURN_CHOICES = tuple(member.value for member in BurnOnRead)

# The same shape as federation_rules/schema.json says: https, a host name or
# bracketed IP literal, an optional port and path; no user info, query or fragment.
_ENDPOINT_RE = re.compile(
    r"https://(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])"
    r"(?::(?P<port>[0-9]{1,5}))?(?:/[^?#\s]*)?"
)
_MAX_PORT = 65535
# Domains share their suffixes (".example"), so only a near-identical one is a likely typo.
_PEER_HINT_CUTOFF = 0.8


def load_rules(text: str | bytes, *, filename: str, read_file: ReadFile | None = None) -> Rules:
    """Validate ``text`` completely; :class:`Rules` or ``RulesError`` with every issue.

    ``filename`` is how issues and marks name the file (as the admin wrote it);
    ``ca:`` paths are resolved against its directory and read with
    ``read_file``; without one, ``ca:`` is reported as unusable here.
    """
    checker = _Checker(filename, read_file)
    with paused_gc():
        rules = checker.run(text)
    if checker.issues or rules is None:
        raise RulesError(checker.formatted_issues())
    return rules


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value}"


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _suggest(word: str, candidates: Iterable[str], *, cutoff: float = 0.6) -> str | None:
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=cutoff)
    return matches[0] if matches else None


class _Checker:
    def __init__(self, filename: str, read_file: ReadFile | None) -> None:
        self.filename = filename
        self.read_file = read_file
        self.issues: list[tuple[Position, str, str]] = []
        self.org = ""
        self.peer_names: set[str] = set()  # every syntactically valid peer key
        self.peer_texts: dict[str, str] = {}  # peer key as written -> normalized
        self.bad_peer_keys: set[str] = (
            set()
        )  # invalid peer keys: references to them are not re-reported
        self.user_group: dict[str, tuple[str, MarkedList, int]] = {}
        self.claim_group: dict[ClaimMatch, tuple[str, Position]] = {}
        self.ca_cache: dict[str, bytes | OSError] = {}
        self.ca_files: list[str] = []
        self.org_retention: OrgRetention | None = None
        self.retention_written = False  # a `retention:` section, valid or not

    # -- reporting -------------------------------------------------------------
    def error(self, position: Position, path: str, message: str) -> None:
        self.issues.append((position, path or "(document)", message))

    def formatted_issues(self) -> list[str]:
        ordered = sorted(self.issues, key=lambda issue: (issue[0].line, issue[0].column))
        lines = [
            f"{self.filename}:{pos.line}:{pos.column}: {path}: {message}"
            for pos, path, message in ordered[:MAX_REPORTED_ISSUES]
        ]
        if len(ordered) > MAX_REPORTED_ISSUES:
            pos = ordered[MAX_REPORTED_ISSUES][0]
            lines.append(
                f"{self.filename}:{pos.line}:{pos.column}: (document): "
                f"{len(ordered) - MAX_REPORTED_ISSUES} more issues not shown"
            )
        return lines

    def mark(self, position: Position, path: str) -> Mark:
        return Mark(self.filename, position.line, path)

    # -- generic checks ----------------------------------------------------------
    def check_keys(
        self,
        mapping: MarkedMap,
        path: str,
        allowed: tuple[str, ...],
        required: tuple[str, ...],
        where: Position,
    ) -> None:
        for key in mapping:
            if key in allowed:
                continue
            hint = _suggest(str(key), allowed)
            advice = f"did you mean {hint!r}?" if hint else f"known keys: {', '.join(allowed)}"
            self.error(
                mapping.key_position(key), _join(path, key), f"unknown key {key!r}; {advice}"
            )
        for key in required:
            if key not in mapping:
                self.error(where, _join(path, key), f"missing required key {key!r}")

    def expect_map(self, value: Any, position: Position, path: str, what: str) -> MarkedMap | None:
        if isinstance(value, MarkedMap):
            return value
        self.error(position, path, f"expected {what} (a mapping), got {_describe(value)}")
        return None

    def expect_list(
        self, value: Any, position: Position, path: str, what: str
    ) -> MarkedList | None:
        if isinstance(value, MarkedList):
            return value
        hint = "; write [] for an empty list" if value is None else ""
        self.error(position, path, f"expected {what} (a list), got {_describe(value)}{hint}")
        return None

    def expect_str(self, value: Any, position: Position, path: str, what: str) -> str | None:
        if isinstance(value, str):
            return value
        self.error(position, path, f"expected {what} (a string), got {_describe(value)}")
        return None

    def domain(self, value: Any, position: Position, path: str, what: str) -> str | None:
        text = self.expect_str(value, position, path, what)
        if text is None:
            return None
        try:
            return normalize_domain(text)
        except AddressError as exc:
            self.error(position, path, f"invalid {what}: {exc.message}")
            return None

    # -- the document --------------------------------------------------------------
    def run(self, text: str | bytes) -> Rules | None:
        if len(text) > MAX_RULES_FILE_BYTES:
            self.error(START, "", f"the file is larger than {MAX_RULES_FILE_BYTES} bytes")
            return None
        if isinstance(text, bytes):
            data = text
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                before = data[: exc.start]
                line = before.count(b"\n") + 1
                column = exc.start - (before.rfind(b"\n") + 1) + 1
                self.error(Position(line, column), "", "the file is not UTF-8 text")
                return None
        try:
            document = load_marked(text)
        except YamlSyntaxError as exc:
            self.error(exc.position, "(yaml)", exc.problem)
            return None
        for problem in document.problems:
            self.error(problem.position, format_path(problem.path), problem.message)
        root = document.root
        if not isinstance(root, MarkedMap):
            self.error(
                document.position,
                "",
                "expected the rules (a mapping with version, org, default, peers and groups), "
                f"got {_describe(root)}",
            )
            return None
        self.check_keys(root, "", _ROOT_KEYS, _ROOT_REQUIRED, document.position)

        if "version" in root:
            version = root["version"]
            if type(version) is not int or version != RULES_VERSION:
                self.error(
                    root.value_position("version"),
                    "version",
                    f"unsupported version {_describe(version)}; this gateway reads version "
                    f"{RULES_VERSION}",
                )
        org = None
        if "org" in root:
            org = self.domain(root["org"], root.value_position("org"), "org", "org domain")
        self.org = org or ""
        default_mark = None
        if "default" in root:
            position = root.value_position("default")
            default_mark = self.mark(position, "default")
            if root["default"] != _DEFAULT_POLICY:
                self.error(
                    position,
                    "default",
                    f"got {_describe(root['default'])}; the only value is deny: the rules list "
                    "what is allowed and everything else is denied",
                )

        if "retention" in root:
            self.retention_written = True
            self.org_retention = self.retention_section(
                root["retention"], root.value_position("retention"), root.key_position("retention")
            )
        peers: dict[str, Peer] = {}
        if "peers" in root:
            peers = self.peers(root["peers"], root.value_position("peers"))
        groups: dict[str, Group] = {}
        if "groups" in root:
            groups = self.groups(root["groups"], root.value_position("groups"))

        if self.issues or org is None:
            return None
        return Rules(
            org=org,
            peers=MappingProxyType(peers),
            groups=MappingProxyType(groups),
            source=self.filename,
            default_mark=default_mark,
            ca_files=tuple(self.ca_files),
            retention=self.org_retention,
        )

    # -- peers -----------------------------------------------------------------------
    def peers(self, value: Any, position: Position) -> dict[str, Peer]:
        mapping = self.expect_map(value, position, "peers", "the peers")
        result: dict[str, Peer] = {}
        if mapping is None:
            return result
        seen: dict[str, Position] = {}
        for key, spec in mapping.items():
            key_position = mapping.key_position(key)
            path = _join("peers", key)
            name = self.domain(key, key_position, path, "peer org domain")
            if name is None:
                self.bad_peer_keys.add(str(key).lower())
            elif name == self.org:
                self.error(
                    key_position,
                    path,
                    f"{name} is this org itself; a peer is another org's gateway",
                )
                name = None
            elif name in seen:
                self.error(
                    key_position,
                    path,
                    f"peer {name} is listed twice (first at line {seen[name].line})",
                )
                name = None
            else:
                seen[name] = key_position
                self.peer_names.add(name)
                self.peer_texts[key] = name
            peer = self.peer(
                name or str(key), spec, mapping.value_position(key), key_position, path
            )
            if name is not None and peer is not None:
                result[name] = peer
        return result

    def peer(
        self, name: str, value: Any, position: Position, key_position: Position, path: str
    ) -> Peer | None:
        spec = self.expect_map(value, position, path, f"the peer {name}")
        if spec is None:
            return None
        self.check_keys(spec, path, _PEER_KEYS, _PEER_REQUIRED, key_position)
        ok = True

        endpoints = None
        if "endpoint" in spec:
            endpoints = self.endpoints(spec["endpoint"], spec.value_position("endpoint"), path)
            ok = ok and endpoints is not None

        ca = self.ca(spec, key_position, path)
        ok = ok and ca is not None

        pins: list[str] = []
        if "pins" in spec:
            pins_path = _join(path, "pins")
            items = self.expect_list(spec["pins"], spec.value_position("pins"), pins_path, "pins")
            ok = ok and items is not None
            for index, item in enumerate(items or ()):
                item_position = items.item_position(index) if items is not None else START
                item_path = f"{pins_path}[{index}]"
                text = self.expect_str(item, item_position, item_path, "an SPKI pin")
                if text is None:
                    ok = False
                    continue
                try:
                    parse_pin(text)
                except ValueError as exc:
                    self.error(item_position, item_path, str(exc))
                    ok = False
                    continue
                if text in pins:
                    self.error(item_position, item_path, f"duplicate pin {text}")
                    ok = False
                    continue
                pins.append(text)

        signing_key = None
        if "signing_key" in spec:
            key_path = _join(path, "signing_key")
            key_value_position = spec.value_position("signing_key")
            text = self.expect_str(
                spec["signing_key"], key_value_position, key_path, "a signing key"
            )
            if text is not None:
                try:
                    signing_key = parse_signing_key(text)
                except ValueError as exc:
                    self.error(key_value_position, key_path, str(exc))
        if not ok or endpoints is None or ca is None or signing_key is None:
            return None
        ca_pem, ca_sha256, ca_file = ca
        return Peer(
            org=name,
            endpoints=endpoints,
            ca_pem=ca_pem,
            ca_sha256=ca_sha256,
            pins=tuple(pins),
            signing_key=signing_key,
            ca_file=ca_file,
            mark=self.mark(key_position, path),
        )

    def endpoints(self, value: Any, position: Position, path: str) -> tuple[str, ...] | None:
        """``endpoint:`` is one URL, or a list of 1 to MAX_PEER_ENDPOINTS of them."""
        path = _join(path, "endpoint")
        if not isinstance(value, list):
            one = self.endpoint(value, position, path)
            return None if one is None else (one,)
        items = self.expect_list(value, position, path, "endpoint URLs")
        if items is None:
            return None
        if not 1 <= len(items) <= MAX_PEER_ENDPOINTS:
            self.error(
                position,
                path,
                f"give 1 to {MAX_PEER_ENDPOINTS} endpoint URLs, got {len(items)}",
            )
            return None
        urls: list[str] = []
        for index, item in enumerate(items):
            item_position = items.item_position(index)
            url = self.endpoint(item, item_position, f"{path}[{index}]")
            if url is None:
                return None
            if url.rstrip("/") in (u.rstrip("/") for u in urls):
                self.error(item_position, f"{path}[{index}]", f"duplicate endpoint {url!r}")
                return None
            urls.append(url)
        return tuple(urls)

    def endpoint(self, value: Any, position: Position, path: str) -> str | None:
        text = self.expect_str(value, position, path, "an endpoint URL")
        if text is None:
            return None
        match = _ENDPOINT_RE.fullmatch(text)
        if match is None:
            self.error(
                position,
                path,
                f"invalid endpoint {text!r}: expected https://HOST[:PORT][/PATH] "
                "(no user, query or fragment)",
            )
            return None
        port = match.group("port")
        if port is not None and not 0 < int(port) <= _MAX_PORT:
            self.error(position, path, f"invalid endpoint {text!r}: port {port} out of range")
            return None
        return text

    def ca(
        self, spec: MarkedMap, key_position: Position, path: str
    ) -> tuple[str, str, str | None] | None:
        if "ca" in spec and "ca_pem" in spec:
            self.error(
                spec.key_position("ca_pem"),
                _join(path, "ca_pem"),
                "give either ca (a file) or ca_pem (inline), not both",
            )
            return None
        if "ca" in spec:
            ca_path = _join(path, "ca")
            position = spec.value_position("ca")
            relative = self.expect_str(spec["ca"], position, ca_path, "a CA file path")
            if relative is None:
                return None
            if not relative:
                self.error(position, ca_path, "the CA file path is empty")
                return None
            if self.read_file is None:
                self.error(position, ca_path, "CA files cannot be read here; use ca_pem")
                return None
            file_path = os.path.join(os.path.dirname(self.filename), relative)
            data = self.read_ca(file_path)
            if isinstance(data, OSError):
                self.error(
                    position,
                    ca_path,
                    f"cannot read the CA file {file_path}: {data.strerror or data}",
                )
                return None
            return self.parse_ca(data, file_path, position, ca_path, file_path)
        if "ca_pem" in spec:
            pem_path = _join(path, "ca_pem")
            position = spec.value_position("ca_pem")
            text = self.expect_str(spec["ca_pem"], position, pem_path, "a PEM CA certificate")
            if text is None:
                return None
            return self.parse_ca(text.encode("utf-8"), "inline PEM", position, pem_path, None)
        self.error(
            key_position,
            _join(path, "ca"),
            "missing the peer's CA certificate: give ca (a file) or ca_pem (inline PEM)",
        )
        return None

    def read_ca(self, file_path: str) -> bytes | OSError:
        cached = self.ca_cache.get(file_path)
        if cached is None:
            assert self.read_file is not None
            try:
                cached = self.read_file(file_path)
                self.ca_files.append(file_path)
            except OSError as exc:
                cached = exc
            self.ca_cache[file_path] = cached
        return cached

    def parse_ca(
        self, data: bytes, source: str, position: Position, path: str, ca_file: str | None
    ) -> tuple[str, str, str | None] | None:
        try:
            certs = load_ca_bundle_pem(data, source=source)
        except PKIError as exc:
            self.error(position, path, exc.message)
            return None
        return bundle_pem(certs), bundle_sha256(certs), ca_file

    # -- groups ------------------------------------------------------------------------
    def groups(self, value: Any, position: Position) -> dict[str, Group]:
        mapping = self.expect_map(value, position, "groups", "the groups")
        result: dict[str, Group] = {}
        if mapping is None:
            return result
        for key, spec in mapping.items():
            key_position = mapping.key_position(key)
            path = _join("groups", key)
            name: str | None = None
            if not isinstance(key, str):
                self.error(
                    key_position, path, f"a group name must be a string; got {_describe(key)}"
                )
            elif not GROUP_NAME_RE.fullmatch(key):
                self.error(
                    key_position,
                    path,
                    f"invalid group name {key!r}: 1-64 of a-z 0-9 _ -, starting with a letter "
                    "or digit",
                )
            else:
                name = key
            group = self.group(
                name or str(key), spec, mapping.value_position(key), key_position, path
            )
            if name is not None and group is not None:
                result[name] = group
        return result

    def group(
        self, name: str, value: Any, position: Position, key_position: Position, path: str
    ) -> Group | None:
        spec = self.expect_map(value, position, path, f"the group {name}")
        if spec is None:
            return None
        self.check_keys(spec, path, _GROUP_KEYS, _GROUP_REQUIRED, key_position)
        if "members" not in spec and "members_from" not in spec:
            self.error(
                key_position,
                path,
                "a group needs members (a list of users), members_from (an IdP claim), or both",
            )
            return None
        members = self.members(name, spec, path) if "members" in spec else ()
        members_from = self.members_from(name, spec, path)
        requires = self.requires(spec, path)
        send_to = self.refs(spec, "send_to", path, with_groups=False)
        receive_from = self.refs(spec, "receive_from", path, with_groups=True)
        limits = self.limits(spec, path)
        retention = self.group_retention(spec, path)
        if (
            members is None
            or send_to is None
            or receive_from is None
            or limits is None
            or retention is None
        ):
            return None
        if members_from is None or isinstance(requires, bool):
            return None
        return Group(
            name=name,
            members=members,
            members_from=members_from,
            requires=requires,
            send_to=send_to,
            receive_from=receive_from,
            limits=limits,
            retention=retention,
            mark=self.mark(key_position, path),
            send_to_mark=self.key_mark(spec, "send_to", path),
            receive_from_mark=self.key_mark(spec, "receive_from", path),
        )

    def claim_text(self, value: Any, position: Position, path: str, what: str) -> str | None:
        if (
            not isinstance(value, str)
            or not value.strip()
            or len(value) > MAX_CLAIM_VALUE_LENGTH
            or not value.isprintable()
        ):
            self.error(
                position,
                path,
                f"expected {what} (a string of 1-{MAX_CLAIM_VALUE_LENGTH} printable "
                f"characters), got {_describe(value)}",
            )
            return None
        return value

    def members_from(self, group: str, spec: MarkedMap, path: str) -> tuple[ClaimMatch, ...] | None:
        """``members_from: {claim: groups, value: legal}``, or a list of such."""
        if "members_from" not in spec:
            return ()
        path = _join(path, "members_from")
        raw = spec["members_from"]
        entries: list[tuple[Any, Position, str]]
        if isinstance(raw, MarkedList):
            entries = [(item, raw.item_position(i), f"{path}[{i}]") for i, item in enumerate(raw)]
            if not entries:
                self.error(
                    spec.value_position("members_from"), path, "an empty list matches no one"
                )
                return None
        else:
            entries = [(raw, spec.value_position("members_from"), path)]
        matches: list[ClaimMatch] = []
        for item, position, item_path in entries:
            entry = self.expect_map(item, position, item_path, "{claim: ..., value: ...}")
            if entry is None:
                return None
            self.check_keys(entry, item_path, _CLAIM_MATCH_KEYS, ("value",), position)
            claim = self.claim_text(
                entry.get("claim", DEFAULT_MEMBER_CLAIM),
                entry.value_position("claim") if "claim" in entry else position,
                _join(item_path, "claim"),
                "a claim name",
            )
            value = self.claim_text(
                entry.get("value"),
                entry.value_position("value") if "value" in entry else position,
                _join(item_path, "value"),
                "the claim's value",
            )
            if claim is None or value is None:
                return None
            match = ClaimMatch(claim, value)
            other = self.claim_group.get(match)
            if other is not None:
                self.error(
                    position,
                    item_path,
                    f"{match} already gives members to group {other[0]} (line {other[1].line}); "
                    "a user with that claim would be in two groups",
                )
                return None
            self.claim_group[match] = (group, position)
            matches.append(match)
        return tuple(matches)

    def requires(self, spec: MarkedMap, path: str) -> SignInRequirement | bool | None:
        """``requires: {acr: [...], amr: [...]}``; ``False`` when it is wrong (reported)."""
        if "requires" not in spec:
            return None
        path = _join(path, "requires")
        entry = self.expect_map(spec["requires"], spec.value_position("requires"), path, "requires")
        if entry is None:
            return False
        self.check_keys(entry, path, _REQUIRES_KEYS, (), spec.key_position("requires"))
        values: dict[str, tuple[str, ...]] = {}
        for key in _REQUIRES_KEYS:
            if key not in entry:
                continue
            raw = entry[key]
            items = [raw] if isinstance(raw, str) else raw
            where = entry.value_position(key)
            if not isinstance(items, list) or not items:
                self.error(where, _join(path, key), f"expected a value or a list of {key} values")
                return False
            texts = [
                self.claim_text(item, where, _join(path, key), f"an {key} value") for item in items
            ]
            if any(text is None for text in texts):
                return False
            values[key] = tuple(dict.fromkeys(t for t in texts if t is not None))
        if not values:
            self.error(
                spec.value_position("requires"), path, "name the acr values or amr methods required"
            )
            return False
        return SignInRequirement(acr=values.get("acr", ()), amr=values.get("amr", ()))

    def key_mark(self, spec: MarkedMap, key: str, path: str) -> Mark | None:
        return self.mark(spec.key_position(key), _join(path, key)) if key in spec else None

    def members(self, group: str, spec: MarkedMap, path: str) -> tuple[str, ...] | None:
        if "members" not in spec:
            return None
        path = _join(path, "members")
        items = self.expect_list(spec["members"], spec.value_position("members"), path, "members")
        if items is None:
            return None
        members: dict[str, int] = {}
        user_group = self.user_group
        ok = True
        for index, item in enumerate(items):
            try:
                user = normalize_user(item) if type(item) is str else None
            except AddressError as exc:
                self.error(items.item_position(index), f"{path}[{index}]", exc.message)
                ok = False
                continue
            if user is None:
                self.error(
                    items.item_position(index),
                    f"{path}[{index}]",
                    f"expected a user name (a string), got {_describe(item)}; quote it",
                )
                ok = False
                continue
            if user in members:
                first = items.item_position(members[user])
                self.error(
                    items.item_position(index),
                    f"{path}[{index}]",
                    f"duplicate member {user!r} (first at line {first.line}, "
                    f"column {first.column})",
                )
                ok = False
                continue
            owner = user_group.get(user)
            if owner is not None:
                other, other_items, other_index = owner
                first = other_items.item_position(other_index)
                self.error(
                    items.item_position(index),
                    f"{path}[{index}]",
                    f"user {user!r} is already in group {other} (line {first.line}); "
                    "a user is in one group at most",
                )
                ok = False
                continue
            members[user] = index
            user_group[user] = (group, items, index)
        return tuple(members) if ok else None

    def refs(
        self, spec: MarkedMap, key: str, path: str, *, with_groups: bool
    ) -> tuple[PeerRef, ...] | None:
        if key not in spec:
            return ()
        path = _join(path, key)
        items = self.expect_list(spec[key], spec.value_position(key), path, key)
        if items is None:
            return None
        refs: list[PeerRef] = []
        seen: dict[str, int] = {}
        ok = True
        for index, item in enumerate(items):
            position = items.item_position(index)
            item_path = f"{path}[{index}]"
            ref = self.ref(item, position, item_path, key, with_groups=with_groups)
            if ref is None:
                ok = False
                continue
            text = str(ref)
            if text in seen:
                first = items.item_position(seen[text])
                self.error(
                    position, item_path, f"{text} is listed twice (first at line {first.line})"
                )
                ok = False
                continue
            seen[text] = index
            refs.append(ref)
        if WILDCARD in seen and len(items) > 1:
            self.error(
                items.item_position(seen[WILDCARD]),
                f"{path}[{seen[WILDCARD]}]",
                f'"*" already means every peer; list it alone in {key}',
            )
            ok = False
        return tuple(refs) if ok else None

    def ref(
        self, item: Any, position: Position, path: str, key: str, *, with_groups: bool
    ) -> PeerRef | None:
        what = 'a peer, peer/group or "*"' if with_groups else 'a peer or "*"'
        text = self.expect_str(item, position, path, what)
        if text is None:
            return None
        mark = self.mark(position, path)
        if text == WILDCARD:
            return PeerRef(WILDCARD, None, mark)
        peer_text, slash, group = text.partition("/")
        if slash and not with_groups:
            self.error(
                position,
                path,
                f"{key} names peers only ({text!r} names a group): the origin cannot know a "
                "remote user's group",
            )
            return None
        if slash and not GROUP_NAME_RE.fullmatch(group):
            self.error(
                position,
                path,
                f"invalid group {group!r} in {text!r}: 1-64 of a-z 0-9 _ -, starting with a "
                "letter or digit",
            )
            return None
        peer = self.peer_texts.get(peer_text)  # the common case, without the regexes
        if peer is not None:
            return PeerRef(peer, group if slash else None, mark)
        if peer_text.lower() in self.bad_peer_keys:
            return None  # its definition is already reported
        try:
            peer = normalize_domain(peer_text)
        except AddressError as exc:
            self.error(position, path, f"invalid peer: {exc.message}")
            return None
        if peer not in self.peer_names:
            if peer == self.org:
                self.error(
                    position,
                    path,
                    f"{peer} is this org: users of the org reach each other without a rule",
                )
            else:
                hint = _suggest(peer, self.peer_names, cutoff=_PEER_HINT_CUTOFF)
                advice = f"; did you mean {hint}?" if hint else ""
                self.error(position, path, f"peer {peer} is not defined in peers{advice}")
            return None
        return PeerRef(peer, group if slash else None, mark)

    # -- retention -------------------------------------------------------------------------
    def retention_section(
        self, value: Any, position: Position, key_position: Position
    ) -> OrgRetention | None:
        path = "retention"
        mapping = self.expect_map(value, position, path, "the org's retention keys")
        if mapping is None:
            return None
        self.check_keys(mapping, path, _ORG_RETENTION_KEYS, ("key",), key_position)
        seen: dict[str, Position] = {}
        key = None
        if "key" in mapping:
            key = self.retention_key(
                mapping["key"], mapping.value_position("key"), _join(path, "key"), seen
            )
        previous: list[RetentionKey] = []
        ok = key is not None
        if "previous" in mapping:
            previous_path = _join(path, "previous")
            items = self.expect_list(
                mapping["previous"],
                mapping.value_position("previous"),
                previous_path,
                "the previous retention keys",
            )
            if items is None:
                return None
            if len(items) > MAX_PREVIOUS_RETENTION_KEYS:
                self.error(
                    mapping.value_position("previous"),
                    previous_path,
                    f"{len(items)} previous keys; at most {MAX_PREVIOUS_RETENTION_KEYS} "
                    "(remove those whose rotation is over)",
                )
                ok = False
            for index, item in enumerate(items):
                checked = self.retention_key(
                    item, items.item_position(index), f"{previous_path}[{index}]", seen
                )
                if checked is None:
                    ok = False
                else:
                    previous.append(checked)
        if not ok or key is None:
            return None
        return OrgRetention(key, tuple(previous), self.mark(key_position, path))

    def retention_key(
        self, value: Any, position: Position, path: str, seen: dict[str, Position]
    ) -> RetentionKey | None:
        mapping = self.expect_map(value, position, path, "a retention key {id, public_key}")
        if mapping is None:
            return None
        self.check_keys(mapping, path, _RETENTION_KEY_KEYS, _RETENTION_KEY_KEYS, position)
        key_id = None
        if "id" in mapping:
            id_position = mapping.value_position("id")
            id_path = _join(path, "id")
            key_id = self.expect_str(mapping["id"], id_position, id_path, "a retention key id")
            if key_id is not None and not RETENTION_KEY_ID_RE.fullmatch(key_id):
                self.error(
                    id_position,
                    id_path,
                    f"invalid retention key id {key_id!r}: 1-64 of A-Z a-z 0-9 . _ -, "
                    "starting with a letter or digit",
                )
                key_id = None
            elif key_id is not None and key_id in seen:
                self.error(
                    id_position,
                    id_path,
                    f"retention key id {key_id!r} is used twice (first at line "
                    f"{seen[key_id].line}); an id names one key forever",
                )
                key_id = None
            elif key_id is not None:
                seen[key_id] = id_position
        public_key = None
        if "public_key" in mapping:
            key_position = mapping.value_position("public_key")
            key_path = _join(path, "public_key")
            text = self.expect_str(mapping["public_key"], key_position, key_path, "a public key")
            if text is not None:
                try:
                    public_key = parse_retention_key(text)
                except ValueError as exc:
                    self.error(key_position, key_path, str(exc))
        if key_id is None or public_key is None:
            return None
        return RetentionKey(key_id, public_key, self.mark(position, path))

    def group_retention(self, spec: MarkedMap, path: str) -> GroupRetention | None:
        if "retention" not in spec:
            return GroupRetention()
        path = _join(path, "retention")
        key_position = spec.key_position("retention")
        mapping = self.expect_map(
            spec["retention"], spec.value_position("retention"), path, "the group's retention"
        )
        if mapping is None:
            return None
        self.check_keys(mapping, path, _GROUP_RETENTION_KEYS, (), key_position)
        ok = True
        directions: dict[str, bool] = {"outbound": False, "inbound": False}
        for direction in directions:
            if direction not in mapping:
                continue
            value = mapping[direction]
            if value is False:  # YAML 1.1 reads an unquoted `off` as false
                continue
            if not isinstance(value, str) or value not in _RETENTION_CHOICES:
                self.error(
                    mapping.value_position(direction),
                    _join(path, direction),
                    f"expected one of {', '.join(_RETENTION_CHOICES)}; got {_describe(value)}",
                )
                ok = False
                continue
            directions[direction] = value == _RETENTION_REQUIRED
        keep = 0
        active = directions["outbound"] or directions["inbound"]
        if "keep" in mapping:
            keep_position = mapping.value_position("keep")
            keep_path = _join(path, "keep")
            raw = mapping["keep"]
            try:
                keep = parse_period(raw)
            except ValueError as exc:
                self.error(keep_position, keep_path, str(exc))
                ok = False
            else:
                if not MIN_KEEP_SECONDS <= keep <= MAX_KEEP_SECONDS:
                    self.error(
                        keep_position,
                        keep_path,
                        f"{raw} is out of range {format_period(MIN_KEEP_SECONDS)}-"
                        f"{format_period(MAX_KEEP_SECONDS)}",
                    )
                    ok = False
                elif not active and ok:
                    self.error(
                        keep_position,
                        keep_path,
                        "keep without outbound or inbound: required keeps nothing",
                    )
                    ok = False
        elif active:
            self.error(
                key_position,
                _join(path, "keep"),
                "missing required key 'keep' (how long the archive keeps a copy, like 7y)",
            )
            ok = False
        if active and not self.retention_written:
            self.error(
                key_position,
                path,
                "retention is required here, but the rules have no org-level retention: "
                "section naming the key to wrap for",
            )
            ok = False
        if not ok:
            return None
        return GroupRetention(
            directions["outbound"], directions["inbound"], keep, self.mark(key_position, path)
        )

    # -- limits --------------------------------------------------------------------------
    def limits(self, spec: MarkedMap, path: str) -> Limits | None:
        if "limits" not in spec:
            return Limits()
        path = _join(path, "limits")
        mapping = self.expect_map(spec["limits"], spec.value_position("limits"), path, "the limits")
        if mapping is None:
            return None
        self.check_keys(mapping, path, _LIMIT_KEYS, (), spec.key_position("limits"))
        ok = True

        max_bytes = DEFAULT_MAX_ENVELOPE_BYTES
        max_bytes_mark = None
        if "max_envelope_bytes" in mapping:
            value = mapping["max_envelope_bytes"]
            position = mapping.value_position("max_envelope_bytes")
            value_path = _join(path, "max_envelope_bytes")
            if type(value) is not int:
                self.error(position, value_path, f"expected an integer, got {_describe(value)}")
                ok = False
            elif not MIN_ENVELOPE_BYTES <= value <= PROTOCOL_MAX_ENVELOPE_BYTES:
                self.error(
                    position,
                    value_path,
                    f"{value} is out of range {MIN_ENVELOPE_BYTES}-{PROTOCOL_MAX_ENVELOPE_BYTES} "
                    "(the protocol's hard cap is 1 MiB)",
                )
                ok = False
            else:
                max_bytes = value
                max_bytes_mark = self.mark(position, value_path)

        ttl = DEFAULT_TTL
        ttl_mark = None
        if "ttl" in mapping:
            ttl_path = _join(path, "ttl")
            checked = self.ttl(
                mapping["ttl"], mapping.value_position("ttl"), mapping.key_position("ttl"), ttl_path
            )
            if checked is None:
                ok = False
            else:
                ttl = checked
                ttl_mark = self.mark(mapping.key_position("ttl"), ttl_path)

        burn = BurnOnRead.OPTIONAL
        burn_mark = None
        if "burn_on_read" in mapping:
            value = mapping["burn_on_read"]
            position = mapping.value_position("burn_on_read")
            value_path = _join(path, "burn_on_read")
            if not isinstance(value, str) or value not in _BURN_CHOICES:
                choices = ", ".join(_BURN_CHOICES)
                self.error(
                    position, value_path, f"expected one of {choices}; got {_describe(value)}"
                )
                ok = False
            else:
                burn = BurnOnRead(value)
                burn_mark = self.mark(position, value_path)

        if not ok:
            return None
        return Limits(max_bytes, ttl, burn, max_bytes_mark, ttl_mark, burn_mark)

    def ttl(
        self, value: Any, position: Position, key_position: Position, path: str
    ) -> TtlBounds | None:
        mapping = self.expect_map(value, position, path, "the TTL bounds {min, default, max}")
        if mapping is None:
            return None
        self.check_keys(mapping, path, _TTL_KEYS, (), key_position)
        seconds = {"min": DEFAULT_TTL.min, "default": DEFAULT_TTL.default, "max": DEFAULT_TTL.max}
        given: dict[str, Position] = {}
        written: dict[str, str] = {}
        ok = True
        for key in _TTL_KEYS:
            if key not in mapping:
                continue
            item_position = mapping.value_position(key)
            item_path = _join(path, key)
            raw = mapping[key]
            if not isinstance(raw, str):
                self.error(
                    item_position,
                    item_path,
                    f"expected a duration like 90s, 15m, 1d; got {_describe(raw)}",
                )
                ok = False
                continue
            try:
                parsed = parse_duration(raw)
            except ValueError as exc:
                self.error(item_position, item_path, str(exc))
                ok = False
                continue
            if not MIN_TTL_SECONDS <= parsed <= MAX_TTL_SECONDS:
                self.error(
                    item_position,
                    item_path,
                    f"{raw} is out of range {format_duration(MIN_TTL_SECONDS)}-"
                    f"{format_duration(MAX_TTL_SECONDS)}",
                )
                ok = False
                continue
            seconds[key] = parsed
            given[key] = item_position
            written[key] = raw
        if not ok:
            return None

        def shown(key: str) -> str:
            if key in written:
                return f"{key} {written[key]}"
            return f"{key} {format_duration(seconds[key])} (implied)"

        def where(*keys: str) -> tuple[Position, str]:
            for key in keys:
                if key in given:
                    return given[key], _join(path, key)
            return key_position, path

        if seconds["min"] > seconds["max"]:
            pos, at = where("min", "max")
            self.error(pos, at, f"{shown('min')} is above {shown('max')}")
            return None
        if not seconds["min"] <= seconds["default"] <= seconds["max"]:
            pos, at = where("default", "max", "min")
            self.error(pos, at, f"{shown('default')} is outside [{shown('min')}, {shown('max')}]")
            return None
        return TtlBounds(seconds["min"], seconds["default"], seconds["max"])
