"""One version's weights, downloaded chunk by chunk, every chunk verified before it is kept.

A download survives any number of broken streams: each new stream asks for exactly the payload being downloaded
(same base, same version) from the first byte not yet verified, so no verified byte is fetched twice. A chunk
that fails its hash is never kept; the stream is reopened at its offset. The whole payload is checked against
its own hash at the end; the engine then checks the weights it builds against the published weights hash.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Iterable

from heterorl.common.weights import ENCODINGS, WeightsCorrupt
from heterorl.v1 import learner_pb2 as pb

log = logging.getLogger(__name__)
MAX_CORRUPT_CHUNKS = 16  # more than this in one download: the link (or the learner) cannot be trusted


@dataclass(frozen=True)
class DownloadedWeights:
    version: int
    base_version: int
    encoding: str
    payload: bytearray
    weights_sha256: str
    bytes_received: int      # verified bytes plus corrupt chunks fetched again (gRPC may drop more on a cut)
    corrupt_chunks: int
    reconnects: int


class WeightDownload:
    """The state of one download across streams: what was asked, what is verified so far."""

    def __init__(self, sampler_id: str, have_version: int, want_version: int = 0):
        self.sampler_id = sampler_id
        self.have_version, self.want_version = have_version, want_version
        self.meta: pb.WeightChunk | None = None  # the first chunk: version, sizes and hashes of the payload
        self.payload = bytearray()
        self.offset = 0  # bytes verified and kept
        self.received = self.corrupt = self.reconnects = 0

    @property
    def started(self) -> bool:
        return self.meta is not None

    def request(self) -> pb.FetchWeightsRequest:
        """The request that continues this download (resuming asks for exactly the payload being downloaded)."""
        meta = self.meta
        return pb.FetchWeightsRequest(
            sampler_id=self.sampler_id,
            have_version=meta.base_version if meta else self.have_version,
            want_version=meta.version if meta else self.want_version,
            offset=self.offset,
        )

    def restart_on_newest(self) -> None:
        """The version being downloaded is no longer held by the learner: start over on its newest."""
        log.info("weights v%d no longer held; fetching the newest instead", self.meta.version if self.meta else 0)
        self.meta, self.payload, self.offset, self.want_version = None, bytearray(), 0, 0

    def read(self, stream: Iterable[pb.WeightChunk]) -> DownloadedWeights | None:
        """Keep the verified chunks of one stream. The finished download, or None when the stream must be
        reopened at once (a chunk failed its hash, or the stream ended early). Stream errors propagate with the progress kept."""
        for chunk in stream:
            self.received += len(chunk.data)
            if not self._take(chunk):
                self.corrupt += 1
                if self.corrupt > MAX_CORRUPT_CHUNKS:
                    raise WeightsCorrupt("too many corrupt chunks; giving up on this download")
                log.warning("weights v%d: chunk at %d failed its hash; fetching it again", self.meta.version,
                            self.offset)
                return None
        meta = self.meta
        if meta is None:
            raise WeightsCorrupt("the learner sent no weight chunks")
        if self.offset != meta.total_bytes:
            return None  # the stream ended early but cleanly: continue from the verified bytes
        if hashlib.sha256(self.payload).hexdigest() != meta.payload_sha256:
            raise WeightsCorrupt(f"payload of version {meta.version} does not match its hash")
        return DownloadedWeights(
            version=meta.version, base_version=meta.base_version, encoding=meta.encoding, payload=self.payload,
            weights_sha256=meta.weights_sha256, bytes_received=self.received, corrupt_chunks=self.corrupt,
            reconnects=self.reconnects,
        )

    def _take(self, chunk: pb.WeightChunk) -> bool:
        """Keep one chunk if it verifies (False when its hash fails); WeightsCorrupt when it cannot belong."""
        meta = self.meta
        if meta is None:
            if chunk.encoding not in ENCODINGS:
                raise WeightsCorrupt(f"unknown weight encoding {chunk.encoding!r}")
            self.meta = meta = chunk
            self.payload = bytearray(chunk.total_bytes)
        elif (chunk.version, chunk.total_bytes, chunk.payload_sha256) != (
            meta.version, meta.total_bytes, meta.payload_sha256
        ):
            raise WeightsCorrupt("weight chunks of different versions were mixed in one stream")
        if chunk.offset != self.offset or self.offset + len(chunk.data) > meta.total_bytes:
            raise WeightsCorrupt(f"chunk at offset {chunk.offset}, expected {self.offset}")
        if hashlib.sha256(chunk.data).hexdigest() != chunk.chunk_sha256:
            return False  # the bad bytes are never kept
        self.payload[self.offset : self.offset + len(chunk.data)] = chunk.data
        self.offset += len(chunk.data)
        return True
