"""`heterorl`: the demo (a learner and samplers on this machine), `status` of a running learner, and operator
helpers (`new-token`, `pki`: heterorl/credentials.py; `prepare-model`)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc


def fetch_status(target: str, timeout: float = 5.0, security=None):
    """The learner's StatusReply; `security` (a ClientSecurity) when it wants a token or TLS."""
    from heterorl.node.client import ClientSecurity, open_channel
    from heterorl.v1 import learner_pb2 as pb
    from heterorl.v1 import learner_pb2_grpc as pb_grpc

    channel, calls = open_channel(target, security or ClientSecurity())
    with channel:
        return pb_grpc.LearnerStub(calls).Status(pb.StatusRequest(), timeout=timeout)


def _reasons(counts) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def format_status(s) -> str:
    acc = f"{s.last_eval_accuracy:.3f}" if s.last_eval_accuracy >= 0 else "-"
    lines = [
        f"run {s.run_id}  task {s.task}  loss {s.loss}  up {s.uptime_s:.0f}s",
        f"version {s.version}  step {s.step}  held-out accuracy {acc}  last reward {s.last_reward_mean:.3f}",
        f"groups: {s.groups_trained} trained, {s.groups_pending} pending, {s.leases_outstanding} leased out, "
        f"{s.leases_expired} leases expired, {s.groups_dropped_stale} dropped as stale, "
        f"{s.groups_refused_reward} refused (reward function failed)",
        f"sampler rewards that disagreed with the learner's: {s.reward_disagreements}",
        f"samplers ({sum(x.alive for x in s.samplers)} alive of {len(s.samplers)}):",
    ]
    header = f"  {'id':<20} {'name':<24} {'engine':<12} {'version':>7} {'leased':>7} {'accepted':>8} {'refused':>7}  seen"
    lines.append(header)
    for x in s.samplers:
        lines.append(
            f"  {x.sampler_id:<20} {x.name[:24]:<24} {x.engine:<12} {x.version:>7} {x.groups_leased:>7} "
            f"{x.groups_accepted:>8} {x.groups_rejected:>7}  {x.last_seen_s_ago:.0f}s ago"
            + ("" if x.alive else " (gone)")
            + (" QUARANTINED" if x.quarantined else "")
        )
        if x.logprob_checked:
            lines.append(f"  {'':<20} log-probs checked in {x.logprob_checked} groups: {x.logprob_mismatched} "
                         f"mismatched, mean |diff| {x.logprob_mean_diff:.2g} nats/token")
        if x.reward_disagreements:
            lines.append(f"  {'':<20} rewards that disagreed with the learner's: {x.reward_disagreements}")
        if x.rejections:
            lines.append(f"  {'':<20} refused: {_reasons(x.rejections)}")
    if s.security:
        lines.append(f"security: {s.security}")
    if s.rejections:
        lines.append(f"refused requests by reason (all callers): {_reasons(s.rejections)}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    from heterorl.common import config as config_lib
    from heterorl.node.client import ClientSecurity
    from heterorl.node.config import ClientSecuritySection

    try:
        security = ClientSecurity.from_config(config_lib.build(ClientSecuritySection, flags=args))
    except ValueError as err:
        print(f"heterorl status: {err}", file=sys.stderr)
        return 2
    if args.watch:  # a live table (heterorl/tools/watch.py)
        from heterorl.tools.watch import watch

        return watch(args.learner, args.interval, lambda: fetch_status(args.learner, security=security))
    try:
        s = fetch_status(args.learner, security=security)
    except grpc.RpcError as err:
        from heterorl.common.hints import learner_call_failed

        print(f"heterorl status: {learner_call_failed(args.learner, err)}", file=sys.stderr)
        return 2
    if args.json:
        from google.protobuf.json_format import MessageToDict

        print(json.dumps(MessageToDict(s, always_print_fields_with_no_presence=True), indent=2))
    else:
        print(format_status(s))
    return 0


def cmd_prepare_model(args: argparse.Namespace) -> int:
    from heterorl.common.model import resolve_model

    path = resolve_model(args.model)
    print(f"model ready: {path}")
    return 0


# ---- demo -----------------------------------------------------------------------------------------------------


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _spawn(name: str, argv: list[str], log_path: Path, nice: int = 0) -> Child:
    """Start one daemon with its output in `log_path`; `nice` > 0 lowers its CPU priority (all its threads)."""
    log = open(log_path, "w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    lower = (lambda: os.nice(nice)) if nice > 0 else None
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            preexec_fn=lower)
    return Child(name, proc, log_path)


def _stop(children: list[Child], grace: float = 15.0) -> None:
    from heterorl.tools.procs import stop_processes

    stop_processes([c.proc for c in children], grace)


def _progress_line(s, steps: int, elapsed: float) -> str:
    acc = f"{s.last_eval_accuracy:.2f}" if s.last_eval_accuracy >= 0 else "--"
    alive = sum(x.alive for x in s.samplers)
    reward = f"{s.last_reward_mean:.2f}" if s.last_reward_mean == s.last_reward_mean else "--"
    return (
        f"step {s.step:>3}/{steps} | version {s.version:>3} | reward {reward} | held-out {acc} | "
        f"groups {s.groups_trained} trained, {s.groups_pending} pending, {s.leases_outstanding} out | "
        f"samplers {alive}/{len(s.samplers)} | {elapsed / 60:4.1f} min"
    )


def cmd_demo(args: argparse.Namespace) -> int:
    started = time.time()
    run_dir = args.run_dir or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"heterorl demo: 1 learner + {args.samplers} samplers on this machine, model {args.model}, "
          f"{args.steps} steps; logs and results in {run_dir}/", flush=True)
    from heterorl.common.model import resolve_model

    resolve_model(args.model)  # convert/cache the model once, before the processes race to do it
    engine = args.sampler_engine
    log_flags = ["--log-level", args.log_level, "--log-format", args.log_format]
    py = sys.executable
    learner_argv = [
        py, "-m", "heterorl.server.main", "--host", "127.0.0.1", "--port", "0", "--run-dir", str(run_dir),
        "--model", args.model, "--max-steps", str(args.steps), "--eval-every", str(args.eval_every),
        "--eval-size", str(args.eval_size), "--threads", str(args.learner_threads), "--seed", str(args.seed),
        *log_flags, *args.learner_args,
    ]
    children = [_spawn("learner", learner_argv, run_dir / "learner.log")]
    tty = sys.stdout.isatty()
    try:
        address_file = run_dir / "learner.json"
        print("starting the learner (loading the model, publishing version 1) ...", flush=True)
        while not address_file.exists():
            if children[0].proc.poll() is not None:
                print(f"the learner exited early (code {children[0].proc.returncode}):\n{children[0].tail()}")
                return 1
            time.sleep(0.5)
        port = json.loads(address_file.read_text())["port"]
        target = f"127.0.0.1:{port}"
        for i in range(args.samplers):
            sampler_argv = [
                py, "-m", "heterorl.node.main", "--learner", target, "--name", f"demo-sampler-{i + 1}",
                "--seed", str(args.seed * 1000 + i + 1), "--threads", str(args.sampler_threads),
                "--max-batch", str(args.sampler_batch), "--engine", engine, *log_flags,
            ]
            children.append(_spawn(f"sampler-{i + 1}", sampler_argv, run_dir / f"sampler-{i + 1}.log",
                                   nice=args.sampler_nice))
        print(f"learner on {target}; {args.samplers} samplers started ({engine} engine). `heterorl status --learner {target}` "
              "shows the same from another shell.", flush=True)
        last_printed, last_step = 0.0, -1
        while children[0].proc.poll() is None:
            for c in children[1:]:
                if c.proc.poll() is not None and c.proc.returncode not in (0, -signal.SIGTERM):
                    print(f"\n{c.name} exited with code {c.proc.returncode}:\n{c.tail()}")
                    return 1
            try:
                s = fetch_status(target, timeout=5)
            except grpc.RpcError:
                time.sleep(1)
                continue
            line = _progress_line(s, args.steps, time.time() - started)
            if tty:
                print("\r" + line.ljust(150), end="", flush=True)
            elif s.step != last_step or time.time() - last_printed > 30:
                print(line, flush=True)
                last_printed, last_step = time.time(), s.step
            time.sleep(1.0)
        if tty:
            print()
        code = children[0].proc.returncode
        summary_path = run_dir / "summary.json"
        if code != 0 or not summary_path.exists():
            print(f"the learner failed (code {code}):\n{children[0].tail()}")
            return 1
    except KeyboardInterrupt:
        print("\ninterrupted; stopping the learner and samplers")
        return 130
    finally:
        _stop(children)
    summary = json.loads(summary_path.read_text())
    print(format_summary(summary, time.time() - started, run_dir))
    return 0


def format_summary(s: dict, wall: float, run_dir: Path) -> str:
    gain = s["final_accuracy"] - s["base_accuracy"]
    curve = ", ".join(f"{e['step']}: {e['accuracy']:.2f}" for e in s["eval"])
    return "\n".join(
        [
            "",
            "=== what was learned " + "=" * 60,
            f"held-out accuracy ({s['eval_size']} problems, greedy): {s['base_accuracy']:.3f} before -> "
            f"{s['final_accuracy']:.3f} after {s['steps']} steps ({gain:+.3f})",
            f"accuracy by step: {curve}",
            f"versions published: {s['versions_published']}   groups accepted: {s['groups_accepted']}, "
            f"trained: {s['groups_trained']}, left pending: {s['groups_pending']}, dropped as stale: "
            f"{s['groups_dropped_stale']}, leases expired: {s['leases_expired']}",
            f"staleness of trained groups (versions behind): mean {s['staleness_mean']:.2f}, max {s['staleness_max']}",
            f"time: {wall / 60:.1f} min in all, {s['wall_seconds'] / 60:.1f} min of training",
            f"metrics: {s['metrics']}   checkpoint: {s['checkpoint']}   logs: {run_dir}/*.log",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    from heterorl import credentials
    from heterorl.common import config as config_lib
    from heterorl.common.logs import FORMATS, LEVELS
    from heterorl.node.config import ClientSecuritySection
    from heterorl.common.contract import ENGINES
    from heterorl.node.engine_base import default_engine

    parser = argparse.ArgumentParser(prog="heterorl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("status", help="print a learner's version, step and samplers")
    p.add_argument("--learner", default="127.0.0.1:50051", help="HOST:PORT of the learner")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--watch", action="store_true", help="a live table redrawn every --interval seconds, like top "
                   "(Ctrl-C ends it)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between redraws of --watch (default: 2)")
    config_lib.add_flags(p, ClientSecuritySection)  # the sampler's own security flags
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("demo", help="train the default model with a local learner and samplers")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--samplers", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-size", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--learner-threads", type=int, default=2)
    p.add_argument("--sampler-threads", type=int, default=1)
    p.add_argument("--sampler-batch", type=int, default=2, help="prompt groups per sampler batch")
    p.add_argument("--sampler-engine", default=default_engine(), choices=ENGINES,
                   help=f"samplers' generation engine (default here: {default_engine()}; vllm wherever it is installed)")
    # On one machine the samplers share the learner's cores. The learner's step is the demo's bottleneck, and
    # samplers that keep generating while enough groups wait slow it down; lowered, they use the idle cycles.
    p.add_argument("--sampler-nice", type=int, default=10, help="CPU niceness of the sampler processes (0 = as the "
                   "learner; default 10: on shared cores the learner's step goes first)")
    p.add_argument("--run-dir", type=Path, default=None)
    p.add_argument("--log-level", default="info", choices=LEVELS, help="log level of the learner and samplers")
    p.add_argument("--log-format", default="text", choices=FORMATS,
                   help="their log files: readable lines or one JSON object per line")
    p.add_argument("learner_args", nargs="*", help="extra heterorl-learner flags after -- (--config FILE.toml too)")
    p.set_defaults(func=cmd_demo)

    credentials.add_commands(sub)  # new-token, pki

    from heterorl.tools import export as export_tool, plots

    plots.add_commands(sub)  # plot, compare: heterorl/tools/plots.py
    export_tool.add_commands(sub)  # export: heterorl/tools/export.py
    from heterorl.tools import health

    health.add_commands(sub)  # health: container health checks, heterorl/tools/health.py

    p = sub.add_parser("prepare-model", help="convert and cache a model (the default: SmolLM2-135M-Instruct)")
    p.add_argument("--model", default="smollm2-135m")
    p.set_defaults(func=cmd_prepare_model)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
