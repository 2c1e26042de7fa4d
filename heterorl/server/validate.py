"""What a valid request is: every field the network sends, checked against the run's limits before it reaches the
learner, and turned into the learner's own types.

Each check that fails raises `Refused` with INVALID_ARGUMENT, a message naming the field and the limit, and the
`Reason` named after the field; the service answers with it and counts it. Who owns a sampler id or a lease, and
whether a lease is still live, is the learner's to decide (`Learner.sampler`, `Learner.submit`).
"""

from __future__ import annotations

import math

import grpc

from heterorl.common.contract import ENGINES, MAX_LEASE_BATCH, MAX_NAME_CHARS, RELAY_ENGINE, Reason
from heterorl.server.errors import Refused
from heterorl.server.ingest import Submission
from heterorl.v1 import learner_pb2 as pb

LOGPROB_TOLERANCE = 1e-3  # a log-prob may round a hair above 0 in low precision; more is a lie
FINISH_REASONS = (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)


def require(ok: bool, message: str, reason: Reason, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT,
            field: str | None = None) -> None:
    """Refuse with `reason` unless `ok`; the field named in the error details defaults to the reason's name."""
    if not ok:
        raise Refused(code, message, reason, field=field or reason.value)


def check_name(value: str, reason: Reason, limit: int = MAX_NAME_CHARS) -> None:
    """A name or id: 1..limit printable characters."""
    field = reason.value
    require(0 < len(value) <= limit, f"{field} must be 1..{limit} characters, got {len(value)}", reason)
    require(value.isprintable(), f"{field} must be printable text", reason)


def check_register(request: pb.RegisterRequest) -> None:
    check_name(request.name, Reason.NAME)
    engines = (*ENGINES, RELAY_ENGINE)
    require(request.engine in engines, f"engine must be one of {engines}, got {request.engine[:32]!r}", Reason.ENGINE)
    check_name(request.device, Reason.DEVICE)
    require(1 <= request.max_batch <= MAX_LEASE_BATCH,
            f"max_batch must be in 1..{MAX_LEASE_BATCH}, got {request.max_batch}", Reason.MAX_BATCH)
    require(len(request.client_version) <= MAX_NAME_CHARS,
            f"client_version longer than {MAX_NAME_CHARS} characters", Reason.CLIENT_VERSION)
    require(request.client_version.isprintable(), "client_version must be printable text", Reason.CLIENT_VERSION)


def check_max_groups(max_groups: int) -> None:
    require(1 <= max_groups <= MAX_LEASE_BATCH, f"max_groups must be in 1..{MAX_LEASE_BATCH}, got {max_groups}",
            Reason.MAX_GROUPS)


def max_group_bytes(group_size: int, max_new_tokens: int) -> int:
    """The largest valid TrajectoryGroup on the wire: ids of 64 characters (of up to 4 UTF-8 bytes), G completions
    of the longest length (a token id takes at most 5 bytes, a log-prob 4), framing and the optional fields.
    Anything bigger carries fields the protocol does not have. (Stated in learner.proto; keep the two alike.)"""
    return 1024 + group_size * (64 + 9 * max_new_tokens)


class GroupRules:
    """The limits a run puts on a trajectory group: group size, completion length, vocabulary, message size."""

    def __init__(self, group_size: int, max_new_tokens: int, vocab_size: int):
        self.group_size = group_size
        self.max_new_tokens = max_new_tokens
        self.vocab_size = vocab_size
        self.max_bytes = max_group_bytes(group_size, max_new_tokens)

    def submission(self, group: pb.TrajectoryGroup, newest_version: int) -> Submission:
        """Every field of `group` checked; the lease itself is checked by `Learner.submit`."""
        size = group.ByteSize()
        require(size <= self.max_bytes,
                f"group message is {size} bytes; a valid group of G={self.group_size} and at most "
                f"{self.max_new_tokens} tokens per completion is at most {self.max_bytes}", Reason.MESSAGE_SIZE)
        check_name(group.lease_id, Reason.LEASE_ID)
        require(1 <= group.policy_version <= newest_version,
                f"policy_version {group.policy_version} is not a published version (newest is {newest_version})",
                Reason.POLICY_VERSION)
        # Every lease of a run asks for the run's group size (PromptLease.group_size).
        require(len(group.completions) == self.group_size,
                f"a group holds exactly {self.group_size} completions (the lease's group size), "
                f"got {len(group.completions)}", Reason.GROUP_SIZE, field="completions")
        require(math.isfinite(group.generation_seconds) and group.generation_seconds >= 0,
                f"generation_seconds must be finite and >= 0, got {group.generation_seconds}",
                Reason.GENERATION_SECONDS)
        completions = [self._completion(i, c) for i, c in enumerate(group.completions)]
        return Submission(sampler_id=group.sampler_id, lease_id=group.lease_id,
                          policy_version=group.policy_version, completions=completions)

    def _completion(self, i: int, comp: pb.Completion) -> tuple[list[int], list[float], int, float | None]:
        where = f"completions[{i}]"
        n = len(comp.token_ids)
        require(1 <= n <= self.max_new_tokens, f"completion {i}: {n} tokens, allowed 1..{self.max_new_tokens}",
                Reason.TOKEN_COUNT, field=f"{where}.token_ids")
        require(len(comp.logprobs) == n, f"completion {i}: {len(comp.logprobs)} log-probs for {n} tokens",
                Reason.LOGPROB_COUNT, field=f"{where}.logprobs")
        tokens = list(comp.token_ids)
        top = max(tokens)
        require(top < self.vocab_size, f"completion {i}: token id {top} outside the vocabulary of {self.vocab_size}",
                Reason.TOKEN_ID, field=f"{where}.token_ids")
        logprobs = list(comp.logprobs)
        require(all(math.isfinite(x) and x <= LOGPROB_TOLERANCE for x in logprobs),
                f"completion {i}: log-probs must be finite and <= 0", Reason.LOGPROB, field=f"{where}.logprobs")
        require(comp.finish_reason in FINISH_REASONS,
                f"completion {i}: finish_reason must be STOP or LENGTH, got {comp.finish_reason}",
                Reason.FINISH_REASON, field=f"{where}.finish_reason")
        claimed = comp.sampler_reward if comp.HasField("sampler_reward") else None
        require(claimed is None or math.isfinite(claimed), f"completion {i}: sampler_reward not finite",
                Reason.SAMPLER_REWARD, field=f"{where}.sampler_reward")
        return tokens, [min(x, 0.0) for x in logprobs], comp.finish_reason, claimed
