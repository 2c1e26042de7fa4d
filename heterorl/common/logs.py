"""Logging for both daemons through the standard `logging` module: readable lines or one JSON object per line.

Modules log with `logging.getLogger(__name__)`; a daemon calls `setup_logging` once from its `LoggingConfig`
section (`--log-level`, `--log-format`). JSON lines carry any `extra={...}` fields of a record, so a log
collector gets the numbers (sampler id, version, groups) without parsing the message.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import IO

from heterorl.common.config import field

LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from `extra=` and goes into the JSON object.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


@dataclass
class LoggingConfig:
    """The logging section of a daemon's config."""

    log_level: str = field("info", "least severe records written: " + " | ".join(LEVELS))
    log_format: str = field("text", "text (one readable line per record) or json (one JSON object per line)")

    def __post_init__(self) -> None:
        self.log_level = self.log_level.lower()
        if self.log_level not in LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LEVELS)}, got {self.log_level!r}")
        if self.log_format not in FORMATS:
            raise ValueError(f"log_format must be text or json, got {self.log_format!r}")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, `extra` fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and k not in entry})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str = "info", fmt: str = "text", stream: IO[str] | None = None) -> None:
    """Send every record at `level` or above to `stream` (default stderr), replacing earlier handlers."""
    config = LoggingConfig(level, fmt)  # validates both
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if config.log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=config.log_level.upper(), handlers=[handler], force=True)
    logging.captureWarnings(True)  # library warnings become records too, so a JSON log stays all JSON


def stop_on_signals(doing: str) -> threading.Event:
    """An event that SIGTERM and SIGINT set, so a daemon finishes `doing` (e.g. "the current step") and stops
    cleanly instead of dying mid-write; call from the main thread."""
    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        logging.getLogger("heterorl").info("received signal %d; finishing %s and stopping", signum, doing)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop
