"""The learner's egress per version: 8 samplers fetching from the learner directly against 8 behind 2 relays.

One run, both groups at once: a real learner (`heterorl-learner`), two real relays (`heterorl-relay`), one real
sampler (`heterorl-sampler`, transformers engine) that generates the groups the learner trains on, so versions are
published at the pace of a real run, and 16 download clients in this process, each a real gRPC client following
the newest version the way a sampler does (heartbeat, then one payload from the version it holds to the newest):

- 8 direct clients: `LearnerClient.fetch_weights` against the learner (every chunk checked, as a sampler does);
- 8 relayed clients, 4 per relay: `WeightSources.fetch` (the learner's manifest, then the bytes from their relay,
  every chunk checked against the manifest).

The clients download and verify the payload bytes but load no model (that keeps 16 of them cheap on 2 cores); the
real sampler checks the rebuilt weights. Everything starts on version 1 (each client's first download, an anchor,
is before the window); the driver sampler then runs until `--versions` more versions are published, stops, and
the window closes once every client holds the newest version.

Egress is measured on the learner's side: its `heterorl_weights_served_bytes_total` over the window is split into
what the relays fetched (their `heterorl_relay_fetched_bytes_total`, the only FetchWeights traffic from relays
to the learner), what the driver sampler downloaded (its `heterorl_sampler_download_bytes_total`), and the rest,
which went to the direct clients (cross-checked against the bytes those clients counted themselves). Divided by
the versions published in the window. MB is 10^6 bytes.

    python benchmarks/relay.py                 # tiny model (deltas of ~0.08 MB), about 2 minutes on 2 cores
    python benchmarks/relay.py --model smollm2-135m --versions 5   # ~5 MB deltas (long: real training steps)

Ends with `RESULT egress_direct_mb=... egress_relayed_mb=...` (per version).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from heterorl.node.client import LearnerClient, RetryPolicy  # noqa: E402
from heterorl.node.relay_sources import WeightSources  # noqa: E402
from heterorl.tools.procs import stop_processes  # noqa: E402

MB = 1e6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(port: int, name: str) -> float:
    """The sum of every sample called `name` on the endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == name)


def tail(path: Path, n: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else "(no log)"


class Follower(threading.Thread):
    """A download client that keeps up with the newest version, as a sampler does, without loading a model."""

    def __init__(self, name: str, target: str, relay: str | None, stop: threading.Event):
        super().__init__(name=name, daemon=True)
        self.stop = stop
        self.relay = relay
        self.client = LearnerClient(target, RetryPolicy(initial_s=0.2, max_s=2.0), stop=stop)
        self.sources = WeightSources(self.client, [relay], ban_s=5.0) if relay else None
        self.held = 0
        self.bytes = 0
        self.downloads = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.client.wait_ready()
            sid = self.client.register(self.name, "transformers", "cpu", 1, "bench-relay").sampler_id
            while not self.stop.is_set():
                newest = self.client.heartbeat(sid, self.held).current_version
                if newest <= self.held:
                    self.stop.wait(0.1)
                    continue
                if self.sources is not None:
                    got = self.sources.fetch(sid, have_version=self.held)
                else:
                    got = self.client.fetch_weights(sid, have_version=self.held)
                self.held = got.version
                self.bytes += got.bytes_received
                self.downloads += 1
        except BaseException as err:  # noqa: BLE001 - reported by the main thread
            if not self.stop.is_set():
                self.error = err
        finally:
            self.client.close()
            if self.sources is not None:
                self.sources.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--versions", type=int, default=15, help="versions published inside the measured window")
    parser.add_argument("--clients", type=int, default=8, help="clients in each group (direct, relayed)")
    parser.add_argument("--relays", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--work-dir", default="")
    args = parser.parse_args(argv)

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="heterorl-relay-bench-"))
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HETERORL_CACHE": str(work / "cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("HETERORL_TOKEN", None)
    procs: list[subprocess.Popen] = []

    def start(name: str, module: str, *flags: str) -> subprocess.Popen:
        with open(logs / f"{name}.log", "w") as fh:
            proc = subprocess.Popen([sys.executable, "-m", module, *flags], stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, cwd=REPO)
        procs.append(proc)
        return proc

    stop = threading.Event()
    followers: list[Follower] = []
    try:
        run_dir = work / "run"
        learner_metrics = free_port()
        learner = start("learner", "heterorl.server.main", "--model", args.model, "--host", "127.0.0.1", "--port",
                        "0", "--run-dir", str(run_dir), "--task", "arithmetic", "--reward", "digit_fraction",
                        "--group-size", "4", "--groups-per-step", "2", "--max-new-tokens", "8", "--lr", "1e-3",
                        "--eval-every", "0", "--eval-size", "4", "--threads", "1", "--max-steps", "0",
                        "--keep-versions", "8", "--metrics-port", str(learner_metrics), "--rate-calls-per-s", "0")
        deadline = time.time() + 300
        while not (run_dir / "learner.json").exists():
            if learner.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the learner did not come up:\n{tail(logs / 'learner.log')}")
            time.sleep(0.2)
        target = f"127.0.0.1:{json.loads((run_dir / 'learner.json').read_text())['port']}"
        relays = []
        for i in range(args.relays):
            port, metrics_port = free_port(), free_port()
            start(f"relay{i}", "heterorl.node.relay_main", "--upstream", target, "--host", "127.0.0.1", "--port",
                  str(port), "--metrics-port", str(metrics_port), "--name", f"relay{i}", "--heartbeat-s", "0.5")
            relays.append((f"127.0.0.1:{port}", metrics_port))
        for address, metrics_port in relays:  # serving and scrapeable before any client starts
            channel = grpc.insecure_channel(address)
            grpc.channel_ready_future(channel).result(timeout=120)
            channel.close()
            metric(metrics_port, "heterorl_relay_fetched_bytes_total")
        for i in range(args.clients):
            followers.append(Follower(f"direct{i}", target, None, stop))
            followers.append(Follower(f"relayed{i}", target, relays[i % len(relays)][0], stop))
        for f in followers:
            f.start()

        def all_hold(version: int, timeout: float) -> None:
            limit = time.time() + timeout
            while min(f.held for f in followers) < version:
                broken = [f for f in followers if f.error is not None]
                if broken:
                    raise RuntimeError(f"client {broken[0].name} failed: {broken[0].error!r}")
                if time.time() > limit:
                    raise RuntimeError(f"clients did not reach version {version}: "
                                       f"{sorted((f.name, f.held) for f in followers)}")
                time.sleep(0.1)

        all_hold(1, 120)  # every client has its anchor of version 1: the window opens

        def counters() -> dict[str, float]:
            return {"learner": metric(learner_metrics, "heterorl_weights_served_bytes_total"),
                    "relays": sum(metric(m, "heterorl_relay_fetched_bytes_total") for _, m in relays),
                    "relay_served": sum(metric(m, "heterorl_relay_served_bytes_total") for _, m in relays)}

        driver_metrics = free_port()
        before = counters()
        client_before = {f.name: f.bytes for f in followers}
        started = time.time()
        driver = start("driver", "heterorl.node.main", "--learner", target, "--name", "driver", "--engine",
                       "transformers", "--threads", "1", "--max-batch", "2", "--metrics-port", str(driver_metrics))
        deadline = time.time() + args.timeout
        while True:  # train until --versions more are published
            version = max(f.held for f in followers)
            if version >= 1 + args.versions:
                break
            if driver.poll() is not None or learner.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the run stopped early:\n{tail(logs / 'driver.log')}\n{tail(logs / 'learner.log')}")
            time.sleep(0.2)
        driver_bytes = metric(driver_metrics, "heterorl_sampler_download_bytes_total")
        driver.terminate()
        driver.wait(timeout=60)
        time.sleep(2.0)  # the last steps of groups already submitted
        newest = int(metric(learner_metrics, "heterorl_learner_version"))
        all_hold(newest, 120)
        after = counters()
        seconds = time.time() - started
    finally:
        stop.set()
        for f in followers:
            f.join(timeout=5)
        stop_processes(procs, 20)

    versions = newest - 1
    learner_bytes = after["learner"] - before["learner"]
    relayed = after["relays"] - before["relays"]
    direct = learner_bytes - relayed - driver_bytes
    direct_clients = sum(f.bytes - client_before[f.name] for f in followers if f.relay is None)
    relayed_clients = sum(f.bytes - client_before[f.name] for f in followers if f.relay is not None)
    print(f"model {args.model}: {versions} versions published in {seconds:.0f}s; learner served "
          f"{learner_bytes / MB:.3f} MB in the window (driver sampler {driver_bytes / MB:.3f} MB)")
    print(f"{'group':<10} {'clients':>7} {'learner egress MB':>18} {'per version MB':>15} {'clients got MB':>15}")
    print(f"{'direct':<10} {args.clients:>7} {direct / MB:>18.3f} {direct / versions / MB:>15.4f} "
          f"{direct_clients / MB:>15.3f}")
    print(f"{'relayed':<10} {args.clients:>7} {relayed / MB:>18.3f} {relayed / versions / MB:>15.4f} "
          f"{relayed_clients / MB:>15.3f}")
    print(f"relays served {(after['relay_served'] - before['relay_served']) / MB:.3f} MB to their {args.clients} "
          f"clients; learner egress relayed/direct = {relayed / direct:.3f}")
    print(f"RESULT egress_direct_mb={direct / versions / MB:.4f} egress_relayed_mb={relayed / versions / MB:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
