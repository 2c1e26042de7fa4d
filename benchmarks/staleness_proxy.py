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

    python benchmarks/staleness_proxy.py [--steps 150] [--seeds 0 1] [--lag 0] [--loss gepo]

runs the RL loop in-process (no gRPC: a sampler copy of the policy refreshed every `lag` steps stands in for a
lagging sampler) and ends with `RESULT build_s=... step_s=... acc0=... accN=...`; `benchmarks/staleness.py`
runs the real daemons.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from heterorl.common.model import _publish_dir, build_tiny_model_dir, encode_prompt, left_pad, load_tokenizer  # noqa: E402
from heterorl.common.tasks import ArithmeticTask, get_reward, make_task  # noqa: E402

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

# Learner flags (names as LearnerConfig fields, CLI spelling is the same with '-' for '_').
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


# ---------------------------------------------------------------------------------------------------------------
# In-process RL check: the learner's Trainer fed by a (possibly lagging) copy of the policy.


@torch.no_grad()
def sample_groups(model, tokenizer, prompts: list[list[int]], group_size: int, temperature: float,
                  max_new_tokens: int) -> list[list[tuple[list[int], list[float]]]]:
    """G sampled completions per prompt with per-token log-probs, as TransformersEngine reports them."""
    from transformers import GenerationConfig

    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    ids, attention = left_pad([p for p in prompts for _ in range(group_size)], pad)
    width = ids.shape[1]
    generation = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                  max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                                  output_scores=True, return_dict_in_generate=True)
    out = model.generate(input_ids=ids, attention_mask=attention, generation_config=generation)
    new = out.sequences[:, width:]
    logprobs = torch.log_softmax(torch.stack(out.scores, dim=1).float(), dim=-1).gather(-1, new[..., None])[..., 0]
    groups = []
    for p in range(len(prompts)):
        group = []
        for r in range(p * group_size, (p + 1) * group_size):
            tokens = new[r].tolist()
            if eos in tokens:
                tokens = tokens[: tokens.index(eos) + 1]
            group.append((tokens, logprobs[r, : len(tokens)].tolist()))
        groups.append(group)
    return groups


def rl_run(model_dir: Path, loss: str, lag: int, steps: int, seed: int, log=print) -> dict[str, object]:
    """Train `steps` RL steps at sampler lag `lag`; return held-out accuracies and timings."""
    from heterorl.common.model import load_causal_lm
    from heterorl.server.losses import LossConfig
    from heterorl.server.store import StoredCompletion, StoredGroup
    from heterorl.server.trainer import Trainer, TrainerConfig

    flags = PROXY_LEARNER_FLAGS
    torch.manual_seed(seed)
    task = make_task("arithmetic", **PROXY_TASK_OPTIONS)
    reward_fn = get_reward(str(flags.get("reward", task.default_reward)))
    tokenizer = load_tokenizer(model_dir)
    trainer = Trainer(load_causal_lm(model_dir), tokenizer.pad_token_id, TrainerConfig(
        lr=float(flags["lr"]), weight_decay=0.0, max_grad_norm=float(flags["max_grad_norm"]),
        temperature=float(flags["temperature"]), loss=LossConfig(name=loss)))
    sampler = copy.deepcopy(trainer.model).eval()
    sampler_version = 0
    eval_problems = task.eval_problems(min(int(flags["eval_size"]), task.eval_size))
    encode = lambda p: encode_prompt(tokenizer, p.question)  # noqa: E731
    decode = lambda t: tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731

    def evaluate() -> float:
        return trainer.evaluate(eval_problems, encode, decode, reward_fn, int(flags["max_new_tokens"]))

    G, B = int(flags["group_size"]), int(flags["groups_per_step"])
    curve = [(0, evaluate())]
    rng = random.Random(seed)
    sample_s = train_s = 0.0
    rewards: list[float] = []
    for step in range(steps):
        if step - sampler_version >= max(lag, 1) or lag == 0:
            sampler.load_state_dict(trainer.model.state_dict())
            sampler_version = step
        problems = [task.train_problem(rng.randrange(1 << 30)) for _ in range(B)]
        started = time.perf_counter()
        sampled = sample_groups(sampler, tokenizer, [encode(p) for p in problems], G, float(flags["temperature"]),
                                int(flags["max_new_tokens"]))
        sample_s += time.perf_counter() - started
        batch = []
        for problem, group in zip(problems, sampled, strict=True):
            comps = tuple(StoredCompletion(tokens, lps, 0, reward_fn(decode(tokens), problem.answer), None)
                          for tokens, lps in group)
            rewards.extend(c.reward for c in comps)
            batch.append(StoredGroup("", "", 0, encode(problem), sampler_version, comps, 0.0))
        started = time.perf_counter()
        metrics = trainer.train_step(batch)
        train_s += time.perf_counter() - started
        if (step + 1) % int(flags["eval_every"]) == 0 or step + 1 == steps:
            curve.append((step + 1, evaluate()))
            recent = rewards[-G * B * int(flags["eval_every"]):]
            log(f"  {loss} lag={lag} seed={seed} step {step + 1}: held-out {curve[-1][1]:.3f} "
                f"train reward {sum(recent) / len(recent):.3f} is_var {metrics.get('is_weight_var', 0):.2e} "
                f"kl {metrics.get('kl_k3', 0):.2e}")
    return {"curve": curve, "sample_s": sample_s / steps, "train_s": train_s / steps}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--lag", type=int, default=0)
    parser.add_argument("--loss", default="gepo")
    parser.add_argument("--cache", type=Path, default=None, help="model cache root (default: heterorl's)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from heterorl.common.model import cache_root

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model_dir = build_proxy_model(args.cache if args.cache is not None else cache_root())
    build_s = time.perf_counter() - started
    print(f"proxy model at {model_dir} (build or reuse {build_s:.1f}s); task {json.dumps(PROXY_TASK_OPTIONS)}")
    results = [rl_run(model_dir, args.loss, args.lag, args.steps, seed) for seed in args.seeds]
    acc0 = sum(r["curve"][0][1] for r in results) / len(results)
    accn = sum(r["curve"][-1][1] for r in results) / len(results)
    best = sum(max(a for _, a in r["curve"]) for r in results) / len(results)
    step_s = sum(r["sample_s"] + r["train_s"] for r in results) / len(results)
    for seed, r in zip(args.seeds, results, strict=True):
        print(f"seed {seed}: " + " ".join(f"{s}:{a:.2f}" for s, a in r["curve"])
              + f"  sample {r['sample_s']:.3f}s/step train {r['train_s']:.3f}s/step")
    print(f"RESULT build_s={build_s:.1f} step_s={step_s:.3f} acc0={acc0:.3f} acc{args.steps}={accn:.3f} "
          f"best={best:.3f} loss={args.loss} lag={args.lag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
