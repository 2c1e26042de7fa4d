"""Time one learner optimizer step on the default model: the shared-prompt forward against the plain one.

Both paths compute the same per-token log-probs (tests/test_trainer.py checks values and gradients); this
prints what sharing the prompt of a group saves, measured side by side in one run.

    python benchmarks/train_step.py [--groups 4] [--group-size 8] [--completion-tokens 12] [--repeats 3]

Ends with `RESULT shared_s=... plain_s=... speedup=...`.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--completion-tokens", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()

    import torch

    from heterorl.common.model import encode_prompt, load_causal_lm, load_tokenizer, resolve_model
    from heterorl.common.tasks import make_task
    from heterorl.server.trainer import completion_logprobs, group_logprobs

    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    tokenizer, model = load_tokenizer(path), load_causal_lm(path).train()
    task, rng = make_task("arithmetic"), random.Random(0)
    groups = []
    for i in range(args.groups):
        prompt = encode_prompt(tokenizer, task.train_problem(i).question)
        comps = [[rng.randrange(100, 1000) for _ in range(args.completion_tokens)] for _ in range(args.group_size)]
        groups.append((prompt, comps))
    pad = tokenizer.pad_token_id

    def shared() -> None:
        for prompt, comps in groups:
            logprobs, _ = group_logprobs(model, prompt, comps, 0.7, pad)
            logprobs.sum().backward()

    def plain() -> None:
        seqs = [p + c for p, comps in groups for c in comps]
        lens = [len(p) for p, comps in groups for _ in comps]
        logprobs, _ = completion_logprobs(model, seqs, lens, 0.7, pad)
        logprobs.sum().backward()

    for fn in (shared, plain):  # warm-up: the first call pays for allocator and kernel set-up
        fn()
    timings: dict[str, list[float]] = {"shared": [], "plain": []}
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        for name, fn in (("shared", shared), ("plain", plain)):
            model.zero_grad(set_to_none=True)
            started = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - started)
    shared_s, plain_s = statistics.median(timings["shared"]), statistics.median(timings["plain"])
    prompt_len = statistics.fmean(len(p) for p, _ in groups)
    print(f"{args.groups} groups x {args.group_size} completions of {args.completion_tokens} tokens, "
          f"prompt {prompt_len:.0f} tokens, {args.threads} threads, median of {args.repeats} after a warm-up")
    print(f"forward+backward: shared prompt {shared_s:.2f}s, plain {plain_s:.2f}s")
    print(f"RESULT shared_s={shared_s:.2f} plain_s={plain_s:.2f} speedup={plain_s / shared_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
