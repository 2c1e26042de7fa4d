"""Progress (heterorl/common/progress.py): a redrawn bar on a real terminal, plain lines anywhere else."""

from __future__ import annotations

import io
import logging
import os
import select
import time

import pytest

from heterorl.common import progress
from heterorl.common.progress import Progress, activity


@pytest.fixture(autouse=True)
def _no_override(monkeypatch):
    monkeypatch.delenv(progress.MODE_ENV, raising=False)


def read_all(fd: int) -> bytes:
    out = b""
    while select.select([fd], [], [], 0.2)[0]:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    return out


def test_a_terminal_gets_a_redrawn_bar():
    master, slave = os.openpty()  # a real pseudo-terminal: isatty() is the kernel's answer, not a stub's
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            assert progress.mode(tty) == "bars"
            with Progress("weights v3", total=4 << 20, unit="B", stream=tty, delay_s=0) as bar:
                for _ in range(4):
                    bar.update(1 << 20)
                    time.sleep(0.3)  # past tqdm's minimum redraw interval
            out = read_all(master).decode(errors="replace")
    finally:
        os.close(master)
        os.close(slave)
    assert "weights v3" in out and "\r" in out, out  # redrawn in place
    assert "100%" in out and "4.00M/4.00M" in out, out  # bytes in binary units
    assert "█" in out or "#" in out, out


def test_a_log_gets_plain_lines_and_a_closing_line():
    stream = io.StringIO()
    assert progress.mode(stream) == "lines"
    with Progress("evaluation", total=10, unit="completions", stream=stream, every_s=0) as bar:
        for _ in range(10):
            bar.update()
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) == 11, text  # one per update (every_s=0), then the closing line
    assert lines[0].startswith("evaluation: 1/10 completions (10%) in ")
    assert "left" in lines[0] and "completions/s" in lines[0]
    assert lines[9].startswith("evaluation: 10/10 completions (100%)")
    assert lines[-1].startswith("evaluation: done, 10 completions in ")


def test_lines_go_through_the_callers_logger_and_short_actions_stay_quiet(caplog):
    logger = logging.getLogger("heterorl.test.progress")
    stream = io.StringIO()
    with caplog.at_level(logging.INFO, logger=logger.name):
        with Progress("quick", total=3, stream=stream, log=logger, every_s=60) as bar:
            bar.update(3)
        assert not caplog.records  # shorter than every_s: the daemon's own outcome line is enough
        with Progress("weights v7", total=3 << 20, unit="B", stream=stream, log=logger, every_s=0) as bar:
            bar.set(1 << 20)
            bar.set(3 << 20)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith("weights v7: 1.0 MiB/3.0 MiB (33%)") and "iB/s)" in messages[0]
    assert messages[-1].startswith("weights v7: done, 3.0 MiB in ")
    assert stream.getvalue() == ""  # nothing bypassed the logger


def test_an_opaque_call_keeps_reporting_while_it_runs():
    stream = io.StringIO()
    with activity("converting model.gguf", stream=stream, every_s=0.2):
        time.sleep(0.75)
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 3, lines
    assert lines[0].startswith("converting model.gguf: still running after ")
    assert lines[-1].startswith("converting model.gguf: done, in ")


def test_the_environment_overrides_the_choice(monkeypatch):
    monkeypatch.setenv(progress.MODE_ENV, "off")
    stream = io.StringIO()
    with Progress("anything", total=2, stream=stream, every_s=0) as bar:
        bar.update(2)
    assert stream.getvalue() == ""
    monkeypatch.setenv(progress.MODE_ENV, "lines")
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            assert progress.mode(tty) == "lines"
    finally:
        os.close(master)
        os.close(slave)


def test_log_records_go_above_an_open_bar_and_the_handler_is_restored():
    master, slave = os.openpty()
    root = logging.getLogger()
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            handler = logging.StreamHandler(tty)
            root.addHandler(handler)
            try:
                with Progress("training", total=3, unit="steps", stream=tty, delay_s=0) as bar:
                    bar.update()
                    assert handler.stream is not tty  # moved above the bar while it is drawn
                    logging.getLogger("heterorl.test").warning("step 1: loss 0.5")
                    bar.update(2)
                assert handler.stream is tty
            finally:
                root.removeHandler(handler)
            out = read_all(master).decode(errors="replace")
    finally:
        os.close(master)
        os.close(slave)
    assert "step 1: loss 0.5" in out and "training" in out and "3/3" in out, out
