"""Faults injected into real processes, and whether heterorl survives each with its books exact.

Four kinds, each run many times with a seeded schedule:

- sampler kill -9: samplers (real `heterorl-sampler` processes) killed while they hold undelivered leases;
  their leases must expire and be leased again, nothing trained twice (tests/test_faults.py `run_sampler_kills`);
- learner kill -9 + `--resume`: at a random point of training, while a checkpoint is being written, or in the
  middle of a weight download; zero acknowledged groups lost (a recording sampler keeps the books), zero
  trained twice (database and metrics.jsonl), resumed weights bit-identical to the checkpoint
  (tests/test_faults.py `run_learner_kills`);
- cut weight download: a TCP proxy cuts the connection (FIN or RST) at a random byte of a download, which must
  resume and rebuild the exact weights (the proxy of tests/test_transfer.py);
- corrupted chunk: one byte of one chunk flipped on the wire; the client must detect and refetch it
  (the interceptor of tests/test_transfer.py).

    python benchmarks/faults.py [--sampler-kills 4] [--learner-kills 4] [--cuts 6] [--corrupt 3] [--seed 0]

Prints one row per fault and ends with
`RESULT faults=... survived=... groups_lost=... groups_double=... recovery_s=... first_ack_s=... resync_bytes=...`
where recovery_s is the median time from a learner's kill -9 to its resumed successor serving, first_ack_s the
median time to the first group acknowledged after it, and resync_bytes the median bytes a sampler downloaded to
resync with the resumed learner.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
import traceback
from concurrent import futures
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the fault tests' helpers import their conftest as a module

LEARNER_MODES = ("random", "checkpoint", "stream")


def row(kind: str, n: int, ok: bool, detail: str) -> None:
    print(f"{kind:<22} {n:>3}  {'survived' if ok else 'FAILED':<9} {detail}", flush=True)


def sampler_kills(processes, work: Path, count: int, seed: int) -> dict:
    from test_faults import run_sampler_kills

    started = time.time()
    try:
        out = run_sampler_kills(processes, work / "sampler-kills", count=count, seed=seed)
    except AssertionError as err:
        row("sampler kill -9", 0, False, f"{err}".splitlines()[0][:200])
        return {"faults": count, "survived": 0, "lost": 0, "double": 0}
    for i, lived in enumerate(out["lived"]):
        row("sampler kill -9", i + 1, True, f"killed {lived:.2f}s after its first weights, holding leases")
    books = out["books"]
    print(f"{'':<22}      -> {out['expired']} leases expired and leased again; {books['trained']} groups trained, "
          f"{books['lost']} lost, {books['double']} twice ({time.time() - started:.0f}s)", flush=True)
    return {"faults": count, "survived": count, "lost": books["lost"], "double": books["double"]}


def learner_kills(processes, work: Path, model_dir: Path, count: int, seed: int) -> dict:
    from test_faults import run_learner_kills

    modes = [LEARNER_MODES[i % len(LEARNER_MODES)] for i in range(count)]
    seen: list[dict] = []

    def report(r: dict) -> None:
        seen.append(r)
        where = {"random": "during training", "checkpoint": f"in checkpoint write ({r['seen']})",
                 "stream": f"in weight stream ({r['seen']})"}[r["mode"]]
        row("learner kill -9", len(seen), True,
            f"{where} after step {r['step']}: resumed from step {r['checkpoint_step']}, {r['retrained']} groups to "
            f"train again, {r['pending']} pending; serving after {r['serving_s']:.1f}s, first ack {r['first_ack_s']:.1f}s; "
            f"sampler resync {r['resync']} {r['resync_bytes']} B; weights bit-identical {r['exact']}")

    started = time.time()
    try:
        out = run_learner_kills(processes, work / "learner-kills", model_dir, modes, seed, report=report)
    except AssertionError as err:
        # The books were not proven: none of these faults counts as survived.
        row("learner kill -9", len(seen) + 1, False, f"{err}".splitlines()[0][:300])
        return {"faults": count, "survived": 0, "lost": 0, "double": 0, "kills": seen}
    books = out["books"]
    print(f"{'':<22}      -> {out['acked']} groups acknowledged to the recording sampler ({out['duplicates']} "
          f"resends acknowledged as duplicates); {books['trained']} trained, {books['lost']} lost, {books['double']} "
          f"twice; final resume: fp32 weights bit-identical to the checkpoint ({time.time() - started:.0f}s)", flush=True)
    return {"faults": count, "survived": count, "lost": books["lost"], "double": books["double"], "kills": seen}


def transfer_faults(cache: Path, work: Path, cuts: int, corrupt: int, seed: int) -> dict:
    """Cut and corrupted downloads against a learner serving a model wide enough for ~75 chunks per anchor."""
    import grpc
    import torch
    from test_transfer import (
        CHUNK,
        FAST_RETRY,
        ChunkTamper,
        CuttingProxy,
        FlipOnce,
        _optimizer_like_step,
        _wide_model_dir,
    )

    from heterorl.common import codec
    from heterorl.common.config import from_flat
    from heterorl.common.model import resolve_model
    from heterorl.node.client import LearnerClient
    from heterorl.server.config import LearnerConfig
    from heterorl.server.learner import Learner
    from heterorl.common.contract import MAX_MESSAGE_BYTES
    from heterorl.server.service import LearnerService
    from heterorl.v1 import learner_pb2_grpc as pb_grpc

    rng = random.Random(seed)
    model_dir = _wide_model_dir(resolve_model("tiny", cache=cache), work / "wide-model")
    learner = Learner(from_flat(LearnerConfig, port=0, run_dir=work / "transfer-run", model=str(model_dir),
                                reward="digit_fraction", group_size=2, groups_per_step=1, max_new_tokens=4,
                                eval_size=0, chunk_bytes=CHUNK, keep_versions=4))
    published = {1: learner.trainer.snapshot()}
    generator = torch.Generator().manual_seed(seed)
    for _ in range(2):
        _optimizer_like_step(learner.trainer.model, generator, density=0.05)
        learner.publish()
        published[learner.version] = learner.trainer.snapshot()
    tamper = ChunkTamper()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=[tamper],
                         options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                  ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.so_reuseport", 0)])
    pb_grpc.add_LearnerServicer_to_server(LearnerService(learner), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    survived = 0

    def exact(got) -> bool:
        start = published[got.base_version] if got.base_version else published[1]
        tensors = {k: (v.clone() if got.base_version else torch.zeros_like(v)) for k, v in start.items()}
        codec.apply_(memoryview(got.payload), tensors)
        return all(torch.equal(tensors[k].view(torch.int16), t.view(torch.int16))
                   for k, t in published[got.version].items())

    try:
        plain = LearnerClient(f"127.0.0.1:{port}", retry=FAST_RETRY)
        sampler_id = plain.register("faults", "transformers", "cpu", 1, "bench").sampler_id
        with CuttingProxy(port) as proxy:
            for i in range(cuts):
                have = rng.choice([0, 2])
                total = len(learner.versions.payload(have, 3).data)
                abrupt = rng.random() < 0.5
                proxy.arm(rng.randrange(1, total), abrupt=abrupt)
                client = LearnerClient(proxy.target, retry=FAST_RETRY)
                try:
                    got = client.fetch_weights(sampler_id, have_version=have, want_version=3)
                    ok = exact(got) and got.reconnects >= 1
                    detail = (f"{'RST' if abrupt else 'FIN'} in a {total} B {'anchor' if not have else 'delta'}: "
                              f"{got.reconnects} reconnect(s), {got.bytes_received} B verified, weights exact {ok}")
                except Exception as err:  # noqa: BLE001 - a failed fault is reported, not raised
                    ok, detail = False, f"{type(err).__name__}: {err}"
                finally:
                    client.close()
                survived += ok
                row("cut weight download", i + 1, ok, detail)
        for i in range(corrupt):
            have = rng.choice([0, 2])
            total = len(learner.versions.payload(have, 3).data)
            offset = rng.randrange(0, total) // CHUNK * CHUNK
            flip = FlipOnce(offset)
            tamper.rewrite = flip
            try:
                got = plain.fetch_weights(sampler_id, have_version=have, want_version=3)
                ok = exact(got) and got.corrupt_chunks == 1 and flip.sent == 2
                detail = (f"byte flipped in the chunk at {offset} of {total} B: detected {got.corrupt_chunks}, "
                          f"refetched, weights exact {ok}")
            except Exception as err:  # noqa: BLE001
                ok, detail = False, f"{type(err).__name__}: {err}"
            finally:
                tamper.rewrite = None
            survived += ok
            row("corrupted chunk", i + 1, ok, detail)
        plain.close()
    finally:
        server.stop(0)
        learner.close()
    return {"faults": cuts + corrupt, "survived": survived, "lost": 0, "double": 0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sampler-kills", type=int, default=4)
    parser.add_argument("--learner-kills", type=int, default=4)
    parser.add_argument("--cuts", type=int, default=6)
    parser.add_argument("--corrupt", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the run directories and logs (printed at the end)")
    args = parser.parse_args()

    from conftest import Processes

    from heterorl.common.model import resolve_model

    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="heterorl-faults-"))
    cache = work / "cache"
    os.environ["HETERORL_CACHE"] = str(cache)
    from test_faults import wide_model

    resolve_model("tiny", cache=cache)
    model_dir = wide_model(cache, work / "wide-model-learner")  # anchors of ~75 chunks: a kill can cut them
    logs = work / "logs"
    logs.mkdir()
    print(f"{'fault':<22} {'#':>3}  {'outcome':<9} detail", flush=True)
    results = []
    for name, run in (
        ("samplers", lambda p: sampler_kills(p, work, args.sampler_kills, args.seed)),
        ("learner", lambda p: learner_kills(p, work, model_dir, args.learner_kills, args.seed)),
    ):
        processes = Processes(cache, logs / name)
        (logs / name).mkdir()
        try:
            if (name == "samplers" and args.sampler_kills) or (name == "learner" and args.learner_kills):
                results.append(run(processes))
        except Exception:  # noqa: BLE001 - report and go on with the other faults
            traceback.print_exc()
            results.append({"faults": args.sampler_kills if name == "samplers" else args.learner_kills,
                            "survived": 0, "lost": 0, "double": 0})
        finally:
            processes.stop_all()
    if args.cuts or args.corrupt:
        results.append(transfer_faults(cache, work, args.cuts, args.corrupt, args.seed))

    faults = sum(r["faults"] for r in results)
    survived = sum(r["survived"] for r in results)
    lost = sum(r["lost"] for r in results)
    double = sum(r["double"] for r in results)
    kills = [k for r in results for k in r.get("kills", [])]
    recovery = statistics.median(k["serving_s"] for k in kills) if kills else float("nan")
    first_ack = statistics.median(k["first_ack_s"] for k in kills) if kills else float("nan")
    resync = int(statistics.median(k["resync_bytes"] for k in kills)) if kills else 0
    if kills:
        print(f"learner recovery: serving again {min(k['serving_s'] for k in kills):.1f}-"
              f"{max(k['serving_s'] for k in kills):.1f}s after kill -9 (process start, model load, database and "
              f"checkpoint reload); sampler resyncs: " + ", ".join(f"{k['resync']} {k['resync_bytes']} B" for k in kills))
    print(f"{faults} faults in {time.time() - started:.0f}s; work directory {work}"
          + ("" if args.keep else " (removed)"))
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    print(f"RESULT faults={faults} survived={survived} groups_lost={lost} groups_double={double} "
          f"recovery_s={recovery:.1f} first_ack_s={first_ack:.1f} resync_bytes={resync}")
    return 0 if survived == faults and lost == 0 and double == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
