"""The vLLM engine: real vLLM generating in this process, its weights replaced in place by each verified version.

Why it is built this way:

* In-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the sampler reaches vLLM's model object, so
  weights go in as Python tensors: no engine restart, no files, no copy through a pipe.
* One copy of the version in its published dtype (bf16 by default). The codec applies an anchor or a delta in
  place to ``params`` (the published tensors, HF checkpoint names); then the digest is computed in a second thread
  while the changed tensors go into vLLM, which keeps its own weights in its compute dtype. The engine reports
  version 0 (and refuses to generate) from the start of an update until the digest matches; a payload the codec
  rejects never reaches vLLM, and after a digest mismatch only an anchor (which replaces every weight) brings the
  engine back.
* On CPU the changed tensors are written straight into vLLM's model (`CpuWriter`): each linear layer vLLM fuses
  (q/k/v, gate/up) is assembled from its checkpoint parts in one reused buffer and handed to vLLM's own CPU GEMM
  set-up (``dispatch_cpu_unquantized_gemm``, which packs a copy for oneDNN), norms and embeddings are copied in
  place, and a tied lm_head is packed again from the updated embedding. That is what vLLM's ``reload_weights``
  ends with, without its per-layer machinery (each layer rebuilt on the meta device, fresh tensors allocated and
  copied back into the old storage), which cost the default model 0.6-0.85 CPU-s per update against 0.3 here.
  It runs in its own thread with a single OpenMP thread (see `one_omp_thread`), and is built only for layouts
  it checks at start-up (unquantized, one rank, every checkpoint tensor mapped to a vLLM tensor of its shape);
  anything else, and GPUs, take ``reload_weights(weights_iterator=..., is_checkpoint_format=True)``, which
  pushes every tensor of each decoder layer that changed (vLLM processes a layer once all its parts have
  arrived). The linear layers stay packed: computing them (or the lm_head) from unpacked fp32 weights would
  make updates cheaper but costs 1.5-3.5% more CPU per generated token here.
* What an update of the default model costs (``benchmarks/engines.py`` prints it by part): see the README.
* Log-probs are vLLM's ``processed_logprobs``: after temperature and top-k/top-p, renormalized over the kept
  tokens, i.e. the distribution each token was drawn from (see `heterorl.node.engine_base` for the exact rule the
  learner recomputes).
* Stop strings: vLLM stops a sequence itself (``SamplingParams.stop``, the stop string kept in the output). With
  the stop string included, vLLM's token ids end with the token that completes the stop string, exactly where
  `heterorl.node.engine_base` ends a completion; the shared rule is applied to what vLLM returns all the same,
  so both engines report the same tokens, log-probs, text and finish reason by construction.
* Group integrity: ``generate`` and ``load_weights`` hold one lock and ``generate`` submits every group of a
  batch (``n = G`` per prompt) in one call, so all completions of a group come from the version reported.
* Process settings: vLLM reads its switches from the environment; the engine sets the few it needs before vLLM
  is imported (in-process engine, quieter logs) and pins ``OMP_NUM_THREADS`` to the current torch thread count,
  since vLLM otherwise drops an in-process engine to one torch thread. vLLM also makes ``torch.set_num_threads``
  a no-op for the rest of the process. A sampler process runs one engine, so these stay confined to it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from heterorl.common import codec
from heterorl.common.model import load_tokenizer
from heterorl.common.weights import weight_tensors
from heterorl.node.engine_base import ENGINE_VLLM, EngineBase, GeneratedCompletion, SamplingSettings
from heterorl.node.vllm_cpu_writer import CpuWriter, get_model, one_omp_thread, refresh_tied_layers, vllm_on_cpu
from heterorl.v1 import learner_pb2 as pb

_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


@dataclass(frozen=True)
class VLLMOptions:
    """Engine knobs; the defaults suit a CPU sampler of a small model."""

    dtype: str = "auto"  # compute dtype: "auto" = float32 on CPU (no bf16 matmul units assumed), bfloat16 on GPUs
    kv_cache_gib: float = 2.0  # KV cache size on CPU (GPUs size it from gpu_memory_utilization)
    gpu_memory_utilization: float = 0.85
    max_model_len: int = 4096  # capped at the model's own limit
    max_num_seqs: int = 256  # sequences decoded together; many groups at once is where vLLM earns its speed
    enforce_eager: bool = True  # skip torch.compile: starts in seconds; compiled decode is not faster here
    tensor_parallel_size: int = 1  # GPUs one engine spans (vLLM starts a worker process per GPU)

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if not self.kv_cache_gib > 0:
            raise ValueError(f"kv_cache_gib must be > 0, got {self.kv_cache_gib}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len < 16 or self.max_num_seqs < 1:
            raise ValueError("max_model_len must be >= 16 and max_num_seqs >= 1")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")


@dataclass(frozen=True)
class ApplyTiming:
    """Where the last weight update went, in wall seconds and in CPU seconds of this process (all its threads).
    Digest and push run at the same time, so `total_s` (the wall time of the whole update) is about
    decode_s + max(verify_s, push_s), not the sum; `cpu_s` is the sum of the CPU parts."""

    decode_s: float  # codec: validate the payload and apply it to the bf16 copy
    verify_s: float  # digest of the whole version (in a second thread, beside the push)
    push_s: float  # hand the tensors to vLLM (packing for its CPU GEMMs included) and reset the prefix cache
    total_s: float  # wall time from the payload to an engine that generates with the new version
    tensors_pushed: int  # checkpoint tensors handed to vLLM
    decode_cpu_s: float = 0.0
    digest_cpu_s: float = 0.0  # the digest thread's own CPU time
    push_cpu_s: float = 0.0  # everything else the process spent from the end of decode to the end of the update
    cpu_s: float = 0.0  # the whole update


class _ErrorsOnly(logging.Filter):
    """Drops a logger's records below ERROR."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def _prepare_process_env() -> None:
    """Settings vLLM reads from the environment; must run before vllm is imported."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # weights go in as Python tensors, so the engine is local
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


def _update_groups(names: list[str]) -> dict[str, str]:
    """name -> the unit vLLM loads together: a whole decoder layer ("model.layers.3"), else the module.

    vLLM fuses checkpoint tensors (q/k/v, gate/up, experts) into one parameter and processes a layer only once
    all its parts have arrived, so an update pushes every tensor of any unit that changed.
    """
    groups = {}
    for name in names:
        parts = name.split(".")
        cut = next((i + 1 for i, p in enumerate(parts) if p.isdigit()), len(parts) - 1)
        groups[name] = ".".join(parts[:cut])
    return groups


class VLLMEngine(EngineBase):
    name = ENGINE_VLLM

    def __init__(self, model_dir: Path, seed: int = 0, options: VLLMOptions | None = None,
                 weights_dtype: torch.dtype = torch.bfloat16):
        super().__init__(load_tokenizer(model_dir), weights_dtype)
        self.options = options or VLLMOptions()
        _prepare_process_env()
        from vllm import LLM  # imported late: it takes seconds and needs the environment above

        # A partial update leaves some layers unloaded on purpose (unchanged ones, the tied lm_head, rotary
        # tables); vLLM warns about each on every update. Failures that matter surface as exceptions. A filter,
        # not a level: vLLM's engine core re-runs its logging set-up, which resets the levels of its loggers.
        for module in ("layerwise", "inplace"):
            reload_logger = logging.getLogger(f"vllm.model_executor.model_loader.reload.{module}")
            if not any(isinstance(f, _ErrorsOnly) for f in reload_logger.filters):
                reload_logger.addFilter(_ErrorsOnly())

        model_dir = Path(model_dir)
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        with torch.device("meta"):  # names and shapes only; the copy below is the one real allocation
            skeleton = AutoModelForCausalLM.from_config(config)
        self._vocab_size = int(skeleton.get_input_embeddings().weight.shape[0])
        self.params = {n: torch.empty(t.shape, dtype=weights_dtype) for n, t in weight_tensors(skeleton).items()}
        del skeleton
        self._groups = _update_groups(list(self.params))
        self.last_apply: ApplyTiming | None = None
        self._lock = threading.Lock()
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="heterorl-digest")
        self._pusher = ThreadPoolExecutor(1, thread_name_prefix="heterorl-push")  # the CPU writer's thread
        self._writer: CpuWriter | None = None

        opts = self.options
        on_cpu = vllm_on_cpu()
        dtype = opts.dtype if opts.dtype != "auto" else ("float32" if on_cpu else "bfloat16")
        limit = getattr(config, "max_position_embeddings", None) or opts.max_model_len
        memory = (
            {"kv_cache_memory_bytes": int(opts.kv_cache_gib * 2**30)}
            if on_cpu
            else {"gpu_memory_utilization": opts.gpu_memory_utilization}
        )
        started = time.perf_counter()
        # Random weights until the first verified version: the sampler's model directory holds no weights.
        self._llm = LLM(
            model=str(model_dir), tokenizer=str(model_dir), load_format="dummy", dtype=dtype, seed=seed,
            max_model_len=min(limit, opts.max_model_len), max_num_seqs=opts.max_num_seqs,
            enforce_eager=opts.enforce_eager, enable_prefix_caching=True, logprobs_mode="processed_logprobs",
            tensor_parallel_size=opts.tensor_parallel_size, **memory,
        )
        self.dtype = dtype
        try:
            self._warm_up()
        except Exception as err:  # vLLM reports unsupported models (e.g. a head size with no kernel) only here
            self.close()
            raise RuntimeError(f"vLLM cannot run the model in {model_dir} on this machine: {err}") from err
        # Updates write into the CPU model directly where its layout allows it (see the module docstring); a
        # model split over several workers is not in this process, so it takes vLLM's reload.
        if on_cpu and opts.tensor_parallel_size == 1:
            try:
                self._writer, why = CpuWriter.build(self._llm.collective_rpc(get_model)[0], self.params)
            except Exception as err:  # vLLM internals this version of the writer does not know: vLLM's reload
                self._writer, why = None, f"{type(err).__name__}: {err}"
            if self._writer is None:
                logging.getLogger(__name__).info("vLLM weight updates go through reload_weights: %s", why)
            else:
                self._pusher.submit(one_omp_thread).result()
                torch._C.set_num_threads(torch.get_num_threads())  # the default for later threads, as before
        self.start_seconds = time.perf_counter() - started

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def close(self) -> None:
        """Release the engine core and its KV cache now (about 2 GB on CPU), e.g. before the sampler starts an
        engine for another model; the engine generates no more. Safe to call twice."""
        llm = getattr(self, "_llm", None)
        if llm is not None:
            with self._lock:
                self.version = 0
                self._llm = None
                self._writer = None
                llm.llm_engine.engine_core.shutdown()
                self._hasher.shutdown(wait=True)
                self._pusher.shutdown(wait=True)

    def _warm_up(self) -> None:
        """One tiny generation: vLLM compiles its log-prob gather on first use, and an unsupported model or
        machine should fail here, at start-up, not on the first leased group."""
        self._generate_raw([[next(iter(self.eos_ids), 0)]], 1, SamplingSettings(1.0, 1.0, 0, 2))

    # -- weights

    @torch.no_grad()
    def load_weights(self, encoding: str, payload: bytes | bytearray, version: int, base_version: int,
                     weights_sha256: str) -> None:
        """Apply a payload to the bf16 copy, then verify its digest while replacing vLLM's weights in place.

        The digest releases the GIL, so it runs in a second thread while vLLM takes the new weights. vLLM may thus
        briefly hold weights that fail the digest, but it never generates with them: the version stays 0
        (generate refuses) until the digest matches, and after a mismatch only an anchor, which replaces every
        weight, makes the engine usable again. A payload the codec rejects changes nothing at all.
        """
        with self._lock:
            if self._llm is None:
                raise RuntimeError("the vLLM engine is closed")
            self._begin_update(encoding, version, base_version, weights_sha256)  # until verified: version 0
            started, cpu_started = time.perf_counter(), time.process_time()
            # One codec thread: a second one saves a few percent of wall time here and costs a quarter more CPU.
            info = self._apply_payload(payload, self.params, version, threads=1)  # validates all, then applies
            decoded, cpu_decoded = time.perf_counter(), time.process_time()
            hashing = self._hasher.submit(self._timed_digest, weights_sha256)
            try:
                changed = [n for n in self.params if info.tensors[n].method != codec.SAME]
                pushed = 0
                if changed:
                    pushed = (self._pusher.submit(self._writer.write, self.params, changed).result()
                              if self._writer is not None else self._reload(changed))
                    if not self._llm.reset_prefix_cache():
                        raise RuntimeError("vLLM refused to reset its prefix cache after a weight update")
                pushed_at = time.perf_counter()
            finally:
                digest, verify_s, digest_cpu_s = hashing.result()  # never leave it reading what a later update writes
            self._verified(digest, weights_sha256, version)
            cpu_s = time.process_time() - cpu_started
            decode_cpu_s = cpu_decoded - cpu_started
            self.last_apply = ApplyTiming(decoded - started, verify_s, pushed_at - decoded,
                                          time.perf_counter() - started, pushed, decode_cpu_s, digest_cpu_s,
                                          cpu_s - decode_cpu_s - digest_cpu_s, cpu_s)

    def _timed_digest(self, like: str) -> tuple[str, float, float]:
        started, cpu_started = time.perf_counter(), time.thread_time()
        digest = self._digest(self.params, like)
        return digest, time.perf_counter() - started, time.thread_time() - cpu_started

    def _reload(self, changed: list[str]) -> int:
        """vLLM's own reload of every tensor of each unit that changed; returns how many tensors went in."""
        units = {self._groups[n] for n in changed}
        names = [n for n in self.params if self._groups[n] in units]
        # A list, not a generator: with tensor parallelism the call is pickled to one worker process per GPU (each
        # takes its slices); the list holds references to the tensors, no copies.
        self._llm.collective_rpc(
            "reload_weights",
            kwargs={"weights_iterator": [(n, self.params[n]) for n in names], "is_checkpoint_format": True},
        )
        self._llm.collective_rpc(refresh_tied_layers)
        return len(names)

    # -- generation

    def generate(self, prompts: list[list[int]], group_size: int,
                 sampling: SamplingSettings) -> list[list[GeneratedCompletion]]:
        """group_size completions for each prompt, all from the current version, in one vLLM call."""
        with self._lock:
            if self._llm is None:
                raise RuntimeError("the vLLM engine is closed")
            if self.version == 0:
                raise RuntimeError("no verified weights loaded")
            return self._generate_raw(prompts, group_size, sampling)

    def _generate_raw(self, prompts: list[list[int]], group_size: int,
                      sampling: SamplingSettings) -> list[list[GeneratedCompletion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if any(not p for p in prompts):
            raise ValueError("every prompt needs at least one token")
        params = SamplingParams(
            n=group_size, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            max_tokens=sampling.max_new_tokens, stop=list(sampling.stop) or None,
            stop_token_ids=sorted(self.eos_ids), include_stop_str_in_output=True,
            logprobs=0,  # the sampled token's own log-prob only
            detokenize=bool(sampling.stop),  # text is decoded here, the same way for every engine
        )
        outputs = self._llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                     use_tqdm=False)
        groups = []
        for request in outputs:
            if len(request.outputs) != group_size:
                raise RuntimeError(f"vLLM returned {len(request.outputs)} completions for a group of {group_size}")
            group = []
            for out in sorted(request.outputs, key=lambda o: o.index):
                tokens = [int(t) for t in out.token_ids]
                if out.finish_reason not in _FINISH or out.logprobs is None or len(out.logprobs) != len(tokens):
                    raise RuntimeError(f"vLLM finished a completion with {out.finish_reason!r} and "
                                       f"{0 if out.logprobs is None else len(out.logprobs)} log-probs "
                                       f"for {len(tokens)} tokens")
                logprobs = [float(step[tok].logprob) for step, tok in zip(out.logprobs, tokens)]
                completion = self.completion(tokens, logprobs, sampling)  # the rule the other engine follows
                if _FINISH[out.finish_reason] == pb.FINISH_REASON_STOP and len(completion.token_ids) == len(tokens):
                    # vLLM saw a stop string its incremental decoding found and a full decode does not: its call
                    completion = dataclasses.replace(completion, finish_reason=pb.FINISH_REASON_STOP)
                group.append(completion)
            groups.append(group)
        return groups
