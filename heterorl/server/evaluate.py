"""Held-out evaluation on the learner: greedy accuracy and pass@1 averaged over k samples.

Greedy accuracy says what the policy's single best answer is worth; pass@1 over k samples at the run's own
temperature (and top-k/top-p) says what the samples it trains on are worth, which is the figure RL moves first.
Generation runs batched on the model's device, at most `batch_size` sequences per `generate` call, so memory stays
bounded whatever the split size, k or completion length. A completion is right when the run's first reward,
unweighted, is >= 1 (`Scorer.correct`). Sampling is seeded and leaves the caller's RNG state untouched.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from heterorl.common.model import left_pad
from heterorl.common.progress import Progress
from heterorl.common.tasks import Problem

logger = logging.getLogger(__name__)

Correct = Callable[[list[str], str], list[bool]]  # (texts, answer) -> right or not, per text


@dataclass(frozen=True)
class EvalSettings:
    max_new_tokens: int
    samples: int = 0            # k: 0 = greedy only
    temperature: float = 1.0
    top_k: int = 0              # 0 disables
    top_p: float = 1.0          # 1 disables
    stop: tuple[str, ...] = ()  # a completion ends at the first one, as on samplers
    batch_size: int = 32        # sequences per generate call
    seed: int = 0


@dataclass(frozen=True)
class EvalResult:
    accuracy: float  # greedy: share of problems answered right
    pass1: float | None  # mean over problems of (right samples / k); None when k = 0
    k: int
    n: int
    seconds: float


def model_device(model: torch.nn.Module, trainer: object | None = None) -> torch.device:
    """Where the model lives: the trainer's device if it names one, else its first parameter's."""
    device = getattr(trainer, "device", None)
    return torch.device(device) if device is not None else next(model.parameters()).device


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """The text up to (not including) the first stop string in it."""
    ends = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(ends)] if ends else text


@torch.no_grad()
def _generate(model, device: torch.device, prompts: list[list[int]], pad_id: int, eos_id, settings: EvalSettings,
              sample: bool, per_prompt: int) -> list[list[int]]:
    """Completion token ids, `per_prompt` rows per prompt in prompt order; padding after EOS is left for decode."""
    from transformers import GenerationConfig

    ids, attention = left_pad(prompts, pad_id)
    options = dict(max_new_tokens=settings.max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id,
                   num_return_sequences=per_prompt, do_sample=sample)
    if sample:
        options.update(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
    # A fresh GenerationConfig: the model's own defaults (top_k=50, repetition penalties) must not leak in.
    out = model.generate(input_ids=ids.to(device), attention_mask=attention.to(device),
                         generation_config=GenerationConfig(**options))
    return out[:, ids.shape[1]:].tolist()


def evaluate_policy(model: torch.nn.Module, problems: list[Problem], encode: Callable[[Problem], list[int]],
                    decode: Callable[[list[int]], str], correct: Correct, settings: EvalSettings, pad_id: int,
                    device: torch.device | None = None) -> EvalResult:
    """Greedy accuracy and (k > 0) pass@1 over k samples of `problems`; the model's train/eval mode is restored."""
    started = time.perf_counter()
    if not problems:
        return EvalResult(math.nan, None if not settings.samples else math.nan, settings.samples, 0, 0.0)
    device = device or next(model.parameters()).device
    eos_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    was_training = model.training
    model.eval()
    # A bar on a terminal, a line every 15 s in a log (heterorl/common/progress.py): a first evaluation takes minutes.
    shown = Progress("evaluation", len(problems) * (1 + settings.samples), "completions", log=logger)
    try:
        greedy_right = _score(model, device, problems, encode, decode, correct, settings, pad_id, eos_id, 0, shown)
        pass1 = None
        if settings.samples:
            devices = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(settings.seed)
                sampled_right = _score(model, device, problems, encode, decode, correct, settings, pad_id, eos_id,
                                       settings.samples, shown)
            pass1 = sampled_right / (len(problems) * settings.samples)
    finally:
        shown.close()
        model.train(was_training)
    return EvalResult(greedy_right / len(problems), pass1, settings.samples, len(problems),
                      time.perf_counter() - started)


def _score(model, device, problems, encode, decode, correct: Correct, settings: EvalSettings, pad_id: int, eos_id,
           k: int, shown: Progress | None = None) -> int:
    """How many completions are right: one greedy per problem (k = 0), or k samples per problem."""
    per_prompt = max(k, 1)
    problems_per_call = max(1, settings.batch_size // per_prompt)
    right = 0
    for first in range(0, len(problems), problems_per_call):
        batch = problems[first : first + problems_per_call]
        rows = _generate(model, device, [encode(p) for p in batch], pad_id, eos_id, settings, k > 0, per_prompt)
        for i, problem in enumerate(batch):
            texts = [cut_at_stop(decode(row), settings.stop) for row in rows[i * per_prompt : (i + 1) * per_prompt]]
            right += sum(correct(texts, problem.answer))
        if shown is not None:
            shown.update(len(rows))
    return right


def record(result: EvalResult, step: int, version: int) -> dict:
    """The metrics.jsonl line of one evaluation ("accuracy" is greedy, as it always was)."""
    return {"kind": "eval", "step": step, "version": version, "accuracy": result.accuracy, "pass1": result.pass1,
            "k": result.k, "n": result.n, "seconds": result.seconds, "time": time.time()}


def pass1_by_step(metrics_path: Path) -> dict[int, tuple[float | None, int]]:
    """step -> (pass1, k) of the evaluations in a metrics file (the last one of a step wins: a resumed run may
    evaluate a step again); evaluations written before pass@1 existed have none."""
    found: dict[int, tuple[float | None, int]] = {}
    if not metrics_path.exists():
        return found
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("kind") == "eval" and "step" in entry:
            found[entry["step"]] = (entry.get("pass1"), int(entry.get("k", 0)))
    return found


def summary_fields(history: list[tuple[int, float]], metrics_path: Path) -> dict:
    """The summary's evaluation figures: per evaluation greedy accuracy and pass@1, and the first and last pass@1."""
    pass1 = pass1_by_step(metrics_path)
    points = []
    for step, accuracy in history:
        value, k = pass1.get(step, (None, 0))
        points.append({"step": step, "accuracy": accuracy, "pass1": value, "k": k})
    return {
        "eval": points,
        "base_pass1": points[0]["pass1"] if points else None,
        "final_pass1": points[-1]["pass1"] if points else None,
        "eval_samples": points[-1]["k"] if points else 0,
    }
