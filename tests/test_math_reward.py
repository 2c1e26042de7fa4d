"""The `math` reward (math-verify), the `format` reward, and weighted lists of rewards scored on the learner."""

from __future__ import annotations

import threading

import pytest

from heterorl.common.rewards import BOXED_PATTERN, RewardSpec, RewardTerm, format_reward, parse_reward_spec
from heterorl.common.tasks import builtin_reward, get_reward, math_answer
from heterorl.server.rewards import Scorer


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        (r"The answer is \boxed{\frac{1}{2}}", "0.5", 1.0),            # fraction vs decimal
        (r"So $x = \frac{3}{4}$.", r"\frac34", 1.0),                   # LaTeX shorthand, an equation
        (r"\boxed{\dfrac{2}{3}}", "2/3", 1.0),
        (r"The area is \boxed{12 \text{ cm}^2}", "12", 1.0),           # units are stripped
        (r"\boxed{50\%}", "50", 1.0),                                  # percent
        (r"\boxed{1,000}", "1000", 1.0),                               # thousands separator
        (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}", 1.0),          # symbolic equality
        (r"Expanding: \boxed{x^2+2x+1}", "(x+1)^2", 1.0),
        (r"\boxed{(1,2)}", "(1, 2)", 1.0),                            # intervals / tuples
        (r"12 apples, then 1 more: \boxed{13}", "13", 1.0),            # the boxed answer wins over other numbers
        (r"\boxed{14}", "13", 0.0),
        (r"The answer is \boxed{\frac{1}{3}}", "0.5", 0.0),
        (r"$\boxed{5}$ and then 6", "6", 0.0),                         # a boxed answer is the answer
        ("I have no idea", "7", 0.0),
        ("", "7", 0.0),
        (r"\boxed{-3}", "$-3$", 1.0),                                  # a reference already in $...$
        (r"\boxed{x = 5}", r"\boxed{5}", 1.0),                         # a reference in \boxed{}
    ],
)
def test_math_reward_on_latex_answers(completion: str, answer: str, expected: float) -> None:
    assert math_answer(completion, answer) == expected


def test_math_reward_works_outside_the_main_thread() -> None:
    """math-verify's own timeouts use SIGALRM, which a gRPC worker thread may not set: the reward must not fail."""
    results: list[object] = []

    def score() -> None:
        try:
            results.append(math_answer(r"\boxed{\frac{6}{8}}", r"\frac{3}{4}"))
        except Exception as err:  # noqa: BLE001 - recorded for the assertion
            results.append(err)

    worker = threading.Thread(target=score)
    worker.start()
    worker.join(timeout=60)
    assert results == [1.0]


def test_math_is_built_in_and_looked_up_by_name() -> None:
    assert get_reward("math") is math_answer and builtin_reward("math") is math_answer
    assert builtin_reward("math,format") is None  # a list is scored on the learner alone


def test_format_reward_default_and_custom_pattern() -> None:
    boxed = format_reward()
    assert boxed(r"so \boxed{4}", "4") == 1.0 and boxed("so 4", "4") == 0.0 and boxed(r"\boxed{}", "4") == 0.0
    tagged = format_reward(r"<answer>.+</answer>")
    assert tagged("<answer>\n4\n</answer>", "x") == 1.0 and tagged(r"\boxed{4}", "x") == 0.0
    with pytest.raises(ValueError, match="not a valid regular expression"):
        format_reward("(unclosed")


def test_reward_spec_parsing_and_its_name_round_trips() -> None:
    spec = parse_reward_spec("math,format", [1.0, 0.2])
    assert spec == RewardSpec((RewardTerm("math", 1.0), RewardTerm("format", 0.2)), BOXED_PATTERN)
    assert spec.name == "math=1,format=0.2" and parse_reward_spec(spec.name) == spec
    assert parse_reward_spec("math=1,format=0.2") == spec
    assert parse_reward_spec("math").name == "math"  # a lone built-in keeps its plain name for samplers
    custom = parse_reward_spec("format", format_pattern="<a>.*</a>")
    assert custom.name != "format" and parse_reward_spec(custom.name) == custom
    assert parse_reward_spec("reward_fixtures:fine").terms == (RewardTerm("reward_fixtures:fine", 1.0),)


@pytest.mark.parametrize(
    ("reward", "weights", "message"),
    [
        ("math,format", [1.0], "2 rewards"),
        ("math,bogus", None, "unknown reward 'bogus'"),
        ("math,math", None, "twice"),
        ("math=x", None, "not a number"),
        ("math=1,format=0", [1.0, 0.0], "not both"),
        ("math,format", [0.0, 0.0], "non-zero"),
        ("math,", None, "empty item"),
        ("math", [float("inf")], "not finite"),
    ],
)
def test_reward_spec_refuses_bad_lists(reward: str, weights, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_reward_spec(reward, weights)


def test_scorer_sums_weighted_rewards_with_math_in_a_worker_process() -> None:
    scorer = Scorer(parse_reward_spec("math,format", [1.0, 0.2]), timeout_s=30.0, workers=1)
    try:
        texts = [r"\boxed{\frac{1}{2}}", "it is 1/2", r"\boxed{3}", "no answer"]
        assert scorer.score(texts, "0.5") == pytest.approx([1.2, 1.0, 0.2, 0.0])
        # Correctness is the first reward's alone: the format bonus never makes a wrong answer right.
        assert scorer.correct(texts, "0.5") == [True, True, False, False]
        assert scorer.name == "math=1,format=0.2"
        assert scorer.counts.refused == 0
    finally:
        scorer.close()


def test_scorer_accepts_its_own_name_and_a_custom_term() -> None:
    scorer = Scorer("last_number=2,reward_fixtures:raises_on_odd=1", timeout_s=5.0, workers=1)
    try:
        assert scorer.score(["4", "5"], "4") == [2.5, 0.5]
    finally:
        scorer.close()
