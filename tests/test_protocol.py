"""Every RPC over a real socket: a good round trip, and malformed input answered with a precise status and a
machine-readable reason while the learner keeps serving and its accounting (as `Status` shows it) stays exact."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from types import SimpleNamespace

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from heterorl.cli import format_status
from heterorl.common import codec
from heterorl.common.contract import Reason, refusal_reason
from heterorl.common.config import from_flat
from heterorl.server.config import LearnerConfig
from heterorl.server.errors import Refused
from heterorl.server.learner import Learner
from heterorl.server.security import ServerSecurity
from heterorl.server.service import build_server, status_reply
from heterorl.v1 import learner_pb2 as pb
from heterorl.v1 import learner_pb2_grpc as pb_grpc

G = 4
MAX_NEW = 8
STOP = ["\n\n", "###"]
C = grpc.StatusCode


def _config(run_dir, **overrides) -> LearnerConfig:
    settings = dict(
        port=0, run_dir=run_dir, model="tiny", reward="digit_fraction", group_size=G, groups_per_step=2,
        max_new_tokens=MAX_NEW, eval_size=0, chunk_bytes=65536, lease_ttl_s=60, max_inflight_groups=64,
        stop=STOP, max_prompt_tokens=200,
    )
    settings.update(overrides)
    return from_flat(LearnerConfig, **settings)


class Served:
    """A learner (no training loop) behind a real gRPC server on loopback."""

    def __init__(self, learner: Learner):
        self.learner = learner
        self.server, port = build_server(learner, "127.0.0.1", 0)
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.LearnerStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(0)


@pytest.fixture(scope="module")
def served(tiny_cache, tmp_path_factory):
    import os

    os.environ["HETERORL_CACHE"] = str(tiny_cache)
    s = Served(Learner(_config(tmp_path_factory.mktemp("run"))))
    yield s.learner, s.stub, s.channel
    s.close()


def register(stub, name="t") -> pb.RegisterReply:
    return stub.Register(pb.RegisterRequest(name=name, engine="transformers", device="cpu", max_batch=8))


def refusal(call) -> tuple[grpc.StatusCode, Reason | None]:
    """The status code of a refused call and the reason it carried."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), refusal_reason(info.value)


def code_of(call) -> grpc.StatusCode:
    return refusal(call)[0]


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


def view_of(stub, sampler_id: str) -> pb.SamplerStatus:
    return next(s for s in still_serving(stub).samplers if s.sampler_id == sampler_id)


def test_register_round_trip_and_validation(served):
    learner, stub, _ = served
    reply = register(stub)
    assert reply.sampler_id and reply.current_version == 1
    assert reply.run.group_size == G and reply.run.sampling.max_new_tokens == MAX_NEW
    assert reply.run.vocab_size == learner.vocab_size
    # Every field of the run configuration is the learner's setting, none a constant the learner ignores.
    assert list(reply.run.sampling.stop) == STOP
    assert reply.run.max_prompt_tokens == 200
    assert reply.run.weights_dtype == "bfloat16"
    bad = [
        (pb.RegisterRequest(name="", engine="transformers", device="cpu", max_batch=1), Reason.NAME),
        (pb.RegisterRequest(name="x" * 65, engine="transformers", device="cpu", max_batch=1), Reason.NAME),
        (pb.RegisterRequest(name="x", engine="tensorflow", device="cpu", max_batch=1), Reason.ENGINE),
        (pb.RegisterRequest(name="x", engine="transformers", device="cpu", max_batch=0), Reason.MAX_BATCH),
        (pb.RegisterRequest(name="x", engine="transformers", device="cpu", max_batch=257), Reason.MAX_BATCH),
        (pb.RegisterRequest(name="x", engine="transformers", device="", max_batch=1), Reason.DEVICE),
        (pb.RegisterRequest(name="x", engine="vllm", device="cpu", max_batch=1, client_version="\x00"),
         Reason.CLIENT_VERSION),
    ]
    for request, reason in bad:
        assert refusal(lambda: stub.Register(request)) == (C.INVALID_ARGUMENT, reason)
    still_serving(stub)


def test_model_files_give_a_loadable_architecture(served):
    _, stub, _ = served
    sid = register(stub).sampler_id
    files = stub.GetModelFiles(pb.ModelFilesRequest(sampler_id=sid))
    names = {f.name for f in files.files}
    assert "config.json" in names and not any(n.endswith(".safetensors") for n in names)
    digest = hashlib.sha256()
    for f in files.files:
        digest.update(f.name.encode() + b"\0" + hashlib.sha256(f.content).digest())
    assert files.files_sha256 == digest.hexdigest()
    assert refusal(lambda: stub.GetModelFiles(pb.ModelFilesRequest(sampler_id="S-nope"))) == \
        (C.NOT_FOUND, Reason.UNKNOWN_SAMPLER)


def test_lease_round_trip_never_reveals_answers(served):
    learner, stub, _ = served
    sid = register(stub).sampler_id
    reply = stub.LeasePrompts(pb.LeaseRequest(sampler_id=sid, max_groups=3))
    assert len(reply.leases) == 3 and reply.current_version == learner.version
    assert not any("answer" in name for name in pb.PromptLease.DESCRIPTOR.fields_by_name)
    assert len({lease.lease_id for lease in reply.leases}) == 3 and len({l.prompt_id for l in reply.leases}) == 3
    for lease in reply.leases:
        assert lease.group_size == G and lease.question
        assert 0 < len(lease.prompt_token_ids) <= 200  # within the run's max_prompt_tokens
        assert max(lease.prompt_token_ids) < learner.vocab_size
        assert lease.expires_at_unix > time.time()
    assert refusal(lambda: stub.LeasePrompts(pb.LeaseRequest(sampler_id=sid, max_groups=0))) == \
        (C.INVALID_ARGUMENT, Reason.MAX_GROUPS)
    assert refusal(lambda: stub.LeasePrompts(pb.LeaseRequest(sampler_id="", max_groups=1))) == \
        (C.INVALID_ARGUMENT, Reason.SAMPLER_ID)
    assert refusal(lambda: stub.LeasePrompts(pb.LeaseRequest(sampler_id="S-unknown", max_groups=1))) == \
        (C.NOT_FOUND, Reason.UNKNOWN_SAMPLER)


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
    # Rebuild the tensors on zeros shaped like the learner's weights and compare with the published hash.
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
    cases = [
        (pb.FetchWeightsRequest(sampler_id="S-ghost"), C.NOT_FOUND, Reason.UNKNOWN_SAMPLER),
        (pb.FetchWeightsRequest(sampler_id=sid, want_version=newest + 5), C.INVALID_ARGUMENT, Reason.WANT_VERSION),
        (pb.FetchWeightsRequest(sampler_id=sid, offset=total + 1), C.OUT_OF_RANGE, Reason.OFFSET),
    ]
    for request, code, reason in cases:
        assert refusal(lambda: list(stub.FetchWeights(request))) == (code, reason)
    assert _download(stub, sid, offset=total) == []  # exactly the end: nothing left to send, not an error
    still_serving(stub)


def test_submit_accepts_once_and_acks_duplicates(served):
    learner, stub, _ = served
    sid = register(stub).sampler_id
    leases = stub.LeasePrompts(pb.LeaseRequest(sampler_id=sid, max_groups=2)).leases
    before = still_serving(stub)
    claimed = good_group(sid, leases[0])
    for c in claimed.completions:
        c.sampler_reward = 1.0  # the learner scores 0: token ids 5,6,7 decode to no digits
    acks = submit(stub, claimed, good_group(sid, leases[1]))
    assert [a.status for a in acks] == [pb.ACK_STATUS_ACCEPTED] * 2
    acks = submit(stub, good_group(sid, leases[0]))
    assert acks[0].status == pb.ACK_STATUS_DUPLICATE
    after = still_serving(stub)
    assert after.groups_pending == before.groups_pending + 2  # stored once
    # The learner scored with its own reward, not the sampler's claim, and Status says where they disagreed.
    mine = next(s for s in after.samplers if s.sampler_id == sid)
    assert mine.groups_accepted == 2 and mine.reward_disagreements == G
    assert after.reward_disagreements == before.reward_disagreements + G
    text = format_status(after)  # what `heterorl status` prints
    assert f"sampler rewards that disagreed with the learner's: {after.reward_disagreements}" in text
    assert f"rewards that disagreed with the learner's: {G}\n" in text + "\n"
    assert f"{after.groups_refused_reward} refused (reward function failed)" in text


def _mutations(sid, lease, vocab):
    def mutate(fn):
        group = good_group(sid, lease)
        fn(group)
        return group

    def set_token(g, value):
        g.completions[0].token_ids[0] = value

    def set_logprob(g, value):
        g.completions[1].logprobs[0] = value

    I, R = C.INVALID_ARGUMENT, Reason
    return [
        ("too few completions", I, R.GROUP_SIZE, good_group(sid, lease, n=G - 1)),
        ("too many completions", I, R.GROUP_SIZE, good_group(sid, lease, n=G + 1)),
        ("token outside vocab", I, R.TOKEN_ID, mutate(lambda g: set_token(g, vocab))),
        ("positive logprob", I, R.LOGPROB, mutate(lambda g: set_logprob(g, 0.5))),
        ("nan logprob", I, R.LOGPROB, mutate(lambda g: set_logprob(g, float("nan")))),
        ("inf logprob", I, R.LOGPROB, mutate(lambda g: set_logprob(g, float("-inf")))),
        ("logprob count", I, R.LOGPROB_COUNT, mutate(lambda g: g.completions[2].logprobs.append(-1))),
        ("empty completion", I, R.TOKEN_COUNT,
         mutate(lambda g: (g.completions[0].ClearField("token_ids"), g.completions[0].ClearField("logprobs")))),
        ("too long", I, R.TOKEN_COUNT,
         mutate(lambda g: (g.completions[0].token_ids.extend([1] * MAX_NEW),
                           g.completions[0].logprobs.extend([-1.0] * MAX_NEW)))),
        ("future version", I, R.POLICY_VERSION, mutate(lambda g: setattr(g, "policy_version", 999))),
        ("version zero", I, R.POLICY_VERSION, mutate(lambda g: setattr(g, "policy_version", 0))),
        ("finish reason", I, R.FINISH_REASON, mutate(lambda g: setattr(g.completions[0], "finish_reason", 0))),
        ("nan sampler reward", I, R.SAMPLER_REWARD,
         mutate(lambda g: setattr(g.completions[0], "sampler_reward", float("nan")))),
        ("negative seconds", I, R.GENERATION_SECONDS, mutate(lambda g: setattr(g, "generation_seconds", -1.0))),
        ("unknown lease", C.NOT_FOUND, R.LEASE_UNKNOWN, mutate(lambda g: setattr(g, "lease_id", "L0-bogus"))),
        ("empty lease", I, R.LEASE_ID, mutate(lambda g: setattr(g, "lease_id", ""))),
        ("unknown sampler", C.NOT_FOUND, R.UNKNOWN_SAMPLER, mutate(lambda g: setattr(g, "sampler_id", "S-ghost"))),
    ]


def test_submit_rejects_malformed_groups_precisely_and_keeps_serving(served):
    learner, stub, _ = served
    sid = register(stub).sampler_id
    lease = stub.LeasePrompts(pb.LeaseRequest(sampler_id=sid, max_groups=1)).leases[0]
    before = still_serving(stub)
    blamed: dict[str, int] = {}
    for what, code, reason, group in _mutations(sid, lease, learner.vocab_size):
        assert refusal(lambda: submit(stub, group)) == (code, reason), what
        if reason is not Reason.UNKNOWN_SAMPLER:  # a group naming a sampler that does not exist blames nobody
            blamed[reason.value] = blamed.get(reason.value, 0) + 1
    after = still_serving(stub)
    assert after.groups_pending == before.groups_pending, "a rejected group must never be stored"
    mine = next(s for s in after.samplers if s.sampler_id == sid)
    assert dict(mine.rejections) == blamed and mine.groups_rejected == sum(blamed.values())
    for reason, n in blamed.items():  # learner-wide counts grew by the same, under the same keys
        assert after.rejections[reason] - before.rejections.get(reason, 0) == n, reason
    assert after.rejections["unknown_sampler"] == before.rejections.get("unknown_sampler", 0) + 1
    # The lease is still good after all that: the honest group goes in.
    assert submit(stub, good_group(sid, lease))[0].status == pb.ACK_STATUS_ACCEPTED


def test_groups_before_a_bad_one_stay_acknowledged(served):
    learner, stub, _ = served
    sid = register(stub).sampler_id
    a, b = stub.LeasePrompts(pb.LeaseRequest(sampler_id=sid, max_groups=2)).leases
    bad = good_group(sid, b, n=1)
    acks = []
    with pytest.raises(grpc.RpcError) as info:
        for ack in stub.SubmitTrajectories(iter([good_group(sid, a), bad])):
            acks.append(ack)
    assert info.value.code() == C.INVALID_ARGUMENT and refusal_reason(info.value) == Reason.GROUP_SIZE
    assert b.lease_id in info.value.details()
    assert [ack.lease_id for ack in acks] == [a.lease_id]
    # a was stored (resubmitting it is a duplicate), b is still outstanding (its group goes in now).
    assert submit(stub, good_group(sid, a))[0].status == pb.ACK_STATUS_DUPLICATE
    assert submit(stub, good_group(sid, b))[0].status == pb.ACK_STATUS_ACCEPTED


@pytest.fixture
def short_leases(tiny_cache, tmp_path):
    """A learner whose leases expire after a second."""
    import os

    os.environ["HETERORL_CACHE"] = str(tiny_cache)
    s = Served(Learner(_config(tmp_path / "run", lease_ttl_s=1.0)))
    yield s.learner, s.stub
    s.close()


def _expire(stub, lease: pb.PromptLease) -> None:
    time.sleep(max(0.0, lease.expires_at_unix - time.time()) + 0.3)


def test_lease_ownership_and_expiry(short_leases):
    learner, stub = short_leases
    alice, bob = register(stub, "alice").sampler_id, register(stub, "bob").sampler_id
    lease = stub.LeasePrompts(pb.LeaseRequest(sampler_id=alice, max_groups=1)).leases[0]
    assert refusal(lambda: submit(stub, good_group(bob, lease))) == (C.PERMISSION_DENIED, Reason.LEASE_NOT_OWNED)
    # Let it expire; bob takes the same prompt under a new lease, and alice's late group is refused.
    _expire(stub, lease)
    again = stub.LeasePrompts(pb.LeaseRequest(sampler_id=bob, max_groups=1)).leases[0]
    assert again.prompt_id == lease.prompt_id and again.lease_id != lease.lease_id
    assert refusal(lambda: submit(stub, good_group(alice, lease))) == (C.FAILED_PRECONDITION, Reason.LEASE_RELEASED)
    assert submit(stub, good_group(bob, again))[0].status == pb.ACK_STATUS_ACCEPTED
    status = still_serving(stub)
    assert status.leases_expired >= 1 and status.groups_pending == 1


def test_late_group_of_an_expired_lease_is_accepted_if_not_released_again(short_leases):
    learner, stub = short_leases
    sid = register(stub).sampler_id
    lease = stub.LeasePrompts(pb.LeaseRequest(sampler_id=sid, max_groups=1)).leases[0]
    _expire(stub, lease)
    assert submit(stub, good_group(sid, lease))[0].status == pb.ACK_STATUS_ACCEPTED
    # Its prompt is not handed out again.
    issued = stub.LeasePrompts(pb.LeaseRequest(sampler_id=sid, max_groups=3)).leases
    assert issued and lease.prompt_id not in {l.prompt_id for l in issued}


def test_heartbeat_and_status(served):
    learner, stub, _ = served
    sid = register(stub, "beating").sampler_id
    assert stub.Heartbeat(pb.HeartbeatRequest(sampler_id=sid, version=1)).current_version == learner.version
    assert refusal(lambda: stub.Heartbeat(pb.HeartbeatRequest(sampler_id="S-x", version=1))) == \
        (C.NOT_FOUND, Reason.UNKNOWN_SAMPLER)
    assert refusal(lambda: stub.Heartbeat(pb.HeartbeatRequest(sampler_id=sid, version=99))) == \
        (C.INVALID_ARGUMENT, Reason.HEARTBEAT_VERSION)
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


def test_accounting_in_status_is_exact(served):
    _, stub, _ = served
    status = still_serving(stub)
    assert sum(s.groups_leased for s in status.samplers) >= status.leases_outstanding + status.groups_pending
    assert sum(s.groups_accepted for s in status.samplers) == (
        status.groups_pending + status.groups_trained + status.groups_dropped_stale)


# ---- the status reply is built from typed values --------------------------------------------------------------


def test_status_dataclasses_and_proto_have_exactly_the_same_fields():
    from heterorl.server.registry import LearnerStatus, SamplerView

    view_fields = {f.name for f in dataclasses.fields(SamplerView)}
    assert view_fields == set(pb.SamplerStatus.DESCRIPTOR.fields_by_name)
    status_fields = {f.name for f in dataclasses.fields(LearnerStatus)}
    assert status_fields | {"rejections", "security"} == set(pb.StatusReply.DESCRIPTOR.fields_by_name)
    assert not status_fields & {"rejections", "security"}  # the service's own, never the learner's


def _sample_value(field: dataclasses.Field, i: int):
    """A value for a dataclass field that is not its type's zero value, so a dropped field shows."""
    kind = str(field.type)
    if "bool" in kind:
        return True
    if "dict" in kind:
        return {"logprob": i + 1}
    if "int" in kind:
        return i + 1
    if "float" in kind:
        return i + 0.5
    return f"v{i}"


def test_status_reply_carries_every_field_of_the_learners_status():
    from heterorl.server.registry import LearnerStatus, SamplerView

    view = SamplerView(**{f.name: _sample_value(f, i) for i, f in enumerate(dataclasses.fields(SamplerView))})
    values = {f.name: _sample_value(f, i) for i, f in enumerate(dataclasses.fields(LearnerStatus))}
    status = LearnerStatus(**{**values, "samplers": (view,)})
    reply = status_reply(status, {"token_invalid": 3}, "2 tokens")
    for name, value in values.items():
        if name != "samplers":
            assert getattr(reply, name) == pytest.approx(value), name
    for name, value in dataclasses.asdict(view).items():
        got = getattr(reply.samplers[0], name)
        assert (dict(got) if isinstance(value, dict) else got) == pytest.approx(value), name
    assert dict(reply.rejections) == {"token_invalid": 3} and reply.security == "2 tokens"


# ---- refusals the learner raises travel with their reason -----------------------------------------------------


class RefusingLearner:
    """Just enough of a Learner for the service to answer SubmitTrajectories: `submit` raises what it is told."""

    def __init__(self):
        self.config = from_flat(LearnerConfig, group_size=G, max_new_tokens=MAX_NEW)
        self.vocab_size = 100
        self.version = 1
        self.refusal: Refused | None = None
        self.counted: list[tuple[str, Reason]] = []
        self.prometheus = SimpleNamespace(watch_refusals=lambda refusals: None, serve_bytes=lambda n: None)

    def sampler(self, sampler_id: str):
        if sampler_id != "S-known":
            raise Refused(C.NOT_FOUND, f"unknown sampler id {sampler_id!r}: Register first", Reason.UNKNOWN_SAMPLER)
        return SimpleNamespace(sampler_id=sampler_id, principal="")

    def submit(self, submission) -> bool:
        if self.refusal is not None:
            raise self.refusal
        return False

    def count_rejection(self, sampler_id: str, reason: Reason) -> bool:
        self.counted.append((sampler_id, reason))
        return True


@pytest.mark.parametrize("code, reason, blamed", [
    (C.NOT_FOUND, Reason.LEASE_UNKNOWN, True),
    (C.PERMISSION_DENIED, Reason.LEASE_NOT_OWNED, True),
    (C.FAILED_PRECONDITION, Reason.LEASE_RELEASED, True),
    (C.FAILED_PRECONDITION, Reason.REWARD_FAILED, False),  # the learner's reward code, not the sampler
    (C.FAILED_PRECONDITION, Reason.REWARD_TIMEOUT, False),
    (C.UNAVAILABLE, Reason.LEARNER_STOPPING, False),  # keep the group and retry
])
def test_a_refusal_raised_by_the_learner_reaches_the_sampler_with_its_code_and_reason(code, reason, blamed):
    learner = RefusingLearner()
    server, port = build_server(learner, "127.0.0.1", 0, security=ServerSecurity())
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = pb_grpc.LearnerStub(channel)
        lease = pb.PromptLease(lease_id="L1-x")
        learner.refusal = Refused(code, "refused for the test", reason)
        assert refusal(lambda: submit(stub, good_group("S-known", lease))) == (code, reason)
        assert learner.counted == ([("S-known", reason)] if blamed else [])
        learner.refusal = None  # the server keeps serving
        assert submit(stub, good_group("S-known", lease))[0].status == pb.ACK_STATUS_ACCEPTED
    finally:
        channel.close()
        server.stop(0)
