"""A math-task run: the learner trains on a small local math set with LaTeX answers, scored by the `math` reward.

The set (tests/math_set.py with `--per-kind 40`: 181 distinct problems, fraction sums, simplification, powers,
roots, percentages, linear equations; a seeded quarter held out, 45 problems) is written to the work directory; nothing is downloaded. One learner and
`--samplers` samplers run as processes on this machine, as `heterorl demo` runs them (samplers niced, vLLM where
installed). The reward is `math` (math-verify; `--reward math,format --reward-weights 1,0.2` adds a \\boxed{} bonus).
The learner evaluates at the start and the end: greedy accuracy and pass@1 over `--eval-samples` samples at the
run's temperature, both scored by the math reward. Run from the repo root:

    python benchmarks/math_task.py [--model smollm2-135m] [--steps 8] [--engine vllm]   # about 35 min here
    python benchmarks/math_task.py --work-dir DIR --report-only   # the report of a finished run, again

Ends with `RESULT start_pass1=... end_pass1=... start_greedy=... end_greedy=... steps=... wall_s=...`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout without installing
sys.path.insert(0, str(REPO / "tests"))

from math_set import write_math_set  # noqa: E402

from heterorl.tools.procs import stop_processes  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="'smollm2-135m', 'tiny' or a local HF directory")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--per-kind", type=int, default=40, help="problems of each of the set's six kinds (before repeats "
                                                             "are dropped); a quarter is held out")
    p.add_argument("--samplers", type=int, default=1)
    p.add_argument("--engine", default=None, help="sampler engine: vllm (default where installed) or transformers")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--groups-per-step", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--reward", default="math")
    p.add_argument("--reward-weights", default="", help="comma-separated weights of --reward's terms (default: 1 each)")
    p.add_argument("--eval-samples", type=int, default=4, help="k of pass@1")
    p.add_argument("--learner-threads", type=int, default=2)
    p.add_argument("--sampler-threads", type=int, default=1)
    p.add_argument("--sampler-nice", type=int, default=10, help="niceness of the samplers (as the demo's)")
    p.add_argument("--timeout-s", type=float, default=3600, help="stop the run after this long (it then summarizes)")
    p.add_argument("--report-only", action="store_true", help="print the report of the finished run in --work-dir")
    p.add_argument("--work-dir", type=Path, default=None, help="keep the run here (default: a temp dir)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.engine is None:
        from heterorl.node.engine_base import default_engine

        args.engine = default_engine()
    if args.report_only:
        if args.work_dir is None or not (args.work_dir / "run" / "summary.json").exists():
            print("--report-only needs --work-dir of a finished run (WORK_DIR/run/summary.json)")
            return 2
        return report(args.work_dir / "run")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="heterorl-math-"))
    work.mkdir(parents=True, exist_ok=True)
    data = write_math_set(work / "math.jsonl", per_kind=args.per_kind)
    run_dir = work / "run"
    py, env = sys.executable, {**os.environ, "PYTHONUNBUFFERED": "1"}
    learner_argv = [
        py, "-m", "heterorl.server.main", "--port", "0", "--run-dir", str(run_dir), "--model", args.model,
        "--task", "dataset", "--task-path", str(data), "--eval-fraction", "0.25", "--reward", args.reward,
        *(["--reward-weights", args.reward_weights] if args.reward_weights else []),
        "--max-steps", str(args.steps), "--eval-every", "0",
        "--eval-size", "1000", "--eval-samples", str(args.eval_samples), "--group-size", str(args.group_size),
        "--groups-per-step", str(args.groups_per_step), "--max-new-tokens", str(args.max_new_tokens),
        "--temperature", str(args.temperature), "--lr", str(args.lr), "--threads", str(args.learner_threads),
    ]
    started = time.time()
    procs = [subprocess.Popen(learner_argv, stdout=open(work / "learner.log", "w"), stderr=subprocess.STDOUT,
                              cwd=REPO, env=env)]
    try:
        while not (run_dir / "learner.json").exists():
            if procs[0].poll() is not None:
                print((work / "learner.log").read_text()[-3000:])
                return 1
            time.sleep(0.5)
        target = f"127.0.0.1:{json.loads((run_dir / 'learner.json').read_text())['port']}"
        for i in range(args.samplers):
            procs.append(subprocess.Popen(
                [py, "-m", "heterorl.node.main", "--learner", target, "--name", f"math-{i + 1}", "--seed", str(i + 1),
                 "--threads", str(args.sampler_threads), "--engine", args.engine],
                stdout=open(work / f"sampler-{i + 1}.log", "w"), stderr=subprocess.STDOUT, cwd=REPO, env=env,
                preexec_fn=(lambda: os.nice(args.sampler_nice)) if args.sampler_nice > 0 else None))
        print(f"learner on {target}, {args.samplers} sampler(s) ({args.engine}); logs in {work}", flush=True)
        try:
            procs[0].wait(timeout=args.timeout_s)
        except subprocess.TimeoutExpired:  # SIGTERM below: the learner finishes what it is doing and summarizes
            print(f"the run took longer than --timeout-s {args.timeout_s:g}; stopping it", flush=True)
    finally:
        stop_processes(reversed(procs), 30)
    print(f"wall time {time.time() - started:.0f} s (the learner's own figure follows)", flush=True)
    if procs[0].returncode != 0 or not (run_dir / "summary.json").exists():
        print(f"the learner failed (code {procs[0].returncode}):\n{(work / 'learner.log').read_text()[-3000:]}")
        return 1
    return report(run_dir)


def report(run_dir: Path) -> int:
    """The evaluations and training rewards of a finished run (settings from its own config.json), and RESULT."""
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    wall = summary["wall_seconds"]
    train = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"]
    print(f"model {config['model']}, {summary['eval_size']} held-out problems, k={summary['eval_samples']}, "
          f"{summary['steps']} steps of {config['groups_per_step']} x {config['group_size']} completions "
          f"(<= {config['max_new_tokens']} tokens), reward {config['reward']} weights "
          f"{config['reward_weights'] or '1 each'}")
    print(f"{'step':>5} {'greedy':>7} {'pass@1':>7}")
    for point in summary["eval"]:
        print(f"{point['step']:>5} {point['accuracy']:>7.3f} {point['pass1']:>7.3f}")
    if train:
        print("train reward mean by step: " + " ".join(f"{r['reward_mean']:.2f}" for r in train))
    first, last = summary["eval"][0], summary["eval"][-1]
    print(f"RESULT start_pass1={first['pass1']:.3f} end_pass1={last['pass1']:.3f} "
          f"start_greedy={first['accuracy']:.3f} end_greedy={last['accuracy']:.3f} steps={summary['steps']} "
          f"k={summary['eval_samples']} n={summary['eval_size']} wall_s={wall:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
