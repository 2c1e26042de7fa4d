"""Verifiable tasks and reward functions.

The learner owns the answers: it draws problems from a task's deterministic train stream, hands samplers the
question only, and re-scores every completion with a reward function. Arithmetic is self-verifying, so a sampler
can compute its own reward from the question text (`local_reference`) without ever being sent the answer.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import random
import re
from dataclasses import dataclass, field
from functools import cached_property
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping, Protocol, runtime_checkable

RewardFn = Callable[[str, str], float]


@dataclass(frozen=True)
class Problem:
    """One prompt: `id` names its content (the same question always has the same id)."""

    id: str
    question: str
    answer: str


# ---------------------------------------------------------------------------------------------------------------
# Rewards

# A number: optional minus (not a hyphen glued to a word or number, as in "12-5"), then digits with optional
# thousands separators ("1,234"), then an optional decimal part ("3.5"; a sentence-final "12." is just 12).
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


def _to_fraction(text: str) -> Fraction:
    return Fraction(text.replace(",", ""))


def numbers_in(text: str) -> list[Fraction]:
    """Every number in `text`, in order, as exact fractions (so 12, 12.0 and 1,2 are compared by value)."""
    return [_to_fraction(m.group(0)) for m in _NUMBER.finditer(text)]


def _answer_value(answer: str) -> Fraction:
    text = answer.strip().rstrip(".")
    match = _NUMBER.fullmatch(text)
    if match is None:
        raise ValueError(f"answer {answer!r} is not a number; the numeric rewards need answers like '12' or '-3.5'")
    return _to_fraction(match.group(0))


def last_number(completion: str, answer: str) -> float:
    """1.0 if the last number in the completion equals the (numeric) answer, else 0.0."""
    expected = _answer_value(answer)
    found = numbers_in(completion)
    return 1.0 if found and found[-1] == expected else 0.0


def digit_fraction(completion: str, answer: str) -> float:
    """Fraction of the completion's characters that are ASCII digits; ignores the answer.

    A dense signal for the tiny random test model, whose exact answers are almost never right: groups still
    get different rewards, so the advantage (and the gradient) is non-zero.
    """
    if not completion:
        return 0.0
    return sum(1 for c in completion if "0" <= c <= "9") / len(completion)


def exact_match(completion: str, answer: str) -> float:
    """1.0 if the completion, stripped of surrounding whitespace, is exactly the answer."""
    return 1.0 if completion.strip() == answer.strip() else 0.0


REWARDS: Mapping[str, RewardFn] = MappingProxyType(
    {"last_number": last_number, "digit_fraction": digit_fraction, "exact_match": exact_match}
)


def builtin_reward(name: str) -> RewardFn | None:
    """The built-in reward called `name` (see REWARDS); None for an import path or any other name.

    Imports nothing: samplers score with this, never with `get_reward`, so a learner cannot make a sampler
    import a module by naming it. A reward that is not built in is scored on the learner alone.
    """
    return REWARDS.get(name) if isinstance(name, str) else None


def get_reward(name: str) -> RewardFn:
    """A reward by registry name (see REWARDS) or by import path 'package.module:function' (the learner's side)."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        if not module_name or not attr:
            raise ValueError(f"reward import path {name!r} must look like 'package.module:function'")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"reward {name!r}: cannot import module {module_name!r}: {exc}") from exc
        fn = getattr(module, attr, None)
        if fn is None:
            raise ValueError(f"reward {name!r}: module {module_name!r} has no attribute {attr!r}")
        if not callable(fn):
            raise ValueError(f"reward {name!r}: {module_name}.{attr} is not callable")
        return fn
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(
            f"unknown reward {name!r}; known: {', '.join(sorted(REWARDS))}, or an import path 'module:function'"
        ) from None


# ---------------------------------------------------------------------------------------------------------------
# Tasks


@runtime_checkable
class Task(Protocol):
    """What the learner and samplers need from a task."""

    name: str
    default_reward: str

    def train_problem(self, index: int) -> Problem:
        """Problem number `index` of the infinite, deterministic train stream."""
        ...

    def eval_problems(self, n: int | None = None) -> list[Problem]:
        """The first n held-out problems (all if n is None); never seen in the train stream."""
        ...

    def local_reference(self, question: str) -> str | None:
        """The answer computed from the question alone, or None when the question cannot verify itself."""
        ...

    def options(self) -> dict[str, object]:
        """Keyword options such that make_task(self.name, **options) rebuilds this task."""
        ...


def _unit_hash(*parts: object) -> float:
    """A stable hash in [0, 1): the same on every machine and Python process (unlike hash())."""
    digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _check_index(index: int) -> None:
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"train index must be a non-negative int, got {index!r}")


def _check_eval_count(n: int | None, available: int) -> int:
    if n is None:
        return available
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"eval problem count must be a non-negative int or None, got {n!r}")
    if n > available:
        raise ValueError(f"asked for {n} eval problems but the held-out split has only {available}")
    return n


_OPS: Mapping[str, Callable[[int, int], int]] = MappingProxyType(
    {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
)
_OP_NAMES = MappingProxyType({"+": "add", "-": "sub", "*": "mul"})
_COMMUTATIVE = frozenset("+*")
# Above this many operand tuples, eval problems are drawn by seeded sampling instead of full enumeration.
_ENUMERATE_LIMIT = 250_000


def _parse_ops(ops: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    items = [c for c in ops if c not in ", "] if isinstance(ops, str) else list(ops)
    if not items:
        raise ValueError("arithmetic ops must name at least one of '+', '-', '*'")
    bad = [op for op in items if op not in _OPS]
    if bad:
        raise ValueError(f"unknown arithmetic op(s) {bad!r}; known: '+', '-', '*'")
    return tuple(dict.fromkeys(items))  # de-duplicated, order kept


@dataclass(frozen=True)
class ArithmeticTask:
    """Seeded integer arithmetic: 'What is a op b?' with a, b drawn from [low, high].

    The held-out split is chosen per operand tuple by a stable hash (commutative ops use the sorted pair, so
    '5 + 7' is held out together with '7 + 5'); train and eval never share a question.

    Defaults: addition in 1..20 asked as "What is 7 + 5? Answer with just the number.", which
    SmolLM2-135M-Instruct answers right 34-43% of the time depending on the split seed (greedy, last number,
    16 new tokens; benchmarks/base_accuracy.py): far from both zero and perfect, so RL has room to show a gain.
    Without the instruction sentence it scores 23-30%.
    """

    low: int = 1
    high: int = 20
    ops: tuple[str, ...] = ("+",)
    seed: int = 0
    eval_fraction: float = 0.25
    template: str = "What is {a} {op} {b}? Answer with just the number."
    name: str = field(default="arithmetic", init=False)
    default_reward: str = field(default="last_number", init=False)

    def __post_init__(self) -> None:
        for key in ("low", "high", "seed"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"arithmetic {key} must be an int, got {value!r}")
        if self.low > self.high:
            raise ValueError(f"arithmetic low ({self.low}) must not exceed high ({self.high})")
        object.__setattr__(self, "ops", _parse_ops(self.ops))
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"arithmetic eval_fraction must be in (0, 1), got {self.eval_fraction!r}")
        for key in ("{a}", "{op}", "{b}"):
            if self.template.count(key) != 1:
                raise ValueError(f"arithmetic template must contain {key} exactly once, got {self.template!r}")
        try:
            self.template.format(a=1, op="+", b=2)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"arithmetic template {self.template!r} is not a valid format string: {exc}") from exc
        if self.eval_size == 0 or self.eval_size == self._space_size:
            raise ValueError(
                f"arithmetic split is degenerate ({self.eval_size} of {self._space_size} tuples held "
                "out); widen [low, high] or change eval_fraction"
            )

    # -- problem space --------------------------------------------------------------------------------------

    @property
    def _span(self) -> int:
        return self.high - self.low + 1

    def _is_eval(self, a: int, op: str, b: int) -> bool:
        x, y = (min(a, b), max(a, b)) if op in _COMMUTATIVE else (a, b)
        return _unit_hash("arith-split", self.seed, x, op, y) < self.eval_fraction

    def _problem(self, a: int, op: str, b: int) -> Problem:
        return Problem(
            id=f"{_OP_NAMES[op]}:{a}:{b}",
            question=self.template.format(a=a, op=op, b=b),
            answer=str(_OPS[op](a, b)),
        )

    def _draw(self, rng: random.Random) -> tuple[int, str, int]:
        return rng.randint(self.low, self.high), rng.choice(self.ops), rng.randint(self.low, self.high)

    @property
    def _space_size(self) -> int:
        return self._span**2 * len(self.ops)

    @cached_property
    def _eval_tuples(self) -> tuple[tuple[int, str, int], ...]:
        """Every held-out tuple in a fixed seeded order (only below the enumeration limit)."""
        tuples = [
            (a, op, b)
            for op in self.ops
            for a in range(self.low, self.high + 1)
            for b in range(self.low, self.high + 1)
            if self._is_eval(a, op, b)
        ]
        random.Random(f"arith-eval|{self.seed}").shuffle(tuples)
        return tuple(tuples)

    @property
    def eval_size(self) -> int:
        """How many distinct held-out problems exist (an estimate above the enumeration limit)."""
        if self._space_size > _ENUMERATE_LIMIT:
            return int(self._space_size * self.eval_fraction)
        return len(self._eval_tuples)

    # -- Task interface -------------------------------------------------------------------------------------

    def train_problem(self, index: int) -> Problem:
        """Problem `index` of the train stream: a seeded draw per index, redrawn while it falls in eval."""
        _check_index(index)
        rng = random.Random(f"arith-train|{self.seed}|{index}")
        while True:
            a, op, b = self._draw(rng)
            if not self._is_eval(a, op, b):
                return self._problem(a, op, b)

    def eval_problems(self, n: int | None = None) -> list[Problem]:
        """The first n held-out problems in a fixed seeded order (a prefix of any longer request)."""
        if self._space_size <= _ENUMERATE_LIMIT:
            tuples = self._eval_tuples
            return [self._problem(*t) for t in tuples[: _check_eval_count(n, len(tuples))]]
        if n is None:
            raise ValueError(f"the held-out split has about {self.eval_size} problems; pass an explicit n")
        count = _check_eval_count(n, self.eval_size)
        rng = random.Random(f"arith-eval|{self.seed}")
        seen: set[tuple[int, str, int]] = set()
        out: list[Problem] = []
        while len(out) < count:
            t = self._draw(rng)
            if t not in seen and self._is_eval(*t):
                seen.add(t)
                out.append(self._problem(*t))
        return out

    def local_reference(self, question: str) -> str | None:
        """Recompute the answer from a question written with this task's template (None for any other text)."""
        match = self._question_pattern().fullmatch(question.strip())
        if match is None:
            return None
        a, op, b = int(match.group("a")), match.group("op"), int(match.group("b"))
        return str(_OPS[op](a, b))

    def _question_pattern(self) -> re.Pattern[str]:
        parts = re.split(r"(\{a\}|\{op\}|\{b\})", self.template.format_map(_KeepFields()))
        groups = {"{a}": r"(?P<a>-?\d+)", "{b}": r"(?P<b>-?\d+)", "{op}": r"(?P<op>[-+*])"}
        return re.compile("".join(groups.get(p, re.escape(p)) for p in parts))

    def options(self) -> dict[str, object]:
        return {
            "low": self.low,
            "high": self.high,
            "ops": "".join(self.ops),
            "seed": self.seed,
            "eval_fraction": self.eval_fraction,
            "template": self.template,
        }


class _KeepFields(dict):
    """format_map helper that leaves {a}/{op}/{b} in place and unescapes '{{' / '}}'."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


class JsonlTask:
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
        problems = _read_jsonl(self.path)
        self._train: tuple[Problem, ...] = tuple(
            p for p in problems if _unit_hash("jsonl-split", self.seed, p.id) >= self.eval_fraction
        )
        held_out = [p for p in problems if _unit_hash("jsonl-split", self.seed, p.id) < self.eval_fraction]
        random.Random(f"jsonl-eval|{self.seed}").shuffle(held_out)
        self._eval: tuple[Problem, ...] = tuple(held_out)
        if not self._train:
            raise ValueError(
                f"{self.path}: all {len(problems)} problems fell in the held-out split; lower eval_fraction"
            )
        # Last train epoch's permutation: recomputing it per call would be O(file) for every problem.
        self._epoch_cache: tuple[int, tuple[int, ...]] | None = None

    @property
    def eval_size(self) -> int:
        return len(self._eval)

    @property
    def train_size(self) -> int:
        return len(self._train)

    def train_problem(self, index: int) -> Problem:
        """Epoch e = index // train_size walks the train split in a seeded permutation of its own."""
        _check_index(index)
        epoch, offset = divmod(index, len(self._train))
        cached = self._epoch_cache
        if cached is None or cached[0] != epoch:
            order = list(range(len(self._train)))
            random.Random(f"jsonl-train|{self.seed}|{epoch}").shuffle(order)
            cached = (epoch, tuple(order))
            self._epoch_cache = cached
        return self._train[cached[1][offset]]

    def eval_problems(self, n: int | None = None) -> list[Problem]:
        return list(self._eval[: _check_eval_count(n, len(self._eval))])

    def local_reference(self, question: str) -> str | None:
        return None

    def options(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "eval_fraction": self.eval_fraction,
            "seed": self.seed,
            "default_reward": self.default_reward,
        }


def _read_jsonl(path: Path) -> list[Problem]:
    """Parse and validate every line; errors name the file and the 1-based line number."""
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
            pid = "q-" + hashlib.sha256(question.encode()).hexdigest()[:16]
        if pid in first_line:
            raise ValueError(f"{where}: duplicate id {pid!r} (first on line {first_line[pid]})")
        first_line[pid] = lineno
        problems.append(Problem(id=pid, question=question, answer=answer))
    if not problems:
        raise ValueError(f"task file {str(path)!r} holds no problems")
    return problems


_TASKS: Mapping[str, Callable[..., Task]] = MappingProxyType({"arithmetic": ArithmeticTask, "jsonl": JsonlTask})


def make_task(name: str, **options: object) -> Task:
    """Build a task by name ('arithmetic' or 'jsonl') with its keyword options."""
    try:
        factory = _TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(_TASKS))}") from None
    try:
        return factory(**options)
    except TypeError as exc:
        raise ValueError(f"bad options for task {name!r}: {exc}") from exc
