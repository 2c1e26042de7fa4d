"""Published weight versions and the payloads samplers download: one combined delta or a full anchor.

Version numbers start at 1 (the weights the run started from) and grow by one per published optimizer step
(a resumed run continues them, skipping any number published after its checkpoint: see `Learner._resume`).
The store holds the bf16 tensors of the newest `keep` versions. A sampler holding version A that asks for B gets
`codec.encode(B, A)` — one delta however far behind it is, since deltas compose by encoding against any held
base — or a full anchor when it holds nothing, holds a version that was pruned, or the delta would be larger.
Payloads are cached per (base, version), so many samplers at the same version cost one encode; the delta from the
previous version is encoded at publish time because every up-to-date sampler needs it next.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from heterorl.common import codec
from heterorl.common.weights import ENCODING_ANCHOR, ENCODING_DELTA, chunk_hashes, sha256_hex


@dataclass(frozen=True)
class Payload:
    version: int
    base_version: int        # 0: a full anchor
    encoding: str
    data: bytes
    sha256: str
    weights_sha256: str      # codec.digest of the version's tensors: what the sampler must end up holding
    encode_seconds: float
    chunk_sha256: tuple[str, ...]  # hash of each aligned chunk, computed once for every sampler that fetches it


@dataclass(frozen=True)
class _Version:
    version: int
    tensors: dict[str, torch.Tensor]
    weights_sha256: str


class VersionStore:
    """Thread-safe: the trainer publishes while gRPC handlers fetch payloads."""

    def __init__(self, keep: int, chunk_bytes: int, cached_payloads: int = 16):
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.keep = keep
        self.chunk_bytes = chunk_bytes
        self.cached_payloads = cached_payloads
        self._versions: OrderedDict[int, _Version] = OrderedDict()
        self._payloads: OrderedDict[tuple[int, int], Payload] = OrderedDict()
        self._encoding: dict[tuple[int, int], threading.Lock] = {}
        self._lock = threading.Lock()
        self.encodes = 0  # how many payloads were actually encoded (the cache saves the rest)

    def publish(self, version: int, tensors: dict[str, torch.Tensor], weights_sha256: str | None = None) -> Payload | None:
        """Hold a new version (the tensors are kept, not copied); returns the delta from the previous one.

        Version numbers must grow but may skip: a resumed run skips the numbers of versions lost in a crash.
        `weights_sha256` is `codec.digest(tensors)` when the caller has already computed it.
        """
        digest = weights_sha256 or codec.digest(tensors)
        with self._lock:
            newest = next(reversed(self._versions), 0)
            if version <= newest:
                raise ValueError(f"version {version} is not newer than {newest}")
            self._versions[version] = _Version(version, tensors, digest)
            while len(self._versions) > self.keep:
                old, _ = self._versions.popitem(last=False)
                for key in [k for k in self._payloads if old in k]:
                    del self._payloads[key]
        return self.payload(newest, version) if newest else None

    def payload(self, have: int, want: int) -> Payload:
        """The bytes that turn version `have` (0 = nothing) into `want`; KeyError if `want` is not held."""
        with self._lock:
            if want not in self._versions:
                raise KeyError(want)
            base = have if have in self._versions and have < want else 0
            key = (base, want)
            cached = self._payloads.get(key)
            if cached is not None:
                self._payloads.move_to_end(key)
                return cached
            lock = self._encoding.setdefault(key, threading.Lock())
            target = self._versions[want]
            base_tensors = self._versions[base].tensors if base else None
        with lock:  # one encode per key, however many samplers ask at once
            with self._lock:
                cached = self._payloads.get(key)
            if cached is not None:
                return cached
            started = time.perf_counter()
            data = codec.encode(target.tensors, base_tensors)
            payload = Payload(
                version=want,
                base_version=base,
                encoding=ENCODING_DELTA if base else ENCODING_ANCHOR,
                data=data,
                sha256=sha256_hex(data),
                weights_sha256=target.weights_sha256,
                encode_seconds=time.perf_counter() - started,
                chunk_sha256=chunk_hashes(data, self.chunk_bytes),
            )
            with self._lock:
                self.encodes += 1
                anchor = self._payloads.get((0, want))
                if base and anchor is not None and len(anchor.data) <= len(data):
                    payload = anchor  # the delta is no smaller than the anchor: send the anchor
                if want in self._versions:
                    self._payloads[key] = payload
                    while len(self._payloads) > self.cached_payloads:
                        self._payloads.popitem(last=False)
                self._encoding.pop(key, None)
            return payload

    def weights_sha256(self, version: int) -> str | None:
        """The digest a sampler must reach for `version`, or None once it is pruned."""
        with self._lock:
            held = self._versions.get(version)
            return held.weights_sha256 if held else None

    def tensors(self, version: int) -> dict[str, torch.Tensor] | None:
        """The published bf16 tensors of `version` (shared, never to be modified), or None once pruned."""
        with self._lock:
            held = self._versions.get(version)
            return held.tensors if held else None

    @property
    def newest(self) -> int:
        with self._lock:
            return next(reversed(self._versions), 0)

    def held(self) -> list[int]:
        with self._lock:
            return list(self._versions)
