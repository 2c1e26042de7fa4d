"""What the learner and its samplers agree on besides the protobuf messages: limits, names, credentials, refusals.

The two daemons meet only on the wire. Everything either side must know about the other that `proto/` cannot say
lives here, once: the message and batch limits, the engine names, the credential metadata format, and the reasons
a call is refused. A refusal travels machine-readably with its gRPC status as a standard `google.rpc.ErrorInfo`
detail (domain `heterorl.v1`, reason one of `Reason`), so a sampler acts on the reason, never on message text.
"""

from __future__ import annotations

import enum
import re

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

# ---- limits ------------------------------------------------------------------------------------------------------

MAX_MESSAGE_BYTES = 16 << 20  # the largest message either side sends or accepts (weights travel in chunks)
MAX_LEASE_BATCH = 256  # most prompt groups one LeasePrompts call (and one Register's max_batch) may ask for
MAX_NAME_CHARS = 64  # sampler names, ids, lease ids, device strings
ENGINES = ("transformers", "vllm")  # generation engines a sampler may register with
RELAY_ENGINE = "relay"  # what a weight relay (heterorl-relay) registers as: it fetches weights, never leases

# ---- credentials -------------------------------------------------------------------------------------------------

METADATA_KEY = "authorization"  # the HTTP convention: `authorization: Bearer <token>` on every call
SCHEME = "bearer"
TOKEN_ENV = "HETERORL_TOKEN"  # where a sampler finds its token when no --token-file is given
TOKEN_RE = re.compile(r"[A-Za-z0-9._~+/=-]{16,512}")
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def check_token(token: str, where: str = "token") -> str:
    """The token if it is well formed (16..512 URL-safe/base64 characters, no ':'); ValueError otherwise."""
    if not TOKEN_RE.fullmatch(token):
        raise ValueError(
            f"{where}: a token must be 16..512 characters of A-Z a-z 0-9 . _ ~ + / = - "
            f"(got {len(token)} characters{'' if token.isprintable() else ', some not printable'})"
        )
    return token


def token_from_text(text: str, where: str) -> str:
    """The token in a sampler's token file or environment variable: `token` or `name:token`, comments allowed."""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            return check_token(line.split(":", 1)[1].strip() if ":" in line else line, where)
    raise ValueError(f"{where} holds no token")


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries `token`."""
    return ((METADATA_KEY, f"Bearer {token}"),)


# ---- refusals ----------------------------------------------------------------------------------------------------

ERROR_DOMAIN = "heterorl.v1"


class Reason(str, enum.Enum):
    """Why the learner refused a call. Sent as `ErrorInfo.reason`; counted per reason in `Status.rejections`.

    The values are part of the wire contract: add members, never rename one.
    """

    # who is calling
    TOKEN_MISSING = "token_missing"
    TOKEN_INVALID = "token_invalid"
    UNKNOWN_SAMPLER = "unknown_sampler"  # the id is not registered (the learner restarted without it?): Register
    NOT_OWNER = "not_owner"  # the id was registered with another credential; answered like UNKNOWN_SAMPLER
    RATE_LIMITED = "rate_limited"  # back off and retry
    # leases
    LEASE_UNKNOWN = "lease_unknown"
    LEASE_NOT_OWNED = "lease_not_owned"
    LEASE_RELEASED = "lease_released"  # expired and its prompt was leased again
    # versions
    VERSION_PRUNED = "version_pruned"  # not a violation: ask for the newest version
    WANT_VERSION = "want_version"
    OFFSET = "offset"
    HEARTBEAT_VERSION = "heartbeat_version"
    POLICY_VERSION = "policy_version"
    # fields of Register / LeasePrompts
    NAME = "name"
    ENGINE = "engine"
    DEVICE = "device"
    MAX_BATCH = "max_batch"
    CLIENT_VERSION = "client_version"
    MAX_GROUPS = "max_groups"
    SAMPLER_ID = "sampler_id"
    # fields of a trajectory group
    MESSAGE_SIZE = "message_size"
    LEASE_ID = "lease_id"
    GROUP_SIZE = "group_size"
    GENERATION_SECONDS = "generation_seconds"
    TOKEN_COUNT = "token_count"
    LOGPROB_COUNT = "logprob_count"
    TOKEN_ID = "token_id"
    LOGPROB = "logprob"
    FINISH_REASON = "finish_reason"
    SAMPLER_REWARD = "sampler_reward"
    # the learner's own trouble with a valid group
    REWARD_FAILED = "reward_failed"  # the run's reward function raised on this group
    REWARD_TIMEOUT = "reward_timeout"  # the run's reward function ran past its time limit
    LEARNER_STOPPING = "learner_stopping"  # it cannot store its state; keep the work and retry


def error_status(code: grpc.StatusCode, message: str, reason: Reason, **metadata: str) -> grpc.Status:
    """A gRPC status carrying `reason` as a `google.rpc.ErrorInfo` detail; pass it to `context.abort_with_status`."""
    info = error_details_pb2.ErrorInfo(reason=reason.value, domain=ERROR_DOMAIN, metadata=metadata)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    status.details.add().Pack(info)
    return rpc_status.to_status(status)


def refusal_reason(err: grpc.RpcError) -> Reason | None:
    """The `Reason` a learner attached to a failed call; None when it attached none (transport errors, old
    learners) or one this side does not know (a newer learner)."""
    if not isinstance(err, grpc.Call):
        return None
    try:
        status = rpc_status.from_call(err)
    except ValueError:  # trailers that contradict the status line: not ours
        return None
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == ERROR_DOMAIN:
                try:
                    return Reason(info.reason)
                except ValueError:
                    return None
    return None
