"""Every RPC over a real socket: a good round trip, and malformed input answered with a precise status while the
learner keeps serving and its accounting stays exact."""

from __future__ import annotations

import hashlib
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from heterorl.common import codec
from heterorl.server.config import LearnerConfig
from heterorl.server.learner import Learner
from heterorl.server.service import build_server
from heterorl.v1 import learner_pb2 as pb
from heterorl.v1 import learner_pb2_grpc as pb_grpc

G = 4
MAX_NEW = 8


@pytest.fixture(scope="module")
def served(tiny_cache, tmp_path_factory):
    """An in-process learner (no training loop) behind a real gRPC server on loopback."""
    import os

    os.environ["HETERORL_CACHE"] = str(tiny_cache)
    config = LearnerConfig(
        port=0, run_dir=tmp_path_factory.mktemp("run"), model="tiny", reward="digit_fraction",
        group_size=G, groups_per_step=2, max_new_tokens=MAX_NEW, eval_size=0, chunk_bytes=65536,
        lease_ttl_s=60, max_inflight_groups=64,
    )
    learner = Learner(config, log=lambda _m: None)
    server, port = build_server(learner, "127.0.0.1", 0)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield learner, pb_grpc.LearnerStub(channel), channel
    channel.close()
    server.stop(0)


def register(stub, name="t") -> pb.RegisterReply:
    return stub.Register(pb.RegisterRequest(name=name, engine="transformers", device="cpu", max_batch=8))


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def good_group(sampler_id: str, lease: pb.PromptLease, version: int = 1, n: int = G) -> pb.TrajectoryGroup:
    comps = [
        pb.Completion(token_ids=[5, 6, 7], logprobs=[-1.0, -0.5, -2.0], finish_reason=pb.FINISH_REASON_LENGTH)
        for _ in range(n)
    ]
    return pb.TrajectoryGroup(sampler_id=sampler_id, lease_id=lease.lease_id, policy_version=version,
                              completions=comps)


def submit(stub, *groups):
    return list(stub.SubmitTrajectories(iter(groups)))


def still_serving(stub) -> pb.StatusReply:
    return stub.Status(pb.StatusRequest(), timeout=5)


def test_register_round_trip_and_validation(served):
    learner, stub, _ = served
    reply = register(stub)
    assert reply.sampler_id and reply.current_version == 1
    assert reply.run.group_size == G and reply.run.sampling.max_new_tokens == MAX_NEW
    assert reply.run.vocab_size == learner.vocab_size
    bad = [
        pb.RegisterRequest(name="", engine="transformers", device="cpu", max_batch=1),
        pb.RegisterRequest(name="x" * 65, engine="transformers", device="cpu", max_batch=1),
        pb.RegisterRequest(name="x", engine="tensorflow", device="cpu", max_batch=1),
        pb.RegisterRequest(name="x", engine="transformers", device="cpu", max_batch=0),
        pb.RegisterRequest(name="x", engine="transformers", device="", max_batch=1),
    ]
    for request in bad:
        assert code_of(lambda: stub.Register(request)) == grpc.StatusCode.INVALID_ARGUMENT
    still_serving(stub)


def test_model_files_give_a_loadable_architecture(served, tmp_path):
    _, stub, _ = served
    sid = register(stub).sampler_id
    files = stub.GetModelFiles(pb.ModelFilesRequest(sampler_id=sid))
    names = {f.name for f in files.files}
    assert "config.json" in names and not any(n.endswith(".safetensors") for n in names)
    assert code_of(lambda: stub.GetModelFiles(pb.ModelFilesRequest(sampler_id="S-nope"))) == grpc.StatusCode.NOT_FOUND


def test_lease_round_trip_never_reveals_answers(served):
    learner, stub, _ = served
    sid = register(stub).sampler_id
    reply = stub.LeasePrompts(pb.LeaseRequest(sampler_id=sid, max_groups=3))
    assert len(reply.leases) == 3
    assert not any("answer" in name for name in pb.PromptLease.DESCRIPTOR.fields_by_name)
    for lease in reply.leases:
        assert lease.group_size == G and list(lease.prompt_token_ids)
        problem = learner.leases.leases[lease.lease_id].problem
        assert lease.question == problem.question
        assert list(lease.prompt_token_ids) == learner.encode(problem)
    assert code_of(lambda: stub.LeasePrompts(pb.LeaseRequest(sampler_id=sid, max_groups=0))) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: stub.LeasePrompts(pb.LeaseRequest(sampler_id="", max_groups=1))) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: stub.LeasePrompts(pb.LeaseRequest(sampler_id="S-unknown", max_groups=1))) == \
        grpc.StatusCode.NOT_FOUND


def _download(stub, sid, offset=0):
    return list(stub.FetchWeights(pb.FetchWeightsRequest(sampler_id=sid, offset=offset)))


def test_fetch_weights_chunks_hash_and_rebuild_the_published_version(served):
    learner, stub, _ = served
    sid = register(stub).sampler_id
    chunks = _download(stub, sid)
    assert len(chunks) > 1, "the tiny model should span several 64 KiB chunks"
    payload = b"".join(c.data for c in chunks)
    for c in chunks:
        assert hashlib.sha256(c.data).hexdigest() == c.chunk_sha256
        assert c.total_bytes == len(payload)
    assert hashlib.sha256(payload).hexdigest() == chunks[0].payload_sha256
    # Rebuild the tensors on a copy of the learner's own weights and compare with the published hash.
    target = {k: torch.zeros_like(v) for k, v in learner.trainer.snapshot().items()}
    codec.apply_(payload, target)
    assert codec.digest(target) == chunks[0].weights_sha256
    # Resuming from an offset continues exactly where the cut happened.
    cut = chunks[1].offset + 17
    tail = _download(stub, sid, offset=cut)
    assert b"".join(c.data for c in tail) == payload[cut:]


def test_fetch_weights_validation(served):
    learner, stub, _ = served
    sid = register(stub).sampler_id
    newest = learner.version
    total = len(learner.versions.payload(0, newest).data)
    cases = {
        grpc.StatusCode.NOT_FOUND: pb.FetchWeightsRequest(sampler_id="S-ghost"),
        grpc.StatusCode.INVALID_ARGUMENT: pb.FetchWeightsRequest(sampler_id=sid, want_version=newest + 5),
        grpc.StatusCode.OUT_OF_RANGE: pb.FetchWeightsRequest(sampler_id=sid, offset=total + 1),
    }
    for expected, request in cases.items():
        assert code_of(lambda: list(stub.FetchWeights(request))) == expected
    still_serving(stub)


def test_submit_accepts_once_and_acks_duplicates(served):
    learner, stub, _ = served
    sid = register(stub).sampler_id
    leases = stub.LeasePrompts(pb.LeaseRequest(sampler_id=sid, max_groups=2)).leases
    pending_before = len(learner.store)
    acks = submit(stub, good_group(sid, leases[0]), good_group(sid, leases[1]))
    assert [a.status for a in acks] == [pb.ACK_STATUS_ACCEPTED] * 2
    acks = submit(stub, good_group(sid, leases[0]))
    assert acks[0].status == pb.ACK_STATUS_DUPLICATE
    assert len(learner.store) == pending_before + 2  # stored once
    # The learner scored with its own reward and answer, not the sampler's claim.
    stored = [g for g in learner.store._groups if g.lease_id == leases[0].lease_id][0]
    assert all(c.reward == pytest.approx(0.0) for c in stored.completions)  # token ids 5,6,7 are not digits


def _mutations(sid, lease, vocab):
    def mutate(fn):
        group = good_group(sid, lease)
        fn(group)
        return group

    def set_token(g, value):
        g.completions[0].token_ids[0] = value

    def set_logprob(g, value):
        g.completions[1].logprobs[0] = value

    return [
        ("too few completions", grpc.StatusCode.INVALID_ARGUMENT, good_group(sid, lease, n=G - 1)),
        ("too many completions", grpc.StatusCode.INVALID_ARGUMENT, good_group(sid, lease, n=G + 1)),
        ("token outside vocab", grpc.StatusCode.INVALID_ARGUMENT, mutate(lambda g: set_token(g, vocab))),
        ("positive logprob", grpc.StatusCode.INVALID_ARGUMENT, mutate(lambda g: set_logprob(g, 0.5))),
        ("nan logprob", grpc.StatusCode.INVALID_ARGUMENT, mutate(lambda g: set_logprob(g, float("nan")))),
        ("inf logprob", grpc.StatusCode.INVALID_ARGUMENT, mutate(lambda g: set_logprob(g, float("-inf")))),
        ("logprob count", grpc.StatusCode.INVALID_ARGUMENT, mutate(lambda g: g.completions[2].logprobs.append(-1))),
        ("empty completion", grpc.StatusCode.INVALID_ARGUMENT,
         mutate(lambda g: (g.completions[0].ClearField("token_ids"), g.completions[0].ClearField("logprobs")))),
        ("too long", grpc.StatusCode.INVALID_ARGUMENT,
         mutate(lambda g: (g.completions[0].token_ids.extend([1] * MAX_NEW),
                           g.completions[0].logprobs.extend([-1.0] * MAX_NEW)))),
        ("future version", grpc.StatusCode.INVALID_ARGUMENT, mutate(lambda g: setattr(g, "policy_version", 999))),
        ("version zero", grpc.StatusCode.INVALID_ARGUMENT, mutate(lambda g: setattr(g, "policy_version", 0))),
        ("finish reason", grpc.StatusCode.INVALID_ARGUMENT,
         mutate(lambda g: setattr(g.completions[0], "finish_reason", 0))),
        ("nan sampler reward", grpc.StatusCode.INVALID_ARGUMENT,
         mutate(lambda g: setattr(g.completions[0], "sampler_reward", float("nan")))),
        ("unknown lease", grpc.StatusCode.NOT_FOUND, mutate(lambda g: setattr(g, "lease_id", "L0-bogus"))),
        ("empty lease", grpc.StatusCode.INVALID_ARGUMENT, mutate(lambda g: setattr(g, "lease_id", ""))),
        ("unknown sampler", grpc.StatusCode.NOT_FOUND, mutate(lambda g: setattr(g, "sampler_id", "S-ghost"))),
    ]


def test_submit_rejects_malformed_groups_precisely_and_keeps_serving(served):
    learner, stub, _ = served
    sid = register(stub).sampler_id
    lease = stub.LeasePrompts(pb.LeaseRequest(sampler_id=sid, max_groups=1)).leases[0]
    pending = len(learner.store)
    for what, expected, group in _mutations(sid, lease, learner.vocab_size):
        assert code_of(lambda: submit(stub, group)) == expected, what
        still_serving(stub)
    assert len(learner.store) == pending, "a rejected group must never be stored"
    assert learner.samplers[sid].groups_rejected >= 10
    # The lease is still good after all that: the honest group goes in.
    assert submit(stub, good_group(sid, lease))[0].status == pb.ACK_STATUS_ACCEPTED


def test_groups_before_a_bad_one_stay_acknowledged(served):
    learner, stub, _ = served
    sid = register(stub).sampler_id
    a, b = stub.LeasePrompts(pb.LeaseRequest(sampler_id=sid, max_groups=2)).leases
    bad = good_group(sid, b, n=1)
    with pytest.raises(grpc.RpcError) as info:
        for ack in stub.SubmitTrajectories(iter([good_group(sid, a), bad])):
            assert ack.lease_id == a.lease_id
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert b.lease_id in info.value.details()
    assert learner.leases.leases[a.lease_id].state.value == "accepted"
    assert learner.leases.leases[b.lease_id].state.value == "outstanding"


def test_lease_ownership_and_expiry(served):
    learner, stub, _ = served
    alice, bob = register(stub, "alice").sampler_id, register(stub, "bob").sampler_id
    lease = stub.LeasePrompts(pb.LeaseRequest(sampler_id=alice, max_groups=1)).leases[0]
    assert code_of(lambda: submit(stub, good_group(bob, lease))) == grpc.StatusCode.PERMISSION_DENIED
    # Expire it and let bob take the same prompt under a new lease: alice's late group is refused.
    learner.leases.leases[lease.lease_id].expires_at = time.time() - 1
    with learner.lock:
        learner.leases.expire_overdue(time.time())
        learner.leases._requeued.rotate(-list(learner.leases._requeued).index(lease.lease_id))
    again = stub.LeasePrompts(pb.LeaseRequest(sampler_id=bob, max_groups=1)).leases[0]
    assert again.prompt_id == lease.prompt_id and again.lease_id != lease.lease_id
    assert code_of(lambda: submit(stub, good_group(alice, lease))) == grpc.StatusCode.FAILED_PRECONDITION
    assert submit(stub, good_group(bob, again))[0].status == pb.ACK_STATUS_ACCEPTED


def test_late_group_of_an_expired_lease_is_accepted_if_not_released_again(served):
    learner, stub, _ = served
    sid = register(stub).sampler_id
    lease = stub.LeasePrompts(pb.LeaseRequest(sampler_id=sid, max_groups=1)).leases[0]
    learner.leases.leases[lease.lease_id].expires_at = time.time() - 1
    with learner.lock:
        learner.leases.expire_overdue(time.time())
    assert submit(stub, good_group(sid, lease))[0].status == pb.ACK_STATUS_ACCEPTED
    # Its prompt is not handed out again.
    with learner.lock:
        issued = learner.leases.issue(sid, 3, time.time())
    assert int(lease.prompt_id) not in {l.prompt_index for l in issued}


def test_heartbeat_and_status(served):
    learner, stub, _ = served
    sid = register(stub, "beating").sampler_id
    assert stub.Heartbeat(pb.HeartbeatRequest(sampler_id=sid, version=1)).current_version == learner.version
    assert code_of(lambda: stub.Heartbeat(pb.HeartbeatRequest(sampler_id="S-x", version=1))) == \
        grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: stub.Heartbeat(pb.HeartbeatRequest(sampler_id=sid, version=99))) == \
        grpc.StatusCode.INVALID_ARGUMENT
    status = still_serving(stub)
    assert status.version == learner.version
    assert any(s.name == "beating" and s.version == 1 and s.alive for s in status.samplers)


def test_health_and_reflection(served):
    _, _, channel = served
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "heterorl.v1.Learner"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = list(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in replies[0].list_services_response.service}
    assert "heterorl.v1.Learner" in names and "grpc.health.v1.Health" in names


def test_lease_accounting_is_exact(served):
    learner, stub, _ = served
    with learner.lock:
        counts = learner.leases.counts()
        total = len(learner.leases.leases)
    assert sum(counts.values()) == total
    assert counts["accepted"] == len(learner.store)
