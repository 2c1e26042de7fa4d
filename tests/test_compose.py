"""docker/: the compose file and the Dockerfiles, checked without a Docker engine (none runs here).

Every service's command is parsed by the parser of the program it names (pyproject's console scripts: the learner's,
the sampler's and the relay's config parsers, `heterorl`'s subcommands), and what the parsed settings say must agree
with the rest of the file: the addresses they dial are services listening there, the files they read lie on the
volumes mounted, the published ports and health checks are the ports they listen on, the images expose them. Then
the services' commands run as local processes, service names and ports mapped to loopback and free ports, volumes
to temp dirs, and the cluster trains, its samplers fetching weights through the relay.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from prometheus_client.parser import text_string_to_metric_families

from heterorl.cli import main as heterorl_main
from heterorl.common import config as config_lib
from heterorl.common.model import DEFAULT_MODEL
from heterorl.node.config import SamplerConfig
from heterorl.node.relay import RelayConfig
from heterorl.server.config import LearnerConfig
from heterorl.tools import health

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS: dict[str, str] = PYPROJECT["project"]["scripts"]
# The config each daemon's entry point parses its command line into (what `main` builds, minus the run itself).
CONFIGS = {"heterorl.server.main:main": LearnerConfig, "heterorl.node.main:main": SamplerConfig,
           "heterorl.node.relay_main:main": RelayConfig}
READ_ONLY_FILES = ("tokens_file", "token_file", "relay_token_file")  # settings naming files a daemon only reads
HEALTH_MODULE = "heterorl.tools.health"


# ---- reading the files -------------------------------------------------------------------------------------------


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # `<<: *heterorl` merges are resolved by the YAML loader


def heterorl_services(spec: dict) -> dict[str, dict]:
    return {name: s for name, s in spec["services"].items() if str(s.get("image", "")).startswith("heterorl")}


def parse_command(command: list[str]) -> dict[str, Any]:
    """The flat settings `command` means to the program it names, parsed by that program's own parser."""
    entry = SCRIPTS[command[0]]
    cls = CONFIGS[entry]
    parser = config_lib.argument_parser(cls, command[0], "")
    for arg in command[1:]:  # full flag names: argparse would also take a prefix (--keep-version), silently
        assert arg.split("=", 1)[0] in parser._option_string_actions, f"{command[0]} has no flag {arg}"
    try:
        args = parser.parse_args(command[1:])
    except SystemExit:
        pytest.fail(f"{command[0]} refuses its compose command line {command[1:]}")
    return config_lib.flat_dict(config_lib.build(cls, None, args))


def listening_ports(settings: dict[str, Any]) -> set[int]:
    """TCP ports a daemon with these settings listens on (gRPC, Prometheus)."""
    return {p for p in (settings.get("port"), settings.get("metrics_port")) if p}


def health_args(service: dict) -> list[str]:
    """The arguments of the service's health probe, which must be `python -m heterorl.tools.health`."""
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] in ("python", "python3") and test[2:4] == ["-m", HEALTH_MODULE], test
    return test[4:]


def health_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    health.add_arguments(parser)
    return parser


def mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """Container path -> (volume or host path, read-only) of a service's short-syntax volumes."""
    out = {}
    for entry in service.get("volumes", []):
        source, target, *mode = entry.split(":")
        out[target] = (source, mode == ["ro"])
    return out


def mount_of(service: dict, path: Path) -> tuple[str, bool] | None:
    for target, mount in mounts(service).items():
        if path == Path(target) or Path(target) in path.parents:
            return mount
    return None


@dataclass
class Stage:
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, name: str) -> list[str]:
        return [rest for instr, rest in self.instructions if instr == name]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for rest in self.all("ENV"):
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                out[key] = value
        return out

    def text(self) -> str:
        return "\n".join(f"{i} {r}" for i, r in self.instructions)


def read_dockerfile(path: Path) -> list[Stage]:
    """A Dockerfile's stages: continuation lines joined, comments dropped, global ARG defaults put into FROM."""
    lines, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    assert not pending, f"{path.name} ends inside a continued line"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        instr, _, rest = line.partition(" ")
        instr, rest = instr.upper(), rest.strip()
        if instr == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif instr == "FROM":
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], rest.split()[0])
            stages.append(Stage(base))
        else:
            stages[-1].instructions.append((instr, rest))
    return stages


def healthcheck_command(stage: Stage) -> list[str]:
    (check,) = stage.all("HEALTHCHECK")
    command = check.split(" CMD ", 1)[1]
    env = stage.env()
    return [re.sub(r"\$(\w+)", lambda m: env[m[1]], word) for word in shlex.split(command)]


def exposed(stage: Stage) -> set[int]:
    return {int(p.split("/")[0]) for rest in stage.all("EXPOSE") for p in rest.split()}


# ---- the compose file against the programs' own parsers -----------------------------------------------------------


def test_every_command_is_accepted_by_the_program_it_runs():
    spec = load_compose()
    services = heterorl_services(spec)
    assert {"token", "learner", "relay", "sampler", "sampler-gpu"} <= set(services)
    for name, service in services.items():
        command = service["command"]
        assert command[0] in SCRIPTS, f"{name}: {command[0]} is no console script of pyproject.toml"
        # `--flag=value` throughout, so one argument is one setting (and the local run below can map it)
        assert all("=" in a or not a.startswith("--") or a in ("--resume-existing", "--if-missing")
                   for a in command), command
        if SCRIPTS[command[0]] in CONFIGS:
            parse_command(command)
    settings = {name: parse_command(s["command"]) for name, s in services.items() if name != "token"}
    assert settings["learner"]["model"] in (DEFAULT_MODEL, "tiny") or Path(settings["learner"]["model"]).is_absolute()
    assert settings["sampler"]["engine"] == "transformers"  # the CPU image has no vLLM
    assert settings["sampler-gpu"]["engine"] == "vllm"


def test_token_command_writes_the_tokens_file_once(tmp_path):
    """`heterorl new-token` run as the token service runs it (volume mapped): one token, kept on a rerun."""
    token = load_compose()["services"]["token"]
    assert SCRIPTS[token["command"][0]] == "heterorl.cli:main"
    (target, (volume, read_only)), = mounts(token).items()
    assert not read_only
    argv = [a.replace(target + "/", f"{tmp_path}/") for a in token["command"][1:]]
    for _ in range(2):  # a restarted cluster keeps its token (--if-missing)
        assert heterorl_main(argv) == 0
    lines = (tmp_path / "tokens").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("compose:")


def test_addresses_credentials_and_volumes_agree():
    spec = load_compose()
    services = heterorl_services(spec)
    settings = {name: parse_command(s["command"]) for name, s in services.items() if name != "token"}
    listens = {name: listening_ports(s) for name, s in settings.items()}

    def serves(address: str, expect: str) -> None:
        host, port = address.rsplit(":", 1)
        assert host == expect and int(port) == settings[expect]["port"], f"{address} is not {expect}'s port"

    # Samplers lease from the learner and fetch weights through the relay; the relay fetches from the learner.
    serves(settings["relay"]["upstream"], "learner")
    for name in ("sampler", "sampler-gpu"):
        serves(settings[name]["learner"], "learner")
        assert settings[name]["weights_from"], name
        for address in settings[name]["weights_from"]:
            serves(address, "relay")
    # Whatever binds 0.0.0.0 asks for a token; everybody who calls it sends the one the token service writes.
    token_out = Path(dict(a[2:].split("=", 1) for a in services["token"]["command"] if "=" in a)["out"])
    for name in ("learner", "relay"):
        assert settings[name]["host"] == "0.0.0.0" and settings[name]["tokens_file"] == token_out, name
    assert not settings["learner"]["insecure"]
    assert settings["relay"]["token_file"] == token_out
    for name in ("sampler", "sampler-gpu"):
        assert settings[name]["token_file"] == settings[name]["relay_token_file"] == token_out
    # Every file or directory a daemon names lies on a volume mounted into its container, the run dir writable.
    for name, values in settings.items():
        for key, value in values.items():
            if isinstance(value, Path) and value.is_absolute():
                mount = mount_of(services[name], value)
                assert mount is not None, f"{name}: --{key} {value} is on no volume"
                assert key in READ_ONLY_FILES or not mount[1], f"{name}: --{key} {value} is on a read-only mount"
    assert mount_of(services["token"], token_out) == (mount_of(services["learner"], token_out)[0], False)
    assert not mount_of(services["learner"], settings["learner"]["run_dir"])[1]
    assert settings["learner"]["resume_existing"]  # a restarted container continues the run on its volume
    # The model cache: HETERORL_CACHE (a variable the project reads) is where the cache volume is mounted.
    for name, service in services.items():
        for key in service.get("environment", {}):
            assert any(key in p.read_text() for p in (REPO / "heterorl").rglob("*.py")), f"{name}: {key} unused"
        cache = Path(service["environment"]["HETERORL_CACHE"])
        if name in ("learner", "sampler", "sampler-gpu"):  # the model's users (token and relay load none)
            assert mount_of(service, cache) is not None and not mount_of(service, cache)[1], name
    named = {source for s in spec["services"].values() for source, _ in mounts(s).values() if "/" not in source}
    assert named <= set(spec["volumes"]), named - set(spec["volumes"])
    # Published ports are ports the service listens on, on the host's loopback only (the network is plaintext);
    # metrics endpoints bind 0.0.0.0 so Prometheus reaches them from its own container.
    for name, service in services.items():
        for entry in service.get("ports", []):
            ip, _, inside = entry.split(":")
            assert ip == "127.0.0.1" and int(inside) in listens[name], f"{name}: {entry}"
        if name in settings and settings[name].get("metrics_port"):
            assert settings[name]["metrics_host"] == "0.0.0.0", name
    prometheus = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"] for c in job.get("static_configs", []) for t in c["targets"]}
    assert targets == {f"{n}:{settings[n]['metrics_port']}" for n in ("learner", "relay")}
    (dns,) = [c for job in prometheus["scrape_configs"] for c in job.get("dns_sd_configs", [])]
    assert set(dns["names"]) == {"sampler", "sampler-gpu"}
    assert {settings[n]["metrics_port"] for n in dns["names"]} == {dns["port"]}


def test_health_checks_restarts_and_start_order():
    spec = load_compose()
    services = heterorl_services(spec)
    settings = {name: parse_command(s["command"]) for name, s in services.items() if name != "token"}
    for name, values in settings.items():
        args = health_parser().parse_args(health_args(services[name]))
        if values.get("port"):  # a gRPC daemon: its health service on its own port
            assert args.target == f"127.0.0.1:{values['port']}", name
        else:  # a sampler serves no gRPC: its metrics endpoint
            assert args.url == f"http://127.0.0.1:{values['metrics_port']}/metrics", name
    assert services["token"]["healthcheck"] == {"disable": True}
    depends = {name: s.get("depends_on", {}) for name, s in services.items()}
    assert depends["learner"] == {"token": {"condition": "service_completed_successfully"}}
    assert depends["relay"] == {"learner": {"condition": "service_healthy"}}
    for name in ("sampler", "sampler-gpu"):
        assert depends[name] == {"learner": {"condition": "service_healthy"}, "relay": {"condition": "service_healthy"}}
    for name, deps in depends.items():
        for dep, cond in deps.items():
            assert cond["condition"] != "service_healthy" or "test" in services[dep]["healthcheck"], (name, dep)
    # A finished run (exit 0) stays down, a crashed learner resumes; relay and samplers always come back.
    assert services["learner"]["restart"] == "on-failure"
    assert all(services[n]["restart"] == "unless-stopped" for n in ("relay", "sampler", "sampler-gpu"))
    assert services["token"]["restart"] == "no"
    assert services["sampler"]["deploy"]["replicas"] >= 2
    (gpu,) = services["sampler-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"] and services["sampler-gpu"]["profiles"] == ["gpu"]


def test_dockerfiles_match_the_services():
    spec = load_compose()
    services = heterorl_services(spec)
    settings = {name: parse_command(s["command"]) for name, s in services.items() if name != "token"}
    builds = {s["image"]: (COMPOSE.parent / s["build"]["context"]).resolve() / s["build"]["dockerfile"]
              for s in services.values() if "build" in s}
    assert set(builds) == {s["image"] for s in services.values()}, "every image a service runs is built by one"
    requirements = {Requirement(r).name: Requirement(r) for r in PYPROJECT["project"]["dependencies"]}
    images = {image: read_dockerfile(path) for image, path in builds.items()}
    for image, stages in images.items():
        final = stages[-1]
        user = final.all("USER")
        assert user and user[-1] not in ("root", "0"), f"{image} runs as root"
        assert not final.all("ENTRYPOINT") or final.all("ENTRYPOINT")[-1] == "[]", (
            f"{image}: an ENTRYPOINT would be prepended to the compose commands")
        cmd = json.loads(final.all("CMD")[-1])
        assert cmd[0] in SCRIPTS, cmd
        # The context is the repository root: the ignore file beside the Dockerfile admits only what is copied.
        ignore = [line for line in Path(f"{builds[image]}.dockerignore").read_text().splitlines()
                  if line and not line.startswith("#")]
        assert ignore[0] == "*", f"{image}: the build context would hold .venv, runs/ and .git"
        for rest in (r for s in stages for i, r in s.instructions if i == "COPY" and "--from" not in r):
            for source in shlex.split(rest)[:-1]:
                assert (REPO / source).exists(), f"{image}: COPY {source}: no such path"
                assert {f"!{source}", f"!{source}/"} & set(ignore), f"{image}: COPY {source} is left out of the context"
        for name, service in services.items():
            if service["image"] != image:
                continue
            ports = listening_ports(settings.get(name, {}))
            assert ports <= exposed(final), f"{image} does not EXPOSE {ports - exposed(final)} ({name})"
            cache = service["environment"]["HETERORL_CACHE"]
            assert final.env()["HETERORL_CACHE"] == cache, image  # the image's own default agrees
            mkdirs = " ".join(final.all("RUN"))
            for target, (source, _) in mounts(service).items():
                # named volumes start as copies of the image's directory: it must exist, owned by the user
                assert target in mkdirs and "chown" in mkdirs, f"{image}: {target} not created for the user"
        # The image's own health check: `heterorl health` on its main port (the compose file refines it per service)
        probe = healthcheck_command(final)
        assert probe[1:3] == ["-m", HEALTH_MODULE], probe
        health_parser().parse_args(probe[3:])

    cpu = images["heterorl:latest"]
    build, final = cpu[0], cpu[-1]
    text = build.text()
    # CPU torch from PyTorch's CPU index, pinned inside the project's range, before the project itself
    torch_pin = re.search(r"pip install torch==([\w.]+) --index-url https://download\.pytorch\.org/whl/cpu", text)
    assert torch_pin and torch_pin.group(1) in requirements["torch"].specifier, text
    assert text.index("torch==") < text.index("pip install /src")
    assert "prepare-model" in text and build.env()["HETERORL_CACHE"] == final.env()["HETERORL_CACHE"]
    assert final.base == build.base and "build-essential" not in final.text() and "gcc" not in final.text()
    assert not any(i == "RUN" and "pip" in r for i, r in final.instructions), "the runtime stage installs nothing"
    assert healthcheck_command(final)[3:] == ["--target", f"127.0.0.1:{settings['learner']['port']}"]

    (gpu,) = images["heterorl-gpu:latest"]
    (vllm_pin,) = Requirement(PYPROJECT["project"]["optional-dependencies"]["vllm"][0]).specifier
    assert vllm_pin.operator == "==" and gpu.base == f"vllm/vllm-openai:v{vllm_pin.version}", gpu.base
    assert '/tmp/heterorl-src[vllm]' in gpu.text()
    uid = re.compile(r"--uid (\d+)")
    assert uid.search(gpu.text())[1] == uid.search(final.text())[1], "one uid: the images share named volumes"
    assert healthcheck_command(gpu)[3:] == ["--url", f"http://127.0.0.1:{settings['sampler-gpu']['metrics_port']}/metrics"]


# ---- the services as local processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


class LocalCompose:
    """Maps a compose service's arguments onto this host: each replica's listening ports to free ones, service
    names to 127.0.0.1, 0.0.0.0 binds to loopback, volume paths to local directories."""

    def __init__(self, spec: dict, volumes: dict[str, Path]):
        self.spec, self.volumes = spec, volumes
        self.ports: dict[tuple[str, int, int], int] = {}

    def port(self, service: str, replica: int, inside: int) -> int:
        return self.ports.setdefault((service, replica, inside), free_port())

    def args(self, name: str, replica: int, argv: list[str]) -> list[str]:
        service = self.spec["services"][name]
        names = "|".join(re.escape(n) for n in self.spec["services"])
        out = []
        for arg in argv:
            flag, eq, value = arg.partition("=")
            if flag in ("--port", "--metrics-port"):
                value = str(self.port(name, replica, int(value)))
            elif flag in ("--host", "--metrics-host") and value == "0.0.0.0":
                value = "127.0.0.1"
            else:
                # another service (replica 0) or this container's own loopback
                value = re.sub(rf"\b({names}):(\d+)\b", lambda m: f"127.0.0.1:{self.port(m[1], 0, int(m[2]))}", value)
                value = re.sub(r"\b127\.0\.0\.1:(\d+)\b",
                               lambda m: f"127.0.0.1:{self.ports.get((name, replica, int(m[1])), int(m[1]))}", value)
                for target, (source, _) in mounts(service).items():
                    if value == target or value.startswith(target + "/"):
                        value = str(self.volumes[source]) + value[len(target):]
            out.append(flag + eq + value if eq else arg)
        return out


def wait_healthy(compose: LocalCompose, name: str, replica: int, proc, timeout: float) -> None:
    """What `depends_on: service_healthy` waits for: the service's own health probe, run here, exits 0."""
    probe = compose.args(name, replica, health_args(compose.spec["services"][name]))
    deadline = time.time() + timeout
    while True:
        result = subprocess.run([sys.executable, "-m", HEALTH_MODULE, *probe], capture_output=True, text=True)
        if result.returncode == 0:
            return
        assert proc.poll() is None, f"{name} exited:\n{proc.log_path.read_text()[-3000:]}"
        assert time.time() < deadline, f"{name} not healthy: {result.stderr}\n{proc.log_path.read_text()[-3000:]}"
        time.sleep(0.5)


@pytest.mark.slow
def test_compose_services_run_as_local_processes_and_train(processes, tiny_cache, tmp_path):
    spec = load_compose()
    services = spec["services"]
    volumes = {"runs": tmp_path / "runs", "secrets": tmp_path / "secrets", "cache": tiny_cache,
               "gpu-cache": tiny_cache}  # the processes fixture's HETERORL_CACHE stands for the cache volume
    for path in volumes.values():
        path.mkdir(exist_ok=True)
    assert services["learner"]["environment"]["HETERORL_CACHE"] == "/cache"
    compose = LocalCompose(spec, volumes)

    def module(name: str) -> str:
        return SCRIPTS[services[name]["command"][0]].split(":")[0]

    token = subprocess.run([sys.executable, "-m", module("token"), *compose.args("token", 0, services["token"]["command"][1:])],
                           cwd=REPO, capture_output=True, text=True)
    assert token.returncode == 0, token.stderr

    learner_args = compose.args("learner", 0, services["learner"]["command"][1:])
    # A short run. The compose file trains the default model (SmolLM2-135M, minutes a step on these shared CPUs):
    # here the built-in tiny model stands in for it, and a few small steps.
    assert parse_command(services["learner"]["command"])["model"] == DEFAULT_MODEL
    overrides = {"--model": "tiny", "--max-steps": "3"}
    learner_args = [a for a in learner_args if a.split("=", 1)[0] not in overrides]
    learner_args += [f"{k}={v}" for k, v in overrides.items()]
    learner_args += ["--group-size=2", "--groups-per-step=1", "--max-new-tokens=4", "--eval-size=4",
                     "--reward=digit_fraction"]
    learner = processes.start("learner", module("learner"), learner_args)
    wait_healthy(compose, "learner", 0, learner, timeout=180)

    relay = processes.start("relay", module("relay"), compose.args("relay", 0, services["relay"]["command"][1:]))
    wait_healthy(compose, "relay", 0, relay, timeout=60)

    replicas = services["sampler"]["deploy"]["replicas"]
    samplers = [processes.start(f"sampler-{i}", module("sampler"),
                                compose.args("sampler", i, services["sampler"]["command"][1:]))
                for i in range(replicas)]

    learner.wait(timeout=480)
    assert learner.returncode == 0, learner.log_path.read_text()[-3000:]
    summary = json.loads((volumes["runs"] / "compose" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["groups_trained"] >= 3, summary
    assert "; 1 token)" in learner.log_path.read_text()  # the learner ran with the token service's credentials

    relay_address = compose.args("sampler", 0, ["--weights-from=relay:50061"])[0].split("=", 1)[1]
    for i, sampler in enumerate(samplers):
        assert sampler.poll() is None, sampler.log_path.read_text()[-3000:]  # still up, waiting for the learner
        wait_healthy(compose, "sampler", i, sampler, timeout=10)
        metrics = scrape(compose.ports[("sampler", i, 9401)])
        downloads = {labels["source"]: v for labels, v in metrics["heterorl_sampler_weight_downloads_total"]}
        # every version this sampler loaded came through the relay, none straight from the learner
        assert downloads.get(relay_address, 0) >= 1 and downloads.get("learner", 0) == 0, downloads
        assert not metrics.get("heterorl_sampler_relay_failures_total"), metrics.get(
            "heterorl_sampler_relay_failures_total")
    relay_metrics = scrape(compose.ports[("relay", 0, 9402)])
    served = sum(v for _, v in relay_metrics["heterorl_relay_served_bytes_total"])
    fetched = sum(v for _, v in relay_metrics["heterorl_relay_fetched_bytes_total"])
    assert served > 0 and fetched > 0, (served, fetched)
