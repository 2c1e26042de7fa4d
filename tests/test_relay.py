"""Weights through relays, with real daemons: a learner (`--model tiny`), a real `heterorl-relay` process, real
samplers, and lying relays (real gRPC servers of this test's own) that corrupt, truncate, stall and replay.

What must hold: samplers behind a relay train the run while the learner serves each version about once; every lie
is caught against the learner's own manifest, counted by kind, and the sampler falls back (next relay, then the
learner) and keeps training; a sampler never generates with weights the learner did not publish (the learner
recomputes every group's log-probs under the version it claims: no mismatch, no quarantine).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections import Counter
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from heterorl.cli import fetch_status
from heterorl.node.download import ManifestDownload, SourceLied, check_manifest
from heterorl.v1 import learner_pb2 as pb
from heterorl.v1 import learner_pb2_grpc as pb_grpc

from tests.test_metrics import Samples, free_port, scrape

REPO = Path(__file__).resolve().parent.parent


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for got, v in samples.get(name, []) if all(got.get(k) == want for k, want in labels.items()))


def start_relay(processes, name: str, upstream: str, *extra: str) -> tuple[subprocess.Popen, str, int]:
    port, metrics = free_port(), free_port()
    proc = processes.start(name, "heterorl.node.relay_main", [
        "--upstream", upstream, "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics),
        "--name", name, "--heartbeat-s", "0.5", *extra])
    address = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=60)
    finally:
        channel.close()
    return proc, address, metrics


def wait_for_learner(learner, target: str, timeout: float = 300) -> pb.StatusReply:
    deadline = time.time() + timeout
    status = None
    while learner.poll() is None:
        assert time.time() < deadline, f"learner did not finish:\n{learner.log_path.read_text()[-3000:]}"
        try:
            status = fetch_status(target, timeout=2)
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    assert learner.returncode == 0, learner.log_path.read_text()[-3000:]
    return status


def trained_by_sampler(run_dir: Path) -> dict[str, list[int]]:
    versions: dict[str, list[int]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "train":
            for sid, v in zip(record["samplers"], record["policy_versions"], strict=True):
                versions.setdefault(sid, []).append(v)
    return versions


# ---- unit level: the manifest check itself ------------------------------------------------------------------------


def _manifest(payload: bytes, chunk: int) -> pb.WeightsManifest:
    return pb.WeightsManifest(
        version=3, base_version=2, encoding="heterorl-codec-delta-v1", total_bytes=len(payload), chunk_bytes=chunk,
        chunk_sha256=[hashlib.sha256(payload[i : i + chunk]).hexdigest() for i in range(0, len(payload), chunk)],
        payload_sha256=hashlib.sha256(payload).hexdigest(), weights_sha256="blake3:" + "0" * 64)


def _chunks(payload: bytes, size: int, **overrides) -> list[pb.WeightChunk]:
    fields = dict(version=3, base_version=2, encoding="heterorl-codec-delta-v1", total_bytes=len(payload))
    fields.update(overrides)
    return [pb.WeightChunk(offset=i, data=payload[i : i + size], chunk_sha256=hashlib.sha256(payload[i : i + size])
                           .hexdigest(), **fields) for i in range(0, len(payload), size)]


def test_manifest_download_trusts_only_the_manifest():
    payload = bytes(range(256)) * 40  # 10240 bytes, manifest chunks of 1000
    manifest = check_manifest(_manifest(payload, 1000))
    # Any cut of the bytes verifies, and the result is the payload.
    for size in (1000, 333, 4096, 10240):
        done = ManifestDownload("S-1", manifest).read(_chunks(payload, size))
        assert done is not None and bytes(done.payload) == payload and done.weights_sha256 == manifest.weights_sha256
    # A forged chunk whose in-band hash matches its forged bytes is still refused; the verified prefix survives.
    forged = bytearray(payload)
    forged[2500] ^= 1
    download = ManifestDownload("S-1", manifest)
    with pytest.raises(SourceLied) as lie:
        download.read(_chunks(bytes(forged), 700))
    assert lie.value.kind == "corrupt" and download.offset == 2000
    # ... and the download finishes from another source at that offset.
    rest = [c for c in _chunks(payload, 500) if c.offset >= 2000]
    assert bytes(download.read(rest).payload) == payload
    with pytest.raises(SourceLied) as lie:
        ManifestDownload("S-1", manifest).read(_chunks(payload, 1000, version=2))
    assert lie.value.kind == "wrong_payload"
    assert ManifestDownload("S-1", manifest).read(_chunks(payload, 1000)[:4]) is None  # short: caller decides
    bad = _manifest(payload, 1000)
    del bad.chunk_sha256[-1]
    with pytest.raises(Exception, match="chunk hashes"):
        check_manifest(bad)


# ---- a relay serving samplers -------------------------------------------------------------------------------------


def test_relay_serves_samplers_and_the_learners_egress_drops(processes, tmp_path):
    """Two samplers fetch every version through one real relay; the learner serves the relay, not them."""
    run_dir = tmp_path / "run"
    learner_metrics = free_port()
    # 4 groups per step from 2 samplers of 1 group per batch: the samplers move in step, so they mostly want the
    # same payloads (the relay prefetches the delta from the previous version as soon as the learner announces it).
    learner, target = processes.learner(run_dir, max_steps=12, groups_per_step=4, metrics_port=learner_metrics)
    relay, relay_address, relay_metrics = start_relay(processes, "relay", target)
    sampler_metrics = [free_port(), free_port()]
    for i, port in enumerate(sampler_metrics):
        processes.sampler(f"s{i}", target, "--seed", str(i), "--max-batch", "1", "--weights-from", relay_address,
                          "--metrics-port", str(port))
    # Scrape while everything runs (the samplers and relay outlive the learner only briefly).
    last: dict[str, Samples] = {}
    deadline = time.time() + 300
    while learner.poll() is None and time.time() < deadline:
        # One consistent cycle: the learner last, so every byte the relay counted is already counted there.
        try:
            cycle = {key: scrape(port) for key, port in [("relay", relay_metrics), ("s0", sampler_metrics[0]),
                                                          ("s1", sampler_metrics[1]), ("learner", learner_metrics)]}
        except OSError:
            cycle = None
        if cycle is not None:
            last = cycle
        time.sleep(0.5)
    wait_for_learner(learner, target, timeout=10)
    versions = trained_by_sampler(run_dir)
    assert len(versions) == 2 and all(max(v) > 1 for v in versions.values()), versions

    learner_served = total(last["learner"], "heterorl_weights_served_bytes_total")
    relay_fetched = total(last["relay"], "heterorl_relay_fetched_bytes_total")
    relay_served = total(last["relay"], "heterorl_relay_served_bytes_total")
    from_relay = [total(last[s], "heterorl_sampler_weight_downloads_total", source=relay_address) for s in ("s0", "s1")]
    from_learner = [total(last[s], "heterorl_sampler_weight_downloads_total", source="learner") for s in ("s0", "s1")]
    print(f"learner served {learner_served:.0f} B, relay fetched {relay_fetched:.0f} B and served {relay_served:.0f} "
          f"B; downloads via relay {from_relay}, from the learner {from_learner}")
    assert all(n >= 2 for n in from_relay) and from_learner == [0, 0]
    assert relay_fetched > 0 and relay_fetched <= learner_served  # the learner's weight bytes went to the relay
    # Both samplers' bytes came from the relay, each payload fetched once: the learner sent less than the samplers got.
    assert learner_served < relay_served, (learner_served, relay_served)
    assert total(last["relay"], "heterorl_relay_versions_held") >= 1
    assert total(last["relay"], "heterorl_relay_requests_total", result="hit") >= 1
    status = fetch_status_safe(relay_address)
    assert status == grpc.StatusCode.UNIMPLEMENTED  # a relay serves weights only: no leases, no groups


def fetch_status_safe(address: str) -> grpc.StatusCode:
    channel = grpc.insecure_channel(address)
    try:
        pb_grpc.LearnerStub(channel).Status(pb.StatusRequest(), timeout=5)
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()
    finally:
        channel.close()


# ---- lying relays -------------------------------------------------------------------------------------------------


class LyingRelay(pb_grpc.LearnerServicer):
    """A relay that lies in one way, taking its real bytes from an honest relay. Its lies carry in-band hashes that
    match the forged bytes (what a relay forging WeightChunk.chunk_sha256 would send)."""

    def __init__(self, mode: str, upstream: str):
        self.mode = mode
        self.channel = grpc.insecure_channel(upstream)
        self.stub = pb_grpc.LearnerStub(self.channel)
        self.calls: Counter[str] = Counter()  # by the caller's sampler id
        self.old: list[pb.WeightChunk] | None = None  # replay: the first payload it ever saw

    def _fetch(self, request: pb.FetchWeightsRequest) -> list[pb.WeightChunk]:
        return list(self.stub.FetchWeights(request, timeout=60))

    def FetchWeights(self, request, context):
        self.calls[request.sampler_id] += 1
        if self.mode == "replay":
            if self.old is None:
                self.old = self._fetch(pb.FetchWeightsRequest(sampler_id="liar", have_version=0, want_version=1))
            # The old version's bytes, labelled as what was asked for: consistent in-band hashes throughout.
            for chunk in self.old:
                yield pb.WeightChunk(version=request.want_version or chunk.version,
                                     base_version=request.have_version if request.want_version else 0,
                                     encoding=chunk.encoding, total_bytes=chunk.total_bytes, offset=chunk.offset,
                                     data=chunk.data, chunk_sha256=chunk.chunk_sha256,
                                     payload_sha256=chunk.payload_sha256, weights_sha256=chunk.weights_sha256)
            return
        try:
            chunks = self._fetch(request)
        except grpc.RpcError as err:
            context.abort(err.code(), err.details() or "upstream failed")
        if self.mode == "corrupt":
            first = chunks[0]
            data = bytearray(first.data)
            data[len(data) // 2] ^= 0xFF
            first.data = bytes(data)
            first.chunk_sha256 = hashlib.sha256(first.data).hexdigest()
            yield from chunks
        elif self.mode == "truncate":  # half the first chunk, then a clean end of stream
            first = chunks[0]
            yield pb.WeightChunk(version=first.version, base_version=first.base_version, encoding=first.encoding,
                                 total_bytes=first.total_bytes, offset=first.offset,
                                 data=first.data[: len(first.data) // 2],
                                 chunk_sha256=hashlib.sha256(first.data[: len(first.data) // 2]).hexdigest(),
                                 payload_sha256=first.payload_sha256, weights_sha256=first.weights_sha256)
        elif self.mode == "stall":  # a few bytes, then nothing until the client gives up
            first = chunks[0]
            yield pb.WeightChunk(version=first.version, base_version=first.base_version, encoding=first.encoding,
                                 total_bytes=first.total_bytes, offset=first.offset, data=first.data[:100],
                                 chunk_sha256=hashlib.sha256(first.data[:100]).hexdigest(),
                                 payload_sha256=first.payload_sha256, weights_sha256=first.weights_sha256)
            while context.is_active():
                time.sleep(0.1)


def serve_liar(mode: str, upstream: str) -> tuple[grpc.Server, LyingRelay, str]:
    liar = LyingRelay(mode, upstream)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                         options=[("grpc.max_send_message_length", 16 << 20)])
    pb_grpc.add_LearnerServicer_to_server(liar, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, liar, f"127.0.0.1:{port}"


MODES = ("corrupt", "truncate", "stall", "replay")
KINDS = {"corrupt": {"corrupt"}, "truncate": {"truncated"}, "stall": {"stalled"},
         "replay": {"wrong_payload", "corrupt"}}


def test_lying_relays_are_caught_and_the_run_trains(processes, tmp_path):
    run_dir = tmp_path / "run"
    # Every group's log-probs are recomputed by the learner under the version the sampler claims: a sampler that
    # generated with weights the learner never published would show up as a mismatch.
    # Sampler A pays for every lie on every version (a stall costs it --relay-stall-s), so it lags sampler B by
    # many versions: it is not told to refresh before generating (lease_refresh_lag 0), and the run goes on until
    # both have trained work from versions they got through relays or the learner's fallback (then SIGTERM).
    learner, target = processes.learner(run_dir, max_steps=10_000, groups_per_step=4, verify_fraction=1.0,
                                        verify_first=100, lease_refresh_lag=0)
    _relay, honest, relay_metrics = start_relay(processes, "relay", target)
    servers, liars = [], {}
    for mode in MODES:
        server, liar, address = serve_liar(mode, honest)
        servers.append(server)
        liars[mode] = (liar, address)
    try:
        # A: meets every lie on every version (no bench), then the honest relay.
        metrics_a, metrics_b = free_port(), free_port()
        processes.sampler("a", target, "--seed", "1", "--max-batch", "1", "--metrics-port", str(metrics_a),
                          "--relay-ban-s", "0", "--relay-stall-s", "1",
                          "--weights-from", ",".join([liars[m][1] for m in MODES] + [honest]))
        # B: only liars, benched for the whole run after their first lie: the learner serves it from then on.
        processes.sampler("b", target, "--seed", "2", "--max-batch", "1", "--metrics-port", str(metrics_b),
                          "--relay-ban-s", "3600", "--weights-from",
                          ",".join([liars["corrupt"][1], liars["replay"][1]]))
        last: dict[str, Samples] = {}
        status = None
        deadline = time.time() + 400

        def enough() -> bool:
            """Both samplers trained work of a version after 1, and A met every liar and the honest relay twice."""
            try:
                versions = trained_by_sampler(run_dir)
            except (OSError, ValueError):  # not written yet, or a line half written
                return False
            a = last.get("a", {})
            lies = all(total(a, "heterorl_sampler_relay_failures_total", relay=liars[m][1]) for m in MODES)
            return (len(versions) == 2 and all(max(v) > 1 for v in versions.values()) and lies
                    and total(a, "heterorl_sampler_weight_downloads_total", source=honest) >= 2)

        while learner.poll() is None and time.time() < deadline:
            for key, port in [("a", metrics_a), ("b", metrics_b)]:
                try:
                    last[key] = scrape(port)
                except OSError:
                    pass
            try:
                status = fetch_status(target, timeout=2)
            except grpc.RpcError:
                pass
            if enough():
                break
            time.sleep(0.5)
        learner.terminate()  # finishes the current batch, checkpoints and exits 0
        wait_for_learner(learner, target, timeout=60)
    finally:
        for server in servers:
            server.stop(grace=None)

    versions = trained_by_sampler(run_dir)
    assert len(versions) == 2 and all(max(v) > 1 for v in versions.values()), versions
    # Nothing any sampler generated disagrees with the published weights of the version it claimed.
    assert status is not None
    samplers = [s for s in status.samplers if s.engine != "relay"]
    assert sum(s.logprob_checked for s in samplers) > 0
    assert all(s.logprob_mismatched == 0 and not s.quarantined for s in samplers), samplers

    a, b = last["a"], last["b"]
    report = {}
    for mode in MODES:
        address = liars[mode][1]
        kinds = {labels["kind"]: v for labels, v in a.get("heterorl_sampler_relay_failures_total", [])
                 if labels["relay"] == address and v}
        report[mode] = kinds
        assert kinds and set(kinds) <= KINDS[mode], (mode, kinds)
    honest_downloads = total(a, "heterorl_sampler_weight_downloads_total", source=honest)
    print(f"sampler a: lies caught {report}; versions via the honest relay {honest_downloads:.0f}, via the replaying "
          f"liar (its one honest answer, version 1) "
          f"{total(a, 'heterorl_sampler_weight_downloads_total', source=liars['replay'][1]):.0f}")
    assert honest_downloads >= 2
    assert total(a, "heterorl_sampler_weight_downloads_total", source=liars["corrupt"][1]) == 0
    # B: each liar lied once and was benched for the rest of the run; the learner served the rest.
    b_fail = {liars[m][1]: total(b, "heterorl_sampler_relay_failures_total", relay=liars[m][1])
              for m in ("corrupt", "replay")}
    b_learner = total(b, "heterorl_sampler_weight_downloads_total", source="learner")
    print(f"sampler b: failures per liar {b_fail}; versions from the learner {b_learner:.0f}")
    assert b_fail[liars["corrupt"][1]] == 1 and b_fail[liars["replay"][1]] == 1
    assert b_learner >= 1
    b_id = next(s.sampler_id for s in status.samplers if s.name == "b")
    assert liars["corrupt"][0].calls[b_id] == 1  # benched: never asked again


# ---- the learner's manifest RPC and the relay's own serving, in process ------------------------------------------


@pytest.fixture(scope="module")
def served_learner(tiny_cache, tmp_path_factory):
    """A learner (no training loop) behind a real gRPC server on loopback."""
    import os

    from heterorl.common.config import from_flat
    from heterorl.server.config import LearnerConfig
    from heterorl.server.learner import Learner
    from heterorl.server.service import build_server

    os.environ["HETERORL_CACHE"] = str(tiny_cache)
    config = from_flat(LearnerConfig, port=0, run_dir=tmp_path_factory.mktemp("run"), model="tiny", group_size=4,
                       groups_per_step=2, max_new_tokens=8, eval_size=0, chunk_bytes=65536)
    learner = Learner(config)
    server, port = build_server(learner, "127.0.0.1", 0)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield learner, pb_grpc.LearnerStub(channel), f"127.0.0.1:{port}"
    channel.close()
    server.stop(0)


def refusal(call) -> tuple[grpc.StatusCode, object]:
    from heterorl.common.contract import refusal_reason

    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), refusal_reason(info.value)


def test_manifest_rpc_describes_exactly_what_fetch_weights_streams(served_learner):
    from heterorl.common.contract import Reason

    learner, stub, _ = served_learner
    sid = stub.Register(pb.RegisterRequest(name="m", engine="transformers", device="cpu", max_batch=1)).sampler_id
    manifest = check_manifest(stub.GetWeightsManifest(pb.WeightsManifestRequest(sampler_id=sid)))
    chunks = list(stub.FetchWeights(pb.FetchWeightsRequest(sampler_id=sid)))
    payload = b"".join(c.data for c in chunks)
    assert (manifest.version, manifest.base_version, manifest.total_bytes) == (learner.version, 0, len(payload))
    assert list(manifest.chunk_sha256) == [c.chunk_sha256 for c in chunks] and len(chunks) > 1
    assert manifest.payload_sha256 == chunks[0].payload_sha256 == hashlib.sha256(payload).hexdigest()
    assert manifest.weights_sha256 == chunks[0].weights_sha256 == learner.versions.weights_sha256(learner.version)
    newest = learner.version
    C = grpc.StatusCode
    for request, expected in [
        (pb.WeightsManifestRequest(sampler_id="S-ghost"), (C.NOT_FOUND, Reason.UNKNOWN_SAMPLER)),
        (pb.WeightsManifestRequest(sampler_id=""), (C.INVALID_ARGUMENT, Reason.SAMPLER_ID)),
        (pb.WeightsManifestRequest(sampler_id=sid, want_version=newest + 3), (C.INVALID_ARGUMENT,
                                                                             Reason.WANT_VERSION)),
    ]:
        assert refusal(lambda: stub.GetWeightsManifest(request)) == expected
    # A relay registers as engine "relay"; any other unknown engine is still refused.
    assert stub.Register(pb.RegisterRequest(name="r", engine="relay", device="relay", max_batch=1)).sampler_id
    assert refusal(lambda: stub.Register(pb.RegisterRequest(name="x", engine="magic", device="cpu", max_batch=1))) \
        == (C.INVALID_ARGUMENT, Reason.ENGINE)


def test_relay_serves_resumable_streams_and_checks_its_callers(served_learner, tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from heterorl.common.config import from_flat
    from heterorl.common.contract import Reason
    from heterorl.node.relay import Relay, RelayConfig, build_relay_server

    learner, stub, target = served_learner
    token = "relay-token-0123456789abcdef"
    (tmp_path / "tokens").write_text(f"# samplers nearby\nnear:{token}\n")
    relay = Relay(from_flat(RelayConfig, upstream=target, host="127.0.0.1", port=0, name="r1",
                            tokens_file=tmp_path / "tokens"))
    server, port = build_relay_server(relay, "127.0.0.1", 0)
    server.start()
    relay.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    relay_stub = pb_grpc.LearnerStub(channel)
    auth = (("authorization", f"Bearer {token}"),)
    try:
        sid = stub.Register(pb.RegisterRequest(name="d", engine="transformers", device="cpu", max_batch=1)).sampler_id
        direct = list(stub.FetchWeights(pb.FetchWeightsRequest(sampler_id=sid)))
        payload = b"".join(c.data for c in direct)
        C = grpc.StatusCode
        request = pb.FetchWeightsRequest(sampler_id="anyone")
        assert refusal(lambda: list(relay_stub.FetchWeights(request))) == (C.UNAUTHENTICATED, Reason.TOKEN_MISSING)
        assert refusal(lambda: list(relay_stub.FetchWeights(request, metadata=(("authorization", "Bearer " + "x" * 20),
                                                                              )))) == (C.UNAUTHENTICATED,
                                                                                       Reason.TOKEN_INVALID)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # open without a token: probes carry none
        relayed = list(relay_stub.FetchWeights(request, metadata=auth))
        assert b"".join(c.data for c in relayed) == payload
        assert [c.chunk_sha256 for c in relayed] == [c.chunk_sha256 for c in direct]
        cut = relayed[1].offset + 17  # resume from inside a chunk
        rest = list(relay_stub.FetchWeights(pb.FetchWeightsRequest(sampler_id="x", offset=cut,
                                                                   want_version=learner.version), metadata=auth))
        assert b"".join(c.data for c in rest) == payload[cut:]
        assert rest[0].chunk_sha256 == hashlib.sha256(payload[cut : relayed[2].offset]).hexdigest()
        assert relay.metrics.fetched._value.get() == len(payload)  # fetched once, served three times
        for bad, expected in [
            (pb.FetchWeightsRequest(sampler_id="x", offset=len(payload) + 1, want_version=learner.version),
             (C.OUT_OF_RANGE, Reason.OFFSET)),
            (pb.FetchWeightsRequest(sampler_id="x" * 65), (C.INVALID_ARGUMENT, Reason.SAMPLER_ID)),
            (pb.FetchWeightsRequest(sampler_id="x", want_version=learner.version + 5),
             (C.INVALID_ARGUMENT, Reason.WANT_VERSION)),  # the learner's refusal, passed on
        ]:
            assert refusal(lambda: list(relay_stub.FetchWeights(bad, metadata=auth))) == expected
        assert refusal(lambda: relay_stub.LeasePrompts(pb.LeaseRequest(sampler_id="x", max_groups=1),
                                                       metadata=auth))[0] == C.UNIMPLEMENTED
        assert len(list(relay_stub.FetchWeights(request, metadata=auth))) == len(relayed)  # still serving
        # A relay behind this relay (its upstream needs no registration, only the token).
        (tmp_path / "token").write_text(f"near:{token}\n")
        second = Relay(from_flat(RelayConfig, upstream=f"127.0.0.1:{port}", host="127.0.0.1", port=0, name="r2",
                                 token_file=tmp_path / "token"))
        server2, port2 = build_relay_server(second, "127.0.0.1", 0)
        server2.start()
        second.start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port2}") as channel2:
                chained = list(pb_grpc.LearnerStub(channel2).FetchWeights(pb.FetchWeightsRequest(sampler_id="y")))
            assert b"".join(c.data for c in chained) == payload and not second.upstream_is_learner
        finally:
            server2.stop(0)
            second.close()
    finally:
        channel.close()
        server.stop(0)
        relay.close()
