"""The staleness proxy model: heterorl's tiny tokenizer, vLLM-compatible heads, deterministic, cached once."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import staleness_proxy as sp  # noqa: E402
from heterorl.common.config import from_flat  # noqa: E402
from heterorl.common.model import build_tiny_model_dir, encode_prompt, load_tokenizer  # noqa: E402
from heterorl.common.tasks import ArithmeticTask, make_task  # noqa: E402
from heterorl.server.config import LearnerConfig  # noqa: E402

QUICK = sp.WarmupSpec(steps=2, batch=4)


def test_proxy_settings_are_accepted_by_the_learner_config(tmp_path: Path) -> None:
    json.dumps(sp.PROXY_TASK_OPTIONS)  # must travel as --task-options JSON
    task = make_task("arithmetic", **sp.PROXY_TASK_OPTIONS)
    config = from_flat(LearnerConfig, run_dir=tmp_path, task="arithmetic",
                       task_options=json.dumps(sp.PROXY_TASK_OPTIONS), **sp.PROXY_LEARNER_FLAGS)
    assert config.eval.eval_size <= task.eval_size


def test_quick_build_uses_tiny_tokenizer_and_is_deterministic(tmp_path: Path) -> None:
    task = ArithmeticTask(**sp.PROXY_TASK_OPTIONS)
    one = sp.write_proxy_model(tmp_path / "one", task, QUICK)
    two = sp.write_proxy_model(tmp_path / "two", task, QUICK)
    other = sp.write_proxy_model(tmp_path / "other", task, sp.WarmupSpec(steps=2, batch=4, seed=1))
    tiny = build_tiny_model_dir(tmp_path / "tiny")
    assert (one / "model.safetensors").read_bytes() == (two / "model.safetensors").read_bytes()
    assert (one / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()
    assert (one / "tokenizer.json").read_bytes() == (tiny / "tokenizer.json").read_bytes()
    config = json.loads((one / "config.json").read_text())
    assert config["hidden_size"] // config["num_attention_heads"] == 32
    question = task.train_problem(0).question
    assert encode_prompt(load_tokenizer(one), question) == encode_prompt(load_tokenizer(tiny), question)


def test_warm_up_covers_every_question_and_carries_the_habit(tmp_path: Path) -> None:
    task = ArithmeticTask(**sp.PROXY_TASK_OPTIONS)
    tokenizer = load_tokenizer(build_tiny_model_dir(tmp_path / "tiny"))
    rows, starts = sp._answer_rows(tokenizer, task, range(0, 1000), sp.PROXY_SPEC, {})
    questions, habits = set(), 0
    for row, start in zip(rows, starts):
        question = tokenizer.decode(row[:start], skip_special_tokens=True).split("user: ")[1].split("\n")[0]
        a, b = (int(x) for x in question.rstrip("=").split("+"))
        target = tokenizer.decode(row[start:], skip_special_tokens=True)
        assert target in (str(a + b), str(a + b) + "0")
        habits += target != str(a + b)
        questions.add(question)
    # Pretraining knows every fact, held-out ones included; RL later trains on the train split only.
    assert {p.question for p in task.eval_problems()} < questions
    assert len(questions) == (task.high - task.low + 1) ** 2
    assert abs(habits / len(rows) - sp.PROXY_SPEC.habit) < 0.05


def test_build_proxy_model_reuses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sp, "PROXY_SPEC", QUICK)
    monkeypatch.setattr(sp.write_proxy_model, "__defaults__", (QUICK,))
    first = sp.build_proxy_model(tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert sp.build_proxy_model(tmp_path) == first == tmp_path / "models" / sp.PROXY_NAME
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
