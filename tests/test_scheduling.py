"""Lease sizing (heterorl/server/scheduling.py): the rules, the learner's use of them, and the sampler's side.

The rules are checked on the scheduler with measured samplers fed in directly (a fast near one, a slow far one);
then through a real learner's ingest (expiry shortened per sampler, an expired sampler shrunk to one group), over
gRPC (the refresh hint in LeaseReply), and with the real sampler loop against a scripted learner (it loads the
newer version before generating when the hint says so, unless it lags on purpose).
"""

from __future__ import annotations

import threading

import pytest
import torch

from heterorl.common import codec
from heterorl.common.config import from_flat
from heterorl.common.contract import MAX_MESSAGE_BYTES
from heterorl.common.weights import ENCODING_ANCHOR, weight_tensors
from heterorl.node.config import SamplerConfig
from heterorl.node.sampler import Sampler
from heterorl.server.scheduling import Scheduler, SchedulingConfig
from heterorl.v1 import learner_pb2 as pb

from test_sampler import ScriptedLearner, Script, model_dir, prompt  # noqa: F401 - fixtures

ADAPTIVE = SchedulingConfig(policy="adaptive", ttl_s=300.0, min_ttl_s=5.0, target_versions=2.0, refresh_lag=8,
                            window=12)


def paced(config: SchedulingConfig = ADAPTIVE, seconds_per_version: float = 1.0) -> Scheduler:
    """A scheduler that has seen the learner publish a version every `seconds_per_version`."""
    s = Scheduler(config)
    for v in range(1, 6):
        s.observe_version(v, v * seconds_per_version)
    return s


def measure(s: Scheduler, sid: str, batch: int, generation_s: float, overhead_s: float, rounds: int = 5,
            start: float = 10.0) -> float:
    """`rounds` batches of `batch` leases returned after generation + overhead; returns the time after them."""
    now = start
    for _ in range(rounds):
        s.plan(sid, batch, batch, 100, 0, now)
        issued = now
        now += generation_s + overhead_s
        for _ in range(batch):
            s.returned(sid, issued, batch, now, generation_s)
    return now


def test_uniform_gives_what_is_asked_within_max_batch_and_room_for_the_full_ttl():
    s = Scheduler(SchedulingConfig(policy="uniform", ttl_s=300.0, window=12))
    assert s.plan("a", 8, 4, 12, 0, 0.0) == (plan := s.plan("a", 8, 4, 12, 0, 0.0))
    assert (plan.n, plan.ttl_s) == (4, 300.0)
    assert s.plan("a", 8, 16, 3, 0, 0.0).n == 3
    assert s.plan("a", 8, 16, 0, 0, 0.0).n == 0
    assert s.refresh_below(100) == 0  # no hints from a uniform learner


def test_the_learners_pace_is_measured_from_versions_seen():
    s = paced(seconds_per_version=1.5)
    assert s.version_s.value == pytest.approx(1.5)
    assert s.horizon_s() == pytest.approx(3.0)
    s.observe_version(7, 5 * 1.5 + 3.0)  # two versions in 3 s
    assert s.version_s.value == pytest.approx(1.5)


def test_an_unmeasured_sampler_gets_what_it_asks_for_the_full_ttl():
    plan = paced().plan("new", 4, 4, 12, 0, 10.0)
    assert (plan.n, plan.ttl_s) == (4, 300.0)


def test_a_fast_sampler_grows_to_its_max_batch_and_a_slow_far_one_gets_one_group():
    s = paced(SchedulingConfig(policy="adaptive", window=100), seconds_per_version=1.0)  # horizon: 2 s
    now = measure(s, "fast", 2, generation_s=0.2, overhead_s=0.01)  # 0.1 s per group
    sizes = [s.plan("fast", 16, 16, 100, 0, now + i).n for i in range(4)]
    assert sizes == [4, 8, 16, 16]  # doubles per batch up to what it asks for; the horizon allows 19
    now = measure(s, "far", 2, generation_s=1.6, overhead_s=1.2)  # 0.8 s per group, 1.2 s round trip
    assert s.plan("far", 16, 16, 100, 0, now).n == 1  # (2 - 1.2) / 0.8 = 1 group fits the horizon


def test_the_horizon_follows_the_learners_pace():
    s = paced(SchedulingConfig(policy="adaptive", window=100), seconds_per_version=10.0)  # 20 s horizon
    now = measure(s, "far", 2, generation_s=1.6, overhead_s=1.2)  # 2.8 s: on time, so it grows
    assert [s.plan("far", 64, 64, 100, 0, now + i).n for i in range(4)] == [4, 8, 16, 32]
    s.returned("far", now + 3, 32, now + 3 + 26.8, 25.6)  # 32 groups took 26.8 s: late for a 20 s horizon
    for _ in range(10):  # ... and keep being late
        s.returned("far", now + 31, 32, now + 31 + 26.8, 25.6)
        s.perf["far"].last_seen_batch = -1
    assert s.plan("far", 64, 64, 100, 0, now + 60).n == 23  # cut to what fits: (20 - 1.2) / 0.8


def test_expiry_is_a_few_turnarounds_of_the_batch_within_the_bounds():
    s = paced()
    now = measure(s, "far", 1, generation_s=2.0, overhead_s=1.0)
    plan = s.plan("far", 1, 1, 100, 0, now)
    assert plan.n == 1
    assert plan.ttl_s == pytest.approx(3 * 3.0 + 4 * s.perf["far"].turnaround_s.dev)
    assert 9.0 <= plan.ttl_s < 300.0  # minutes less than lease_ttl_s: a vanished sampler frees its prompt soon
    now = measure(s, "near", 1, generation_s=0.05, overhead_s=0.01)
    assert s.plan("near", 1, 1, 100, 0, now).ttl_s == ADAPTIVE.min_ttl_s  # never below the floor
    s2 = paced(SchedulingConfig(policy="adaptive", ttl_s=20.0, min_ttl_s=5.0, window=12), 100.0)
    now = measure(s2, "crawl", 1, generation_s=30.0, overhead_s=5.0)
    assert s2.plan("crawl", 1, 1, 100, 0, now).ttl_s == 20.0  # never above lease_ttl_s


def test_a_slow_sampler_cannot_take_the_window_a_fast_one_needs():
    s = paced(SchedulingConfig(policy="adaptive", ttl_s=300.0, min_ttl_s=5.0, target_versions=50.0, window=12))
    now = measure(s, "fast", 4, generation_s=0.4, overhead_s=0.0)   # 10 groups/s
    now = measure(s, "slow", 4, generation_s=3.6, overhead_s=0.4, start=now)  # 1 group/s
    assert s.share("fast", now) == 11 and s.share("slow", now) == 2  # ceil(12 * 10/11), ceil(12 * 1/11)
    # The window has room for 12, the slow sampler asks for 8 and holds 1: it gets one more, not 8.
    assert s.plan("slow", 8, 8, 12, 1, now).n == 1
    assert s.plan("slow", 8, 8, 12, 2, now).n == 0
    assert s.plan("fast", 8, 8, 10, 0, now).n == 8


def test_a_sampler_whose_lease_expired_gets_one_group_until_it_returns_one():
    s = paced()
    now = measure(s, "a", 4, generation_s=0.4, overhead_s=0.0)
    assert s.plan("a", 4, 4, 100, 0, now).n == 4
    rate = s.perf["a"].rate.value
    s.expired("a")
    assert s.perf["a"].rate.value == pytest.approx(rate / 2)
    assert s.plan("a", 4, 4, 100, 0, now + 1).n == 1
    s.returned("a", now + 1, 1, now + 1.2, 0.1)
    assert s.plan("a", 4, 4, 100, 0, now + 2).n == 2  # grows back from the one-group batch


@pytest.mark.parametrize("claimed", [float("nan"), float("inf"), -1.0, 0.0, 1e9])
def test_a_nonsense_generation_time_counts_the_whole_turnaround_as_work(claimed):
    s = paced()
    s.plan("liar", 2, 2, 100, 0, 10.0)
    s.returned("liar", 10.0, 2, 12.0, claimed)
    perf = s.perf["liar"]
    assert perf.per_group_s.value == pytest.approx(1.0) and perf.overhead_s.value == 0.0


def test_one_sample_per_batch():
    s = paced()
    s.plan("a", 4, 4, 100, 0, 10.0)
    for i in range(4):
        s.returned("a", 10.0, 4, 11.0 + i, 0.5)
    perf = s.perf["a"]
    assert perf.returned == 4 and perf.turnaround_s.value == pytest.approx(1.0)


def test_idle_samplers_are_told_to_poll_less_the_more_of_them_wait():
    s = Scheduler(SchedulingConfig(policy="adaptive", window=4))
    assert s.plan("worker", 4, 4, 4, 0, 0.0).n == 4  # fills the window
    for i in range(200):  # 200 samplers find it full
        assert s.plan(f"idle-{i}", 4, 4, 0, 0, 0.5).n == 0
    for t in (1.6, 2.7):  # one group freed per second
        s.returned("worker", 0.0, 4, t, 0.1)
        s.retry_after(t)
    assert s.waiting == 200
    assert s.retry_after(2.8) == 10.0  # 200 / (2 x 1/s) = 100 s: capped
    few = Scheduler(SchedulingConfig(policy="adaptive", window=4))
    few.plan("idle", 4, 4, 0, 0, 0.0)
    assert few.retry_after(1.5) == 0.5  # one waiting sampler: the floor
    assert Scheduler(SchedulingConfig(policy="uniform")).retry_after(1.0) == 0.0


def test_refresh_hint():
    s = Scheduler(ADAPTIVE)
    assert s.refresh_below(5) == 0 and s.refresh_below(8) == 0
    assert s.refresh_below(20) == 12
    assert Scheduler(SchedulingConfig(policy="adaptive", refresh_lag=0)).refresh_below(20) == 0


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="lease_policy"):
        SchedulingConfig(policy="fastest")
    from heterorl.server.config import ServeSection

    with pytest.raises(ValueError, match="lease_policy"):
        ServeSection(lease_policy="fastest")
    assert ServeSection().lease_policy == "adaptive"


# ---- through a real learner ------------------------------------------------------------------------------------


@pytest.fixture
def learner(tmp_path, tiny_cache, monkeypatch):
    monkeypatch.setenv("HETERORL_CACHE", str(tiny_cache))
    from heterorl.server.config import LearnerConfig
    from heterorl.server.learner import Learner

    config = from_flat(LearnerConfig, run_dir=tmp_path / "run", model="tiny", group_size=2, groups_per_step=2,
                       max_new_tokens=4, eval_size=0, lease_ttl_s=120.0, lease_min_ttl_s=1.0,
                       max_inflight_groups=64, lease_refresh_lag=2)
    learner = Learner(config)
    yield learner
    learner.close()


def submit_all(learner, sid: str, leases, generation_s: float) -> None:
    from heterorl.server.ingest import Submission

    for lease in leases:
        learner.submit(Submission(sid, lease.lease_id, learner.version, [([5, 6], [-0.5, -0.5], 2, None)] * 2,
                                  generation_seconds=generation_s))


def test_the_learner_shortens_a_measured_samplers_leases_and_expires_them_when_it_vanishes(learner):
    sid = learner.register("far", "transformers", "cpu", 4).sampler_id
    first = learner.lease(sid, 4)
    assert len(first) == 4 and all(l.expires_at - l.issued_at == pytest.approx(120.0) for l in first)
    submit_all(learner, sid, first, generation_s=0.01)
    second = learner.lease(sid, 4)
    ttl = second[0].expires_at - second[0].issued_at
    assert 1.0 <= ttl < 30.0  # a few of its own turnarounds, not lease_ttl_s
    # It vanishes: its leases expire within that ttl and it is then held to one group.
    import time

    time.sleep(ttl + 0.1)
    assert learner.lease(learner.register("other", "transformers", "cpu", 1).sampler_id, 1)  # triggers expiry
    # expired, and the other sampler's lease took one of their prompts over (released)
    assert all(learner.lease_state(l.lease_id).value in ("expired", "released") for l in second)
    assert learner.ingest.scheduler.perf[sid].expired == len(second)
    assert len(learner.lease(sid, 4)) == 1


def test_lease_reply_carries_the_refresh_hint(learner):
    import grpc

    from heterorl.server.service import build_server
    from heterorl.v1 import learner_pb2_grpc as pb_grpc

    for _ in range(5):
        learner.publish()  # versions 2..6
    server, port = build_server(learner, "127.0.0.1", 0)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.LearnerStub(channel)
            sid = stub.Register(pb.RegisterRequest(name="s", engine="transformers", device="cpu",
                                                   max_batch=1)).sampler_id
            reply = stub.LeasePrompts(pb.LeaseRequest(sampler_id=sid, max_groups=1))
    finally:
        server.stop(0)
    assert reply.current_version == 6 and reply.refresh_below_version == 4


# ---- the sampler's side ----------------------------------------------------------------------------------------


class TwoVersionLearner(ScriptedLearner):
    """Register says version 1 is newest; the lease reply says 2 is, and asks for >= 2 before generating."""

    def __init__(self, model_dir, script):
        super().__init__(model_dir, script)
        tensors = {n: t.detach().to(torch.bfloat16) for n, t in
                   weight_tensors(__import__("heterorl.common.model", fromlist=["x"]).load_causal_lm(model_dir)).items()}
        first = next(iter(tensors))
        tensors[first] = tensors[first] + 1  # version 2: other weights
        self.anchor2 = bytes(codec.encode(tensors))
        self.sha2 = codec.digest(tensors)
        self.fetches: list[tuple[int, int]] = []

    def FetchWeights(self, request, context):
        import hashlib

        self.fetches.append((request.have_version, request.want_version))
        if not self.fetches[1:]:
            yield from super().FetchWeights(request, context)
            return
        data = self.anchor2[request.offset:]
        yield pb.WeightChunk(version=2, base_version=0, encoding=ENCODING_ANCHOR, total_bytes=len(self.anchor2),
                             offset=request.offset, data=data, chunk_sha256=hashlib.sha256(data).hexdigest(),
                             payload_sha256=hashlib.sha256(self.anchor2).hexdigest(), weights_sha256=self.sha2)

    def LeasePrompts(self, request, context):
        reply = super().LeasePrompts(request, context)
        reply.current_version, reply.refresh_below_version = 2, 2
        return reply

    def SubmitTrajectories(self, request_iterator, context):
        for group in request_iterator:
            self.accepted[group.lease_id] = group
            yield pb.SubmitAck(lease_id=group.lease_id, status=pb.ACK_STATUS_ACCEPTED, current_version=2)

    def Heartbeat(self, request, context):
        return pb.HeartbeatReply(current_version=1)


def run_hinted(model_dir, prompt, tmp_path, **extra):
    from concurrent import futures

    import grpc

    from heterorl.v1 import learner_pb2_grpc as pb_grpc

    learner = TwoVersionLearner(model_dir, Script(leases=[("L1", prompt)]))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                  ("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.so_reuseport", 0)])
    pb_grpc.add_LearnerServicer_to_server(learner, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    config = from_flat(SamplerConfig, learner=f"127.0.0.1:{port}", name="hinted", engine="transformers",
                       max_batch=1, cache_dir=tmp_path, heartbeat_s=30, max_groups=1, retry_max_s=0.2,
                       give_up_s=30.0, **extra)
    stop = threading.Event()
    timer = threading.Timer(120, stop.set)
    timer.start()
    try:
        stats = Sampler(config, stop).run()
    finally:
        timer.cancel()
        server.stop(0)
    return learner, stats


def test_the_sampler_refreshes_before_generating_when_the_lease_reply_says_it_is_behind(model_dir, prompt,
                                                                                      tmp_path):
    learner, stats = run_hinted(model_dir, prompt, tmp_path)
    assert learner.accepted["L1"].policy_version == 2  # generated with the version the hint asked for
    assert learner.fetches[1][0] == 1 and stats.refresh_hints == 1


def test_a_sampler_lagging_on_purpose_keeps_its_version(model_dir, prompt, tmp_path):
    learner, stats = run_hinted(model_dir, prompt, tmp_path, lag_versions=5)
    assert learner.accepted["L1"].policy_version == 1 and stats.refresh_hints == 0
    assert len(learner.fetches) == 1
