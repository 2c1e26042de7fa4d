"""A small local math set with LaTeX answers, written by the tests and by benchmarks/math_task.py (no download).

Six kinds (fraction sums, fraction simplification, powers, square roots, percentages, linear equations), `per_kind`
of each: 8 (48 problems) for the tests, more for benchmarks/math_task.py's held-out split (repeats are dropped).
Answers are exact, written the way math datasets write them (`\\frac{3}{4}`, `12`), so the `math` reward
must understand LaTeX to score them. Questions ask for a \\boxed{} answer, as open-r1's prompts do.
"""

from __future__ import annotations

import json
import random
from fractions import Fraction
from pathlib import Path

INSTRUCTION = " Put your final answer in \\boxed{}."


def latex(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    sign = "-" if value < 0 else ""
    return f"{sign}\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}"


def problems(seed: int = 0, per_kind: int = 8) -> list[dict]:
    rng = random.Random(seed)
    k = per_kind
    out: list[dict] = []

    def add(question: str, answer: str) -> None:
        out.append({"question": question + INSTRUCTION, "answer": answer})

    for _ in range(k):
        a, b, c, d = rng.randint(1, 5), rng.randint(2, 6), rng.randint(1, 5), rng.randint(2, 6)
        add(f"What is $\\frac{{{a}}}{{{b}}} + \\frac{{{c}}}{{{d}}}$?", latex(Fraction(a, b) + Fraction(c, d)))
    for _ in range(k):
        q, m = rng.randint(2, 9), rng.randint(2, 5)
        p = rng.randint(1, q - 1)
        add(f"Simplify $\\frac{{{p * m}}}{{{q * m}}}$.", latex(Fraction(p, q)))
    for n in (rng.sample(range(2, 13), k) if k <= 11 else [rng.randint(2, 40) for _ in range(k)]):
        add(f"What is ${n}^2$?", str(n * n))
    for n in (rng.sample(range(2, 16), k) if k <= 14 else [rng.randint(2, 40) for _ in range(k)]):
        add(f"What is $\\sqrt{{{n * n}}}$?", str(n))
    for _ in range(k):
        pct, base = rng.choice([10, 20, 25, 50, 75]), rng.choice([20, 40, 60, 80, 100, 120])
        add(f"What is ${pct}\\%$ of ${base}$?", latex(Fraction(pct * base, 100)))
    for _ in range(k):
        a, x, b = rng.randint(2, 6), rng.randint(-5, 9), rng.randint(1, 12)
        add(f"Solve ${a}x + {b} = {a * x + b}$ for $x$.", str(x))
    return out


def write_math_set(path: Path, seed: int = 0, per_kind: int = 8) -> Path:
    """The set as JSONL (question/answer), distinct questions only."""
    seen, rows = set(), []
    for row in problems(seed, per_kind):
        if row["question"] not in seen:
            seen.add(row["question"])
            rows.append(row)
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Path(path)
