"""``gateway bench --profile``: where each gateway's CPU goes, sampled by py-spy.

py-spy samples a running Python process from outside (ptrace), so the
gateways run exactly as in any other bench run, with no profiler inside them.
While the measured run lasts, one ``py-spy record --format raw`` per gateway
writes **collapsed stacks** (``frame;frame;...;frame count`` per line: what
flamegraph.pl, speedscope and inferno read) to ``DIR/<org>.folded``; the
report adds each gateway's busiest functions by own time and by time
including callees (:func:`summarize`, pure).

Sampling costs the gateways a little (``--nonblocking``: the process is never
paused, so a sample may rarely tear), so the figures of a ``--profile`` run
are for reading the profile beside, not for docs/performance.md.
"""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from gateway.errors import GatewayError

SAMPLE_RATE: Final = 200  # samples a second per gateway
TOP: Final = 15  # functions listed per gateway and per ranking
STOP_TIMEOUT: Final = 30.0  # seconds py-spy may take to write its file after SIGINT
#: Frames of the event loop waiting for work: idle, not CPU.
_IDLE_LEAVES: Final = ("select (selectors.py", "poll (selectors.py", "epoll", "get_events")


class ProfileError(GatewayError):
    """py-spy is missing, cannot attach, or wrote nothing."""


def find_py_spy() -> str:
    """The py-spy executable: beside this interpreter (a venv), else on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    if beside.exists():
        return str(beside)
    found = shutil.which("py-spy")
    if found is None:
        raise ProfileError("--profile needs py-spy: pip install py-spy")
    return found


@dataclass
class Recording:
    """One running ``py-spy record`` attached to one gateway."""

    name: str
    pid: int
    output: Path
    process: subprocess.Popen[bytes]
    log: IO[bytes] = field(repr=False)

    def stop(self) -> Path:
        """Stop sampling; the collapsed stacks are then in :attr:`output`."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        if not self.output.exists() or self.output.stat().st_size == 0:
            log_path = self.output.with_suffix(".py-spy.log")
            text = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            raise ProfileError(f"py-spy wrote no profile of {self.name} (pid {self.pid}): {text}")
        return self.output


def start_recording(name: str, pid: int, directory: Path) -> Recording:
    """Attach ``py-spy record`` to ``pid``; its stacks go to ``directory/<name>.folded``."""
    directory.mkdir(parents=True, exist_ok=True)
    output = directory / f"{name}.folded"
    log = open(directory / f"{name}.py-spy.log", "wb")  # noqa: SIM115 - closed by stop()
    command = [
        find_py_spy(),
        "record",
        "--pid",
        str(pid),
        "--rate",
        str(SAMPLE_RATE),
        "--nonblocking",
        "--format",
        "raw",
        "--output",
        str(output),
    ]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    return Recording(name=name, pid=pid, output=output, process=process, log=log)


def _frame_name(frame: str) -> str:
    """``func (path/to/module.py:123)`` as ``func (module.py)``: one name per function."""
    function, _, where = frame.partition(" (")
    path = where.rstrip(")").rpartition(":")[0] or where.rstrip(")")
    return f"{function} ({Path(path).name})" if path else function


def summarize(lines: Iterable[str], *, top: int = TOP) -> dict[str, Any]:
    """Rank functions in collapsed stacks: by own samples and by samples in their stacks.

    Idle samples (the event loop waiting in ``select``/``epoll``) are counted
    apart, so the shares are of the time the gateway was busy.
    """
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = idle = 0
    for line in lines:
        stack, _, count_text = line.rstrip("\n").rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(frame) for frame in stack.split(";") if frame]
        if not frames:
            continue
        if any(marker in stack.rpartition(";")[2] for marker in _IDLE_LEAVES):
            idle += count
            continue
        samples += count
        own[frames[-1]] += count
        for name in set(frames):
            total[name] += count

    def ranked(counter: collections.Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": name, "samples": n, "share": n / samples if samples else 0.0}
            for name, n in counter.most_common(top)
        ]

    return {
        "busy_samples": samples,
        "idle_samples": idle,
        "by_own_time": ranked(own),
        "by_total_time": ranked(total),
    }


def summarize_file(path: Path, *, top: int = TOP) -> dict[str, Any]:
    with path.open(encoding="utf-8", errors="replace") as handle:
        summary = summarize(handle, top=top)
    summary["file"] = str(path)
    return summary
