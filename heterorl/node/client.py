"""The sampler's side of the wire: retries with backoff, resumable verified weight downloads.

Samplers run on flaky links, so every call that fails with a transient status (the learner is restarting, the
link dropped, a rate limit) is retried with exponential backoff and jitter; calls the learner refused on purpose
are not. Credentials (`ClientSecurity`): a token sent as `authorization: Bearer <token>` metadata on every call,
and TLS (optionally with a client certificate for mutual TLS). A refused credential is not retried: it raises
`AuthenticationFailed`.
"""

from __future__ import annotations

import collections
import hashlib
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, TypeVar

import grpc

from heterorl.common.weights import ENCODINGS, WeightsCorrupt
from heterorl.server.auth import METADATA_KEY, token_from_text  # the token format both sides share
from heterorl.v1 import learner_pb2 as pb
from heterorl.v1 import learner_pb2_grpc as pb_grpc

MAX_MESSAGE_BYTES = 16 << 20
TRANSIENT = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
     grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}
)
T = TypeVar("T")


TOKEN_ENV = "HETERORL_TOKEN"


class Stopped(Exception):
    """The sampler was asked to stop while waiting for the learner."""


class AuthenticationFailed(Exception):
    """The learner refused this client's credentials (UNAUTHENTICATED): retrying cannot help."""


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read {what} {path}: {err.strerror}") from None


@dataclass(frozen=True)
class ClientSecurity:
    """How a client proves itself to the learner and verifies it. Empty: plaintext, no token (loopback runs)."""

    token: str = field(default="", repr=False)
    tls_ca: bytes | None = field(default=None, repr=False)      # PEM roots; None with tls=True: system roots
    tls_cert: bytes | None = field(default=None, repr=False)    # client certificate chain (mutual TLS)
    tls_key: bytes | None = field(default=None, repr=False)
    tls: bool = False
    server_name: str = ""  # the name the learner's certificate must carry, when it is not the dialled host

    @classmethod
    def load(cls, token_file: Path | None = None, tls_ca: Path | None = None, tls_cert: Path | None = None,
             tls_key: Path | None = None, server_name: str = "",
             env: Mapping[str, str] = os.environ) -> "ClientSecurity":
        """Token from `token_file`, else the HETERORL_TOKEN environment variable; TLS on when any TLS file is given."""
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("a client certificate and its key go together: give --tls-cert and --tls-key")
        if token_file is not None:
            text = _read(token_file, "token file").decode(errors="replace")
            token = token_from_text(text, f"token file {token_file}")
        elif env.get(TOKEN_ENV, "").strip():
            token = token_from_text(env[TOKEN_ENV], f"the {TOKEN_ENV} environment variable")
        else:
            token = ""
        tls = any(p is not None for p in (tls_ca, tls_cert)) or bool(server_name)
        return cls(token=token, tls_ca=_read(tls_ca, "CA certificate"), tls_cert=_read(tls_cert, "client certificate"),
                   tls_key=_read(tls_key, "client key"), tls=tls, server_name=server_name)

    def describe(self) -> str:
        parts = (["mutual TLS" if self.tls_cert else "TLS"] if self.tls else ["plaintext"])
        return ", ".join(parts + (["token"] if self.token else []))


class _TokenMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                     grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call (call credentials would need TLS; this works on both)."""

    def __init__(self, token: str):
        self._metadata = ((METADATA_KEY, f"Bearer {token}"),)

    def _details(self, details):
        return _CallDetails(details.method, details.timeout, tuple(details.metadata or ()) + self._metadata,
                            details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                                            "compression")),
    grpc.ClientCallDetails,
):
    pass


def open_channel(target: str, security: ClientSecurity, options: list[tuple[str, object]] | None = None
                 ) -> tuple[grpc.Channel, grpc.Channel]:
    """(raw channel, channel for calls): TLS when asked, the token added to every call when there is one."""
    options = list(options or [])
    if security.tls:
        if security.server_name:
            options.append(("grpc.ssl_target_name_override", security.server_name))
        credentials = grpc.ssl_channel_credentials(
            root_certificates=security.tls_ca, private_key=security.tls_key, certificate_chain=security.tls_cert
        )
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    calls = grpc.intercept_channel(channel, _TokenMetadata(security.token)) if security.token else channel
    return channel, calls


def _refused_credentials(err: grpc.RpcError) -> bool:
    return isinstance(err, grpc.Call) and err.code() == grpc.StatusCode.UNAUTHENTICATED


@dataclass(frozen=True)
class RetryPolicy:
    initial_s: float = 0.5
    max_s: float = 10.0
    give_up_s: float = 0.0  # 0 = keep trying forever

    def delays(self):
        """Backoff delays with full jitter; ends (StopIteration) once give_up_s is spent."""
        started = time.monotonic()
        delay = self.initial_s
        while not self.give_up_s or time.monotonic() - started < self.give_up_s:
            yield random.uniform(delay / 2, delay)
            delay = min(self.max_s, delay * 2)


def is_transient(err: grpc.RpcError) -> bool:
    """Worth retrying: a transient status, or a failure with no status at all (no connection yet)."""
    if isinstance(err, grpc.Call):
        return err.code() in TRANSIENT
    return True


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


class LearnerClient:
    def __init__(self, target: str, retry: RetryPolicy = RetryPolicy(), log: Callable[[str], None] = print,
                 stop: threading.Event | None = None, security: ClientSecurity = ClientSecurity()):
        self.target = target
        self.retry = retry
        self.log = log
        self.stop = stop or threading.Event()  # set: waiting between retries ends with Stopped
        self.security = security
        self.channel, calls = open_channel(
            target,
            security,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_timeout_ms", 20_000),
                ("grpc.keepalive_permit_without_calls", 1),
                # gRPC's own reconnect backoff grows to minutes by default; keep it within our retry policy.
                ("grpc.initial_reconnect_backoff_ms", int(retry.initial_s * 1000)),
                ("grpc.min_reconnect_backoff_ms", int(retry.initial_s * 1000)),
                ("grpc.max_reconnect_backoff_ms", int(retry.max_s * 1000)),
            ],
        )
        self.stub = pb_grpc.LearnerStub(calls)

    def close(self) -> None:
        self.channel.close()

    def with_retries(self, what: str, fn: Callable[[], T]) -> T:
        """Run fn, retrying transient failures with backoff; refusals and exhausted retries raise."""
        delays = self.retry.delays()
        attempt = 0
        while True:
            try:
                return fn()
            except grpc.RpcError as err:
                if _refused_credentials(err):
                    raise AuthenticationFailed(
                        f"{what}: the learner at {self.target} refused: {err.details()}") from None
                if not is_transient(err):
                    raise
                attempt += 1
                delay = next(delays, None)
                if delay is None:
                    raise
                if attempt == 1 or attempt % 10 == 0:
                    if isinstance(err, grpc.Call):
                        why = f"{err.code().name}: {(err.details() or '')[:300]}"
                    else:
                        why = "not connected" + (" (TLS handshake?)" if self.security.tls else "")
                    self.log(f"{what}: learner at {self.target} unreachable ({why}); retrying (attempt {attempt})")
                if self.stop.wait(delay):
                    raise Stopped()

    def wait_ready(self) -> None:
        def probe():
            try:
                grpc.channel_ready_future(self.channel).result(timeout=min(5.0, self.retry.max_s))
            except grpc.FutureTimeoutError:
                raise _Unavailable() from None

        self.with_retries("connect", probe)

    # -- calls (each retried on transient failures)

    def register(self, name: str, engine: str, device: str, max_batch: int, client_version: str) -> pb.RegisterReply:
        request = pb.RegisterRequest(
            name=name, engine=engine, device=device, max_batch=max_batch, client_version=client_version
        )
        return self.with_retries("register", lambda: self.stub.Register(request, timeout=30))

    def model_files(self, sampler_id: str) -> pb.ModelFiles:
        request = pb.ModelFilesRequest(sampler_id=sampler_id)
        return self.with_retries("model files", lambda: self.stub.GetModelFiles(request, timeout=60))

    def lease(self, sampler_id: str, max_groups: int) -> pb.LeaseReply:
        request = pb.LeaseRequest(sampler_id=sampler_id, max_groups=max_groups)
        return self.with_retries("lease", lambda: self.stub.LeasePrompts(request, timeout=30))

    def heartbeat(self, sampler_id: str, version: int) -> pb.HeartbeatReply:
        return self.stub.Heartbeat(pb.HeartbeatRequest(sampler_id=sampler_id, version=version), timeout=10)

    def submit(self, groups: list[pb.TrajectoryGroup]) -> list[pb.SubmitAck]:
        """One stream for all groups; returns the acks received (in order) before the stream ended.

        Raises grpc.RpcError after collecting what was acknowledged into `err.acks` so the caller can keep
        exactly the unacknowledged groups.
        """
        acks: list[pb.SubmitAck] = []
        try:
            for ack in self.stub.SubmitTrajectories(iter(groups), timeout=120):
                acks.append(ack)
        except grpc.RpcError as err:
            if _refused_credentials(err):
                raise AuthenticationFailed(f"submit: the learner at {self.target} refused: {err.details()}") from None
            err.acks = acks  # type: ignore[attr-defined]
            raise
        return acks

    def fetch_weights(self, sampler_id: str, have_version: int, want_version: int = 0) -> DownloadedWeights:
        """Download one version's payload, verifying every chunk; resume from the last good byte on a cut."""
        payload: bytearray | None = None
        meta: pb.WeightChunk | None = None
        offset = 0
        received = corrupt = reconnects = 0
        delays = self.retry.delays()
        while True:
            # Resuming asks for exactly the payload being downloaded: same base, same version.
            request = pb.FetchWeightsRequest(
                sampler_id=sampler_id,
                have_version=meta.base_version if meta else have_version,
                want_version=meta.version if meta else want_version,
                offset=offset,
            )
            try:
                for chunk in self.stub.FetchWeights(request, timeout=600):
                    received += len(chunk.data)
                    if meta is None:
                        if chunk.encoding not in ENCODINGS:
                            raise WeightsCorrupt(f"unknown weight encoding {chunk.encoding!r}")
                        meta = chunk
                        payload = bytearray(chunk.total_bytes)
                    elif (chunk.version, chunk.total_bytes, chunk.payload_sha256) != (
                        meta.version, meta.total_bytes, meta.payload_sha256
                    ):
                        raise WeightsCorrupt("weight chunks of different versions were mixed in one stream")
                    if chunk.offset != offset or offset + len(chunk.data) > meta.total_bytes:
                        raise WeightsCorrupt(f"chunk at offset {chunk.offset}, expected {offset}")
                    if hashlib.sha256(chunk.data).hexdigest() != chunk.chunk_sha256:
                        corrupt += 1
                        self.log(f"weights v{meta.version}: chunk at {offset} failed its hash; fetching it again")
                        break  # reopen the stream at the same offset; the bad bytes were never kept
                    payload[offset : offset + len(chunk.data)] = chunk.data
                    offset += len(chunk.data)
                else:
                    if meta is not None and offset == meta.total_bytes:
                        if hashlib.sha256(payload).hexdigest() != meta.payload_sha256:
                            raise WeightsCorrupt(f"payload of version {meta.version} does not match its hash")
                        return DownloadedWeights(
                            version=meta.version, base_version=meta.base_version, encoding=meta.encoding,
                            payload=payload, weights_sha256=meta.weights_sha256, bytes_received=received,
                            corrupt_chunks=corrupt, reconnects=reconnects,
                        )
                    if meta is None:
                        raise WeightsCorrupt("the learner sent no weight chunks")
            except grpc.RpcError as err:
                if isinstance(err, grpc.Call) and err.code() == grpc.StatusCode.NOT_FOUND and meta is not None:
                    # The version was pruned mid-download: start over on the newest.
                    self.log(f"weights v{meta.version} no longer held; fetching the newest instead")
                    meta, payload, offset, want_version = None, None, 0, 0
                    continue
                if _refused_credentials(err):
                    raise AuthenticationFailed(
                        f"weights: the learner at {self.target} refused: {err.details()}") from None
                if not is_transient(err):
                    raise
                reconnects += 1
                delay = next(delays, None)
                if delay is None:
                    raise
                if self.stop.wait(delay):
                    raise Stopped() from None
            if corrupt > 16:
                raise WeightsCorrupt("too many corrupt chunks; giving up on this download")


class _Unavailable(grpc.RpcError):
    """Raised by the readiness probe so `with_retries` treats a not-yet-listening learner as transient."""
