"""The `gateway` entry point: argument handling shared by every command."""

from __future__ import annotations

import pytest

from gateway.cli.main import main, protect_envelope_ids

DASH_ID = "-5jvyl5LgaknE3nhypfZtA"  # a real envelope id: one in 64 begins with "-"


def test_an_envelope_id_that_begins_with_a_dash_is_not_an_option() -> None:
    argv = ["client", "status", "--server", "https://x", DASH_ID]
    assert protect_envelope_ids(argv) == [
        "client",
        "status",
        "--server",
        "https://x",
        "--",
        DASH_ID,
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["client", "status", "AAAAAAAAAAAAAAAAAAAAAA"],  # no dash: untouched
        ["client", "status", "--", DASH_ID],  # already protected
        ["rules", "check", "--json", "-x"],  # options stay options
    ],
)
def test_other_arguments_are_untouched(argv: list[str]) -> None:
    assert protect_envelope_ids(argv) == argv


def test_status_parses_a_dash_id_up_to_the_missing_server(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("GATEWAY_URL", "GATEWAY_TOKEN", "GATEWAY_CA", "GATEWAY_KEYS"):
        monkeypatch.delenv(name, raising=False)
    code = main(["client", "status", DASH_ID])
    err = capsys.readouterr().err
    # The id was taken as the ID, not refused as an unknown option.
    assert "unrecognized arguments" not in err
    assert "usage:" not in err
    assert code != 0


def test_an_interrupt_inside_a_nursery_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Ctrl-C can land while trio runs a nursery (say, in a connect); trio then
    # raises it inside a group, with the error it interrupted as its context.
    def interrupted(_args: object) -> int:
        try:
            raise BlockingIOError(115, "Operation now in progress")
        except BlockingIOError:
            raise BaseExceptionGroup("nursery", [KeyboardInterrupt()]) from None

    import gateway.cli.main as cli_main

    parser = cli_main.build_parser()
    monkeypatch.setattr(cli_main, "build_parser", lambda: parser)
    args = parser.parse_args(["demo"])
    monkeypatch.setattr(parser, "parse_args", lambda _argv: args)
    monkeypatch.setattr(args, "handler", interrupted)
    assert main(["demo"]) == 130
    assert "gateway: interrupted" in capsys.readouterr().err
