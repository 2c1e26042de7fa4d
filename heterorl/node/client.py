"""The sampler's side of the wire: every call to the learner, under one retry policy.

Every unary call and every weight download is retried by `heterorl.node.retry.RetryPolicy` (transient statuses
and the reasons that mean "later"); calls the learner refused on purpose raise at once, with their reason
readable by `heterorl.common.contract.refusal_reason`. A refused credential raises `AuthenticationFailed`:
retrying cannot help. Submitting is one stream whose acknowledgements the caller must see even when it breaks,
so `submit` makes one attempt and the sampler retries what was not acknowledged (`heterorl.node.sampler`).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, TypeVar

import grpc

from heterorl.common.contract import MAX_MESSAGE_BYTES, Reason, refusal_reason
from heterorl.node.download import DownloadedWeights, WeightDownload
from heterorl.node.retry import TRANSIENT, RetryPolicy, Stopped, describe, is_transient
from heterorl.node.security import ClientSecurity, open_channel
from heterorl.v1 import learner_pb2 as pb
from heterorl.v1 import learner_pb2_grpc as pb_grpc

__all__ = [
    "TRANSIENT", "AuthenticationFailed", "ClientSecurity", "DownloadedWeights", "LearnerClient", "RetryPolicy",
    "Stopped", "is_transient", "open_channel",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
_CREDENTIAL_REASONS = frozenset({Reason.TOKEN_MISSING, Reason.TOKEN_INVALID})


class AuthenticationFailed(Exception):
    """The learner refused this client's credentials (UNAUTHENTICATED): retrying cannot help."""


def _refused_credentials(err: grpc.RpcError) -> bool:
    return isinstance(err, grpc.Call) and (
        err.code() == grpc.StatusCode.UNAUTHENTICATED or refusal_reason(err) in _CREDENTIAL_REASONS
    )


class _Unavailable(grpc.RpcError):
    """Raised by the readiness probe so the retry policy treats a not-yet-listening learner as transient."""


class LearnerClient:
    def __init__(self, target: str, retry: RetryPolicy = RetryPolicy(), stop: threading.Event | None = None,
                 security: ClientSecurity = ClientSecurity()):
        self.target = target
        self.retry = retry
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
                # gRPC's own reconnect backoff grows to minutes by default; keep it within our retry policy. The
                # minimum stays at gRPC's 20 s: it is also the connect timeout, and a 300 ms link needs seconds.
                ("grpc.initial_reconnect_backoff_ms", int(retry.initial_s * 1000)),
                ("grpc.max_reconnect_backoff_ms", int(retry.max_s * 1000)),
            ],
        )
        self.stub = pb_grpc.LearnerStub(calls)

    def close(self) -> None:
        self.channel.close()

    def _once(self, what: str, fn: Callable[[], T]) -> Callable[[], T]:
        """fn as one attempt: a refused credential becomes AuthenticationFailed (which is never retried)."""

        def attempt() -> T:
            try:
                return fn()
            except grpc.RpcError as err:
                if _refused_credentials(err):
                    raise AuthenticationFailed(
                        f"{what}: the learner at {self.target} refused: {err.details()}") from None
                raise

        return attempt

    def with_retries(self, what: str, fn: Callable[[], T]) -> T:
        """Run fn, retrying transient failures by the policy; refusals and exhausted retries raise."""
        return self.retry.call(what, self._once(what, fn), self.stop, where=self.target)

    def wait_ready(self) -> None:
        def probe():
            try:
                grpc.channel_ready_future(self.channel).result(timeout=min(5.0, self.retry.max_s))
            except grpc.FutureTimeoutError:
                # One fail-fast health check (open without a token) carries gRPC's reason: refused, unresolvable...
                from grpc_health.v1 import health_pb2, health_pb2_grpc

                try:
                    health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=2.0)
                except grpc.RpcError as err:
                    if isinstance(err, grpc.Call) and err.code() == grpc.StatusCode.UNAVAILABLE:
                        raise
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
        """One attempt: heartbeats repeat anyway, and the sampler's own calls notice an outage."""
        request = pb.HeartbeatRequest(sampler_id=sampler_id, version=version)
        return self._once("heartbeat", lambda: self.stub.Heartbeat(request, timeout=10))()

    def submit(self, groups: list[pb.TrajectoryGroup]) -> list[pb.SubmitAck]:
        """One stream for all groups (one attempt); returns the acks received (in order) before it ended.

        Raises grpc.RpcError after collecting what was acknowledged into `err.acks` so the caller can keep
        exactly the unacknowledged groups.
        """
        acks: list[pb.SubmitAck] = []

        def stream() -> list[pb.SubmitAck]:
            try:
                for ack in self.stub.SubmitTrajectories(iter(groups), timeout=120):
                    acks.append(ack)
            except grpc.RpcError as err:
                err.acks = acks  # type: ignore[attr-defined]
                raise
            return acks

        return self._once("submit", stream)()

    def fetch_weights(self, sampler_id: str, have_version: int, want_version: int = 0) -> DownloadedWeights:
        """Download one version's payload, verifying every chunk; on a cut, resume from the last verified byte."""
        download = WeightDownload(sampler_id, have_version, want_version)

        def attempt() -> DownloadedWeights:
            while True:
                try:
                    done = download.read(self.stub.FetchWeights(download.request(), timeout=600))
                except grpc.RpcError as err:
                    if download.started and refusal_reason(err) == Reason.VERSION_PRUNED:
                        download.restart_on_newest()  # pruned mid-download: not a failure
                        continue
                    if is_transient(err):
                        download.reconnects += 1
                        log.debug("weights: stream broke at byte %d (%s)", download.offset, describe(err))
                    raise
                if done is not None:
                    return done

        return self.with_retries("weights", attempt)
