"""Writing a verified version straight into a running vLLM model on the CPU, and the in-worker helpers.

`heterorl/node/engine_vllm.py` uses this after each verified delta: each changed tensor is written into vLLM's own
(fused, oneDNN-packed) layers in place, which costs a fraction of a `reload_weights` call (see that module's notes
and `benchmarks/engines.py`). The functions named `_..._(worker)` run inside vLLM's in-process worker through
`collective_rpc`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


def get_model(worker) -> torch.nn.Module:
    """vLLM's model object (runs inside its in-process worker)."""
    return worker.model_runner.get_model()


def one_omp_thread() -> None:
    """Run once in the push thread: its OpenMP team (torch copies, oneDNN packing) becomes that thread alone.

    With two threads, every parallel op ends at a barrier where one thread spins until the other has run; with
    one other busy process on the two cores that doubled to quadrupled the writer's CPU (0.73-1.2 CPU-s against
    0.30) and its wall time. A first parallel op sets the thread's own count from the process default, then it
    drops to one for this thread (vLLM replaced `torch.set_num_threads` with a no-op; the C entry point is the
    real one); the caller sets the process default back."""
    torch.ones(1 << 16).add_(1)
    torch._C.set_num_threads(1)


@dataclass
class _Fused:
    """One vLLM linear layer whose weight vLLM packed away (q/k/v, gate/up, or a single projection)."""

    module: torch.nn.Module
    parts: list[tuple[str, int, int]]  # checkpoint name, first row, rows
    shape: tuple[int, int]
    dtype: torch.dtype


class CpuWriter:
    """Writes checkpoint tensors straight into vLLM's CPU model (see the module docstring).

    Linear layers are assembled in a reused buffer per shape and handed to vLLM's own GEMM set-up, which copies
    them into its packed format; other tensors (norms, embeddings, biases) are copied into vLLM's parameters in
    place; layers that compute with a kept weight (an lm_head, tied or not) are packed again once it changed.
    """

    def __init__(self, fused: dict[str, _Fused], copies: dict[str, tuple[torch.nn.Module, str, int, int, bool]],
                 repack: list[tuple[torch.nn.Module, set[str]]]):
        self.fused = fused  # vLLM module path -> layer
        self.unit = {name: path for path, f in fused.items() for name, _, _ in f.parts}
        # checkpoint name -> the vLLM module, tensor attribute, rows it is copied into, and whether rows after those
        # are vocabulary padding (zeroed, as vLLM's loader does). Looked up at each write: vLLM's GEMM set-up may
        # replace a bias tensor.
        self.copies = copies
        self.repack = repack  # modules to pack again, with the checkpoint names their weight comes from
        self._buffers: dict[tuple[tuple[int, int], torch.dtype], torch.Tensor] = {}

    @classmethod
    def build(cls, model: torch.nn.Module, params: dict[str, torch.Tensor]) -> tuple["CpuWriter | None", str]:
        """A writer for this model, or None and the reason why the layout is not one it handles."""
        from vllm import _custom_ops as ops
        from vllm.distributed import get_tensor_model_parallel_world_size
        from vllm.model_executor.layers.linear import UnquantizedLinearMethod
        from vllm.model_executor.layers.vocab_parallel_embedding import (
            ParallelLMHead,
            UnquantizedEmbeddingMethod,
            VocabParallelEmbedding,
        )
        from vllm.platforms import current_platform

        if not ops._supports_onednn or current_platform.is_zen_cpu():
            return None, "no oneDNN GEMMs in this vLLM build"
        if get_tensor_model_parallel_world_size() != 1:
            return None, "tensor parallel"
        modules = dict(model.named_modules())
        for path, module in modules.items():
            method = getattr(module, "quant_method", None)
            if method is not None and not isinstance(method, (UnquantizedLinearMethod, UnquantizedEmbeddingMethod)):
                return None, f"{path} is quantized ({type(method).__name__})"
        shard = {part: (merged, i) for merged, parts in (getattr(model, "packed_modules_mapping", None) or {}).items()
                 for i, part in enumerate(parts)}
        fused: dict[str, _Fused] = {}
        copies: dict[str, tuple[torch.nn.Module, str, int, int, bool]] = {}
        for name, src in params.items():
            prefix, _, leaf = name.rpartition(".")
            owner, _, last = prefix.rpartition(".")
            merged, index = shard.get(last, (None, 0))
            path = (f"{owner}.{merged}" if owner else merged) if merged else prefix
            module = modules.get(path)
            if module is None:
                return None, f"no vLLM module {path!r} for {name}"
            if isinstance(getattr(module, "quant_method", None), UnquantizedLinearMethod):
                sizes = list(getattr(module, "output_partition_sizes", ()))
                if len(sizes) != (len(model.packed_modules_mapping[merged]) if merged else 1):
                    return None, f"{path} has {len(sizes)} output parts"
                first, rows = sum(sizes[:index]), sizes[index]
                if leaf == "bias" and getattr(module, "bias", None) is not None and src.shape == (rows,):
                    copies[name] = (module, leaf, first, rows, False)
                    continue
                width = module.input_size_per_partition
                if leaf != "weight" or tuple(src.shape) != (rows, width):
                    return None, f"{name} {tuple(src.shape)} does not fit {path}"
                if not hasattr(module, "cpu_linear") or module.weight.numel() != 0:
                    return None, f"{path} keeps its weight unpacked"
                layer = fused.setdefault(path, _Fused(module, [], (sum(sizes), width), module.params_dtype))
                layer.parts.append((name, first, rows))
                continue
            target = getattr(module, leaf, None)
            if not isinstance(target, torch.Tensor) or target.dim() != src.dim():
                return None, f"no vLLM tensor for {name}"
            rows = src.shape[0]
            padded = isinstance(module, VocabParallelEmbedding) and target.shape[0] > rows  # vLLM pads the vocabulary
            if tuple(target.shape[1:]) != tuple(src.shape[1:]) or (target.shape[0] != rows and not padded):
                return None, f"{name} {tuple(src.shape)} does not fit {path}.{leaf} {tuple(target.shape)}"
            copies[name] = (module, leaf, 0, rows, padded)
        incomplete = [p for p, f in fused.items() if sum(rows for _, _, rows in f.parts) != f.shape[0]]
        if incomplete:
            return None, f"{incomplete[0]} misses checkpoint parts"
        repack, lookups = [], []
        for path, module in modules.items():
            weight = getattr(module, "weight", None)
            if path in fused or not hasattr(module, "cpu_linear") or not isinstance(weight, torch.Tensor):
                continue
            storage = weight.untyped_storage().data_ptr()
            sources = {n for n, (owner, leaf, *_) in copies.items()
                       if getattr(owner, leaf).untyped_storage().data_ptr() == storage}
            if isinstance(module, VocabParallelEmbedding) and not isinstance(module, ParallelLMHead):
                lookups.append(module)
            elif sources:
                repack.append((module, sources))
            else:
                return None, f"{path} computes with a weight no checkpoint tensor updates"
        for module in lookups:
            # An embedding looks rows up; vLLM packs its weight for a GEMM all the same, a copy nothing computes
            # with. Pointing that GEMM at the live weight frees the copy and keeps it from ever going stale.
            module.cpu_linear = torch.nn.functional.linear
        return cls(fused, copies, repack), ""

    @torch.no_grad()
    def write(self, params: dict[str, torch.Tensor], changed: list[str]) -> int:
        """Put the changed tensors (and the rest of each fused layer they belong to) into vLLM; returns how many
        checkpoint tensors went in."""
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        changed_set = set(changed)
        written = 0
        for name in changed:  # first: a fused layer's bias must be in place when its GEMM is set up below
            target = self.copies.get(name)
            if target is not None:
                module, leaf, first, rows, padded = target
                tensor = getattr(module, leaf).data
                tensor[first : first + rows].copy_(params[name])
                if padded:
                    tensor[first + rows :].zero_()
                written += 1
        for path in {self.unit[n] for n in changed if n in self.unit}:
            layer = self.fused[path]
            key = (layer.shape, layer.dtype)
            buffer = self._buffers.get(key)
            if buffer is None:
                buffer = self._buffers[key] = torch.empty(layer.shape, dtype=layer.dtype)
            for name, first, rows in layer.parts:
                buffer[first : first + rows].copy_(params[name])
            module = layer.module
            module.cpu_linear = None  # the old packed copy goes first, so the new one can take its memory
            module.weight = torch.nn.Parameter(buffer, requires_grad=False)
            dispatch_cpu_unquantized_gemm(module, remove_weight=True)  # packs a copy, drops the weight
            if module.weight.data_ptr() == buffer.data_ptr():  # vLLM computes from it (a fallback): it keeps it
                del self._buffers[key]
            written += len(layer.parts)
        for module, sources in self.repack:
            if sources & changed_set:
                module.cpu_linear = None
                dispatch_cpu_unquantized_gemm(module, remove_weight=False)
        return written


def refresh_tied_layers(worker) -> int:
    """Re-process layers whose weight belongs to another layer (a tied lm_head); runs inside vLLM's worker.

    `reload_weights` processes only the layers it loaded. A tied lm_head loads nothing (its weight is the
    embedding's), so on CPU its packed GEMM copy would keep the weights vLLM started with; packing it again from
    the shared, now updated tensor fixes that. Returns how many layers were re-processed.
    """
    model = worker.model_runner.get_model()
    owner = {id(param): name for name, param in model.named_parameters()}  # a shared tensor: its first name
    refreshed = 0
    for prefix, module in model.named_modules():
        weight, method = getattr(module, "weight", None), getattr(module, "quant_method", None)
        if method is None or not isinstance(weight, torch.Tensor) or id(weight) not in owner:
            continue
        if owner[id(weight)] != f"{prefix}.weight":
            method.process_weights_after_loading(module)
            refreshed += 1
    return refreshed


def vllm_on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()
