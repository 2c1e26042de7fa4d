"""Tasks read from local files: JSONL, JSON, Parquet, and directories written by `datasets` (`save_to_disk`).

Nothing is downloaded: every path is a local file or directory. Question and answer columns are named by options;
an optional id column names problems (otherwise a hash of the question does, so ids survive reordering). The
held-out split is a second file or a seeded fraction (problems/FixedSplit). Answers are not derivable from the
question, so `local_reference` is None and samplers report no reward of their own.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from heterorl.common.problems import FixedSplit, Problem, question_id

logger = logging.getLogger(__name__)

FORMATS = ("auto", "jsonl", "json", "parquet", "arrow")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


# -- reading rows ------------------------------------------------------------------------------------------------


def _format_of(path: Path, fmt: str) -> str:
    if fmt != "auto":
        if fmt not in FORMATS:
            raise ValueError(f"unknown data format {fmt!r}; known: {', '.join(FORMATS)}")
        return fmt
    if path.is_dir():
        return "arrow"
    try:
        return _SUFFIXES[path.suffix.lower()]
    except KeyError:
        raise ValueError(f"{path}: unknown format {path.suffix or '(no suffix)'!r}; expected .jsonl, .json, "
                         ".parquet, or a directory written by datasets' save_to_disk") from None


def read_rows(path: str | Path, fmt: str = "auto", split: str | None = None) -> list[dict]:
    """Every row of a local data file or `save_to_disk` directory, as dicts; ValueError names the file."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"data file {str(path)!r} does not exist")
    kind = _format_of(path, fmt)
    try:
        if kind == "jsonl":
            rows = _read_jsonl_rows(path)
        elif kind == "json":
            rows = _read_json_rows(path)
        elif kind == "parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        else:
            rows = _read_saved_dataset(path, split)
    except OSError as err:
        raise ValueError(f"cannot read data file {str(path)!r}: {err}") from None
    if not rows:
        raise ValueError(f"data file {str(path)!r} holds no rows")
    return rows


def _read_jsonl_rows(path: Path) -> list[dict]:
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        rows.append(record)
    return rows


def _read_json_rows(path: Path) -> list[dict]:
    """A JSON array of objects, or datasets' `to_json` output (JSON lines under a .json name)."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl_rows(path)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: expected a JSON array of objects or JSON lines")
    return data


def _read_saved_dataset(path: Path, split: str | None) -> list[dict]:
    """A `Dataset` or `DatasetDict` written by `save_to_disk` (a DatasetDict needs a split: 'train' if present)."""
    if not path.is_dir():
        raise ValueError(f"{path}: format 'arrow' needs a directory written by datasets' save_to_disk")
    if not any((path / marker).exists() for marker in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise ValueError(f"{path}: a directory, but not one written by datasets' save_to_disk (no dataset_info.json "
                         "or dataset_dict.json); point --task-path at a .jsonl, .json or .parquet file instead")
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        names = sorted(loaded)
        chosen = split or ("train" if "train" in loaded else names[0] if len(names) == 1 else None)
        if chosen not in loaded:
            raise ValueError(f"{path}: a DatasetDict with splits {', '.join(names)}; name one with data_split")
        loaded = loaded[chosen]
    elif split is not None:
        raise ValueError(f"{path}: a single Dataset has no splits; data_split {split!r} does not apply")
    return loaded.to_list()


# -- rows to problems ----------------------------------------------------------------------------------------------


def rows_to_problems(rows: list[dict], where: str, question_column: str = "question",
                     answer_column: str = "answer", id_column: str | None = None) -> list[Problem]:
    """Validate and convert rows; a repeated question keeps its first row (datasets often repeat one)."""
    columns = set(rows[0])
    for role, column in (("question", question_column), ("answer", answer_column), ("id", id_column)):
        if column is not None and column not in columns:
            raise ValueError(f"{where}: no {role} column {column!r} (columns: {', '.join(sorted(columns))}); "
                             f"name it with --{role}-column")
    problems: list[Problem] = []
    seen: set[str] = set()
    for number, row in enumerate(rows, start=1):
        at = f"{where} row {number}"
        question, answer = row.get(question_column), row.get(answer_column)
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{at}: {question_column!r} must be a non-empty string, got {question!r:.60}")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise ValueError(f"{at}: {answer_column!r} must be a string or a number, got {type(answer).__name__}")
        answer = str(answer).strip()
        if not answer:
            raise ValueError(f"{at}: {answer_column!r} is empty")
        if id_column is not None:
            pid = row.get(id_column)
            if isinstance(pid, bool) or not isinstance(pid, (str, int)) or str(pid) == "":
                raise ValueError(f"{at}: {id_column!r} must be a non-empty string or an int")
            pid = str(pid)
            if pid in seen:
                raise ValueError(f"{at}: duplicate id {pid!r}")
        else:
            pid = question_id(question)
            if pid in seen:
                continue
        seen.add(pid)
        problems.append(Problem(id=pid, question=question, answer=answer))
    if len(problems) < len(rows):
        logger.info("%s: %d repeated questions skipped", where, len(rows) - len(problems))
    return problems


class _SplitTask:
    """What a task over a fixed list of problems answers through its `FixedSplit` (train stream, held-out split)."""

    _split: FixedSplit

    @property
    def train_size(self) -> int:
        return len(self._split.train)

    @property
    def eval_size(self) -> int:
        return len(self._split.held_out)

    def train_problem(self, index: int) -> Problem:
        """Epoch e = index // train_size walks the train split in a seeded permutation of its own."""
        return self._split.train_problem(index)

    def eval_problems(self, n: int | None = None) -> list[Problem]:
        return self._split.eval_problems(n)

    def local_reference(self, question: str) -> str | None:
        return None  # the answers live in the file, on the learner only


class DatasetTask(_SplitTask):
    """Problems from a local JSONL / JSON / Parquet file or `save_to_disk` directory (task 'dataset').

    Held out: every problem of `eval_path` when given (and removed from train if the train file repeats it),
    else a seeded `eval_fraction` of the file chosen per problem id.
    """

    name = "dataset"

    def __init__(self, path: str | Path, question_column: str = "question", answer_column: str = "answer",
                 id_column: str | None = None, eval_path: str | Path | None = None, eval_fraction: float = 0.1,
                 seed: int = 0, data_format: str = "auto", data_split: str | None = None,
                 default_reward: str = "math") -> None:
        if not 0.0 <= eval_fraction < 1.0:
            raise ValueError(f"dataset eval_fraction must be in [0, 1), got {eval_fraction!r}")
        self.path = Path(path)
        self.eval_path = Path(eval_path) if eval_path is not None else None
        self.question_column, self.answer_column, self.id_column = question_column, answer_column, id_column
        self.eval_fraction, self.seed = float(eval_fraction), int(seed)
        self.data_format, self.data_split, self.default_reward = data_format, data_split, default_reward
        columns = dict(question_column=question_column, answer_column=answer_column, id_column=id_column)
        problems = rows_to_problems(read_rows(self.path, data_format, data_split), str(self.path), **columns)
        held_out = None
        if self.eval_path is not None:
            held_out = rows_to_problems(read_rows(self.eval_path, data_format, data_split), str(self.eval_path),
                                        **columns)
        self._split = FixedSplit("dataset", str(self.path), problems, self.eval_fraction, self.seed, held_out)

    def options(self) -> dict[str, object]:
        return {
            "path": str(self.path), "question_column": self.question_column, "answer_column": self.answer_column,
            "id_column": self.id_column, "eval_path": None if self.eval_path is None else str(self.eval_path),
            "eval_fraction": self.eval_fraction, "seed": self.seed, "data_format": self.data_format,
            "data_split": self.data_split, "default_reward": self.default_reward,
        }


class JsonlTask(_SplitTask):
    """Questions and answers from a local JSON Lines file: one object per line with 'question' and 'answer'.

    An optional 'id' names a problem; otherwise the id is a hash of the question, so it survives reordering.
    The held-out split is chosen per id by a stable hash. Answers are not derivable from the question, so
    `local_reference` is None and samplers report no reward of their own.
    """

    name = "jsonl"

    def __init__(
        self, path: str | Path, eval_fraction: float = 0.1, seed: int = 0, default_reward: str = "last_number"
    ) -> None:
        if not 0.0 <= eval_fraction < 1.0:
            raise ValueError(f"jsonl eval_fraction must be in [0, 1), got {eval_fraction!r}")
        self.path = Path(path)
        self.eval_fraction = float(eval_fraction)
        self.seed = int(seed)
        self.default_reward = default_reward
        self._split = FixedSplit("jsonl", str(self.path), _read_jsonl(self.path), self.eval_fraction, self.seed)

    def options(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "eval_fraction": self.eval_fraction,
            "seed": self.seed,
            "default_reward": self.default_reward,
        }


def _read_jsonl(path: Path) -> list[Problem]:
    """Parse and validate every line strictly; errors name the file and the 1-based line number."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read task file {str(path)!r}: {exc}") from exc
    problems: list[Problem] = []
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: invalid JSON: {exc.msg}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for key in ("question", "answer"):
            if key not in record:
                raise ValueError(f"{where}: missing field {key!r}")
        question, answer = record["question"], record["answer"]
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: 'question' must be a non-empty string")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise ValueError(f"{where}: 'answer' must be a string or a number, got {type(answer).__name__}")
        answer = str(answer).strip()
        if not answer:
            raise ValueError(f"{where}: 'answer' is empty")
        if "id" in record:
            pid = record["id"]
            if isinstance(pid, bool) or not isinstance(pid, (str, int)) or str(pid) == "":
                raise ValueError(f"{where}: 'id' must be a non-empty string or an int")
            pid = str(pid)
        else:
            pid = question_id(question)
        if pid in first_line:
            raise ValueError(f"{where}: duplicate id {pid!r} (first on line {first_line[pid]})")
        first_line[pid] = lineno
        problems.append(Problem(id=pid, question=question, answer=answer))
    if not problems:
        raise ValueError(f"task file {str(path)!r} holds no problems")
    return problems
