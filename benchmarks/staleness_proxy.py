"""The proxy setting of the staleness experiment: a small model that starts weak on a task RL clearly improves.

The real default model (SmolLM2-135M) needs hours on a 2-core CPU to show a staleness trend; the grid of
losses x lags x seeds in `benchmarks/staleness.py` needs runs of about a minute. This module builds such a
model: a small Llama with heterorl's tiny character tokenizer, given a short, seeded supervised warm-up that
plays the part of pretraining. The warm-up teaches every single-digit sum ("7+5=" -> "12"), held-out questions
included (a pretrained model knows facts it is later evaluated on), together with a bad habit: 65% of its
targets carry a spurious trailing "0" ("120", a wrong number). Greedy decoding therefore starts near zero on
the held-out questions although the model knows about 80% of the sums; RL on the train split (reward: the last
number equals the answer) teaches it to stop after the answer, and the held-out score rises only as far as that
generalizes to questions RL never trained on. RL at lag 0 lifts held-out accuracy from about 0 to 0.5-0.7 in
20 steps of 4 groups x 8 (about 1 s per step with evaluation, one thread each for learner and sampler).

The model is built by `benchmarks/staleness.py` (through `build_proxy_model`), which is also the one way to train
it: real learner and sampler daemons over gRPC.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from heterorl.common.model import _publish_dir, build_tiny_model_dir, encode_prompt, load_tokenizer  # noqa: E402
from heterorl.common.tasks import ArithmeticTask  # noqa: E402

PROXY_NAME = "staleness-proxy-v2"

# Single-digit addition in a short template: the character model reads "7+5=" and answers "12". 40% of the
# questions are held out (commutative pairs together): 46 of them, enough to see a score move.
PROXY_TASK_OPTIONS: dict[str, object] = {
    "low": 0,
    "high": 9,
    "ops": "+",
    "seed": 0,
    "eval_fraction": 0.4,
    "template": "{a}{op}{b}=",
}

# Learner flags (flat names of LearnerConfig settings, CLI spelling is the same with '-' for '_').
PROXY_LEARNER_FLAGS: dict[str, str | int | float] = {
    "lr": 1e-4,
    "group_size": 8,
    "groups_per_step": 4,
    "temperature": 1.0,
    "max_new_tokens": 6,
    "eval_every": 10,
    "eval_size": ArithmeticTask(**PROXY_TASK_OPTIONS).eval_size,
    "max_grad_norm": 1.0,
}


@dataclass(frozen=True)
class WarmupSpec:
    """Architecture and supervised warm-up of the proxy model; changing any field needs a new PROXY_NAME."""

    hidden: int = 128
    layers: int = 2
    heads: int = 4          # head_dim 32: vLLM's CPU attention has no kernel for head_dim 16
    intermediate: int = 256
    seed: int = 0
    steps: int = 300
    batch: int = 32
    lr: float = 3e-3
    habit: float = 0.65  # share of warm-up targets written with a spurious trailing "0" (the habit RL unlearns)

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        for key in ("hidden", "layers", "heads", "intermediate", "batch"):
            if getattr(self, key) < 1:
                raise ValueError(f"warm-up {key} must be >= 1, got {getattr(self, key)}")
        if self.steps < 0 or not self.lr > 0:
            raise ValueError(f"warm-up needs steps >= 0 and lr > 0, got steps={self.steps}, lr={self.lr}")


PROXY_SPEC = WarmupSpec()


def _answer_rows(tokenizer, task: ArithmeticTask, indices: range, spec: "WarmupSpec",
                 memo: dict[str, list[int]]) -> tuple[list[list[int]], list[int]]:
    """Prompt + target + eos token rows, and where each target starts.

    The rows cycle through every question of the task's space in a seeded order, held-out questions included:
    the warm-up plays pretraining, which knows facts a model is later evaluated on. RL then trains on the train
    split only, so the held-out score rises only as far as what RL changes generalizes. What RL can change is
    the habit: a seeded `spec.habit` share of the targets carry a spurious trailing "0" ("17" written "170", a
    wrong number), so greedy decoding starts out mostly wrong although the model knows most sums.
    `memo` keeps each question's prompt ids: rendering the chat template costs more than a model step.
    """
    space = [(a, b) for a in range(task.low, task.high + 1) for b in range(task.low, task.high + 1)]
    random.Random(f"proxy-order|{spec.seed}").shuffle(space)
    rows, starts = [], []
    for index in indices:
        a, b = space[index % len(space)]
        question = task.template.format(a=a, op="+", b=b)
        if question not in memo:
            memo[question] = encode_prompt(tokenizer, question)
        prompt = memo[question]
        habit = random.Random(f"proxy-habit|{spec.seed}|{index}").random() < spec.habit
        target = str(a + b) + ("0" if habit else "")
        answer = list(tokenizer(target, add_special_tokens=False)["input_ids"])
        rows.append(prompt + answer + [tokenizer.eos_token_id])
        starts.append(len(prompt))
    return rows, starts


def _warm_up(model: torch.nn.Module, tokenizer, task: ArithmeticTask, spec: WarmupSpec) -> None:
    """Supervised steps on the train stream only (answer and eos tokens scored), seeded and fixed-length."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    pad = tokenizer.pad_token_id
    memo: dict[str, list[int]] = {}
    model.train()
    for step in range(spec.steps):
        rows, starts = _answer_rows(tokenizer, task, range(step * spec.batch, (step + 1) * spec.batch), spec, memo)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
            ids[i, : len(row)] = torch.tensor(row)
            labels[i, start : len(row)] = torch.tensor(row[start:])
            attention[i, : len(row)] = 1
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


def write_proxy_model(path: Path, task: ArithmeticTask, spec: WarmupSpec = PROXY_SPEC) -> Path:
    """Write the warmed-up proxy model to `path` (tokenizer files of heterorl's tiny model, own weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    build_tiny_model_dir(path, seed=spec.seed)  # the tokenizer files; the weights are replaced below
    tokenizer = load_tokenizer(path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.set_num_threads(1)  # one thread: the same reduction order, so the same weight bytes, everywhere
        try:
            torch.manual_seed(spec.seed)
            model = LlamaForCausalLM(config)
            _warm_up(model, tokenizer, task, spec)
        finally:
            torch.set_num_threads(threads)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.save_pretrained(path)
    return path


def build_proxy_model(cache_root: Path) -> Path:
    """The proxy model directory under `cache_root/models`, built once (atomically) and reused afterwards."""
    target = Path(cache_root) / "models" / PROXY_NAME
    if (target / "config.json").is_file():
        return target
    task = ArithmeticTask(**PROXY_TASK_OPTIONS)
    return _publish_dir(lambda tmp: write_proxy_model(tmp, task), target)
