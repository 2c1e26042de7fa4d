"""Verifiable tasks: generated arithmetic, and (from heterorl.common.datasets) problems read from local files.

The learner owns the answers: it draws problems from a task's deterministic train stream, hands samplers the
question only, and re-scores every completion with the run's reward (heterorl.common.rewards). Arithmetic is
self-verifying, so a sampler can compute its own reward from the question text (`local_reference`) without ever
being sent the answer. This module keeps the names callers import: `make_task`, `get_reward`, `builtin_reward`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Callable, Mapping

from heterorl.common.datasets import DatasetTask, JsonlTask
from heterorl.common.problems import Problem, Task, check_eval_count, check_index, unit_hash
from heterorl.common.rewards import (
    REWARDS,
    RewardFn,
    RewardSpec,
    builtin_reward,
    digit_fraction,
    exact_match,
    get_reward,
    last_number,
    math_answer,
    numbers_in,
    parse_reward_spec,
)

__all__ = [
    "REWARDS", "ArithmeticTask", "DatasetTask", "JsonlTask", "Problem", "RewardFn", "RewardSpec", "Task",
    "builtin_reward", "digit_fraction", "exact_match", "get_reward", "last_number", "make_task", "math_answer",
    "numbers_in", "parse_reward_spec",
]

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
        return unit_hash("arith-split", self.seed, x, op, y) < self.eval_fraction

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
        check_index(index)
        rng = random.Random(f"arith-train|{self.seed}|{index}")
        while True:
            a, op, b = self._draw(rng)
            if not self._is_eval(a, op, b):
                return self._problem(a, op, b)

    def eval_problems(self, n: int | None = None) -> list[Problem]:
        """The first n held-out problems in a fixed seeded order (a prefix of any longer request)."""
        if self._space_size <= _ENUMERATE_LIMIT:
            tuples = self._eval_tuples
            return [self._problem(*t) for t in tuples[: check_eval_count(n, len(tuples))]]
        if n is None:
            raise ValueError(f"the held-out split has about {self.eval_size} problems; pass an explicit n")
        count = check_eval_count(n, self.eval_size)
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


_TASKS: Mapping[str, Callable[..., Task]] = MappingProxyType(
    {"arithmetic": ArithmeticTask, "jsonl": JsonlTask, "dataset": DatasetTask}
)


def make_task(name: str, **options: object) -> Task:
    """Build a task by name ('arithmetic', 'jsonl' or 'dataset') with its keyword options."""
    try:
        factory = _TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(_TASKS))}") from None
    try:
        return factory(**options)
    except TypeError as exc:
        raise ValueError(f"bad options for task {name!r}: {exc}") from exc
