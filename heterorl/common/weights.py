"""Which tensors make up a version, and how a version's payload is cut into hashed chunks on the wire.

The payload bytes themselves come from `heterorl.common.codec` (a full anchor, or a delta against a version the
sampler holds). This module only names the tensors and moves bytes safely.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:  # annotations only: the relay imports this module and needs no torch
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


def chunk_hashes(payload: bytes, chunk_bytes: int) -> tuple[str, ...]:
    """The hash of every aligned chunk, computed once per payload however many samplers fetch it."""
    view = memoryview(payload)
    return tuple(sha256_hex(view[s : s + chunk_bytes]) for s in range(0, len(payload), chunk_bytes))


def iter_chunks(payload: bytes, chunk_bytes: int, offset: int = 0, hashes: tuple[str, ...] = ()) -> Iterator[Chunk]:
    """Slices of `payload` from `offset`, each with its hash; views, never copies of the payload.

    Chunks stay aligned to multiples of `chunk_bytes` (a resume from inside a chunk first sends the rest of that
    chunk), so the precomputed `hashes` of aligned chunks serve every fetch; other pieces are hashed here.
    """
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be > 0")
    if not 0 <= offset <= len(payload):
        raise ValueError(f"offset {offset} outside payload of {len(payload)} bytes")
    view = memoryview(payload)
    start = offset
    while start < len(payload):
        end = min(len(payload), (start // chunk_bytes + 1) * chunk_bytes)
        piece = view[start:end]
        aligned = start % chunk_bytes == 0 and len(hashes) > start // chunk_bytes
        yield Chunk(offset=start, data=piece, sha256=hashes[start // chunk_bytes] if aligned else sha256_hex(piece))
        start = end
