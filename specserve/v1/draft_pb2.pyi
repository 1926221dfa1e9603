from specserve.v1 import common_pb2 as _common_pb2
from specserve.v1 import model_service_pb2 as _model_service_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DraftStart(_message.Message):
    __slots__ = ("prompt_token_ids", "sampling", "seed")
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    seed: int
    def __init__(self, prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., seed: _Optional[int] = ...) -> None: ...

class TreeShape(_message.Message):
    __slots__ = ("depth", "width", "branch", "nodes")
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    depth: int
    width: int
    branch: int
    nodes: int
    def __init__(self, depth: _Optional[int] = ..., width: _Optional[int] = ..., branch: _Optional[int] = ..., nodes: _Optional[int] = ...) -> None: ...

class DraftPropose(_message.Message):
    __slots__ = ("committed_len", "token_ids", "num_tokens", "hidden_states", "tree")
    COMMITTED_LEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    TREE_FIELD_NUMBER: _ClassVar[int]
    committed_len: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    num_tokens: int
    hidden_states: _common_pb2.HiddenStates
    tree: TreeShape
    def __init__(self, committed_len: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., num_tokens: _Optional[int] = ..., hidden_states: _Optional[_Union[_common_pb2.HiddenStates, _Mapping]] = ..., tree: _Optional[_Union[TreeShape, _Mapping]] = ...) -> None: ...

class OutcomeGuesses(_message.Message):
    __slots__ = ("accepted", "guesses")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    GUESSES_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    guesses: int
    def __init__(self, accepted: _Optional[int] = ..., guesses: _Optional[int] = ...) -> None: ...

class DraftSpeculate(_message.Message):
    __slots__ = ("committed_len", "token_ids", "proposal_len", "outcomes", "num_tokens")
    COMMITTED_LEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROPOSAL_LEN_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    committed_len: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    proposal_len: int
    outcomes: _containers.RepeatedCompositeFieldContainer[OutcomeGuesses]
    num_tokens: int
    def __init__(self, committed_len: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., proposal_len: _Optional[int] = ..., outcomes: _Optional[_Iterable[_Union[OutcomeGuesses, _Mapping]]] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class DraftRequest(_message.Message):
    __slots__ = ("op_id", "start", "propose", "speculate")
    OP_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    PROPOSE_FIELD_NUMBER: _ClassVar[int]
    SPECULATE_FIELD_NUMBER: _ClassVar[int]
    op_id: int
    start: DraftStart
    propose: DraftPropose
    speculate: DraftSpeculate
    def __init__(self, op_id: _Optional[int] = ..., start: _Optional[_Union[DraftStart, _Mapping]] = ..., propose: _Optional[_Union[DraftPropose, _Mapping]] = ..., speculate: _Optional[_Union[DraftSpeculate, _Mapping]] = ...) -> None: ...

class DraftOutcome(_message.Message):
    __slots__ = ("accepted", "token_id", "context_len", "token_ids")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    token_id: int
    context_len: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, accepted: _Optional[int] = ..., token_id: _Optional[int] = ..., context_len: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DraftResponse(_message.Message):
    __slots__ = ("op_id", "token_ids", "probs", "forward_passes", "compute_ms", "parents", "outcomes")
    OP_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    op_id: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    probs: _containers.RepeatedCompositeFieldContainer[_common_pb2.SparseDistribution]
    forward_passes: int
    compute_ms: float
    parents: _containers.RepeatedScalarFieldContainer[int]
    outcomes: _containers.RepeatedCompositeFieldContainer[DraftOutcome]
    def __init__(self, op_id: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., probs: _Optional[_Iterable[_Union[_common_pb2.SparseDistribution, _Mapping]]] = ..., forward_passes: _Optional[int] = ..., compute_ms: _Optional[float] = ..., parents: _Optional[_Iterable[int]] = ..., outcomes: _Optional[_Iterable[_Union[DraftOutcome, _Mapping]]] = ...) -> None: ...
