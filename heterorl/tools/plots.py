"""`heterorl plot RUN_DIR` and `heterorl compare RUN_DIR...`: PNG charts of a run's `metrics.jsonl`.

The learner writes one JSON line per optimizer step (`"kind": "train"`: loss, reward, the staleness of every
trained group, importance-weight statistics, k3 KL, ...) and one per evaluation (`"kind": "eval"`: held-out
accuracy). `plot` draws, for one run, one PNG per chart plus `overview.png` with all of them:

    reward.png           mean reward of the step's groups (and a moving average when there are many steps)
    accuracy.png         greedy held-out accuracy at each evaluation
    loss.png             the training loss
    weight_variance.png  variance of the three importance-weight families (per-token ratio, sequence ratio,
                         GEPO's group weight p/E_q[q]), whichever loss is trained
    kl.png               k3 estimate of KL(behaviour || current)
    staleness.png        mean and max staleness of the trained groups per step, and a histogram of all of them

`compare` draws the same charts with one colour per run. matplotlib is imported only when a chart is drawn, with
the Agg backend (no display needed).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
CHARTS = ("reward", "accuracy", "loss", "weight_variance", "kl", "staleness")
OVERVIEW = "overview"

# (metrics key, legend label); the three families are logged whichever loss is trained.
WEIGHT_FAMILIES = (
    ("token_ratio_var", "per-token ratio"),
    ("seq_ratio_var", "sequence ratio p/q"),
    ("group_weight_var", "group weight p/E_q[q]"),
)


class PlotError(ValueError):
    """A run directory or metrics file that cannot be plotted; the message names the cause and the fix."""


@dataclass
class Run:
    label: str
    path: Path
    train: list[dict] = field(default_factory=list)
    eval: list[dict] = field(default_factory=list)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of a numeric train-record key; records without it are skipped."""
        steps, values = [], []
        for r in self.train:
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and "step" in r:
                steps.append(r["step"])
                values.append(float(v))
        return steps, values

    def staleness_values(self) -> list[int]:
        return [int(s) for r in self.train for s in (r.get("staleness") or []) if isinstance(s, (int, float))]


def _metrics_path(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if run_dir.is_file() and run_dir.name.endswith(".jsonl"):
        return run_dir  # a metrics file given directly
    if not run_dir.exists():
        raise PlotError(f"{run_dir} does not exist: pass the --run-dir a learner wrote (it holds {METRICS_FILE})")
    if not run_dir.is_dir():
        raise PlotError(f"{run_dir} is not a directory: pass the learner's run directory, which holds {METRICS_FILE}")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise PlotError(f"{run_dir} has no {METRICS_FILE}: it is not a learner's run directory, or its learner has not "
                        f"started yet; pass the --run-dir of a learner that has trained at least one step")
    return path


def load_run(run_dir: Path, label: str | None = None) -> Run:
    """Read a run's metrics; PlotError (one line: cause and fix) if there is nothing sound to plot.

    A last line without its newline is a record the learner is still writing and is ignored; any other line
    that is not a JSON object is damage and refused with its line number.
    """
    path = _metrics_path(Path(run_dir))
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise PlotError(f"cannot read {path}: {err.strerror}; check its permissions") from None
    run = Run(label or _default_label(path), path)
    lines = raw.split(b"\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            if number == len(lines):  # no newline after it: a record being written right now
                continue
            cause = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8"
            raise PlotError(f"line {number} of {path} is not JSON ({cause}): the file is damaged; restore it from a "
                            f"backup or delete that line") from None
        if not isinstance(record, dict):
            raise PlotError(f"line {number} of {path} is not a JSON object: this is not a heterorl metrics file; "
                            f"pass the run directory a learner wrote")
        kind = record.get("kind")
        if kind == "train":
            run.train.append(record)
        elif kind == "eval":
            run.eval.append(record)
    if not run.train and not run.eval:
        what = "is empty" if not raw.strip() else "holds no train or eval records"
        raise PlotError(f"{path} {what}: the learner has not finished a step yet; plot again once it has trained "
                        f"(a sampler must be connected for it to train)")
    run.train.sort(key=lambda r: r.get("step", 0))
    run.eval.sort(key=lambda r: r.get("step", 0))
    return run


def _default_label(metrics_path: Path) -> str:
    return metrics_path.parent.name if metrics_path.name == METRICS_FILE else metrics_path.stem


def _unique_labels(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out


# ---- drawing ----------------------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotError("matplotlib is not installed: pip install matplotlib (or the project's dev extra: "
                        "pip install -e '.[dev]')") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _moving_average(values: list[float], window: int) -> list[float]:
    out, acc, finite = [], [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        finite = [x for x in acc if math.isfinite(x)]
        out.append(sum(finite) / len(finite) if finite else math.nan)
    return out


def _log_if_wide(ax, values: list[float]) -> None:
    """Log y scale when all values are >= 0 and the positive ones span more than two decades."""
    finite = [v for v in values if math.isfinite(v)]
    positive = [v for v in finite if v > 0]
    if positive and all(v >= 0 for v in finite) and max(positive) / min(positive) > 100:
        ax.set_yscale("log")


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, color="0.4", wrap=True)


def _draw_reward(ax, runs: list[Run], colors: list) -> None:
    any_data = False
    for run, color in zip(runs, colors):
        steps, values = run.series("reward_mean")
        if not steps:
            continue
        any_data = True
        label = run.label if len(runs) > 1 else "reward (step mean)"
        if len(steps) >= 20:
            window = max(5, len(steps) // 20)
            ax.plot(steps, values, color=color, alpha=0.3, lw=1)
            ax.plot(steps, _moving_average(values, window), color=color, lw=2,
                    label=f"{label}, moving avg of {window}" if len(runs) == 1 else label)
        else:
            ax.plot(steps, values, color=color, lw=1.8, marker="o", ms=3, label=label)
    if not any_data:
        _no_data(ax, "no reward_mean in the train records")
    ax.set_title("Reward")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward of trained groups")


def _draw_accuracy(ax, runs: list[Run], colors: list) -> None:
    any_data = False
    for run, color in zip(runs, colors):
        points = [(r["step"], float(r["accuracy"])) for r in run.eval
                  if "step" in r and isinstance(r.get("accuracy"), (int, float))]
        if not points:
            continue
        any_data = True
        steps, values = zip(*points)
        n = run.eval[-1].get("n")
        label = run.label if len(runs) > 1 else f"greedy, n={n}" if n else "greedy"
        ax.plot(steps, values, color=color, lw=1.8, marker="o", ms=4, label=label)
    if not any_data:
        _no_data(ax, "no eval records (was --eval-every 0 or --eval-size 0?)")
    ax.set_title("Held-out accuracy")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)


def _draw_loss(ax, runs: list[Run], colors: list) -> None:
    any_data = False
    for run, color in zip(runs, colors):
        steps, values = run.series("loss")
        if steps:
            any_data = True
            ax.plot(steps, values, color=color, lw=1.5, label=run.label if len(runs) > 1 else "loss")
    if not any_data:
        _no_data(ax, "no loss in the train records")
    ax.set_title("Loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")


def _draw_weight_variance(ax, runs: list[Run], colors: list) -> None:
    styles = ("-", "--", ":")
    everything: list[float] = []
    for run, color in zip(runs, colors):
        drawn = False
        for (key, name), style in zip(WEIGHT_FAMILIES, styles):
            steps, values = run.series(key)
            if not steps:
                continue
            drawn = True
            everything += values
            label = f"{run.label}: {name}" if len(runs) > 1 else name
            # One run: a colour per family. Several: a colour per run, a line style per family.
            c = color if len(runs) > 1 else None
            ax.plot(steps, values, color=c, ls=styles[0] if len(runs) == 1 else style, lw=1.5, label=label)
        if not drawn:  # an older metrics file: only the trained loss's weights
            steps, values = run.series("is_weight_var")
            if steps:
                everything += values
                ax.plot(steps, values, color=color, lw=1.5,
                        label=f"{run.label}: trained loss's weights" if len(runs) > 1 else "trained loss's weights")
    if not everything:
        _no_data(ax, "no importance-weight variances in the train records")
    _log_if_wide(ax, everything)
    ax.set_title("Importance-weight variance")
    ax.set_xlabel("step")
    ax.set_ylabel("variance")


def _draw_kl(ax, runs: list[Run], colors: list) -> None:
    everything: list[float] = []
    for run, color in zip(runs, colors):
        steps, values = run.series("kl_k3")
        if steps:
            everything += values
            ax.plot(steps, values, color=color, lw=1.5, label=run.label if len(runs) > 1 else "k3 estimate")
    if not everything:
        _no_data(ax, "no kl_k3 in the train records")
    _log_if_wide(ax, everything)
    ax.set_title("KL(behaviour || current), k3")
    ax.set_xlabel("step")
    ax.set_ylabel("KL (nats/token)")


def _draw_staleness_steps(ax, runs: list[Run], colors: list) -> None:
    any_data = False
    for run, color in zip(runs, colors):
        steps, means = run.series("staleness_mean")
        max_steps, maxes = run.series("staleness_max")
        if steps:
            any_data = True
            ax.plot(steps, means, color=color, lw=1.8, label=f"{run.label}: mean" if len(runs) > 1 else "mean")
        if max_steps:
            any_data = True
            ax.plot(max_steps, maxes, color=color if len(runs) > 1 else "tab:red", lw=1.2, ls="--",
                    label=f"{run.label}: max" if len(runs) > 1 else "max")
    if not any_data:
        _no_data(ax, "no staleness in the train records")
    ax.set_title("Staleness of trained groups")
    ax.set_xlabel("step")
    ax.set_ylabel("versions behind")


def _draw_staleness_hist(ax, runs: list[Run], colors: list) -> None:
    data = [(run, color, run.staleness_values()) for run, color in zip(runs, colors)]
    top = max((max(v) for _, _, v in data if v), default=None)
    if top is None:
        _no_data(ax, "no per-group staleness in the train records")
    else:
        bins = [b - 0.5 for b in range(0, top + 2)] if top <= 60 else 40
        for run, color, values in data:
            if values:
                mean = sum(values) / len(values)
                label = f"{run.label}: " if len(runs) > 1 else ""
                ax.hist(values, bins=bins, color=color, alpha=0.45 if len(runs) > 1 else 0.8,
                        histtype="stepfilled", edgecolor=color,
                        label=f"{label}{len(values)} groups, mean {mean:.2f}, max {max(values)}")
    ax.set_title("Staleness histogram (all trained groups)")
    ax.set_xlabel("versions behind")
    ax.set_ylabel("groups")


DRAW = {
    "reward": _draw_reward,
    "accuracy": _draw_accuracy,
    "loss": _draw_loss,
    "weight_variance": _draw_weight_variance,
    "kl": _draw_kl,
    "staleness": _draw_staleness_steps,  # the overview's panel; staleness.png adds the histogram
}


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")


def _title(runs: list[Run]) -> str:
    if len(runs) == 1:
        run = runs[0]
        steps = run.train[-1]["step"] if run.train and "step" in run.train[-1] else 0
        return f"{run.label}: {steps} steps, {len(run.eval)} evaluations ({run.path})"
    return "compare: " + ", ".join(run.label for run in runs)


def render(runs: list[Run], out_dir: Path) -> list[Path]:
    """Write one PNG per chart and overview.png for `runs` (one run: `plot`, several: `compare`)."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PlotError(f"cannot create the output directory {out_dir}: {err.strerror}; pass another --out") from None
    cmap = plt.get_cmap("tab10")
    colors = [cmap(i % 10) for i in range(len(runs))]
    title = _title(runs)
    written = []

    for name in CHARTS:
        if name == "staleness":
            fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
            _draw_staleness_steps(left, runs, colors)
            _draw_staleness_hist(right, runs, colors)
            axes = (left, right)
        else:
            fig, ax = plt.subplots(figsize=(8, 4.5))
            DRAW[name](ax, runs, colors)
            axes = (ax,)
        for ax in axes:
            ax.grid(alpha=0.3)
            _legend(ax)
        fig.suptitle(title, fontsize=9, color="0.3")
        fig.tight_layout()
        written.append(_save(fig, out_dir / f"{name}.png", plt))

    fig, grid = plt.subplots(2, 3, figsize=(17, 9))
    for ax, name in zip(grid.flat, CHARTS):
        DRAW[name](ax, runs, colors)
        ax.grid(alpha=0.3)
        _legend(ax)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    written.append(_save(fig, out_dir / f"{OVERVIEW}.png", plt))
    return written


def _save(fig, path: Path, plt) -> Path:
    try:
        fig.savefig(path, dpi=110)
    except OSError as err:
        raise PlotError(f"cannot write {path}: {err.strerror}; pass another --out") from None
    finally:
        plt.close(fig)
    return path


def plot(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    run = load_run(run_dir)
    return render([run], Path(out_dir) if out_dir is not None else _default_out(run))


def compare(run_dirs: list[Path], out_dir: Path, labels: list[str] | None = None) -> list[Path]:
    if labels and len(labels) != len(run_dirs):
        raise PlotError(f"{len(labels)} labels for {len(run_dirs)} runs: give one --labels value per run directory, "
                        f"in the same order")
    runs = [load_run(d, label) for d, label in zip(run_dirs, labels or [None] * len(run_dirs))]
    for run, label in zip(runs, _unique_labels([r.label for r in runs])):
        run.label = label
    return render(runs, out_dir)


def _default_out(run: Run) -> Path:
    return run.path.parent / "plots"


# ---- command line -----------------------------------------------------------------------------------------------


def cmd_plot(args: argparse.Namespace) -> int:
    try:
        written = plot(args.run_dir, args.out)
    except PlotError as err:
        print(f"heterorl plot: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} charts to {written[0].parent}/: " + ", ".join(p.name for p in written))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    try:
        written = compare(args.run_dirs, args.out, args.labels)
    except PlotError as err:
        print(f"heterorl compare: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} charts comparing {len(args.run_dirs)} runs to {written[0].parent}/: "
          + ", ".join(p.name for p in written))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `plot` and `compare` to the `heterorl` command's subcommands."""
    p = sub.add_parser("plot", help="PNG charts of a run's metrics.jsonl (reward, accuracy, loss, weights, KL, "
                                    "staleness)")
    p.add_argument("run_dir", type=Path, help="the learner's --run-dir (or a metrics.jsonl file)")
    p.add_argument("--out", type=Path, default=None, help="directory for the PNGs (default: RUN_DIR/plots)")
    p.set_defaults(func=cmd_plot)
    p = sub.add_parser("compare", help="overlay several runs' metrics on the same charts")
    p.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    p.add_argument("--labels", nargs="+", default=None, help="one legend label per run (default: directory names)")
    p.add_argument("--out", type=Path, required=True, help="directory for the PNGs")
    p.set_defaults(func=cmd_compare)
