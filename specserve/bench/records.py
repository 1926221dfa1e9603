"""One generation's measurements, whichever way it ran."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# distributed_adaptive: the served stack with the cost-blind adaptive K instead of the
# cost-aware controller (a second orchestrator on the same services), for a side-by-side comparison.
MODES = ("distributed", "distributed_adaptive", "in_process", "hf", "llama_cpp")
# The peer every row is compared with: llama.cpp's own plain decoding of the same GGUF.
PEER = ("llama_cpp", "autoregressive")
METHODS = ("autoregressive", "prompt_lookup", "draft_model", "medusa", "lookahead")
BASELINE_METHOD = "autoregressive"


@dataclass
class RunRecord:
    mode: str  # one of MODES
    method: str  # one of METHODS (in "hf" mode: greedy, prompt_lookup_num_tokens, assistant_model)
    prompt_id: str
    category: str
    token_ids: list[int]  # generated, EOS excluded
    wall_s: float  # as the benchmark saw it: tokenization to last token
    decode_steps: int | None = None  # target forward passes after prefill; None: unknown
    proposed: int | None = None  # None: the method does not report it
    accepted: int | None = None
    # (wall_ms, compute_ms) per decoding step, when asked for.
    step_timings: list[tuple[float, float]] = field(default_factory=list)

    @property
    def generated_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def to_json(self, with_steps: bool = False) -> dict:
        data = asdict(self)
        if not with_steps:
            data.pop("step_timings")
        return data
