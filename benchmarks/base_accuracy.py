"""Greedy held-out accuracy of a model on the arithmetic task, before any RL.

The default task is tuned so the default model starts well below perfect (room for RL to show a gain) but
well above zero (groups carry signal). Run from the repo root:

    python benchmarks/base_accuracy.py [--n 100] [--max-new-tokens 16]

Ends with a line `RESULT base_accuracy=<fraction> ...`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from heterorl.common.model import DEFAULT_MODEL, encode_prompt, load_causal_lm, load_tokenizer, resolve_model
from heterorl.common.tasks import ArithmeticTask, get_reward


def main(argv: list[str] | None = None) -> int:
    defaults = ArithmeticTask()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name or local HF directory")
    parser.add_argument("--n", type=int, default=100, help="held-out problems to score")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the machine is shared)")
    parser.add_argument("--low", type=int, default=defaults.low)
    parser.add_argument("--high", type=int, default=defaults.high)
    parser.add_argument("--ops", default="".join(defaults.ops))
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--eval-fraction", type=float, default=defaults.eval_fraction)
    parser.add_argument("--template", default=defaults.template, help="question format with {a}, {op}, {b}")
    parser.add_argument("--samples", type=int, default=5, help="sample completions to print")
    args = parser.parse_args(argv)

    torch.set_num_threads(max(1, min(args.threads, 2)))
    task = ArithmeticTask(
        low=args.low, high=args.high, ops=args.ops, seed=args.seed, eval_fraction=args.eval_fraction,
        template=args.template,
    )
    n = min(args.n, task.eval_size)
    problems = task.eval_problems(n)
    reward = get_reward(task.default_reward)

    start = time.perf_counter()
    path = resolve_model(args.model)
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path)
    load_s = time.perf_counter() - start

    start = time.perf_counter()
    completions: list[str] = []
    for i in range(0, len(problems), args.batch_size):
        batch = [encode_prompt(tokenizer, p.question) for p in problems[i : i + args.batch_size]]
        width = max(len(ids) for ids in batch)
        # Decoder-only batching: pad on the left so every prompt ends where generation starts.
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        completions.extend(tokenizer.batch_decode(out[:, width:], skip_special_tokens=True))
    gen_s = time.perf_counter() - start

    scores = [reward(c, p.answer) for c, p in zip(completions, problems)]
    accuracy = sum(scores) / len(scores)
    print(f"task: {task.options()}  reward: {task.default_reward}")
    print(f"model: {args.model}  problems: {len(problems)}  max_new_tokens: {args.max_new_tokens}  greedy")
    for p, c, s in list(zip(problems, completions, scores))[: args.samples]:
        print(f"  [{'ok' if s else '--'}] {p.question} (answer {p.answer}) -> {c!r}")
    print(f"load {load_s:.1f} s, generation {gen_s:.1f} s")
    print(
        f"RESULT base_accuracy={accuracy:.3f} n={len(problems)} max_new_tokens={args.max_new_tokens} "
        f"low={task.low} high={task.high} ops={''.join(task.ops)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
