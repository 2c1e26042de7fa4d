"""Exact, compressed weight versions: full anchors and deltas between two versions.

A version is a mapping name -> tensor (the bf16 snapshot the learner publishes). A sampler that holds version A
and needs version B receives ``encode(B, A)``; ``apply_`` turns its tensors into B bit for bit. Deltas compose
by construction, not by merging payloads: the learner encodes the newest version against *any* older version it
still holds (``encode(v_new, v_old)``), so a sampler k versions behind downloads one delta, never a chain. No
``compose`` of payloads is offered.

Per tensor the encoder estimates the size of each representation and keeps the smallest (recorded in the
payload):

* ``same``        tensor unchanged; no bytes.
* ``sparse``      the integer difference of the bit patterns (wrapping), coded as exactly one byte per change that
                  joins the gap since the previous change (capped at 84) with the change's class (+1, -1, other);
                  the excess of the gaps that reach the cap goes to a separate stream of 32-bit byte planes, and
                  the "other" differences to zigzag byte planes. One optimizer step at a small learning rate moves
                  ~5% of bf16 values, 93% of them by exactly one unit, so the byte stream is close to the entropy
                  of positions plus values, and zstd's Huffman stage codes it near that bound. One byte per change
                  (format 2; format 1 interleaved escape bytes) keeps every step of coding and decoding a plain
                  array operation over the changes, with no scatter to make room for escapes. Coded in
                  independent blocks of ``BLOCK`` elements so both cores work.
* ``xor``         XOR of the bit patterns, little-endian bytes.
* ``xor_planes``  the same XOR split into byte planes (all low bytes, then the next byte, ...).
* ``raw``         the new tensor's bytes.
* ``planes``      the new tensor's bytes split into byte planes (sign/exponent bytes compress, mantissas don't).

A full anchor (``base=None``) uses ``raw`` or ``planes``. The container is the safetensors layout (an 8-byte
header length, a JSON header, then the buffers; every buffer is a 1-D ``U8`` tensor named ``<tensor>::<stream>``,
and ``__metadata__["heterorl"]`` holds the per-tensor method, dtype, shape and stream lengths), compressed as one
zstd frame with a content checksum, using ``threads`` zstd workers.

Sizes are chosen by estimate, not by trial compression (which would cost more than the encoding): the order-0
entropy of the sparse streams (zstd's Huffman stage lands within a few percent of it), and the byte-plane
entropies of a sample for the dense methods, which are only considered for small tensors or when sparse coding
costs more than one bit per element.

``apply_`` validates the whole payload (frame checksum, header, every stream's length, every sparse block's
extent) before the first tensor changes. ``decode`` writes only into new tensors, so it checks the header and
stream lengths first and each sparse block as it decodes it (one pass fewer); a payload that fails any check
raises and returns nothing. The decompressed container is held whole: for a delta that is a few MB; for an
anchor it is about the size of the model.

Speed: on optimizer deltas the cost is finding the changed elements (one compare of 64-bit words over both
versions, then the lanes of the words that changed) and a dozen array passes over the changes; zstd level 2
is the default because level 3 spends three times the CPU on these Huffman-dominated streams for the same size.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import struct
from collections.abc import Callable, Collection, Mapping, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import blake3
import numpy as np
import torch
import zstandard

FORMAT = "heterorl-codec/2"  # 2: one byte per sparse change plus a "long" gap stream (1: escape bytes)
# The version hash names the tensors' bytes, not a payload layout, and runs persist it (a resumed learner checks
# its weights against it), so it keeps the domain string it was born with when the payload format changes.
_DIGEST_DOMAIN = "heterorl-codec/1"
# Version hash algorithms, by the name a digest string carries (see `digest`).
DIGEST_BLAKE3 = "blake3"  # written as "blake3:<64 hex>"; the default since the legacy one cost 4x the CPU
DIGEST_SHA256 = "sha256"  # legacy: a bare 64-hex sha256, as runs recorded before blake3; still checked
DIGEST_ALGORITHMS = (DIGEST_BLAKE3, DIGEST_SHA256)
DEFAULT_LEVEL = 2
KIND_ANCHOR = "anchor"
KIND_DELTA = "delta"

SAME = "same"
SPARSE = "sparse"
XOR = "xor"
XOR_PLANES = "xor_planes"
RAW = "raw"
PLANES = "planes"
DELTA_METHODS = (SAME, SPARSE, XOR, XOR_PLANES, RAW, PLANES)
ANCHOR_METHODS = (RAW, PLANES)
_NEEDS_BASE = frozenset({SAME, SPARSE, XOR, XOR_PLANES})

BLOCK = 1 << 20  # elements per independently coded sparse block: fits in cache, gives the workers equal shares, and
# is large enough that per-block Python overhead stays small (1 << 18 cost decode ~15% more CPU, encode no less)
_MIN_BLOCK, _MAX_BLOCK = 1 << 8, 1 << 28

# Sparse symbol alphabet: byte = min(gap, _LONG) * 3 + class; a byte of _LONG * 3 or more is followed (in the
# "long" stream) by gap - _LONG. Byte 255 is never written.
_LONG = 84
_FAR_SYM = _LONG * 3
_MAX_SYM = _LONG * 3 + 2
_CLS_PLUS, _CLS_MINUS, _CLS_OTHER = 0, 1, 2
_LONG_DTYPE = np.dtype(np.uint32)
_SPARSE_STREAMS = ("index", "syms", "others", "long")
_INDEX_FIELDS = 3  # per block: symbols, other values, long gaps

# Dense candidates are only estimated for small tensors, or when sparse coding costs more than this many bits per
# element: below it the gap code is already close to the entropy of positions plus values, which a byte-wise
# dense layout does not beat on optimizer updates (and estimating them costs a pass over a sample per tensor).
_DENSE_WORTH_BITS = 1.0
_SMALL = 1 << 16

_ONE_SHOT = 64 << 20  # containers up to this size are compressed from one buffer in one call
_META_KEY = "heterorl"
_STREAM_SEP = "::"
_MAX_HEADER = 1 << 28

_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
}
_DTYPE_NAMES = {dt: name for name, dt in _DTYPES.items()}
_INT_VIEW = {1: (torch.int8, np.int8, np.uint8), 2: (torch.int16, np.int16, np.uint16),
             4: (torch.int32, np.int32, np.uint32), 8: (torch.int64, np.int64, np.uint64)}

# ----------------------------------------------------------------------------------------------------------------
# Public data types


@dataclass(frozen=True)
class TensorInfo:
    """How one tensor is stored in a payload."""

    method: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    stream_bytes: dict[str, int]  # stream name -> bytes before zstd

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class PayloadInfo:
    """What a payload holds, read without any base: for logs, benchmarks and the version store."""

    kind: str  # KIND_ANCHOR or KIND_DELTA
    block: int
    tensors: dict[str, TensorInfo]
    payload_bytes: int
    container_bytes: int  # safetensors container size (zstd input)

    def method_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for info in self.tensors.values():
            counts[info.method] = counts.get(info.method, 0) + 1
        return counts


# ----------------------------------------------------------------------------------------------------------------
# Small helpers


def _dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype}; the codec handles {sorted(_DTYPES)}") from None


def _flat_ints(t: torch.Tensor) -> np.ndarray:
    """The tensor's bit patterns as a flat signed-integer numpy view (no copy; t must be contiguous on CPU)."""
    return t.detach().view(_INT_VIEW[t.element_size()][0]).reshape(-1).numpy()


def _cpu_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


_SHIFT_PLANES = 1 << 12  # from this many elements up, (un)planing by shifts beats one transposed byte copy


def _planes(flat: np.ndarray) -> np.ndarray:
    """Byte planes of a flat array: all low bytes, then all next bytes, ... (little-endian byte order). Long
    arrays shift each plane out (several times faster than a transposed byte copy, which is one call)."""
    size = flat.dtype.itemsize
    u = flat.view(_INT_VIEW[size][2])
    if u.size < _SHIFT_PLANES:
        return np.ascontiguousarray(u.astype(u.dtype.newbyteorder("<"), copy=False).view(np.uint8)
                                    .reshape(-1, size).T).reshape(-1)
    out = np.empty((size, u.size), np.uint8)
    for i in range(size):
        np.right_shift(u, 8 * i, out=out[i], casting="unsafe")
    return out.reshape(-1)


def _unplanes(planes: np.ndarray, out: np.ndarray) -> None:
    """Inverse of `_planes`: `planes` (size x n bytes, flat or 2-D) into `out` (flat, n elements of size bytes)."""
    size = out.dtype.itemsize
    u = out.view(_INT_VIEW[size][2])
    rows = planes.reshape(size, -1)
    if u.size < _SHIFT_PLANES or size == 1:
        u[...] = np.ascontiguousarray(rows.T).view(u.dtype.newbyteorder("<")).reshape(-1)
        return
    np.copyto(u, rows[0])
    part = np.empty_like(u)
    for i in range(1, size):
        np.copyto(part, rows[i])
        part <<= 8 * i
        u |= part


def _zigzag(v: np.ndarray) -> np.ndarray:
    """Signed -> unsigned so that small magnitudes of either sign become small numbers."""
    bits = v.dtype.itemsize * 8
    udt = _INT_VIEW[v.dtype.itemsize][2]
    return ((v << 1) ^ (v >> (bits - 1))).view(udt)


def _unzigzag(u: np.ndarray) -> np.ndarray:
    sdt = _INT_VIEW[u.dtype.itemsize][1]
    return ((u >> 1).view(sdt)) ^ (-(u & 1).view(sdt))


def _entropy_bits(hist: np.ndarray) -> float:
    """Total order-0 entropy in bits of a sample whose symbol counts are `hist`."""
    total = float(hist.sum())
    if total <= 0:
        return 0.0
    p = hist[hist > 0] / total
    return float(-(p * np.log2(p)).sum() * total)


def _plane_bits(flat: np.ndarray) -> float:
    size = flat.dtype.itemsize
    u8 = flat.view(np.uint8).reshape(-1, size)
    return sum(_entropy_bits(np.bincount(u8[:, i], minlength=256)) for i in range(size))


def _interleaved_bits(flat: np.ndarray) -> float:
    return _entropy_bits(np.bincount(flat.view(np.uint8), minlength=256))


def _sample(flat: np.ndarray, runs: int = 16, run: int = 1024) -> np.ndarray:
    """Evenly spread contiguous runs of a flat array: enough to estimate byte statistics cheaply."""
    n = flat.size
    if n <= runs * run:
        return flat
    starts = np.linspace(0, n - run, runs).astype(np.int64)
    return np.concatenate([flat[s : s + run] for s in starts])


def _split(weights: list[int], threads: int) -> list[int]:
    """Bounds of consecutive runs of items with about equal total weight: four runs per worker thread (enough to
    even out uneven blocks), one run when there is a single thread."""
    n = len(weights)
    parts = min(n, 4 * threads) if threads > 1 else min(n, 1)
    if parts <= 1:
        return [0, n]
    cum = np.cumsum(weights, dtype=np.float64)
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, parts) / parts, side="left") + 1
    return sorted({0, n, *(int(x) for x in cuts if 0 < x < n)})


# ----------------------------------------------------------------------------------------------------------------
# Sparse blocks


@dataclass
class _SparseBlock:
    syms: np.ndarray  # uint8, one per change
    others: np.ndarray  # signed ints, the differences that are not +-1
    long: np.ndarray  # uint32, gap - _LONG of the changes whose gap reaches _LONG


def _changes(new: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions (ascending) and wrapping integer differences of the elements that differ.

    Finding the changes is the dominant cost of encoding, so it first compares 64-bit words (several narrow
    elements per compare, and a nonzero over a quarter as many flags) and then looks only at the lanes of the
    words that changed. A tail shorter than a word is compared element by element.
    """
    lanes = 8 // new.dtype.itemsize
    whole = new.size - new.size % lanes
    if lanes == 1 or whole == 0:
        diff = new - base
        idx = np.flatnonzero(diff != 0)  # nonzero of a bool mask is several times faster than of ints
        return idx, np.take(diff, idx)
    words = np.flatnonzero(new[:whole].view(np.int64) != base[:whole].view(np.int64))
    diff = np.take(new[:whole].view(np.int64), words).view(new.dtype)
    diff -= np.take(base[:whole].view(np.int64), words).view(new.dtype)
    j = np.flatnonzero(diff != 0)
    vals = np.take(diff, j)
    pos = np.take(words, j >> (lanes.bit_length() - 1))
    pos <<= lanes.bit_length() - 1
    j &= lanes - 1
    pos |= j
    if whole < new.size:
        tail_pos, tail_vals = _changes(new[whole:], base[whole:])
        if tail_pos.size:
            pos, vals = np.concatenate([pos, tail_pos + whole]), np.concatenate([vals, tail_vals])
    return pos, vals


def _encode_sparse_block(new: np.ndarray, base: np.ndarray) -> _SparseBlock:
    return _code_changes(*_changes(new, base))


def _code_changes(idx: np.ndarray, vals: np.ndarray) -> _SparseBlock:
    """Symbols of one block from its changes (ascending positions, differences): all work runs over the changes
    only, in the narrowest integer types that hold them."""
    k = idx.size
    if k == 0:
        return _SparseBlock(np.empty(0, np.uint8), vals, np.empty(0, _LONG_DTYPE))
    gaps = np.empty(k, np.int32)  # blocks are < 2**31 elements
    gaps[0] = idx[0]
    np.subtract(idx[1:], idx[:-1], out=gaps[1:], casting="unsafe")
    gaps[1:] -= 1
    far = np.flatnonzero(gaps >= _LONG)
    long = np.take(gaps, far).view(_LONG_DTYPE)
    long -= _LONG
    np.minimum(gaps, _LONG, out=gaps)
    syms = gaps.astype(np.uint8)
    syms *= 3
    # class: +1 -> 0, -1 -> 1, other -> 2, i.e. 2 * (v != 1) - (v == -1)
    not_plus = vals != 1
    minus = vals == -1
    syms += not_plus.view(np.uint8)
    syms += not_plus.view(np.uint8)
    syms -= minus.view(np.uint8)
    not_plus ^= minus  # now: other
    return _SparseBlock(syms, vals[not_plus], long)


def _sparse_bits(blocks: list[_SparseBlock], zz: np.ndarray) -> float:
    """Estimated compressed bits of a sparse tensor: order-0 entropy of its symbols (a strided sample of a long
    stream is accurate enough) and of the byte planes of its other values and long gaps, plus block overhead."""
    syms = np.concatenate([b.syms for b in blocks]) if blocks else np.empty(0, np.uint8)
    long = np.concatenate([b.long for b in blocks]) if blocks else np.empty(0, _LONG_DTYPE)
    stride = max(1, syms.size >> 16)
    sample = syms[::stride]
    hist = np.bincount(sample, minlength=256) * (syms.size / max(1, sample.size))
    return _entropy_bits(hist) + _plane_bits(zz) + _plane_bits(long) + 192 * len(blocks)


def _div3(syms: np.ndarray) -> np.ndarray:
    return syms // np.uint8(3)  # uint8 by a constant: vectorised, far cheaper than a table lookup


def _check_sparse_block(syms: np.ndarray, n_others: int, long: np.ndarray, length: int, where: str) -> None:
    """Reject a block whose symbols would write outside it or disagree with its counts of other values and long
    gaps (used before anything is written; decoding checks the same things on the way)."""
    if not syms.size:
        if n_others or long.size:
            raise ValueError(f"{where}: sparse block has no changes but {n_others} other values and {long.size} "
                             "long gaps")
        return
    if int(syms.max()) > _MAX_SYM:
        raise ValueError(f"{where}: sparse block holds symbol {int(syms.max())} (at most {_MAX_SYM})")
    far = int(np.count_nonzero(syms >= _FAR_SYM))
    if far != long.size:
        raise ValueError(f"{where}: sparse block needs {far} long gaps but holds {long.size}")
    q = _div3(syms)
    span = syms.size + int(q.sum(dtype=np.int64)) + int(long.sum(dtype=np.int64))  # one past the last change
    if span > length:
        raise ValueError(f"{where}: sparse block addresses element {span - 1} beyond its {length} elements")
    q *= 3
    others = int(np.count_nonzero((syms - q) == _CLS_OTHER))
    if others != n_others:
        raise ValueError(f"{where}: sparse block needs {others} other values but holds {n_others}")


def _apply_sparse_block(dst: np.ndarray, syms: np.ndarray, others: np.ndarray, long: np.ndarray,
                        where: str) -> None:
    """dst (a block of bit patterns, in place) += the block's differences (wrapping).

    Checks the block on the way (symbol range, counts, extent) before its single write, so a caller that
    skipped `_check_sparse_block` still gets a ValueError for a bad block, never a stray write.
    """
    k = syms.size
    if k == 0:
        if others.size or long.size:
            raise ValueError(f"{where}: sparse block has no changes but {others.size} other values and "
                             f"{long.size} long gaps")
        return
    far = np.flatnonzero(syms >= _FAR_SYM)
    if far.size != long.size:
        raise ValueError(f"{where}: sparse block needs {far.size} long gaps but holds {long.size}")
    if far.size and int(np.take(syms, far).max()) > _MAX_SYM:
        raise ValueError(f"{where}: sparse block holds a symbol above {_MAX_SYM}")
    if long.size and int(long.max()) >= dst.size:
        raise ValueError(f"{where}: sparse block has a gap beyond its {dst.size} elements")
    q = _div3(syms)
    step = q.astype(np.int64)  # gap + 1, then the position: cumsum over int64 is several times cheaper than
    step += 1                  # one that converts as it goes
    if far.size:
        step[far] += long
    pos = np.cumsum(step, out=step)
    if int(pos[-1]) > dst.size:
        raise ValueError(f"{where}: sparse block addresses element {int(pos[-1]) - 1} beyond its {dst.size} "
                         "elements")
    pos -= 1
    q *= 3
    cls = syms - q
    vals = cls.astype(dst.dtype)  # +1 -> 0, -1 -> 1, other -> 2; then 1 - 2 * class: +1, -1, (placeholder)
    vals *= -2
    vals += 1
    other = cls == _CLS_OTHER
    if int(np.count_nonzero(other)) != others.size:
        raise ValueError(f"{where}: sparse block needs {int(np.count_nonzero(other))} other values but holds "
                         f"{others.size}")
    if others.size:
        vals[other] = others
    # Positions are distinct, so a gather, an add and a scatter do it; np.add.at would be cheaper on one core but
    # holds the GIL throughout, so the other worker would wait.
    vals += np.take(dst, pos)
    dst[pos] = vals


# ----------------------------------------------------------------------------------------------------------------
# Container (safetensors layout) writing and reading


@dataclass
class _Entry:
    name: str
    method: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    streams: dict[str, list[np.ndarray]] = field(default_factory=dict)  # stream -> pieces (uint8-viewable)


def _nbytes(pieces: list[np.ndarray]) -> int:
    return sum(p.nbytes for p in pieces)


def _write_container(entries: list[_Entry], kind: str, block: int, level: int, threads: int) -> bytes:
    """The container through zstd: a small one (a delta) assembled in one buffer and compressed in one call; a
    large one (an anchor) streamed stream by stream, never joined into one model-sized uncompressed buffer (a
    stream's block pieces are joined first, as a call per small piece costs more than the copy)."""
    meta_tensors = {}
    header: dict[str, object] = {}
    offset = 0
    order: list[tuple[list[np.ndarray], int]] = []
    for e in entries:
        lengths = {s: _nbytes(p) for s, p in e.streams.items()}
        meta_tensors[e.name] = {"method": e.method, "dtype": _dtype_name(e.dtype), "shape": list(e.shape),
                                "streams": lengths}
        for s, pieces in e.streams.items():
            padded = -(-lengths[s] // 8) * 8  # keep every buffer 8-byte aligned
            header[f"{e.name}{_STREAM_SEP}{s}"] = {"dtype": "U8", "shape": [padded],
                                                  "data_offsets": [offset, offset + padded]}
            offset += padded
            order.append((pieces, padded - lengths[s]))
    meta = {"format": FORMAT, "kind": kind, "block": block, "tensors": meta_tensors}
    header = {"__metadata__": {_META_KEY: json.dumps(meta, separators=(",", ":"))}, **header}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    total = 8 + len(head) + offset

    params = zstandard.ZstdCompressionParameters.from_level(
        level, threads=max(0, threads) if threads > 1 else 0, write_checksum=1, write_content_size=1,
        job_size=(1 << 20) if threads > 1 else 0,
    )
    compressor = zstandard.ZstdCompressor(compression_params=params)
    if total <= _ONE_SHOT:  # a delta: one buffer and one call cost about half of streaming it
        buf = np.zeros(total, np.uint8)
        buf[:8] = np.frombuffer(struct.pack("<Q", len(head)), np.uint8)
        buf[8 : 8 + len(head)] = np.frombuffer(head, np.uint8)
        at = 8 + len(head)
        for pieces, pad in order:
            for p in pieces:
                flat = np.ascontiguousarray(p).reshape(-1).view(np.uint8)
                buf[at : at + flat.size] = flat
                at += flat.size
            at += pad
        return compressor.compress(buf)
    cobj = compressor.compressobj(size=total)
    out = [cobj.compress(struct.pack("<Q", len(head)) + head)]
    for pieces, pad in order:
        flat = [np.ascontiguousarray(p).reshape(-1).view(np.uint8) for p in pieces if p.nbytes]
        if len(flat) > 1:
            flat = [np.concatenate(flat)]
        for p in flat:
            out.append(cobj.compress(memoryview(p)))
        if pad:
            out.append(cobj.compress(bytes(pad)))
    out.append(cobj.flush())
    return b"".join(out)


@dataclass
class _Container:
    kind: str
    block: int
    infos: dict[str, TensorInfo]
    buffers: dict[str, dict[str, np.ndarray]]  # tensor -> stream -> uint8 view into the decompressed bytes
    container_bytes: int


def _frame_size(view: memoryview) -> int:
    """Compressed size of the zstd frame at the start of `view`, walking its block headers (no decompression).

    A payload must be exactly one frame with a content checksum: bytes after it, or a frame without a checksum,
    are not something this codec wrote.
    """
    data = view.cast("B") if view.format != "B" else view
    try:
        pos = zstandard.frame_header_size(data)
    except zstandard.ZstdError as err:
        raise ValueError(f"payload is not a zstd frame: {err}") from None
    if not (data[4] >> 2) & 1:
        raise ValueError("payload zstd frame has no content checksum")
    while True:
        if pos + 3 > len(data):
            raise ValueError("payload is truncated inside the zstd frame")
        head = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16
        pos += 3 + (1 if (head >> 1) & 3 == 1 else head >> 3)
        if head & 1:
            return pos + 4


def _decompress(payload: bytes | memoryview, limit: int | None) -> np.ndarray:
    view = memoryview(payload)
    try:
        params = zstandard.get_frame_parameters(view)
    except zstandard.ZstdError as err:
        raise ValueError(f"payload is not a zstd frame: {err}") from None
    size = params.content_size
    if size == zstandard.CONTENTSIZE_UNKNOWN or size == zstandard.CONTENTSIZE_ERROR:
        raise ValueError("payload zstd frame does not declare its content size")
    if limit is not None and size > limit:
        raise ValueError(f"payload declares {size} bytes of content, more than {limit} possible for this base")
    end = _frame_size(view)
    if end > len(view):
        raise ValueError(f"payload is truncated: its zstd frame needs {end} bytes, got {len(view)}")
    if end < len(view):
        raise ValueError(f"payload has {len(view) - end} bytes after its zstd frame")
    try:  # one-shot: checks the frame is complete and its checksum matches
        data = zstandard.ZstdDecompressor().decompress(view, max_output_size=max(size, 1))
    except zstandard.ZstdError as err:
        raise ValueError(f"payload is corrupt (zstd: {err})") from None
    if len(data) != size:
        raise ValueError(f"payload decompressed to {len(data)} bytes, its frame declares {size}")
    return np.frombuffer(data, np.uint8)


def _parse_shape(raw: object, where: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw):
        raise ValueError(f"{where}: shape must be a list of non-negative integers, got {raw!r}")
    return tuple(raw)


def _read_container(payload: bytes | memoryview, limit: int | None) -> _Container:
    data = _decompress(payload, limit)
    if data.size < 8:
        raise ValueError("payload too short for a safetensors header")
    (hlen,) = struct.unpack("<Q", data[:8].tobytes())
    if hlen > min(_MAX_HEADER, data.size - 8):
        raise ValueError(f"payload header length {hlen} exceeds the payload")
    try:
        header = json.loads(data[8 : 8 + hlen].tobytes())
        meta = json.loads(header.pop("__metadata__")[_META_KEY])
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise ValueError(f"payload header is not a heterorl safetensors header: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"payload format is {meta.get('format') if isinstance(meta, dict) else meta!r}, "
                         f"expected {FORMAT!r}")
    kind = meta.get("kind")
    if kind not in (KIND_ANCHOR, KIND_DELTA):
        raise ValueError(f"payload kind {kind!r} is neither {KIND_ANCHOR!r} nor {KIND_DELTA!r}")
    block = meta.get("block")
    if not isinstance(block, int) or not _MIN_BLOCK <= block <= _MAX_BLOCK:
        raise ValueError(f"payload block size {block!r} outside [{_MIN_BLOCK}, {_MAX_BLOCK}]")
    tensors = meta.get("tensors")
    if not isinstance(tensors, dict):
        raise ValueError("payload metadata has no tensor table")
    body = data[8 + hlen :]
    allowed = DELTA_METHODS if kind == KIND_DELTA else ANCHOR_METHODS
    infos: dict[str, TensorInfo] = {}
    buffers: dict[str, dict[str, np.ndarray]] = {}
    used = 0
    for name, t in tensors.items():
        where = f"tensor {name!r}"
        if not isinstance(t, dict):
            raise ValueError(f"{where}: metadata entry is not an object")
        method = t.get("method")
        if method not in allowed:
            raise ValueError(f"{where}: unknown method {method!r} for a {kind} (known: {', '.join(allowed)})")
        dtype = _DTYPES.get(t.get("dtype"))
        if dtype is None:
            raise ValueError(f"{where}: unknown dtype {t.get('dtype')!r}")
        shape = _parse_shape(t.get("shape"), where)
        streams = t.get("streams")
        if not isinstance(streams, dict):
            raise ValueError(f"{where}: no stream table")
        bufs = {}
        for s, length in streams.items():
            key = f"{name}{_STREAM_SEP}{s}"
            spec = header.get(key)
            if not isinstance(spec, dict) or spec.get("dtype") != "U8":
                raise ValueError(f"{where}: stream {s!r} missing from the container")
            try:
                start, end = (int(x) for x in spec["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{where}: stream {s!r} has no valid data_offsets") from None
            if not (isinstance(length, int) and 0 <= start <= end <= body.size and 0 <= length <= end - start):
                raise ValueError(f"{where}: stream {s!r} lies outside the payload ({start}..{end}, {length})")
            used += end - start
            bufs[s] = body[start : start + length]
        infos[name] = TensorInfo(method, dtype, shape, {s: int(b.size) for s, b in bufs.items()})
        buffers[name] = bufs
    if len(header) != sum(len(b) for b in buffers.values()):
        raise ValueError("payload container holds buffers that no tensor uses")
    return _Container(kind, block, infos, buffers, int(data.size))


# ----------------------------------------------------------------------------------------------------------------
# Encoding


def _check_pair(new: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> None:
    missing, extra = sorted(set(new) - set(base)), sorted(set(base) - set(new))
    if missing or extra:
        raise ValueError(f"new and base name different tensors: only in new {missing[:5]}, only in base {extra[:5]}")
    for name, t in new.items():
        b = base[name]
        if t.dtype != b.dtype or tuple(t.shape) != tuple(b.shape):
            raise ValueError(f"tensor {name!r}: new is {t.dtype} {tuple(t.shape)}, base is {b.dtype} "
                             f"{tuple(b.shape)}; a delta needs both the same")


def _dense_estimates(new: np.ndarray, base: np.ndarray | None, allowed: Collection[str]) -> dict[str, float]:
    """Estimated compressed bits of the dense methods from the byte statistics of a sample."""
    n = new.size
    if n == 0:
        return {m: 0.0 for m in (RAW, PLANES, XOR, XOR_PLANES) if m in allowed and (base is not None or m in
                                                                                  ANCHOR_METHODS)}
    ns = _sample(new)
    scale = n / ns.size
    est: dict[str, float] = {}
    if RAW in allowed:
        est[RAW] = scale * _interleaved_bits(ns)
    if PLANES in allowed:
        est[PLANES] = scale * _plane_bits(ns)
    if base is not None and (XOR in allowed or XOR_PLANES in allowed):
        xs = ns ^ _sample(base)
        if XOR in allowed:
            est[XOR] = scale * _interleaved_bits(xs)
        if XOR_PLANES in allowed:
            est[XOR_PLANES] = scale * _plane_bits(xs)
    return est


def _dense_streams(method: str, new: np.ndarray, base: np.ndarray | None) -> dict[str, list[np.ndarray]]:
    if method == RAW:
        return {"data": [new]}
    if method == PLANES:
        return {"data": [_planes(new)]}
    x = new ^ base
    return {"data": [x if method == XOR else _planes(x)]}


def encode(new: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor] | None = None, *,
           level: int = DEFAULT_LEVEL, threads: int = 2, methods: Collection[str] | None = None,
           block: int = BLOCK) -> bytes:
    """Payload that turns `base` into `new` exactly (a delta), or rebuilds `new` alone when base is None (anchor).

    `methods` restricts the candidate representations (default: all that apply); the smallest estimate wins.
    `block` (a power of two) is the sparse coding unit, recorded in the payload. Composition: encode the newest
    version against whichever older version the receiver holds.
    """
    if not (isinstance(block, int) and _MIN_BLOCK <= block <= _MAX_BLOCK and block & (block - 1) == 0):
        raise ValueError(f"block must be a power of two in [{_MIN_BLOCK}, {_MAX_BLOCK}], got {block!r}")
    kind = KIND_ANCHOR if base is None else KIND_DELTA
    allowed = tuple(ANCHOR_METHODS if base is None else DELTA_METHODS)
    if methods is not None:
        unknown = sorted(set(methods) - set(DELTA_METHODS))
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {', '.join(DELTA_METHODS)}")
        allowed = tuple(m for m in allowed if m in set(methods))
        if not allowed:
            raise ValueError(f"none of the methods {sorted(methods)} can encode a {kind}")
    if base is not None:
        _check_pair(new, base)
    for name, t in new.items():
        if not isinstance(name, str) or _STREAM_SEP in name:
            raise ValueError(f"tensor name {name!r} must be a string without {_STREAM_SEP!r}")
        _dtype_name(t.dtype)

    # Every block of every tensor goes to the workers first (most tensors are a single block, so per-tensor
    # parallelism would leave a core idle), in a few batches of consecutive blocks (a future per block costs
    # more in Python than a block's coding); the choice per tensor is then made in order as batches finish.
    work: list[tuple[str, torch.Tensor, np.ndarray, np.ndarray | None, int, int]] = []
    spans: list[tuple[np.ndarray, np.ndarray]] = []
    for name, t in new.items():
        new_t = _cpu_contiguous(t)
        nf = _flat_ints(new_t)
        bf = None if base is None else _flat_ints(_cpu_contiguous(base[name]))
        first = len(spans)
        if bf is not None and (SAME in allowed or SPARSE in allowed):
            spans += [(nf[s : s + block], bf[s : s + block]) for s in range(0, nf.size, block)]
        work.append((name, new_t, nf, bf, first, len(spans)))
    bounds = _split([a.size for a, _ in spans], threads)
    pool = ThreadPoolExecutor(threads) if threads > 1 and len(bounds) > 2 else None
    try:
        def code(lo: int, hi: int) -> list[_SparseBlock]:
            return [_encode_sparse_block(*spans[i]) for i in range(lo, hi)]

        batches = [pool.submit(code, lo, hi) if pool else (lo, hi) for lo, hi in itertools.pairwise(bounds)]
        pending = iter(batches)
        done: list[_SparseBlock] = []
        entries = []
        for name, new_t, nf, bf, first, end in work:
            while len(done) < end:  # batches are consecutive runs of blocks, finished in order here
                batch = next(pending)
                done += batch.result() if pool else code(*batch)
            entries.append(_choose(name, new_t, nf, bf, done[first:end], allowed,
                                   sparse_done=end > first or not nf.size))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return _write_container(entries, kind, block, level, threads)


def _choose(name: str, new_t: torch.Tensor, new: np.ndarray, base: np.ndarray | None, blocks: list[_SparseBlock],
            allowed: tuple[str, ...], sparse_done: bool) -> _Entry:
    """The tensor's entry in the smallest (estimated) representation."""
    entry = _Entry(name, "", new_t.dtype, tuple(new_t.shape))
    est: dict[str, float] = {}
    zz = None
    if base is not None and sparse_done:
        if SAME in allowed and not any(b.syms.size for b in blocks):
            entry.method = SAME
            return entry
        if SPARSE in allowed:
            zz = _zigzag(np.concatenate([b.others for b in blocks]) if blocks else new[:0])
            # The streams' own size bounds their compressed size: below one bit per element the dense methods
            # need not be estimated at all, and neither does the sparse entropy.
            raw_bits = 8.0 * sum(b.syms.nbytes + b.long.nbytes for b in blocks) + 8.0 * zz.nbytes
            est[SPARSE] = raw_bits
            if new.size <= _SMALL or raw_bits > _DENSE_WORTH_BITS * new.size:
                est[SPARSE] = _sparse_bits(blocks, zz)
    if SPARSE not in est or new.size <= _SMALL or est[SPARSE] > _DENSE_WORTH_BITS * new.size:
        est.update(_dense_estimates(new, base, allowed))
    if not est:
        raise ValueError(f"tensor {name!r}: no allowed method can encode it (allowed: {', '.join(allowed)})")
    method = min(est, key=lambda m: (est[m], allowed.index(m)))
    entry.method = method
    if method == SPARSE:
        counts = np.array([[b.syms.size, b.others.size, b.long.size] for b in blocks], np.int64)
        long = np.concatenate([b.long for b in blocks]) if blocks else np.empty(0, _LONG_DTYPE)
        entry.streams = {"index": [counts.reshape(-1, _INDEX_FIELDS)], "syms": [b.syms for b in blocks],
                         "others": [_planes(zz)], "long": [_planes(long)]}
    else:
        entry.streams = _dense_streams(method, new, base)
    return entry


# ----------------------------------------------------------------------------------------------------------------
# Decoding


def _payload_limit(base: Mapping[str, torch.Tensor] | None) -> int | None:
    """The largest container a delta against `base` can need; guards against absurd declared sizes."""
    if base is None:
        return None
    total = sum(t.numel() * t.element_size() for t in base.values())
    names = sum(len(str(name)) for name in base)
    return 3 * total + 8 * names + 1024 * len(base) + (1 << 20)


@dataclass
class _SparseParts:
    """A sparse tensor's streams cut into its blocks (symbols are views into the decompressed container)."""

    syms: list[np.ndarray]
    others: list[np.ndarray]  # signed ints of the tensor's width
    long: list[np.ndarray]  # uint32


def _sparse_parts(c: _Container, name: str, info: TensorInfo) -> _SparseParts:
    """Check a sparse tensor's index against its streams and cut them into blocks."""
    where = f"tensor {name!r}"
    bufs = c.buffers[name]
    size = info.dtype.itemsize
    nblocks = -(-info.numel // c.block)
    index = bufs["index"]
    if index.size != nblocks * _INDEX_FIELDS * 8:
        raise ValueError(f"{where}: sparse index has {index.size} bytes, expected {nblocks * _INDEX_FIELDS * 8}")
    counts = index.view(np.int64).reshape(-1, _INDEX_FIELDS)
    totals = counts.sum(axis=0) if nblocks else np.zeros(_INDEX_FIELDS, np.int64)
    if (counts < 0).any() or int(totals[0]) != bufs["syms"].size or int(totals[1]) * size != bufs["others"].size \
            or int(totals[2]) * _LONG_DTYPE.itemsize != bufs["long"].size:
        raise ValueError(f"{where}: sparse index does not match its symbol, value and long-gap streams")
    at = np.zeros((nblocks + 1, _INDEX_FIELDS), np.int64)
    np.cumsum(counts, axis=0, out=at[1:])
    at = at.tolist()
    others = np.empty(int(totals[1]), _INT_VIEW[size][2])
    _unplanes(bufs["others"], others)
    others = _unzigzag(others)
    long = np.empty(int(totals[2]), _LONG_DTYPE)
    _unplanes(bufs["long"], long)
    return _SparseParts([bufs["syms"][at[i][0] : at[i + 1][0]] for i in range(nblocks)],
                        [others[at[i][1] : at[i + 1][1]] for i in range(nblocks)],
                        [long[at[i][2] : at[i + 1][2]] for i in range(nblocks)])


def _check_streams(c: _Container, name: str, info: TensorInfo) -> _SparseParts | None:
    """Validate a tensor's buffers (their lengths, and a sparse index against its streams); returns the sparse
    blocks when the tensor is sparse. `_block_checks` goes on to every sparse block's extent and counts."""
    where = f"tensor {name!r}"
    bufs = c.buffers[name]
    n, size = info.numel, info.dtype.itemsize
    need = {SAME: set(), SPARSE: set(_SPARSE_STREAMS)}.get(info.method, {"data"})
    if set(bufs) != need:
        raise ValueError(f"{where}: method {info.method!r} needs streams {sorted(need)}, payload has {sorted(bufs)}")
    if info.method == SPARSE:
        return _sparse_parts(c, name, info)
    if info.method != SAME and bufs["data"].size != n * size:
        raise ValueError(f"{where}: {info.method} data has {bufs['data'].size} bytes, expected {n * size}")
    return None


def _block_checks(c: _Container, parts: Mapping[str, _SparseParts | None]) -> list[Callable[[], None]]:
    """Closures that check every sparse block (independent, so the workers share them)."""

    def check(name: str, p: _SparseParts, i: int) -> None:
        length = min(c.block, c.infos[name].numel - i * c.block)
        _check_sparse_block(p.syms[i], p.others[i].size, p.long[i], length, f"tensor {name!r} block {i}")

    return [lambda n=name, p=p, i=i: check(n, p, i) for name, p in parts.items() if p is not None
            for i in range(len(p.syms))]


def _check_against(c: _Container, targets: Mapping[str, torch.Tensor] | None, *,
                   widen: bool) -> dict[str, _SparseParts | None]:
    if c.kind == KIND_DELTA and targets is None:
        raise ValueError("payload is a delta; decoding it needs the base version it was encoded against")
    if targets is not None:
        missing, extra = sorted(set(c.infos) - set(targets)), sorted(set(targets) - set(c.infos))
        if missing or extra:
            raise ValueError(f"payload and base name different tensors: only in payload {missing[:5]}, "
                             f"only in base {extra[:5]}")
        for name, info in c.infos.items():
            t = targets[name]
            if tuple(t.shape) != info.shape:
                raise ValueError(f"tensor {name!r}: payload shape {info.shape}, base shape {tuple(t.shape)}")
            ok = t.dtype == info.dtype or (widen and t.dtype.is_floating_point and info.dtype.is_floating_point
                                           and t.dtype.itemsize > info.dtype.itemsize)
            if not ok:
                raise ValueError(f"tensor {name!r}: payload dtype {info.dtype}, base dtype {t.dtype}")
    return {name: _check_streams(c, name, info) for name, info in c.infos.items()}


def _tensor_tasks(c: _Container, name: str, parts: _SparseParts | None, dst: np.ndarray,
                  src: np.ndarray | None) -> list[Callable[[], None]]:
    """Closures that write the payload's version of one tensor into `dst` (flat ints); `src` is the base to
    start from when dst is a fresh buffer. Sparse tensors give one task per block."""
    info = c.infos[name]
    bufs = c.buffers[name]
    size = info.dtype.itemsize
    if info.method == SPARSE:
        assert parts is not None

        def run(i: int) -> None:
            s = i * c.block
            blk = dst[s : s + c.block]
            if src is not None:
                np.copyto(blk, src[s : s + c.block])  # copy while the block is about to be in cache anyway
            _apply_sparse_block(blk, parts.syms[i], parts.others[i], parts.long[i], f"tensor {name!r} block {i}")

        return [lambda i=i: run(i) for i in range(len(parts.syms))]

    def dense() -> None:
        if src is not None and info.method in (SAME, XOR, XOR_PLANES):
            np.copyto(dst, src)
        if info.method == SAME:
            return
        data = bufs["data"]
        if info.method == RAW:
            dst.view(np.uint8)[...] = data
        elif info.method == PLANES:
            _unplanes(data, dst)
        elif info.method == XOR:
            np.bitwise_xor(dst, data.view(dst.dtype), out=dst)
        else:  # XOR_PLANES, a block at a time so no tensor-sized temporary is needed
            planes = data.reshape(size, -1)
            x = np.empty(min(c.block, dst.size), dst.dtype)
            for s in range(0, dst.size, c.block):
                part = x[: min(c.block, dst.size - s)]
                _unplanes(planes[:, s : s + part.size], part)
                np.bitwise_xor(dst[s : s + part.size], part, out=dst[s : s + part.size])

    return [dense]


def _run(tasks: list[Callable[[], None]], pool: ThreadPoolExecutor | None, threads: int) -> None:
    """Run the closures, on the pool in a few batches of consecutive ones (a future per block of a few hundred
    microseconds would cost a large share of the work in Python)."""
    if pool is None or len(tasks) <= 1:
        for task in tasks:
            task()
        return
    bounds = _split([1] * len(tasks), threads)

    def batch(lo: int, hi: int) -> None:
        for task in tasks[lo:hi]:
            task()

    list(pool.map(batch, bounds[:-1], bounds[1:]))


def inspect(payload: bytes | memoryview) -> PayloadInfo:
    """Read a payload's table of contents (validating its structure) without applying it."""
    c = _read_container(payload, None)
    _run(_block_checks(c, {name: _check_streams(c, name, info) for name, info in c.infos.items()}), None, 1)
    return PayloadInfo(c.kind, c.block, c.infos, len(memoryview(payload)), c.container_bytes)


def decode(payload: bytes | memoryview, base: Mapping[str, torch.Tensor] | None, *,
           threads: int = 2) -> dict[str, torch.Tensor]:
    """The version the payload encodes, as new CPU tensors (base is read, never modified).

    Sparse blocks are checked as they are decoded (into the new tensors only), so a bad payload raises
    ValueError and nothing is returned.
    """
    c = _read_container(payload, _payload_limit(base))
    parts = _check_against(c, base, widen=False)
    out: dict[str, torch.Tensor] = {}
    tasks: list[Callable[[], None]] = []
    for name, info in c.infos.items():
        out[name] = t = torch.empty(info.shape, dtype=info.dtype)
        src = _flat_ints(_cpu_contiguous(base[name])) if info.method in _NEEDS_BASE else None
        tasks += _tensor_tasks(c, name, parts[name], _flat_ints(t), src)
    with ThreadPoolExecutor(threads) if threads > 1 else contextlib.nullcontext() as pool:
        _run(tasks, pool, threads)
    return out


def apply_(payload: bytes | memoryview, tensors: MutableMapping[str, torch.Tensor], *,
           threads: int = 2) -> PayloadInfo:
    """Turn `tensors` (the base version) into the payload's version in place; returns the payload's table of
    contents (what `inspect` reads, without decompressing it a second time).

    The payload is validated completely before the first tensor changes. At most one tensor-sized temporary is
    held at a time: for a target that is not contiguous, or whose dtype is a wider float than the encoded one
    (a sampler computing in fp32 on the exact upcast of the bf16 version), that tensor is converted to the
    encoded dtype, updated, and copied back.
    """
    c = _read_container(payload, _payload_limit(tensors))
    parts = _check_against(c, tensors, widen=True)
    direct: list[Callable[[], None]] = []
    indirect: list[str] = []
    for name, info in c.infos.items():
        t = tensors[name]
        if t.dtype == info.dtype and t.is_contiguous() and t.device.type == "cpu":
            direct += _tensor_tasks(c, name, parts[name], _flat_ints(t), None)
        else:
            indirect.append(name)
    with ThreadPoolExecutor(threads) if threads > 1 else contextlib.nullcontext() as pool, torch.no_grad():
        _run(_block_checks(c, parts), pool, threads)  # all of them before the first write
        _run(direct, pool, threads)
        for name in indirect:  # one converted temporary at a time
            t = tensors[name]
            work = t.detach().to(device="cpu", dtype=c.infos[name].dtype).contiguous()
            _run(_tensor_tasks(c, name, parts[name], _flat_ints(work), None), pool, threads)
            t.copy_(work)
            del work
    return PayloadInfo(c.kind, c.block, c.infos, len(memoryview(payload)), c.container_bytes)


# ----------------------------------------------------------------------------------------------------------------
# Version hash


def digest_algorithm(recorded: str) -> str:
    """The algorithm a digest string was made with (one of DIGEST_ALGORITHMS); ValueError, naming it, for any
    other string, e.g. a digest from a newer heterorl."""
    algorithm, sep, value = recorded.partition(":")
    if not sep:
        algorithm, value = DIGEST_SHA256, recorded  # the legacy form carries no name
    if algorithm in DIGEST_ALGORITHMS and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return algorithm
    raise ValueError(f"unknown weights digest {recorded[:32]!r}: this heterorl checks 'blake3:<64 hex>' and legacy "
                     f"bare sha256 digests")


def digest(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None, *,
           like: str | None = None) -> str:
    """The version hash a sampler checks after reconstruction: over (sorted name, dtype, shape, raw bytes).

    Returns "blake3:<hex>" (BLAKE3, 256 bits). With `like` (a recorded digest), it is computed with the algorithm
    that digest names instead, so a run recorded with legacy sha256 digests (a bare 64-hex string, same input)
    still verifies; an unknown algorithm raises ValueError. BLAKE3 is a cryptographic hash, as this one must be:
    samplers accept weights from untrusted relays on its word. It costs about a quarter of sha256's CPU here.

    With `dtype`, each tensor is hashed as if converted to it (one tensor at a time), so a sampler holding fp32
    upcasts of a bf16 version gets the bf16 version's hash.
    """
    algorithm = DIGEST_BLAKE3 if like is None else digest_algorithm(like)
    h = (blake3.blake3 if algorithm == DIGEST_BLAKE3 else hashlib.sha256)(_DIGEST_DOMAIN.encode())
    for name in sorted(tensors):
        t = tensors[name].detach()
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        t = _cpu_contiguous(t)
        head = json.dumps([name, _dtype_name(t.dtype), list(t.shape)], separators=(",", ":")).encode()
        h.update(struct.pack("<Q", len(head)) + head)
        if t.numel():
            h.update(memoryview(_flat_ints(t).view(np.uint8)))
    return f"{DIGEST_BLAKE3}:{h.hexdigest()}" if algorithm == DIGEST_BLAKE3 else h.hexdigest()
