"""Task 'dataset': prompts from local JSONL, JSON, Parquet and `datasets` save_to_disk data, with column options,
a held-out split (a second file or a seeded fraction), clear errors, and chat formatting with a system prompt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from heterorl.common.config import from_flat
from heterorl.common.datasets import DatasetTask, read_rows
from heterorl.common.tasks import make_task
from heterorl.server.config import LearnerConfig

ROWS = [{"problem": f"Compute {i} + {i}.", "solution": str(2 * i), "uid": f"p{i}"} for i in range(40)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def columns(**extra) -> dict:
    return {"question_column": "problem", "answer_column": "solution", **extra}


def test_every_format_reads_the_same_problems(tmp_path: Path) -> None:
    import datasets

    data = datasets.Dataset.from_list(ROWS)
    sources = {
        "jsonl": write_jsonl(tmp_path / "d.jsonl", ROWS),
        "json array": tmp_path / "d.json",
        "parquet": write_parquet(tmp_path / "d.parquet", ROWS),
        "save_to_disk": tmp_path / "saved",
        "DatasetDict": tmp_path / "saved_dict",
        "datasets to_parquet": tmp_path / "d2.parquet",
        "datasets to_json": tmp_path / "d2.json",
    }
    sources["json array"].write_text(json.dumps(ROWS))
    data.save_to_disk(str(sources["save_to_disk"]))
    datasets.DatasetDict({"train": data, "test": data.select(range(3))}).save_to_disk(str(sources["DatasetDict"]))
    data.to_parquet(str(sources["datasets to_parquet"]))
    data.to_json(str(sources["datasets to_json"]))  # JSON lines under a .json name
    tasks = {name: DatasetTask(path, **columns()) for name, path in sources.items()}
    reference = tasks["jsonl"]
    assert reference.train_size + reference.eval_size == len(ROWS)
    for name, task in tasks.items():
        assert [task.train_problem(i) for i in range(60)] == [reference.train_problem(i) for i in range(60)], name
        assert task.eval_problems() == reference.eval_problems(), name
    assert {p.answer for p in reference.eval_problems()} <= {r["solution"] for r in ROWS}


def test_split_by_fraction_is_seeded_disjoint_and_complete(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    a = DatasetTask(path, eval_fraction=0.25, seed=1, **columns())
    b = DatasetTask(path, eval_fraction=0.25, seed=1, **columns())
    c = DatasetTask(path, eval_fraction=0.25, seed=2, **columns())
    assert a.eval_problems() == b.eval_problems() and a.eval_problems() != c.eval_problems()
    train_ids = {a.train_problem(i).id for i in range(a.train_size)}
    eval_ids = {p.id for p in a.eval_problems()}
    assert not train_ids & eval_ids and len(train_ids | eval_ids) == len(ROWS)
    assert 4 <= len(eval_ids) <= 16  # about a quarter of 40
    # Ids are a hash of the question, or the id column's values when there is one.
    assert all(i.startswith("q-") for i in eval_ids)
    by_uid = DatasetTask(path, id_column="uid", eval_fraction=0.25, seed=1, **columns())
    assert {p.id for p in by_uid.eval_problems()} <= {r["uid"] for r in ROWS} and by_uid.eval_size > 0


def test_held_out_file_and_its_questions_leave_train(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", ROWS[:30])
    held = write_parquet(tmp_path / "test.parquet", ROWS[25:40])  # 5 questions in both files
    task = DatasetTask(train, eval_path=held, eval_fraction=0.0, **columns())
    assert [p.question for p in task.eval_problems()] == [r["problem"] for r in ROWS[25:40]]
    assert task.train_size == 25
    assert {task.train_problem(i).question for i in range(25)} == {r["problem"] for r in ROWS[:25]}


def test_repeated_questions_keep_their_first_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ROWS + ROWS[:5])
    task = DatasetTask(path, **columns())
    assert task.train_size + task.eval_size == len(ROWS)


@pytest.mark.parametrize(
    ("write", "options", "message"),
    [
        (lambda p: write_jsonl(p / "d.jsonl", ROWS), {"question_column": "question"},
         r"no question column 'question' \(columns: problem, solution, uid\); name it with --question-column"),
        (lambda p: write_jsonl(p / "d.jsonl", ROWS), columns(answer_column="answer"), "no answer column 'answer'"),
        (lambda p: write_jsonl(p / "d.jsonl", ROWS), columns(id_column="key"), "no id column 'key'"),
        (lambda p: (p / "d.jsonl").write_text("\n\n") and p / "d.jsonl", columns(), "holds no rows"),
        (lambda p: write_parquet(p / "d.parquet", [{"problem": "x", "solution": None}]), columns(),
         "'solution' must be a string or a number"),
        (lambda p: (p / "d.csv").write_text("problem,solution\n") and p / "d.csv", columns(), "unknown format '.csv'"),
        (lambda p: p / "missing.jsonl", columns(), "does not exist"),
        (lambda p: (p / "d.jsonl").write_text("{bad\n") and p / "d.jsonl", columns(), r"d.jsonl:1: invalid JSON"),
        (lambda p: (p / "dir").mkdir() or p / "dir", columns(), "not one written by datasets' save_to_disk"),
        (lambda p: write_jsonl(p / "d.jsonl", ROWS), columns(eval_fraction=1.0), r"eval_fraction must be in \[0, 1\)"),
    ],
)
def test_errors_are_one_clear_line(tmp_path: Path, write, options: dict, message: str) -> None:
    path = write(tmp_path)
    with pytest.raises(ValueError, match=message) as info:
        DatasetTask(path, **options)
    assert "\n" not in str(info.value)


def test_unknown_split_of_a_dataset_dict_is_named(tmp_path: Path) -> None:
    import datasets

    data = datasets.Dataset.from_list(ROWS)
    datasets.DatasetDict({"a": data, "b": data}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match="splits a, b; name one with data_split"):
        read_rows(tmp_path / "dd")
    assert len(read_rows(tmp_path / "dd", split="b")) == len(ROWS)


def test_make_task_round_trips_options(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    task = make_task("dataset", path=path, seed=3, **columns())
    again = make_task("dataset", **task.options())
    assert again.eval_problems() == task.eval_problems() and task.default_reward == "math"
    assert task.local_reference(task.train_problem(0).question) is None


def test_config_flags_reach_the_task_and_stray_options_are_refused(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    config = from_flat(LearnerConfig, task="dataset", task_path=path, question_column="problem",
                       answer_column="solution", eval_fraction=0.3)
    task = make_task(config.run.task, seed=0, **config.task_kwargs())
    assert task.options()["eval_fraction"] == 0.3 and task.options()["question_column"] == "problem"
    with pytest.raises(ValueError, match="question_column: set for task 'arithmetic'"):
        from_flat(LearnerConfig, question_column="problem")
    with pytest.raises(ValueError, match="not both"):
        from_flat(LearnerConfig, task="dataset", task_path=path, eval_path=path, eval_fraction=0.2)
    # The old JSONL task keeps working, and --eval-fraction reaches it too.
    jsonl = write_jsonl(tmp_path / "qa.jsonl", [{"question": r["problem"], "answer": r["solution"]} for r in ROWS])
    config = from_flat(LearnerConfig, task="jsonl", task_path=jsonl, eval_fraction=0.5)
    assert make_task("jsonl", **config.task_kwargs()).options()["eval_fraction"] == 0.5


def test_bootstrap_chat_formats_with_the_system_prompt(tmp_path: Path, tiny_cache: Path, monkeypatch) -> None:
    from heterorl.common.model import encode_prompt
    from heterorl.server import bootstrap

    monkeypatch.setenv("HETERORL_CACHE", str(tiny_cache))
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    flat = dict(model="tiny", task="dataset", task_path=path, question_column="problem", answer_column="solution",
                run_dir=tmp_path / "run")
    plain = bootstrap.load(from_flat(LearnerConfig, **flat))
    system = bootstrap.load(from_flat(LearnerConfig, system_prompt="Put the answer in \\boxed{}.", **flat))
    problem = plain.task.train_problem(0)
    assert plain.encode(problem) == encode_prompt(plain.tokenizer, problem.question)
    text = system.tokenizer.decode(system.encode(problem))
    assert text.startswith("<s>system: Put the answer in \\boxed{}.\nuser: Compute") and text.endswith("assistant:")
    assert plain.reward_name == "math" and plain.sampler_task_options == ""
