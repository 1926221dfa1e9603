from specserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Method(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METHOD_UNSPECIFIED: _ClassVar[Method]
    AUTOREGRESSIVE: _ClassVar[Method]
    DRAFT_MODEL: _ClassVar[Method]
    PROMPT_LOOKUP: _ClassVar[Method]
    MEDUSA: _ClassVar[Method]
    LOOKAHEAD: _ClassVar[Method]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    LENGTH: _ClassVar[FinishReason]
    STOP: _ClassVar[FinishReason]
    EOS: _ClassVar[FinishReason]

class AsyncDraft(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ASYNC_DRAFT_UNSPECIFIED: _ClassVar[AsyncDraft]
    ASYNC_DRAFT_OFF: _ClassVar[AsyncDraft]
    ASYNC_DRAFT_ON: _ClassVar[AsyncDraft]
    ASYNC_DRAFT_AUTO: _ClassVar[AsyncDraft]
METHOD_UNSPECIFIED: Method
AUTOREGRESSIVE: Method
DRAFT_MODEL: Method
PROMPT_LOOKUP: Method
MEDUSA: Method
LOOKAHEAD: Method
FINISH_REASON_UNSPECIFIED: FinishReason
LENGTH: FinishReason
STOP: FinishReason
EOS: FinishReason
ASYNC_DRAFT_UNSPECIFIED: AsyncDraft
ASYNC_DRAFT_OFF: AsyncDraft
ASYNC_DRAFT_ON: AsyncDraft
ASYNC_DRAFT_AUTO: AsyncDraft

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class SpeculationParams(_message.Message):
    __slots__ = ("method", "num_speculative_tokens", "fixed_length", "tree_nodes", "medusa", "lookahead_window", "lookahead_ngram", "lookahead_guesses", "async_draft")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    NUM_SPECULATIVE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FIXED_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TREE_NODES_FIELD_NUMBER: _ClassVar[int]
    MEDUSA_FIELD_NUMBER: _ClassVar[int]
    LOOKAHEAD_WINDOW_FIELD_NUMBER: _ClassVar[int]
    LOOKAHEAD_NGRAM_FIELD_NUMBER: _ClassVar[int]
    LOOKAHEAD_GUESSES_FIELD_NUMBER: _ClassVar[int]
    ASYNC_DRAFT_FIELD_NUMBER: _ClassVar[int]
    method: Method
    num_speculative_tokens: int
    fixed_length: bool
    tree_nodes: int
    medusa: _common_pb2.MedusaParams
    lookahead_window: int
    lookahead_ngram: int
    lookahead_guesses: int
    async_draft: AsyncDraft
    def __init__(self, method: _Optional[_Union[Method, str]] = ..., num_speculative_tokens: _Optional[int] = ..., fixed_length: _Optional[bool] = ..., tree_nodes: _Optional[int] = ..., medusa: _Optional[_Union[_common_pb2.MedusaParams, _Mapping]] = ..., lookahead_window: _Optional[int] = ..., lookahead_ngram: _Optional[int] = ..., lookahead_guesses: _Optional[int] = ..., async_draft: _Optional[_Union[AsyncDraft, str]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "messages", "sampling", "speculation", "include_step_timings")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SPECULATION_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_STEP_TIMINGS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    sampling: _common_pb2.SamplingParams
    speculation: SpeculationParams
    include_step_timings: bool
    def __init__(self, prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., speculation: _Optional[_Union[SpeculationParams, _Mapping]] = ..., include_step_timings: _Optional[bool] = ...) -> None: ...

class StepTiming(_message.Message):
    __slots__ = ("wall_ms", "compute_ms", "proposed", "accepted")
    WALL_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    PROPOSED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    wall_ms: float
    compute_ms: float
    proposed: int
    accepted: int
    def __init__(self, wall_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., proposed: _Optional[int] = ..., accepted: _Optional[int] = ...) -> None: ...

class GenerationStats(_message.Message):
    __slots__ = ("prompt_tokens", "generated_tokens", "target_forward_passes", "proposed_tokens", "accepted_tokens", "wall_time_ms", "mean_accepted_length", "time_to_first_token_ms", "method", "draft_forward_passes", "step_timings", "failovers", "lossy", "target", "draft", "async_draft", "synchronous_reason", "outcomes_drafted", "outcome_hits", "stale_outcomes", "draft_compute_ms", "draft_exposed_ms", "pipelined_steps")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FORWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    PROPOSED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    MEAN_ACCEPTED_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FORWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    STEP_TIMINGS_FIELD_NUMBER: _ClassVar[int]
    FAILOVERS_FIELD_NUMBER: _ClassVar[int]
    LOSSY_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    ASYNC_DRAFT_FIELD_NUMBER: _ClassVar[int]
    SYNCHRONOUS_REASON_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_DRAFTED_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_HITS_FIELD_NUMBER: _ClassVar[int]
    STALE_OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    DRAFT_COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_EXPOSED_MS_FIELD_NUMBER: _ClassVar[int]
    PIPELINED_STEPS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    generated_tokens: int
    target_forward_passes: int
    proposed_tokens: int
    accepted_tokens: int
    wall_time_ms: float
    mean_accepted_length: float
    time_to_first_token_ms: float
    method: Method
    draft_forward_passes: int
    step_timings: _containers.RepeatedCompositeFieldContainer[StepTiming]
    failovers: int
    lossy: bool
    target: _common_pb2.ServingModel
    draft: _common_pb2.ServingModel
    async_draft: bool
    synchronous_reason: str
    outcomes_drafted: int
    outcome_hits: int
    stale_outcomes: int
    draft_compute_ms: float
    draft_exposed_ms: float
    pipelined_steps: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., target_forward_passes: _Optional[int] = ..., proposed_tokens: _Optional[int] = ..., accepted_tokens: _Optional[int] = ..., wall_time_ms: _Optional[float] = ..., mean_accepted_length: _Optional[float] = ..., time_to_first_token_ms: _Optional[float] = ..., method: _Optional[_Union[Method, str]] = ..., draft_forward_passes: _Optional[int] = ..., step_timings: _Optional[_Iterable[_Union[StepTiming, _Mapping]]] = ..., failovers: _Optional[int] = ..., lossy: _Optional[bool] = ..., target: _Optional[_Union[_common_pb2.ServingModel, _Mapping]] = ..., draft: _Optional[_Union[_common_pb2.ServingModel, _Mapping]] = ..., async_draft: _Optional[bool] = ..., synchronous_reason: _Optional[str] = ..., outcomes_drafted: _Optional[int] = ..., outcome_hits: _Optional[int] = ..., stale_outcomes: _Optional[int] = ..., draft_compute_ms: _Optional[float] = ..., draft_exposed_ms: _Optional[float] = ..., pipelined_steps: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token_ids", "text", "finish_reason", "stats", "accepted_tokens", "accepted_text_length", "proposed_tokens")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_TEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PROPOSED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finish_reason: FinishReason
    stats: GenerationStats
    accepted_tokens: int
    accepted_text_length: int
    proposed_tokens: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., stats: _Optional[_Union[GenerationStats, _Mapping]] = ..., accepted_tokens: _Optional[int] = ..., accepted_text_length: _Optional[int] = ..., proposed_tokens: _Optional[int] = ...) -> None: ...
