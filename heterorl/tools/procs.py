"""Stopping the daemons a command or benchmark started: one way, used by the demo, the benchmarks and netns."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterable


def stop_processes(procs: Iterable[subprocess.Popen | None], grace_s: float = 15.0) -> None:
    """SIGTERM every process still running (daemons then finish their step and save), wait up to `grace_s` for all
    of them together, then SIGKILL whatever is left and reap it."""
    procs = [p for p in procs if p is not None]
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.time() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
