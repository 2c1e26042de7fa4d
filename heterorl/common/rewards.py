"""Reward functions (completion, answer) -> float, and the weighted list of them a run is scored by.

Built-in rewards are plain functions in `REWARDS`. `math` is the field's verifier (math-verify, as TRL and open-r1
use it): LaTeX, \\boxed{}, fractions, units and symbolic equality. A run's reward is a `RewardSpec`: one or more
rewards by name or `module:function`, each with a weight, summed like TRL's list of `reward_funcs`.
"""

from __future__ import annotations

import functools
import importlib
import math
import re
import threading
from dataclasses import dataclass
from fractions import Fraction
from types import MappingProxyType
from typing import Callable, Mapping

RewardFn = Callable[[str, str], float]

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


# -- math-verify ---------------------------------------------------------------------------------------------

MATH_TIMEOUT_S = 5  # math-verify's own per-parse and per-comparison limit, where it can use signals


def _signal_timeout() -> int | None:
    """math-verify times out with SIGALRM, which only the main thread may set: elsewhere (the learner's gRPC
    threads, a sampler's worker) it must run without, and whoever calls it bounds the time (the learner runs
    `math` in its reward worker processes, whose calls run in their main thread and are killed past the limit)."""
    return MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=1)
def _math_verify():
    """Imported on first use (about 2 s: sympy and an ANTLR LaTeX parser), so the other rewards stay light."""
    import logging

    import math_verify
    from latex2sympy2_extended import NormalizationConfig

    # It warns once per process that its timeout is off when we switch it off on purpose (see _signal_timeout).
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    completion_config = [
        # open-r1's settings: a \boxed{} answer first, units and \text{} stripped, malformed operators kept out.
        math_verify.LatexExtractionConfig(
            normalization_config=NormalizationConfig(nits=False, malformed_operators=False, basic_latex=True,
                                                     boxed="all", units=True),
            boxed_match_priority=0,
        ),
        math_verify.ExprExtractionConfig(),
    ]
    return math_verify, completion_config


@functools.lru_cache(maxsize=4096)
def _gold(answer: str, timeout: int | None) -> tuple:
    """The parsed reference answer (a group scores G completions against one answer: parse it once).

    A bare answer ("\\frac{1}{2}", "12") is read as LaTeX math; one that parses as nothing is compared as text.
    """
    mv, _ = _math_verify()
    text = answer.strip()
    wrapped = text if ("$" in text or "\\boxed" in text) else f"${text}$"
    gold = mv.parse(wrapped, extraction_mode="first_match", parsing_timeout=timeout)
    if not gold:
        gold = mv.parse(text, parsing_timeout=timeout)
    return tuple(gold) if gold else (text,)


def math_answer(completion: str, answer: str) -> float:
    """1.0 if the completion's final answer is mathematically equal to `answer` (math-verify), else 0.0.

    The completion's answer is its last \\boxed{} if any, else what follows "the answer is", else its last
    expression; equality is symbolic (1/2 = 0.5 = \\frac{1}{2}, x^2+2x+1 = (x+1)^2, "12 cm" = 12).
    """
    mv, completion_config = _math_verify()
    timeout = _signal_timeout()
    gold = list(_gold(answer, timeout))
    found = mv.parse(completion, extraction_config=completion_config, parsing_timeout=timeout)
    if not found:
        return 0.0
    return 1.0 if mv.verify(gold, found, timeout_seconds=timeout) else 0.0


# -- format -------------------------------------------------------------------------------------------------

BOXED_PATTERN = r"\\boxed\{.+\}"


def format_reward(pattern: str = BOXED_PATTERN) -> RewardFn:
    """A reward of 1.0 when the completion contains a match of `pattern` (default: an answer in \\boxed{})."""
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as err:
        raise ValueError(f"format_pattern {pattern!r} is not a valid regular expression: {err}") from None

    def format_match(completion: str, answer: str) -> float:
        return 1.0 if compiled.search(completion) else 0.0

    return format_match


REWARDS: Mapping[str, RewardFn] = MappingProxyType({
    "last_number": last_number,
    "digit_fraction": digit_fraction,
    "exact_match": exact_match,
    "math": math_answer,
    "format": format_reward(),
})


def builtin_reward(name: str) -> RewardFn | None:
    """The built-in reward called `name` (see REWARDS); None for an import path or any other name.

    Imports nothing: samplers score with this, never with `get_reward`, so a learner cannot make a sampler
    import a module by naming it. A reward that is not built in (a weighted list among them) is scored on the
    learner alone.
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


def check_reward_name(name: str) -> None:
    """ValueError unless `name` is built in or has the form 'package.module:function' (nothing is imported)."""
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        get_reward(name)  # raises the registry's own message: unknown name, or a malformed path


# -- weighted lists ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardTerm:
    name: str      # a built-in name or 'module:function'
    weight: float


@dataclass(frozen=True)
class RewardSpec:
    """The run's reward: sum of weight x reward over its terms. The first term is the one accuracy is judged by
    (a completion is correct when that reward, unweighted, is >= 1)."""

    terms: tuple[RewardTerm, ...]
    format_pattern: str = BOXED_PATTERN

    @property
    def name(self) -> str:
        """What samplers are told: a lone built-in reward by its plain name (they may pre-score with it);
        anything else spelled out ('math=1,format=0.2'), which no sampler mistakes for a built-in."""
        if len(self.terms) == 1 and self.terms[0].weight == 1.0 and (
                self.terms[0].name != "format" or self.format_pattern == BOXED_PATTERN):
            return self.terms[0].name
        text = ",".join(f"{t.name}={t.weight:g}" for t in self.terms)
        if self.format_pattern != BOXED_PATTERN and any(t.name == "format" for t in self.terms):
            text += _PATTERN_SUFFIX + self.format_pattern
        return text


_PATTERN_SUFFIX = ";format_pattern="


def parse_reward_spec(reward: str, weights: list[float] | None = None,
                      format_pattern: str = BOXED_PATTERN) -> RewardSpec:
    """'math,format' with weights [1.0, 0.2] (or 'math=1.0,format=0.2') -> RewardSpec; ValueError names the fault.

    Reads back its own `RewardSpec.name` too (`parse_reward_spec(spec.name) == spec`), so the one string the learner
    keeps and tells samplers describes the whole reward.
    """
    if not isinstance(reward, str) or not reward.strip():
        raise ValueError("reward must name at least one reward")
    if _PATTERN_SUFFIX in reward:
        reward, _, format_pattern = reward.partition(_PATTERN_SUFFIX)
    names, inline = [], []
    for item in reward.split(","):
        name, sep, weight = item.strip().partition("=")
        if not name:
            raise ValueError(f"reward {reward!r} has an empty item")
        check_reward_name(name)
        names.append(name)
        inline.append(_weight(weight, reward) if sep else None)
    if weights:
        if any(w is not None for w in inline):
            raise ValueError("give reward weights either inline ('math=1,format=0.2') or as reward_weights, not both")
        if len(weights) != len(names):
            raise ValueError(f"reward_weights has {len(weights)} values for {len(names)} rewards ({reward!r})")
        values = [_weight(w, reward) for w in weights]
    else:
        values = [1.0 if w is None else w for w in inline]
    if len(set(names)) != len(names):
        raise ValueError(f"reward {reward!r} names a reward twice")
    if all(w == 0 for w in values):
        raise ValueError("at least one reward weight must be non-zero")
    format_reward(format_pattern)  # its check
    if "format" not in names:
        format_pattern = BOXED_PATTERN  # unused: kept out of the spec, so equal rewards have equal specs
    return RewardSpec(tuple(RewardTerm(n, w) for n, w in zip(names, values)), format_pattern)


def _weight(value: object, reward: str) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"reward weight {value!r} in {reward!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"reward weight {value!r} in {reward!r} is not finite")
    return number
