"""Published weight versions: the payload samplers download and the hashes they verify against.

Version numbers start at 1 (the weights the run started from) and grow by one per published optimizer step.
Only the newest `keep` versions are held; a sampler asking for a pruned one is told which is newest.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from heterorl.common import codec
from heterorl.common.weights import ENCODING_ANCHOR, sha256_hex


@dataclass(frozen=True)
class PublishedVersion:
    version: int
    base_version: int        # 0: a full anchor
    encoding: str
    payload: bytes
    payload_sha256: str
    weights_sha256: str      # codec.digest of the bf16 tensors: what a sampler must end up holding
    published_at: float
    encode_seconds: float


class VersionStore:
    """Thread-safe: the trainer publishes while gRPC handlers read."""

    def __init__(self, keep: int):
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.keep = keep
        self._versions: OrderedDict[int, PublishedVersion] = OrderedDict()
        self._lock = threading.Lock()

    def publish(self, version: int, tensors: dict[str, torch.Tensor]) -> PublishedVersion:
        with self._lock:
            newest = next(reversed(self._versions), 0)
        if version <= newest:
            raise ValueError(f"version {version} is not newer than {newest}")
        started = time.perf_counter()
        payload = codec.encode(tensors, None)
        published = PublishedVersion(
            version=version,
            base_version=0,
            encoding=ENCODING_ANCHOR,
            payload=payload,
            payload_sha256=sha256_hex(payload),
            weights_sha256=codec.digest(tensors),
            published_at=time.time(),
            encode_seconds=time.perf_counter() - started,
        )
        with self._lock:
            self._versions[version] = published
            while len(self._versions) > self.keep:
                self._versions.popitem(last=False)
        return published

    def get(self, version: int) -> PublishedVersion | None:
        with self._lock:
            return self._versions.get(version)

    @property
    def newest(self) -> int:
        with self._lock:
            return next(reversed(self._versions), 0)

    def held(self) -> list[int]:
        with self._lock:
            return list(self._versions)
