"""The gRPC face of the learner: validate every field, translate to the learner's types, answer precisely.

Nothing from the network reaches `Learner` unchecked (validate.py). Every refusal, whether decided here or raised
by the learner as `Refused`, is answered with its gRPC status, a message that names the field and the limit, and
its `Reason` as a `google.rpc.ErrorInfo` detail (heterorl/common/contract.py), so a sampler acts on the reason,
never on the text. It is counted learner-wide by reason (`Status.rejections`) and, when the request names a sampler
registered with the caller's credential, against that sampler too; the server keeps serving. Who may call at all
is decided in tokens.py and security.py, how often in ratelimit.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from concurrent import futures
from contextlib import contextmanager
from typing import Iterator, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from heterorl.common.contract import MAX_MESSAGE_BYTES, Reason, error_status
from heterorl.common.weights import iter_chunks
from heterorl.server.errors import Refused
from heterorl.server.learner import Learner
from heterorl.server.ratelimit import RateLimiter, Refusals
from heterorl.server.security import ServerSecurity
from heterorl.server.tokens import principal_of
from heterorl.server.validate import GroupRules, check_max_groups, check_name, check_register, require
from heterorl.v1 import learner_pb2 as pb
from heterorl.v1 import learner_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Learner"].full_name
WEIGHTS_DTYPE = "bfloat16"  # the dtype of every published tensor (heterorl/common/codec.py)
REGISTER_COST = 10.0  # in calls of the rate limit: each Register creates a record the learner keeps (and commits)
# Not the caller's doing: counted learner-wide, never against the sampler.
LEARNERS_OWN = frozenset({Reason.REWARD_FAILED, Reason.REWARD_TIMEOUT, Reason.LEARNER_STOPPING})
NOT_COUNTED = frozenset({Reason.VERSION_PRUNED})  # a normal race (a version pruned on the way), not a violation


def _peer_host(context) -> str:
    """The caller's address without the port (rate limits before a sampler id exists)."""
    peer = context.peer() or ""
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


def status_reply(status, rejections: dict[str, int], security: str) -> pb.StatusReply:
    """A StatusReply from the learner's typed `LearnerStatus`: every one of its fields, by name, so a field added
    on one side and not the other fails here (TypeError/ValueError) instead of being dropped."""
    values = {f.name: getattr(status, f.name) for f in dataclasses.fields(status)}
    samplers = [pb.SamplerStatus(**dataclasses.asdict(view)) for view in values.pop("samplers")]
    return pb.StatusReply(samplers=samplers, rejections=rejections, security=security, **values)


class LearnerService(pb_grpc.LearnerServicer):
    def __init__(self, learner: Learner, security: ServerSecurity | None = None):
        self.learner = learner
        self.security = security or ServerSecurity()
        self.refusals = Refusals()
        limits = self.security.limits
        self.call_limit = RateLimiter(limits.calls_per_s, limits.calls_burst)
        self.group_limit = RateLimiter(limits.groups_per_s, limits.groups_burst)
        config = learner.config
        self.rules = GroupRules(config.train.group_size, config.sampling.max_new_tokens, learner.vocab_size)

    # -- refusals

    def _abort(self, context, err: Refused, blame: str = "", prefix: str = "") -> NoReturn:
        """Count the refusal learner-wide and against `blame` (a sampler the caller owns), then answer it."""
        if err.reason not in NOT_COUNTED:
            self.refusals.add(err.reason)
            if blame and err.reason not in LEARNERS_OWN:
                self.learner.count_rejection(blame, err.reason)
        context.abort_with_status(error_status(err.code, prefix + str(err), err.reason, **err.metadata))
        raise AssertionError("abort_with_status returned")  # it raises; this line is never reached

    @contextmanager
    def _answering(self, context, blame: str = "") -> Iterator[None]:
        """Answer a `Refused` raised in the block (here or by the learner) with its status, counted."""
        try:
            yield
        except Refused as err:
            self._abort(context, err, blame)

    def _rate(self, limiter: RateLimiter, key: str, what: str, cost: float = 1.0) -> None:
        wait = limiter.retry_after(key, cost)
        if wait:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{what} exceeded {limiter.rate:g}/s (burst "
                          f"{limiter.burst:g}); retry in {wait:.2f}s", Reason.RATE_LIMITED, retry_after_s=f"{wait:.3f}")

    def _owned_sampler(self, sampler_id: str, principal: str) -> str:
        """`sampler_id` if the caller's credential registered it; Refused otherwise."""
        check_name(sampler_id, Reason.SAMPLER_ID)
        record = self.learner.sampler(sampler_id)  # Refused(NOT_FOUND, UNKNOWN_SAMPLER) if not registered
        # Another credential's sampler looks like no sampler at all: ids are not confirmed to outsiders, and an
        # honest sampler whose record lost its owner (a restored registry) simply registers again.
        require(record.principal == principal, f"unknown sampler id {sampler_id!r} for this credential: Register first",
                Reason.NOT_OWNER, grpc.StatusCode.NOT_FOUND, field="sampler_id")
        return record.sampler_id

    def _caller(self, sampler_id: str, context) -> str:
        """Check a unary call's sampler (known, owned by the caller, within its call rate) or abort."""
        with self._answering(context):  # nobody to blame: an unknown id, or somebody else's
            self._owned_sampler(sampler_id, principal_of(context))
        with self._answering(context, blame=sampler_id):
            self._rate(self.call_limit, sampler_id, f"sampler {sampler_id}")
        return sampler_id

    def _anonymous_rate(self, context, what: str, cost: float = 1.0) -> None:
        """Rate-limit a call that names no sampler by its credential (or address when there are none)."""
        key = principal_of(context) or _peer_host(context)
        with self._answering(context):
            self._rate(self.call_limit, f"{what}:{key}", f"{what} calls of {key}", cost)

    def _run_config(self) -> pb.RunConfig:
        config = self.learner.config
        sampling = config.sampling
        return pb.RunConfig(
            run_id=self.learner.run_id,
            model=config.run.model,
            task=config.run.task,
            reward=self.learner.reward_name,
            group_size=config.train.group_size,
            sampling=pb.SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                                       max_new_tokens=sampling.max_new_tokens, stop=list(sampling.stop)),
            vocab_size=self.learner.vocab_size,
            max_prompt_tokens=sampling.max_prompt_tokens,
            lease_ttl_s=config.serve.lease_ttl_s,
            weights_dtype=WEIGHTS_DTYPE,
            task_options_json=self.learner.sampler_task_options,
        )

    # -- RPCs

    def Register(self, request: pb.RegisterRequest, context):
        self._anonymous_rate(context, "Register", REGISTER_COST)
        with self._answering(context):
            check_register(request)
            record = self.learner.register(request.name, request.engine, request.device, request.max_batch,
                                           principal=principal_of(context))
        return pb.RegisterReply(sampler_id=record.sampler_id, run=self._run_config(),
                                current_version=self.learner.version)

    def GetModelFiles(self, request: pb.ModelFilesRequest, context):
        self._caller(request.sampler_id, context)
        files = [pb.ModelFile(name=n, content=c) for n, c in self.learner.model_files.items()]
        digest = hashlib.sha256()
        for f in files:
            digest.update(f.name.encode() + b"\0" + hashlib.sha256(f.content).digest())
        return pb.ModelFiles(files=files, files_sha256=digest.hexdigest())

    def LeasePrompts(self, request: pb.LeaseRequest, context):
        sampler_id = self._caller(request.sampler_id, context)
        with self._answering(context, blame=sampler_id):
            check_max_groups(request.max_groups)
            leases = self.learner.lease(sampler_id, request.max_groups)
        group_size = self.learner.config.train.group_size
        newest = self.learner.version
        return pb.LeaseReply(
            leases=[
                pb.PromptLease(lease_id=lease.lease_id, prompt_id=str(lease.prompt_index),
                               question=lease.problem.question, prompt_token_ids=lease.prompt_token_ids,
                               group_size=group_size, expires_at_unix=lease.expires_at)
                for lease in leases
            ],
            current_version=newest,
            refresh_below_version=self.learner.ingest.scheduler.refresh_below(newest),
            retry_after_s=0.0 if leases else self.learner.ingest.retry_after(),
        )

    def _payload(self, have_version: int, want_version: int):
        """The encoded payload from `have_version` to `want_version` (0 = the newest) that FetchWeights streams and
        GetWeightsManifest describes; Refused when that version is not (or no longer) published."""
        newest = self.learner.version
        want = want_version or newest
        require(want <= newest, f"want_version {want} is newer than the newest version {newest}", Reason.WANT_VERSION)
        try:
            return self.learner.versions.payload(have_version, want)
        except KeyError:
            raise Refused(grpc.StatusCode.NOT_FOUND, f"version {want} is no longer held (held: "
                          f"{self.learner.versions.held()}); ask for the newest", Reason.VERSION_PRUNED) from None

    def FetchWeights(self, request: pb.FetchWeightsRequest, context):
        sampler_id = self._caller(request.sampler_id, context)
        with self._answering(context, blame=sampler_id):
            payload = self._payload(request.have_version, request.want_version)
            total = len(payload.data)
            require(request.offset <= total, f"offset {request.offset} is past the end of the {total}-byte payload "
                    f"of version {payload.version}", Reason.OFFSET, grpc.StatusCode.OUT_OF_RANGE)
        chunk_bytes = self.learner.config.serve.chunk_bytes
        served = self.learner.prometheus.serve_bytes
        for chunk in iter_chunks(payload.data, chunk_bytes, request.offset, payload.chunk_sha256):
            if not context.is_active():
                return
            served(len(chunk.data))
            yield pb.WeightChunk(
                version=payload.version, base_version=payload.base_version, encoding=payload.encoding,
                total_bytes=total, offset=chunk.offset, data=bytes(chunk.data), chunk_sha256=chunk.sha256,
                payload_sha256=payload.sha256, weights_sha256=payload.weights_sha256,
            )

    def GetWeightsManifest(self, request: pb.WeightsManifestRequest, context):
        """The hashes a sampler checks relayed weights against: the same payload FetchWeights would stream."""
        sampler_id = self._caller(request.sampler_id, context)
        with self._answering(context, blame=sampler_id):
            payload = self._payload(request.have_version, request.want_version)
        return pb.WeightsManifest(
            version=payload.version, base_version=payload.base_version, encoding=payload.encoding,
            total_bytes=len(payload.data), chunk_bytes=self.learner.versions.chunk_bytes,
            chunk_sha256=payload.chunk_sha256, payload_sha256=payload.sha256, weights_sha256=payload.weights_sha256,
        )

    def SubmitTrajectories(self, request_iterator, context):
        principal = principal_of(context)
        for group in request_iterator:
            blame = ""  # the sampler a refusal is counted against: only one the caller owns
            try:
                blame = self._owned_sampler(group.sampler_id, principal)
                self._rate(self.group_limit, blame, f"groups of sampler {blame}")
                submission = dataclasses.replace(self.rules.submission(group, self.learner.version),
                                                 generation_seconds=group.generation_seconds)  # for scheduling
                duplicate = self.learner.submit(submission)
            except Refused as err:
                self._abort(context, err, blame, prefix=f"lease {group.lease_id[:64]!r}: ")
            yield pb.SubmitAck(
                lease_id=group.lease_id,
                status=pb.ACK_STATUS_DUPLICATE if duplicate else pb.ACK_STATUS_ACCEPTED,
                current_version=self.learner.version,
            )

    def Heartbeat(self, request: pb.HeartbeatRequest, context):
        sampler_id = self._caller(request.sampler_id, context)
        with self._answering(context, blame=sampler_id):
            newest = self.learner.version
            require(request.version <= newest, f"version {request.version} is newer than the newest version "
                    f"{newest}", Reason.HEARTBEAT_VERSION, field="version")
            self.learner.heartbeat(sampler_id, request.version)
        return pb.HeartbeatReply(current_version=self.learner.version)

    def Status(self, request: pb.StatusRequest, context):
        self._anonymous_rate(context, "Status")
        return status_reply(self.learner.status(), self.refusals.snapshot(), self.security.describe())


def build_server(
    learner: Learner, host: str, port: int, max_workers: int = 16, security: ServerSecurity | None = None
) -> tuple[grpc.Server, int]:
    """A ready (not yet started) gRPC server with the Learner, health and reflection services.

    `security` defaults to what `learner.config.security` names (tokens, TLS, limits); a non-loopback `host` without
    authentication is refused (ValueError) unless the security setting says insecure.
    """
    if security is None:
        security = ServerSecurity.from_config(learner.config.security)
    for warning in security.check_bind(host):
        logger.warning("%s", warning)
    service = LearnerService(learner, security)
    learner.prometheus.watch_refusals(service.refusals)  # heterorl_requests_refused_total{reason}
    # The largest valid request is a trajectory group; refuse bigger messages before they are read into memory.
    receive_limit = min(MAX_MESSAGE_BYTES, max(1 << 20, 2 * service.rules.max_bytes))
    options = [
        ("grpc.max_receive_message_length", receive_limit),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),
        # Samplers ping every 30 s to keep idle links alive through NATs; gRPC's default server policy answers
        # such pings with GOAWAY too_many_pings and drops the connection.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        options=options,
        interceptors=security.interceptors(service.refusals),
    )
    pb_grpc.add_LearnerServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    credentials = security.server_credentials()
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not bind the learner to {address}")
    return server, bound
