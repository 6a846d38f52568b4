"""Logging set-up: readable text by default, JSON lines when configured.

Every module logs through ``logging.getLogger("gateway.<part>")``. Events
that matter carry their fields in ``extra={"event": ..., ...}``; the JSON
formatter puts those fields at the top level of each line so a log shipper
can index them, and the text formatter appends them as ``key=value``.

What never reaches a log: payloads and ciphertexts, tokens, private keys.
Callers pass identifiers (envelope id, peer, group, reason), never content.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Literal, TextIO

LogFormat = Literal["text", "json"]

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
) | {"message", "asctime", "taskName"}


def _extra_fields(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(_extra_fields(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = _extra_fields(record)
        if extra:
            text += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return text


def configure_logging(
    *, fmt: LogFormat = "text", level: str = "info", stream: TextIO | None = None
) -> None:
    """Send the ``gateway`` loggers to ``stream`` (stderr) in the chosen format."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logger = logging.getLogger("gateway")
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
