"""The gRPC face of the learner: validate every field, translate to the learner's types, answer precisely.

Nothing from the network reaches `Learner` unchecked. Each refusal is a gRPC status with a message that names
the field and the limit; it is counted learner-wide under a reason (`Status.rejections`) and, when the request
names a sampler registered with the caller's credential, against that sampler too; the server keeps serving.
Who may call at all (tokens, TLS) and how often is decided in auth.py.
"""

from __future__ import annotations

import hashlib
import math
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from heterorl.common.weights import iter_chunks
from heterorl.server.auth import RateLimiter, Refusals, ServerSecurity, principal_of
from heterorl.server.leases import LeaseError
from heterorl.server.learner import Learner, SamplerRecord, Submission
from heterorl.v1 import learner_pb2 as pb
from heterorl.v1 import learner_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Learner"].full_name
MAX_MESSAGE_BYTES = 16 << 20
ENGINES = ("transformers", "vllm")
MAX_LEASE_BATCH = 256
LOGPROB_TOLERANCE = 1e-3  # a log-prob may round a hair above 0 in low precision; more is a lie
REGISTER_COST = 10.0  # in calls of the rate limit: each Register creates a record the learner keeps (and commits)
# Why a lease call fails, as the reason it is counted under.
LEASE_REASONS = {"NOT_FOUND": "lease_unknown", "PERMISSION_DENIED": "lease_not_owned",
                 "FAILED_PRECONDITION": "lease_released"}


class InvalidInput(Exception):
    """A refused request: the gRPC status, a message naming the field and limit, and the reason it is counted as."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str):
        super().__init__(message)
        self.code = code
        self.reason = reason


def _require(ok: bool, message: str, reason: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> None:
    if not ok:
        raise InvalidInput(code, message, reason)


def _lease_status(error: LeaseError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.code)


def _check_name(value: str, field: str, limit: int = 64) -> None:
    _require(0 < len(value) <= limit, f"{field} must be 1..{limit} characters, got {len(value)}", field)
    _require(value.isprintable(), f"{field} must be printable text", field)


def max_group_bytes(group_size: int, max_new_tokens: int) -> int:
    """The largest valid TrajectoryGroup on the wire: ids of 64 characters (of up to 4 UTF-8 bytes), G completions
    of the longest length (a token id takes at most 5 bytes, a log-prob 4), framing and the optional fields.
    Anything bigger carries fields the protocol does not have."""
    return 1024 + group_size * (64 + 9 * max_new_tokens)


def _peer_host(context) -> str:
    """The caller's address without the port (rate limits before a sampler id exists)."""
    peer = context.peer() or ""
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


class LearnerService(pb_grpc.LearnerServicer):
    def __init__(self, learner: Learner, security: ServerSecurity | None = None):
        self.learner = learner
        self.security = security or ServerSecurity()
        self.refusals = Refusals()
        limits = self.security.limits
        self.call_limit = RateLimiter(limits.calls_per_s, limits.calls_burst)
        self.group_limit = RateLimiter(limits.groups_per_s, limits.groups_burst)
        self.max_group_bytes = max_group_bytes(learner.config.group_size, learner.config.max_new_tokens)

    # -- helpers

    def _refuse(self, context: grpc.ServicerContext, err: InvalidInput, sampler_id: str = "", prefix: str = ""):
        """Count the refusal learner-wide and against the sampler it names (if registered), then abort."""
        self.refusals.add(err.reason)
        if sampler_id:
            self.learner.count_rejection(sampler_id, err.reason)
        context.abort(err.code, prefix + str(err))

    def _rate(self, limiter: RateLimiter, key: str, what: str, cost: float = 1.0) -> None:
        wait = limiter.retry_after(key, min(cost, limiter.burst))
        _require(
            wait == 0.0,
            f"{what} exceeded {limiter.rate:g}/s (burst {limiter.burst:g}); retry in {wait:.2f}s",
            "rate_limited",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )

    def _owned_sampler(self, sampler_id: str, principal: str) -> SamplerRecord:
        """The record of `sampler_id` if the caller's credential registered it; InvalidInput otherwise."""
        _check_name(sampler_id, "sampler_id")
        try:
            record = self.learner.sampler(sampler_id)
        except LeaseError as err:
            raise InvalidInput(_lease_status(err), str(err), "unknown_sampler") from None
        # Another credential's sampler looks like no sampler at all: ids are not confirmed to outsiders, and an
        # honest sampler whose record lost its owner (a restored registry) simply registers again.
        _require(
            record.principal == principal,
            f"unknown sampler id {sampler_id!r} for this credential: Register first",
            "not_owner",
            grpc.StatusCode.NOT_FOUND,
        )
        return record

    def _caller(self, sampler_id: str, context) -> SamplerRecord:
        """Check a unary call's sampler (known, owned by the caller, within its call rate) or abort."""
        try:
            record = self._owned_sampler(sampler_id, principal_of(context))
        except InvalidInput as err:
            self._refuse(context, err)  # nobody to blame: an unknown id, or somebody else's
        try:
            self._rate(self.call_limit, sampler_id, f"sampler {sampler_id}")
        except InvalidInput as err:
            self._refuse(context, err, sampler_id)
        return record

    def _anonymous_rate(self, context, what: str, cost: float = 1.0) -> None:
        """Rate-limit a call that names no sampler by its credential (or address when there are none)."""
        key = principal_of(context) or _peer_host(context)
        try:
            self._rate(self.call_limit, f"{what}:{key}", f"{what} calls of {key}", cost)
        except InvalidInput as err:
            self._refuse(context, err)

    def _run_config(self) -> pb.RunConfig:
        c = self.learner.config
        return pb.RunConfig(
            run_id=self.learner.run_id,
            model=c.model,
            task=c.task,
            reward=self.learner.reward_name,
            group_size=c.group_size,
            sampling=pb.SamplingParams(
                temperature=c.temperature, top_p=c.top_p, top_k=c.top_k, max_new_tokens=c.max_new_tokens
            ),
            vocab_size=self.learner.vocab_size,
            max_prompt_tokens=4096,
            lease_ttl_s=c.lease_ttl_s,
            weights_dtype="bfloat16",
            task_options_json=self.learner.sampler_task_options,
        )

    # -- RPCs

    def Register(self, request: pb.RegisterRequest, context):
        self._anonymous_rate(context, "Register", REGISTER_COST)
        try:
            _check_name(request.name, "name")
            _require(
                request.engine in ENGINES, f"engine must be one of {ENGINES}, got {request.engine[:32]!r}", "engine"
            )
            _check_name(request.device, "device")
            _require(
                1 <= request.max_batch <= MAX_LEASE_BATCH,
                f"max_batch must be in 1..{MAX_LEASE_BATCH}, got {request.max_batch}",
                "max_batch",
            )
            _require(len(request.client_version) <= 64, "client_version longer than 64 characters", "client_version")
            _require(request.client_version.isprintable(), "client_version must be printable text", "client_version")
        except InvalidInput as err:
            self._refuse(context, err)
        record = self.learner.register(
            request.name, request.engine, request.device, request.max_batch, principal=principal_of(context)
        )
        return pb.RegisterReply(
            sampler_id=record.sampler_id, run=self._run_config(), current_version=self.learner.version
        )

    def GetModelFiles(self, request: pb.ModelFilesRequest, context):
        self._caller(request.sampler_id, context)
        files = [pb.ModelFile(name=n, content=c) for n, c in self.learner.model_files.items()]
        digest = hashlib.sha256()
        for f in files:
            digest.update(f.name.encode() + b"\0" + hashlib.sha256(f.content).digest())
        return pb.ModelFiles(files=files, files_sha256=digest.hexdigest())

    def LeasePrompts(self, request: pb.LeaseRequest, context):
        self._caller(request.sampler_id, context)
        if not 1 <= request.max_groups <= MAX_LEASE_BATCH:
            self._refuse(
                context,
                InvalidInput(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"max_groups must be in 1..{MAX_LEASE_BATCH}, got {request.max_groups}",
                    "max_groups",
                ),
                request.sampler_id,
            )
        leases = self.learner.lease(request.sampler_id, request.max_groups)
        return pb.LeaseReply(
            leases=[
                pb.PromptLease(
                    lease_id=lease.lease_id,
                    prompt_id=str(lease.prompt_index),
                    question=lease.problem.question,
                    prompt_token_ids=lease.prompt_token_ids,
                    group_size=self.learner.config.group_size,
                    expires_at_unix=lease.expires_at,
                )
                for lease in leases
            ],
            current_version=self.learner.version,
        )

    def FetchWeights(self, request: pb.FetchWeightsRequest, context):
        self._caller(request.sampler_id, context)
        newest = self.learner.version
        want = request.want_version or newest
        if want > newest:
            self._refuse(
                context,
                InvalidInput(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"want_version {want} is newer than the newest version {newest}",
                    "want_version",
                ),
                request.sampler_id,
            )
        try:
            payload = self.learner.versions.payload(request.have_version, want)
        except KeyError:
            # Not a violation: the version was pruned while the sampler was on its way. Not counted.
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"version {want} is no longer held (held: {self.learner.versions.held()}); ask for the newest",
            )
        total = len(payload.data)
        if request.offset > total:
            self._refuse(
                context,
                InvalidInput(
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"offset {request.offset} is past the end of the {total}-byte payload of version {want}",
                    "offset",
                ),
                request.sampler_id,
            )
        chunk_bytes = self.learner.config.chunk_bytes
        for chunk in iter_chunks(payload.data, chunk_bytes, request.offset, payload.chunk_sha256):
            if not context.is_active():
                return
            yield pb.WeightChunk(
                version=payload.version,
                base_version=payload.base_version,
                encoding=payload.encoding,
                total_bytes=total,
                offset=chunk.offset,
                data=bytes(chunk.data),
                chunk_sha256=chunk.sha256,
                payload_sha256=payload.sha256,
                weights_sha256=payload.weights_sha256,
            )

    def SubmitTrajectories(self, request_iterator, context):
        principal = principal_of(context)
        for group in request_iterator:
            blame = ""  # the sampler a refusal is counted against: only one the caller owns
            try:
                record = self._owned_sampler(group.sampler_id, principal)
                blame = record.sampler_id
                self._rate(self.group_limit, record.sampler_id, f"groups of sampler {record.sampler_id}")
                submission = self._validate_group(group)
                duplicate = self.learner.submit(submission)
            except InvalidInput as err:
                self._refuse(context, err, blame, prefix=f"lease {group.lease_id[:64]!r}: ")
            except LeaseError as err:
                reason = LEASE_REASONS.get(err.code, "lease")
                self._refuse(context, InvalidInput(_lease_status(err), str(err), reason), blame)
            yield pb.SubmitAck(
                lease_id=group.lease_id,
                status=pb.ACK_STATUS_DUPLICATE if duplicate else pb.ACK_STATUS_ACCEPTED,
                current_version=self.learner.version,
            )

    def _validate_group(self, group: pb.TrajectoryGroup) -> Submission:
        """Every field of a group against the run's limits; the lease itself is checked by `Learner.submit`."""
        learner = self.learner
        config = learner.config
        size = group.ByteSize()
        _require(
            size <= self.max_group_bytes,
            f"group message is {size} bytes; a valid group of G={config.group_size} and at most "
            f"{config.max_new_tokens} tokens per completion is at most {self.max_group_bytes}",
            "message_size",
        )
        _check_name(group.lease_id, "lease_id")
        newest = learner.version
        _require(
            1 <= group.policy_version <= newest,
            f"policy_version {group.policy_version} is not a published version (newest is {newest})",
            "policy_version",
        )
        # Every lease of a run asks for the run's group size (PromptLease.group_size).
        _require(
            len(group.completions) == config.group_size,
            f"a group holds exactly {config.group_size} completions (the lease's group size), "
            f"got {len(group.completions)}",
            "group_size",
        )
        _require(
            math.isfinite(group.generation_seconds) and group.generation_seconds >= 0,
            f"generation_seconds must be finite and >= 0, got {group.generation_seconds}",
            "generation_seconds",
        )
        completions = []
        for i, comp in enumerate(group.completions):
            n = len(comp.token_ids)
            _require(
                1 <= n <= config.max_new_tokens,
                f"completion {i}: {n} tokens, allowed 1..{config.max_new_tokens}",
                "token_count",
            )
            _require(
                len(comp.logprobs) == n,
                f"completion {i}: {len(comp.logprobs)} log-probs for {n} tokens",
                "logprob_count",
            )
            tokens = list(comp.token_ids)
            top = max(tokens)
            _require(
                top < learner.vocab_size,
                f"completion {i}: token id {top} outside the vocabulary of {learner.vocab_size}",
                "token_id",
            )
            logprobs = list(comp.logprobs)
            _require(
                all(math.isfinite(x) and x <= LOGPROB_TOLERANCE for x in logprobs),
                f"completion {i}: log-probs must be finite and <= 0",
                "logprob",
            )
            _require(
                comp.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH),
                f"completion {i}: finish_reason must be STOP or LENGTH, got {comp.finish_reason}",
                "finish_reason",
            )
            claimed = comp.sampler_reward if comp.HasField("sampler_reward") else None
            _require(
                claimed is None or math.isfinite(claimed),
                f"completion {i}: sampler_reward not finite",
                "sampler_reward",
            )
            completions.append((tokens, [min(x, 0.0) for x in logprobs], comp.finish_reason, claimed))
        return Submission(
            sampler_id=group.sampler_id,
            lease_id=group.lease_id,
            policy_version=group.policy_version,
            completions=completions,
        )

    def Heartbeat(self, request: pb.HeartbeatRequest, context):
        self._caller(request.sampler_id, context)
        if request.version > self.learner.version:
            self._refuse(
                context,
                InvalidInput(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"version {request.version} is newer than the newest version {self.learner.version}",
                    "heartbeat_version",
                ),
                request.sampler_id,
            )
        self.learner.heartbeat(request.sampler_id, request.version)
        return pb.HeartbeatReply(current_version=self.learner.version)

    def Status(self, request: pb.StatusRequest, context):
        self._anonymous_rate(context, "Status")
        s = self.learner.status()
        samplers = [
            pb.SamplerStatus(
                sampler_id=r["sampler_id"],
                name=r["name"],
                engine=r["engine"],
                device=r["device"],
                version=r["version"],
                groups_leased=r["groups_leased"],
                groups_accepted=r["groups_accepted"],
                groups_rejected=r["groups_rejected"],
                last_seen_s_ago=r["last_seen_s_ago"],
                alive=r["alive"],
                rejections=r.get("rejections", {}),
                principal=r.get("principal", ""),
                quarantined=r.get("quarantined", False),
                logprob_checked=r.get("logprob_checked", 0),
                logprob_mismatched=r.get("logprob_mismatched", 0),
                logprob_mean_diff=r.get("logprob_mean_diff", 0.0),
            )
            for r in s.pop("samplers")
        ]
        known = set(pb.StatusReply.DESCRIPTOR.fields_by_name)
        return pb.StatusReply(
            samplers=samplers,
            rejections=self.refusals.snapshot(),
            security=self.security.describe(),
            **{k: v for k, v in s.items() if k in known},
        )


def build_server(
    learner: Learner, host: str, port: int, max_workers: int = 16, security: ServerSecurity | None = None
) -> tuple[grpc.Server, int]:
    """A ready (not yet started) gRPC server with the Learner, health and reflection services.

    `security` defaults to what `learner.config` names (tokens, TLS, limits); a non-loopback `host` without
    authentication is refused (ValueError) unless the security setting says insecure.
    """
    if security is None:
        security = ServerSecurity.from_config(learner.config, log=learner.log)
    for warning in security.check_bind(host):
        learner.log(f"warning: {warning}")
    service = LearnerService(learner, security)
    # The largest valid request is a trajectory group; refuse bigger messages before they are read into memory.
    receive_limit = min(MAX_MESSAGE_BYTES, max(1 << 20, 2 * service.max_group_bytes))
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
