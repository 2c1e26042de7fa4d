"""Thousands of malformed and adversarial inputs to every RPC of a real learner behind its real gRPC server.

Each input is judged by an independent model of the protocol (`World`): what status it must get, whether it is
stored, and whom a refusal is counted against. Inputs are real messages mutated by hypothesis (field by field),
the same messages with their bytes mutated on the wire, and calls with missing, forged or another sampler's
credentials. Afterwards: no call ever failed with UNKNOWN (an exception inside the learner), the stored groups are
exactly the acknowledged ones with exactly the bytes that were sent, per-sampler and learner-wide counts equal
the model's, and the stored groups train with finite numbers. The inputs tried per RPC are printed
(`pytest tests/test_fuzz.py -s`).
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
from collections import Counter

import grpc
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from heterorl.node.client import ClientSecurity, open_channel
from heterorl.server.config import LearnerConfig
from heterorl.server.learner import Learner
from heterorl.server.service import ENGINES, LOGPROB_TOLERANCE, MAX_LEASE_BATCH, build_server, max_group_bytes
from heterorl.v1 import learner_pb2 as pb
from heterorl.v1 import learner_pb2_grpc as pb_grpc
from conftest import varint

G = 4
MAX_NEW = 6
TOKENS = {"alice": "alice-" + "a" * 26, "bob": "bob-" + "b" * 28}
CREDENTIALS = ["alice"] * 7 + ["bob"] * 2 + ["none", "forged"]
OK = grpc.StatusCode.OK
C = grpc.StatusCode
METHOD = "/heterorl.v1.Learner/"
FUZZ = settings(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


def _name_ok(value: str) -> bool:
    return 0 < len(value) <= 64 and value.isprintable()


class _ServerErrors(logging.Handler):
    """Collects what gRPC logs when a handler raises: each would be a crash of the learner's code."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if "deserializing" not in message:  # gRPC refusing bytes that do not parse is not the learner failing
            self.records.append(message)


class World:
    """The fuzzer's own model of the learner: who owns what, what was acknowledged, what must be counted."""

    def __init__(self, learner: Learner, target: str):
        self.learner = learner
        self.vocab = learner.vocab_size
        self.limit = max_group_bytes(G, MAX_NEW)
        self.channels: dict[str, grpc.Channel] = {}
        self.raws: list[grpc.Channel] = []
        for who in ("alice", "bob", "none", "forged"):
            token = TOKENS.get(who, "") if who != "forged" else "forged-" + "f" * 30
            raw, calls = open_channel(target, ClientSecurity(token=token))
            self.raws.append(raw)
            self.channels[who] = calls
        self.owner: dict[str, str] = {}            # sampler id -> credential that registered it
        self.max_batch: dict[str, int] = {}
        self.fresh: dict[str, list[str]] = {}      # sampler id -> leases not yet sent back
        self.lease_owner: dict[str, str] = {}      # lease id -> sampler id
        self.accepted: dict[str, bytes] = {}       # lease id -> the group as sent (serialized)
        self.accepted_by: Counter[str] = Counter()
        self.blamed: Counter[str] = Counter()      # refusals that must be counted against a sampler
        self.refused = 0                           # refusals the learner must count at all
        self.tried: Counter[str] = Counter()
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.lock = threading.Lock()
        self.rng = random.Random(0)

    # -- sending

    def stub(self, who: str) -> pb_grpc.LearnerStub:
        return pb_grpc.LearnerStub(self.channels[who])

    def send(self, rpc: str, who: str, fn, inputs: int = 1):
        """Run one call; returns (status code, reply). UNKNOWN (the learner's code raised) fails the test."""
        with self.lock:
            self.tried[rpc] += inputs
        try:
            reply, code = fn(), OK
        except grpc.RpcError as err:
            reply, code = err, err.code()
        with self.lock:
            self.outcomes[(rpc, code.name)] += 1
        assert code != C.UNKNOWN, f"{rpc}: the learner raised: {reply.details()}"
        return code, reply

    def raw_unary(self, who: str, rpc: str):
        return self.channels[who].unary_unary(METHOD + rpc, request_serializer=None, response_deserializer=None)

    # -- the model

    def authenticated(self, who: str) -> bool:
        return who in TOKENS

    def sampler_verdict(self, sid: str, who: str) -> grpc.StatusCode | None:
        if not _name_ok(sid):
            return C.INVALID_ARGUMENT
        if sid not in self.owner:
            return C.NOT_FOUND
        if self.owner[sid] != who:
            return C.NOT_FOUND  # another credential's sampler is not confirmed to exist
        return None

    def refuse(self, code: grpc.StatusCode, blame: str = "") -> None:
        """A refusal the learner must count (learner-wide, and against `blame` when given)."""
        with self.lock:
            self.refused += 1
            if blame:
                self.blamed[blame] += 1

    def expect(self, rpc: str, who: str, code: grpc.StatusCode, expected: grpc.StatusCode, reply, blame: str = ""):
        """Check an answer against the model and book the refusal the learner must have counted."""
        learner_service = rpc != "Health"  # the standard health service is open and counts nothing
        if not self.authenticated(who) and learner_service:
            expected, blame = C.UNAUTHENTICATED, ""
        assert code == expected, f"{rpc} as {who}: expected {expected.name}, got {code.name}: {_details(reply)}"
        if code != OK and learner_service:
            self.refuse(code, blame)

    def group_verdict(self, g: pb.TrajectoryGroup, who: str) -> tuple[grpc.StatusCode, str, bool]:
        """(status, sampler to blame, duplicate) of one submitted group, in the learner's order of checks."""
        verdict = self.sampler_verdict(g.sampler_id, who)
        if verdict is not None:
            return verdict, "", False
        sid = g.sampler_id
        fields_ok = (
            g.ByteSize() <= self.limit
            and _name_ok(g.lease_id)
            and 1 <= g.policy_version <= self.learner.version
            and len(g.completions) == G
            and math.isfinite(g.generation_seconds) and g.generation_seconds >= 0
            and all(self.completion_ok(c) for c in g.completions)
        )
        if not fields_ok:
            return C.INVALID_ARGUMENT, sid, False
        owner = self.lease_owner.get(g.lease_id)
        if owner is None:
            return C.NOT_FOUND, sid, False
        if owner != sid:
            return C.PERMISSION_DENIED, sid, False
        return OK, sid, g.lease_id in self.accepted

    def completion_ok(self, c: pb.Completion) -> bool:
        n = len(c.token_ids)
        return (
            1 <= n <= MAX_NEW
            and len(c.logprobs) == n
            and max(c.token_ids) < self.vocab
            and all(math.isfinite(x) and x <= LOGPROB_TOLERANCE for x in c.logprobs)
            and c.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
            and (not c.HasField("sampler_reward") or math.isfinite(c.sampler_reward))
        )

    # -- valid material to mutate

    def a_sampler(self, who: str, rng: random.Random) -> str:
        mine = [s for s, o in self.owner.items() if o == who] or list(self.owner)
        return rng.choice(sorted(mine))

    def valid_group(self, sid: str, rng: random.Random) -> pb.TrajectoryGroup:
        leases = self.fresh.get(sid) or []
        lease_id = leases[-1] if leases else "L0-none"
        completions = []
        for _ in range(G):
            n = rng.randint(1, MAX_NEW)
            completions.append(pb.Completion(
                token_ids=[rng.randrange(self.vocab) for _ in range(n)],
                logprobs=[-rng.random() * 4 for _ in range(n)],
                finish_reason=rng.choice([pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH]),
            ))
            if rng.random() < 0.5:
                completions[-1].sampler_reward = rng.random()
        return pb.TrajectoryGroup(sampler_id=sid, lease_id=lease_id, policy_version=self.learner.version,
                                  completions=completions, generation_seconds=rng.random())

    # -- RPCs: each sends one (possibly raw) request and checks the answer against the model

    def register(self, who: str, request: pb.RegisterRequest | bytes) -> None:
        message = _parse(pb.RegisterRequest, request)
        raw = isinstance(request, bytes)
        call = self.raw_unary(who, "Register") if raw else self.stub(who).Register
        code, reply = self.send("Register", who, lambda: call(request, timeout=10))
        if message is None:
            return self.expect_undecodable("Register", who, code, reply)
        valid = (_name_ok(message.name) and message.engine in ENGINES and _name_ok(message.device)
                 and 1 <= message.max_batch <= MAX_LEASE_BATCH and len(message.client_version) <= 64
                 and message.client_version.isprintable())
        self.expect("Register", who, code, OK if valid else C.INVALID_ARGUMENT, reply)
        if code == OK:
            reply = pb.RegisterReply.FromString(reply) if raw else reply
            assert reply.run.group_size == G and reply.current_version == self.learner.version
            with self.lock:
                self.owner[reply.sampler_id] = who
                self.max_batch[reply.sampler_id] = message.max_batch
                self.fresh[reply.sampler_id] = []

    def model_files(self, who: str, request: pb.ModelFilesRequest | bytes) -> None:
        message = _parse(pb.ModelFilesRequest, request)
        call = self.raw_unary(who, "GetModelFiles") if isinstance(request, bytes) else self.stub(who).GetModelFiles
        code, reply = self.send("GetModelFiles", who, lambda: call(request, timeout=10))
        if message is None:
            return self.expect_undecodable("GetModelFiles", who, code, reply)
        verdict = self.sampler_verdict(message.sampler_id, who)
        self.expect("GetModelFiles", who, code, verdict or OK, reply)

    def lease(self, who: str, request: pb.LeaseRequest | bytes) -> None:
        message = _parse(pb.LeaseRequest, request)
        raw = isinstance(request, bytes)
        call = self.raw_unary(who, "LeasePrompts") if raw else self.stub(who).LeasePrompts
        code, reply = self.send("LeasePrompts", who, lambda: call(request, timeout=10))
        if message is None:
            return self.expect_undecodable("LeasePrompts", who, code, reply)
        sid = message.sampler_id
        verdict, blame = self.sampler_verdict(sid, who), ""
        if verdict is None and not 1 <= message.max_groups <= MAX_LEASE_BATCH:
            verdict, blame = C.INVALID_ARGUMENT, sid
        self.expect("LeasePrompts", who, code, verdict or OK, reply, blame)
        if code == OK:
            reply = pb.LeaseReply.FromString(reply) if raw else reply
            assert len(reply.leases) <= min(message.max_groups, self.max_batch[sid])
            with self.lock:
                for lease in reply.leases:
                    assert lease.lease_id not in self.lease_owner, "a lease id was issued twice"
                    self.lease_owner[lease.lease_id] = sid
                    self.fresh[sid].append(lease.lease_id)

    def fetch(self, who: str, request: pb.FetchWeightsRequest) -> None:
        sid = request.sampler_id

        def first_chunk():
            stream = self.stub(who).FetchWeights(request, timeout=10)
            try:
                return next(stream, None)
            finally:
                stream.cancel()

        code, reply = self.send("FetchWeights", who, first_chunk)
        verdict = self.sampler_verdict(sid, who)
        newest = self.learner.version
        want = request.want_version or newest
        blame = ""
        if verdict is None:
            blame = sid
            base = request.have_version if request.have_version in self.learner.versions.held() and \
                request.have_version < want else 0
            if want > newest:
                verdict = C.INVALID_ARGUMENT
            elif request.offset > len(self.learner.versions.payload(base, want).data):
                verdict = C.OUT_OF_RANGE
        self.expect("FetchWeights", who, code, verdict or OK, reply, blame=blame if verdict else "")
        if code == OK and reply is not None:
            assert reply.offset == request.offset and reply.version == want

    def heartbeat(self, who: str, request: pb.HeartbeatRequest | bytes) -> None:
        message = _parse(pb.HeartbeatRequest, request)
        call = self.raw_unary(who, "Heartbeat") if isinstance(request, bytes) else self.stub(who).Heartbeat
        code, reply = self.send("Heartbeat", who, lambda: call(request, timeout=10))
        if message is None:
            return self.expect_undecodable("Heartbeat", who, code, reply)
        verdict = self.sampler_verdict(message.sampler_id, who)
        blame = ""
        if verdict is None and message.version > self.learner.version:
            verdict, blame = C.INVALID_ARGUMENT, message.sampler_id
        self.expect("Heartbeat", who, code, verdict or OK, reply, blame=blame)

    def status(self, who: str) -> None:
        code, reply = self.send("Status", who, lambda: self.stub(who).Status(pb.StatusRequest(), timeout=10))
        self.expect("Status", who, code, OK, reply)
        if code == OK:  # the learner's own books agree with the model at every moment
            assert sum(reply.rejections.values()) == self.refused
            for s in reply.samplers:
                assert s.groups_rejected == self.blamed[s.sampler_id], s.sampler_id
                assert s.groups_accepted == self.accepted_by[s.sampler_id], s.sampler_id

    def health(self, who: str, service: str) -> None:
        stub = health_pb2_grpc.HealthStub(self.channels[who])
        code, reply = self.send("Health", who, lambda: stub.Check(health_pb2.HealthCheckRequest(service=service),
                                                                   timeout=10))
        self.expect("Health", who, code, OK if service in ("", "heterorl.v1.Learner") else C.NOT_FOUND, reply)

    def submit(self, who: str, groups: list[pb.TrajectoryGroup | bytes]) -> None:
        """One stream; the learner answers in order and stops at the first refusal."""
        raw = any(isinstance(g, bytes) for g in groups)
        data = [g if isinstance(g, bytes) else g.SerializeToString() for g in groups]
        if raw:
            stream = self.channels[who].stream_stream(METHOD + "SubmitTrajectories", request_serializer=None,
                                                      response_deserializer=pb.SubmitAck.FromString)
            payload = data
        else:
            stream = self.stub(who).SubmitTrajectories
            payload = groups
        acks: list[pb.SubmitAck] = []

        def run():
            for ack in stream(iter(payload), timeout=20):
                acks.append(ack)

        code, reply = self.send("SubmitTrajectories", who, run, inputs=0)
        with self.lock:  # inputs: the groups the learner had to judge (it stops reading at a refusal)
            self.tried["SubmitTrajectories"] += 1 if code != OK else len(data)
        if not self.authenticated(who):
            return self.expect("SubmitTrajectories", who, code, C.UNAUTHENTICATED, reply)
        for i, blob in enumerate(data):
            message = _parse(pb.TrajectoryGroup, blob)
            if message is None:
                assert len(acks) == i, "a group after an undecodable one was answered"
                with self.lock:
                    self.tried["SubmitTrajectories"] += i
                return self.expect_undecodable("SubmitTrajectories", who, code, reply)
            verdict, blame, duplicate = self.group_verdict(message, who)
            if verdict != OK:
                assert len(acks) == i, f"groups answered before a refusal: {len(acks)}, expected {i}"
                with self.lock:
                    self.tried["SubmitTrajectories"] += i  # the groups before the refused one were judged too
                return self.expect("SubmitTrajectories", who, code, verdict, reply, blame)
            assert len(acks) > i, f"group {i} was valid but not acknowledged: {code.name} {_details(reply)}"
            ack = acks[i]
            assert ack.lease_id == message.lease_id
            if duplicate:
                assert ack.status == pb.ACK_STATUS_DUPLICATE
            else:
                assert ack.status == pb.ACK_STATUS_ACCEPTED
                with self.lock:
                    self.accepted[message.lease_id] = blob
                    self.accepted_by[message.sampler_id] += 1
                    if message.lease_id in self.fresh[message.sampler_id]:
                        self.fresh[message.sampler_id].remove(message.lease_id)
        assert code == OK and len(acks) == len(data)

    def expect_undecodable(self, rpc: str, who: str, code: grpc.StatusCode, reply) -> None:
        if not self.authenticated(who):
            return self.expect(rpc, who, code, C.UNAUTHENTICATED, reply)
        # gRPC itself refuses bytes that do not parse; the learner's handler never runs, so nothing is counted.
        assert code == C.INTERNAL, f"{rpc}: undecodable request answered {code.name}"


def _parse(cls, request):
    if not isinstance(request, bytes):
        return request
    try:
        return cls.FromString(request)
    except DecodeError:
        return None


def _details(reply) -> str:
    return reply.details() if isinstance(reply, grpc.RpcError) else ""


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """Flip, drop, insert, duplicate or truncate bytes of a serialized message."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            buf[min(pos, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
        elif op == 2:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3 and buf:
            del buf[pos:pos + rng.randint(1, 8)]
        elif op == 4:
            start = rng.randrange(len(buf) + 1)
            buf[pos:pos] = buf[start:start + rng.randint(1, 16)]
        else:
            del buf[pos:]
    return bytes(buf)


# ---- the served learner ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tiny_cache, tmp_path_factory):
    os.environ["HETERORL_CACHE"] = str(tiny_cache)
    run_dir = tmp_path_factory.mktemp("fuzz")
    tokens = run_dir / "tokens"
    tokens.write_text("".join(f"{name}:{token}\n" for name, token in TOKENS.items()))
    config = LearnerConfig(
        port=0, run_dir=run_dir, model="tiny", reward="digit_fraction", group_size=G, groups_per_step=8,
        max_new_tokens=MAX_NEW, eval_size=0, chunk_bytes=65536, lease_ttl_s=3600, max_inflight_groups=10**6,
        tokens_file=tokens, rate_calls_per_s=0, rate_groups_per_s=0,  # limits have their own tests
    )
    learner = Learner(config, log=lambda _m: None)
    errors = _ServerErrors()
    logging.getLogger("grpc").addHandler(errors)
    server, port = build_server(learner, "127.0.0.1", 0)
    server.start()
    w = World(learner, f"127.0.0.1:{port}")
    for who in ("alice", "alice", "bob", "bob"):
        w.register(who, pb.RegisterRequest(name=f"{who}-box", engine="transformers", device="cpu", max_batch=64))
    for sid in list(w.owner):
        w.lease(w.owner[sid], pb.LeaseRequest(sampler_id=sid, max_groups=64))
    yield w
    for channel in w.raws:
        channel.close()
    server.stop(0)
    logging.getLogger("grpc").removeHandler(errors)
    assert not errors.records, f"the server logged errors: {errors.records[:3]}"


credential = st.sampled_from(CREDENTIALS)
names = st.one_of(st.just("box"), st.text(max_size=70), st.text(alphabet="ab\n\t\x00", max_size=5),
                  st.just("x" * 64), st.just("x" * 65))


@given(who=credential, name=names, engine=st.one_of(st.sampled_from(ENGINES), st.text(max_size=12)),
       device=names, max_batch=st.one_of(st.integers(1, 8), st.integers(0, 2**32 - 1)),
       client_version=st.one_of(st.just("heterorl-0.1.0"), st.text(max_size=80)), raw=st.integers(0, 3))
@settings(FUZZ, max_examples=300)
def test_fuzz_register(world, who, name, engine, device, max_batch, client_version, raw):
    request = pb.RegisterRequest(name=name, engine=engine, device=device, max_batch=max_batch,
                                 client_version=client_version)
    world.register(who, mutate_bytes(request.SerializeToString(), world.rng) if raw == 0 else request)


sampler_ids = st.one_of(st.just("mine"), st.just("mine"), st.just("other"), st.just("S-0000000000000000"),
                        st.text(max_size=70))


def _resolve(world: World, who: str, sid: str) -> str:
    """'mine' / 'other': a sampler registered with the caller's credential / with the other one."""
    if sid == "mine":
        return world.a_sampler(who, world.rng)
    if sid == "other":
        others = sorted(s for s, o in world.owner.items() if o != who)
        return world.rng.choice(others) if others else "S-nobody"
    return sid


@given(who=credential, sid=sampler_ids, raw=st.integers(0, 3))
@settings(FUZZ, max_examples=200)
def test_fuzz_model_files(world, who, sid, raw):
    request = pb.ModelFilesRequest(sampler_id=_resolve(world, who, sid))
    world.model_files(who, mutate_bytes(request.SerializeToString(), world.rng) if raw == 0 else request)


@given(who=credential, sid=sampler_ids, max_groups=st.one_of(st.integers(1, 4), st.integers(0, 2**32 - 1)),
       raw=st.integers(0, 3))
@settings(FUZZ, max_examples=300)
def test_fuzz_lease_prompts(world, who, sid, max_groups, raw):
    request = pb.LeaseRequest(sampler_id=_resolve(world, who, sid), max_groups=max_groups)
    world.lease(who, mutate_bytes(request.SerializeToString(), world.rng) if raw == 0 else request)


@given(who=credential, sid=sampler_ids, have=st.one_of(st.integers(0, 3), st.integers(0, 2**64 - 1)),
       want=st.one_of(st.integers(0, 3), st.integers(0, 2**64 - 1)),
       offset=st.one_of(st.integers(0, 1 << 20), st.just(0), st.integers(0, 2**64 - 1)))
@settings(FUZZ, max_examples=200)
def test_fuzz_fetch_weights(world, who, sid, have, want, offset):
    if offset == 1:  # exactly the end of the payload: a valid request answered with no chunks
        offset = len(world.learner.versions.payload(0, world.learner.version).data)
    world.fetch(who, pb.FetchWeightsRequest(sampler_id=_resolve(world, who, sid), have_version=have,
                                            want_version=want, offset=offset))


@given(who=credential, sid=sampler_ids, version=st.one_of(st.integers(0, 2), st.integers(0, 2**64 - 1)),
       raw=st.integers(0, 3))
@settings(FUZZ, max_examples=200)
def test_fuzz_heartbeat(world, who, sid, version, raw):
    request = pb.HeartbeatRequest(sampler_id=_resolve(world, who, sid), version=version)
    world.heartbeat(who, mutate_bytes(request.SerializeToString(), world.rng) if raw == 0 else request)


def test_fuzz_status_and_health(world):
    rng = random.Random(1)
    services = ["", "heterorl.v1.Learner", "heterorl.v1.Nope", "\x00", "x" * 300]
    for _ in range(150):
        world.status(rng.choice(CREDENTIALS))
        world.health(rng.choice(CREDENTIALS), rng.choice(services))


# Field-level mutations of a valid group: each is a function of (group, world, draw-able values).
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from(
    [0.0, -0.0, 1e-3, 2e-3, 1.0, -1e30, 1e-45, float("nan"), float("inf"), float("-inf")]))


def _mutation():
    def tokens(g, i, values):
        c = g.completions[i % max(1, len(g.completions))] if g.completions else None
        if c is not None:
            del c.token_ids[:]
            c.token_ids.extend(values)

    def logprobs(g, i, values):
        if g.completions:
            c = g.completions[i % len(g.completions)]
            del c.logprobs[:]
            c.logprobs.extend(values)

    def set_field(name):
        def apply(g, i, value):
            if g.completions:
                setattr(g.completions[i % len(g.completions)], name, value)
        return apply

    def resize(g, i, n):
        while len(g.completions) > n:
            del g.completions[-1]
        while len(g.completions) < n:
            g.completions.add().CopyFrom(g.completions[0] if g.completions else pb.Completion())

    index = st.integers(0, G)
    token = st.one_of(st.integers(0, 40), st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2**32 - 1]))
    return st.one_of(
        st.tuples(st.just(tokens), index, st.lists(token, max_size=MAX_NEW + 2)),
        st.tuples(st.just(logprobs), index, st.lists(floats, max_size=MAX_NEW + 2)),
        st.tuples(st.just(set_field("finish_reason")), index, st.integers(-3, 5)),
        st.tuples(st.just(set_field("sampler_reward")), index, floats),
        st.tuples(st.just(resize), index, st.integers(0, G + 2)),
        st.tuples(st.just(lambda g, i, v: setattr(g, "policy_version", v)), index,
                  st.one_of(st.integers(0, 3), st.integers(0, 2**64 - 1))),
        st.tuples(st.just(lambda g, i, v: setattr(g, "generation_seconds", v)), index,
                  st.floats(allow_nan=True, allow_infinity=True)),
        st.tuples(st.just(lambda g, i, v: setattr(g, "lease_id", v)), index, st.text(max_size=70)),
        st.tuples(st.just(lambda g, i, v: setattr(g, "sampler_id", v)), index, st.text(max_size=70)),
    )


submissions = dict(
    who=credential, sid=st.sampled_from(["mine"] * 8 + ["other"]),
    lease=st.sampled_from(["fresh"] * 6 + ["accepted", "others", "unknown"]),
    mutations=st.lists(_mutation(), max_size=3), streamed=st.integers(1, 4),
)


def _submit(world, who, sid, lease, mutations, streamed, wire=False):
    rng = world.rng
    sender = _resolve(world, who if who in TOKENS else "alice", sid)
    if not world.fresh.get(sender) and sender in world.owner:
        world.lease(world.owner[sender], pb.LeaseRequest(sampler_id=sender, max_groups=64))
    groups = []
    for _ in range(streamed):
        group = world.valid_group(sender, rng)
        if lease == "accepted" and world.accepted:
            group.lease_id = rng.choice(sorted(world.accepted))
        elif lease == "others":
            group.lease_id = rng.choice(sorted(world.lease_owner))
        elif lease == "unknown":
            group.lease_id = f"L9-{rng.getrandbits(48):012x}"
        elif world.fresh.get(sender):
            group.lease_id = rng.choice(world.fresh[sender])
        for apply, i, value in mutations:
            apply(group, i, value)
        if rng.random() < 0.03:  # padded with a field the protocol does not have (length-delimited, number 99)
            pad = rng.randrange(2000)
            groups.append(group.SerializeToString() + varint(99 << 3 | 2) + varint(pad) + b"\0" * pad)
        elif wire:
            groups.append(mutate_bytes(group.SerializeToString(), rng))
        else:
            groups.append(group)
    world.submit(who, groups)




@given(**submissions)
@settings(FUZZ, max_examples=1500)
def test_fuzz_submit_trajectories(world, who, sid, lease, mutations, streamed):
    _submit(world, who, sid, lease, mutations, streamed)


def test_fuzz_submit_mutated_bytes(world):
    """Real groups with bytes flipped, dropped, inserted or cut on the wire (a seeded loop: cheaper than
    hypothesis per input, so it affords more of them)."""
    rng = random.Random(2)
    for _ in range(1500):
        who = rng.choice(CREDENTIALS)
        lease = rng.choice(["fresh"] * 6 + ["accepted", "others", "unknown"])
        _submit(world, who, rng.choice(["mine"] * 8 + ["other"]), lease, [], rng.randint(1, 3), wire=True)


def test_fuzz_concurrent_submitters(world):
    """Four threads at once, each with a sampler of its own, half their groups broken: the books still balance."""
    own = []
    for i in range(4):
        who = ("alice", "bob")[i % 2]
        world.register(who, pb.RegisterRequest(name=f"thread-{i}", engine="transformers", device="cpu", max_batch=64))
        own.append((who, next(s for s in reversed(world.owner) if world.owner[s] == who)))
    failures: list[BaseException] = []

    def worker(seed: int, who: str, sid: str) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(100):
                with world.lock:
                    fresh = list(world.fresh[sid])
                if not fresh:
                    world.lease(who, pb.LeaseRequest(sampler_id=sid, max_groups=64))
                    continue
                group = world.valid_group(sid, rng)
                group.lease_id = rng.choice(fresh)
                if rng.random() < 0.5:
                    group.completions[rng.randrange(G)].logprobs[0] = rng.choice([1.0, float("nan")])
                world.submit(who, [group])
        except BaseException as err:  # noqa: BLE001 - reported by the test thread
            failures.append(err)

    threads = [threading.Thread(target=worker, args=(seed, who, sid)) for seed, (who, sid) in enumerate(own)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, repr(failures[0])


def test_books_balance_and_only_accepted_groups_train(world):
    learner = world.learner
    # The model's view and the learner's agree exactly.
    world.status("alice")
    with learner.lock:
        stored = {g.lease_id: g for g in learner.store._groups}
        records = {sid: (r.groups_accepted, r.groups_rejected, r.principal) for sid, r in learner.samplers.items()}
    assert set(stored) == set(world.accepted), "stored groups differ from the acknowledged ones"
    for sid, (accepted, rejected, principal) in records.items():
        assert accepted == world.accepted_by[sid] and rejected == world.blamed[sid]
        assert principal == world.owner[sid]
    for lease_id, group in stored.items():  # exactly what was sent, every field within the run's limits
        sent = pb.TrajectoryGroup.FromString(world.accepted[lease_id])
        assert [list(c.token_ids) for c in sent.completions] == [c.token_ids for c in group.completions]
        assert all(max(c.token_ids) < world.vocab and all(math.isfinite(x) and x <= 0 for x in c.logprobs)
                   for c in group.completions)
    total = sum(world.tried.values())
    print(f"\nFUZZ inputs per RPC: {dict(sorted(world.tried.items()))}; total {total}; crashes 0")
    print(f"FUZZ outcomes: {dict(sorted(Counter({f'{r}:{c}': n for (r, c), n in world.outcomes.items()}).items()))}")
    print(f"FUZZ accepted {len(world.accepted)} groups, refused {world.refused} requests")
    if world.tried["SubmitTrajectories"] < 1000:
        pytest.skip("run the whole module: this test checks what the fuzz tests before it did")
    assert len(world.accepted) >= 2 * learner.config.groups_per_step and world.refused > 1000
    # Train on what was accepted: every trained lease was acknowledged, and the numbers stay finite.
    trained = []
    for _ in range(2):
        with learner.lock:
            batch = learner.store.take(learner.config.groups_per_step)
        record = learner.train_once(batch)
        trained += record["leases"]
        assert math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])
    assert set(trained) <= set(world.accepted) and len(trained) == len(set(trained))


@pytest.mark.slow
@given(**submissions)
@settings(FUZZ, max_examples=15_000, derandomize=False)
def test_fuzz_submit_trajectories_long(world, who, sid, lease, mutations, streamed):
    """Ten times the default groups, with fresh random choices each run; the books are compared now and then."""
    _submit(world, who, sid, lease, mutations, streamed)
    if world.rng.random() < 0.01:
        world.status("alice")
