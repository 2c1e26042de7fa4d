"""GEPO against its baselines under sampler lag: does learning survive samples from policies many versions old?

For every loss x lag x seed of the grid, a real `heterorl-learner` and a real `heterorl-sampler` run as separate
processes and talk gRPC over loopback; the sampler is told to lag (`--lag-versions D`: it refreshes its weights
only once the learner is D versions ahead). Each run's metrics.jsonl gives the held-out score curve and, per
optimizer step, the importance-weight variance, the k3 estimate of KL(behaviour || current) and the staleness
of every trained group (the lag that actually happened, which is what the table reports next to the setting).

    python benchmarks/staleness.py            # full grid: {gepo,gspo,grpo} x lag {0,8,32,64} x seeds {0,1}
    python benchmarks/staleness.py --quick    # reduced grid for CI (< 3 min)
    python benchmarks/staleness.py --model smollm2-135m --losses gepo,grpo --lags 0,16 --seeds 0 --steps 30

The default model is a proxy that trains in about a minute per run on 2 CPU cores (see staleness_proxy.py).
Writes `<out>.json` (every run's curves and step metrics) and `<out>.png` (score curves per lag for each loss;
IS-weight variance against KL by loss), prints a table, and ends with one line
`RESULT gepo_drop64=... gspo_drop64=... grpo_drop64=... gepo_gap=... gspo_gap=...`: `drop<L>` is the mean
(over seeds) best held-out score at lag 0 minus the mean best score at lag L (the largest lag of the grid);
`gap` is the mean best-minus-last score at that lag.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH_DIR))

from heterorl.common.model import cache_root  # noqa: E402
from heterorl.tools.procs import stop_processes  # noqa: E402

PROXY = "proxy"
# Real-model settings: the learner defaults (temperature 0.7, lr 4e-6, G=8) on the whole held-out split, with
# B=2 groups per step so that a 2-core machine makes enough steps for a lag of 16 versions to matter.
REAL_MODEL_FLAGS: dict[str, object] = {"eval_every": 5, "eval_size": 114, "groups_per_step": 2}


@dataclass
class RunResult:
    loss: str
    lag: int
    seed: int
    evals: list[tuple[int, float]]  # (step, held-out accuracy)
    steps: list[dict] = field(default_factory=list)  # per optimizer step: the metrics the table needs
    refresh_lags: list[int] = field(default_factory=list)  # versions ahead at each sampler refresh (from its log)
    wall_s: float = 0.0

    @property
    def best(self) -> float:
        return max(a for _, a in self.evals[1:]) if len(self.evals) > 1 else math.nan

    @property
    def last(self) -> float:
        return self.evals[-1][1] if self.evals else math.nan

    @property
    def mean_score(self) -> float:
        """Mean held-out score over the evaluations after step 0: rewards learning early, not only peaking."""
        return statistics.fmean(a for _, a in self.evals[1:]) if len(self.evals) > 1 else math.nan

    @property
    def start(self) -> float:
        return self.evals[0][1] if self.evals else math.nan

    def mean_of(self, key: str) -> float:
        values = [s[key] for s in self.steps if key in s and math.isfinite(s[key])]
        return statistics.fmean(values) if values else math.nan

    def staleness_quantiles(self) -> tuple[float, float, float]:
        values = sorted(v for s in self.steps for v in s["staleness"])
        if not values:
            return (math.nan, math.nan, math.nan)
        pick = lambda q: float(values[min(len(values) - 1, int(q * len(values)))])  # noqa: E731
        return pick(0.5), pick(0.9), float(values[-1])


def learner_flags(model: str, model_dir: Path, loss: str, seed: int, steps: int) -> dict[str, object]:
    if model == PROXY:
        from staleness_proxy import PROXY_LEARNER_FLAGS, PROXY_TASK_OPTIONS

        flags: dict[str, object] = {**PROXY_LEARNER_FLAGS, "model": str(model_dir), "task": "arithmetic",
                                    "task_options": json.dumps(PROXY_TASK_OPTIONS)}
    else:
        flags = {**REAL_MODEL_FLAGS, "model": model}
    flags.update(loss=loss, seed=seed, max_steps=steps, host="127.0.0.1", threads=1)
    # One sampler batch of B groups in flight besides the B being trained: lag 0 stays close to on-policy, so
    # the staleness of a run is set by its lag, not by how far the sampler out-runs the learner.
    groups_per_step = int(flags.get("groups_per_step", 4))
    flags.setdefault("max_inflight_groups", 2 * groups_per_step)
    return flags


def as_argv(flags: dict[str, object]) -> list[str]:
    return [item for key, value in flags.items() for item in (f"--{key.replace('_', '-')}", str(value))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_one(model: str, model_dir: Path, loss: str, lag: int, seed: int, steps: int, work: Path,
            env: dict[str, str], timeout_s: float) -> RunResult:
    """One learner + one lagging sampler, as real processes, until the learner has made `steps` steps."""
    run_dir = work / f"{loss}-lag{lag}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    flags = learner_flags(model, model_dir, loss, seed, steps)
    port = free_port()
    started = time.time()
    # Both start at once (the sampler retries until the learner serves), so their start-up costs overlap.
    learner = subprocess.Popen(
        [sys.executable, "-m", "heterorl.server.main", "--run-dir", str(run_dir), "--port", str(port),
         *as_argv(flags)],
        stdout=open(run_dir / "learner.log", "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        cwd=REPO,
    )
    sampler = subprocess.Popen(
        [sys.executable, "-m", "heterorl.node.main", "--learner", f"127.0.0.1:{port}", "--name", "lagging",
         "--engine", "transformers", "--threads", "1", "--seed", str(seed), "--lag-versions", str(lag),
         "--max-batch", str(flags.get("groups_per_step", 4)), "--retry-max-s", "1"],
        stdout=open(run_dir / "sampler.log", "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        cwd=REPO,
    )
    try:
        try:
            learner.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{run_dir.name} did not finish {steps} steps in {timeout_s:.0f}s") from None
        if learner.returncode != 0:
            raise RuntimeError(f"learner failed ({learner.returncode}); see {run_dir / 'learner.log'}")
    finally:
        stop_processes([sampler, learner], 15)
    return read_run(run_dir, loss, lag, seed, time.time() - started)


STEP_KEYS = ("is_weight_mean", "is_weight_var", "is_weight_max", "clip_frac_low", "clip_frac_high", "kl_k3",
             "token_ratio_var", "seq_ratio_var", "group_weight_var", "reward_mean", "accuracy", "grad_norm",
             "staleness")


def read_run(run_dir: Path, loss: str, lag: int, seed: int, wall_s: float) -> RunResult:
    evals, steps = [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "eval":
            evals.append((record["step"], record["accuracy"]))
        elif record["kind"] == "train":
            steps.append({"step": record["step"], **{k: record[k] for k in STEP_KEYS if k in record}})
    refresh = []
    sampler_log = run_dir / "sampler.log"
    if sampler_log.exists():
        for line in sampler_log.read_text().splitlines():
            marker = "while the learner moved "
            if marker in line:
                refresh.append(int(line.split(marker)[1].split()[0]))
    return RunResult(loss, lag, seed, evals, steps, refresh, wall_s)


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def summarize(results: list[RunResult], losses: list[str], lags: list[int]) -> tuple[list[dict], dict[str, float]]:
    """One row per (loss, lag), averaged over seeds; and the RESULT figures."""
    rows = []
    best_at: dict[tuple[str, int], float] = {}
    gap_at: dict[tuple[str, int], float] = {}
    for loss in losses:
        for lag in lags:
            runs = [r for r in results if r.loss == loss and r.lag == lag]
            if not runs:
                continue
            best = _mean([r.best for r in runs])
            gap = _mean([r.best - r.last for r in runs])
            best_at[(loss, lag)], gap_at[(loss, lag)] = best, gap
            quantiles = [r.staleness_quantiles() for r in runs]
            rows.append({
                "loss": loss, "lag": lag, "seeds": len(runs),
                "start": _mean([r.start for r in runs]), "best": best,
                "best_sd": statistics.stdev([r.best for r in runs]) if len(runs) > 1 else 0.0,
                "last": _mean([r.last for r in runs]), "gap": gap, "mean": _mean([r.mean_score for r in runs]),
                "stale_p50": _mean([q[0] for q in quantiles]), "stale_p90": _mean([q[1] for q in quantiles]),
                "stale_max": max(q[2] for q in quantiles),
                "kl_k3": _mean([r.mean_of("kl_k3") for r in runs]),
                "is_var": _mean([r.mean_of("is_weight_var") for r in runs]),
                "is_max": max(max((s.get("is_weight_max", math.nan) for s in r.steps), default=math.nan) for r in runs),
                "tok_var": _mean([r.mean_of("token_ratio_var") for r in runs]),
                "seq_var": _mean([r.mean_of("seq_ratio_var") for r in runs]),
                "grp_var": _mean([r.mean_of("group_weight_var") for r in runs]),
                "clip": _mean([r.mean_of("clip_frac_low") + r.mean_of("clip_frac_high") for r in runs]),
                "wall_s": sum(r.wall_s for r in runs),
            })
    for row in rows:
        base = next((r for r in rows if r["loss"] == row["loss"] and r["lag"] == lags[0]), None)
        row["drop"] = base["best"] - row["best"] if base else math.nan
        row["mean_drop"] = base["mean"] - row["mean"] if base else math.nan
    top = lags[-1]
    figures = {}
    for loss in ("gepo", "gspo", "grpo"):
        if (loss, lags[0]) in best_at and (loss, top) in best_at:
            figures[f"{loss}_drop{top}"] = best_at[(loss, lags[0])] - best_at[(loss, top)]
    for loss in ("gepo", "gspo"):
        if (loss, top) in gap_at:
            figures[f"{loss}_gap"] = gap_at[(loss, top)]
    return rows, figures


COLUMNS = [("loss", "{:<8}"), ("lag", "{:>4}"), ("seeds", "{:>5}"), ("start", "{:>6.3f}"), ("best", "{:>6.3f}"),
           ("best_sd", "{:>7.3f}"), ("last", "{:>6.3f}"), ("gap", "{:>6.3f}"), ("drop", "{:>6.3f}"),
           ("mean", "{:>6.3f}"), ("mean_drop", "{:>9.3f}"),
           ("stale_p50", "{:>9.1f}"), ("stale_p90", "{:>9.1f}"), ("stale_max", "{:>9.0f}"), ("kl_k3", "{:>9.3g}"),
           ("is_var", "{:>9.3g}"), ("is_max", "{:>8.3g}"), ("tok_var", "{:>9.3g}"), ("seq_var", "{:>9.3g}"),
           ("grp_var", "{:>9.3g}"), ("clip", "{:>6.3f}"), ("wall_s", "{:>7.0f}")]
# Column meanings, printed under the table.
LEGEND = (
    "start/best/last: held-out greedy accuracy at step 0 / best after step 0 / at the end (mean over seeds); "
    "gap = best - last; drop = best at the first lag - best at this lag; mean: mean score over the evaluations "
    "after step 0 (learning speed counts), mean_drop: its drop from the first lag; stale_*: versions between a group's "
    "generation and its training step (what actually happened); kl_k3: mean per-token k3 KL(behaviour||current); "
    "is_var/is_max: variance/max of the trained loss's own importance weight; tok_var/seq_var/grp_var: variance of "
    "the per-token ratio (GRPO), the sequence ratio p/q (GSPO) and p/E_q[q] (GEPO), logged for every loss; "
    "clip: clipped fraction; wall_s: seconds, summed over seeds."
)


def format_table(rows: list[dict]) -> str:
    """Fixed-width table; every format's width is at least its column name's."""
    header = " ".join(name.ljust(8) if name == "loss" else name.rjust(len(fmt.format(0.0 if "f" in fmt or "g" in fmt else 0)))
                      for name, fmt in COLUMNS)
    return "\n".join([header] + [" ".join(fmt.format(row[name]) for name, fmt in COLUMNS) for row in rows])


def plot(results: list[RunResult], losses: list[str], lags: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(len(losses), 2)
    fig, axes = plt.subplots(2, cols, figsize=(4.4 * cols, 7.6), squeeze=False)
    colors = plt.get_cmap("viridis")
    for ax, loss in zip(axes[0], losses):
        for i, lag in enumerate(lags):
            runs = [r for r in results if r.loss == loss and r.lag == lag]
            if not runs:
                continue
            steps = sorted({s for r in runs for s, _ in r.evals})
            means = [_mean([a for r in runs for s2, a in r.evals if s2 == s]) for s in steps]
            ax.plot(steps, means, marker="o", ms=3, color=colors(i / max(1, len(lags) - 1)), label=f"lag {lag}")
        ax.set_title(f"{loss}: held-out score by sampler lag")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("held-out accuracy (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[0][len(losses):]:
        ax.axis("off")

    def scatter(ax, series, heading):
        for (label, points), marker in zip(series, "os^Dv"):
            points = [(x, y) for x, y in points if x > 0 and y > 0]
            if points:
                ax.scatter([p[0] for p in points], [p[1] for p in points], s=6, alpha=0.4, marker=marker, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("k3 KL(behaviour || current), per step")
        ax.set_ylabel("variance over the step's sequences/tokens")
        ax.set_title(heading)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    steps_of = lambda loss: [s for r in results if r.loss == loss for s in r.steps]  # noqa: E731
    scatter(axes[1][0], [(loss, [(s["kl_k3"], s["is_weight_var"]) for s in steps_of(loss)]) for loss in losses],
            "own IS-weight variance vs KL, by loss")
    every = [s for r in results for s in r.steps]
    scatter(axes[1][1], [(label, [(s["kl_k3"], s[key]) for s in every if key in s]) for label, key in (
        ("per-token π/μ (GRPO)", "token_ratio_var"), ("sequence p/q (GSPO)", "seq_ratio_var"),
        ("p/E_q[q] (GEPO)", "group_weight_var"))], "weight families vs KL, all runs")
    for ax in axes[1][2:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced grid for CI: gepo,grpo x lag 0,8, 1 seed")
    parser.add_argument("--model", default=PROXY, help="'proxy' (default) or any learner --model value")
    parser.add_argument("--losses", default="gepo,gspo,grpo")
    parser.add_argument("--lags", default="0,8,32,64", help="sampler lags in versions; the first is the baseline")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps per run (0: the setting's default)")
    parser.add_argument("--out", type=Path, default=None, help="output prefix (default benchmarks/results/staleness-<model>)")
    parser.add_argument("--work", type=Path, default=None, help="directory for run dirs (default: a temp dir)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one run may take")
    parser.add_argument("--from-json", type=Path, default=None, help="re-print the table and redraw the PNG of a saved run")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so each run's `finally` stops its learner and sampler.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    if args.from_json is not None:
        return render(json.loads(args.from_json.read_text()), args.out or args.from_json.with_suffix(""))
    if args.quick:
        losses, lags, seeds = ["gepo", "grpo"], [0, 8], [0]
        steps = args.steps or 30
    else:
        losses = [x for x in args.losses.split(",") if x]
        lags = [int(x) for x in args.lags.split(",")]
        seeds = [int(x) for x in args.seeds.split(",")]
        steps = args.steps or (150 if args.model == PROXY else 30)
    out = args.out or BENCH_DIR / "results" / f"staleness-{'quick' if args.quick else args.model}"
    out.parent.mkdir(parents=True, exist_ok=True)

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    built = time.time()
    if args.model == PROXY:
        from staleness_proxy import build_proxy_model

        model_dir = build_proxy_model(cache_root())
    else:
        model_dir = Path(args.model)
    print(f"model {args.model} ready in {time.time() - built:.1f}s; grid {losses} x lags {lags} x seeds {seeds}, "
          f"{steps} steps per run", flush=True)

    work = args.work or Path(tempfile.mkdtemp(prefix="heterorl-staleness-"))
    started = time.time()
    results: list[RunResult] = []
    total = len(losses) * len(lags) * len(seeds)
    for seed in seeds:
        for lag in lags:
            for loss in losses:
                result = run_one(args.model, model_dir, loss, lag, seed, steps, work, env, args.timeout)
                results.append(result)
                q = result.staleness_quantiles()
                print(f"[{len(results)}/{total}] {loss} lag {lag} seed {seed}: held-out {result.start:.3f} -> "
                      f"best {result.best:.3f} last {result.last:.3f}; staleness p50 {q[0]:.0f} max {q[2]:.0f}; "
                      f"IS var {result.mean_of('is_weight_var'):.3g} KL {result.mean_of('kl_k3'):.3g}; "
                      f"{result.wall_s:.0f}s", flush=True)
    wall = time.time() - started
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)

    report = {"model": args.model, "losses": losses, "lags": lags, "seeds": seeds, "steps": steps, "wall_s": wall,
              "runs": [asdict(r) for r in results]}
    out.with_suffix(".json").write_text(json.dumps(_rounded(report)))
    return render(report, out)


def _rounded(value: object) -> object:
    """Floats to 5 significant digits: the saved report stays small enough to commit."""
    if isinstance(value, float):
        return float(f"{value:.5g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def render(report: dict, out: Path) -> int:
    """Table, legend, PNG and RESULT line of a grid's report (fresh or loaded from its JSON)."""
    results = [RunResult(**{**r, "evals": [tuple(e) for e in r["evals"]]}) for r in report["runs"]]
    losses, lags, seeds = report["losses"], report["lags"], report["seeds"]
    rows, figures = summarize(results, losses, lags)
    print()
    print(format_table(rows))
    print(LEGEND)
    title = (f"heterorl staleness: model {report['model']}, {report['steps']} steps/run, seeds {seeds}; "
             "sampler lag in versions")
    plot(results, losses, lags, out.with_suffix(".png"), title)
    print(f"\nseeds {seeds}; wall {report['wall_s'] / 60:.1f} min; wrote {out.with_suffix('.json')} and "
          f"{out.with_suffix('.png')}")
    print("RESULT " + " ".join(f"{k}={v:.3f}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
