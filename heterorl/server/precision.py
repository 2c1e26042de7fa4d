"""Where the learner computes and in what precision: `--device` and `--compute-dtype` turned into torch objects.

Master weights and optimizer state are always fp32; `compute_dtype` only chooses the arithmetic of the forward and
backward passes (bf16 autocast, as mixed-precision training does it), so publishing stays exact: a published
version is the bf16 cast of the fp32 master weights whatever the compute dtype.
"""

from __future__ import annotations

import contextlib
import re

import torch

DEVICE_HELP = "auto | cpu | cuda | cuda:N (auto: the first CUDA device when there is one, else the CPU)"
COMPUTE_DTYPES = ("auto", "bf16", "fp32")
# The measured choice of `auto` per device type (benchmarks/learner_scale.py --precision reports the figures):
# on CUDA bf16 is what every large-model trainer runs; on the CPU see COMPUTE_DTYPE_HELP.
AUTO_COMPUTE_DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}
COMPUTE_DTYPE_HELP = (
    "auto | bf16 | fp32: the arithmetic of forward/backward (weights and AdamW state stay fp32). auto = bf16 on "
    "CUDA, fp32 on the CPU: measured on the default model (benchmarks/bf16_logprobs.py), bf16 autocast moves the "
    "learner's log-probs from fp32 samplers' by 0.029 nats/token (fp32: 0.007; trust tolerance 0.05) and widens "
    "the on-policy token-ratio spread from 0.012 to 0.051, so choose bf16 on an AMX CPU only for its speed"
)
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def check_device_spec(spec: str) -> None:
    """Syntax only (a config may be written on a host without the device)."""
    if not isinstance(spec, str) or not _DEVICE_RE.match(spec):
        raise ValueError(f"device must be one of {DEVICE_HELP.split(' (')[0]}, got {spec!r}")


def resolve_device(spec: str, cuda_available: bool | None = None) -> torch.device:
    """The torch device `spec` names on this host; 'cuda...' without CUDA is an error, not a silent CPU run."""
    check_device_spec(spec)
    has_cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if spec == "auto":
        return torch.device("cuda" if has_cuda else "cpu")
    if spec.startswith("cuda"):
        if not has_cuda:
            raise ValueError(f"device {spec!r} asked for, but torch sees no CUDA device on this host")
        if ":" in spec and cuda_available is None and int(spec.split(":")[1]) >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r} asked for, but this host has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(spec)


def check_compute_dtype(spec: str) -> None:
    if spec not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {spec!r}")


def resolve_compute_dtype(spec: str, device: torch.device) -> torch.dtype:
    check_compute_dtype(spec)
    if spec == "auto":
        return AUTO_COMPUTE_DTYPE.get(device.type, torch.float32)
    return torch.bfloat16 if spec == "bf16" else torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when `dtype` is bf16; nothing (plain fp32) otherwise."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
