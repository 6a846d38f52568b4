"""gateway.yaml: the model, its defaults, and an error that names file and key for each mistake."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gateway.cli.init import InitOptions, render_config
from gateway.config import (
    NODE_NAME_RE,
    SQLITE_FILENAME,
    ClientTLSConfig,
    HostPort,
    Limits,
    ListenConfig,
    default_node_name,
    load_config,
    parse_host_port,
)
from gateway.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert "\n" not in message
    return message


def test_what_init_writes_loads(tmp_path: Path) -> None:
    options = InitOptions(
        org="acme.example",
        directory=tmp_path,
        federation=HostPort("0.0.0.0", 8443),
        client=HostPort("::1", 8080),
        metrics=HostPort("127.0.0.1", 9090),
        endpoint="https://gw.acme.example:8443",
        validity_days=90,
        force=False,
    )
    config = load_config(write(tmp_path, render_config(options)))
    assert config.path == tmp_path / "gateway.yaml"
    assert config.org == "acme.example"
    assert config.data_dir == tmp_path / "data"
    assert config.rules == tmp_path / "rules.yaml"
    assert config.signing_key == tmp_path / "keys" / "org-signing.key"
    assert config.tls.cert == tmp_path / "pki" / "gateway.pem"
    assert config.tls.key == tmp_path / "pki" / "gateway.key"
    assert config.tls.ca == tmp_path / "pki" / "ca.pem"
    assert config.client_tls == ClientTLSConfig(
        cert=tmp_path / "pki" / "client-api.pem", key=tmp_path / "pki" / "client-api.key"
    )
    assert config.listen == ListenConfig(
        federation=HostPort("0.0.0.0", 8443),
        client=HostPort("::1", 8080),
        metrics=HostPort("127.0.0.1", 9090),
    )
    assert str(config.listen.client) == "[::1]:8080"
    assert config.endpoint == "https://gw.acme.example:8443"
    assert config.storage.engine == "sqlite"
    assert config.storage.sqlite_path == tmp_path / "data" / SQLITE_FILENAME
    assert config.limits == Limits()


def test_a_gateway_of_several_nodes_gives_every_endpoint(tmp_path: Path) -> None:
    text = "org: acme.example\nendpoint: ['https://gw1.acme.example', 'https://gw2.acme.example']\n"
    config = load_config(write(tmp_path, text))
    assert config.endpoints == ("https://gw1.acme.example", "https://gw2.acme.example")
    assert config.endpoint == "https://gw1.acme.example"


def test_only_org_is_required(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "org: Acme.Example\n"))
    assert config.org == "acme.example"
    assert config.tls.cert == tmp_path / "pki" / "gateway.pem"
    assert config.listen == ListenConfig()
    assert config.endpoint == "https://acme.example:8443"
    assert config.limits == Limits()
    assert config.base_dir == tmp_path


def test_paths_are_relative_to_the_file_and_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sub = tmp_path / "etc"
    sub.mkdir()
    (sub / "gateway.yaml").write_text(
        "org: acme.example\ndata_dir: ../var/data\nrules: /srv/rules.yaml\n"
    )
    monkeypatch.chdir(tmp_path)
    config = load_config("etc/gateway.yaml")
    assert config.path == sub / "gateway.yaml"
    assert config.data_dir == tmp_path / "var" / "data"
    assert config.rules == Path("/srv/rules.yaml")


def test_client_tls_plain_and_postgres(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            "org: acme.example\nclient_tls: plain\n"
            "storage: postgresql://gw:s3cret@db.internal/gateway\n",
        )
    )
    assert config.client_tls is None
    assert config.storage.engine == "postgresql"
    assert config.storage.url == "postgresql://gw:s3cret@db.internal/gateway"
    assert "s3cret" not in repr(config)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("client_tls: {cert: c.pem, key: k.pem}\n", "1.3"),
        ("client_tls: {cert: c.pem, key: k.pem, min_version: '1.3'}\n", "1.3"),
        ("client_tls: {cert: c.pem, key: k.pem, min_version: '1.2'}\n", "1.2"),
        ("client_tls: {cert: c.pem, key: k.pem, min_version: 1.2}\n", "1.2"),  # YAML's number
    ],
)
def test_client_tls_min_version(tmp_path: Path, text: str, expected: str) -> None:
    config = load_config(write(tmp_path, "org: acme.example\n" + text))
    assert config.client_tls is not None
    assert config.client_tls.min_version == expected


@pytest.mark.parametrize("value", ["'1.1'", "1.0", "TLSv1.2", "true", "12"])
def test_client_tls_min_version_refuses_anything_else(tmp_path: Path, value: str) -> None:
    text = f"org: acme.example\nclient_tls:\n  cert: c.pem\n  min_version: {value}\n"
    message = error_of(tmp_path, text)
    assert 'gateway.yaml:4:16: client_tls.min_version: expected "1.3"' in message


def test_limits_accept_durations_and_seconds(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            "org: acme.example\nlimits:\n  backoff_initial: 2\n  backoff_max: 10m\n"
            "  max_transaction_envelopes: 10\n",
        )
    )
    assert config.limits.backoff_initial == 2.0
    assert config.limits.backoff_max == 600.0
    assert config.limits.max_transaction_envelopes == 10
    assert config.limits.max_inflight_transactions == 2  # the default


def test_max_inflight_transactions_is_read(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, "org: acme.example\nlimits:\n  max_inflight_transactions: 1\n")
    )
    assert config.limits.max_inflight_transactions == 1


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "org: acme.example\n"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.org = "globex.example"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("org: acme.example\ntsl: {}\n", "tsl: unknown key (did you mean 'tls'?)"),
        (
            "org: acme.example\ntls: {certt: a.pem}\n",
            "tls.certt: unknown key (did you mean 'cert'?)",
        ),
        (
            "org: acme.example\nlimits: {max_body_byte: 5}\n",
            "limits.max_body_byte: unknown key (did you mean 'max_body_bytes'?)",
        ),
        ("org: acme.example\nzzz: 1\n", "zzz: unknown key; known keys: org,"),
        ("data_dir: x\n", "org: missing"),
        ("org: 5\n", "org: expected a non-empty string"),
        ("org: acme\n", "org: domain 'acme' needs at least two labels"),
        ("org: acme.example\ntls: pki\n", "tls: expected a mapping"),
        ("org: acme.example\ntls: {cert: ''}\n", "tls.cert: expected a non-empty string"),
        ("org: acme.example\nclient_tls: none\n", "client_tls: expected a mapping or `plain`"),
        ("org: acme.example\nlisten: {client: nope}\n", "listen.client: 'nope' is not HOST:PORT"),
        ("org: acme.example\nlisten: {client: 'a:70000'}\n", "listen.client: 'a:70000': port"),
        (
            "org: acme.example\nlisten: {client: '::1:80'}\n",
            "listen.client: '::1:80': write an IPv6",
        ),
        ("org: acme.example\nlisten: {client: 'a b:80'}\n", "listen.client: 'a b:80': host"),
        ("org: acme.example\nlisten: {metrics: 8080}\n", "listen.metrics: expected a quoted"),
        ("org: acme.example\nendpoint: http://x:1\n", "endpoint: 'http://x:1' must be an https"),
        ("org: acme.example\nendpoint: 'https://'\n", "endpoint: 'https://' has no host"),
        ("org: acme.example\nendpoint: 'https://x:99999'\n", "endpoint: 'https://x:99999' is not"),
        ("org: acme.example\nendpoint: []\n", "endpoint: give 1 to 8 endpoint URLs, got 0"),
        (
            "org: acme.example\nendpoint: ['https://a:1', 'http://b:1']\n",
            "endpoint: 'http://b:1' must be an https",
        ),
        (
            "org: acme.example\nendpoint: ['https://a:1', 'https://a:1/']\n",
            "endpoint: an endpoint URL is listed twice",
        ),
        ("org: acme.example\nstorage: mysql\n", "storage: expected sqlite or a postgresql"),
        ("org: acme.example\nlimits: {max_body_bytes: -1}\n", "limits.max_body_bytes: expected"),
        ("org: acme.example\nlimits: {max_body_bytes: true}\n", "limits.max_body_bytes: expected"),
        ("org: acme.example\nlimits: {max_body_bytes: 2199023255553}\n", "from 1 to"),
        ("org: acme.example\nlimits: {backoff_max: 2x}\n", "limits.backoff_max: invalid duration"),
        (
            "org: acme.example\nlimits: {backoff_max: 0}\n",
            "limits.backoff_max: expected a duration",
        ),
        (
            "org: acme.example\nlimits: {backoff_initial: 10m, backoff_max: 5m}\n",
            "limits.backoff_initial: 600.0s is more than limits.backoff_max",
        ),
        (
            "org: acme.example\nlimits: {max_inflight_transactions: 9}\n",
            "limits.max_inflight_transactions: must be within 1..8, got 9",
        ),
        (
            "org: acme.example\nlimits: {max_body_bytes: 10, max_transaction_bytes: 11}\n",
            "limits.max_transaction_bytes: 11 is more than limits.max_body_bytes",
        ),
        ("", "is empty"),
        ("- org\n", "expected a mapping with keys org,"),
        ("org: acme.example\n1: x\n", "key 1 is not a string"),
        ("org: [acme.example\n", "gateway.yaml:2:1: not valid YAML"),
        ("org: a.example\norg: b.example\n", "gateway.yaml:2:1: org: duplicate key 'org'"),
        ("org: a.example\ntls:\n  cert: a\n  cert: b\n", "gateway.yaml:4:3: tls.cert: duplicate"),
    ],
)
def test_mistakes_name_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in error_of(tmp_path, text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("org: acme.example\ntsl: {}\n", "gateway.yaml:2:1: tsl: unknown key"),
        ("org: acme.example\nlimits:\n  max_body_byte: 5\n", "gateway.yaml:3:3: limits.max_body"),
        ("org: acme.example\nlisten:\n  client: nope\n", "gateway.yaml:3:11: listen.client:"),
        ("org: 5\n", "gateway.yaml:1:6: org: expected a non-empty string"),
        ("tls: {}\n", "gateway.yaml: org: missing"),
    ],
)
def test_mistakes_point_at_line_and_column(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in error_of(tmp_path, text)


def test_the_log_section_is_checked(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "org: acme.example\nlog: {format: json, level: debug}\n"))
    assert (config.log.format, config.log.level) == ("json", "debug")
    assert load_config(write(tmp_path, "org: acme.example\n")).log.format == "text"
    assert "log.format: expected one of text, json" in error_of(
        tmp_path, "org: acme.example\nlog: {format: xml}\n"
    )


def test_a_bad_storage_url_is_not_echoed(tmp_path: Path) -> None:
    message = error_of(tmp_path, "org: acme.example\nstorage: mysql://gw:s3cret@db/x\n")
    assert "s3cret" not in message


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"gateway\.yaml: no such file"):
        load_config(tmp_path / "gateway.yaml")
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path / "dir.yaml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8443", HostPort("127.0.0.1", 8443)),
        ("[::1]:0", HostPort("::1", 0)),
        ("gw.acme.example:65535", HostPort("gw.acme.example", 65535)),
        ("localhost:80", HostPort("localhost", 80)),
    ],
)
def test_parse_host_port(text: str, expected: HostPort) -> None:
    assert parse_host_port(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize("text", ["8443", ":8443", "a:", "a:-1", "a:x", "[a]:1", "a:٣"])
def test_parse_host_port_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        parse_host_port(text)


def test_a_node_has_a_name_the_host_s_by_default(tmp_path: Path) -> None:
    named = load_config(write(tmp_path, "org: acme.example\nnode: gw-2.dc1\n"))
    assert named.node == "gw-2.dc1"
    default = load_config(write(tmp_path, "org: acme.example\n"))
    assert default.node == default_node_name()
    assert NODE_NAME_RE.fullmatch(default.node)


@pytest.mark.parametrize("bad", ["GW1", "-gw", "gw_1", "''", "x" * 64, "7"])
def test_a_bad_node_name_is_refused_with_its_key(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError, match="node: expected 1 to 63 of a-z"):
        load_config(write(tmp_path, f"org: acme.example\nnode: {bad}\n"))


def test_the_default_node_name_is_made_valid_from_any_host_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "Build_Box.Example.")
    assert default_node_name() == "build-box.example"
    monkeypatch.setattr("socket.gethostname", lambda: "___")
    assert default_node_name() == "gateway"
