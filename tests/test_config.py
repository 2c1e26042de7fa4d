"""Settings come from defaults, then a TOML file, then flags; bad settings fail loudly with the key's name."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from heterorl.common import config as config_lib
from heterorl.common.config import ConfigError, field, from_flat, section
from heterorl.node.config import SamplerConfig
from heterorl.server.config import LearnerConfig
from heterorl.server.main import parse_config

REPO = Path(__file__).resolve().parent.parent


def daemon(module: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python -m module args` from the repository root, as the console scripts would."""
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def test_flags_override_toml_which_overrides_defaults(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[run]\nrun_dir = "runs/x"\n[train]\ngroup_size = 4\nlr = 1\nmax_staleness = 3\n'
                    '[loss]\nloss = "gspo"\n')
    config = parse_config(["--config", str(toml), "--group-size", "6"])
    assert config.train.group_size == 6            # flag wins
    assert config.train.lr == 1.0 and config.loss.loss == "gspo" and config.train.max_staleness == 3  # file wins
    assert str(config.run.run_dir) == "runs/x"
    assert config.train.groups_per_step == LearnerConfig().train.groups_per_step  # default otherwise
    assert parse_config(["--max-staleness", "none"]).train.max_staleness is None


@pytest.mark.parametrize(
    "content, message",
    [
        ("[train]\ngrup_size = 4\n", "[train] grup_size: unknown setting; did you mean group_size?"),
        ("group_size = 4\n", "group_size: belongs in [train]"),   # a flat key of the old layout
        ('loss = "gspo"\n', "loss: belongs in [loss]"),
        ('[train]\ngroup_size = "four"\n', "group_size must be int"),
        ("[train]\ngroup_size = 0\n", "group_size must be in 1..256"),
        ('[loss]\nloss = "ppo"\n', "ppo"),
        ("[sampling]\ntemperature = 0\n", "temperature must be > 0"),
        ('[logging]\nlog_format = "xml"\n', "log_format must be text or json"),
    ],
)
def test_bad_settings_name_the_problem(tmp_path, capsys, content, message):
    toml = tmp_path / "bad.toml"
    toml.write_text(content)
    with pytest.raises(SystemExit):
        parse_config(["--config", str(toml)])
    assert message in capsys.readouterr().err


def test_sampler_config_validation():
    with pytest.raises(ValueError, match="HOST:PORT"):
        from_flat(SamplerConfig, learner="localhost")
    with pytest.raises(ValueError, match="max_batch"):
        from_flat(SamplerConfig, max_batch=0)
    assert SamplerConfig().sampler.name  # a default name is made up from host and pid


def test_a_bare_boolean_flag_means_true_and_a_value_still_parses():
    assert parse_config(["--insecure"]).security.insecure is True
    assert parse_config(["--insecure", "false"]).security.insecure is False
    assert parse_config(["--insecure", "--lr", "0.5"]).train.lr == 0.5
    assert parse_config([]).security.insecure is False


# -- the daemons' real command lines ------------------------------------------------------------------------------


def test_learner_print_config_loads_back_unchanged(tmp_path):
    argv = ["--run-dir", str(tmp_path / "run"), "--group-size", "5", "--stop", "a,b", "--lr", "4e-06",
            "--tokens-file", str(tmp_path / "tokens"), "--log-format", "json", "--max-staleness", "2"]
    printed = daemon("heterorl.server.main", *argv, "--print-config")
    assert printed.returncode == 0, printed.stderr
    assert "[sampling]" in printed.stdout and "[durability]" in printed.stdout
    path = tmp_path / "printed.toml"
    path.write_text(printed.stdout)
    again = daemon("heterorl.server.main", "--config", str(path), "--print-config")
    assert again.returncode == 0, again.stderr
    assert again.stdout == printed.stdout
    expected = parse_config(argv)
    assert config_lib.loads(LearnerConfig, printed.stdout) == expected
    assert parse_config(["--config", str(path)]) == expected
    assert not (tmp_path / "run").exists()  # printing starts nothing


def test_a_misspelt_key_is_refused_by_name_with_exit_code_2(tmp_path):
    cases = [
        ("heterorl.server.main", "[sampling]\ntemprature = 1\n",
         "[sampling] temprature: unknown setting; did you mean temperature?"),
        ("heterorl.node.main", "[connection]\nheartbeat = 1\n",
         "[connection] heartbeat: unknown setting; did you mean heartbeat_s?"),
    ]
    for module, toml, message in cases:
        path = tmp_path / "bad.toml"
        path.write_text(toml)
        refused = daemon(module, "--config", str(path))
        assert refused.returncode == 2
        assert message in refused.stderr


def test_a_flag_overrides_the_file_for_both_daemons(tmp_path):
    learner_file = tmp_path / "learner.toml"
    learner_file.write_text('[sampling]\ntemperature = 1.5\ntop_k = 5\n[serve]\nport = 6000\n')
    config = parse_config(["--config", str(learner_file), "--temperature", "0.9"])
    assert (config.sampling.temperature, config.sampling.top_k, config.serve.port) == (0.9, 5, 6000)

    from heterorl.node.main import parse_config as sampler_config

    sampler_file = tmp_path / "sampler.toml"
    sampler_file.write_text('[sampler]\nmax_batch = 3\nname = "from-file"\n[connection]\ngive_up_s = 30\n')
    config = sampler_config(["--config", str(sampler_file), "--max-batch", "2"])
    assert (config.sampler.max_batch, config.sampler.name, config.connection.give_up_s) == (2, "from-file", 30.0)


def test_sampler_print_config_loads_back_unchanged(tmp_path):
    argv = ["--learner", "10.0.0.1:7000", "--name", "s1", "--engine", "transformers", "--lag-versions", "2",
            "--give-up-s", "5", "--tls-server-name", "learner.example"]
    printed = daemon("heterorl.node.main", *argv, "--print-config")
    assert printed.returncode == 0, printed.stderr
    path = tmp_path / "printed.toml"
    path.write_text(printed.stdout)
    again = daemon("heterorl.node.main", "--config", str(path), "--print-config")
    assert again.returncode == 0 and again.stdout == printed.stdout
    from heterorl.node.main import parse_config as sampler_config

    assert config_lib.loads(SamplerConfig, printed.stdout) == sampler_config(argv)


def test_json_logs_are_one_object_per_line_with_a_level():
    with socket.socket() as probe:  # a port nobody listens on (it was free a moment ago)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = daemon("heterorl.node.main", "--learner", f"127.0.0.1:{port}", "--engine", "transformers",
                  "--give-up-s", "1", "--retry-max-s", "0.5", "--log-format", "json", "--log-level", "info")
    assert done.returncode == 0  # an unreachable learner past --give-up-s is a clean stop
    records = [json.loads(line) for line in done.stderr.splitlines()]
    assert records and all(r["level"] in ("debug", "info", "warning", "error", "critical") for r in records)
    assert {"warning", "error"} <= {r["level"] for r in records}  # retried, then gave up
    assert all(r["logger"].startswith("heterorl") and r["time"] for r in records)


# -- the machinery on small example configs: sections in TOML, flat flags ------------------------------------------


@dataclass
class Run:
    model: str = field("tiny", "model name")
    group_size: int = field(8, "completions per prompt")
    run_dir: Path = field(Path("runs/x"), "where the run lives")
    resume: Path | None = field(None, "run to continue")
    insecure: bool = field(False, "allow plain text")

    def __post_init__(self) -> None:
        if not 1 <= self.group_size <= 256:
            raise ValueError("group_size must be in 1..256")


@dataclass
class Sampling:
    temperature: float = field(0.7, "sampling temperature")
    max_staleness: int | None = field(None, "versions a group may lag")
    stop: list[str] = field([], "stop strings")
    seeds: list[int] = field([1, 2], "seeds")


@dataclass
class Example:
    run: Run = section(Run)
    sampling: Sampling = section(Sampling)

    def __post_init__(self) -> None:
        if self.run.model == "none-such" and self.sampling.temperature > 1:
            raise ValueError("temperature above 1 needs a real model")


def parse_example(argv, tmp_path=None, toml=None):
    if toml is not None:
        path = tmp_path / "run.toml"
        path.write_text(toml)
        argv = ["--config", str(path), *argv]
    return config_lib.parse(Example, "example", "an example daemon", argv)


def test_sections_in_toml_and_flat_flags_over_them(tmp_path):
    config = parse_example(["--group-size", "6"], tmp_path,
                           '[run]\ngroup_size = 4\nmodel = "small"\n[sampling]\ntemperature = 1\n')
    assert config.run.group_size == 6          # flag over file
    assert config.run.model == "small"          # file over default
    assert config.sampling.temperature == 1.0 and isinstance(config.sampling.temperature, float)
    assert config.run.run_dir == Path("runs/x")  # default otherwise
    assert config.sampling.stop == [] and Example().sampling.stop is not config.sampling.stop


@pytest.mark.parametrize(
    "toml, message",
    [
        ("[sampling]\ntemprature = 0.5\n", "[sampling] temprature: unknown setting; did you mean temperature?"),
        ("[run]\ntemperature = 0.5\n", "[run] temperature: belongs in [sampling]"),
        ("temperature = 0.5\n", "temperature: belongs in [sampling]"),
        ("[samplng]\ntemperature = 0.5\n", "[samplng]: unknown section; did you mean sampling?"),
        ('[run]\ngroup_size = "four"\n', "[run] group_size must be int, got 'four'"),
        ("[run]\ngroup_size = 4.5\n", "[run] group_size must be int"),
        ('[sampling]\nstop = "###"\n', "[sampling] stop must be list of str"),
        ("[run]\ngroup_size = 0\n", "[run] group_size must be in 1..256"),          # the section's __post_init__
        ('[run]\nmodel = "none-such"\n[sampling]\ntemperature = 2\n', "temperature above 1 needs"),  # top's
    ],
)
def test_bad_toml_names_the_key(tmp_path, toml, message):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        config_lib.build(Example, path)
    assert message in str(err.value)


def test_every_problem_of_a_file_is_reported_at_once(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[run]\ngrup_size = 4\n[sampling]\ntemperature = "hot"\n')
    with pytest.raises(ConfigError) as err:
        config_lib.build(Example, path)
    assert "grup_size" in str(err.value) and "temperature must be float" in str(err.value)


def test_bad_flag_values_exit_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_example(["--group-size", "lots"])
    assert exit_info.value.code == 2
    assert "--group-size must be int, got 'lots'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_example(["--temprature", "0.5"])  # argparse refuses an unknown flag


def test_list_flags_take_commas_and_repeats(tmp_path):
    assert parse_example(["--stop", "###,\n\n"]).sampling.stop == ["###", "\n\n"]
    assert parse_example(["--stop", "a", "--stop", "b,c"]).sampling.stop == ["a", "b", "c"]
    assert parse_example(["--seeds", "3,4"]).sampling.seeds == [3, 4]
    assert parse_example(["--stop", ""]).sampling.stop == []
    # a flag replaces the file's list rather than extending it
    assert parse_example(["--stop", "b"], tmp_path, '[sampling]\nstop = ["a"]\n').sampling.stop == ["b"]
    with pytest.raises(SystemExit):
        parse_example(["--seeds", "3,x"])


def test_booleans_and_optional_none(tmp_path):
    assert parse_example(["--insecure"]).run.insecure is True
    assert parse_example(["--insecure", "false", "--group-size", "3"]).run.insecure is False
    assert parse_example(["--insecure", "--group-size", "3"]).run.group_size == 3
    assert parse_example(["--max-staleness", "2"]).sampling.max_staleness == 2
    file_set = '[sampling]\nmax_staleness = 2\n'
    assert parse_example(["--max-staleness", "none"], tmp_path, file_set).sampling.max_staleness is None
    assert parse_example(["--resume", "runs/a"]).run.resume == Path("runs/a")


def test_print_config_loads_back_unchanged(tmp_path, capsys):
    argv = ["--group-size", "5", "--stop", "a,b", "--temperature", "4e-06", "--resume", "r", "--insecure"]
    config = parse_example(argv)
    with pytest.raises(SystemExit) as exit_info:
        parse_example([*argv, "--print-config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "[sampling]" in printed and "max_staleness" not in printed  # None is left out
    assert config_lib.loads(Example, printed) == config
    path = tmp_path / "printed.toml"
    path.write_text(printed)
    assert parse_example(["--config", str(path)]) == config


def test_from_flat_builds_like_flags_would():
    config = from_flat(Example, group_size=4, model="small", stop=["x"], run_dir="runs/y", temperature=1)
    assert config == parse_example(["--group-size", "4", "--model", "small", "--stop", "x", "--run-dir", "runs/y",
                                    "--temperature", "1"])
    assert from_flat(Example, resume=None, max_staleness=3).sampling.max_staleness == 3
    with pytest.raises(ConfigError, match="grup_size: unknown setting; did you mean group_size"):
        from_flat(Example, grup_size=4)
    with pytest.raises(ConfigError, match="group_size must be int"):
        from_flat(Example, group_size="4")
    with pytest.raises(ConfigError, match="group_size must be in 1..256"):
        from_flat(Example, group_size=0)


def test_flat_views_and_replace():
    config = from_flat(Example, group_size=4)
    flat = config_lib.flat_dict(config)
    assert flat["group_size"] == 4 and flat["temperature"] == 0.7
    assert from_flat(Example, **flat) == config
    changed = config_lib.replace_flat(config, temperature=0.9)
    assert changed.sampling.temperature == 0.9 and changed.run == config.run and config.sampling.temperature == 0.7
    assert config_lib.to_dict(config)["run"]["run_dir"] == "runs/x"


def test_explicit_settings_are_those_of_file_and_flags(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[sampling]\ntemperature = 0.5\n")
    parser = config_lib.argument_parser(Example, "example", "")
    args = parser.parse_args(["--config", str(path), "--group-size", "3"])
    assert config_lib.explicit_settings(Example, args.config, args) == {"temperature", "group_size"}


@dataclass
class Clashing:
    temperature: float = field(1.0, "clashes with Sampling.temperature")


@dataclass
class Clash:
    sampling: Sampling = section(Sampling)
    other: Clashing = section(Clashing)


@dataclass
class OptionalWithDefault:
    limit: int | None = field(3, "an optional that cannot be written as TOML when None")


def test_a_badly_defined_config_is_refused_when_used():
    with pytest.raises(TypeError, match="temperature"):
        from_flat(Clash)
    with pytest.raises(TypeError, match="must default to None"):
        from_flat(OptionalWithDefault)
