"""A small client of the public API, used by the CLI, the demo and the benchmark."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from specserve.serving.grpc_server import CHANNEL_OPTIONS
from specserve.v1 import common_pb2, orchestrator_pb2 as pb, orchestrator_pb2_grpc

METHODS = {name.lower(): value for name, value in pb.Method.items() if value}


def build_request(
    prompt: str | None = None,
    messages: list[dict[str, str]] | None = None,
    method: str | None = None,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int = 0,
    seed: int | None = None,
    stop: list[str] | None = None,
    num_speculative_tokens: int | None = None,
    fixed_length: bool = False,
    tree_nodes: int | None = None,
    medusa_choices: list[list[int]] | None = None,
    typical_acceptance: bool = False,
    posterior_threshold: float | None = None,
    posterior_alpha: float | None = None,
    lookahead_window: int | None = None,
    lookahead_ngram: int | None = None,
    lookahead_guesses: int | None = None,
    async_draft: str | None = None,
) -> pb.GenerateRequest:
    sampling = common_pb2.SamplingParams(temperature=temperature, top_k=top_k, stop=stop or [])
    if max_new_tokens is not None:
        sampling.max_new_tokens = max_new_tokens
    if top_p is not None:
        sampling.top_p = top_p
    if seed is not None:
        sampling.seed = seed
    speculation = pb.SpeculationParams(method=METHODS[method] if method else 0, fixed_length=fixed_length)
    if num_speculative_tokens is not None:
        speculation.num_speculative_tokens = num_speculative_tokens
    if tree_nodes is not None:
        speculation.tree_nodes = tree_nodes
    # MEDUSA: the candidate tree (None: the server's default) and the lossy, opt-in typical acceptance.
    speculation.medusa.typical_acceptance = typical_acceptance
    for path in medusa_choices or []:
        speculation.medusa.choices.add(ranks=list(path))
    if posterior_threshold is not None:
        speculation.medusa.posterior_threshold = posterior_threshold
    if posterior_alpha is not None:
        speculation.medusa.posterior_alpha = posterior_alpha
    for name, value in (("lookahead_window", lookahead_window), ("lookahead_ngram", lookahead_ngram),
                        ("lookahead_guesses", lookahead_guesses)):
        if value is not None:
            setattr(speculation, name, value)
    if async_draft is not None:  # off, on, auto; None: the server's default
        speculation.async_draft = pb.AsyncDraft.Value(f"ASYNC_DRAFT_{async_draft.upper()}")
    return pb.GenerateRequest(
        prompt=prompt or "",
        messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages or []],
        sampling=sampling,
        speculation=speculation,
    )


@dataclass
class Generation:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: int = 0
    stats: pb.GenerationStats | None = None
    messages: int = 0


def connect(address: str, tls_ca: str | None = None) -> tuple[grpc.Channel, orchestrator_pb2_grpc.OrchestratorStub]:
    """A channel to the orchestrator: plaintext, or TLS checked against the CA file `tls_ca`."""
    if tls_ca:
        credentials = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
        channel = grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
    else:
        channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    return channel, orchestrator_pb2_grpc.OrchestratorStub(channel)


def generate(
    stub: orchestrator_pb2_grpc.OrchestratorStub,
    request: pb.GenerateRequest,
    on_text: Callable[[str], None] | None = None,
    timeout_s: float | None = None,
    token: str | None = None,
) -> Generation:
    """Runs one request to the end, calling on_text with each piece of text as it arrives.
    `token`: the bearer token, when the server requires one."""
    result = Generation()
    metadata = [("authorization", f"Bearer {token}")] if token else None
    for response in stub.Generate(request, timeout=timeout_s, metadata=metadata):
        result.messages += 1
        result.token_ids.extend(response.token_ids)
        result.text += response.text
        if on_text is not None and response.text:
            on_text(response.text)
        if response.finish_reason:
            result.finish_reason = response.finish_reason
            result.stats = response.stats
    return result


def describe(stats: pb.GenerationStats) -> str:
    return (
        f"{pb.Method.Name(stats.method)}: {stats.generated_tokens} tokens in {stats.wall_time_ms / 1e3:.2f} s "
        f"({stats.generated_tokens / max(stats.wall_time_ms / 1e3, 1e-9):.1f} tok/s), "
        f"{stats.target_forward_passes} target forward passes, "
        f"mean accepted length {stats.mean_accepted_length:.2f}, "
        f"accepted {stats.accepted_tokens}/{stats.proposed_tokens} proposed"
        + (f"; target on {served(stats.target)}" if stats.HasField("target") else "")
        + (f"; drafted ahead in {stats.pipelined_steps} steps, {stats.outcome_hits} verdicts matched a drafted outcome, "
           f"{_hidden(stats):.0%} of drafting hidden" if stats.async_draft else "")
        + (f"; drafted synchronously: {stats.synchronous_reason}" if stats.synchronous_reason else "")
    )


def served(model) -> str:
    """'torch float32' or 'llama.cpp Q4_1 (GGUF Q4_1)': what computed a response (a ServingModel)."""
    quantized = f" ({model.quantization})" if model.quantization not in ("", "none") else ""
    return f"{model.engine} {model.dtype}{quantized}"


def _hidden(stats: pb.GenerationStats) -> float:
    """The share of the draft's compute that ran while the target verified."""
    return 1.0 - stats.draft_exposed_ms / stats.draft_compute_ms if stats.draft_compute_ms else 0.0
