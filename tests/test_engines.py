"""The engines' shared rules (heterorl/node/engine_base.py) on the transformers engine: stop strings end a
completion exactly where the rule says, with exactly the tokens and log-probs kept; the weights' dtype is read.
(vLLM is held to the same rules in tests/test_vllm.py.)"""

from __future__ import annotations

import pytest
import torch

from heterorl.common import codec
from heterorl.common.model import encode_prompt, load_causal_lm, load_tokenizer, resolve_model
from heterorl.common.weights import ENCODING_ANCHOR, weight_tensors
from heterorl.node.engine import TransformersEngine
from heterorl.node.engine_base import SamplingSettings, UnsupportedRun, cut_at_stop, weights_dtype
from heterorl.v1 import learner_pb2 as pb

QUESTIONS = [f"What is {a} + {b}?" for a, b in [(7, 5), (12, 9), (3, 18), (15, 15)]]


def test_cut_at_stop_finds_the_first_token_that_completes_a_stop_string():
    pieces = ["He", "llo", " wor", "ld", "!", " Bye"]  # multi-character tokens

    def decode(tokens):
        return "".join(pieces[t] for t in tokens)

    tokens = list(range(len(pieces)))
    assert cut_at_stop(tokens, decode, ()) is None
    assert cut_at_stop(tokens, decode, ("zzz",)) is None
    assert cut_at_stop(tokens, decode, ("lo w",)) == 3  # spans tokens 1 and 2: ends with token 2
    assert cut_at_stop(tokens, decode, ("!", "wor")) == 3  # the earliest of several
    assert cut_at_stop(tokens, decode, ("Bye",)) == 6
    assert cut_at_stop(tokens, decode, ("H",)) == 1


@pytest.fixture(scope="module")
def engine(tiny_cache):
    model_dir = resolve_model("tiny", cache=tiny_cache)
    version = {n: (t.detach() * 16).to(torch.bfloat16)  # scaled: confident enough to write varied text
               for n, t in weight_tensors(load_causal_lm(model_dir)).items()}
    engine = TransformersEngine(model_dir, seed=0)
    engine.load_weights(ENCODING_ANCHOR, codec.encode(version), 1, 0, codec.digest(version))
    tokenizer = load_tokenizer(model_dir)
    engine.prompts = [encode_prompt(tokenizer, q) for q in QUESTIONS]
    return engine


def _generate(engine, sampling, seed=3):
    torch.manual_seed(seed)
    return [c for group in engine.generate(engine.prompts, 4, sampling) for c in group]


def test_stop_strings_cut_completions_to_exactly_the_tokens_kept(engine):
    """The same draws with and without stop strings: each stopped completion is the free one cut right after its
    first stop string, with the same token ids and log-probs up to there, and finish reason STOP."""
    free = _generate(engine, SamplingSettings(1.0, 1.0, 0, 24))
    text = "".join(c.text for c in free)
    stop = (text[len(text) // 3], text[len(text) // 2 : len(text) // 2 + 2])  # a character and a pair that occur
    cut = _generate(engine, SamplingSettings(1.0, 1.0, 0, 24, stop=stop))
    stopped = 0
    for f, c in zip(free, cut, strict=True):
        end = cut_at_stop(f.token_ids, engine.decode, stop)
        if end is None:
            assert c.token_ids == f.token_ids and c.finish_reason == f.finish_reason
            continue
        stopped += 1
        assert c.token_ids == f.token_ids[:end]
        assert c.logprobs == pytest.approx(f.logprobs[:end], abs=1e-5)
        assert c.finish_reason == pb.FINISH_REASON_STOP
        assert c.text == engine.decode(c.token_ids) and any(c.text.endswith(s) for s in stop)
        assert not any(s in engine.decode(c.token_ids[:-1]) for s in stop)  # the first occurrence, not a later one
    assert stopped >= 4, f"only {stopped} of {len(free)} completions met a stop string"


@pytest.mark.parametrize("name,dtype", [("bfloat16", torch.bfloat16), ("", torch.bfloat16),
                                        ("float16", torch.float16), ("float32", torch.float32)])
def test_weights_dtypes_a_sampler_loads(name, dtype):
    assert weights_dtype(name) == dtype


def test_a_weights_dtype_no_engine_loads_is_refused():
    with pytest.raises(UnsupportedRun, match="int4"):
        weights_dtype("int4")


def test_a_float16_version_loads_and_verifies(tiny_cache):
    model_dir = resolve_model("tiny", cache=tiny_cache)
    version = {n: t.detach().to(torch.float16) for n, t in weight_tensors(load_causal_lm(model_dir)).items()}
    engine = TransformersEngine(model_dir, weights_dtype=torch.float16)
    engine.load_weights(ENCODING_ANCHOR, codec.encode(version), 1, 0, codec.digest(version))
    assert engine.version == 1
