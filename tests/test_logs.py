"""Logs go through `logging`: readable lines, or one JSON object per line that a collector can parse."""

from __future__ import annotations

import io
import json
import logging

import pytest

from heterorl.common import config as config_lib
from heterorl.common.logs import LoggingConfig, setup_logging


@pytest.fixture
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_parse_and_carry_extra_fields(restore_root_logger):
    stream = io.StringIO()
    setup_logging("info", "json", stream=stream)
    log = logging.getLogger("heterorl.test")
    log.info("accepted %d groups", 3, extra={"sampler_id": "s-1", "version": 7})
    log.debug("not written at info")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("reward failed")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "accepted 3 groups" and first["level"] == "info"
    assert first["logger"] == "heterorl.test" and first["sampler_id"] == "s-1" and first["version"] == 7
    assert first["time"].endswith("+00:00")
    assert second["level"] == "error" and "RuntimeError: boom" in second["exception"]


def test_text_format_and_level(restore_root_logger):
    stream = io.StringIO()
    setup_logging("warning", "text", stream=stream)
    logging.getLogger("heterorl.test").info("hidden")
    logging.getLogger("heterorl.test").warning("shown")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].endswith("WARNING heterorl.test: shown")
    setup_logging("debug", "text", stream=stream)  # calling again replaces the handler, no doubled lines
    logging.getLogger("heterorl.test").debug("once")
    assert stream.getvalue().count("once") == 1


def test_logging_section_validates_and_parses_from_flags():
    with pytest.raises(ValueError, match="log_format"):
        LoggingConfig(log_format="xml")
    with pytest.raises(ValueError, match="log_level"):
        setup_logging("loud", "text")
    config = config_lib.parse(LoggingConfig, "daemon", "", ["--log-level", "DEBUG", "--log-format", "json"])
    assert config == LoggingConfig("debug", "json")
