"""Where a sampler gets weight bytes: its relays in order, then the learner; what it trusts: only the learner.

For every version the sampler first asks the learner itself for the payload's manifest (`GetWeightsManifest`: the
payload's size and encoding, the sha256 of every chunk and of the whole payload, and the digest of the rebuilt
weights). Then it streams the bytes from the first relay not on the bench, checking each chunk against the
manifest as it arrives (`ManifestDownload`). Whatever a relay does wrong (a damaged chunk, another version's or
an old version's bytes, a stream that ends early, one that stops delivering for `relay_stall_s`, an error) drops
that relay for `relay_ban_s`, is counted (`heterorl_sampler_relay_failures_total{relay,kind}`) and logged, and
the download resumes from the verified offset at the next relay or, last, at the learner. Only bytes that hash
to the learner's manifest are ever kept, and the engine checks the rebuilt weights against the learner's digest,
so a relay can waste time but never make the sampler generate with weights the learner did not publish.

Why a manifest fetched from the learner and not one the learner signs: the sampler talks to the learner for every
lease anyway (over TLS when it is configured), so one more small call per version costs a round trip and about
70 bytes per 2 MiB chunk, and needs no keys to distribute, rotate or revoke. A signed manifest would only pay off
if samplers could not reach the learner at all, and then they could not lease or submit either.

The learner's token never goes to a relay: relays get their own (`--relay-token-file`), if they ask for one.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import grpc

from heterorl.common.contract import MAX_MESSAGE_BYTES, Reason, refusal_reason
from heterorl.common.weights import WeightsCorrupt
from heterorl.node.client import LearnerClient
from heterorl.node.download import (
    MAX_CORRUPT_CHUNKS, DownloadedWeights, ManifestDownload, SourceLied, check_manifest,
)
from heterorl.node.retry import describe, is_transient
from heterorl.node.security import ClientSecurity, open_channel
from heterorl.v1 import learner_pb2 as pb
from heterorl.v1 import learner_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
LEARNER = "learner"


class _Pruned(Exception):
    """The learner no longer holds the version of the manifest: start over with a new one."""


@dataclass
class RelaySource:
    address: str
    channel: grpc.Channel
    stub: pb_grpc.LearnerStub
    benched_until: float = 0.0


def _noop(*_args) -> None:
    return None


class WeightSources:
    """Downloads versions through relays, verified against the learner's manifests, falling back to the learner."""

    def __init__(self, client: LearnerClient, relays: list[str], *, security: ClientSecurity = ClientSecurity(),
                 ban_s: float = 60.0, stall_s: float = 15.0,
                 on_failure: Callable[[str, str], None] = _noop, on_success: Callable[[str], None] = _noop,
                 clock: Callable[[], float] = time.monotonic):
        self.client = client
        self.ban_s, self.stall_s = ban_s, stall_s
        self.on_failure, self.on_success = on_failure, on_success
        self.clock = clock
        self.relays: list[RelaySource] = []
        for address in relays:
            channel, calls = open_channel(address, security, options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_timeout_ms", 20_000),
                # a relay that is down must not hold the sampler in gRPC's reconnect backoff: fail fast, go on
                ("grpc.initial_reconnect_backoff_ms", 1000),
                ("grpc.max_reconnect_backoff_ms", 5000),
            ])
            self.relays.append(RelaySource(address, channel, pb_grpc.LearnerStub(calls)))
        self.manifest_supported = True

    def close(self) -> None:
        for relay in self.relays:
            relay.channel.close()

    # -- the learner's manifest

    def manifest(self, sampler_id: str, have_version: int) -> pb.WeightsManifest | None:
        """The learner's manifest for the newest version from `have_version`; None from a learner without the call."""
        request = pb.WeightsManifestRequest(sampler_id=sampler_id, have_version=have_version)
        try:
            reply = self.client.with_retries(
                "weights manifest", lambda: self.client.stub.GetWeightsManifest(request, timeout=30))
        except grpc.RpcError as err:
            if isinstance(err, grpc.Call) and err.code() == grpc.StatusCode.UNIMPLEMENTED:
                log.warning("the learner has no GetWeightsManifest (an older learner): relays cannot be verified, "
                            "so weights come from the learner only")
                self.manifest_supported = False
                return None
            raise
        return check_manifest(reply)

    # -- downloading

    def fetch(self, sampler_id: str, have_version: int) -> DownloadedWeights:
        """The newest version's payload, verified against the learner's manifest, from the first source that
        delivers it. Refusals and an unreachable learner raise as `LearnerClient.fetch_weights` does."""
        while True:
            manifest = self.manifest(sampler_id, have_version) if self.manifest_supported else None
            if manifest is None:
                return self._counted(LEARNER, self.client.fetch_weights(sampler_id, have_version=have_version))
            download = ManifestDownload(sampler_id, manifest)
            for relay in self.relays:
                if relay.benched_until > self.clock():
                    continue
                done = self._from_relay(relay, download)
                if done is not None:
                    return self._counted(relay.address, done)
            try:
                return self._counted(LEARNER, self._from_learner(download))
            except _Pruned:
                log.info("weights v%d no longer held by the learner; asking for the newest", manifest.version)

    def _counted(self, source: str, done: DownloadedWeights) -> DownloadedWeights:
        self.on_success(source)
        return done

    def _bench(self, relay: RelaySource, kind: str, version: int, detail: str, fallback: str) -> None:
        relay.benched_until = self.clock() + self.ban_s
        self.on_failure(relay.address, kind)
        log.warning("weights v%d: relay %s failed (%s: %s); not using it for %.0fs, continuing from %s", version,
                    relay.address, kind, detail[:300], self.ban_s, fallback)

    def _next_source(self, after: RelaySource) -> str:
        later = self.relays[self.relays.index(after) + 1 :]
        usable = [r.address for r in later if r.benched_until <= self.clock()]
        return f"relay {usable[0]}" if usable else "the learner"

    def _from_relay(self, relay: RelaySource, download: ManifestDownload) -> DownloadedWeights | None:
        """One stream from `relay` (it must deliver the rest of the payload in one go); None after benching it."""
        version, start = download.manifest.version, download.offset
        # No deadline: a big anchor on a slow link may take hours; the watchdog ends a stream that stops moving.
        call = relay.stub.FetchWeights(download.request())
        watchdog = _Watchdog(call, self.stall_s)
        try:
            done = download.read(watchdog.watch(call))
        except SourceLied as lie:
            self._bench(relay, lie.kind, version, str(lie), self._next_source(relay))
            return None
        except WeightsCorrupt as err:  # the whole payload failed its hash although every chunk passed: impossible
            self._bench(relay, "corrupt", version, str(err), self._next_source(relay))
            return None
        except grpc.RpcError as err:
            if watchdog.fired:
                kind, detail = "stalled", f"nothing for {self.stall_s:g}s after byte {download.offset}"
            else:
                reason = refusal_reason(err)
                kind = "unavailable" if is_transient(err) else (reason.value if reason else "refused")
                detail = describe(err)
            self._bench(relay, kind, version, detail, self._next_source(relay))
            return None
        finally:
            watchdog.stop()
        if done is None:
            self._bench(relay, "truncated", version, f"stream ended at byte {download.offset} of "
                        f"{download.manifest.total_bytes}", self._next_source(relay))
            return None
        log.debug("weights v%d: %d bytes from relay %s", version, download.offset - start, relay.address)
        return done

    def _from_learner(self, download: ManifestDownload) -> DownloadedWeights:
        """The rest of the payload from the learner, under the client's retry policy; corrupt chunks (a damaged
        link) are fetched again, a version pruned meanwhile raises _Pruned."""

        def attempt() -> DownloadedWeights:
            while True:
                try:
                    done = download.read(self.client.stub.FetchWeights(download.request(), timeout=600))
                except SourceLied as lie:
                    download.corrupt += 1
                    if download.corrupt > MAX_CORRUPT_CHUNKS:
                        raise WeightsCorrupt(f"too many bad chunks from the learner ({lie})") from None
                    log.warning("weights v%d from the learner: %s; fetching it again", download.manifest.version, lie)
                    continue
                except grpc.RpcError as err:
                    if refusal_reason(err) == Reason.VERSION_PRUNED:
                        raise _Pruned() from None
                    if is_transient(err):
                        download.reconnects += 1
                    raise
                if done is not None:
                    return done

        return self.client.with_retries("weights", attempt)


class _Watchdog:
    """Cancels a stream that delivers nothing for `stall_s` seconds (a relay that stalls on purpose or not)."""

    def __init__(self, call, stall_s: float):
        self.call, self.stall_s = call, stall_s
        self.last = time.monotonic()
        self.fired = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relay-watchdog", daemon=True)
        self._thread.start()

    def watch(self, stream: Iterable[pb.WeightChunk]) -> Iterator[pb.WeightChunk]:
        for chunk in stream:
            self.last = time.monotonic()
            yield chunk

    def _run(self) -> None:
        while not self._done.wait(min(0.25, self.stall_s / 4)):
            if time.monotonic() - self.last > self.stall_s:
                self.fired = True
                self.call.cancel()
                return

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=1)
