"""Settings come from defaults, then a TOML file, then flags; bad settings fail loudly with the key's name."""

from __future__ import annotations

import pytest

from heterorl.node.sampler import SamplerConfig
from heterorl.server.config import LearnerConfig
from heterorl.server.main import parse_config


def test_flags_override_toml_which_overrides_defaults(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('group_size = 4\nlr = 1\nloss = "gspo"\nmax_staleness = 3\nrun_dir = "runs/x"\n')
    config = parse_config(["--config", str(toml), "--group-size", "6"])
    assert config.group_size == 6            # flag wins
    assert config.lr == 1.0 and config.loss == "gspo" and config.max_staleness == 3  # file wins over defaults
    assert str(config.run_dir) == "runs/x"
    assert config.groups_per_step == LearnerConfig().groups_per_step  # default otherwise
    assert parse_config(["--max-staleness", "none"]).max_staleness is None


@pytest.mark.parametrize(
    "content, message",
    [
        ("grup_size = 4\n", "unknown setting(s) grup_size"),
        ('group_size = "four"\n', "group_size must be int"),
        ("group_size = 0\n", "group_size must be in 1..256"),
        ('loss = "ppo"\n', "ppo"),
        ("temperature = 0\n", "temperature must be > 0"),
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
        SamplerConfig(learner="localhost")
    with pytest.raises(ValueError, match="max_batch"):
        SamplerConfig(max_batch=0)
    assert SamplerConfig().name  # a default name is made up from host and pid


def test_a_bare_boolean_flag_means_true_and_a_value_still_parses():
    assert parse_config(["--insecure"]).insecure is True
    assert parse_config(["--insecure", "false"]).insecure is False
    assert parse_config(["--insecure", "--lr", "0.5"]).lr == 0.5
    assert parse_config([]).insecure is False
