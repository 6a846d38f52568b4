"""``gateway demo`` through the console script, and its plaintext search on its own.

The demo is the product's first impression and also a proof: these tests
check that it passes, that its search for plaintext would catch plaintext if
there were any (planted in a real data directory the demo left behind), and
that an interrupted demo leaves no gateway process behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.demo import (
    ACME,
    BURN,
    GLOBEX,
    HELLO,
    MESSAGES,
    SEARCH_CHUNK_BYTES,
    find_plaintext,
)

pytestmark = pytest.mark.e2e

GATEWAY = str(Path(sys.executable).parent / "gateway")
DEMO_TIMEOUT = 180


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [GATEWAY, "demo", *args],
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT,
        check=False,
    )


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains ``text`` (read from /proc; nothing is signalled)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            found.append(int(entry.name))
    return found


def test_the_demo_runs_with_no_arguments_and_exits_0() -> None:
    done = run_demo()
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for expected in (
        "[1/9]",
        "[9/9]",
        HELLO,
        "status forwarded",
        "denied by acme's gateway: peer_not_allowed (rule rules.yaml:",
        "a second fetch does not return it",
        "not one found",
        "gateway retention open --key acme-demo.key: chain and signature checked, "
        "2 messages of alice opened",
        "retention overrides burn-on-read for the archive copy only",
        "Everything happened as narrated.",
    ):
        assert expected in out, f"{expected!r} missing from:\n{out}"
    # The temporary directory is gone with its processes.
    base = next(line for line in out.splitlines() if line.startswith("[1/9]")).split(" in ")[-1]
    assert not Path(base).exists()
    assert processes_mentioning(base) == []


def test_the_search_catches_plaintext_planted_in_a_demo_data_dir(tmp_path: Path) -> None:
    kept = tmp_path / "demo"
    done = run_demo("--keep", str(kept))
    assert done.returncode == 0, done.stdout + done.stderr
    roots = [kept / ACME, kept / GLOBEX, kept / f"{ACME}.log", kept / f"{GLOBEX}.log"]
    assert (kept / GLOBEX / "data" / "gateway.sqlite3").is_file()
    clean = find_plaintext(roots, MESSAGES)
    assert clean.hits == ()
    assert clean.files >= 10
    assert clean.bytes > 10_000

    # A copy of the database with one message's text written into its middle.
    database = (kept / GLOBEX / "data" / "gateway.sqlite3").read_bytes()
    middle = len(database) // 2
    planted = kept / GLOBEX / "data" / "planted.sqlite3"
    planted.write_bytes(database[:middle] + BURN.encode("utf-8") + database[middle:])
    report = find_plaintext(roots, MESSAGES)
    assert [(hit.path, hit.text) for hit in report.hits] == [(planted, BURN)]
    assert report.files == clean.files + 1


def test_the_search_is_exact_and_reads_every_byte(tmp_path: Path) -> None:
    data = tmp_path / "data" / "deep" / "er"
    data.mkdir(parents=True)
    text = HELLO.encode("utf-8")
    # Split across the boundary between two chunks of the reader.
    straddle = data / "straddle.bin"
    straddle.write_bytes(os.urandom(SEARCH_CHUNK_BYTES - 7) + text + os.urandom(100))
    # Another case, or base64, is not the plaintext: only exact bytes count.
    (data / "upper.txt").write_bytes(HELLO.upper().encode("utf-8"))
    # A symbolic link out of the searched tree is not followed.
    outside = tmp_path / "outside.txt"
    outside.write_bytes(text)
    (data / "link").symlink_to(outside)
    report = find_plaintext([tmp_path / "data"], [HELLO])
    assert [hit.path for hit in report.hits] == [straddle]
    assert report.files == 2
    assert report.bytes == straddle.stat().st_size + (data / "upper.txt").stat().st_size
    with pytest.raises(ValueError, match="non-empty text"):
        find_plaintext([tmp_path], [""])


def test_an_interrupted_demo_stops_its_gateways(tmp_path: Path) -> None:
    kept = tmp_path / "demo"
    demo = subprocess.Popen(
        [GATEWAY, "demo", "--keep", str(kept)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert demo.stdout is not None
        for line in demo.stdout:
            if line.startswith("[3/9]"):  # both gateways are running now
                break
        gateways = set(processes_mentioning(str(kept))) - {demo.pid}
        assert gateways, "no gateway process was running"
        demo.send_signal(signal.SIGINT)
        _out, err = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode == 130, err
    assert "interrupted" in err
    assert processes_mentioning(str(kept)) == []
