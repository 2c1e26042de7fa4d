"""docker/docker-compose.yml, checked without a Docker engine: parse it, then run its services' commands as
local processes (with the tiny model and a short run) and see the cluster train."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker" / "docker-compose.yml"


def _flags(command: list[str]) -> dict[str, str]:
    return dict(arg[2:].split("=", 1) for arg in command[1:] if arg.startswith("--") and "=" in arg)


def test_compose_file_describes_a_learner_and_samplers():
    spec = yaml.safe_load(COMPOSE.read_text())
    learner, sampler = spec["services"]["learner"], spec["services"]["sampler"]
    assert learner["command"][0] == "heterorl-learner" and sampler["command"][0] == "heterorl-sampler"
    port = _flags(learner["command"])["port"]
    assert _flags(sampler["command"])["learner"] == f"learner:{port}"
    assert _flags(learner["command"])["host"] == "0.0.0.0"
    assert sampler["depends_on"]["learner"]["condition"] == "service_healthy"
    assert sampler["deploy"]["replicas"] >= 2
    # The learner binds 0.0.0.0, so it must have credentials: the token service writes them first, into a volume
    # the learner and the samplers read.
    token = spec["services"]["token"]
    tokens_file = _flags(learner["command"])["tokens-file"]
    assert _flags(sampler["command"])["token-file"] == tokens_file
    assert _flags(token["command"][2:])["out"] == tokens_file
    assert learner["depends_on"]["token"]["condition"] == "service_completed_successfully"
    volume = tokens_file.rsplit("/", 1)[0]
    for service in (token, learner, sampler):
        assert any(v.split(":")[1] == volume for v in service["volumes"])
    assert "insecure" not in " ".join(learner["command"])
    dockerfile = (REPO / learner["build"]["dockerfile"]).read_text()
    assert "HEALTHCHECK" in dockerfile and "torch==2.13.0" in dockerfile
    for script in (learner["command"][0], sampler["command"][0]):
        assert script in (REPO / "pyproject.toml").read_text()


def test_compose_services_run_as_local_processes(processes, tmp_path):
    spec = yaml.safe_load(COMPOSE.read_text())
    volume = "/secrets/"

    def local(arg: str) -> str:
        return arg.replace(volume, str(tmp_path) + "/")

    token_cmd = [local(a) for a in spec["services"]["token"]["command"]]
    assert token_cmd[0] == "heterorl"  # the console script of heterorl.cli
    for _ in range(2):  # a second run (a restarted cluster) keeps the token
        subprocess.run([sys.executable, "-m", "heterorl.cli", *token_cmd[1:]], check=True, cwd=REPO,
                       capture_output=True)
    assert len((tmp_path / "tokens").read_text().splitlines()) == 1
    learner_cmd = [local(a) for a in spec["services"]["learner"]["command"]]
    overrides = {"--host": "127.0.0.1", "--port": "0", "--run-dir": str(tmp_path / "run"), "--model": "tiny",
                 "--max-steps": "3", "--metrics-port": "0"}  # metrics: tests/test_metrics.py (ports clash here)
    args = [a for a in learner_cmd[1:] if a.split("=", 1)[0] not in overrides]
    args += [f"{k}={v}" for k, v in overrides.items()]
    args += ["--group-size=2", "--groups-per-step=1", "--max-new-tokens=4", "--eval-size=4", "--reward=digit_fraction"]
    learner = processes.start("learner", "heterorl.server.main", args)
    address = tmp_path / "run" / "learner.json"
    deadline = time.time() + 120
    while not address.exists():
        assert learner.poll() is None and time.time() < deadline, learner.log_path.read_text()
        time.sleep(0.2)
    port = json.loads(address.read_text())["port"]
    sampler_cmd = spec["services"]["sampler"]["command"]
    for i in range(spec["services"]["sampler"]["deploy"]["replicas"]):
        sampler_args = [local(a).replace("learner:50051", f"127.0.0.1:{port}") for a in sampler_cmd[1:]]
        processes.start(f"sampler-{i}", "heterorl.node.main", sampler_args + [f"--name=compose-{i}", "--engine=transformers",
                                                                        "--metrics-port=0"])  # replicas share this host
    learner.wait(timeout=480)
    assert learner.returncode == 0, learner.log_path.read_text()[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3
    assert "; 1 token)" in learner.log_path.read_text()  # the learner ran with the compose file's credentials
