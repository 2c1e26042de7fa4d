"""What every task is made of: problems, the Task protocol, and the seeded train/held-out split of a fixed list.

Separate from tasks.py so that file-backed tasks (datasets.py) and generated ones (tasks.py) share one split
without importing each other.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class Problem:
    """One prompt: `id` names its content (the same question always has the same id)."""

    id: str
    question: str
    answer: str


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


def unit_hash(*parts: object) -> float:
    """A stable hash in [0, 1): the same on every machine and Python process (unlike hash())."""
    digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def question_id(question: str) -> str:
    """The id of a problem that has none of its own: a hash of its question, so it survives reordering."""
    return "q-" + hashlib.sha256(question.encode()).hexdigest()[:16]


def check_index(index: int) -> None:
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"train index must be a non-negative int, got {index!r}")


def check_eval_count(n: int | None, available: int) -> int:
    if n is None:
        return available
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"eval problem count must be a non-negative int or None, got {n!r}")
    if n > available:
        raise ValueError(f"asked for {n} eval problems but the held-out split has only {available}")
    return n


class FixedSplit:
    """A finite problem list split into train and held-out parts, with an endless seeded train stream.

    The held-out part is either given (a second file) or chosen per problem id by a stable hash below
    `eval_fraction`, so adding rows to a file never moves an old row across the split. Train epoch
    e = index // train_size walks the train part in a seeded permutation of its own.
    """

    def __init__(self, label: str, where: str, problems: list[Problem], eval_fraction: float, seed: int,
                 held_out: list[Problem] | None = None) -> None:
        self.label, self.seed = label, seed
        if held_out is None:
            train = [p for p in problems if unit_hash(f"{label}-split", seed, p.id) >= eval_fraction]
            held_out = [p for p in problems if unit_hash(f"{label}-split", seed, p.id) < eval_fraction]
            random.Random(f"{label}-eval|{seed}").shuffle(held_out)
        else:
            # A question asked in both files is held out: training on it would inflate the evaluation.
            held_ids = {p.id for p in held_out}
            train = [p for p in problems if p.id not in held_ids]
        if not train:
            raise ValueError(f"{where}: all {len(problems)} problems fell in the held-out split; lower eval_fraction")
        self.train: tuple[Problem, ...] = tuple(train)
        self.held_out: tuple[Problem, ...] = tuple(held_out)
        # Last train epoch's permutation: recomputing it per call would be O(file) for every problem.
        self._epoch_cache: tuple[int, tuple[int, ...]] | None = None

    def train_problem(self, index: int) -> Problem:
        check_index(index)
        epoch, offset = divmod(index, len(self.train))
        cached = self._epoch_cache
        if cached is None or cached[0] != epoch:
            order = list(range(len(self.train)))
            random.Random(f"{self.label}-train|{self.seed}|{epoch}").shuffle(order)
            cached = (epoch, tuple(order))
            self._epoch_cache = cached
        return self.train[cached[1][offset]]

    def eval_problems(self, n: int | None = None) -> list[Problem]:
        return list(self.held_out[: check_eval_count(n, len(self.held_out))])
