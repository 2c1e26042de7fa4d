"""The gRPC face of the learner: validate every field, translate to the learner's types, answer precisely.

Nothing from the network reaches `Learner` unchecked. Each refusal is a gRPC status with a message that names
the field and the limit, the offending sampler's rejection count goes up, and the server keeps serving.
"""

from __future__ import annotations

import hashlib
import math
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from heterorl.common.weights import iter_chunks
from heterorl.server.leases import LeaseError
from heterorl.server.learner import Learner, Submission
from heterorl.v1 import learner_pb2 as pb
from heterorl.v1 import learner_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Learner"].full_name
MAX_MESSAGE_BYTES = 16 << 20
ENGINES = ("transformers", "vllm")
MAX_LEASE_BATCH = 256
LOGPROB_TOLERANCE = 1e-3  # a log-prob may round a hair above 0 in low precision; more is a lie


class InvalidInput(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def _require(ok: bool, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> None:
    if not ok:
        raise InvalidInput(code, message)


def _lease_status(error: LeaseError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.code)


def _check_name(value: str, field: str, limit: int = 64) -> None:
    _require(0 < len(value) <= limit, f"{field} must be 1..{limit} characters, got {len(value)}")
    _require(value.isprintable(), f"{field} must be printable text")


class LearnerService(pb_grpc.LearnerServicer):
    def __init__(self, learner: Learner):
        self.learner = learner

    # -- helpers

    def _abort(self, context: grpc.ServicerContext, code: grpc.StatusCode, message: str, sampler_id: str = ""):
        if sampler_id:
            self.learner.count_rejection(sampler_id)
        context.abort(code, message)

    def _known_sampler(self, sampler_id: str, context: grpc.ServicerContext):
        try:
            _check_name(sampler_id, "sampler_id")
            return self.learner.sampler(sampler_id)
        except InvalidInput as err:
            context.abort(err.code, str(err))
        except LeaseError as err:
            context.abort(_lease_status(err), str(err))

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
        try:
            _check_name(request.name, "name")
            _require(request.engine in ENGINES, f"engine must be one of {ENGINES}, got {request.engine!r}")
            _check_name(request.device, "device")
            _require(
                1 <= request.max_batch <= MAX_LEASE_BATCH, f"max_batch must be in 1..{MAX_LEASE_BATCH}"
            )
            _require(len(request.client_version) <= 64, "client_version longer than 64 characters")
        except InvalidInput as err:
            context.abort(err.code, str(err))
        record = self.learner.register(request.name, request.engine, request.device, request.max_batch)
        return pb.RegisterReply(
            sampler_id=record.sampler_id, run=self._run_config(), current_version=self.learner.version
        )

    def GetModelFiles(self, request: pb.ModelFilesRequest, context):
        self._known_sampler(request.sampler_id, context)
        files = [pb.ModelFile(name=n, content=c) for n, c in self.learner.model_files.items()]
        digest = hashlib.sha256()
        for f in files:
            digest.update(f.name.encode() + b"\0" + hashlib.sha256(f.content).digest())
        return pb.ModelFiles(files=files, files_sha256=digest.hexdigest())

    def LeasePrompts(self, request: pb.LeaseRequest, context):
        self._known_sampler(request.sampler_id, context)
        if not 1 <= request.max_groups <= MAX_LEASE_BATCH:
            self._abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"max_groups must be in 1..{MAX_LEASE_BATCH}, got {request.max_groups}",
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
        self._known_sampler(request.sampler_id, context)
        newest = self.learner.version
        want = request.want_version or newest
        if want > newest:
            self._abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"want_version {want} is newer than the newest version {newest}",
                request.sampler_id,
            )
        try:
            payload = self.learner.versions.payload(request.have_version, want)
        except KeyError:
            self._abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"version {want} is no longer held (held: {self.learner.versions.held()}); ask for the newest",
            )
        total = len(payload.data)
        if request.offset > total:
            self._abort(
                context,
                grpc.StatusCode.OUT_OF_RANGE,
                f"offset {request.offset} is past the end of the {total}-byte payload of version {want}",
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
        for group in request_iterator:
            try:
                submission = self._validate_group(group)
                duplicate = self.learner.submit(submission)
            except InvalidInput as err:
                self._abort(context, err.code, f"lease {group.lease_id!r}: {err}", group.sampler_id)
            except LeaseError as err:
                self._abort(context, _lease_status(err), str(err), group.sampler_id)
            yield pb.SubmitAck(
                lease_id=group.lease_id,
                status=pb.ACK_STATUS_DUPLICATE if duplicate else pb.ACK_STATUS_ACCEPTED,
                current_version=self.learner.version,
            )

    def _validate_group(self, group: pb.TrajectoryGroup) -> Submission:
        learner = self.learner
        config = learner.config
        _check_name(group.sampler_id, "sampler_id")
        try:
            learner.sampler(group.sampler_id)
        except LeaseError as err:
            raise InvalidInput(_lease_status(err), str(err)) from None
        _check_name(group.lease_id, "lease_id")
        newest = learner.version
        _require(
            1 <= group.policy_version <= newest,
            f"policy_version {group.policy_version} is not a published version (newest is {newest})",
        )
        _require(
            len(group.completions) == config.group_size,
            f"a group holds exactly {config.group_size} completions, got {len(group.completions)}",
        )
        _require(math.isfinite(group.generation_seconds), "generation_seconds must be finite")
        completions = []
        for i, comp in enumerate(group.completions):
            n = len(comp.token_ids)
            _require(
                1 <= n <= config.max_new_tokens,
                f"completion {i}: {n} tokens, allowed 1..{config.max_new_tokens}",
            )
            _require(
                len(comp.logprobs) == n, f"completion {i}: {len(comp.logprobs)} log-probs for {n} tokens"
            )
            tokens = list(comp.token_ids)
            _require(
                max(tokens) < learner.vocab_size,
                f"completion {i}: token id {max(tokens)} outside the vocabulary of {learner.vocab_size}",
            )
            logprobs = list(comp.logprobs)
            _require(
                all(math.isfinite(x) and x <= LOGPROB_TOLERANCE for x in logprobs),
                f"completion {i}: log-probs must be finite and <= 0",
            )
            _require(
                comp.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH),
                f"completion {i}: finish_reason must be STOP or LENGTH",
            )
            claimed = comp.sampler_reward if comp.HasField("sampler_reward") else None
            _require(claimed is None or math.isfinite(claimed), f"completion {i}: sampler_reward not finite")
            completions.append((tokens, [min(x, 0.0) for x in logprobs], comp.finish_reason, claimed))
        return Submission(
            sampler_id=group.sampler_id,
            lease_id=group.lease_id,
            policy_version=group.policy_version,
            completions=completions,
        )

    def Heartbeat(self, request: pb.HeartbeatRequest, context):
        self._known_sampler(request.sampler_id, context)
        if request.version > self.learner.version:
            self._abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"version {request.version} is newer than the newest version {self.learner.version}",
                request.sampler_id,
            )
        self.learner.heartbeat(request.sampler_id, request.version)
        return pb.HeartbeatReply(current_version=self.learner.version)

    def Status(self, request: pb.StatusRequest, context):
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
            )
            for r in s.pop("samplers")
        ]
        return pb.StatusReply(samplers=samplers, **s)


def build_server(learner: Learner, host: str, port: int, max_workers: int = 16) -> tuple[grpc.Server, int]:
    """A started-ready (not yet started) gRPC server with the Learner, health and reflection services."""
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),
        # Samplers ping every 30 s to keep idle links alive through NATs; gRPC's default server policy answers
        # such pings with GOAWAY too_many_pings and drops the connection.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options)
    pb_grpc.add_LearnerServicer_to_server(LearnerService(learner), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not bind the learner to {address}")
    return server, bound
