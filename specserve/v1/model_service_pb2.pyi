from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model", "vocab_size", "max_context_tokens", "eos_token_ids", "dtype", "active_sessions", "max_sessions", "needs_target_hidden_states", "medusa_num_heads", "cost_profile", "batch_token_budget", "mean_batch_tokens", "queued_ops", "engine", "quantization", "device")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NEEDS_TARGET_HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    MEDUSA_NUM_HEADS_FIELD_NUMBER: _ClassVar[int]
    COST_PROFILE_FIELD_NUMBER: _ClassVar[int]
    BATCH_TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    MEAN_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_OPS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    model: str
    vocab_size: int
    max_context_tokens: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    active_sessions: int
    max_sessions: int
    needs_target_hidden_states: bool
    medusa_num_heads: int
    cost_profile: CostProfile
    batch_token_budget: int
    mean_batch_tokens: float
    queued_ops: int
    engine: str
    quantization: str
    device: str
    def __init__(self, model: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_context_tokens: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., active_sessions: _Optional[int] = ..., max_sessions: _Optional[int] = ..., needs_target_hidden_states: _Optional[bool] = ..., medusa_num_heads: _Optional[int] = ..., cost_profile: _Optional[_Union[CostProfile, _Mapping]] = ..., batch_token_budget: _Optional[int] = ..., mean_batch_tokens: _Optional[float] = ..., queued_ops: _Optional[int] = ..., engine: _Optional[str] = ..., quantization: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class CostProfile(_message.Message):
    __slots__ = ("verify_chain", "verify_tree", "draft_step", "draft_tree_level", "cpu", "cpu_flags", "threads", "memory_gb_s", "matmul_gflop_s", "measured_ms", "from_cache")
    VERIFY_CHAIN_FIELD_NUMBER: _ClassVar[int]
    VERIFY_TREE_FIELD_NUMBER: _ClassVar[int]
    DRAFT_STEP_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TREE_LEVEL_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    CPU_FLAGS_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_GB_S_FIELD_NUMBER: _ClassVar[int]
    MATMUL_GFLOP_S_FIELD_NUMBER: _ClassVar[int]
    MEASURED_MS_FIELD_NUMBER: _ClassVar[int]
    FROM_CACHE_FIELD_NUMBER: _ClassVar[int]
    verify_chain: _containers.RepeatedCompositeFieldContainer[ForwardCost]
    verify_tree: _containers.RepeatedCompositeFieldContainer[ForwardCost]
    draft_step: _containers.RepeatedCompositeFieldContainer[ForwardCost]
    draft_tree_level: _containers.RepeatedCompositeFieldContainer[ForwardCost]
    cpu: str
    cpu_flags: _containers.RepeatedScalarFieldContainer[str]
    threads: int
    memory_gb_s: float
    matmul_gflop_s: float
    measured_ms: float
    from_cache: bool
    def __init__(self, verify_chain: _Optional[_Iterable[_Union[ForwardCost, _Mapping]]] = ..., verify_tree: _Optional[_Iterable[_Union[ForwardCost, _Mapping]]] = ..., draft_step: _Optional[_Iterable[_Union[ForwardCost, _Mapping]]] = ..., draft_tree_level: _Optional[_Iterable[_Union[ForwardCost, _Mapping]]] = ..., cpu: _Optional[str] = ..., cpu_flags: _Optional[_Iterable[str]] = ..., threads: _Optional[int] = ..., memory_gb_s: _Optional[float] = ..., matmul_gflop_s: _Optional[float] = ..., measured_ms: _Optional[float] = ..., from_cache: _Optional[bool] = ...) -> None: ...

class ForwardCost(_message.Message):
    __slots__ = ("context_tokens", "new_tokens", "ms", "bytes_read", "flops")
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MS_FIELD_NUMBER: _ClassVar[int]
    BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    FLOPS_FIELD_NUMBER: _ClassVar[int]
    context_tokens: int
    new_tokens: int
    ms: float
    bytes_read: float
    flops: float
    def __init__(self, context_tokens: _Optional[int] = ..., new_tokens: _Optional[int] = ..., ms: _Optional[float] = ..., bytes_read: _Optional[float] = ..., flops: _Optional[float] = ...) -> None: ...
