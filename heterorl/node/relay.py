"""A weight relay: fetches each version's payload once from its upstream and serves it to many samplers.

At internet scale the learner's uplink is the first wall: every sampler pulling every version from the learner
costs the learner (samplers x payload) bytes per version. A relay sits near a group of samplers, fetches each
payload once from its upstream (the learner, or another relay) and serves the same `FetchWeights` stream,
resumable by offset, to everybody downstream.

A relay is untrusted by design. It passes on the upstream's bytes and chunk hashes, but samplers check every
chunk and the rebuilt weights against the learner's own manifest (`Learner.GetWeightsManifest`, fetched from the
learner directly; heterorl/node/relay_sources.py), so a relay that lies can only waste a sampler's time. The relay
does check what it receives against the hashes its upstream sent (a broken link is noticed here, not by every
sampler), so an honest relay never passes on damage.

What it holds: payloads keyed by (base version, version) exactly as its upstream encoded them (full anchors and
deltas), in memory, for the newest `keep_versions` versions and within `cache_mb`. A payload is served while it
is still arriving (a sampler asking for a version the relay is fetching gets its bytes as they come), and one
upstream fetch serves every request for it. With a learner upstream, the relay registers as engine "relay",
heartbeats to learn the newest version and prefetches the delta from the newest version it holds, so the usual
request (up-to-date sampler, newest version) is already there when samplers ask.

It imports only heterorl/common and the sampler's client-side helpers (security, retry); never heterorl/server.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from heterorl.common.config import field as setting
from heterorl.common.config import section
from heterorl.common.contract import (
    MAX_MESSAGE_BYTES, MAX_NAME_CHARS, METADATA_KEY, RELAY_ENGINE, SCHEME, TOKEN_ENV, Reason, check_token,
    error_status, refusal_reason,
)
from heterorl.common.logs import LoggingConfig
from heterorl.common.metrics_endpoint import MetricsEndpoint
from heterorl.common.tls import read_pem
from heterorl.common.weights import ENCODINGS
from heterorl.node.config import ReportSection
from heterorl.node.retry import RetryPolicy, Stopped, describe, is_transient
from heterorl.node.security import ClientSecurity, open_channel
from heterorl.v1 import learner_pb2 as pb
from heterorl.v1 import learner_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Learner"].full_name
RELAY_VERSION = "heterorl-relay-0.1.0"
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
WAIT_SLICE_S = 0.5  # how often a stream waiting for upstream bytes checks that its client is still there
MAX_CORRUPT_CHUNKS = 16  # more than this in one payload: give up on it (waiting samplers go elsewhere)
CLIENT_WINDOW_S = 60.0  # a downstream client counts in `heterorl_relay_clients` this long after its last request


# ---- settings ----------------------------------------------------------------------------------------------------


@dataclass
class RelaySection:
    """Where the relay fetches from, where it listens, what it keeps."""

    upstream: str = setting("", "address HOST:PORT of the learner (or another relay) to fetch weights from")
    host: str = setting("0.0.0.0", "address to serve samplers on")
    port: int = setting(50061, "port to serve samplers on (0 picks a free one; it is logged)")
    name: str = setting("", "name this relay registers with at the learner (default: relay-HOST-PID)")
    keep_versions: int = setting(4, "payloads are kept for the newest this many versions")
    cache_mb: int = setting(4096, "most MiB of payloads held in memory (the newest payload is kept whatever it costs)")
    max_streams: int = setting(64, "most downstream calls served at once")
    heartbeat_s: float = setting(5.0, "seconds between heartbeats to a learner upstream (learning of new versions)")
    prefetch: bool = setting(True, "fetch the delta to each new version as soon as the learner announces it")

    def __post_init__(self) -> None:
        if ":" not in self.upstream:
            raise ValueError(f"give --upstream HOST:PORT (the learner or another relay), got {self.upstream!r}")
        if not self.name:
            self.name = f"relay-{socket.gethostname()}-{os.getpid()}"[:MAX_NAME_CHARS]
        checks = [
            (0 <= self.port <= 65535, "port must be in 0..65535"),
            (self.keep_versions >= 1, "keep_versions must be >= 1"),
            (self.cache_mb >= 1, "cache_mb must be >= 1"),
            (1 <= self.max_streams <= 4096, "max_streams must be in 1..4096"),
            (self.heartbeat_s > 0, "heartbeat_s must be > 0"),
            (len(self.name) <= MAX_NAME_CHARS and self.name.isprintable(), "name must be 1..64 printable characters"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class RelayUpstreamSection:
    """How the relay proves itself to its upstream and verifies it (as a sampler does with its learner)."""

    token_file: Path | None = setting(None, "file holding the relay's token for its upstream ('token' or "
                                            f"'name:token'; default: the {TOKEN_ENV} environment variable)")
    tls_ca: Path | None = setting(None, "PEM CA to verify the upstream's certificate with; turns TLS on")
    upstream_tls_cert: Path | None = setting(None, "PEM client certificate for mutual TLS with the upstream")
    upstream_tls_key: Path | None = setting(None, "PEM private key of --upstream-tls-cert")
    tls_server_name: str = setting("", "name the upstream's certificate carries when it differs from the dialled "
                                       "host; turns TLS on")
    retry_max_s: float = setting(10.0, "longest pause between attempts to reach the upstream")
    give_up_s: float = setting(120.0, "a payload whose upstream stays unreachable this long fails its waiting "
                                      "samplers (they fall back to other sources)")

    def __post_init__(self) -> None:
        self.retry_policy()  # its checks

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(initial_s=min(0.5, self.retry_max_s), max_s=self.retry_max_s, give_up_s=self.give_up_s)

    def client_security(self) -> ClientSecurity:
        return ClientSecurity.load(self.token_file, self.tls_ca, self.upstream_tls_cert, self.upstream_tls_key,
                                   self.tls_server_name)


@dataclass
class RelayServeSecuritySection:
    """Who may download from this relay. The weights are the run's: without tokens anyone who reaches the port can
    download them (a warning says so); nothing else can be done through a relay."""

    tokens_file: Path | None = setting(None, "file of tokens allowed to download, one 'name:token' or 'token' per "
                                             "line ('#' comments)")
    tls_cert: Path | None = setting(None, "PEM certificate (chain) of this relay; with --tls-key turns TLS on")
    tls_key: Path | None = setting(None, "PEM private key of --tls-cert")
    tls_client_ca: Path | None = setting(None, "PEM CA that client certificates must chain to (mutual TLS)")


@dataclass
class RelayConfig:
    relay: RelaySection = section(RelaySection)
    connection: RelayUpstreamSection = section(RelayUpstreamSection)
    security: RelayServeSecuritySection = section(RelayServeSecuritySection)
    report: ReportSection = section(ReportSection)
    logging: LoggingConfig = section(LoggingConfig)


# ---- the cache ---------------------------------------------------------------------------------------------------


class UpstreamFailed(Exception):
    """The upstream could not provide a payload; `code`/`reason` are what downstream callers are answered with."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
                 reason: Reason | None = None):
        super().__init__(message)
        self.code, self.reason = code, reason


class Payload:
    """One payload as the upstream sent it, possibly still arriving: bytes verified so far and their chunks."""

    def __init__(self, first: pb.WeightChunk):
        self.version = first.version
        self.base_version = first.base_version
        self.encoding = first.encoding
        self.total_bytes = first.total_bytes
        self.payload_sha256 = first.payload_sha256
        self.weights_sha256 = first.weights_sha256
        self.data = bytearray(first.total_bytes)
        self.chunks: list[tuple[int, int, str]] = []  # (offset, length, sha256) of each verified upstream chunk
        self.filled = 0
        self.done = False
        self.error: UpstreamFailed | None = None
        self.cond = threading.Condition()

    @property
    def key(self) -> tuple[int, int]:
        return self.base_version, self.version

    def matches(self, chunk: pb.WeightChunk) -> bool:
        return (chunk.version, chunk.base_version, chunk.encoding, chunk.total_bytes, chunk.payload_sha256,
                chunk.weights_sha256) == (self.version, self.base_version, self.encoding, self.total_bytes,
                                          self.payload_sha256, self.weights_sha256)

    def append(self, data: bytes, sha256: str) -> None:
        with self.cond:
            start = self.filled
            self.data[start : start + len(data)] = data
            self.chunks.append((start, len(data), sha256))
            self.filled = start + len(data)
            self.cond.notify_all()

    def finish(self, error: UpstreamFailed | None = None) -> None:
        with self.cond:
            self.done, self.error = True, error
            self.cond.notify_all()

    @property
    def complete(self) -> bool:
        return self.done and self.error is None


class _Pending:
    """A request whose payload key is not known until the upstream's first chunk says which it is."""

    def __init__(self) -> None:
        self.resolved = threading.Event()
        self.payload: Payload | None = None
        self.error: UpstreamFailed | None = None


class RelayMetrics(MetricsEndpoint):
    """`heterorl_relay_*`: bytes served and fetched, what is held, who is downloading, upstream trouble."""

    def __init__(self, relay: "Relay"):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.served = Counter("heterorl_relay_served_bytes", "weight payload bytes sent to downstream clients",
                              registry=r)
        self.fetched = Counter("heterorl_relay_fetched_bytes", "weight payload bytes received from the upstream",
                               registry=r)
        self.requests = Counter("heterorl_relay_requests", "FetchWeights calls by outcome: hit (payload held or "
                                "arriving), miss (fetched from the upstream for it), refused", ["result"], registry=r)
        self.upstream_errors = Counter("heterorl_relay_upstream_errors", "failed upstream calls and bad upstream "
                                       "chunks, by kind", ["kind"], registry=r)
        for result in ("hit", "miss", "refused"):
            self.requests.labels(result)
        for kind in ("unavailable", "refused", "corrupt", "register", "heartbeat"):
            self.upstream_errors.labels(kind)
        r.register(_RelayGauges(relay))


class _RelayGauges(Collector):
    def __init__(self, relay: "Relay"):
        self.relay = relay

    def describe(self) -> list[Metric]:
        return list(self._families(described=True))

    def collect(self) -> Iterator[Metric]:
        yield from self._families(described=False)

    def _families(self, described: bool) -> Iterator[Metric]:
        relay = self.relay
        view = relay.holdings() if not described else (0, 0, 0)
        yield GaugeMetricFamily("heterorl_relay_versions_held", "distinct versions with a complete payload held",
                                value=view[0])
        yield GaugeMetricFamily("heterorl_relay_payloads_held", "payloads (anchors and deltas) held or arriving",
                                value=view[1])
        yield GaugeMetricFamily("heterorl_relay_cache_bytes", "bytes of payloads held", value=view[2])
        yield GaugeMetricFamily("heterorl_relay_active_streams", "FetchWeights streams being served now",
                                value=0 if described else relay.active_streams)
        yield GaugeMetricFamily("heterorl_relay_clients", f"distinct downstream sampler ids seen in the last "
                                f"{CLIENT_WINDOW_S:.0f} s", value=0 if described else relay.recent_clients())
        yield GaugeMetricFamily("heterorl_relay_upstream_version", "newest version the upstream has announced",
                                value=0 if described else relay.upstream_version)


class Relay:
    """The cache and its upstream: `payload(have, want)` returns the payload a downstream request needs, fetching
    it (once, however many ask) when it is not held."""

    def __init__(self, config: RelayConfig, stop: threading.Event | None = None):
        self.config = config
        self.stop = stop or threading.Event()
        settings = config.relay
        self.keep_versions = settings.keep_versions
        self.cache_bytes = settings.cache_mb << 20
        self.retry = config.connection.retry_policy()
        security = config.connection.client_security()
        self.channel, calls = open_channel(settings.upstream, security, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.initial_reconnect_backoff_ms", int(self.retry.initial_s * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(self.retry.max_s * 1000)),
        ])
        self.stub = pb_grpc.LearnerStub(calls)
        self.upstream_id = settings.name  # replaced by the learner's sampler id once registered
        self.upstream_is_learner = False
        self.upstream_version = 0
        self._lock = threading.Lock()
        self._payloads: OrderedDict[tuple[int, int], Payload] = OrderedDict()  # LRU order
        self._aliases: dict[tuple[int, int], tuple[int, int]] = {}  # requested (have, want) -> payload key
        self._pending: dict[tuple[int, int], _Pending] = {}
        self._clients: dict[str, float] = {}
        self.active_streams = 0
        self.metrics = RelayMetrics(self)
        self._threads: list[threading.Thread] = []
        self._register_lock = threading.Lock()
        self.session_ready = threading.Event()  # set once we know whether (and as whom) the upstream knows us

    # -- upstream session

    def start(self) -> None:
        """Register with a learner upstream (in the background; a relay upstream needs no registration)."""
        thread = threading.Thread(target=self._session_loop, name="relay-upstream", daemon=True)
        thread.start()
        self._threads.append(thread)

    def close(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=2)
        self.channel.close()
        self.metrics.close()

    def _register(self, failed_id: str | None = None) -> bool:
        """True when the upstream is a learner we are now registered with; False when it is a relay. With
        `failed_id`, register again only if nobody has since replaced that id."""
        try:
            with self._register_lock:
                if failed_id is not None and self.upstream_id != failed_id:
                    return True
                newest = self._register_once()
        finally:
            self.session_ready.set()
        if newest is None:
            return False
        self._note_version(newest)
        return True

    def _register_once(self) -> int | None:
        """The newest version, once registered; None when the upstream is a relay (which needs no registration)."""
        request = pb.RegisterRequest(name=self.config.relay.name, engine=RELAY_ENGINE, device="relay", max_batch=1,
                                     client_version=RELAY_VERSION)
        try:
            reply = self.retry.call("register", lambda: self.stub.Register(request, timeout=30), self.stop,
                                    where=self.config.relay.upstream)
        except grpc.RpcError as err:
            if isinstance(err, grpc.Call) and err.code() == grpc.StatusCode.UNIMPLEMENTED:
                log.info("upstream %s is a relay: fetching without registration", self.config.relay.upstream)
                return None
            raise
        self.upstream_id = reply.sampler_id
        log.info("registered with the learner at %s as %s (newest version %d)", self.config.relay.upstream,
                 reply.sampler_id, reply.current_version)
        return reply.current_version

    def _session_loop(self) -> None:
        """Stay registered and heartbeat, so new versions are known (and prefetched) as they are published."""
        while not self.stop.is_set():
            try:
                self.upstream_is_learner = self._register()
                if not self.upstream_is_learner:
                    return
                while not self.stop.wait(self.config.relay.heartbeat_s):
                    held = min(self.newest_complete(), self.upstream_version)
                    reply = self.stub.Heartbeat(pb.HeartbeatRequest(sampler_id=self.upstream_id, version=held),
                                                timeout=10)
                    self._note_version(reply.current_version)
            except Stopped:
                return
            except grpc.RpcError as err:
                reason = refusal_reason(err)
                self.metrics.upstream_errors.labels("heartbeat" if reason is None else "register").inc()
                log.warning("upstream session: %s; registering again", describe(err))
                if self.stop.wait(self.retry.max_s):
                    return

    def _note_version(self, version: int) -> None:
        if version <= self.upstream_version:
            return
        base = self.newest_complete()
        self.upstream_version = version
        if self.config.relay.prefetch and 0 < base < version:
            log.info("upstream announced version %d; prefetching the delta from v%d", version, base)
            try:
                self.payload(base, version)
            except UpstreamFailed as err:
                log.warning("prefetch of v%d from v%d failed: %s", version, base, err)

    # -- the cache

    def newest_complete(self) -> int:
        with self._lock:
            return max((p.version for p in self._payloads.values() if p.complete), default=0)

    def holdings(self) -> tuple[int, int, int]:
        """(versions with a complete payload, payloads held, bytes held)."""
        with self._lock:
            payloads = list(self._payloads.values())
        return (len({p.version for p in payloads if p.complete}), len(payloads),
                sum(p.total_bytes for p in payloads))

    def streams_changed(self, delta: int) -> None:
        with self._lock:
            self.active_streams += delta

    def note_client(self, sampler_id: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._clients[sampler_id] = now
            if len(self._clients) > 4 * 4096:  # bounded whatever callers send
                for key in [k for k, t in self._clients.items() if now - t > CLIENT_WINDOW_S]:
                    del self._clients[key]

    def recent_clients(self) -> int:
        now = time.monotonic()
        with self._lock:
            return sum(1 for t in self._clients.values() if now - t <= CLIENT_WINDOW_S)

    def _lookup(self, key: tuple[int, int]) -> Payload | None:
        """A held payload for the requested (have, want), not failed; under the lock."""
        payload = self._payloads.get(self._aliases.get(key, key))
        if payload is None or payload.error is not None:
            return None
        self._payloads.move_to_end(payload.key)
        return payload

    def payload(self, have: int, want: int, wait_s: float = 60.0) -> tuple[Payload, bool]:
        """The payload for a downstream (have, want) and whether it was already held or arriving (a hit).

        Waits (up to `wait_s`) only until the upstream's first chunk names the payload; the bytes are served as
        they arrive. UpstreamFailed when the upstream cannot provide it."""
        if want == 0 and self.upstream_is_learner and self.upstream_version:
            want = self.upstream_version  # the newest we know of: a shared key instead of a fetch per request
        key = (have, want)
        with self._lock:
            held = self._lookup(key) if want else None
            if held is not None:
                return held, True
            pending = self._pending.get(key)
            hit = pending is not None
            if pending is None:
                pending = self._pending[key] = _Pending()
                thread = threading.Thread(target=self._fetch, args=(key, pending), name=f"relay-fetch-{have}-{want}",
                                          daemon=True)
                thread.start()
        if not pending.resolved.wait(wait_s):
            raise UpstreamFailed(f"the upstream did not start sending version {want or 'newest'} within {wait_s:.0f}s")
        if pending.error is not None:
            raise pending.error
        assert pending.payload is not None
        return pending.payload, hit

    def _fetch(self, key: tuple[int, int], pending: _Pending) -> None:
        """Fetch one payload from the upstream, resuming after breaks from the last verified byte."""
        have, want = key
        state: dict[str, Payload | None] = {"payload": None}
        corrupt, reregistered = [0], [0]
        self.session_ready.wait(30)  # the upstream's answer to our Register, so requests carry our id

        def attempt() -> None:
            while True:
                payload = state["payload"]
                request = pb.FetchWeightsRequest(
                    sampler_id=self.upstream_id,
                    have_version=payload.base_version if payload else have,
                    want_version=payload.version if payload else want,
                    offset=payload.filled if payload else 0,
                )
                call = self.stub.FetchWeights(request, timeout=600)
                try:
                    for chunk in call:
                        if state["payload"] is None:
                            state["payload"] = self._resolve(key, pending, chunk)
                            if state["payload"] is None:
                                call.cancel()  # somebody else holds this payload already
                                return
                        if not self._take(state["payload"], chunk):
                            call.cancel()
                            corrupt[0] += 1
                            if corrupt[0] > MAX_CORRUPT_CHUNKS:
                                raise UpstreamFailed("too many corrupt chunks from the upstream")
                            break  # a damaged chunk: reopen at the verified offset
                except grpc.RpcError as err:
                    if refusal_reason(err) in (Reason.UNKNOWN_SAMPLER, Reason.NOT_OWNER) and reregistered[0] < 2:
                        reregistered[0] += 1  # the learner restarted without our registration: once more
                        self.upstream_is_learner = self._register(failed_id=request.sampler_id)
                        continue
                    if is_transient(err):
                        self.metrics.upstream_errors.labels("unavailable").inc()
                    raise
                payload = state["payload"]
                if payload is None:
                    raise UpstreamFailed("the upstream sent no weight chunks")
                if payload.filled == payload.total_bytes:
                    if hashlib.sha256(payload.data).hexdigest() != payload.payload_sha256:
                        self.metrics.upstream_errors.labels("corrupt").inc()
                        raise UpstreamFailed(f"payload of version {payload.version} from the upstream does not "
                                             "match its hash")
                    return
                # ended early (cleanly, or we cut it after a bad chunk): continue from the verified bytes

        try:
            self.retry.call("weights", attempt, self.stop, where=self.config.relay.upstream)
            error = None
        except UpstreamFailed as err:
            error = err
        except Stopped:
            error = UpstreamFailed("the relay is stopping")
        except grpc.RpcError as err:
            reason = refusal_reason(err)
            self.metrics.upstream_errors.labels("unavailable" if is_transient(err) else "refused").inc()
            if reason is not None and isinstance(err, grpc.Call):
                error = UpstreamFailed(f"upstream refused: {err.details()}", err.code(), reason)
            else:
                error = UpstreamFailed(f"upstream unreachable: {describe(err)}")
        payload = state["payload"]
        if error is not None:
            log.warning("fetching v%d (have v%d) from the upstream failed: %s", want, have, error)
        if payload is not None:
            payload.finish(error)
            if error is None:
                log.info("held v%d (%s, %.2f MiB)", payload.version,
                         f"delta from v{payload.base_version}" if payload.base_version else "anchor",
                         payload.total_bytes / 2**20)
        with self._lock:
            self._pending.pop(key, None)
            if payload is not None and error is not None and self._payloads.get(payload.key) is payload:
                del self._payloads[payload.key]
        if not pending.resolved.is_set():
            pending.error = error or UpstreamFailed("the upstream sent no weight chunks")
            pending.resolved.set()
        self._evict()

    def _resolve(self, key: tuple[int, int], pending: _Pending, first: pb.WeightChunk) -> Payload | None:
        """The upstream's first chunk names the payload: hold it (or find it already held); None when held."""
        if first.encoding not in ENCODINGS or first.version == 0 or first.base_version >= first.version:
            raise UpstreamFailed(f"the upstream sent an unusable payload (version {first.version}, base "
                                 f"{first.base_version}, encoding {first.encoding[:40]!r})", grpc.StatusCode.INTERNAL)
        if first.total_bytes > self.cache_bytes:
            raise UpstreamFailed(f"a payload of {first.total_bytes} bytes is larger than --cache-mb",
                                 grpc.StatusCode.RESOURCE_EXHAUSTED)
        payload_key = (first.base_version, first.version)
        with self._lock:
            held = self._payloads.get(payload_key)
            fresh = held is None or held.error is not None
            if fresh:
                held = self._payloads[payload_key] = Payload(first)
            self._aliases[key] = payload_key
            if first.version > self.upstream_version and not self.upstream_is_learner:
                self.upstream_version = first.version
        pending.payload = held
        pending.resolved.set()
        return held if fresh else None

    def _take(self, payload: Payload, chunk: pb.WeightChunk) -> bool:
        """Keep one upstream chunk if it belongs and verifies."""
        if not payload.matches(chunk) or chunk.offset != payload.filled or \
                payload.filled + len(chunk.data) > payload.total_bytes or not chunk.data:
            raise UpstreamFailed(f"the upstream mixed payloads or offsets in one stream (offset {chunk.offset}, "
                                 f"expected {payload.filled})", grpc.StatusCode.INTERNAL)
        if hashlib.sha256(chunk.data).hexdigest() != chunk.chunk_sha256:
            self.metrics.upstream_errors.labels("corrupt").inc()
            log.warning("v%d: upstream chunk at %d failed its hash; fetching it again", payload.version, chunk.offset)
            return False
        payload.append(chunk.data, chunk.chunk_sha256)
        self.metrics.fetched.inc(len(chunk.data))
        return True

    def _evict(self) -> None:
        """Keep payloads of the newest `keep_versions` versions, within `cache_mb` (the newest always stays)."""
        with self._lock:
            versions = sorted({p.version for p in self._payloads.values()}, reverse=True)
            keep = set(versions[: self.keep_versions])
            for key in [k for k, p in self._payloads.items() if p.version not in keep]:
                del self._payloads[key]
            total = sum(p.total_bytes for p in self._payloads.values())
            newest = versions[0] if versions else 0
            for key in list(self._payloads):  # least recently used first
                if total <= self.cache_bytes:
                    break
                p = self._payloads[key]
                if p.version != newest and p.done:
                    del self._payloads[key]
                    total -= p.total_bytes
            self._aliases = {a: k for a, k in self._aliases.items() if k in self._payloads}


# ---- serving -----------------------------------------------------------------------------------------------------


def serve_chunks(payload: Payload, offset: int, active=lambda: True) -> Iterator[tuple[int, bytes, str]]:
    """(offset, bytes, sha256) from `offset` to the end, aligned to the upstream's chunks, waiting for bytes that
    are still arriving. UpstreamFailed when the upstream fetch fails before the end."""
    index = 0
    position = offset
    while position < payload.total_bytes:
        with payload.cond:
            while len(payload.chunks) <= index and payload.error is None:
                if not active():
                    return
                payload.cond.wait(WAIT_SLICE_S)
            if len(payload.chunks) <= index:
                raise payload.error  # type: ignore[misc]
            start, length, sha = payload.chunks[index]
        index += 1
        end = start + length
        if end <= position:
            continue
        if start == position:
            yield start, bytes(payload.data[start:end]), sha
        else:  # a resume from inside a chunk: the rest of it, hashed here
            piece = bytes(payload.data[position:end])
            yield position, piece, hashlib.sha256(piece).hexdigest()
        position = end


class RelayService(pb_grpc.LearnerServicer):
    """FetchWeights from the cache; every other Learner call is UNIMPLEMENTED (leases and groups go to the learner)."""

    def __init__(self, relay: Relay):
        self.relay = relay
        self._streams = threading.Semaphore(relay.config.relay.max_streams)

    def _refuse(self, context, code: grpc.StatusCode, message: str, reason: Reason | None) -> None:
        self.relay.metrics.requests.labels("refused").inc()
        if reason is None:
            context.abort(code, message)
        context.abort_with_status(error_status(code, message, reason))

    def FetchWeights(self, request: pb.FetchWeightsRequest, context):
        relay = self.relay
        sid = request.sampler_id
        if len(sid) > MAX_NAME_CHARS or not sid.isprintable():
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"sampler_id must be 0..{MAX_NAME_CHARS} "
                         "printable characters", Reason.SAMPLER_ID)
        if not self._streams.acquire(blocking=False):
            self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, f"this relay serves at most "
                         f"{relay.config.relay.max_streams} streams at once; retry shortly", Reason.RATE_LIMITED)
        relay.streams_changed(+1)
        try:
            relay.note_client(sid or context.peer())
            try:
                payload, hit = relay.payload(request.have_version, request.want_version)
            except UpstreamFailed as err:
                self._refuse(context, err.code, str(err), err.reason)
                return
            relay.metrics.requests.labels("hit" if hit else "miss").inc()
            if request.offset > payload.total_bytes:
                self._refuse(context, grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} is past the end of "
                             f"the {payload.total_bytes}-byte payload of version {payload.version}", Reason.OFFSET)
            served = relay.metrics.served.inc
            try:
                for offset, data, sha in serve_chunks(payload, request.offset, context.is_active):
                    served(len(data))
                    yield pb.WeightChunk(
                        version=payload.version, base_version=payload.base_version, encoding=payload.encoding,
                        total_bytes=payload.total_bytes, offset=offset, data=data, chunk_sha256=sha,
                        payload_sha256=payload.payload_sha256, weights_sha256=payload.weights_sha256,
                    )
            except UpstreamFailed as err:
                self._refuse(context, err.code, f"upstream failed mid-payload: {err}", err.reason)
        finally:
            relay.streams_changed(-1)
            self._streams.release()


# ---- server-side credentials ---------------------------------------------------------------------------------------


def read_tokens(path: Path) -> tuple[bytes, ...]:
    """The sha256 digests of the tokens in a tokens file (`name:token` or `token` per line, `#` comments)."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ValueError(f"cannot read tokens file {path}: {err.strerror}") from None
    digests = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if line:
            token = line.split(":", 1)[1].strip() if ":" in line else line
            digests.append(hashlib.sha256(check_token(token, f"tokens file {path} line {number}").encode()).digest())
    if not digests:
        raise ValueError(f"tokens file {path} holds no tokens")
    return tuple(digests)


class TokenCheck(grpc.ServerInterceptor):
    """Refuses every call but the health check without one of the relay's tokens (UNAUTHENTICATED)."""

    def __init__(self, digests: tuple[bytes, ...]):
        self.digests = digests

    def _known(self, metadata) -> Reason | None:
        values = [v for k, v in (metadata or ()) if k == METADATA_KEY]
        if not values:
            return Reason.TOKEN_MISSING
        scheme, _, token = (values[0] if len(values) == 1 and isinstance(values[0], str) else "").partition(" ")
        presented = hashlib.sha256(token.strip().encode()).digest()
        found = False
        for digest in self.digests:  # constant time, every entry
            found |= hmac.compare_digest(presented, digest)
        return None if scheme.lower() == SCHEME and found else Reason.TOKEN_INVALID

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method in OPEN_METHODS:
            return handler
        reason = self._known(handler_call_details.invocation_metadata)
        if reason is None:
            return handler
        status = error_status(grpc.StatusCode.UNAUTHENTICATED, "this relay needs a token it knows: send "
                              f"'{METADATA_KEY}: Bearer <token>' (samplers: --relay-token-file)", reason)

        def refuse(_request, context):
            context.abort_with_status(status)

        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(refuse)
        return grpc.unary_unary_rpc_method_handler(refuse)


def build_relay_server(relay: Relay, host: str, port: int,
                       service: RelayService | None = None) -> tuple[grpc.Server, int]:
    """A ready (not yet started) gRPC server with the relay's FetchWeights and the health service."""
    sec = relay.config.security
    if (sec.tls_cert is None) != (sec.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together: give both or neither")
    if sec.tls_client_ca is not None and sec.tls_cert is None:
        raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key as well")
    interceptors = [TokenCheck(read_tokens(sec.tokens_file))] if sec.tokens_file is not None else []
    if not interceptors and sec.tls_client_ca is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving weights on %s with no authentication: anyone who can reach it can download the run's "
                    "weights (give --tokens-file or --tls-client-ca to restrict it)", host)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=relay.config.relay.max_streams + 4),
        options=[
            ("grpc.max_receive_message_length", 1 << 20),  # requests are tiny
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_ping_strikes", 0),
        ],
        interceptors=interceptors,
    )
    pb_grpc.add_LearnerServicer_to_server(service or RelayService(relay), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    if sec.tls_cert is not None:
        credentials = grpc.ssl_server_credentials(
            [(read_pem(sec.tls_key, "TLS key"), read_pem(sec.tls_cert, "TLS certificate"))],
            root_certificates=read_pem(sec.tls_client_ca, "client CA"),
            require_client_auth=sec.tls_client_ca is not None,
        )
        bound = server.add_secure_port(address, credentials)
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not bind the relay to {address}")
    return server, bound
