"""Tasks and rewards: determinism, held-out splits, reward edge cases, input validation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from heterorl.common.tasks import (
    REWARDS,
    ArithmeticTask,
    JsonlTask,
    Problem,
    Task,
    digit_fraction,
    exact_match,
    get_reward,
    last_number,
    make_task,
)

# -- rewards ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("7 + 5 = 12", "12", 1.0),
        ("The answer is 12.", "12", 1.0),
        ("The answer is 12.\n", "12", 1.0),
        ("12", "12", 1.0),
        ("12 is it, no wait, 13", "12", 0.0),
        ("The total is 1,234.", "1234", 1.0),
        ("The total is 1234", "1,234", 1.0),
        ("5 - 7 = -2", "-2", 1.0),
        ("5 - 7 = 2", "-2", 0.0),
        ("12-5=7", "7", 1.0),  # the hyphen glued to 12 is subtraction, not a sign on 5
        ("It is 3.5 exactly", "3.5", 1.0),
        ("It is 12.0", "12", 1.0),
        ("It is 12.5", "12", 0.0),
        ("3,4", "4", 1.0),  # not a thousands separator: two numbers
        ("no numbers here", "12", 0.0),
        ("", "12", 0.0),
        ("x12", "12", 0.0),  # part of an identifier, not a number
        ("answer: 12", " 12 ", 1.0),
    ],
)
def test_last_number(completion: str, answer: str, expected: float) -> None:
    assert last_number(completion, answer) == expected


def test_last_number_rejects_a_non_numeric_answer() -> None:
    with pytest.raises(ValueError, match="not a number"):
        last_number("12", "twelve")


def test_digit_fraction_is_dense() -> None:
    assert digit_fraction("", "1") == 0.0
    assert digit_fraction("ab", "1") == 0.0
    assert digit_fraction("12ab", "1") == 0.5
    assert digit_fraction("2024", "whatever") == 1.0
    assert 0.0 < digit_fraction("a1b", "") < 1.0


def test_exact_match() -> None:
    assert exact_match(" 12\n", "12") == 1.0
    assert exact_match("12.", "12") == 0.0


def test_get_reward_by_name_and_import_path() -> None:
    assert get_reward("last_number") is last_number
    assert get_reward("digit_fraction") is digit_fraction
    assert get_reward("heterorl.common.tasks:digit_fraction") is digit_fraction
    for bad, message in [
        ("nope", "unknown reward"),
        ("no_such_module_xyz:f", "cannot import"),
        ("heterorl.common.tasks:missing", "no attribute"),
        ("heterorl.common.tasks:REWARDS", "not callable"),
        (":f", "must look like"),
    ]:
        with pytest.raises(ValueError, match=message):
            get_reward(bad)


def test_reward_registry_is_read_only() -> None:
    with pytest.raises(TypeError):
        REWARDS["mine"] = digit_fraction  # type: ignore[index]


def test_problem_is_frozen() -> None:
    p = Problem(id="a", question="q", answer="1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.answer = "2"  # type: ignore[misc]


# -- arithmetic -------------------------------------------------------------------------------------------


def _operands(p: Problem) -> tuple[str, int, int]:
    op, a, b = p.id.split(":")
    return op, int(a), int(b)


def _split_key(op: str, a: int, b: int) -> tuple[str, int, int]:
    return (op, min(a, b), max(a, b)) if op == "add" else (op, a, b)


def test_arithmetic_is_deterministic_and_seeded() -> None:
    a, b = ArithmeticTask(seed=5), ArithmeticTask(seed=5)
    assert [a.train_problem(i) for i in range(200)] == [b.train_problem(i) for i in range(200)]
    assert a.eval_problems(50) == b.eval_problems(50)
    c = ArithmeticTask(seed=6)
    assert [a.train_problem(i) for i in range(50)] != [c.train_problem(i) for i in range(50)]
    assert a.eval_problems(50) != c.eval_problems(50)
    # Random access: index 137 does not depend on what was asked before.
    assert ArithmeticTask(seed=5).train_problem(137) == a.train_problem(137)


def test_arithmetic_train_and_eval_never_overlap() -> None:
    task = ArithmeticTask(ops="+-")
    held_out = task.eval_problems()
    assert len(held_out) == task.eval_size and len({p.id for p in held_out}) == len(held_out)
    eval_questions = {p.question for p in held_out}
    # Commutative pairs are held out together, so "5 + 7" in eval means "7 + 5" is never trained on either.
    eval_keys = {_split_key(*_operands(p)) for p in held_out}
    train = [task.train_problem(i) for i in range(8000)]
    for p in train:
        assert p.question not in eval_questions
        assert _split_key(*_operands(p)) not in eval_keys
    # ... while the train stream still covers every other tuple: the space is not silently shrunk.
    all_tuples = {(op, a, b) for op in ("add", "sub") for a in range(1, 21) for b in range(1, 21)}
    expected_train = {t for t in all_tuples if _split_key(*t) not in eval_keys}
    assert {_operands(p) for p in train} == expected_train


def test_arithmetic_problems_are_correct_and_in_range() -> None:
    task = ArithmeticTask(low=-5, high=9, ops="+-*", seed=2)
    for p in [task.train_problem(i) for i in range(300)] + task.eval_problems(40):
        op, a, b = _operands(p)
        assert -5 <= a <= 9 and -5 <= b <= 9
        assert int(p.answer) == {"add": a + b, "sub": a - b, "mul": a * b}[op]
        assert task.local_reference(p.question) == p.answer
        assert last_number(f"So the result is {p.answer}.", p.answer) == 1.0


def test_default_task_shape() -> None:
    task = ArithmeticTask()
    p = task.train_problem(0)
    assert p.question.startswith("What is ") and " + " in p.question
    assert task.default_reward == "last_number"
    assert task.eval_size >= 100  # enough held-out problems for benchmarks/base_accuracy.py --n 100


def test_eval_problems_are_prefix_stable_and_bounded() -> None:
    task = ArithmeticTask()
    assert task.eval_problems(30) == task.eval_problems(60)[:30]
    assert task.eval_problems(0) == []
    with pytest.raises(ValueError, match="only"):
        task.eval_problems(task.eval_size + 1)
    with pytest.raises(ValueError, match="non-negative"):
        task.eval_problems(-1)
    with pytest.raises(ValueError, match="non-negative"):
        task.train_problem(-1)


def test_arithmetic_large_space_samples_distinct_held_out_problems() -> None:
    task = ArithmeticTask(low=1, high=2000, ops="+*")
    held_out = task.eval_problems(300)
    assert len({p.id for p in held_out}) == 300
    assert held_out == ArithmeticTask(low=1, high=2000, ops="+*").eval_problems(300)
    assert held_out[:100] == task.eval_problems(100)
    ids = {p.id for p in held_out}
    assert not ids & {task.train_problem(i).id for i in range(2000)}


def test_local_reference_reads_only_this_tasks_questions() -> None:
    task = ArithmeticTask(ops="+-*")
    assert task.local_reference("What is 7 + 5? Answer with just the number.") == "12"
    assert task.local_reference("What is -7 - -5? Answer with just the number.") == "-2"
    assert task.local_reference("What is 6 * 7? Answer with just the number.") == "42"
    assert task.local_reference("What is 7 + 5?") is None
    assert task.local_reference("Tell me a joke.") is None
    custom = ArithmeticTask(template="Compute ({a}) {op} ({b}) {{now}}.")
    assert custom.train_problem(0).question.endswith("{now}.")
    assert custom.local_reference("Compute (3) + (4) {now}.") == "7"
    assert custom.local_reference("Compute 3 + 4 {now}.") is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"low": 5, "high": 1}, "must not exceed"),
        ({"ops": "/"}, "unknown arithmetic op"),
        ({"ops": ""}, "at least one"),
        ({"eval_fraction": 0.0}, "eval_fraction"),
        ({"eval_fraction": 1.5}, "eval_fraction"),
        ({"template": "What is {a} plus {b}?"}, "{op}"),
        ({"template": "{a} {op} {b} {c}"}, "not a valid format"),
        ({"low": "1"}, "must be an int"),
        ({"low": 1, "high": 1}, "degenerate"),
    ],
)
def test_arithmetic_rejects_bad_options(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ArithmeticTask(**options)


def test_make_task_round_trips_options() -> None:
    task = ArithmeticTask(low=2, high=30, ops=("+", "-"), seed=9, eval_fraction=0.3)
    rebuilt = make_task("arithmetic", **task.options())
    assert rebuilt == task
    assert rebuilt.eval_problems(10) == task.eval_problems(10)
    assert make_task("arithmetic", ops="+,-").ops == ("+", "-")
    assert isinstance(rebuilt, Task)
    with pytest.raises(ValueError, match="unknown task"):
        make_task("chess")
    with pytest.raises(ValueError, match="bad options"):
        make_task("arithmetic", colour="blue")


# -- jsonl ------------------------------------------------------------------------------------------------


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _good_file(tmp_path: Path, count: int = 60) -> Path:
    return _write(
        tmp_path / "qa.jsonl",
        [json.dumps({"question": f"How many legs have {i} ducks?", "answer": 2 * i}) for i in range(count)],
    )


def test_jsonl_split_is_deterministic_disjoint_and_complete(tmp_path: Path) -> None:
    path = _good_file(tmp_path)
    task = JsonlTask(path, eval_fraction=0.25, seed=1)
    held_out = task.eval_problems()
    assert 0 < task.eval_size < 60 and task.train_size + task.eval_size == 60
    first_epoch = [task.train_problem(i) for i in range(task.train_size)]
    assert {p.id for p in first_epoch}.isdisjoint({p.id for p in held_out})
    assert len({p.id for p in first_epoch}) == task.train_size  # an epoch visits every train problem once
    second_epoch = [task.train_problem(task.train_size + i) for i in range(task.train_size)]
    assert {p.id for p in second_epoch} == {p.id for p in first_epoch}
    assert second_epoch != first_epoch  # each epoch has its own order
    again = JsonlTask(path, eval_fraction=0.25, seed=1)
    assert again.eval_problems() == held_out
    assert [again.train_problem(i) for i in range(100)] == [task.train_problem(i) for i in range(100)]
    assert held_out[0].answer == str(2 * int(held_out[0].question.split()[4]))  # numbers become strings
    assert task.local_reference(held_out[0].question) is None
    assert isinstance(task, Task)
    assert make_task("jsonl", **task.options()).eval_problems() == held_out


def test_jsonl_ids_follow_content_not_line_order(tmp_path: Path) -> None:
    lines = [json.dumps({"question": f"q{i}", "answer": str(i)}) for i in range(20)]
    a = JsonlTask(_write(tmp_path / "a.jsonl", lines), eval_fraction=0.3)
    b = JsonlTask(_write(tmp_path / "b.jsonl", lines[::-1]), eval_fraction=0.3)
    assert {p.id for p in a.eval_problems()} == {p.id for p in b.eval_problems()}
    named = JsonlTask(_write(tmp_path / "c.jsonl", ['{"id": "x1", "question": "q", "answer": "1"}']), eval_fraction=0)
    assert named.train_problem(0) == Problem(id="x1", question="q", answer="1")


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"question": "a", "answer": "1"}', "", "{not json"], r"qa\.jsonl:3: invalid JSON"),
        (['{"question": "a", "answer": "1"}', '{"question": "b"}'], r":2: missing field 'answer'"),
        (['["question", "answer"]'], r":1: expected a JSON object"),
        (['{"question": "  ", "answer": "1"}'], r":1: 'question' must be a non-empty string"),
        (['{"question": "a", "answer": true}'], r":1: 'answer' must be a string or a number"),
        (['{"question": "a", "answer": ""}'], r":1: 'answer' is empty"),
        (['{"id": "p", "question": "a", "answer": "1"}', '{"id": "p", "question": "b", "answer": "2"}'],
         r":2: duplicate id 'p' \(first on line 1\)"),
        (['{"question": "a", "answer": "1"}', '{"question": "a", "answer": "1"}'], r":2: duplicate id"),
        ([""], "holds no problems"),
    ],
)
def test_jsonl_validation_names_the_line(tmp_path: Path, lines: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        JsonlTask(_write(tmp_path / "qa.jsonl", lines))


def test_jsonl_rejects_missing_file_and_bad_fraction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        JsonlTask(tmp_path / "absent.jsonl")
    with pytest.raises(ValueError, match="eval_fraction"):
        JsonlTask(_good_file(tmp_path), eval_fraction=1.0)


def test_tasks_module_keeps_the_names_callers_import() -> None:
    """node/sampler.py and older callers import rewards and tasks from here; the split modules must not break it."""
    from heterorl.common import datasets, problems, rewards, tasks

    assert tasks.builtin_reward is rewards.builtin_reward and tasks.get_reward is rewards.get_reward
    assert tasks.Problem is problems.Problem and tasks.JsonlTask is datasets.JsonlTask
    assert tasks.builtin_reward("last_number") is last_number and tasks.builtin_reward("pkg:fn") is None
    assert {"math", "format"} <= set(REWARDS)
    with pytest.raises(ValueError, match="known: arithmetic, dataset, jsonl"):
        make_task("csv")
