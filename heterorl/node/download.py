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

from heterorl.common.progress import Progress
from heterorl.common.weights import ENCODINGS, WeightsCorrupt
from heterorl.v1 import learner_pb2 as pb

log = logging.getLogger(__name__)
MAX_CORRUPT_CHUNKS = 16  # more than this in one download: the link (or the learner) cannot be trusted
HEX64 = frozenset("0123456789abcdef")


class SourceLied(WeightsCorrupt):
    """Bytes from a weight source (a relay) that contradict the learner's manifest; `kind` names how, for the
    sampler's count ("corrupt", "wrong_payload", "wrong_offset", "too_long")."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


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
        self.shown: Progress | None = None  # bytes and rate: a bar on a terminal, lines in a log

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
        self.shown = self.shown and self.shown.close()  # the next payload gets its own

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
            self.shown = self.shown or Progress(f"weights v{self.meta.version}", self.meta.total_bytes, "B", log=log)
            self.shown.set(self.offset)
        meta = self.meta
        if meta is None:
            raise WeightsCorrupt("the learner sent no weight chunks")
        if self.offset != meta.total_bytes:
            return None  # the stream ended early but cleanly: continue from the verified bytes
        if hashlib.sha256(self.payload).hexdigest() != meta.payload_sha256:
            raise WeightsCorrupt(f"payload of version {meta.version} does not match its hash")
        self.shown = self.shown and self.shown.close()
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


def _sha256_hex(text: str) -> bool:
    return len(text) == 64 and set(text) <= HEX64


def check_manifest(manifest: pb.WeightsManifest, want_version: int = 0) -> pb.WeightsManifest:
    """The learner's manifest if it is self-consistent (one hash per chunk, known encoding); WeightsCorrupt if not."""
    m = manifest
    chunks = -(-m.total_bytes // m.chunk_bytes) if m.chunk_bytes else -1
    problems = [
        (m.encoding in ENCODINGS, f"unknown weight encoding {m.encoding[:40]!r}"),
        (m.version > 0 and m.base_version < m.version, f"version {m.version} from base {m.base_version}"),
        (not want_version or m.version == want_version, f"version {m.version}, asked for {want_version}"),
        (m.total_bytes > 0 and m.chunk_bytes > 0, "an empty payload or chunk size"),
        (len(m.chunk_sha256) == chunks, f"{len(m.chunk_sha256)} chunk hashes for {chunks} chunks"),
        (all(_sha256_hex(h) for h in m.chunk_sha256) and _sha256_hex(m.payload_sha256), "a malformed hash"),
        (bool(m.weights_sha256), "no weights digest"),
    ]
    for ok, problem in problems:
        if not ok:
            raise WeightsCorrupt(f"the learner's weights manifest is unusable: {problem}")
    return manifest


class ManifestDownload(WeightDownload):
    """A download checked against the learner's manifest, never against the hashes inside the chunks (which a relay
    could forge along with the bytes).

    Bytes may arrive cut in any pieces; they are kept only in whole manifest chunks that hash right, so the verified
    prefix carries over from one source to the next and a lying source costs at most the chunk it damaged. Anything
    that contradicts the manifest raises `SourceLied`; the caller drops that source and resumes elsewhere.
    """

    def __init__(self, sampler_id: str, manifest: pb.WeightsManifest):
        super().__init__(sampler_id, manifest.base_version, manifest.version)
        self.manifest = manifest
        self.meta = pb.WeightChunk(
            version=manifest.version, base_version=manifest.base_version, encoding=manifest.encoding,
            total_bytes=manifest.total_bytes, payload_sha256=manifest.payload_sha256,
            weights_sha256=manifest.weights_sha256,
        )
        self.payload = bytearray(manifest.total_bytes)
        self.pending = bytearray()  # bytes past the verified prefix, waiting for the rest of their chunk

    def read(self, stream: Iterable[pb.WeightChunk]) -> DownloadedWeights | None:
        self.pending = bytearray()  # a new stream resumes at the verified offset
        return super().read(stream)

    def _take(self, chunk: pb.WeightChunk) -> bool:
        m = self.manifest
        if (chunk.version, chunk.base_version, chunk.encoding, chunk.total_bytes) != (
            m.version, m.base_version, m.encoding, m.total_bytes
        ):
            raise SourceLied("wrong_payload", f"sent v{chunk.version} from v{chunk.base_version} "
                             f"({chunk.total_bytes} bytes) for v{m.version} from v{m.base_version} ({m.total_bytes})")
        end = self.offset + len(self.pending)
        if chunk.offset != end:
            raise SourceLied("wrong_offset", f"sent a chunk at offset {chunk.offset}, expected {end}")
        if end + len(chunk.data) > m.total_bytes:
            raise SourceLied("too_long", f"sent bytes past the end of the {m.total_bytes}-byte payload")
        self.pending += chunk.data
        size = m.chunk_bytes
        while True:
            need = min(size, m.total_bytes - self.offset)
            if not need or len(self.pending) < need:
                return True
            piece = memoryview(self.pending)[:need]
            index = self.offset // size
            if hashlib.sha256(piece).hexdigest() != m.chunk_sha256[index]:
                piece.release()
                self.pending = bytearray()
                raise SourceLied("corrupt", f"chunk {index} (bytes {self.offset}..{self.offset + need}) does not "
                                 "match the learner's hash")
            self.payload[self.offset : self.offset + need] = piece
            piece.release()
            del self.pending[:need]
            self.offset += need
