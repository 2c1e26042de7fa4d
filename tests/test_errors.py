"""Errors say what to do next: each mistake an operator makes first (a wrong learner address, a refused token, a
run directory that holds another run, a model directory without a tokenizer) ends in one line that names the
cause and the fix, from the real command."""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from heterorl.common.config import from_flat
from heterorl.common.model import load_tokenizer, resolve_model
from heterorl.server.config import LearnerConfig
from heterorl.server.learner import Learner

REPO = Path(__file__).resolve().parent.parent
ADDRESS_FIX = "check --learner HOST:PORT"


def run(module: str, *args: str, cache: Path, timeout: float = 120, env: dict | None = None):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env={**os.environ, "HETERORL_CACHE": str(cache), **(env or {})})


def one_line(text: str) -> str:
    """The error: exactly one non-empty line, no traceback, no usage."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text and "usage:" not in text
    return lines[0]


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if " ERROR " in line]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- a wrong learner address ----------------------------------------------------------------------------------


def test_status_at_a_port_where_nothing_listens(tiny_cache):
    port = free_port()
    done = run("heterorl.cli", "status", "--learner", f"127.0.0.1:{port}", cache=tiny_cache)
    assert done.returncode == 2
    line = one_line(done.stderr)
    assert line.startswith(f"heterorl status: nothing listens at 127.0.0.1:{port} (connection refused)")
    assert ADDRESS_FIX in line and "learner.json" in line


def test_status_at_an_http_port_names_the_metrics_port(tiny_cache):
    """The likeliest wrong port on a learner's host: its Prometheus --metrics-port (plain HTTP, not gRPC)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        target = f"127.0.0.1:{server.server_address[1]}"
        done = run("heterorl.cli", "status", "--learner", target, cache=tiny_cache)
    finally:
        server.shutdown()
    assert done.returncode == 2
    line = one_line(done.stderr)
    assert f"{target} is not a gRPC server" in line and "metrics" in line and ADDRESS_FIX in line


def test_status_with_an_unresolvable_host_or_no_port(tiny_cache):
    done = run("heterorl.cli", "status", "--learner", "no-such-host.invalid:50051", cache=tiny_cache)
    line = one_line(done.stderr)
    assert "cannot resolve the host 'no-such-host.invalid'" in line and ADDRESS_FIX in line
    done = run("heterorl.cli", "status", "--learner", "learnerhost", cache=tiny_cache)
    assert "--learner 'learnerhost' has no port; give HOST:PORT" in one_line(done.stderr)


def test_sampler_that_gives_up_on_a_wrong_address_says_why_and_what_to_check(tiny_cache):
    port = free_port()
    done = run("heterorl.node.main", "--learner", f"127.0.0.1:{port}", "--give-up-s", "3", "--retry-max-s", "1",
               "--engine", "transformers", cache=tiny_cache)
    assert done.returncode == 0  # a clean stop, as documented for --give-up-s
    (line,) = error_lines(done.stderr)
    assert "giving up: nothing listens at" in line and ADDRESS_FIX in line
    # While it still retries, each warning already carries the same cause and fix.
    warnings = [line for line in done.stderr.splitlines() if " WARNING " in line and "retrying" in line]
    assert warnings and "connection refused" in warnings[0] and ADDRESS_FIX in warnings[0]


# ---- a refused token --------------------------------------------------------------------------------------------


@pytest.fixture
def learner_with_tokens(processes, tmp_path, tiny_cache):
    tokens = tmp_path / "tokens"
    assert run("heterorl.cli", "new-token", "good", "--out", str(tokens), cache=tiny_cache).returncode == 0
    _, target = processes.learner(tmp_path / "run", tokens_file=tokens, eval_every=0)
    wrong = tmp_path / "wrong.token"
    wrong.write_text("x" * 32 + "\n")
    wrong.chmod(0o600)
    return target, wrong


def test_a_refused_token_names_the_tokens_file_and_new_token(learner_with_tokens, tiny_cache):
    target, wrong = learner_with_tokens
    sampler = run("heterorl.node.main", "--learner", target, "--token-file", str(wrong), "--engine", "transformers",
                  cache=tiny_cache)
    assert sampler.returncode == 3
    (line,) = error_lines(sampler.stderr)
    assert "token not recognised" in line and "--tokens-file" in line and "heterorl new-token" in line

    status = run("heterorl.cli", "status", "--learner", target, "--token-file", str(wrong), cache=tiny_cache)
    assert status.returncode == 2
    line = one_line(status.stderr)
    assert "does not recognise this token" in line and "--token-file FILE" in line and "new-token" in line

    status = run("heterorl.cli", "status", "--learner", target, cache=tiny_cache,
                 env={"HETERORL_TOKEN": ""})
    line = one_line(status.stderr)
    assert "wants a token and none was sent" in line and "HETERORL_TOKEN" in line


# ---- a run directory that holds another run -------------------------------------------------------------------


def test_a_run_directory_that_holds_a_run(tiny_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("HETERORL_CACHE", str(tiny_cache))
    run_dir = tmp_path / "run"
    Learner(from_flat(LearnerConfig, port=0, run_dir=run_dir, model="tiny", group_size=4, eval_size=0,
                      threads=1)).close()
    fresh = run("heterorl.server.main", "--run-dir", str(run_dir), "--model", "tiny", "--port", "0",
                cache=tiny_cache)
    assert fresh.returncode == 2
    line = one_line(fresh.stderr)
    assert "already holds a run" in line and f"--resume {run_dir}" in line and "another --run-dir" in line

    other = tmp_path / "other-model"
    shutil.copytree(resolve_model("tiny"), other)
    changed = run("heterorl.server.main", "--resume", str(run_dir), "--model", str(other), "--group-size", "4",
                  "--port", "0", cache=tiny_cache)
    assert changed.returncode == 2
    line = one_line(changed.stderr)
    assert "--resume cannot change model" in line and "leave --model out" in line and "another --run-dir" in line

    nothing = run("heterorl.server.main", "--resume", str(tmp_path / "empty"), cache=tiny_cache)
    line = one_line(nothing.stderr)
    assert "there is no run to resume" in line and f"--run-dir {tmp_path / 'empty'} instead of --resume" in line


# ---- a model directory without a tokenizer ----------------------------------------------------------------------


def test_a_model_directory_without_a_tokenizer(tiny_cache, tmp_path):
    model = tmp_path / "weights-only"
    model.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(resolve_model("tiny", cache=tiny_cache) / name, model / name)
    done = run("heterorl.server.main", "--model", str(model), "--run-dir", str(tmp_path / "run"), "--port", "0",
               "--threads", "1", cache=tiny_cache)
    assert done.returncode == 2
    (line,) = error_lines(done.stderr)
    assert f"model directory '{model}' has no usable tokenizer" in line and "save_pretrained" in line
    assert not (tmp_path / "run" / "run.db").exists()  # nothing of a run was started: fix it and start again

    # A tokenizer_config.json without a vocabulary passes the file check; transformers' error is turned into the
    # same one line.
    shutil.copy(resolve_model("tiny", cache=tiny_cache) / "tokenizer_config.json", model)
    (model / "vocab.txt").write_text("")  # claims a WordPiece vocabulary that is empty
    with pytest.raises(ValueError, match="has no usable tokenizer") as info:
        load_tokenizer(model)
    assert "\n" not in str(info.value) and "save_pretrained" in str(info.value)
