from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]

class AckStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACK_STATUS_UNSPECIFIED: _ClassVar[AckStatus]
    ACK_STATUS_ACCEPTED: _ClassVar[AckStatus]
    ACK_STATUS_DUPLICATE: _ClassVar[AckStatus]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
ACK_STATUS_UNSPECIFIED: AckStatus
ACK_STATUS_ACCEPTED: AckStatus
ACK_STATUS_DUPLICATE: AckStatus

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "max_new_tokens", "stop")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class RunConfig(_message.Message):
    __slots__ = ("run_id", "model", "task", "reward", "group_size", "sampling", "vocab_size", "max_prompt_tokens", "lease_ttl_s", "weights_dtype", "task_options_json")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_DTYPE_FIELD_NUMBER: _ClassVar[int]
    TASK_OPTIONS_JSON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    model: str
    task: str
    reward: str
    group_size: int
    sampling: SamplingParams
    vocab_size: int
    max_prompt_tokens: int
    lease_ttl_s: float
    weights_dtype: str
    task_options_json: str
    def __init__(self, run_id: _Optional[str] = ..., model: _Optional[str] = ..., task: _Optional[str] = ..., reward: _Optional[str] = ..., group_size: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., vocab_size: _Optional[int] = ..., max_prompt_tokens: _Optional[int] = ..., lease_ttl_s: _Optional[float] = ..., weights_dtype: _Optional[str] = ..., task_options_json: _Optional[str] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("name", "engine", "device", "max_batch", "client_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    engine: str
    device: str
    max_batch: int
    client_version: str
    def __init__(self, name: _Optional[str] = ..., engine: _Optional[str] = ..., device: _Optional[str] = ..., max_batch: _Optional[int] = ..., client_version: _Optional[str] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("sampler_id", "run", "current_version")
    SAMPLER_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    sampler_id: str
    run: RunConfig
    current_version: int
    def __init__(self, sampler_id: _Optional[str] = ..., run: _Optional[_Union[RunConfig, _Mapping]] = ..., current_version: _Optional[int] = ...) -> None: ...

class ModelFilesRequest(_message.Message):
    __slots__ = ("sampler_id",)
    SAMPLER_ID_FIELD_NUMBER: _ClassVar[int]
    sampler_id: str
    def __init__(self, sampler_id: _Optional[str] = ...) -> None: ...

class ModelFile(_message.Message):
    __slots__ = ("name", "content")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    name: str
    content: bytes
    def __init__(self, name: _Optional[str] = ..., content: _Optional[bytes] = ...) -> None: ...

class ModelFiles(_message.Message):
    __slots__ = ("files", "files_sha256")
    FILES_FIELD_NUMBER: _ClassVar[int]
    FILES_SHA256_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedCompositeFieldContainer[ModelFile]
    files_sha256: str
    def __init__(self, files: _Optional[_Iterable[_Union[ModelFile, _Mapping]]] = ..., files_sha256: _Optional[str] = ...) -> None: ...

class LeaseRequest(_message.Message):
    __slots__ = ("sampler_id", "max_groups")
    SAMPLER_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_GROUPS_FIELD_NUMBER: _ClassVar[int]
    sampler_id: str
    max_groups: int
    def __init__(self, sampler_id: _Optional[str] = ..., max_groups: _Optional[int] = ...) -> None: ...

class PromptLease(_message.Message):
    __slots__ = ("lease_id", "prompt_id", "question", "prompt_token_ids", "group_size", "expires_at_unix")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    prompt_id: str
    question: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    group_size: int
    expires_at_unix: float
    def __init__(self, lease_id: _Optional[str] = ..., prompt_id: _Optional[str] = ..., question: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., group_size: _Optional[int] = ..., expires_at_unix: _Optional[float] = ...) -> None: ...

class LeaseReply(_message.Message):
    __slots__ = ("leases", "current_version", "refresh_below_version", "retry_after_s")
    LEASES_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    REFRESH_BELOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    leases: _containers.RepeatedCompositeFieldContainer[PromptLease]
    current_version: int
    refresh_below_version: int
    retry_after_s: float
    def __init__(self, leases: _Optional[_Iterable[_Union[PromptLease, _Mapping]]] = ..., current_version: _Optional[int] = ..., refresh_below_version: _Optional[int] = ..., retry_after_s: _Optional[float] = ...) -> None: ...

class FetchWeightsRequest(_message.Message):
    __slots__ = ("sampler_id", "have_version", "want_version", "offset")
    SAMPLER_ID_FIELD_NUMBER: _ClassVar[int]
    HAVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    WANT_VERSION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    sampler_id: str
    have_version: int
    want_version: int
    offset: int
    def __init__(self, sampler_id: _Optional[str] = ..., have_version: _Optional[int] = ..., want_version: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class WeightChunk(_message.Message):
    __slots__ = ("version", "base_version", "encoding", "total_bytes", "offset", "data", "chunk_sha256", "payload_sha256", "weights_sha256")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SHA256_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    version: int
    base_version: int
    encoding: str
    total_bytes: int
    offset: int
    data: bytes
    chunk_sha256: str
    payload_sha256: str
    weights_sha256: str
    def __init__(self, version: _Optional[int] = ..., base_version: _Optional[int] = ..., encoding: _Optional[str] = ..., total_bytes: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., chunk_sha256: _Optional[str] = ..., payload_sha256: _Optional[str] = ..., weights_sha256: _Optional[str] = ...) -> None: ...

class WeightsManifestRequest(_message.Message):
    __slots__ = ("sampler_id", "have_version", "want_version")
    SAMPLER_ID_FIELD_NUMBER: _ClassVar[int]
    HAVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    WANT_VERSION_FIELD_NUMBER: _ClassVar[int]
    sampler_id: str
    have_version: int
    want_version: int
    def __init__(self, sampler_id: _Optional[str] = ..., have_version: _Optional[int] = ..., want_version: _Optional[int] = ...) -> None: ...

class WeightsManifest(_message.Message):
    __slots__ = ("version", "base_version", "encoding", "total_bytes", "chunk_bytes", "chunk_sha256", "payload_sha256", "weights_sha256")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SHA256_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    version: int
    base_version: int
    encoding: str
    total_bytes: int
    chunk_bytes: int
    chunk_sha256: _containers.RepeatedScalarFieldContainer[str]
    payload_sha256: str
    weights_sha256: str
    def __init__(self, version: _Optional[int] = ..., base_version: _Optional[int] = ..., encoding: _Optional[str] = ..., total_bytes: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., chunk_sha256: _Optional[_Iterable[str]] = ..., payload_sha256: _Optional[str] = ..., weights_sha256: _Optional[str] = ...) -> None: ...

class Completion(_message.Message):
    __slots__ = ("token_ids", "logprobs", "finish_reason", "sampler_reward")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_REWARD_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    finish_reason: FinishReason
    sampler_reward: float
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., sampler_reward: _Optional[float] = ...) -> None: ...

class TrajectoryGroup(_message.Message):
    __slots__ = ("sampler_id", "lease_id", "policy_version", "completions", "generation_seconds")
    SAMPLER_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    sampler_id: str
    lease_id: str
    policy_version: int
    completions: _containers.RepeatedCompositeFieldContainer[Completion]
    generation_seconds: float
    def __init__(self, sampler_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., policy_version: _Optional[int] = ..., completions: _Optional[_Iterable[_Union[Completion, _Mapping]]] = ..., generation_seconds: _Optional[float] = ...) -> None: ...

class SubmitAck(_message.Message):
    __slots__ = ("lease_id", "status", "current_version")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    status: AckStatus
    current_version: int
    def __init__(self, lease_id: _Optional[str] = ..., status: _Optional[_Union[AckStatus, str]] = ..., current_version: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("sampler_id", "version")
    SAMPLER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    sampler_id: str
    version: int
    def __init__(self, sampler_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("current_version",)
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    current_version: int
    def __init__(self, current_version: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SamplerStatus(_message.Message):
    __slots__ = ("sampler_id", "name", "engine", "device", "version", "groups_leased", "groups_accepted", "groups_rejected", "last_seen_s_ago", "alive", "rejections", "principal", "quarantined", "logprob_checked", "logprob_mismatched", "logprob_mean_diff", "reward_disagreements")
    class RejectionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SAMPLER_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    GROUPS_LEASED_FIELD_NUMBER: _ClassVar[int]
    GROUPS_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    GROUPS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_S_AGO_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_CHECKED_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_MISMATCHED_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_MEAN_DIFF_FIELD_NUMBER: _ClassVar[int]
    REWARD_DISAGREEMENTS_FIELD_NUMBER: _ClassVar[int]
    sampler_id: str
    name: str
    engine: str
    device: str
    version: int
    groups_leased: int
    groups_accepted: int
    groups_rejected: int
    last_seen_s_ago: float
    alive: bool
    rejections: _containers.ScalarMap[str, int]
    principal: str
    quarantined: bool
    logprob_checked: int
    logprob_mismatched: int
    logprob_mean_diff: float
    reward_disagreements: int
    def __init__(self, sampler_id: _Optional[str] = ..., name: _Optional[str] = ..., engine: _Optional[str] = ..., device: _Optional[str] = ..., version: _Optional[int] = ..., groups_leased: _Optional[int] = ..., groups_accepted: _Optional[int] = ..., groups_rejected: _Optional[int] = ..., last_seen_s_ago: _Optional[float] = ..., alive: _Optional[bool] = ..., rejections: _Optional[_Mapping[str, int]] = ..., principal: _Optional[str] = ..., quarantined: _Optional[bool] = ..., logprob_checked: _Optional[int] = ..., logprob_mismatched: _Optional[int] = ..., logprob_mean_diff: _Optional[float] = ..., reward_disagreements: _Optional[int] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("run_id", "version", "step", "groups_trained", "groups_pending", "leases_outstanding", "leases_expired", "groups_dropped_stale", "samplers", "uptime_s", "last_reward_mean", "last_eval_accuracy", "task", "loss", "rejections", "security", "reward_disagreements", "groups_refused_reward")
    class RejectionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    GROUPS_TRAINED_FIELD_NUMBER: _ClassVar[int]
    GROUPS_PENDING_FIELD_NUMBER: _ClassVar[int]
    LEASES_OUTSTANDING_FIELD_NUMBER: _ClassVar[int]
    LEASES_EXPIRED_FIELD_NUMBER: _ClassVar[int]
    GROUPS_DROPPED_STALE_FIELD_NUMBER: _ClassVar[int]
    SAMPLERS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    LAST_REWARD_MEAN_FIELD_NUMBER: _ClassVar[int]
    LAST_EVAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    SECURITY_FIELD_NUMBER: _ClassVar[int]
    REWARD_DISAGREEMENTS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_REFUSED_REWARD_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    version: int
    step: int
    groups_trained: int
    groups_pending: int
    leases_outstanding: int
    leases_expired: int
    groups_dropped_stale: int
    samplers: _containers.RepeatedCompositeFieldContainer[SamplerStatus]
    uptime_s: float
    last_reward_mean: float
    last_eval_accuracy: float
    task: str
    loss: str
    rejections: _containers.ScalarMap[str, int]
    security: str
    reward_disagreements: int
    groups_refused_reward: int
    def __init__(self, run_id: _Optional[str] = ..., version: _Optional[int] = ..., step: _Optional[int] = ..., groups_trained: _Optional[int] = ..., groups_pending: _Optional[int] = ..., leases_outstanding: _Optional[int] = ..., leases_expired: _Optional[int] = ..., groups_dropped_stale: _Optional[int] = ..., samplers: _Optional[_Iterable[_Union[SamplerStatus, _Mapping]]] = ..., uptime_s: _Optional[float] = ..., last_reward_mean: _Optional[float] = ..., last_eval_accuracy: _Optional[float] = ..., task: _Optional[str] = ..., loss: _Optional[str] = ..., rejections: _Optional[_Mapping[str, int]] = ..., security: _Optional[str] = ..., reward_disagreements: _Optional[int] = ..., groups_refused_reward: _Optional[int] = ...) -> None: ...
