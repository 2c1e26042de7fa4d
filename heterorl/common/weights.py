"""Which tensors make up a version, and how a version's payload is cut into hashed chunks on the wire.

The payload bytes themselves come from `heterorl.common.codec` (a full anchor, or a delta against a version the
sampler holds). This module only names the tensors and moves bytes safely.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator

import torch

# Encodings a WeightChunk may carry. A full anchor rebuilds every tensor; a delta needs `base_version`.
ENCODING_ANCHOR = "heterorl-codec-anchor-v1"
ENCODING_DELTA = "heterorl-codec-delta-v1"
ENCODINGS = (ENCODING_ANCHOR, ENCODING_DELTA)


class WeightsCorrupt(Exception):
    """Weights that do not hash to what the learner published; they must never be generated with."""


def weight_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name -> parameter tensor (sharing storage with the model), tied weights listed once.

    Both sides use this one function, so a version names the same tensors on the learner and every sampler.
    Buffers (e.g. rotary frequencies) are derived from the config and are not part of a version.
    """
    return {name: param.data for name, param in model.named_parameters(remove_duplicate=True)}


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Chunk:
    offset: int
    data: memoryview
    sha256: str


def iter_chunks(payload: bytes, chunk_bytes: int, offset: int = 0) -> Iterator[Chunk]:
    """Slices of `payload` from `offset`, each with its own hash; views, never copies of the payload."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be > 0")
    if not 0 <= offset <= len(payload):
        raise ValueError(f"offset {offset} outside payload of {len(payload)} bytes")
    view = memoryview(payload)
    for start in range(offset, len(payload), chunk_bytes):
        piece = view[start : start + chunk_bytes]
        yield Chunk(offset=start, data=piece, sha256=sha256_hex(piece))
