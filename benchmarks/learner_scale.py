"""Learner step time and peak memory, the effect of the token budget and gradient checkpointing, and the time to
gather and encode a version, on 1 rank and on 2 (torchrun, FSDP2; gloo on CPUs, NCCL on GPUs).

Each configuration runs in a fresh subprocess, so its peak memory is its own: on the CPU the peak resident set
(`resource.getrusage(...).ru_maxrss`; tracemalloc does not see torch's allocations), reported whole and as the
growth during the steps (`step_mb`: activations, gradients, AdamW state); on CUDA `torch.cuda.max_memory_allocated`.
The batch is B groups of G random-token completions of one length after one random prompt, so every
configuration trains on the same tokens. The 2-rank row (whole batch) runs under torchrun with half the threads
per rank; its peak is per rank (the larger of the two; rank 0 also holds the plain bf16 copy used for trust
checks and evaluation). Run from the repo root:

    python benchmarks/learner_scale.py [--model smollm2-135m|tiny] [--groups 4] [--group-size 8]
        [--prompt-tokens 45] [--completion-tokens 16] [--device auto] [--compute-dtype auto]

Ends with `RESULT step_s_1=... step_s_2=... peak_mb_1=... peak_mb_2=... gather_encode_s=...` (the whole-batch,
no-checkpointing rows; gather_encode_s on 1 rank, the 2-rank figure is in the table).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from heterorl.common import codec
from heterorl.common.model import DEFAULT_MODEL, load_causal_lm, resolve_model
from heterorl.server.losses import LossConfig
from heterorl.server.store import StoredCompletion, StoredGroup
from heterorl.server.trainer import Trainer, TrainerConfig


def random_groups(n: int, g: int, prompt_len: int, completion_len: int, vocab: int, seed: int) -> list[StoredGroup]:
    rng = random.Random(seed)
    groups = []
    for index in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(prompt_len)]
        comps = tuple(StoredCompletion([rng.randrange(3, vocab) for _ in range(completion_len)],
                                       [-3.0] * completion_len, 1, float(rng.random() < 0.5), None) for _ in range(g))
        groups.append(StoredGroup(f"L{index}", "S", index, prompt, 1, comps, 0.0))
    return groups


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child_ranks(spec: dict) -> None:
    """One rank of the 2-rank configuration (under torchrun); each rank writes its figures to spec["out"]."""
    from heterorl.server import distributed

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    ranks = distributed.start(spec["device"], 1800)
    model = load_causal_lm(resolve_model(spec["model"]), dtype=torch.float32)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    trainer = Trainer(model, pad_id=0, ranks=ranks, config=TrainerConfig(
        lr=1e-6, weight_decay=0.0, max_grad_norm=1.0, temperature=0.7, loss=LossConfig(), device=spec["device"],
        compute_dtype=spec["compute_dtype"], grad_checkpointing=spec["ckpt"], micro_batch_tokens=spec["budget"]))
    cuda = trainer.device.type == "cuda"
    out: dict = {"rank": ranks.rank}
    if not ranks.leader:
        before = torch.cuda.memory_allocated(trainer.device) / 2**20 if cuda else rss_mb()
        distributed.follow(trainer, ranks)
    else:
        groups = random_groups(spec["groups"], spec["group_size"], spec["prompt_tokens"], spec["completion_tokens"],
                               vocab, seed=1)
        base_snapshot = trainer.snapshot()
        before = torch.cuda.memory_allocated(trainer.device) / 2**20 if cuda else rss_mb()
        times = [trainer.train_step(groups)["train_seconds"] for _ in range(spec["steps"])]
        out["step_s"] = min(times[1:] or times)
        started = time.perf_counter()
        snapshot = trainer.snapshot()
        gathered = time.perf_counter()
        payload = codec.encode(snapshot, base_snapshot)
        done = time.perf_counter()
        out.update(gather_s=gathered - started, encode_s=done - gathered, gather_encode_s=done - started,
                   delta_mb=len(payload) / 2**20, device=str(trainer.device),
                   compute_dtype=str(trainer.compute_dtype).removeprefix("torch."))
        distributed.finish(ranks)
    peak = torch.cuda.max_memory_allocated(trainer.device) / 2**20 if cuda else rss_mb()
    out.update(peak_mb=peak, step_mb=peak - before)
    Path(spec["out"], f"rank{ranks.rank}.json").write_text(json.dumps(out))


def run_two_ranks(spec: dict) -> dict:
    """The 2-rank configuration under torchrun: rank 0's times, and the larger per-rank peak."""
    from heterorl.server.distributed import free_port

    with tempfile.TemporaryDirectory() as out:
        spec = {**spec, "out": out}
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                   "127.0.0.1", "--master-port", str(free_port()), __file__, "--child-ranks", json.dumps(spec)]
        done = subprocess.run(command, capture_output=True, text=True, check=False,
                              env={**os.environ, "OMP_NUM_THREADS": str(spec["threads"])})
        if done.returncode != 0:
            raise RuntimeError(f"the 2-rank run failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        figures = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in (0, 1)]
    return {**figures[0], "peak_mb": max(f["peak_mb"] for f in figures),
            "step_mb": max(f["step_mb"] for f in figures), "peaks": [f["peak_mb"] for f in figures]}


def child(spec: dict) -> dict:
    """One configuration in this (fresh) process: timed steps, peak memory, optionally gather + encode."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = load_causal_lm(resolve_model(spec["model"]), dtype=torch.float32)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    trainer = Trainer(model, pad_id=0, config=TrainerConfig(
        lr=1e-6, weight_decay=0.0, max_grad_norm=1.0, temperature=0.7, loss=LossConfig(), device=spec["device"],
        compute_dtype=spec["compute_dtype"], grad_checkpointing=spec["ckpt"], micro_batch_tokens=spec["budget"]))
    groups = random_groups(spec["groups"], spec["group_size"], spec["prompt_tokens"], spec["completion_tokens"],
                           vocab, seed=1)
    cuda = trainer.device.type == "cuda"
    base_snapshot = trainer.snapshot() if spec["encode"] else None
    before = torch.cuda.memory_allocated(trainer.device) / 2**20 if cuda else rss_mb()
    times = []
    for _ in range(spec["steps"]):
        times.append(trainer.train_step(groups)["train_seconds"])
    peak = torch.cuda.max_memory_allocated(trainer.device) / 2**20 if cuda else rss_mb()
    out = {"step_s": min(times[1:] or times), "peak_mb": peak, "step_mb": peak - before,
           "compute_dtype": str(trainer.compute_dtype).removeprefix("torch."), "device": str(trainer.device)}
    if spec["encode"]:
        started = time.perf_counter()
        snapshot = trainer.snapshot()
        gathered = time.perf_counter()
        payload = codec.encode(snapshot, base_snapshot)
        done = time.perf_counter()
        out.update(gather_s=gathered - started, encode_s=done - gathered, gather_encode_s=done - started,
                   delta_mb=len(payload) / 2**20)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--groups", type=int, default=4, help="B")
    parser.add_argument("--group-size", type=int, default=8, help="G")
    parser.add_argument("--prompt-tokens", type=int, default=45)
    parser.add_argument("--completion-tokens", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compute-dtype", default="auto")
    parser.add_argument("--steps", type=int, default=2, help="steps per configuration (the first is a warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-ranks", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.child_ranks:
        child_ranks(json.loads(args.child_ranks))
        return 0

    group_tokens = args.group_size * (args.prompt_tokens + args.completion_tokens)
    base = {"model": args.model, "groups": args.groups, "group_size": args.group_size, "device": args.device,
            "prompt_tokens": args.prompt_tokens, "completion_tokens": args.completion_tokens, "steps": args.steps,
            "compute_dtype": args.compute_dtype, "threads": args.threads}
    configs = [("whole batch", 0, False, True), ("1 group / micro-batch", group_tokens, False, False),
               ("whole batch + ckpt", 0, True, False), ("1 group / micro-batch + ckpt", group_tokens, True, False)]
    rows = []
    for label, budget, ckpt, encode in configs:
        spec = {**base, "budget": budget, "ckpt": ckpt, "encode": encode}
        done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append((label, budget, json.loads(done.stdout.strip().splitlines()[-1])))
    two = run_two_ranks({**base, "budget": 0, "ckpt": False, "threads": max(1, args.threads // 2)})
    first = rows[0][2]
    print(f"model={args.model} B={args.groups} G={args.group_size} prompt={args.prompt_tokens} "
          f"completion={args.completion_tokens} device={first['device']} compute={first['compute_dtype']} "
          f"ranks=1 and 2")
    print(f"{'configuration':32s} {'budget':>7s} {'step_s':>7s} {'peak_mb':>8s} {'step_mb':>8s}")
    for label, budget, r in rows:
        print(f"{label:32s} {budget:7d} {r['step_s']:7.2f} {r['peak_mb']:8.0f} {r['step_mb']:8.0f}")
    print(f"{'whole batch, 2 ranks (per rank)':32s} {0:7d} {two['step_s']:7.2f} {two['peak_mb']:8.0f} "
          f"{two['step_mb']:8.0f}   (rank 0 / rank 1 peak: {two['peaks'][0]:.0f} / {two['peaks'][1]:.0f} MB)")
    print(f"gather {first['gather_s']:.3f} s + encode {first['encode_s']:.3f} s of a {first['delta_mb']:.1f} MB delta "
          f"(1 rank); 2 ranks: gather {two['gather_s']:.3f} s + encode {two['encode_s']:.3f} s")
    print(f"RESULT step_s_1={first['step_s']:.2f} step_s_2={two['step_s']:.2f} peak_mb_1={first['peak_mb']:.0f} "
          f"peak_mb_2={two['peak_mb']:.0f} gather_encode_s={first['gather_encode_s']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
