"""Progress of long actions: a bar on a terminal, plain lines in a log.

Model conversion, weight downloads, evaluation, training and checkpoint writes can take minutes. On a terminal a
tqdm bar shows how far they are; where the output is a file or a pipe (a daemon's log, `make demo`'s log files, a
collector), redrawn bars would be garbage, so the same progress becomes an ordinary line every `every_s` seconds
(through the caller's logger, so `--log-format json` stays JSON), and a closing line if any was written. Actions
shorter than `every_s` write nothing in a log: the daemons already log their outcome.

`HETERORL_PROGRESS=bars|lines|off` overrides the choice. `quiet_library_bars` turns off the bars transformers
and huggingface_hub draw themselves (saving and converting models) wherever ours would be lines.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import IO

MODE_ENV = "HETERORL_PROGRESS"
MODES = ("bars", "lines", "off")


def mode(stream: IO[str] | None = None) -> str:
    """bars on a terminal, lines elsewhere, unless $HETERORL_PROGRESS says otherwise."""
    forced = os.environ.get(MODE_ENV, "").strip().lower()
    if forced in MODES:
        return forced
    stream = stream if stream is not None else sys.stderr
    try:
        return "bars" if stream.isatty() else "lines"
    except (AttributeError, ValueError):  # a closed or file-less stream
        return "lines"


def quiet_library_bars(stream: IO[str] | None = None) -> None:
    """Where our progress is lines, keep the libraries' own bars (\\r redraws) out of the log too."""
    if mode(stream) == "bars":
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass
    try:  # GGUF dequantization draws a plain tqdm bar that neither switch above reaches
        import functools

        from transformers import modeling_gguf_pytorch_utils as gguf_utils

        if not isinstance(gguf_utils.tqdm, functools.partial):
            gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)
    except (ImportError, AttributeError):
        pass


def _columns(stream: IO[str]) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


def _amount(value: float, binary: bool) -> str:
    if not binary:
        return f"{value:,.0f}" if value == int(value) else f"{value:,.1f}"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f}s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """Counts `update`s toward `total` (None: unknown). `unit="B"` shows bytes (KiB/MiB, rate per second).

    `tick=True` is for one opaque call (a library's save or convert) that reports nothing while it runs: the bar's
    clock, or a "still running" line every `every_s`, keeps moving from a background thread until `close`.
    """

    def __init__(self, what: str, total: float | None = None, unit: str = "", *, log: logging.Logger | None = None,
                 stream: IO[str] | None = None, every_s: float = 15.0, tick: bool = False, delay_s: float = 0.5,
                 initial: float = 0, estimate: bool = True):
        self.what, self.total, self.unit = what, total, unit
        self.binary = unit == "B"
        # Lines go through the logger where logging is set up (daemons); a plain CLI writes them to the stream.
        self.log = log if log is not None and log.hasHandlers() else None
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = every_s
        self.mode = mode(self.stream)
        self.initial = self.done = initial  # an int stays an int: tqdm shows "2/6 steps", not "2.0/6"
        self.estimate = estimate  # rate and time left; False for a few unequal stages
        self.note = ""
        self.started = self.last_line = time.monotonic()
        self.lines = 0
        self.closed = False
        self._lock = threading.Lock()
        self._bar = None
        if self.mode == "bars":
            from tqdm import tqdm

            sized = _columns(self.stream) > 0  # a terminal that reports no size (a bare pty) gets 100 columns
            self._bar = tqdm(total=total, desc=what, unit=unit or "it", unit_scale=self.binary,
                             unit_divisor=1024 if self.binary else 1000, file=self.stream, delay=delay_s,
                             dynamic_ncols=sized, ncols=None if sized else 100, mininterval=0.25, leave=True,
                             initial=initial,
                             bar_format="{desc}: running {elapsed}" if total is None and not unit else None)
            _redirect_logs(self.stream, +1)
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()
        if tick and self.mode != "off":
            self._ticker = threading.Thread(target=self._tick, name=f"progress:{what}", daemon=True)
            self._ticker.start()

    # -- counting

    def update(self, n: float = 1, note: str | None = None) -> None:
        """Count `n` more; `note` names what runs now (e.g. the next stage)."""
        with self._lock:
            if self.closed:
                return
            self.done += n
            if note is not None:
                self.note = note
            if self._bar is not None:
                if note is not None:
                    self._bar.set_postfix_str(note, refresh=False)
                self._bar.update(n)
            elif self.mode == "lines" and time.monotonic() - self.last_line >= self.every_s:
                self._line(self._status())

    def set(self, done: float) -> None:
        """Jump to an absolute count (e.g. bytes verified so far)."""
        self.update(done - self.done)

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._stop.set()
            if self._bar is not None:
                self._bar.close()
                _redirect_logs(self.stream, -1)
            elif self.mode == "lines" and self.lines:  # a long action: say that it ended, and how fast
                elapsed = time.monotonic() - self.started
                amount = f"{_amount(self.done, self.binary)}{self._unit()} " if self.done else ""
                self._line(f"{self.what}: done, {amount}in {_duration(elapsed)}{self._rate(elapsed)}")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- lines

    def _unit(self) -> str:
        return "" if self.binary or not self.unit else f" {self.unit}"

    def _rate(self, elapsed: float) -> str:
        counted = self.done - self.initial
        if counted <= 0 or elapsed <= 0 or not self.estimate:
            return ""
        return f" ({_amount(counted / elapsed, self.binary)}{'' if self.binary else ' ' + (self.unit or 'it')}/s)"

    def _status(self) -> str:
        elapsed = time.monotonic() - self.started
        if self.total:
            share = min(1.0, self.done / self.total)
            counted = self.done - self.initial
            left = (self.total - self.done) * elapsed / counted if counted > 0 and self.done < self.total else None
            eta = f", about {_duration(left)} left" if left is not None and self.estimate else ""
            note = f", {self.note}" if self.note else ""
            return (f"{self.what}: {_amount(self.done, self.binary)}/{_amount(self.total, self.binary)}{self._unit()} "
                    f"({share:.0%}) in {_duration(elapsed)}{self._rate(elapsed)}{eta}{note}")
        if self.done:
            return f"{self.what}: {_amount(self.done, self.binary)}{self._unit()} in {_duration(elapsed)}" \
                   f"{self._rate(elapsed)}"
        return f"{self.what}: still running after {_duration(elapsed)}"

    def _line(self, text: str) -> None:
        self.lines += 1
        self.last_line = time.monotonic()
        if self.log is not None:
            self.log.info("%s", text)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def _tick(self) -> None:
        interval = 0.5 if self._bar is not None else self.every_s
        while not self._stop.wait(interval):
            with self._lock:
                if self.closed:
                    return
                if self._bar is not None:
                    self._bar.refresh()  # the elapsed time moves although nothing was counted
                elif time.monotonic() - self.last_line >= self.every_s:
                    self._line(self._status())


class _BarSafeStream:
    """What a console log handler writes to while a bar is drawn: each record goes above the bar (tqdm.write)."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def write(self, text: str) -> None:
        from tqdm import tqdm

        tqdm.write(text.rstrip("\n"), file=self.stream)

    def flush(self) -> None:
        self.stream.flush()


_redirect_lock = threading.Lock()
_redirected: dict[int, list[logging.StreamHandler]] = {}  # id(stream) -> handlers moved while bars are open
_open_bars: dict[int, int] = {}


def _redirect_logs(stream: IO[str], delta: int) -> None:
    """While any bar is open on `stream`, the root logger's handlers on that stream write above the bars."""
    key = id(stream)
    with _redirect_lock:
        count = _open_bars.get(key, 0) + delta
        _open_bars[key] = count
        if delta > 0 and count == 1:
            moved = [h for h in logging.getLogger().handlers
                     if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is stream]
            for handler in moved:
                handler.setStream(_BarSafeStream(stream))
            _redirected[key] = moved
        elif delta < 0 and count == 0:
            for handler in _redirected.pop(key, []):
                handler.setStream(stream)
            _open_bars.pop(key, None)


def activity(what: str, *, log: logging.Logger | None = None, stream: IO[str] | None = None,
             every_s: float = 15.0) -> Progress:
    """Progress of one long call that reports nothing itself (converting a model, writing a checkpoint)."""
    return Progress(what, None, log=log, stream=stream, every_s=every_s, tick=True)
