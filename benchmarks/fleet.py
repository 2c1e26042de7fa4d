"""A fleet of N simulated samplers against a real, training learner: where the serving path waits at N = 1000.

The learner is the real daemon (`python -m heterorl.server.main`, tiny model, B = 32 groups of G = 8 per step,
training the whole time, one token per sampler in its tokens file, run database with full fsync). The samplers load
no model: each is a real gRPC client (grpc.aio, its own channel and TCP connection, its own token) that does what
`heterorl-sampler` does on the wire, in a few worker processes:

    Register -> FetchWeights (anchor) -> loop: LeasePrompts -> "generate" (sleep a heavy-tailed time: log-normal,
    median --gen-median-s, sigma --gen-sigma, at most 20x the median) -> SubmitTrajectories (G completions of
    plausible length: log-normal around a third of --max-new-tokens, token ids and log-probs) -> acks;
    an empty lease reply -> wait 0.5 s (as the real sampler does); Heartbeat every --heartbeat-s.

Samplers lag: 60% refresh whenever the learner is ahead, 30% only once it is 1-4 versions ahead, 10% 8-16 (then
FetchWeights of one combined delta). Each round a sampler disconnects with probability --disconnect (closes its
channel, stays away 1-5 s, comes back on a new connection; half of them register again under a new id, abandoning
their leases, which expire). A LeaseReply's refresh hint is honoured as the real sampler does.

Measured over a window after a warm-up in which the samplers register (spread over the warm-up): accepted groups
per second, p50/p99 of LeasePrompts and of acks (each ack from the start of its SubmitTrajectories call) and of
Heartbeat, as the clients see them; the learner's CPU (cores, from /proc) and RSS (now and peak); steps trained;
bytes of weights served per published version. The clients share the machine with the learner, so their own CPU
(cores) and their event loops' lag (how late a 50 ms timer fires: a floor under every latency they report) are
measured and printed too.

    python benchmarks/fleet.py                                   # N = 10, 100, 1000, 40 s windows (~5 min)
    python benchmarks/fleet.py --samplers 1000 --seconds 60
    python benchmarks/fleet.py --learner-src DIR                 # another source tree's learner (before/after)
    python benchmarks/fleet.py --samplers 1000 --profile OUT.txt  # py-spy stacks of the learner's threads

Ends with `RESULT samplers=... groups_s=... lease_p50_ms=... lease_p99_ms=... ack_p99_ms=... rss_mb=...
learner_cpu=... client_cpu=...` for the largest N.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MAX_MESSAGE_BYTES = 16 << 20
CLIENT_VERSION = "heterorl-0.1.0"


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1), linearly interpolated (numpy's default); nan when empty."""
    return float(np.percentile(values, q * 100)) if values else float("nan")


# ---- the simulated samplers (in worker processes) ------------------------------------------------------------------


class Recorder:
    """Latencies and counts of one worker, kept only inside the measurement window."""

    def __init__(self, window: tuple[float, float]):
        self.window = window
        self.lat: dict[str, list[float]] = {"lease": [], "ack": [], "heartbeat": [], "fetch": [], "register": []}
        self.counts: dict[str, int] = {}
        self.errors: dict[str, int] = {}

    def inside(self, t: float) -> bool:
        return self.window[0] <= t <= self.window[1]

    def add(self, what: str, started: float, seconds: float) -> None:
        if self.inside(started):
            self.lat[what].append(seconds)

    def count(self, what: str, n: int = 1, at: float | None = None) -> None:
        if self.inside(time.time() if at is None else at):
            self.counts[what] = self.counts.get(what, 0) + n

    def error(self, what: str, code: str) -> None:
        key = f"{what}:{code}"
        self.errors[key] = self.errors.get(key, 0) + 1


class SimSampler:
    def __init__(self, index: int, name: str, token: str, target: str, opts: dict, rec: Recorder, stop_at: float):
        self.index, self.name, self.target, self.opts, self.rec, self.stop_at = index, name, target, opts, rec, stop_at
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.rng = random.Random(index)
        draw = self.rng.random()
        self.lag = 0 if draw < 0.6 else (self.rng.randint(1, 4) if draw < 0.9 else self.rng.randint(8, 16))
        self.channel = None
        self.stub = None
        self.sid = ""
        self.version = 0
        self.newest = 0
        self.vocab = 2
        self.group_size = opts["group_size"]

    async def connect(self) -> None:
        import grpc

        from heterorl.v1 import learner_pb2_grpc as pb_grpc

        if self.channel is not None:
            await self.channel.close()
        self.channel = grpc.aio.insecure_channel(self.target, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.use_local_subchannel_pool", 1),  # a connection of its own, as separate hosts would have
            ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_permit_without_calls", 1),
        ])
        self.stub = pb_grpc.LearnerStub(self.channel)

    async def register(self) -> None:
        from heterorl.v1 import learner_pb2 as pb

        started = time.time()
        reply = await self.stub.Register(pb.RegisterRequest(
            name=self.name, engine="vllm", device="sim", max_batch=self.opts["max_batch"],
            client_version=CLIENT_VERSION), metadata=self.metadata, timeout=120)
        self.rec.add("register", started, time.time() - started)
        self.sid, self.vocab, self.newest = reply.sampler_id, reply.run.vocab_size, reply.current_version
        self.version = 0

    async def fetch(self) -> None:
        from heterorl.v1 import learner_pb2 as pb

        started = time.time()
        got = 0
        version = self.version
        async for chunk in self.stub.FetchWeights(pb.FetchWeightsRequest(sampler_id=self.sid,
                                                                         have_version=self.version),
                                                  metadata=self.metadata, timeout=120):
            got += len(chunk.data)
            version = chunk.version
        self.rec.add("fetch", started, time.time() - started)
        self.rec.count("fetch_bytes", got, started)
        self.rec.count("fetches", 1, started)
        self.version = version
        self.newest = max(self.newest, version)

    def groups(self, leases) -> list:
        from heterorl.v1 import learner_pb2 as pb

        rng, opts = self.rng, self.opts
        top = opts["max_new_tokens"]
        out = []
        for lease in leases:
            completions = []
            for _ in range(self.group_size):
                n = max(1, min(top, int(rng.lognormvariate(math.log(max(2, top / 3)), 0.5))))
                completions.append(pb.Completion(
                    token_ids=[rng.randrange(self.vocab) for _ in range(n)],
                    logprobs=[-rng.expovariate(1.5) for _ in range(n)],
                    finish_reason=pb.FINISH_REASON_STOP if n < top else pb.FINISH_REASON_LENGTH))
            out.append(pb.TrajectoryGroup(sampler_id=self.sid, lease_id=lease.lease_id, policy_version=self.version,
                                          completions=completions, generation_seconds=self.gen_s))
        return out

    async def heartbeats(self) -> None:
        import grpc

        from heterorl.v1 import learner_pb2 as pb

        await asyncio.sleep(self.rng.uniform(0, self.opts["heartbeat_s"]))
        while time.time() < self.stop_at:
            if self.stub is not None and self.sid:
                started = time.time()
                try:
                    reply = await self.stub.Heartbeat(pb.HeartbeatRequest(sampler_id=self.sid, version=self.version),
                                                      metadata=self.metadata, timeout=60)
                    self.rec.add("heartbeat", started, time.time() - started)
                    self.newest = max(self.newest, reply.current_version)
                except grpc.aio.AioRpcError as err:
                    self.rec.error("heartbeat", err.code().name)
                except asyncio.CancelledError:
                    raise
                except Exception as err:  # noqa: BLE001 - a closed channel during a reconnect
                    self.rec.error("heartbeat", type(err).__name__)
            await asyncio.sleep(self.opts["heartbeat_s"])

    async def run(self, start_delay: float) -> None:
        import grpc

        from heterorl.v1 import learner_pb2 as pb

        await asyncio.sleep(start_delay)
        opts, rng = self.opts, self.rng
        beat = asyncio.ensure_future(self.heartbeats())
        try:
            await self.connect()
            while time.time() < self.stop_at:
                try:
                    if not self.sid:
                        await self.register()
                    if self.version == 0 or self.newest - self.version > self.lag:
                        await self.fetch()
                    started = time.time()
                    reply = await self.stub.LeasePrompts(pb.LeaseRequest(sampler_id=self.sid,
                                                                         max_groups=opts["max_batch"]),
                                                         metadata=self.metadata, timeout=60)
                    self.rec.add("lease", started, time.time() - started)
                    self.newest = max(self.newest, reply.current_version)
                    if not reply.leases:  # as the real sampler: the learner's retry hint, else 0.5 s
                        self.rec.count("empty_leases", 1, started)
                        wait = min(30.0, reply.retry_after_s) if reply.retry_after_s > 0 else 0.5
                        await asyncio.sleep(wait * rng.uniform(0.8, 1.2))
                        continue
                    self.rec.count("leased", len(reply.leases), started)
                    if reply.refresh_below_version > self.version and not self.lag:
                        self.rec.count("refresh_hints", 1, started)
                        await self.fetch()
                    median = opts["gen_median_s"]
                    self.gen_s = min(20 * median, rng.lognormvariate(math.log(median), opts["gen_sigma"]))
                    await asyncio.sleep(self.gen_s)
                    if rng.random() < opts["disconnect"]:  # gone with its leases (they expire on the learner)
                        self.rec.count("disconnects")
                        await self.channel.close()
                        self.channel = None
                        await asyncio.sleep(rng.uniform(1, 5))
                        await self.connect()
                        if rng.random() < 0.5:
                            self.sid = ""
                        continue
                    groups = self.groups(reply.leases)
                    started = time.time()
                    acked = 0
                    async for ack in self.stub.SubmitTrajectories(iter(groups), metadata=self.metadata, timeout=60):
                        self.rec.add("ack", started, time.time() - started)
                        self.newest = max(self.newest, ack.current_version)
                        acked += ack.status == pb.ACK_STATUS_ACCEPTED
                    self.rec.count("accepted", acked, started)
                except grpc.aio.AioRpcError as err:
                    self.rec.error("call", err.code().name)
                    if err.code() == grpc.StatusCode.NOT_FOUND:
                        self.sid = ""
                    await asyncio.sleep(rng.uniform(0.5, 2))
        finally:
            beat.cancel()
            if self.channel is not None:
                await self.channel.close()


async def fleet_main(slice_: list[tuple[int, str, str]], target: str, opts: dict, window: tuple[float, float],
                     register_over_s: float) -> dict:
    rec = Recorder(window)
    lag: list[float] = []
    stop_at = window[1]

    async def loop_lag() -> None:  # how late a 50 ms timer fires: the clients' own share of every latency
        while time.time() < stop_at:
            t = time.perf_counter()
            await asyncio.sleep(0.05)
            if rec.inside(time.time()):
                lag.append(time.perf_counter() - t - 0.05)

    monitor = asyncio.ensure_future(loop_lag())
    samplers = [SimSampler(i, name, token, target, opts, rec, stop_at) for i, name, token in slice_]
    cpu0 = None

    async def cpu_mark() -> float:
        await asyncio.sleep(max(0.0, window[0] - time.time()))
        return time.process_time()

    mark = asyncio.ensure_future(cpu_mark())
    await asyncio.gather(*(s.run(register_over_s * k / max(1, len(samplers)))
                           for k, s in enumerate(samplers)), return_exceptions=False)
    cpu0 = await mark
    monitor.cancel()
    return {"lat": rec.lat, "counts": rec.counts, "errors": rec.errors, "loop_lag": lag,
            "cpu_s": time.process_time() - cpu0}


def worker(slice_, target, opts, window, register_over_s, out) -> None:
    try:
        out.put(asyncio.run(fleet_main(slice_, target, opts, window, register_over_s)))
    except BaseException as err:  # noqa: BLE001 - the parent reports it
        out.put({"error": repr(err)})


# ---- the learner and one measurement -----------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_mem_mb(pid: int) -> tuple[float, float]:
    status = {k: v for k, _, v in (l.partition(":") for l in Path(f"/proc/{pid}/status").read_text().splitlines())}
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


def train_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("kind") == "train":
                out.append(rec)
    return out


def measure(n: int, args: argparse.Namespace, work: Path) -> dict:
    from heterorl.credentials import generate_token

    run_dir = work / f"run-{n}"
    names = [f"sim-{i}" for i in range(n)]
    tokens = {name: generate_token() for name in names}
    tokens_file = work / f"tokens-{n}"
    tokens_file.write_text("".join(f"{k}:{v}\n" for k, v in tokens.items()))
    tokens_file.chmod(0o600)
    src = Path(args.learner_src).resolve() if args.learner_src else REPO
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(src)}
    argv = [sys.executable, "-m", "heterorl.server.main", "--model", "tiny", "--host", "127.0.0.1", "--port", "0",
            "--run-dir", str(run_dir), "--tokens-file", str(tokens_file), "--task", "arithmetic",
            "--reward", "digit_fraction", "--group-size", str(args.group_size), "--groups-per-step",
            str(args.groups_per_step), "--max-new-tokens", str(args.max_new_tokens), "--eval-size", "0",
            "--eval-every", "0", "--verify-fraction", "0", "--verify-first", "0", "--keep-versions", "16",
            "--lease-ttl-s", "60", "--threads", str(args.threads), "--log-level", "warning", *args.learner_arg]
    log_path = work / f"learner-{n}.log"
    with open(log_path, "w") as fh:
        learner = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                   cwd=work)
    try:
        address = run_dir / "learner.json"
        deadline = time.time() + 300
        while not address.exists():
            if learner.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"learner did not come up:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        target = f"127.0.0.1:{json.loads(address.read_text())['port']}"
        workers = max(1, min(args.workers, n))
        warmup = args.warmup if args.warmup is not None else max(10.0, n / 50)
        begin = time.time() + 2.0
        window = (begin + warmup, begin + warmup + args.seconds)
        opts = {"group_size": args.group_size, "max_new_tokens": args.max_new_tokens, "max_batch": args.max_batch,
                "gen_median_s": args.gen_median_s, "gen_sigma": args.gen_sigma, "disconnect": args.disconnect,
                "heartbeat_s": args.heartbeat_s}
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        entries = [(i, name, tokens[name]) for i, name in enumerate(names)]
        procs = [ctx.Process(target=worker, args=(entries[w::workers], target, opts, window, warmup * 0.6, out))
                 for w in range(workers)]
        for p in procs:
            p.start()
        while time.time() < window[0]:
            time.sleep(0.05)
        cpu0, steps0 = proc_cpu_s(learner.pid), len(train_records(run_dir))
        profile = None
        if args.profile and n == max(args.samplers):  # sampled stacks of every learner thread, idle ones included
            spy = subprocess.run(["py-spy", "record", "--pid", str(learner.pid), "--duration",
                                  str(int(args.seconds * 0.8)), *args.profile_mode.split(), "--threads", "--nonblocking", "--rate",
                                  "50", "--format", "raw", "--output", args.profile], capture_output=True, text=True,
                                 timeout=args.seconds * 3)
            profile = args.profile if spy.returncode == 0 else f"py-spy failed: {spy.stderr[-500:]}"
        while time.time() < window[1]:
            time.sleep(0.05)
        cpu1 = proc_cpu_s(learner.pid)
        rss, peak = proc_mem_mb(learner.pid)
        trains = [r for r in train_records(run_dir) if window[0] <= r["time"] <= window[1]]
        results = [out.get(timeout=300) for _ in procs]
        for p in procs:
            p.join(timeout=60)
    finally:
        learner.send_signal(signal.SIGTERM)
        try:
            learner.wait(timeout=120)
        except subprocess.TimeoutExpired:
            learner.kill()
            learner.wait()
    failed = [r["error"] for r in results if "error" in r]
    if failed:
        raise RuntimeError(f"a client worker failed: {failed[0]}")
    lat = {k: [x for r in results for x in r["lat"][k]] for k in results[0]["lat"]}
    counts: dict[str, int] = {}
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["counts"].items():
            counts[k] = counts.get(k, 0) + v
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    seconds = window[1] - window[0]
    versions = len(trains)
    loop_lag = [x for r in results for x in r["loop_lag"]]
    report = {
        "samplers": n, "seconds": seconds, "steps": len(trains),
        "groups_s": counts.get("accepted", 0) / seconds,
        "trained_groups_s": sum(r["groups"] for r in trains) / seconds,
        "staleness_mean": (sum(sum(r["staleness"]) for r in trains) / max(1, sum(len(r["staleness"]) for r in trains))),
        "learner_cpu": (cpu1 - cpu0) / seconds, "rss_mb": rss, "peak_rss_mb": peak,
        "client_cpu": sum(r["cpu_s"] for r in results) / seconds, "client_workers": workers,
        "loop_lag_p50_ms": pct(loop_lag, 0.5) * 1e3, "loop_lag_p99_ms": pct(loop_lag, 0.99) * 1e3,
        "bytes_per_version": counts.get("fetch_bytes", 0) / versions if versions else float("nan"),
        "counts": counts, "errors": errors, "profile": profile,
    }
    for what, values in lat.items():
        report[f"{what}_n"] = len(values)
        report[f"{what}_p50_ms"] = pct(values, 0.5) * 1e3
        report[f"{what}_p99_ms"] = pct(values, 0.99) * 1e3
    return report


def fmt(x, spec=".1f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_table(reports: list[dict]) -> None:
    head = (f"{'N':>5} {'groups/s':>8} {'steps':>5} {'lease p50/p99 ms':>17} {'ack p50/p99 ms':>16} "
            f"{'hb p99 ms':>9} {'learner cpu':>11} {'rss MB (peak)':>13} {'KB/version':>10} {'client cpu':>10} "
            f"{'loop lag p99':>12}")
    print(head)
    print("-" * len(head))
    for r in reports:
        print(f"{r['samplers']:>5} {fmt(r['groups_s']):>8} {r['steps']:>5} "
              f"{fmt(r['lease_p50_ms']) + '/' + fmt(r['lease_p99_ms']):>17} "
              f"{fmt(r['ack_p50_ms']) + '/' + fmt(r['ack_p99_ms']):>16} {fmt(r['heartbeat_p99_ms']):>9} "
              f"{fmt(r['learner_cpu'], '.2f'):>11} {fmt(r['rss_mb'], '.0f') + ' (' + fmt(r['peak_rss_mb'], '.0f') + ')':>13} "
              f"{fmt(r['bytes_per_version'] / 1e3, '.0f'):>10} {fmt(r['client_cpu'], '.2f'):>10} "
              f"{fmt(r['loop_lag_p99_ms']) + ' ms':>12}")
    for r in reports:
        print(f"N={r['samplers']}: calls lease {r['lease_n']} ack {r['ack_n']} heartbeat {r['heartbeat_n']} "
              f"fetch {r['fetch_n']}; counts {r['counts']}; errors {r['errors'] or 'none'}; "
              f"trained {fmt(r['trained_groups_s'])} groups/s, mean staleness {fmt(r['staleness_mean'], '.2f')}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samplers", type=lambda s: [int(x) for x in s.split(",")], default=[10, 100, 1000])
    p.add_argument("--seconds", type=float, default=40.0, help="measurement window per N")
    p.add_argument("--warmup", type=float, default=None, help="seconds before the window (default max(10, N/50))")
    p.add_argument("--workers", type=int, default=2, help="client processes")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--groups-per-step", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=4, help="groups each simulated sampler asks for")
    p.add_argument("--gen-median-s", type=float, default=4.0)
    p.add_argument("--gen-sigma", type=float, default=1.0)
    p.add_argument("--disconnect", type=float, default=0.02, help="chance per round of dropping the connection")
    p.add_argument("--heartbeat-s", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=1, help="learner torch threads")
    p.add_argument("--learner-arg", action="append", default=[], help="extra learner flag (repeat; e.g. "
                   "--learner-arg=--lease-policy --learner-arg=uniform)")
    p.add_argument("--learner-src", default=None, help="run the learner from this source tree (before/after)")
    p.add_argument("--profile", default=None, help="py-spy record of the learner's threads (collapsed stacks, "
                   "idle included) over the largest N's window, written to this file")
    p.add_argument("--profile-mode", default="--idle", help="py-spy sampling: '--idle' (every thread, waiting "
                   "ones too) or '--gil' (only the thread holding the GIL)")
    p.add_argument("--json", default=None)
    p.add_argument("--work-dir", default=None)
    args = p.parse_args(argv)
    if args.profile and not shutil.which("py-spy"):
        p.error("--profile needs py-spy on PATH (pip install py-spy)")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="heterorl-fleet-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"fleet: learner from {args.learner_src or REPO}, tiny model, B={args.groups_per_step} G={args.group_size}, "
          f"{args.max_new_tokens} max new tokens; generation log-normal median {args.gen_median_s}s sigma "
          f"{args.gen_sigma}; {args.workers} client processes; {args.seconds:.0f}s windows; work dir {work}",
          flush=True)
    reports = []
    for n in args.samplers:
        started = time.time()
        r = measure(n, args, work)
        reports.append(r)
        print(f"fleet: N={n} done in {time.time() - started:.0f}s: {fmt(r['groups_s'])} groups/s, lease p99 "
              f"{fmt(r['lease_p99_ms'])} ms, ack p99 {fmt(r['ack_p99_ms'])} ms", flush=True)
        if r["profile"]:
            print(f"fleet: learner profile (py-spy raw, collapsed stacks per thread): {r['profile']}", flush=True)
    print()
    print_table(reports)
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=1, default=str))
    big = reports[-1]
    print(f"RESULT samplers={big['samplers']} groups_s={fmt(big['groups_s'])} lease_p50_ms={fmt(big['lease_p50_ms'])} "
          f"lease_p99_ms={fmt(big['lease_p99_ms'])} ack_p99_ms={fmt(big['ack_p99_ms'])} rss_mb={fmt(big['rss_mb'], '.0f')} "
          f"learner_cpu={fmt(big['learner_cpu'], '.2f')} client_cpu={fmt(big['client_cpu'], '.2f')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
