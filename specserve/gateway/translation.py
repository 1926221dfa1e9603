"""OpenAI request bodies -> GenerateRequest, GenerateResponse -> OpenAI response bodies, gRPC
status -> OpenAI-style HTTP errors. No HTTP or gRPC I/O here: plain data in, plain data out."""

from __future__ import annotations

import re
from typing import Any, Literal

import grpc
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from specserve.v1 import common_pb2, orchestrator_pb2 as pb

METHODS = {name.lower(): value for name, value in pb.Method.items() if value}
METHOD_NAMES = {value: name.lower() for name, value in pb.Method.items()}
FINISH_REASONS = {pb.LENGTH: "length", pb.STOP: "stop", pb.EOS: "stop"}
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1


class GatewayError(Exception):
    """An error answered as OpenAI does: HTTP status and {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code
        self.headers = headers or {}  # e.g. Retry-After on a 429

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


# ---- request bodies --------------------------------------------------------------------------

class Speculation(BaseModel):
    """The extra body field `speculation`: our SpeculationParams, method by name."""

    model_config = ConfigDict(extra="forbid")
    method: str | None = None
    num_speculative_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)
    fixed_length: bool = False
    tree_nodes: int | None = Field(None, ge=0, le=UINT32_MAX)
    async_draft: Literal["off", "on", "auto"] | None = None  # draft the next step while the target verifies


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[TextPart] | None = None


class _Completion(BaseModel):
    # Fields we do not act on (user, metadata, logit_bias={} ...) are accepted and ignored,
    # as OpenAI-compatible servers do; those that would change the answer are refused below.
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=UINT32_MAX)  # an extension, as vLLM has it
    seed: int | None = Field(None, ge=0, le=UINT64_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    speculation: Speculation | None = None


class ChatCompletionBody(_Completion):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=UINT32_MAX)
    logprobs: bool = False
    tools: list[Any] | None = None


class CompletionBody(_Completion):
    prompt: str | list[str]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


def parse_body(kind: type[_Completion], body: Any) -> _Completion:
    """Validates a JSON body; the first problem becomes a 400 naming the parameter."""
    if not isinstance(body, dict):
        raise GatewayError(400, "the request body must be a JSON object")
    try:
        parsed = kind.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        param = _param_path(first["loc"])
        raise GatewayError(400, f"{param}: {first['msg']}", param=param) from None
    _refuse_unsupported(parsed)
    return parsed


def _param_path(loc) -> str:
    """("messages", 0, "role") -> "messages[0].role"; pydantic's union branch names dropped."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("str", "list[str]", "list[TextPart]", "function-after") or "[" in str(part):
            continue
        else:
            path += ("." if path else "") + str(part)
    return path


def _refuse_unsupported(body: _Completion) -> None:
    def refuse(param: str, why: str) -> None:
        raise GatewayError(400, f"{param}: {why}", param=param)

    if body.n != 1:
        refuse("n", f"only n=1 is supported (one choice per request), got {body.n}")
    if body.presence_penalty or body.frequency_penalty:
        refuse("presence_penalty" if body.presence_penalty else "frequency_penalty", "penalties are not supported; send 0")
    if isinstance(body, ChatCompletionBody):
        if body.logprobs:
            refuse("logprobs", "log probabilities are not supported")
        if body.tools:
            refuse("tools", "tool calling is not supported")
    if isinstance(body, CompletionBody):
        if body.logprobs:
            refuse("logprobs", "log probabilities are not supported")
        if body.echo:
            refuse("echo", "echo is not supported")
        if body.best_of not in (None, 1):
            refuse("best_of", f"only best_of=1 is supported, got {body.best_of}")
        if body.suffix:
            refuse("suffix", "suffix is not supported")


def _text_of(message: Message, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for j, part in enumerate(message.content):
        if part.type != "text" or part.text is None:
            raise GatewayError(400, f"messages[{index}].content[{j}]: only text parts are supported, got {part.type!r}",
                               param=f"messages[{index}].content")
        texts.append(part.text)
    return "".join(texts)


def to_generate_request(body: _Completion) -> pb.GenerateRequest:
    """The GenerateRequest for a validated chat or completion body."""
    sampling = common_pb2.SamplingParams(
        # OpenAI's default temperature is 1 (sampling); 0 asks for greedy decoding.
        temperature=1.0 if body.temperature is None else body.temperature,
        top_k=body.top_k or 0,
        stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
    )
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if max_tokens is not None:
        sampling.max_new_tokens = max_tokens
    if body.top_p is not None:
        sampling.top_p = body.top_p
    if body.seed is not None:
        sampling.seed = body.seed
    request = pb.GenerateRequest(sampling=sampling, speculation=_speculation(body.speculation))
    if isinstance(body, ChatCompletionBody):
        for i, message in enumerate(body.messages):
            # OpenAI's newer "developer" role is what the chat templates call "system".
            role = "system" if message.role == "developer" else message.role
            request.messages.append(pb.ChatMessage(role=role, content=_text_of(message, i)))
    else:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise GatewayError(400, f"prompt: exactly one prompt per request is supported, got {len(prompts)}", param="prompt")
        request.prompt = prompts[0]
    return request


def _speculation(params: Speculation | None) -> pb.SpeculationParams:
    speculation = pb.SpeculationParams()
    if params is None:
        return speculation
    if params.method is not None:
        method = METHODS.get(params.method.lower())
        if method is None:
            raise GatewayError(400, f"speculation.method: must be one of {', '.join(sorted(METHODS))}, got {params.method!r}",
                               param="speculation.method")
        speculation.method = method
    if params.num_speculative_tokens is not None:
        speculation.num_speculative_tokens = params.num_speculative_tokens
    if params.tree_nodes is not None:
        speculation.tree_nodes = params.tree_nodes
    speculation.fixed_length = params.fixed_length
    if params.async_draft is not None:
        speculation.async_draft = pb.AsyncDraft.Value(f"ASYNC_DRAFT_{params.async_draft.upper()}")
    return speculation


# ---- responses -------------------------------------------------------------------------------

def usage(stats: pb.GenerationStats) -> dict[str, int]:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens}


def speculation_stats(stats: pb.GenerationStats) -> dict[str, Any]:
    """Our acceptance figures for one request, next to OpenAI's usage."""
    return {
        "method": METHOD_NAMES.get(stats.method, "unknown"),
        "proposed_tokens": stats.proposed_tokens,
        "accepted_tokens": stats.accepted_tokens,
        "acceptance_rate": stats.accepted_tokens / stats.proposed_tokens if stats.proposed_tokens else 0.0,
        "mean_accepted_length": stats.mean_accepted_length,
        "target_forward_passes": stats.target_forward_passes,
        "draft_forward_passes": stats.draft_forward_passes,
        "time_to_first_token_ms": stats.time_to_first_token_ms,
        "wall_time_ms": stats.wall_time_ms,
        "async_draft": stats.async_draft,  # some step was drafted while the target verified the one before
    }


def token_marks(response: pb.GenerateResponse) -> dict[str, int]:
    """Per streamed chunk: its tokens, how many were accepted proposals, and their text's length."""
    return {"tokens": len(response.token_ids), "proposed_tokens": response.proposed_tokens,
            "accepted_tokens": response.accepted_tokens, "accepted_text_length": response.accepted_text_length}


def chat_completion(ident: str, created: int, model: str, text: str, last: pb.GenerateResponse) -> dict[str, Any]:
    return {
        "id": ident, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": FINISH_REASONS.get(last.finish_reason, "stop")}],
        "usage": usage(last.stats), "speculation": speculation_stats(last.stats),
    }


def text_completion(ident: str, created: int, model: str, text: str, last: pb.GenerateResponse) -> dict[str, Any]:
    return {
        "id": ident, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": FINISH_REASONS.get(last.finish_reason, "stop")}],
        "usage": usage(last.stats), "speculation": speculation_stats(last.stats),
    }


def chunk(chat: bool, ident: str, created: int, model: str, text: str | None, response: pb.GenerateResponse | None,
          role: bool = False) -> dict[str, Any]:
    """One streamed chunk: the text of one GenerateResponse (with its token marks), or the
    opening chunk of a chat (role only). The chunk that finishes carries our stats too."""
    finish = FINISH_REASONS.get(response.finish_reason) if response is not None and response.finish_reason else None
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {"content": text}
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    out: dict[str, Any] = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                           "created": created, "model": model, "choices": [choice]}
    if response is not None:
        out["token_marks"] = token_marks(response)
        if response.HasField("stats"):
            out["speculation"] = speculation_stats(response.stats)
    return out


def usage_chunk(chat: bool, ident: str, created: int, model: str, stats: pb.GenerationStats) -> dict[str, Any]:
    """The chunk after the last one when stream_options.include_usage is set: no choices, usage."""
    return {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [], "usage": usage(stats), "speculation": speculation_stats(stats)}


# ---- errors ----------------------------------------------------------------------------------

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# Our field names in the orchestrator's messages, as the OpenAI parameters that set them.
_PARAMS = {"sampling.max_new_tokens": "max_tokens", "sampling.temperature": "temperature", "sampling.top_p": "top_p",
           "sampling.top_k": "top_k", "sampling.stop": "stop", "sampling.seed": "seed"}
_FIELD = re.compile(r"^([a-z_]+(?:\.[a-z_]+)*(?:\[\d+\](?:\.[a-z_]+)*)?)(?:, [a-z_.]+)*: ")


def from_grpc_error(code: grpc.StatusCode, details: str, retry_after_ms: int | None = None) -> GatewayError:
    """An OpenAI-style error for a failed Generate call: the status mapped, the field named, and
    the server's retry-after-ms (trailing metadata of RESOURCE_EXHAUSTED) as a Retry-After header."""
    status = HTTP_STATUS.get(code, 500)
    headers = {"Retry-After": str(max(1, -(-retry_after_ms // 1000)))} if retry_after_ms is not None else None
    match = _FIELD.match(details or "")
    param, message = None, details or code.name
    if match:
        param = _PARAMS.get(match.group(1), match.group(1))
        message = param + details[len(match.group(1)):]  # named as the client named it
    return GatewayError(status, message, param=param, code=code.name.lower(), headers=headers)

