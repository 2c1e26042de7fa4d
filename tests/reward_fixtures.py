"""Custom `module:function` rewards that misbehave, for tests/test_rewards.py (imported by reward workers)."""

from __future__ import annotations

import os
import time


def _odd(answer: str) -> bool:
    try:
        return int(answer) % 2 == 1
    except ValueError:
        return False


def fine(text: str, answer: str) -> float:
    return float(len(text) % 2)


def raises(text: str, answer: str) -> float:
    raise RuntimeError("this reward always fails")


def raises_on_odd(text: str, answer: str) -> float:
    if _odd(answer):
        raise KeyError(answer)
    return 0.5


def hangs_on_odd(text: str, answer: str) -> float:
    if _odd(answer):
        time.sleep(600)
    return 0.5


def exits(text: str, answer: str) -> float:
    os._exit(3)


def not_a_number(text: str, answer: str) -> float:
    return float("nan")
