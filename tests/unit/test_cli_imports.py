"""Each command pays at start-up only for what it runs.

Every ``gateway`` invocation builds the whole argparse tree, so registering the
commands (and so ``gateway --help`` and ``gateway X --help``) must import only
the standard library and the gateway's light modules: no third-party library
(trio, httpx, prometheus_client, cryptography, yaml, ...) and none of the
gateway's modules that parse configs or rules, open storage, or speak HTTP. A
command's handler imports what it needs when it runs. Checked in a fresh
interpreter: this one has imported everything already.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

# The gateway's modules that no registration may need; each pulls in a
# third-party library or a layer above the pure core (see gateway/cli/main.py).
HANDLER_ONLY = (
    "gateway.app",
    "gateway.client",
    "gateway.clientapi",
    "gateway.cli.retention_open",
    "gateway.cluster",
    "gateway.config",
    "gateway.core.rules",
    "gateway.core.yamlmarks",
    "gateway.crypto",
    "gateway.federation",
    "gateway.http",
    "gateway.observability",
    "gateway.pki.certs",
    "gateway.pki.dev",
    "gateway.storage.opening",
    "gateway.storage.postgres",
    "gateway.storage.sqlite",
)


def modules_after(code: str) -> set[str]:
    """The names in ``sys.modules`` once ``code`` has run in a fresh interpreter."""
    script = textwrap.dedent(code) + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def at_start() -> set[str]:
    """What the interpreter loads before any of our code (site, .pth hooks)."""
    return modules_after("")


def third_party(modules: set[str], at_start: set[str]) -> set[str]:
    tops = {name.partition(".")[0] for name in modules - at_start}
    return tops - set(sys.stdlib_module_names) - {"gateway"}


def handler_only(modules: set[str]) -> set[str]:
    return {
        name
        for name in modules
        if any(name == prefix or name.startswith(prefix + ".") for prefix in HANDLER_ONLY)
    }


def test_building_the_parser_imports_no_library_and_no_handler_module(at_start: set[str]) -> None:
    modules = modules_after("from gateway.cli.main import build_parser\nbuild_parser()")
    assert third_party(modules, at_start) == set()
    assert handler_only(modules) == set()
    # Every command module took part, so each one is held to the rule.
    assert {"gateway.cli.peers", "gateway.cli.client", "gateway.cli.pki"} <= modules


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["--version"],
        ["peers", "--help"],
        ["spool", "ls", "--help"],
        ["rules", "explain", "--help"],
        ["client", "send", "--help"],
        ["pki", "--help"],
        ["retention", "open", "--help"],
    ],
)
def test_help_imports_no_library_and_no_handler_module(argv: list[str], at_start: set[str]) -> None:
    modules = modules_after(
        f"""
        import contextlib, io
        from gateway.cli.main import main
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                main({argv!r})
            except SystemExit as exc:
                assert exc.code == 0, exc.code
        """
    )
    assert third_party(modules, at_start) == set()
    assert handler_only(modules) == set()


def test_a_handler_still_gets_what_it_imports_when_it_runs(at_start: set[str]) -> None:
    # The other side of the rule: the imports moved into the handlers happen.
    modules = modules_after(
        """
        import contextlib, io
        from gateway.cli.main import main
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["rules", "check", "/nonexistent/rules.yaml"]) == 2
        """
    )
    assert "gateway.core.rules" in modules
    assert "httpx" not in third_party(modules, at_start)
