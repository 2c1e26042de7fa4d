"""Weight transfer over real sockets: cut at random points it resumes, corrupted it refetches, lied about it is
refused, and applying it in place costs no full extra copy of the weights.

A loopback TCP proxy written here sits between a real `LearnerClient` and a real `LearnerService` and cuts the
connection after a drawn number of server-to-client bytes; a gRPC server interceptor written here tampers with
chosen `WeightChunk`s. Nothing of heterorl's own is mocked.
"""

from __future__ import annotations

import ctypes
import hashlib
import random
import select
import shutil
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import grpc
import pytest
import torch

from heterorl.common import codec
from heterorl.common.config import from_flat
from heterorl.common.contract import MAX_MESSAGE_BYTES
from heterorl.common.model import resolve_model
from heterorl.common.weights import ENCODING_ANCHOR, ENCODING_DELTA, WeightsCorrupt
from heterorl.node.client import LearnerClient, RetryPolicy
from heterorl.node.engine import SamplingSettings, TransformersEngine
from heterorl.server.config import LearnerConfig
from heterorl.server.learner import Learner
from heterorl.server.service import LearnerService
from heterorl.v1 import learner_pb2 as pb
from heterorl.v1 import learner_pb2_grpc as pb_grpc

CHUNK = 64 << 10  # the smallest chunk the learner allows: the most chunk boundaries per payload
# Allowance per cut beyond the chunk it interrupts, for framing (HTTP/2 and gRPC headers, the chunk's hashes).
FRAMING_SLACK = 4 << 10
FAST_RETRY = RetryPolicy(initial_s=0.02, max_s=0.1, give_up_s=30.0)
FETCH_METHOD = "/heterorl.v1.Learner/FetchWeights"


# ---------------------------------------------------------------------------------------------------------------
# A cutting TCP proxy (loopback only, stops itself)


class CuttingProxy:
    """Forward loopback TCP both ways; once armed, cut the live connection at chosen server-to-client bytes.

    `arm(*after)` sets cut points counted in bytes the upstream (learner) sends downstream from now on. At a cut
    point the bytes up to it are delivered and the connection is closed: gracefully (FIN, the client reads all it
    was sent) or abruptly (RST, unread bytes are lost). Reconnections after a cut are forwarded normally. Every
    thread polls with a short timeout and ends by `close()` or after `lifetime_s`, whichever is first.
    """

    def __init__(self, upstream_port: int, lifetime_s: float = 120.0):
        self.upstream = ("127.0.0.1", upstream_port)
        self.deadline = time.monotonic() + lifetime_s
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.down_bytes = 0  # server-to-client bytes forwarded, over all connections
        self.cuts = 0
        self.abrupt = False
        self._cut_at: list[int] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def arm(self, *after: int, abrupt: bool = False) -> None:
        with self._lock:
            self._cut_at = sorted(self.down_bytes + a for a in after)
            self.abrupt = abrupt

    def _running(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self.deadline

    def _accept(self) -> None:
        while self._running():
            try:
                client, _ = self.listener.accept()
            except OSError:  # includes the accept timeout
                continue
            thread = threading.Thread(target=self._pump, args=(client,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _pump(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            client.close()
            return
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(5)
        cut = False
        try:
            while self._running() and not cut:
                readable, _, _ = select.select([client, upstream], [], [], 0.05)
                for src in readable:
                    data = src.recv(1 << 16)
                    if not data:
                        return
                    if src is client:
                        upstream.sendall(data)
                        continue
                    with self._lock:
                        if self._cut_at and self.down_bytes + len(data) >= self._cut_at[0]:
                            data = data[: self._cut_at.pop(0) - self.down_bytes]
                            cut = True
                            self.cuts += 1
                        self.down_bytes += len(data)
                    client.sendall(data)
                    if cut:
                        break
        except OSError:
            return
        finally:
            self._close(client, upstream, abrupt=cut and self.abrupt)

    @staticmethod
    def _close(client: socket.socket, upstream: socket.socket, abrupt: bool) -> None:
        for s in (client, upstream):
            try:
                if abrupt:  # linger 0: close sends RST, the peer drops what it has not read
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self.listener.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------------
# A tampering server interceptor


class ChunkTamper(grpc.ServerInterceptor):
    """Pass every FetchWeights chunk through `rewrite` (when set) and log every request; other RPCs untouched.

    `drops` fails the next requests on purpose, one entry each: after sending that many chunks (all of them, if
    fewer), the stream ends with UNAVAILABLE, as when the link drops exactly there.
    """

    def __init__(self) -> None:
        self.rewrite: Callable[[pb.WeightChunk], pb.WeightChunk] | None = None
        self.drops: list[int] = []
        self.requests: list[pb.FetchWeightsRequest] = []  # every FetchWeights request, in arrival order

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method != FETCH_METHOD:
            return handler
        inner = handler.unary_stream

        def stream(request, context):
            self.requests.append(request)
            drop_after = self.drops.pop(0) if self.drops else None
            for sent, chunk in enumerate(inner(request, context)):
                if sent == drop_after:
                    break
                rewrite = self.rewrite
                yield rewrite(chunk) if rewrite is not None else chunk
            if drop_after is not None:
                context.abort(grpc.StatusCode.UNAVAILABLE, "link dropped (test)")

        return grpc.unary_stream_rpc_method_handler(
            stream, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _flipped(chunk: pb.WeightChunk, at: int) -> pb.WeightChunk:
    bad = pb.WeightChunk()
    bad.CopyFrom(chunk)
    data = bytearray(chunk.data)
    data[at] ^= 0x40
    bad.data = bytes(data)
    return bad


@dataclass
class FlipOnce:
    """Flip one byte of the chunk at `offset` the first time it is sent (chunk hash left as the learner wrote it)."""

    offset: int
    sent: int = 0

    def __call__(self, chunk: pb.WeightChunk) -> pb.WeightChunk:
        if chunk.offset != self.offset:
            return chunk
        self.sent += 1
        return _flipped(chunk, len(chunk.data) // 2) if self.sent == 1 else chunk


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: a learner on a model wide enough for many 64 KiB chunks, with several published versions


def _wide_model_dir(tiny_dir: Path, target: Path) -> Path:
    """The tiny model's tokenizer with wider layers (about 3.4M parameters): an anchor spans ~75 chunks of 64 KiB."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shutil.copytree(tiny_dir, target)
    for weights in target.glob("*.safetensors"):
        weights.unlink()
    config = AutoConfig.from_pretrained(target, local_files_only=True)
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 256, 1024, 4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(target)
    return target


def _optimizer_like_step(model: torch.nn.Module, generator: torch.Generator, density: float) -> None:
    """Nudge a fraction of every parameter by a few bf16 steps, like one small optimizer step."""
    with torch.no_grad():
        for p in model.parameters():
            mask = torch.rand(p.shape, generator=generator) < density
            p.add_(mask * torch.randn(p.shape, generator=generator) * 1e-3)


@dataclass
class Served:
    learner: Learner
    port: int
    tamper: ChunkTamper
    sampler_id: str
    model_dir: Path
    published: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # our own copy of each version

    def client(self, target: str | None = None) -> LearnerClient:
        return LearnerClient(target or f"127.0.0.1:{self.port}", retry=FAST_RETRY)

    def rebuilt(self, have: int, payload: bytes | bytearray) -> dict[str, torch.Tensor]:
        """Apply a payload to our copy of version `have` (0: zeros) the way a bf16 sampler would."""
        start = self.published[have] if have else self.published[max(self.published)]
        tensors = {k: (v.clone() if have else torch.zeros_like(v)) for k, v in start.items()}
        codec.apply_(payload, tensors)
        return tensors


@pytest.fixture(scope="module")
def served(tiny_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    model_dir = _wide_model_dir(resolve_model("tiny", cache=tiny_cache), root / "wide-model")
    config = from_flat(LearnerConfig,
        port=0, run_dir=root / "run", model=str(model_dir), reward="digit_fraction", group_size=2,
        groups_per_step=1, max_new_tokens=4, eval_size=0, chunk_bytes=CHUNK, keep_versions=4,
    )
    learner = Learner(config)
    published = {1: learner.trainer.snapshot()}
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):  # versions 2, 3, 4
        _optimizer_like_step(learner.trainer.model, generator, density=0.05)
        learner.publish()
        published[learner.version] = learner.trainer.snapshot()
    tamper = ChunkTamper()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8), interceptors=[tamper],
        options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.so_reuseport", 0)],
    )
    pb_grpc.add_LearnerServicer_to_server(LearnerService(learner), server)  # the real service, intercepted
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        client = LearnerClient(f"127.0.0.1:{port}", retry=FAST_RETRY)
        sampler_id = client.register("transfer-test", "transformers", "cpu", 1, "test").sampler_id
        client.close()
        yield Served(learner, port, tamper, sampler_id, model_dir, published)
    finally:
        server.stop(0)


@pytest.fixture
def tamper(served):
    yield served.tamper
    served.tamper.rewrite = None
    served.tamper.drops = []


def _payload(served: Served, have: int, want: int) -> bytes:
    return served.learner.versions.payload(have, want).data


def _assert_exact(served: Served, got, want: int) -> None:
    """The download rebuilds exactly the published version: its digest and every bit of every tensor."""
    assert got.version == want
    assert got.weights_sha256 == served.learner.versions.weights_sha256(want)
    rebuilt = served.rebuilt(got.base_version, got.payload)
    assert codec.digest(rebuilt) == got.weights_sha256
    for name, t in served.published[want].items():
        assert torch.equal(rebuilt[name].view(torch.int16), t.view(torch.int16)), name


# ---------------------------------------------------------------------------------------------------------------
# 1. Cuts at random points


def test_versions_span_many_chunks_and_deltas_are_deltas(served):
    versions = served.learner.versions
    anchor = versions.payload(0, 4)
    combined = versions.payload(2, 4)
    assert anchor.encoding == ENCODING_ANCHOR and len(anchor.data) > 20 * CHUNK
    assert combined.encoding == ENCODING_DELTA and combined.base_version == 2
    assert 3 * CHUNK < len(combined.data) < len(anchor.data)


@pytest.mark.parametrize("have,want", [(0, 4), (2, 4), (3, 0)], ids=["anchor", "delta-2-to-4", "delta-3-to-newest"])
def test_cut_transfers_resume_bit_exact_from_the_last_verified_chunk(served, have, want):
    """Six downloads per payload, each cut once or twice at seeded random wire positions (FIN or RST).

    The client never downloads a verified byte twice (bytes_received counts delivered chunks). The extra bytes on
    the wire are printed, not bounded by one chunk: gRPC drops whole messages it had already buffered when the
    connection fails, and its BDP-sized flow-control window lets that buffer grow past one chunk on loopback.
    """
    rng = random.Random(f"cuts-{have}-{want}")
    rows = []
    with CuttingProxy(served.port) as proxy:
        client = served.client(proxy.target)  # a clean download through the proxy: the wire without cuts
        start = proxy.down_bytes
        clean = client.fetch_weights(served.sampler_id, have_version=have, want_version=want)
        clean_wire = proxy.down_bytes - start
        client.close()
        total = len(clean.payload)
        assert clean.reconnects == 0 and clean.bytes_received == total
        _assert_exact(served, clean, want or served.learner.version)
        for trial in range(6):
            cuts = 1 if trial < 4 else 2
            points = sorted(rng.randrange(1, clean_wire) for _ in range(cuts))
            abrupt = trial % 2 == 1
            client = served.client(proxy.target)
            first_request = len(served.tamper.requests)
            start, cut_before = proxy.down_bytes, proxy.cuts
            proxy.arm(*points, abrupt=abrupt)
            got = client.fetch_weights(served.sampler_id, have_version=have, want_version=want)
            wire = proxy.down_bytes - start
            client.close()
            assert proxy.cuts - cut_before == cuts, "every armed cut happened during the download"
            _assert_exact(served, got, want or served.learner.version)
            assert got.payload == clean.payload
            assert got.reconnects >= cuts and got.corrupt_chunks == 0
            assert total <= got.bytes_received <= total + cuts * (CHUNK + FRAMING_SLACK)
            # Every resumption asks for the same payload from a chunk boundary it had verified, never backwards.
            requests = served.tamper.requests[first_request:]
            assert 1 <= len(requests) <= 1 + got.reconnects  # a retry may fail before it reaches the learner
            offsets = [r.offset for r in requests]
            assert offsets[0] == 0 and offsets == sorted(offsets)
            for r in requests[1:]:
                assert r.offset % CHUNK == 0
                if r.offset:
                    assert (r.have_version, r.want_version) == (got.base_version, got.version)
            rows.append((points, "rst" if abrupt else "fin", offsets[1:], wire - clean_wire))
    print(f"\n{have}->{want or 'newest'}: payload {total} B, wire {clean_wire} B uncut; "
          f"(cut at wire byte, how, resumed at payload offsets, extra wire bytes): {rows}")
    # Resumed, not restarted, is asserted above from the client's side: a restart would deliver the verified
    # bytes again and push bytes_received past the one-chunk-per-cut bound. The extra wire bytes printed here
    # depend on how much gRPC had buffered when the link died (load-dependent), so they are reported, not bounded.


def test_dropped_streams_resume_exactly_where_the_verified_bytes_end(served, tamper):
    """Drops at known chunk counts: after 3 chunks, before any, and after the last chunk but before the status."""
    total = len(_payload(served, 0, 4))
    tamper.drops = [3, 0, 10**9]
    first_request = len(tamper.requests)
    client = served.client()
    got = client.fetch_weights(served.sampler_id, have_version=0, want_version=4)
    client.close()
    assert [r.offset for r in tamper.requests[first_request:]] == [0, 3 * CHUNK, 3 * CHUNK, total]
    assert got.reconnects == 3 and got.corrupt_chunks == 0
    assert got.bytes_received == total, "no verified byte was downloaded twice"
    _assert_exact(served, got, 4)


# ---------------------------------------------------------------------------------------------------------------
# 2. Corrupted chunks and lying hashes


@pytest.mark.parametrize("have,which", [(0, "middle"), (2, "last")], ids=["anchor-middle", "delta-last"])
def test_corrupt_chunk_is_detected_reported_and_fetched_again(served, tamper, have, which):
    total = len(_payload(served, have, 4))
    offset = 2 * CHUNK if which == "middle" else (total - 1) // CHUNK * CHUNK
    flip = FlipOnce(offset)
    tamper.rewrite = flip
    first_request = len(tamper.requests)
    client = served.client()
    got = client.fetch_weights(served.sampler_id, have_version=have, want_version=4)
    client.close()
    assert flip.sent == 2, "the chunk was sent corrupted once, then again intact"
    assert got.corrupt_chunks == 1
    assert got.bytes_received == total + min(CHUNK, total - offset)
    assert [r.offset for r in tamper.requests[first_request:]] == [0, offset], "refetched from the bad chunk"
    _assert_exact(served, got, 4)


def _forge_chunk(chunk: pb.WeightChunk) -> pb.WeightChunk:
    """The chunk at offset CHUNK altered together with its own hash: only the payload hash can tell."""
    if chunk.offset != CHUNK:
        return chunk
    bad = _flipped(chunk, 7)
    bad.chunk_sha256 = hashlib.sha256(bad.data).hexdigest()
    return bad


def _forge_payload_hash(chunk: pb.WeightChunk) -> pb.WeightChunk:
    bad = pb.WeightChunk()
    bad.CopyFrom(chunk)
    bad.payload_sha256 = hashlib.sha256(b"not the published payload").hexdigest()
    return bad


@pytest.mark.parametrize("rewrite", [_forge_chunk, _forge_payload_hash], ids=["chunk-and-its-hash", "payload-hash"])
def test_payload_that_does_not_match_its_hash_is_refused(served, tamper, rewrite):
    tamper.rewrite = rewrite
    client = served.client()
    with pytest.raises(WeightsCorrupt, match="does not match its hash"):
        client.fetch_weights(served.sampler_id, have_version=0, want_version=4)
    client.close()


def _forge_weights_hash(chunk: pb.WeightChunk) -> pb.WeightChunk:
    bad = pb.WeightChunk()
    bad.CopyFrom(chunk)
    bad.weights_sha256 = hashlib.sha256(b"not the published weights").hexdigest()
    return bad


SAMPLING = SamplingSettings(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=2)


def test_engine_never_runs_weights_that_do_not_hash_to_the_published_digest(served, tamper):
    engine = TransformersEngine(served.model_dir)
    client = served.client()

    def fetch(have: int, want: int):
        return client.fetch_weights(served.sampler_id, have_version=have, want_version=want)

    prompt = [[engine.tokenizer.bos_token_id or 1, 5, 6]]

    def load(got):
        engine.load_weights(got.encoding, got.payload, got.version, got.base_version, got.weights_sha256)

    tamper.rewrite = _forge_weights_hash  # an intact payload announced with a digest it does not build
    forged = fetch(0, 3)
    with pytest.raises(WeightsCorrupt, match="do not hash"):
        load(forged)
    assert engine.version == 0
    with pytest.raises(RuntimeError, match="no verified weights"):
        engine.generate(prompt, 1, SAMPLING)

    tamper.rewrite = None  # the honest anchor of v3 loads, then a delta to v4 forged the same way
    load(fetch(0, 3))
    assert engine.version == 3
    assert codec.digest(engine.params, dtype=torch.bfloat16) == served.learner.versions.weights_sha256(3)
    tamper.rewrite = _forge_weights_hash
    forged_delta = fetch(3, 4)
    assert forged_delta.encoding == ENCODING_DELTA
    with pytest.raises(WeightsCorrupt):
        load(forged_delta)
    assert engine.version == 0
    with pytest.raises(RuntimeError):
        engine.generate(prompt, 1, SAMPLING)
    tamper.rewrite = None
    with pytest.raises(WeightsCorrupt, match="cannot apply"):  # no delta lands on unverified weights
        load(fetch(3, 4))
    assert engine.version == 0

    load(fetch(engine.version, 4))  # what a sampler does next: it holds nothing verified, so an anchor
    assert engine.version == 4
    assert codec.digest(engine.params, dtype=torch.bfloat16) == served.learner.versions.weights_sha256(4)
    assert len(engine.generate(prompt, 2, SAMPLING)[0]) == 2
    client.close()


# ---------------------------------------------------------------------------------------------------------------
# 3. Applying in place: no full extra copy of the weights


def _rss() -> dict[str, int]:
    with open("/proc/self/status") as f:
        fields = (line.partition(":") for line in f)
        return {k: int(v.split()[0]) * 1024 for k, _, v in fields if k in ("VmRSS", "VmHWM")}


def _peak_extra_rss(fn: Callable[[], object]) -> int:
    """Peak RSS above the RSS before `fn`, seen by the kernel (torch and numpy allocations alike)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap pages back to the kernel: reuse shows as growth
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS mark to the current RSS
    except OSError:
        pytest.skip("this kernel does not let a process reset its peak RSS mark")
    before = _rss()["VmRSS"]
    fn()
    return _rss()["VmHWM"] - before


def test_engine_applies_payloads_in_place_without_a_full_extra_copy(served):
    """Peak extra memory of a load: the decompressed container the codec reads from, plus one tensor-sized
    temporary for the bf16 to fp32 step and one for hashing, plus allocator slack; never a copy of the model."""
    engine = TransformersEngine(served.model_dir)
    client = served.client()
    anchor = client.fetch_weights(served.sampler_id, have_version=0, want_version=3)
    delta = client.fetch_weights(served.sampler_id, have_version=3, want_version=4)
    client.close()
    storage = {name: t.data_ptr() for name, t in engine.params.items()}
    bf16_copy = sum(t.numel() for t in engine.params.values()) * 2
    largest_bf16 = max(t.numel() for t in engine.params.values()) * 2
    slack = 3 << 19  # allocator and thread-pool pages

    def load(got) -> None:
        engine.load_weights(got.encoding, got.payload, got.version, got.base_version, got.weights_sha256)

    seen: dict[str, list[int]] = {"anchor": [], "delta": []}
    for _ in range(3):  # anchor v3 then delta v3->v4, three times; the least of each is the least disturbed
        for what, got in (("anchor", anchor), ("delta", delta)):
            seen[what].append(_peak_extra_rss(lambda got=got: load(got)))
    extra = {what: min(values) for what, values in seen.items()}
    for what, got in (("anchor", anchor), ("delta", delta)):
        assert extra[what] <= codec.inspect(got.payload).container_bytes + 2 * largest_bf16 + slack, (what, seen)
    assert engine.version == 4
    assert {name: t.data_ptr() for name, t in engine.params.items()} == storage, "updated in the model's own tensors"
    assert extra["anchor"] < 2 * bf16_copy  # an anchor: less than two extra copies (its container is one)
    assert extra["delta"] < bf16_copy / 2   # a sparse delta: far less than one
    print(f"\n{seen}\nweights: bf16 {bf16_copy} B, largest tensor bf16 {largest_bf16} B; peak extra RSS of a load: "
          f"anchor {extra['anchor']} B (container {codec.inspect(anchor.payload).container_bytes} B), "
          f"delta {extra['delta']} B (container {codec.inspect(delta.payload).container_bytes} B)")
