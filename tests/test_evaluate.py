"""Held-out evaluation: greedy accuracy and pass@1 over k samples, batched with bounded memory, seeded, and
reported per evaluation (metrics record, summary fields)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from heterorl.common.model import encode_prompt, load_causal_lm, load_tokenizer, resolve_model
from heterorl.common.tasks import Problem
from heterorl.server import evaluate as ev


@pytest.fixture(scope="module")
def tiny(tiny_cache):
    model_dir = resolve_model("tiny", cache=tiny_cache)
    return load_causal_lm(model_dir), load_tokenizer(model_dir)


PROBLEMS = [Problem(id=f"p{i}", question=f"What is {i} + 1?", answer=str(i + 1)) for i in range(6)]


def run(tiny, correct, **settings) -> ev.EvalResult:
    model, tokenizer = tiny
    return ev.evaluate_policy(
        model, PROBLEMS, lambda p: encode_prompt(tokenizer, p.question),
        lambda ids: tokenizer.decode(ids, skip_special_tokens=True), correct,
        ev.EvalSettings(**{"max_new_tokens": 6, "temperature": 1.0, **settings}), pad_id=tokenizer.pad_token_id)


def by_first_char(chars: str):
    """A stand-in reward: a completion is right when it starts with one of `chars` (about half of them do)."""
    return lambda texts, answer: [t[:1] in chars for t in texts]


def test_greedy_only_by_default_and_batching_does_not_change_it(tiny) -> None:
    everything = run(tiny, lambda texts, answer: [True] * len(texts))
    assert (everything.accuracy, everything.pass1, everything.k, everything.n) == (1.0, None, 0, len(PROBLEMS))
    nothing = run(tiny, lambda texts, answer: [False] * len(texts))
    assert nothing.accuracy == 0.0
    seen: list[str] = []
    record = lambda texts, answer: seen.extend(texts) or [False] * len(texts)  # noqa: E731
    run(tiny, record, batch_size=1)
    one_by_one = list(seen)
    seen.clear()
    run(tiny, record, batch_size=32)
    assert seen == one_by_one  # left padding: the same greedy answers in any batch


def test_pass1_averages_k_samples_and_is_seeded(tiny) -> None:
    model, _ = tiny
    correct = by_first_char("0123456789 ")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    model.train()
    a = run(tiny, correct, samples=4, seed=7, batch_size=8)
    assert torch.equal(torch.get_rng_state(), before), "evaluation must not move the caller's RNG"
    assert model.training, "the model's mode is restored"
    b = run(tiny, correct, samples=4, seed=7, batch_size=8)
    assert a.k == 4 and a.pass1 == b.pass1  # same seed, same samples
    assert 0.0 <= a.pass1 <= 1.0 and (a.pass1 * len(PROBLEMS) * 4).is_integer()
    all_right = run(tiny, lambda texts, answer: [True] * len(texts), samples=3)
    assert all_right.pass1 == 1.0


def test_each_generate_call_holds_at_most_batch_size_sequences(tiny, monkeypatch) -> None:
    model, _ = tiny
    shapes: list[tuple[int, int]] = []
    real = model.generate

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        shapes.append((kwargs["input_ids"].shape[0], out.shape[0]))
        return out

    monkeypatch.setattr(model, "generate", spy)
    per_problem: list[int] = []
    run(tiny, lambda texts, answer: per_problem.append(len(texts)) or [False] * len(texts), samples=3, batch_size=7)
    assert all(rows <= 7 for _, rows in shapes)
    assert per_problem == [1] * len(PROBLEMS) + [3] * len(PROBLEMS)  # greedy, then k samples per problem
    assert sum(rows for _, rows in shapes) == len(PROBLEMS) * (1 + 3)


def test_stop_strings_cut_completions() -> None:
    assert ev.cut_at_stop("12\nQ: next", ("\nQ:",)) == "12"
    assert ev.cut_at_stop("a;b|c", ("|", ";")) == "a"
    assert ev.cut_at_stop("abc", ()) == "abc"


def test_empty_split_and_record_shape() -> None:
    result = ev.evaluate_policy(torch.nn.Linear(1, 1), [], None, None, None, ev.EvalSettings(max_new_tokens=1,
                                samples=2), pad_id=0)
    assert math.isnan(result.accuracy) and math.isnan(result.pass1) and result.n == 0
    line = ev.record(ev.EvalResult(0.5, 0.25, 4, 8, 1.0), step=3, version=4)
    assert {k: line[k] for k in ("kind", "step", "version", "accuracy", "pass1", "k", "n")} == {
        "kind": "eval", "step": 3, "version": 4, "accuracy": 0.5, "pass1": 0.25, "k": 4, "n": 8}


def test_summary_fields_join_history_with_pass1_from_the_metrics_file(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    lines = [
        {"kind": "eval", "step": 0, "accuracy": 0.1},  # written before pass@1 existed
        {"kind": "train", "step": 1},
        {"kind": "eval", "step": 2, "accuracy": 0.2, "pass1": 0.3, "k": 4},
        {"kind": "eval", "step": 2, "accuracy": 0.25, "pass1": 0.35, "k": 4},  # a resumed run evaluated it again
    ]
    metrics.write_text("".join(json.dumps(x) + "\n" for x in lines) + "{torn")
    fields = ev.summary_fields([(0, 0.1), (2, 0.25)], metrics)
    assert fields["eval"] == [{"step": 0, "accuracy": 0.1, "pass1": None, "k": 0},
                              {"step": 2, "accuracy": 0.25, "pass1": 0.35, "k": 4}]
    assert (fields["base_pass1"], fields["final_pass1"], fields["eval_samples"]) == (None, 0.35, 4)
    assert ev.summary_fields([], tmp_path / "none.jsonl") == {"eval": [], "base_pass1": None, "final_pass1": None,
                                                              "eval_samples": 0}


def test_model_device_prefers_the_trainers() -> None:
    model = torch.nn.Linear(1, 1)
    assert ev.model_device(model) == torch.device("cpu")
    assert ev.model_device(model, type("T", (), {"device": "cpu"})()) == torch.device("cpu")
