"""The sampler loop against a scripted learner: it acts on refusal reasons (never on message text), pre-scores only
with built-in rewards, skips prompts over the run's limit, and refuses a run whose weights it cannot load.

The learner here is a real gRPC server with a servicer written for this file: it serves the tiny model's files and
one verified anchor, hands out scripted leases, and answers each submitted group as its script says, refusing with
`heterorl.common.contract.error_status` (the reason travels as a `google.rpc.ErrorInfo` detail, as from the real
learner). The sampler is the real `Sampler` on the transformers engine.
"""

from __future__ import annotations

import collections
import hashlib
import json
import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest
import torch

from heterorl.common import codec
from heterorl.common.config import from_flat
from heterorl.common.contract import MAX_MESSAGE_BYTES, Reason, error_status
from heterorl.common.model import encode_prompt, load_causal_lm, load_tokenizer, resolve_model
from heterorl.common.weights import ENCODING_ANCHOR, weight_tensors
from heterorl.node.config import SamplerConfig
from heterorl.node.sampler import Sampler, UnsupportedRun
from heterorl.v1 import learner_pb2 as pb
from heterorl.v1 import learner_pb2_grpc as pb_grpc

G = 2
QUESTION = "What is 7 + 5? Answer with just the number."
REFUSAL_CODES = {
    Reason.RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.LEARNER_STOPPING: grpc.StatusCode.UNAVAILABLE,
    Reason.REWARD_FAILED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.LEASE_RELEASED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.LOGPROB: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.UNKNOWN_SAMPLER: grpc.StatusCode.NOT_FOUND,
}


@dataclass
class Script:
    """What the scripted learner does: the leases it hands out (in order) and its answers to each lease's group."""

    leases: list[tuple[str, list[int]]]  # (lease id, prompt token ids)
    answers: dict[str, list[Reason]] = field(default_factory=dict)  # refusals before the group is accepted
    run: dict = field(default_factory=dict)  # RunConfig fields over the defaults


class ScriptedLearner(pb_grpc.LearnerServicer):
    def __init__(self, model_dir, script: Script):
        self.script = script
        self.files = [pb.ModelFile(name=p.name, content=p.read_bytes()) for p in sorted(model_dir.iterdir())
                      if p.is_file() and p.suffix != ".safetensors"]
        version = {n: t.detach().to(torch.bfloat16) for n, t in weight_tensors(load_causal_lm(model_dir)).items()}
        self.anchor = bytes(codec.encode(version))
        self.weights_sha256 = codec.digest(version)
        self.pending = collections.deque(script.leases)
        self.answers = {k: list(v) for k, v in script.answers.items()}
        self.registered: list[str] = []
        self.accepted: dict[str, pb.TrajectoryGroup] = {}
        self.seen: list[tuple[str, str]] = []  # (sampler id, lease id) of every group that arrived
        self.lock = threading.Lock()

    def Register(self, request, context):
        with self.lock:
            sampler_id = f"sampler-{len(self.registered) + 1}"
            self.registered.append(sampler_id)
        run = dict(run_id="run-1", model="tiny", task="arithmetic", reward="last_number", group_size=G,
                   sampling=pb.SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=4),
                   vocab_size=0, max_prompt_tokens=1024, lease_ttl_s=60.0, weights_dtype="bfloat16",
                   task_options_json=json.dumps({"low": 1, "high": 20, "ops": "+", "seed": 0}))
        run.update(self.script.run)
        return pb.RegisterReply(sampler_id=sampler_id, run=pb.RunConfig(**run), current_version=1)

    def GetModelFiles(self, request, context):
        digest = hashlib.sha256(b"".join(f.name.encode() + f.content for f in self.files)).hexdigest()
        return pb.ModelFiles(files=self.files, files_sha256=digest)

    def FetchWeights(self, request, context):
        data = self.anchor[request.offset:]
        yield pb.WeightChunk(version=1, base_version=0, encoding=ENCODING_ANCHOR, total_bytes=len(self.anchor),
                             offset=request.offset, data=data, chunk_sha256=hashlib.sha256(data).hexdigest(),
                             payload_sha256=hashlib.sha256(self.anchor).hexdigest(),
                             weights_sha256=self.weights_sha256)

    def LeasePrompts(self, request, context):
        with self.lock:
            leases = [self.pending.popleft()] if self.pending else []
        return pb.LeaseReply(current_version=1, leases=[
            pb.PromptLease(lease_id=lease_id, prompt_id=lease_id, question=QUESTION, prompt_token_ids=tokens,
                           group_size=G) for lease_id, tokens in leases])

    def SubmitTrajectories(self, request_iterator, context):
        for group in request_iterator:
            with self.lock:
                self.seen.append((group.sampler_id, group.lease_id))
                if group.sampler_id != self.registered[-1]:
                    refusal = Reason.UNKNOWN_SAMPLER  # the learner forgot every earlier registration
                else:
                    answers = self.answers.get(group.lease_id, [])
                    refusal = answers.pop(0) if answers else None
                if refusal is None:
                    self.accepted[group.lease_id] = group
            if refusal is not None:
                context.abort_with_status(error_status(REFUSAL_CODES[refusal], "scripted refusal", refusal))
            yield pb.SubmitAck(lease_id=group.lease_id, status=pb.ACK_STATUS_ACCEPTED, current_version=1)

    def Heartbeat(self, request, context):
        return pb.HeartbeatReply(current_version=1)


@pytest.fixture(scope="module")
def model_dir(tiny_cache):
    return resolve_model("tiny", cache=tiny_cache)


@pytest.fixture(scope="module")
def prompt(model_dir) -> list[int]:
    return encode_prompt(load_tokenizer(model_dir), QUESTION)


def run_sampler(model_dir, tmp_path, script: Script, max_groups: int):
    learner = ScriptedLearner(model_dir, script)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                  ("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.so_reuseport", 0)])
    pb_grpc.add_LearnerServicer_to_server(learner, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    config = from_flat(SamplerConfig, learner=f"127.0.0.1:{port}", name="scripted", engine="transformers", max_batch=1,
                           cache_dir=tmp_path, heartbeat_s=0.2, max_groups=max_groups, retry_max_s=0.2,
                           give_up_s=30.0)
    stop = threading.Event()
    timer = threading.Timer(120, stop.set)  # a stuck sampler fails the test instead of hanging it
    timer.start()
    try:
        stats = Sampler(config, stop).run()
    finally:
        timer.cancel()
        server.stop(0)
    return learner, stats


def test_refusals_are_acted_on_by_reason(model_dir, prompt, tmp_path):
    script = Script(
        leases=[("ok", prompt), ("rate", prompt), ("stopping", prompt), ("reward", prompt), ("released", prompt),
                ("bad-logprob", prompt), ("too-long", prompt + [prompt[-1]] * 40), ("forgotten", prompt),
                ("after", prompt)],
        answers={"rate": [Reason.RATE_LIMITED], "stopping": [Reason.LEARNER_STOPPING, Reason.LEARNER_STOPPING],
                 "reward": [Reason.REWARD_FAILED], "released": [Reason.LEASE_RELEASED],
                 "bad-logprob": [Reason.LOGPROB], "forgotten": [Reason.UNKNOWN_SAMPLER]},
        run={"max_prompt_tokens": len(prompt) + 8},
    )
    learner, stats = run_sampler(model_dir, tmp_path, script, max_groups=4)
    # Kept and retried: rate-limited and stopping; dropped: the reward failure, the released lease, the bad field.
    assert sorted(learner.accepted) == ["after", "ok", "rate", "stopping"]
    assert stats.groups_acked == 4
    # UNKNOWN_SAMPLER: registered again; the group stamped with the forgotten id is void, never re-sent as is.
    assert learner.registered == ["sampler-1", "sampler-2"]
    assert learner.accepted["after"].sampler_id == "sampler-2"
    assert dict(stats.refusals) == {"reward_failed": 1, "lease_released": 1, "logprob": 1, "void_after_register": 1}
    assert stats.groups_refused == 4
    assert [lease for _, lease in learner.seen].count("forgotten") == 1
    # The prompt over the run's limit was never generated, nor sent.
    assert stats.leases_too_long == 1 and "too-long" not in {lease for _, lease in learner.seen}
    assert stats.groups_generated == 8  # all but the long prompt
    # Arithmetic questions verify themselves and last_number is built in: every completion is pre-scored.
    assert all(c.HasField("sampler_reward") for g in learner.accepted.values() for c in g.completions)


@pytest.mark.parametrize("reward", ["no_such_module_for_heterorl_tests:reward", "not_a_builtin_reward"])
def test_a_reward_that_is_not_built_in_is_not_imported_and_not_pre_scored(model_dir, prompt, tmp_path, reward):
    script = Script(leases=[("a", prompt), ("b", prompt)], run={"reward": reward})
    learner, stats = run_sampler(model_dir, tmp_path, script, max_groups=2)
    assert stats.groups_acked == 2
    assert not any(c.HasField("sampler_reward") for g in learner.accepted.values() for c in g.completions)


def test_without_task_options_the_sampler_does_not_pre_score(model_dir, prompt, tmp_path):
    script = Script(leases=[("a", prompt)], run={"task_options_json": ""})
    learner, stats = run_sampler(model_dir, tmp_path, script, max_groups=1)
    assert stats.groups_acked == 1
    assert not any(c.HasField("sampler_reward") for c in learner.accepted["a"].completions)


def test_a_run_whose_weights_dtype_cannot_be_loaded_is_refused(model_dir, prompt, tmp_path):
    with pytest.raises(UnsupportedRun, match="float8"):
        run_sampler(model_dir, tmp_path, Script(leases=[("a", prompt)], run={"weights_dtype": "float8_e4m3"}),
                    max_groups=1)


def test_stop_strings_reach_the_learner_as_cut_completions(model_dir, prompt, tmp_path):
    """The run's stop strings end every completion at the first one, and the groups carry exactly those tokens."""
    tokenizer = load_tokenizer(model_dir)
    stop = [chr(c) for c in range(ord("a"), ord("z") + 1)]  # the random tiny model writes letters often
    script = Script(leases=[(f"l{i}", prompt) for i in range(4)],
                    run={"sampling": pb.SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=12,
                                                       stop=stop)})
    learner, _ = run_sampler(model_dir, tmp_path, script, max_groups=4)
    completions = [c for g in learner.accepted.values() for c in g.completions]
    stopped = 0
    for c in completions:
        text = tokenizer.decode(list(c.token_ids), skip_special_tokens=True)
        assert len(c.logprobs) == len(c.token_ids)
        hits = [i for i, ch in enumerate(text) if ch in stop]
        if c.finish_reason == pb.FINISH_REASON_LENGTH:
            assert not hits and len(c.token_ids) == 12
        elif hits:
            stopped += 1
            assert hits == [len(text) - 1], text  # ends with its first stop string
    assert stopped > 0, "no completion met a stop string: the check above did not run"
