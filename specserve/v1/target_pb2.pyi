from specserve.v1 import common_pb2 as _common_pb2
from specserve.v1 import model_service_pb2 as _model_service_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TargetStart(_message.Message):
    __slots__ = ("prompt_token_ids", "sampling", "seed", "return_hidden_states", "medusa")
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    RETURN_HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    MEDUSA_FIELD_NUMBER: _ClassVar[int]
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    seed: int
    return_hidden_states: bool
    medusa: _common_pb2.MedusaParams
    def __init__(self, prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., seed: _Optional[int] = ..., return_hidden_states: _Optional[bool] = ..., medusa: _Optional[_Union[_common_pb2.MedusaParams, _Mapping]] = ...) -> None: ...

class TargetVerify(_message.Message):
    __slots__ = ("committed_len", "token_ids", "draft_probs", "parents")
    COMMITTED_LEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_PROBS_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    committed_len: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    draft_probs: _containers.RepeatedCompositeFieldContainer[_common_pb2.SparseDistribution]
    parents: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, committed_len: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., draft_probs: _Optional[_Iterable[_Union[_common_pb2.SparseDistribution, _Mapping]]] = ..., parents: _Optional[_Iterable[int]] = ...) -> None: ...

class TargetLookahead(_message.Message):
    __slots__ = ("committed_len", "pending_token", "window", "window_tokens", "candidate_tokens", "candidate_lengths")
    COMMITTED_LEN_FIELD_NUMBER: _ClassVar[int]
    PENDING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    WINDOW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    committed_len: int
    pending_token: int
    window: int
    window_tokens: _containers.RepeatedScalarFieldContainer[int]
    candidate_tokens: _containers.RepeatedScalarFieldContainer[int]
    candidate_lengths: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, committed_len: _Optional[int] = ..., pending_token: _Optional[int] = ..., window: _Optional[int] = ..., window_tokens: _Optional[_Iterable[int]] = ..., candidate_tokens: _Optional[_Iterable[int]] = ..., candidate_lengths: _Optional[_Iterable[int]] = ...) -> None: ...

class TargetRequest(_message.Message):
    __slots__ = ("op_id", "start", "verify", "lookahead")
    OP_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    VERIFY_FIELD_NUMBER: _ClassVar[int]
    LOOKAHEAD_FIELD_NUMBER: _ClassVar[int]
    op_id: int
    start: TargetStart
    verify: TargetVerify
    lookahead: TargetLookahead
    def __init__(self, op_id: _Optional[int] = ..., start: _Optional[_Union[TargetStart, _Mapping]] = ..., verify: _Optional[_Union[TargetVerify, _Mapping]] = ..., lookahead: _Optional[_Union[TargetLookahead, _Mapping]] = ...) -> None: ...

class TargetResponse(_message.Message):
    __slots__ = ("op_id", "token_ids", "accepted", "committed_len", "compute_ms", "hidden_states", "medusa_candidates", "lookahead_tokens", "batch_tokens")
    OP_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_LEN_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    MEDUSA_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    LOOKAHEAD_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    op_id: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    accepted: int
    committed_len: int
    compute_ms: float
    hidden_states: _common_pb2.HiddenStates
    medusa_candidates: MedusaCandidates
    lookahead_tokens: _containers.RepeatedScalarFieldContainer[int]
    batch_tokens: int
    def __init__(self, op_id: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., accepted: _Optional[int] = ..., committed_len: _Optional[int] = ..., compute_ms: _Optional[float] = ..., hidden_states: _Optional[_Union[_common_pb2.HiddenStates, _Mapping]] = ..., medusa_candidates: _Optional[_Union[MedusaCandidates, _Mapping]] = ..., lookahead_tokens: _Optional[_Iterable[int]] = ..., batch_tokens: _Optional[int] = ...) -> None: ...

class MedusaCandidates(_message.Message):
    __slots__ = ("token_ids", "parents")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    parents: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., parents: _Optional[_Iterable[int]] = ...) -> None: ...
