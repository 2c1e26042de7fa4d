"""How many trajectory groups per second the learner accepts over loopback gRPC.

A real learner (tiny model, no training loop, so only the ingest path is measured) behind its real gRPC server;
client processes lease prompts and stream valid groups (G completions of T tokens with log-probs) back through
SubmitTrajectories. Every group goes through the full path: validation, lease check, re-scoring, storage.

    python benchmarks/ingest.py [--clients 2] [--seconds 10] [--group-size 8] [--tokens 16]

Ends with `RESULT groups_per_s=... completions_per_s=... mb_per_s=...`.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def client(target: str, seconds: float, group_size: int, tokens: int, vocab: int, batch: int, out) -> None:
    import grpc

    from heterorl.v1 import learner_pb2 as pb
    from heterorl.v1 import learner_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(target)
    stub = pb_grpc.LearnerStub(channel)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16, help="groups per lease request and per stream")
    args = parser.parse_args()

    from heterorl.server.config import LearnerConfig
    from heterorl.server.learner import Learner
    from heterorl.server.service import build_server

    with tempfile.TemporaryDirectory() as tmp:
        config = LearnerConfig(
            port=0, run_dir=Path(tmp), model="tiny", reward="last_number", group_size=args.group_size,
            max_new_tokens=args.tokens, eval_size=0, max_inflight_groups=10**9, lease_ttl_s=3600,
        )
        learner = Learner(config, log=lambda _m: None)
        server, port = build_server(learner, "127.0.0.1", 0)
        server.start()
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        procs = [
            ctx.Process(target=client, args=(f"127.0.0.1:{port}", args.seconds, args.group_size, args.tokens,
                                             learner.vocab_size, args.batch, out))
            for _ in range(args.clients)
        ]
        for p in procs:
            p.start()
        results = [out.get(timeout=args.seconds + 120) for _ in procs]
        for p in procs:
            p.join()
        # Measured over the span in which clients were sending, not their start-up.
        elapsed = max(r[3] for r in results) - min(r[2] for r in results)
        server.stop(0)
        stored = len(learner.store)
    accepted = sum(r[0] for r in results)
    mb = sum(r[1] for r in results) / 1e6
    assert stored == accepted, f"stored {stored} != acknowledged {accepted}"
    print(f"clients {args.clients}, G={args.group_size}, {args.tokens} tokens/completion, {elapsed:.1f}s of sending")
    print(f"accepted groups: {accepted} ({accepted / elapsed:.0f}/s), all stored exactly once")
    print(f"RESULT groups_per_s={accepted / elapsed:.0f} completions_per_s={accepted * args.group_size / elapsed:.0f} "
          f"mb_per_s={mb / elapsed:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
