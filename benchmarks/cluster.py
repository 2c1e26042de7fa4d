"""A learner and three samplers as separate hosts on far, slow links: what a sampler's distance costs.

Every daemon is a real process in a Linux network namespace of its own (heterorl/tools/netns.py). The learner
listens on its namespace's address; each sampler reaches it through a link emulator (heterorl/tools/linkem.py)
running *inside the sampler's namespace* (`python -m heterorl.tools.linkem`, listening on the sampler's loopback,
connecting out over the veth to the learner), so each sampler's traffic, and only its traffic, crosses its own
link, and the emulator's byte counters are exactly that sampler's bytes on the wire. The three links:

    near   5 ms one way, 1 Gbit/s       mid   80 ms, 100 Mbit/s       far   300 ms, 20 Mbit/s

A fourth sampler, `lagger`, sits on a link like `far` with `--lag-versions 10`: it refreshes only once the
learner is 10 versions ahead, so each of its refreshes is one combined delta over ten or more versions (the
learner keeps enough versions for that: `--keep-versions`, default 4, would make it an anchor).

Per sampler the table gives: trained groups, groups per minute, the staleness of its trained groups (p50/p95/max,
from metrics.jsonl "train" records), the time and size of its first (full snapshot) and later (delta) weight
loads (its log's "loaded version N (anchor|delta from vK, X MiB, Ys)", fetch + apply), the time from the learner
publishing a version to the sampler holding it or a newer one ("reach", publish times from metrics.jsonl, load
times from the sampler's log), how many later loads were anchors (its version had been pruned), and the
emulator's bytes down per delta loaded (its anchors subtracted, sized by the probe's anchor below) and up per
group acknowledged. The learner's idle fraction is the
share of the time between its first and last step not spent in training or publishing (train records'
`train_seconds`, the log's "published version N in Xs"; verification forwards count as idle).

Then the catch-up measurement, on a quiet cluster (samplers stopped, learner still serving): a probe client on
its own (300 ms, 20 Mbit/s) link registers and downloads, alternately, the full snapshot of the newest version v
(have nothing) and the combined delta from v-10 to v (one payload, as a sampler that missed 10 versions gets), a
few times each after one warm-up download, timing each stream to its last byte and counting the bytes the
emulator delivered.

    python benchmarks/cluster.py                      # tiny model, both lease policies, ~7 minutes on 2 cores
    python benchmarks/cluster.py --quick              # the short variant tests/test_cluster.py runs (adaptive only)
    python benchmarks/cluster.py --policies uniform   # one phase
    python benchmarks/cluster.py --model smollm2-135m  # ~270 MB anchors: the links matter (long)

Lease policies side by side: the whole main phase runs once per `--policies` entry (default uniform, then
adaptive: heterorl/server/scheduling.py), each with its own learner, samplers and links and the same settings;
the catch-up runs in the last phase only. A table compares them: p95 staleness (link samplers, and all), leases
expired (from the run database), the learner's idle fraction, groups per minute (all, and per sampler), and a
line `RESULT uniform_p95_staleness=... uniform_expired=... uniform_idle_frac=... uniform_groups_min=...
adaptive_...` precedes the last phase's table.

Ends with `RESULT sync_full_s=... sync_delta_s=... idle_frac=... p95_staleness=...`: the probe's median full and
10-version-delta sync times on the 20 Mbit/s link, the learner's idle fraction, and the p95 staleness of the
three link samplers' trained groups. Needs root (network namespaces); prints `SKIP ...` and exits 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# name -> (one-way delay ms, Mbit/s)
LINKS = {"near": (5.0, 1000.0), "mid": (80.0, 100.0), "far": (300.0, 20.0)}
LAGGER_LINK = LINKS["far"]
CLIENT_VERSION = "heterorl-0.1.0"
MAX_MESSAGE_BYTES = 16 << 20

LOADED_RE = re.compile(r"loaded version (\d+) \((anchor|delta from v(\d+)), ([\d.]+) MiB, ([\d.]+)s"
                       r"(?:; held v(\d+) ([\d.]+)s while the learner moved (\d+) versions ahead)?")
REGISTERED_RE = re.compile(r"registered as (\S+) with run")
STOPPED_RE = re.compile(r"stopped: (\d+) groups acknowledged")
PUBLISHED_RE = re.compile(r"published version (\d+) in ([\d.]+)s")
TEXT_TIME_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)[,.](\d{3}) ")
TROUBLE_RE = re.compile(r"unreachable|retrying|DEADLINE|deadline|keepalive|GOAWAY|too_many_pings|RST_STREAM|"
                        r"UNAVAILABLE|Traceback|no longer held|learner refused|quarantined|expired", re.I)


# -- the probe: a minimal weights client, run inside its own namespace ---------------------------------------------
def probe_main(target: str, name: str) -> int:
    """Register, print {"event": "ready", ...}; then per stdin line {"have": A, "want": B} download that payload and
    print {"event": "fetched", ...}; stop at EOF. Uses the wire contract directly (token metadata, FetchWeights)."""
    import grpc

    from heterorl.v1 import learner_pb2 as pb
    from heterorl.v1 import learner_pb2_grpc as pb_grpc

    def emit(obj: dict) -> None:
        print(json.dumps(obj), flush=True)

    metadata = (("authorization", f"Bearer {os.environ['HETERORL_TOKEN']}"),)
    channel = grpc.insecure_channel(target, options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1)])
    grpc.channel_ready_future(channel).result(timeout=60)
    stub = pb_grpc.LearnerStub(channel)
    reply = stub.Register(pb.RegisterRequest(name=name, engine="transformers", device="cpu", max_batch=1,
                                             client_version=CLIENT_VERSION), metadata=metadata, timeout=60)
    emit({"event": "ready", "version": reply.current_version, "sampler_id": reply.sampler_id})
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        request = pb.FetchWeightsRequest(sampler_id=reply.sampler_id, have_version=cmd["have"],
                                         want_version=cmd["want"])
        started = time.perf_counter()
        first = None
        got = 0
        meta = None
        try:
            for chunk in stub.FetchWeights(request, metadata=metadata, timeout=cmd.get("timeout", 900)):
                if first is None:
                    first = time.perf_counter() - started
                    meta = chunk
                got += len(chunk.data)
        except grpc.RpcError as err:
            emit({"event": "error", "code": err.code().name, "details": err.details(),
                  "seconds": time.perf_counter() - started, "bytes": got})
            continue
        emit({"event": "fetched", "seconds": time.perf_counter() - started, "first_byte_s": first, "bytes": got,
              "total_bytes": meta.total_bytes if meta else 0, "version": meta.version if meta else 0,
              "base_version": meta.base_version if meta else 0, "encoding": meta.encoding if meta else ""})
    channel.close()
    return 0


# -- helpers ---------------------------------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; nan when empty."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def fmt(x: float, spec: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def read_log(path: Path) -> list[tuple[float, str]]:
    """(epoch seconds, message) per record of a daemon's log, JSON lines or text lines."""
    out = []
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rec = json.loads(line)
                out.append((datetime.fromisoformat(rec["time"]).timestamp(), str(rec.get("message", ""))))
                continue
            except (ValueError, KeyError):
                pass
        m = TEXT_TIME_RE.match(line)
        if m:
            stamp = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1e3
            out.append((stamp, line[m.end():]))
        elif out:
            out.append((out[-1][0], line))
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return records


def train_steps(run_dir: Path) -> int:
    return sum(1 for r in read_metrics(run_dir) if r.get("kind") == "train")


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


# -- the run -----------------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, dict]:
    """One phase per lease policy (each its own learner, samplers and links, the same settings); the catch-up
    measurement in the last phase only. Reports by policy, in the order run."""
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="heterorl-cluster-"))
    reports = {}
    for i, policy in enumerate(args.policies):
        print(f"cluster: phase {i + 1}/{len(args.policies)}: --lease-policy {policy}", flush=True)
        reports[policy] = run_phase(args, policy, work / policy if len(args.policies) > 1 else work,
                                    catchup_wanted=i == len(args.policies) - 1)
    return reports


def run_phase(args: argparse.Namespace, policy: str, work: Path, catchup_wanted: bool) -> dict:
    from heterorl.tools.linkem import LinkSpec
    from heterorl.tools.netns import Cluster

    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    run_dir = work / "run"
    names = [*LINKS, "lagger", "probe"]
    tokens = {n: secrets.token_urlsafe(24) for n in names}
    tokens_file = work / "tokens"
    tokens_file.write_text("".join(f"{n}:{t}\n" for n, t in tokens.items()))
    tokens_file.chmod(0o600)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("HETERORL_TOKEN", None)
    py = sys.executable
    t0 = time.time()
    print(f"cluster: model {args.model}, G={args.group_size} B={args.groups_per_step}, {args.steps} steps, "
          f"work dir {work}", flush=True)

    with Cluster(workdir=str(work)) as cluster:
        learner_host = cluster.add_host("learner")
        hosts = {n: cluster.add_host(n) for n in names}

        learner_argv = [py, "-m", "heterorl.server.main", "--model", args.model, "--host", learner_host.addr,
                        "--port", "0", "--run-dir", str(run_dir), "--tokens-file", str(tokens_file),
                        "--task", "arithmetic", "--reward", "digit_fraction",
                        "--group-size", str(args.group_size), "--groups-per-step", str(args.groups_per_step),
                        "--max-new-tokens", str(args.max_new_tokens), "--lr", str(args.lr),
                        "--keep-versions", str(args.keep_versions), "--eval-every", "0", "--eval-size",
                        str(args.eval_size), "--threads", str(args.threads), "--max-steps", "0",
                        "--lease-ttl-s", str(args.lease_ttl_s), "--lease-policy", policy, "--log-format", "json"]
        with open(logs / "learner.log", "w") as fh:
            learner = learner_host.popen(learner_argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, cwd=REPO)
        address_file = run_dir / "learner.json"
        deadline = time.time() + args.startup_timeout
        while not address_file.exists():
            if learner.poll() is not None:
                raise RuntimeError(f"the learner exited with {learner.returncode}:\n{tail(logs / 'learner.log')}")
            if time.time() > deadline:
                raise RuntimeError(f"the learner did not come up in {args.startup_timeout}s:\n"
                                   f"{tail(logs / 'learner.log')}")
            time.sleep(0.2)
        port = json.loads(address_file.read_text())["port"]
        upstream = (learner_host.addr, port)
        print(f"cluster: learner at {learner_host.addr}:{port} ({time.time() - t0:.0f}s)", flush=True)

        links, samplers = {}, {}
        for i, name in enumerate([*LINKS, "lagger"]):
            delay, rate = LINKS.get(name, LAGGER_LINK)
            spec = LinkSpec(delay_ms=delay, rate_mbit=rate, seed=i)
            links[name] = hosts[name].emulate_link(upstream, spec, process=True, name=name, stats_interval_s=0.25)
            argv = [py, "-m", "heterorl.node.main", "--learner", links[name].target, "--name", name,
                    "--engine", "transformers", "--threads", "1", "--max-batch", str(args.max_batch),
                    "--seed", str(i + 1), "--cache-dir", str(work / f"cache-{name}"), "--give-up-s", "120",
                    "--log-format", "json"]
            if name == "lagger":
                argv += ["--lag-versions", str(args.lag)]
            with open(logs / f"{name}.log", "w") as fh:
                samplers[name] = hosts[name].popen(
                    argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env={**env, "HETERORL_TOKEN": tokens[name]}, cwd=REPO)

        # -- main phase: train until --steps (and until the lagger has caught up once after lagging)
        deadline = time.time() + args.timeout
        lag_deadline = None
        last_note = 0.0
        while True:
            if learner.poll() is not None:
                raise RuntimeError(f"the learner exited with {learner.returncode}:\n{tail(logs / 'learner.log')}")
            for name, proc in samplers.items():
                if proc.poll() is not None and not getattr(proc, "reported", False):
                    proc.reported = True  # type: ignore[attr-defined]
                    print(f"cluster: WARNING sampler {name} exited with {proc.returncode}:\n"
                          f"{tail(logs / f'{name}.log', 10)}", flush=True)
            steps = train_steps(run_dir)
            lagged = any(m.group(6) for _, msg in read_log(logs / "lagger.log") if (m := LOADED_RE.search(msg)))
            if steps >= args.steps:
                if lagged:
                    break
                lag_deadline = lag_deadline or time.time() + 60
                if time.time() > lag_deadline:
                    print("cluster: WARNING the lagging sampler never refreshed after lagging", flush=True)
                    break
            if time.time() > deadline:
                raise RuntimeError(f"only {steps} of {args.steps} steps in {args.timeout}s; learner:\n"
                                   f"{tail(logs / 'learner.log')}")
            if time.time() - last_note > 15:
                print(f"cluster: step {steps}/{args.steps} ({time.time() - t0:.0f}s)", flush=True)
                last_note = time.time()
            time.sleep(0.5)
        stop_at = time.time()
        print(f"cluster: {train_steps(run_dir)} steps by {stop_at - t0:.0f}s; stopping samplers", flush=True)
        for proc in samplers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in samplers.items():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                print(f"cluster: WARNING sampler {name} did not stop in 60 s after SIGTERM; killed", flush=True)
                proc.kill()
                proc.wait()
        link_stats = {name: link.stop() for name, link in links.items()}
        # Let the learner train what the samplers delivered before they stopped (their groups count too), so the
        # catch-up below runs on a quiet machine: wait until no step for 3 median step intervals (3..180 s).
        times = [r["time"] for r in read_metrics(run_dir) if r.get("kind") == "train"]
        gaps = [b - a for a, b in zip(times, times[1:])]
        quiet = min(180.0, max(3.0, 3 * statistics.median(gaps))) if gaps else 3.0
        count, since = len(times), time.time()
        while time.time() - since < quiet and learner.poll() is None:
            time.sleep(0.25)
            now_count = train_steps(run_dir)
            if now_count != count:
                count, since = now_count, time.time()
        drained_at = time.time()
        print(f"cluster: samplers stopped; learner drained to step {count} ({drained_at - t0:.0f}s)", flush=True)

        catchup: dict = {"full": [], "delta": [], "errors": []}
        if catchup_wanted:
            # -- catch-up: a probe on its own slow link fetches full snapshot vs 10-version combined delta
            probe_spec = LinkSpec(delay_ms=LAGGER_LINK[0], rate_mbit=LAGGER_LINK[1], seed=99)
            emu = hosts["probe"].emulate_link(upstream, probe_spec, name="probe")  # in this process: exact counters
            probe = hosts["probe"].popen([py, str(Path(__file__).resolve()), "--probe", emu.target, "--probe-name",
                                          "probe"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True, env={**env, "HETERORL_TOKEN": tokens["probe"]}, cwd=REPO)
            try:
                ready = json.loads(probe.stdout.readline() or "{}")
                if ready.get("event") != "ready":
                    raise RuntimeError(f"the probe did not register: {ready} {probe.stderr.read()[-2000:]}")
                want = ready["version"]
                have = want - args.lag
                if have < 1:
                    raise RuntimeError(f"only {want} versions published; the catch-up needs more than {args.lag}")
                order = [("warm-up", want - 1)]  # the delta every sampler fetched already: warms the probe's stream path
                for _ in range(args.repeats):
                    order += [("delta", have), ("full", 0)]
                for kind, base in order:
                    before = (emu.bytes_down, emu.bytes_up)
                    probe.stdin.write(json.dumps({"have": base, "want": want}) + "\n")
                    probe.stdin.flush()
                    reply = json.loads(probe.stdout.readline() or "{}")
                    if reply.get("event") != "fetched":
                        catchup["errors"].append(reply)
                        continue
                    time.sleep(0.05)
                    reply["wire_down"] = emu.bytes_down - before[0]
                    reply["wire_up"] = emu.bytes_up - before[1]
                    reply["kind"] = kind
                    catchup.setdefault(kind, []).append(reply)
                    print(f"cluster: catch-up {kind:<5} v{base}->v{want}: {reply['seconds']:.3f}s, "
                          f"{reply['bytes'] / 2**20:.3f} MiB payload ({reply['encoding']} from v{reply['base_version']}), "
                          f"{reply['wire_down'] / 2**20:.3f} MiB on the wire", flush=True)
                catchup.update(version=want, base=have)
            finally:
                try:
                    probe.stdin.close()
                    probe.wait(timeout=20)
                except (subprocess.TimeoutExpired, OSError):
                    probe.kill()
            emu.stop()

        learner.send_signal(signal.SIGTERM)
        try:
            learner.wait(timeout=120)
        except subprocess.TimeoutExpired:
            print("cluster: WARNING the learner did not stop in 120 s after SIGTERM; killed", flush=True)
            learner.kill()
            learner.wait()

    report = analyse(run_dir, logs, link_stats, catchup, stop_at, drained_at, args)
    report["wall_s"] = time.time() - t0
    report["work_dir"] = str(work)
    report["policy"] = policy
    report.update(lease_outcomes(run_dir, report))
    return report


def lease_outcomes(run_dir: Path, report: dict) -> dict:
    """Expired leases (all, and per sampler by name) from the run database, and groups per minute over all
    samplers; read after the learner stopped."""
    import sqlite3

    ids = {r["sampler_id"]: name for name, r in report["rows"].items() if r["sampler_id"]}
    con = sqlite3.connect(f"file:{run_dir / 'run.db'}?mode=ro", uri=True)
    try:
        per = dict(con.execute("SELECT sampler_id, COUNT(*) FROM leases WHERE state IN ('expired', 'released') "
                               "GROUP BY sampler_id").fetchall())
        issued = dict(con.execute("SELECT sampler_id, COUNT(*) FROM leases GROUP BY sampler_id").fetchall())
    finally:
        con.close()
    rows = report["rows"].values()
    return {"leases_expired": sum(per.values()), "leases_issued": sum(issued.values()),
            "expired_by_sampler": {ids.get(sid, sid[:10]): n for sid, n in per.items()},
            "groups_per_min": sum(r["groups_per_min"] for r in rows if not math.isnan(r["groups_per_min"]))}


# -- analysis ----------------------------------------------------------------------------------------------------------
def analyse(run_dir: Path, logs: Path, link_stats: dict, catchup: dict, stop_at: float, drained_at: float,
            args: argparse.Namespace) -> dict:
    """Staleness and trained groups over every step up to `drained_at` (the samplers' last groups included);
    rates and the idle fraction over the steady phase, the steps before the samplers were told to stop."""
    metrics = read_metrics(run_dir)
    all_trains = [r for r in metrics if r.get("kind") == "train" and r["time"] <= drained_at]
    trains = [r for r in all_trains if r["time"] <= stop_at]
    evals = [r for r in metrics if r.get("kind") == "eval"]
    publish_at = {r["version"]: r["time"] for r in trains}
    learner_log = read_log(logs / "learner.log")
    publish_s = {int(m.group(1)): float(m.group(2)) for _, msg in learner_log if (m := PUBLISHED_RE.search(msg))}

    # learner idle fraction between the end of its first wait and its last step
    idle_frac = float("nan")
    if len(trains) >= 2:
        start = trains[0]["time"] - trains[0]["train_seconds"] - publish_s.get(trains[0]["version"], 0.0)
        end = trains[-1]["time"]
        busy = sum(r["train_seconds"] + publish_s.get(r["version"], 0.0) for r in trains)
        busy += sum(r.get("seconds", 0.0) for r in evals if start <= r["time"] <= end)
        idle_frac = max(0.0, 1.0 - busy / (end - start)) if end > start else float("nan")
    window_s = (trains[-1]["time"] - trains[0]["time"]) if len(trains) >= 2 else float("nan")

    per_id_stale: dict[str, list[int]] = {}
    steady_groups: dict[str, int] = {}
    for r in trains:
        for sid in r["samplers"]:
            steady_groups[sid] = steady_groups.get(sid, 0) + 1
    for r in all_trains:
        for sid, st in zip(r["samplers"], r["staleness"]):
            per_id_stale.setdefault(sid, []).append(st)

    rows = {}
    for name in [*LINKS, "lagger"]:
        records = read_log(logs / f"{name}.log")
        sid = next((m.group(1) for _, msg in records if (m := REGISTERED_RE.search(msg))), None)
        acked = next((int(m.group(1)) for _, msg in records if (m := STOPPED_RE.search(msg))), None)
        loads = []
        for stamp, msg in records:
            m = LOADED_RE.search(msg)
            if m:
                loads.append({"t": stamp, "version": int(m.group(1)), "kind": "anchor" if m.group(2) == "anchor"
                              else "delta", "base": int(m.group(3) or 0), "mib": float(m.group(4)),
                              "seconds": float(m.group(5)), "behind": int(m.group(8)) if m.group(8) else None})
        stale = per_id_stale.get(sid, [])
        first, later = (loads[0], loads[1:]) if loads else (None, [])
        deltas = [l for l in later if l["kind"] == "delta"]
        # reach: for each version published after the sampler's first load, until it held that version or newer
        reach = []
        if first is not None:
            for v, at in publish_at.items():
                if at <= first["t"]:
                    continue
                held = next((l["t"] for l in loads if l["version"] >= v and l["t"] >= at - 0.05), None)
                if held is not None:
                    reach.append(max(0.0, held - at))
        stats = link_stats.get(name, {})
        groups_up = acked if acked is not None else len(stale)
        rows[name] = {
            "link": LINKS.get(name, LAGGER_LINK),
            "sampler_id": sid,
            "groups_trained": len(stale),
            "groups_acked": acked,
            "groups_per_min": steady_groups.get(sid, 0) / window_s * 60 if window_s and window_s > 0
            else float("nan"),
            "staleness": stale,
            "stale_p50": pct(stale, 0.5), "stale_p95": pct(stale, 0.95), "stale_max": max(stale) if stale else None,
            "full_s": first["seconds"] if first else float("nan"), "full_mib": first["mib"] if first else float("nan"),
            "delta_s_med": pct([l["seconds"] for l in deltas], 0.5),
            "delta_mib_med": pct([l["mib"] for l in deltas], 0.5),
            "reach_p50": pct(reach, 0.5), "reach_p95": pct(reach, 0.95),
            "loads": len(loads), "later_anchors": sum(1 for l in later if l["kind"] == "anchor"),
            "lagged_loads": [l for l in loads if l["behind"] is not None],
            "wire_down": stats.get("bytes_down"), "wire_up": stats.get("bytes_up"),
            "anchors": sum(1 for l in loads if l["kind"] == "anchor"), "deltas": len(deltas),
            "up_kb_per_group": stats.get("bytes_up", 0) / 1e3 / groups_up if groups_up else float("nan"),
            "connections": stats.get("connections_total"), "connections_cut": stats.get("connections_cut"),
            "trouble": [msg[:240] for _, msg in records if TROUBLE_RE.search(msg)][:8],
        }

    # Bytes down per delta: the link's bytes down less its anchors (each about the probe's exact anchor of the
    # newest version), over the deltas loaded; lease replies, acks and the model files (~3 MB of tokenizer for
    # smollm2-135m, a few kB for tiny) ride along.
    full_bytes = next((r["bytes"] for r in catchup.get("full", [])), None)
    for r in rows.values():
        if full_bytes and r["deltas"] and r["wire_down"] is not None:
            r["down_kb_per_delta"] = max(0.0, r["wire_down"] - r["anchors"] * full_bytes) / 1e3 / r["deltas"]
        else:
            r["down_kb_per_delta"] = float("nan")
    link_stale = [s for name in LINKS for s in rows[name]["staleness"]]
    all_stale = [s for r in all_trains for s in r["staleness"]]
    full = [r["seconds"] for r in catchup.get("full", [])]
    delta = [r["seconds"] for r in catchup.get("delta", [])]
    return {
        "model": args.model, "steps": len(trains), "steps_drained": len(all_trains), "window_s": window_s,
        "idle_frac": idle_frac,
        "p95_staleness": pct(link_stale, 0.95), "p95_staleness_all": pct(all_stale, 0.95),
        "versions_per_min": len(trains) / window_s * 60 if window_s and window_s > 0 else float("nan"),
        "rows": rows, "catchup": catchup,
        "sync_full_s": statistics.median(full) if full else float("nan"),
        "sync_delta_s": statistics.median(delta) if delta else float("nan"),
        "learner_trouble": [msg[:240] for _, msg in learner_log if TROUBLE_RE.search(msg)][:8],
    }


def print_report(rep: dict) -> None:
    print()
    print(f"model {rep['model']}: {rep['steps']} steps in {fmt(rep['window_s'], '.0f')} s "
          f"({fmt(rep['versions_per_min'], '.1f')} versions/min); learner idle {fmt(rep['idle_frac'] * 100, '.0f')}%; "
          f"{rep['steps_drained'] - rep['steps']} more steps on the samplers' last groups (groups and staleness "
          f"below count them)")
    head = (f"{'sampler':<7} {'link':<15} {'groups':>6} {'grp/min':>7} {'stale p50/p95/max':>17} "
            f"{'full s (MiB)':>13} {'delta s (MiB)':>14} {'reach p50/p95 s':>15} {'re-anchors':>10} "
            f"{'down kB/delta':>13} {'up kB/grp':>9}")
    print(head)
    print("-" * len(head))
    for name, r in rep["rows"].items():
        link = f"{r['link'][0]:g}ms {r['link'][1]:g}Mb/s"
        worst = r["stale_max"] if r["stale_max"] is not None else "-"
        stale = f"{fmt(r['stale_p50'], '.0f')}/{fmt(r['stale_p95'], '.1f')}/{worst}"
        print(f"{name:<7} {link:<15} {r['groups_trained']:>6} {fmt(r['groups_per_min'], '.1f'):>7} {stale:>17} "
              f"{fmt(r['full_s'], '.1f') + ' (' + fmt(r['full_mib'], '.1f') + ')':>13} "
              f"{fmt(r['delta_s_med'], '.1f') + ' (' + fmt(r['delta_mib_med'], '.1f') + ')':>14} "
              f"{fmt(r['reach_p50'], '.2f') + '/' + fmt(r['reach_p95'], '.2f'):>15} "
              f"{str(r['later_anchors']) + '/' + str(max(0, r['loads'] - 1)):>10} "
              f"{fmt(r['down_kb_per_delta'], '.1f'):>13} {fmt(r['up_kb_per_group'], '.2f'):>9}")
    lag = rep["rows"].get("lagger", {}).get("lagged_loads", [])
    if lag:
        kinds = ", ".join(f"v{l['base'] or '?'}->v{l['version']} {l['kind']} {l['seconds']:.1f}s {l['mib']:.1f} MiB "
                          f"({l['behind']} behind)" for l in lag[:4])
        print(f"lagger (--lag-versions) refreshes: {kinds}{' ...' if len(lag) > 4 else ''}")
    c = rep["catchup"]
    for kind in ("full", "delta"):
        got = c.get(kind, [])
        if got:
            secs = ", ".join(f"{g['seconds']:.2f}" for g in got) + f" s (best {min(g['seconds'] for g in got):.2f})"
            print(f"catch-up on {LAGGER_LINK[0]:g} ms / {LAGGER_LINK[1]:g} Mbit/s, {kind:<5} "
                  f"(v{c.get('base') if kind == 'delta' else 0}->v{c.get('version')}): {secs}; "
                  f"payload {got[0]['bytes'] / 2**20:.3f} MiB ({got[0]['encoding']}), "
                  f"wire {got[0]['wire_down'] / 2**20:.3f} MiB down; first byte {got[0]['first_byte_s']:.2f} s")
    for err in c.get("errors", []):
        print(f"catch-up ERROR: {err}")
    trouble = {name: r["trouble"] for name, r in rep["rows"].items() if r["trouble"]}
    if rep["learner_trouble"]:
        trouble["learner"] = rep["learner_trouble"]
    for name, lines in trouble.items():
        for line in lines[:3]:
            print(f"log {name}: {line}")
    if "wall_s" in rep:
        print(f"wall time {rep['wall_s']:.0f} s; logs, run dir and emulator stats in {rep['work_dir']}")
    print(f"p95 staleness, all trained groups (lagger included): {fmt(rep['p95_staleness_all'], '.1f')}")
    print(f"RESULT sync_full_s={fmt(rep['sync_full_s'], '.3f')} sync_delta_s={fmt(rep['sync_delta_s'], '.3f')} "
          f"idle_frac={fmt(rep['idle_frac'], '.3f')} p95_staleness={fmt(rep['p95_staleness'], '.1f')}", flush=True)


def print_comparison(reports: dict[str, dict]) -> None:
    """Uniform against adaptive leases on the same links: staleness, expired leases, idle learner, throughput."""
    print()
    print("lease policies side by side (each phase its own learner and samplers, same links and settings):")
    names = [*LINKS, "lagger"]
    head = (f"{'policy':<9} {'steps':>5} {'p95 stale':>9} {'p95 all':>7} {'expired/issued':>14} {'idle':>5} "
            f"{'grp/min':>7}  " + " ".join(f"{n + ' g/min (p95)':>17}" for n in names))
    print(head)
    print("-" * len(head))
    for policy, rep in reports.items():
        cells = " ".join(f"{fmt(rep['rows'][n]['groups_per_min'], '.0f') + ' (' + fmt(rep['rows'][n]['stale_p95'], '.0f') + ')':>17}"
                         for n in names)
        print(f"{policy:<9} {rep['steps']:>5} {fmt(rep['p95_staleness'], '.1f'):>9} {fmt(rep['p95_staleness_all'], '.1f'):>7} "
              f"{str(rep['leases_expired']) + '/' + str(rep['leases_issued']):>14} "
              f"{fmt(rep['idle_frac'] * 100, '.0f') + '%':>5} {fmt(rep['groups_per_min'], '.0f'):>7}  {cells}")
    for policy, rep in reports.items():
        if rep["expired_by_sampler"]:
            print(f"{policy}: expired leases by sampler {rep['expired_by_sampler']}")
    keys = []
    for policy, rep in reports.items():
        keys += [f"{policy}_p95_staleness={fmt(rep['p95_staleness'], '.1f')}", f"{policy}_expired={rep['leases_expired']}",
                 f"{policy}_idle_frac={fmt(rep['idle_frac'], '.3f')}", f"{policy}_groups_min={fmt(rep['groups_per_min'], '.1f')}"]
    print("RESULT " + " ".join(keys), flush=True)
    print()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="tiny | smollm2-135m | a local HF model directory")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of the main phase (default 200; "
                   "--quick 40; other models lag+4, so that the lagging sampler lags once)")
    p.add_argument("--quick", action="store_true", help="a short run (tests/test_cluster.py)")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--groups-per-step", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=4, help="groups each sampler asks for and generates at once "
                   "(4 samplers x 4 > the in-flight window of 3 x B = 12: the policies differ in who gets it)")
    p.add_argument("--policies", default=None, help="lease policies to run, one phase each, side by side "
                   "(default 'uniform,adaptive'; --quick: 'adaptive')")
    p.add_argument("--lr", type=float, default=None, help="default 2e-5 (tiny), 4e-6 (others)")
    p.add_argument("--lag", type=int, default=10, help="versions the lagging sampler and the catch-up probe miss")
    p.add_argument("--keep-versions", type=int, default=None,
                   help="versions the learner holds (default 128 for tiny, lag+6 otherwise)")
    p.add_argument("--repeats", type=int, default=None, help="catch-up downloads of each kind (default 3; "
                   "1 for models other than tiny)")
    p.add_argument("--eval-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="learner torch threads")
    p.add_argument("--lease-ttl-s", type=float, default=120.0)
    p.add_argument("--timeout", type=float, default=None, help="seconds the main phase may take")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--work-dir", default=None, help="keep logs, run dir and caches here (default: a temp dir)")
    p.add_argument("--json", default=None, help="write the full report as JSON here")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe-name", default="probe", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.probe:
        return probe_main(args.probe, args.probe_name)
    from heterorl.tools.netns import netns_available

    ok, why = netns_available()
    if not ok:
        print(f"SKIP cluster benchmark: network namespaces are not available here: {why}", flush=True)
        return 0
    tiny = args.model == "tiny"
    args.policies = (args.policies or ("adaptive" if args.quick else "uniform,adaptive")).split(",")
    if not set(args.policies) <= {"uniform", "adaptive"}:
        print(f"--policies: unknown policy in {args.policies}; choose from uniform, adaptive", flush=True)
        return 2
    if args.steps is None:
        args.steps = 40 if args.quick else (200 if tiny else args.lag + 4)
    if args.lr is None:
        args.lr = 2e-5 if tiny else 4e-6
    if args.keep_versions is None:
        args.keep_versions = 128 if tiny else args.lag + 6
    if args.repeats is None:
        args.repeats = 3 if tiny else 1
    if args.timeout is None:
        args.timeout = 600.0 if tiny else 3600.0
    reports = run(args)
    if len(reports) > 1:
        print_comparison(reports)
    print_report(reports[args.policies[-1]])
    if args.json:
        slim = json.loads(json.dumps(reports, default=str))
        for rep in slim.values():
            for r in rep["rows"].values():
                r.pop("staleness", None)
        Path(args.json).write_text(json.dumps(slim, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
