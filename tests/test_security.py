"""Authentication, TLS, the bind policy, ownership of sampler ids, rate and size limits: each refusal has its exact
status and is counted under its reason, and honest callers keep working."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from heterorl import credentials
from heterorl.cli import format_status
from heterorl.common.config import from_flat
from heterorl.common.contract import Reason, refusal_reason
from heterorl.node.client import AuthenticationFailed, ClientSecurity, LearnerClient, RetryPolicy, open_channel
from heterorl.server.config import LearnerConfig
from heterorl.server.learner import Learner
from heterorl.server.ratelimit import RateLimiter, RateLimits
from heterorl.server.security import ServerSecurity, is_loopback
from heterorl.server.service import build_server
from heterorl.server.tokens import TokenTable, parse_tokens, token_digest
from heterorl.server.validate import max_group_bytes
from heterorl.v1 import learner_pb2 as pb
from heterorl.v1 import learner_pb2_grpc as pb_grpc

from conftest import REPO, tiny_learner_args, varint

G = 4
MAX_NEW = 8
ALICE = "alice-" + "a" * 26
BOB = "bob-" + "b" * 28

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command writes the test PKI")


# ---- pure parts ------------------------------------------------------------------------------------------------


def test_tokens_file_format_and_its_errors():
    entries = parse_tokens(f"# samplers\nalice:{ALICE}\n\n{BOB}   # a bare token gets a derived name\n")
    assert [e.name for e in entries] == ["alice", f"anon-{token_digest(BOB).hex()[:8]}"]
    assert ALICE not in repr(entries) and BOB not in repr(entries)
    bad = {
        "": "holds no tokens",
        "# only a comment\n": "holds no tokens",
        "alice:short": "line 1: a token must be 16..512",
        f"al ice:{ALICE}": "line 1: a name must be",
        f"alice:{ALICE}\nalice:{BOB}": "line 2: name 'alice' already used on line 1",
        f"alice:{ALICE}\nbob:{ALICE}": "line 2: the same token already appears on line 1",
        f"alice:{ALICE}\u00e9": "a token must be",
    }
    for text, message in bad.items():
        with pytest.raises(ValueError, match=message):
            parse_tokens(text)


def test_token_table_compares_every_entry_and_reloads_a_changed_file(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"alice:{ALICE}\n")
    table = TokenTable(path, reload_check_s=0.0)
    assert table.lookup(ALICE) == "alice"
    assert table.lookup(BOB) is None and table.lookup("") is None and table.lookup(ALICE + "x") is None
    path.write_text(f"bob:{BOB}\n")  # alice revoked, bob added
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert table.lookup(BOB) == "bob" and table.lookup(ALICE) is None
    path.write_text("bob:tooshort\n")  # a broken edit keeps the previous tokens
    os.utime(path, ns=(time.time_ns() + 2 * 10**9, time.time_ns() + 2 * 10**9))
    assert table.lookup(BOB) == "bob" and table.names == ["bob"]
    path.write_text(f"bob:{BOB}\n")
    slow = TokenTable(path, reload_check_s=3600.0)  # between checks the file is not even looked at
    path.write_text(f"alice:{ALICE}\n")
    os.utime(path, ns=(time.time_ns() + 3 * 10**9, time.time_ns() + 3 * 10**9))
    assert slow.lookup(BOB) == "bob" and slow.lookup(ALICE) is None


def test_sampler_token_comes_from_a_file_or_the_environment(tmp_path):
    line = tmp_path / "line"
    line.write_text(f"alice:{ALICE}\n")  # a line of the learner's tokens file works as is
    bare = tmp_path / "bare"
    bare.write_text(f"# mine\n{BOB}\n")
    assert ClientSecurity.load(line, env={}).token == ALICE
    assert ClientSecurity.load(bare, env={"HETERORL_TOKEN": ALICE}).token == BOB  # the file wins
    assert ClientSecurity.load(env={"HETERORL_TOKEN": f" {ALICE}\n"}).token == ALICE
    assert ClientSecurity.load(env={}).token == ""
    assert ALICE not in repr(ClientSecurity.load(line, env={}))
    with pytest.raises(ValueError, match="cannot read token file"):
        ClientSecurity.load(tmp_path / "missing", env={})
    with pytest.raises(ValueError, match="HETERORL_TOKEN environment variable: a token must be"):
        ClientSecurity.load(env={"HETERORL_TOKEN": "short"})
    with pytest.raises(ValueError, match="go together"):
        ClientSecurity.load(tls_cert=line, env={})


def test_new_token_command_appends_a_private_line(tmp_path):
    path = tmp_path / "tokens"
    first = credentials.append_token(path, "alice")
    second = credentials.append_token(path, "bob")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert [e.name for e in parse_tokens(path.read_text())] == ["alice", "bob"]
    assert TokenTable(path).lookup(second) == "bob" and first != second
    with pytest.raises(ValueError, match="already used"):
        credentials.append_token(path, "alice")
    # The operator's command: `heterorl new-token NAME --out FILE`, a no-op with --if-missing on a full file.
    from heterorl.cli import main as cli_main

    assert cli_main(["new-token", "carol", "--out", str(path)]) == 0
    assert cli_main(["new-token", "dave", "--out", str(path), "--if-missing"]) == 0
    assert [e.name for e in parse_tokens(path.read_text())] == ["alice", "bob", "carol"]
    assert cli_main(["new-token", "carol", "--out", str(path)]) == 2


def test_rate_limiter_buckets():
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=3.0, clock=lambda: now[0])
    assert [limiter.retry_after("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.retry_after("a") == pytest.approx(0.5)
    assert limiter.retry_after("b") == 0.0  # keys are independent
    now[0] += 0.5
    assert limiter.retry_after("a") == 0.0
    assert limiter.retry_after("c", cost=10.0) == 0.0  # dearer than the bucket: goes through on a full one
    assert RateLimiter(0, 0).retry_after("a") == 0.0  # disabled
    with pytest.raises(ValueError):
        RateLimits(calls_per_s=1.0, calls_burst=0.5)
    with pytest.raises(ValueError):
        RateLimits(groups_per_s=float("nan"))


def test_bind_policy():
    for host in ("127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.1.2.3", "8.8.8.8"):
        assert not is_loopback(host), host
    open_ = ServerSecurity()
    assert open_.check_bind("127.0.0.1") == []
    with pytest.raises(ValueError, match="refusing to listen on '0.0.0.0' without authentication.*--insecure"):
        open_.check_bind("0.0.0.0")
    assert "no authentication" in ServerSecurity(insecure=True).check_bind("0.0.0.0")[0]


# ---- a real server ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "tokens"
    path.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    path.chmod(0o600)
    return path


def _config(run_dir: Path, **overrides) -> LearnerConfig:
    settings = dict(
        port=0, run_dir=run_dir, model="tiny", reward="digit_fraction", group_size=G, groups_per_step=2,
        max_new_tokens=MAX_NEW, eval_size=0, chunk_bytes=65536, lease_ttl_s=60, max_inflight_groups=1000,
    )
    settings.update(overrides)
    return from_flat(LearnerConfig, **settings)


@pytest.fixture(scope="module")
def learner(tiny_cache, tmp_path_factory):
    os.environ["HETERORL_CACHE"] = str(tiny_cache)
    return Learner(_config(tmp_path_factory.mktemp("run")))


class Served:
    """The module's learner behind a server with the security settings that `overrides` name."""

    def __init__(self, learner: Learner, host: str = "127.0.0.1", **overrides):
        self.learner = learner
        security = ServerSecurity.from_config(_config(learner.config.run.run_dir, **overrides).security)
        self.server, self.port = build_server(learner, host, 0, security=security)
        self.server.start()
        self.target = f"127.0.0.1:{self.port}"
        self.channels = []

    def stub(self, security: ClientSecurity | None = None) -> pb_grpc.LearnerStub:
        return pb_grpc.LearnerStub(self.raw(security))

    def raw(self, security: ClientSecurity | None = None) -> grpc.Channel:
        raw, calls = open_channel(self.target, security or ClientSecurity())
        self.channels.append(raw)
        return calls

    def close(self) -> None:
        for c in self.channels:
            c.close()
        self.server.stop(0)


@pytest.fixture
def served(learner, tokens_file):
    s = Served(learner, tokens_file=tokens_file)
    yield s
    s.close()


def refusal(call) -> tuple[grpc.StatusCode, Reason | None, str]:
    """(status code, reason, message) of a refused call."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), refusal_reason(info.value), info.value.details()


def code_of(call) -> tuple[grpc.StatusCode, str]:
    code, _, details = refusal(call)
    return code, details


def register(stub, name="t") -> str:
    return stub.Register(pb.RegisterRequest(name=name, engine="transformers", device="cpu", max_batch=8)).sampler_id


def good_group(sid: str, lease_id: str) -> pb.TrajectoryGroup:
    comps = [pb.Completion(token_ids=[5, 6], logprobs=[-1.0, -0.5], finish_reason=pb.FINISH_REASON_LENGTH)
             for _ in range(G)]
    return pb.TrajectoryGroup(sampler_id=sid, lease_id=lease_id, policy_version=1, completions=comps)


def as_(token: str) -> ClientSecurity:
    return ClientSecurity(token=token)


def view_of(stub, sid: str) -> pb.SamplerStatus:
    return next(s for s in stub.Status(pb.StatusRequest()).samplers if s.sampler_id == sid)


def test_calls_without_a_known_token_are_refused_with_their_reason_and_counted(served):
    me = served.stub(as_(ALICE))
    before = me.Status(pb.StatusRequest())
    anonymous, forged = served.stub(), served.stub(as_("z" * 32))
    request = pb.RegisterRequest(name="x", engine="transformers", device="cpu", max_batch=1)
    code, reason, details = refusal(lambda: anonymous.Register(request))
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, Reason.TOKEN_MISSING)
    assert "authorization: Bearer <token>" in details
    code, reason, details = refusal(lambda: forged.Register(request))
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, Reason.TOKEN_INVALID) and "not recognised" in details
    # Every RPC kind is guarded, streaming ones included; a wrong scheme is refused too.
    assert refusal(lambda: list(forged.FetchWeights(pb.FetchWeightsRequest(sampler_id="S-x"))))[:2] == \
        (grpc.StatusCode.UNAUTHENTICATED, Reason.TOKEN_INVALID)
    assert refusal(lambda: list(anonymous.SubmitTrajectories(iter([pb.TrajectoryGroup()]))))[:2] == \
        (grpc.StatusCode.UNAUTHENTICATED, Reason.TOKEN_MISSING)
    basic = pb_grpc.LearnerStub(served.raw())
    assert refusal(lambda: basic.Status(pb.StatusRequest(), metadata=(("authorization", f"Basic {ALICE}"),)))[:2] \
        == (grpc.StatusCode.UNAUTHENTICATED, Reason.TOKEN_INVALID)
    status = me.Status(pb.StatusRequest())
    assert len(status.samplers) == len(before.samplers), "no refused call may register anything"
    assert status.rejections["token_missing"] - before.rejections.get("token_missing", 0) == 2
    assert status.rejections["token_invalid"] - before.rejections.get("token_invalid", 0) == 3
    assert status.security == "2 tokens"
    # Health checks stay open (probes carry no token); reflection does not.
    health = health_pb2_grpc.HealthStub(served.raw())
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(served.raw())
    with pytest.raises(grpc.RpcError) as info:
        list(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_sampler_id_answers_only_to_the_token_that_registered_it(served):
    alice, bob = served.stub(as_(ALICE)), served.stub(as_(BOB))
    before = alice.Status(pb.StatusRequest()).rejections.get("not_owner", 0)
    sid = register(alice, "alice-box")
    lease = alice.LeasePrompts(pb.LeaseRequest(sampler_id=sid, max_groups=1)).leases[0]
    theft = {
        "lease": lambda: bob.LeasePrompts(pb.LeaseRequest(sampler_id=sid, max_groups=1)),
        "heartbeat": lambda: bob.Heartbeat(pb.HeartbeatRequest(sampler_id=sid, version=1)),
        "files": lambda: bob.GetModelFiles(pb.ModelFilesRequest(sampler_id=sid)),
        "weights": lambda: list(bob.FetchWeights(pb.FetchWeightsRequest(sampler_id=sid))),
        "submit": lambda: list(bob.SubmitTrajectories(iter([good_group(sid, lease.lease_id)]))),
    }
    for what, call in theft.items():
        code, reason, details = refusal(call)
        assert code == grpc.StatusCode.NOT_FOUND, what  # as if the id did not exist: ids are not confirmed
        assert reason == Reason.NOT_OWNER, what  # the reason (for the learner's books) says whose it is
        assert f"unknown sampler id {sid!r} for this credential" in details
    mine = view_of(alice, sid)
    assert mine.principal == "alice" and mine.groups_rejected == 0, "the victim is not blamed"
    status = alice.Status(pb.StatusRequest())
    assert status.rejections["not_owner"] - before == len(theft)
    # The lease stayed alice's and outstanding: her group goes in.
    ack = list(alice.SubmitTrajectories(iter([good_group(sid, lease.lease_id)])))[0]
    assert ack.status == pb.ACK_STATUS_ACCEPTED


def test_refusals_are_counted_per_sampler_by_reason_and_shown_by_status(served):
    alice = served.stub(as_(ALICE))
    sid = register(alice, "counted")
    lease = alice.LeasePrompts(pb.LeaseRequest(sampler_id=sid, max_groups=1)).leases[0]
    bad_logprob = good_group(sid, lease.lease_id)
    bad_logprob.completions[0].logprobs[0] = 0.5
    bad_token = good_group(sid, lease.lease_id)
    bad_token.completions[1].token_ids[0] = served.learner.vocab_size
    for group, reason in ((bad_logprob, Reason.LOGPROB), (bad_logprob, Reason.LOGPROB), (bad_token, Reason.TOKEN_ID)):
        assert refusal(lambda g=group: list(alice.SubmitTrajectories(iter([g]))))[:2] == \
            (grpc.StatusCode.INVALID_ARGUMENT, reason)
    assert refusal(lambda: alice.LeasePrompts(pb.LeaseRequest(sampler_id=sid, max_groups=0)))[:2] == \
        (grpc.StatusCode.INVALID_ARGUMENT, Reason.MAX_GROUPS)
    status = alice.Status(pb.StatusRequest())
    mine = [s for s in status.samplers if s.sampler_id == sid][0]
    assert dict(mine.rejections) == {"logprob": 2, "token_id": 1, "max_groups": 1}
    assert mine.groups_rejected == 4
    text = format_status(status)
    assert "refused: logprob 2, max_groups 1, token_id 1" in text
    assert "security: 2 tokens" in text and "refused requests by reason (all callers):" in text


def test_status_command_sends_the_token(served, tokens_file, capsys):
    from heterorl.cli import main as cli_main

    assert cli_main(["status", "--learner", served.target, "--token-file", str(tokens_file)]) == 0
    assert "security: 2 tokens" in capsys.readouterr().out
    env = dict(os.environ)
    os.environ.pop("HETERORL_TOKEN", None)
    try:
        assert cli_main(["status", "--learner", served.target]) == 2
    finally:
        os.environ.clear()
        os.environ.update(env)
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_rate_limits_answer_resource_exhausted_per_sampler(learner, tokens_file):
    served = Served(learner, tokens_file=tokens_file, rate_calls_per_s=0.01, rate_calls_burst=10,
                    rate_groups_per_s=0.01, rate_groups_burst=2)
    limited = (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED)
    try:
        alice, bob = served.stub(as_(ALICE)), served.stub(as_(BOB))
        sid, other = register(alice, "fast"), register(bob, "calm")
        # Register costs 10 calls (it creates a record the learner keeps): one per burst per credential.
        code, reason, details = refusal(lambda: register(alice, "again"))
        assert (code, reason) == limited and "Register calls of alice exceeded" in details
        leases = alice.LeasePrompts(pb.LeaseRequest(sampler_id=sid, max_groups=3)).leases  # call 1 of 10
        for _ in range(9):
            alice.Heartbeat(pb.HeartbeatRequest(sampler_id=sid, version=1))
        code, reason, details = refusal(lambda: alice.Heartbeat(pb.HeartbeatRequest(sampler_id=sid, version=1)))
        assert (code, reason) == limited and f"sampler {sid} exceeded 0.01/s (burst 10)" in details
        bob.Heartbeat(pb.HeartbeatRequest(sampler_id=other, version=1))  # another sampler is unaffected
        # Groups have their own bucket: two go in, the third is refused, and what came before stays acked.
        acks = []
        with pytest.raises(grpc.RpcError) as info:
            for ack in alice.SubmitTrajectories(iter([good_group(sid, l.lease_id) for l in leases])):
                acks.append(ack)
        assert (info.value.code(), refusal_reason(info.value)) == limited
        assert [a.status for a in acks] == [pb.ACK_STATUS_ACCEPTED] * 2
        # Status names no sampler either: limited per credential (bob's calls are his own).
        codes = []
        for _ in range(11):
            try:
                alice.Status(pb.StatusRequest())
                codes.append("ok")
            except grpc.RpcError as err:
                codes.append(err.code().name)
        assert codes == ["ok"] * 10 + ["RESOURCE_EXHAUSTED"]
        status = bob.Status(pb.StatusRequest())
        assert status.rejections["rate_limited"] == 4
        assert dict(next(s for s in status.samplers if s.sampler_id == sid).rejections) == {"rate_limited": 2}
    finally:
        served.close()
    # The refused group's lease is still alice's and outstanding: with the limits gone it goes in.
    unlimited = Served(learner, tokens_file=tokens_file)
    try:
        ack = list(unlimited.stub(as_(ALICE)).SubmitTrajectories(iter([good_group(sid, leases[2].lease_id)])))[0]
        assert ack.status == pb.ACK_STATUS_ACCEPTED
    finally:
        unlimited.close()


def test_oversized_and_padded_messages_are_refused_before_they_count(served):
    alice = served.stub(as_(ALICE))
    sid = register(alice, "padded")
    lease = alice.LeasePrompts(pb.LeaseRequest(sampler_id=sid, max_groups=1)).leases[0]
    limit = max_group_bytes(G, MAX_NEW)
    # A valid group padded with a field the protocol does not have (number 99, bytes): parsed, kept as unknown.
    padding = varint(99 << 3 | 2) + varint(limit) + b"\0" * limit
    raw = good_group(sid, lease.lease_id).SerializeToString() + padding
    submit = served.raw(as_(ALICE)).stream_stream(
        "/heterorl.v1.Learner/SubmitTrajectories", request_serializer=None, response_deserializer=None)
    code, reason, details = refusal(lambda: list(submit(iter([raw]))))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, Reason.MESSAGE_SIZE) and f"at most {limit}" in details
    assert dict(view_of(alice, sid).rejections) == {"message_size": 1}
    # Past the server's receive limit gRPC itself refuses before any handler runs; the server keeps serving.
    huge = good_group(sid, lease.lease_id).SerializeToString() + varint(99 << 3 | 2) + varint(2 << 20) + \
        b"\0" * (2 << 20)
    assert code_of(lambda: list(submit(iter([huge]))))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    ack = list(alice.SubmitTrajectories(iter([good_group(sid, lease.lease_id)])))[0]
    assert ack.status == pb.ACK_STATUS_ACCEPTED


def test_client_gives_up_on_refused_credentials_but_not_on_rate_limits(served):
    client = LearnerClient(served.target, RetryPolicy(initial_s=0.01, max_s=0.02, give_up_s=1.0),
                           security=as_("w" * 40))
    try:
        started = time.monotonic()
        with pytest.raises(AuthenticationFailed, match="not recognised"):
            client.register("x", "transformers", "cpu", 1, "test")
        assert time.monotonic() - started < 0.5, "a refused token must not be retried"
    finally:
        client.close()
    good = LearnerClient(served.target, security=as_(BOB))
    try:
        sid = good.register("x", "transformers", "cpu", 1, "test").sampler_id
        assert good.lease(sid, 1).leases
    finally:
        good.close()


# ---- TLS -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command writes the test PKI")
    return credentials.write_pki(tmp_path_factory.mktemp("pki"), client_name="sampler-7")


@needs_openssl
def test_tls_server_with_tokens(learner, tokens_file, pki, tmp_path):
    served = Served(learner, tokens_file=tokens_file, tls_cert=pki.server_cert, tls_key=pki.server_key)
    try:
        secure = ClientSecurity.load(tls_ca=pki.ca, env={"HETERORL_TOKEN": ALICE})
        assert secure.tls and secure.describe() == "TLS, token"
        stub = served.stub(secure)
        assert register(stub, "tls")
        assert stub.Status(pb.StatusRequest()).security == "TLS, 2 tokens"
        # Plaintext to a TLS port, or a CA that did not sign the server: no connection at all.
        assert code_of(lambda: served.stub(as_(ALICE)).Status(pb.StatusRequest(), timeout=3))[0] == \
            grpc.StatusCode.UNAVAILABLE
        other = credentials.write_pki(tmp_path / "other")
        stranger = ClientSecurity.load(tls_ca=other.ca, env={"HETERORL_TOKEN": ALICE})
        assert code_of(lambda: served.stub(stranger).Status(pb.StatusRequest(), timeout=3))[0] == \
            grpc.StatusCode.UNAVAILABLE
        # A certificate for another name is refused unless the expected name is given explicitly.
        renamed = credentials.write_pki(tmp_path / "renamed", server_names=("learner.internal",))
        served2 = Served(learner, tokens_file=tokens_file, tls_cert=renamed.server_cert,
                         tls_key=renamed.server_key)
        try:
            wrong_name = ClientSecurity.load(tls_ca=renamed.ca, env={"HETERORL_TOKEN": ALICE})
            assert code_of(lambda: served2.stub(wrong_name).Status(pb.StatusRequest(), timeout=3))[0] == \
                grpc.StatusCode.UNAVAILABLE
            named = ClientSecurity.load(tls_ca=renamed.ca, server_name="learner.internal",
                                        env={"HETERORL_TOKEN": ALICE})
            assert served2.stub(named).Status(pb.StatusRequest(), timeout=3).security == "TLS, 2 tokens"
        finally:
            served2.close()
    finally:
        served.close()


@needs_openssl
def test_mutual_tls_identifies_samplers_by_certificate(learner, pki):
    # Client certificates authenticate: any address may be bound.
    served = Served(learner, host="0.0.0.0", tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca)
    try:
        with_cert = ClientSecurity.load(tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key, env={})
        stub = served.stub(with_cert)
        sid = register(stub, "mtls")
        assert view_of(stub, sid).principal == "cert:sampler-7"
        assert stub.Status(pb.StatusRequest()).security == "mutual TLS"
        without = ClientSecurity.load(tls_ca=pki.ca, env={})
        assert code_of(lambda: served.stub(without).Status(pb.StatusRequest(), timeout=3))[0] == \
            grpc.StatusCode.UNAVAILABLE
    finally:
        served.close()


# ---- the daemons -----------------------------------------------------------------------------------------------


def test_learner_refuses_a_public_bind_without_credentials(tmp_path, tiny_cache):
    env = {**os.environ, "HETERORL_CACHE": str(tiny_cache)}
    args = [sys.executable, "-m", "heterorl.server.main", *tiny_learner_args(tmp_path / "run", host="0.0.0.0")]
    result = subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert result.returncode == 2
    assert "refusing to listen on '0.0.0.0' without authentication" in result.stderr
    assert not (tmp_path / "run" / "learner.json").exists()
    with pytest.raises(ValueError, match="cannot read tokens file"):
        ServerSecurity.from_config(from_flat(LearnerConfig, tokens_file=tmp_path / "missing").security)
    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        ServerSecurity.from_config(from_flat(LearnerConfig, tls_cert=tmp_path / "c").security)
    with pytest.raises(ValueError, match="needs --tls-cert"):
        ServerSecurity.from_config(from_flat(LearnerConfig, tls_client_ca=tmp_path / "c").security)


@needs_openssl
def test_daemons_train_over_tls_with_tokens_and_a_stranger_is_turned_away(processes, tmp_path, pki):
    tokens = tmp_path / "tokens"
    token = credentials.append_token(tokens, "worker")
    mine = tmp_path / "worker.token"
    mine.write_text(token + "\n")
    stolen = tmp_path / "stolen.token"
    stolen.write_text("s" * 43 + "\n")
    learner, target = processes.learner(
        tmp_path / "run", max_steps=2, eval_size=0, tokens_file=tokens, tls_cert=pki.server_cert,
        tls_key=pki.server_key,
    )
    from heterorl.cli import fetch_status

    operator = ClientSecurity.load(mine, tls_ca=pki.ca, env={})
    assert fetch_status(target, security=operator).security == "TLS, 1 token"
    tls = ("--tls-ca", str(pki.ca))
    stranger = processes.sampler("stranger", target, "--token-file", str(stolen), *tls)
    assert stranger.wait(timeout=300) == 3  # refused credentials; generous: start-up imports are slow when loaded
    status = fetch_status(target, security=operator)
    assert status.rejections["token_invalid"] >= 1 and not status.samplers  # turned away, nothing registered
    processes.sampler("worker", target, "--token-file", str(mine), "--max-batch", "1", *tls)
    assert learner.wait(timeout=480) == 0, learner.log_path.read_text()[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["groups_trained"] == 4
