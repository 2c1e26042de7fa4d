"""Shared fixtures: an isolated model cache, a tiny-model learner config, processes that always get cleaned up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """A model cache of the test session's own (the tiny model is built into it once)."""
    from heterorl.common.model import resolve_model

    cache = tmp_path_factory.mktemp("heterorl-cache")
    resolve_model("tiny", cache=cache)
    return cache


def tiny_learner_args(run_dir: Path, **overrides) -> list[str]:
    """Flags for a fast learner on the tiny model; the dense digit_fraction reward gives groups signal."""
    settings = {
        "host": "127.0.0.1",
        "port": 0,
        "run-dir": str(run_dir),
        "model": "tiny",
        "task": "arithmetic",
        "reward": "digit_fraction",
        "group-size": 4,
        "groups-per-step": 2,
        "max-new-tokens": 8,
        "lr": 1e-3,
        "eval-every": 2,
        "eval-size": 8,
        "chunk-bytes": 65536,
        "lease-ttl-s": 60,
        "threads": 1,
    }
    settings.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return [item for k, v in settings.items() for item in (f"--{k}", str(v))]


def varint(n: int) -> bytes:
    """Protobuf base-128 varint: hand-built wire bytes for tests that send what a real client would not."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class Processes:
    """Start real daemons as subprocesses; kill whatever is left when the test ends."""

    def __init__(self, cache: Path, logs: Path):
        self.env = {**os.environ, "HETERORL_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
        self.logs = logs
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, module: str, args: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=self.env, cwd=REPO,
        )
        proc.log_path = self.logs / f"{name}.log"  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def learner(self, run_dir: Path, timeout: float = 120, **overrides) -> tuple[subprocess.Popen, str]:
        proc = self.start("learner", "heterorl.server.main", tiny_learner_args(run_dir, **overrides))
        address = run_dir / "learner.json"
        deadline = time.time() + timeout
        while not address.exists():
            if proc.poll() is not None:
                raise AssertionError(f"learner exited with {proc.returncode}:\n{proc.log_path.read_text()}")
            if time.time() > deadline:
                raise AssertionError("learner did not come up in time")
            time.sleep(0.2)
        return proc, f"127.0.0.1:{json.loads(address.read_text())['port']}"

    def sampler(self, name: str, target: str, *extra: str) -> subprocess.Popen:
        """A sampler on the transformers engine (it starts in a second; vLLM, the default where installed, takes
        tens); pass `"--engine", "vllm"` in `extra` for the other (the last flag wins)."""
        return self.start(name, "heterorl.node.main", ["--learner", target, "--name", name, "--threads", "1",
                                                         "--heartbeat-s", "1", "--engine", "transformers", *extra])

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def processes(tiny_cache, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Processes(tiny_cache, logs)
    yield procs
    procs.stop_all()
