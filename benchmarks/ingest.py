"""How many trajectory groups per second the learner accepts over loopback gRPC.

A real learner (tiny model, no training loop, so only the ingest path is measured) behind its real gRPC server;
client processes lease prompts and stream valid groups (G completions of T tokens with log-probs) back through
SubmitTrajectories. Every group goes through the full path: validation, lease check, re-scoring, storage.

    python benchmarks/ingest.py [--clients 2] [--seconds 10] [--group-size 8] [--tokens 16] [--auth | --metrics]

Ends with `RESULT groups_per_s=... completions_per_s=... mb_per_s=...`. With `--auth` the same load runs against a
plain learner (no tokens, no TLS, no rate limits) and a secured one (a token per client checked on every call,
TLS, per-sampler rate limits on but set high enough not to bind), alternating `--rounds` times, and the RESULT line
gives both medians and the cost. Validation of every field is part of both: it cannot be switched off. With
`--metrics` the load alternates between a learner with neither and one with `--metrics-port` (Prometheus, scraped
every `--scrape-s` seconds by a separate process, 15x Prometheus' default rate) and `--report-to tensorboard`:
`RESULT groups_s_metrics_off=... groups_s_metrics_on=... metrics_cost_pct=...`. No training runs here, so the
TensorBoard writer is open but has nothing to write (it reports per step); the per-group cost is the Prometheus
counters and histograms on the ingest path, and the scrapes.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def client(target: str, seconds: float, group_size: int, tokens: int, vocab: int, batch: int, out,
           token: str = "", tls_ca: bytes | None = None) -> None:
    from heterorl.node.client import ClientSecurity, open_channel
    from heterorl.v1 import learner_pb2 as pb
    from heterorl.v1 import learner_pb2_grpc as pb_grpc

    channel, calls = open_channel(target, ClientSecurity(token=token, tls_ca=tls_ca, tls=tls_ca is not None))
    stub = pb_grpc.LearnerStub(calls)
    sid = stub.Register(pb.RegisterRequest(name="bench", engine="transformers", device="cpu", max_batch=batch)).sampler_id
    rng = random.Random(0)
    completions = [
        pb.Completion(
            token_ids=[rng.randrange(vocab) for _ in range(tokens)],
            logprobs=[-rng.random() * 3 for _ in range(tokens)],
            finish_reason=pb.FINISH_REASON_LENGTH,
        )
        for _ in range(group_size)
    ]
    accepted = sent_bytes = 0
    began = time.time()
    deadline = began + seconds
    while time.time() < deadline:
        leases = stub.LeasePrompts(pb.LeaseRequest(sampler_id=sid, max_groups=batch)).leases
        groups = [
            pb.TrajectoryGroup(sampler_id=sid, lease_id=l.lease_id, policy_version=1, completions=completions)
            for l in leases
        ]
        sent_bytes += sum(g.ByteSize() for g in groups)
        accepted += sum(a.status == pb.ACK_STATUS_ACCEPTED for a in stub.SubmitTrajectories(iter(groups)))
    out.put((accepted, sent_bytes, began, time.time()))
    channel.close()


def scraper(url: str, every_s: float, stop, out) -> None:
    """Fetch the learner's /metrics every `every_s` seconds, as Prometheus would, until `stop` is set."""
    import urllib.request

    scrapes = size = 0
    while not stop.wait(every_s):
        with urllib.request.urlopen(url, timeout=10) as reply:
            size = len(reply.read())
        scrapes += 1
    out.put((scrapes, size))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args, tmp: Path, secured: bool, metrics: bool = False) -> dict:
    """One learner, `args.clients` client processes for `args.seconds`; the accepted groups per second."""
    from heterorl import credentials as auth  # tokens and the throwaway PKI (operator tool)
    from heterorl.common.config import from_flat
    from heterorl.server.config import LearnerConfig
    from heterorl.server.learner import Learner
    from heterorl.server.service import build_server

    run_dir = Path(tempfile.mkdtemp(dir=tmp))
    security: dict = dict(rate_calls_per_s=0, rate_groups_per_s=0)
    client_tokens = [""] * args.clients
    ca = None
    if secured:
        pki = auth.write_pki(tmp / "pki") if not (tmp / "pki" / "ca.pem").exists() else auth.Pki(
            *(tmp / "pki" / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")))
        tokens_file = run_dir / "tokens"
        client_tokens = [auth.append_token(tokens_file, f"bench-{i}") for i in range(args.clients)]
        ca = pki.ca.read_bytes()
        security = dict(tokens_file=tokens_file, tls_cert=pki.server_cert, tls_key=pki.server_key,
                        rate_calls_per_s=1e6, rate_calls_burst=1e6, rate_groups_per_s=1e6, rate_groups_burst=1e6)
    observed = dict(metrics_port=free_port(), report_to=["tensorboard"]) if metrics else {}
    config = from_flat(LearnerConfig,
        port=0, run_dir=run_dir, model="tiny", reward="last_number", group_size=args.group_size,
        max_new_tokens=args.tokens, eval_size=0, max_inflight_groups=10**9, lease_ttl_s=3600, db_sync=args.db_sync,
        **security, **observed,
    )
    learner = Learner(config)
    server, port = build_server(learner, "127.0.0.1", 0)
    server.start()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    scraping = None
    if metrics:
        stop_scraping, scraped = ctx.Event(), ctx.Queue()
        scraping = ctx.Process(target=scraper, args=(f"http://127.0.0.1:{learner.metrics_port}/metrics",
                                                     args.scrape_s, stop_scraping, scraped))
        scraping.start()
    procs = [
        ctx.Process(target=client, args=(f"127.0.0.1:{port}", args.seconds, args.group_size, args.tokens,
                                         learner.vocab_size, args.batch, out, client_tokens[i], ca))
        for i in range(args.clients)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=args.seconds + 120) for _ in procs]
    for p in procs:
        p.join()
    scrapes = (0, 0)
    if scraping is not None:
        stop_scraping.set()
        scrapes = scraped.get(timeout=60)
        scraping.join()
    # Measured over the span in which clients were sending, not their start-up.
    elapsed = max(r[3] for r in results) - min(r[2] for r in results)
    server.stop(0)
    stored = len(learner.pending())
    learner.close()
    accepted = sum(r[0] for r in results)
    assert stored == accepted, f"stored {stored} != acknowledged {accepted}"
    return {"accepted": accepted, "elapsed": elapsed, "groups_per_s": accepted / elapsed,
            "mb_per_s": sum(r[1] for r in results) / 1e6 / elapsed, "scrapes": scrapes[0], "scrape_bytes": scrapes[1]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16, help="groups per lease request and per stream")
    parser.add_argument("--auth", action="store_true", help="plain against secured (tokens, TLS, rate limits)")
    parser.add_argument("--metrics", action="store_true", help="without metrics and reporting against with "
                        "(--metrics-port, scraped every --scrape-s, and --report-to tensorboard)")
    parser.add_argument("--scrape-s", type=float, default=1.0, help="with --metrics: seconds between scrapes")
    parser.add_argument("--rounds", type=int, default=2, help="with --auth or --metrics: alternations of the two "
                        "learners")
    parser.add_argument("--db-sync", choices=("full", "normal"), default="full",
                        help="the learner's run-database commits (see heterorl-learner --db-sync)")
    args = parser.parse_args()

    print(f"clients {args.clients}, G={args.group_size}, {args.tokens} tokens/completion, {args.seconds:.0f}s "
          "of sending per measurement; every acknowledged group stored exactly once")
    if args.auth and args.metrics:
        parser.error("--auth and --metrics are two separate comparisons; give one")
    if args.metrics:
        return compare_metrics(args)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.auth:
            r = measure(args, Path(tmp), secured=False)
            print(f"accepted groups: {r['accepted']} ({r['groups_per_s']:.0f}/s)")
            print(f"RESULT groups_per_s={r['groups_per_s']:.0f} "
                  f"completions_per_s={r['groups_per_s'] * args.group_size:.0f} mb_per_s={r['mb_per_s']:.2f}")
            return 0
        rates: dict[str, list[float]] = {"plain": [], "secured": []}
        for round_ in range(args.rounds):
            for mode in ("plain", "secured") if round_ % 2 == 0 else ("secured", "plain"):
                r = measure(args, Path(tmp), secured=mode == "secured")
                rates[mode].append(r["groups_per_s"])
                print(f"round {round_ + 1} {mode:<8} {r['accepted']:>6} groups  {r['groups_per_s']:7.0f}/s")
    plain, secured = statistics.median(rates["plain"]), statistics.median(rates["secured"])
    print(f"median accepted groups/s: plain {plain:.0f}, secured {secured:.0f} ({secured / plain:.2f}x)")
    print(f"RESULT groups_per_s_plain={plain:.0f} groups_per_s_secured={secured:.0f} "
          f"secured_cost_pct={100 * (1 - secured / plain):.1f}")
    return 0


def compare_metrics(args) -> int:
    """Off and on alternated (off first in odd rounds, on first in even ones), medians of each."""
    rates: dict[str, list[float]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for mode in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
                r = measure(args, Path(tmp), secured=False, metrics=mode == "on")
                rates[mode].append(r["groups_per_s"])
                scrapes = f"  {r['scrapes']} scrapes of {r['scrape_bytes'] / 1024:.0f} KiB" if mode == "on" else ""
                print(f"round {round_ + 1} metrics {mode:<3} {r['accepted']:>6} groups  {r['groups_per_s']:7.0f}/s"
                      f"{scrapes}")
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    print(f"median accepted groups/s: metrics and reporting off {off:.0f}, on {on:.0f} ({on / off:.2f}x)")
    print(f"RESULT groups_s_metrics_off={off:.0f} groups_s_metrics_on={on:.0f} "
          f"metrics_cost_pct={100 * (1 - on / off):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
