"""A Generate request validated into a job, within the server's limits; every error names the field at fault."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from specserve.core.errors import FailedPrecondition, InvalidArgument
from specserve.core.medusa_tree import POSTERIOR_ALPHA, POSTERIOR_THRESHOLD, build_medusa_tree, default_choices
from specserve.core.lookahead import LookaheadShape
from specserve.core.sampling import SamplingConfig
from specserve.core.tree import MAX_TREE_NODES, TreeShape
from specserve.v1 import common_pb2, orchestrator_pb2 as pb

METHOD_NAMES = {value: name for name, value in pb.Method.items()}
SPECULATIVE_METHODS = (pb.DRAFT_MODEL, pb.PROMPT_LOOKUP, pb.MEDUSA, pb.LOOKAHEAD)
ROLES = ("system", "user", "assistant")
ASYNC_DRAFT_MODES = ("off", "on", "auto")
_ASYNC_DRAFT = {pb.ASYNC_DRAFT_OFF: "off", pb.ASYNC_DRAFT_ON: "on", pb.ASYNC_DRAFT_AUTO: "auto"}
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


@dataclass(frozen=True)
class Limits:
    """The server's limits and defaults for requests."""

    max_new_tokens: int = 4096
    default_max_new_tokens: int = 256
    max_speculative_tokens: int = 32
    default_method: int = pb.PROMPT_LOOKUP
    # Starting K per method when the request gives none.
    default_k: dict[int, int] = field(default_factory=lambda: {pb.DRAFT_MODEL: 4, pb.PROMPT_LOOKUP: 8})
    # Trees a feature draft drafts for greedy requests (depth: the step's K): nodes when
    # the request gives none (0: chains), and how a tree grows (see TreeShape).
    tree_nodes: int = TreeShape.nodes
    tree_width: int = TreeShape.width
    tree_branch: int = TreeShape.branch
    # "cost": the cost-aware controller (core.controller) when the target reports a cost
    # profile; "adaptive": the cost-blind adaptive K it replaced (for comparisons).
    speculation_control: str = "cost"
    # LOOKAHEAD's window, n-gram length and guesses when the request gives none.
    lookahead: LookaheadShape = field(default_factory=LookaheadShape)
    # Asynchronous drafting when the request does not say (off, on, auto; see core/async_decode.py),
    # and the most outcomes of a verdict drafted ahead per step.
    async_draft: str = "auto"
    async_outcomes: int = 3

    def __post_init__(self) -> None:
        if self.async_draft not in ASYNC_DRAFT_MODES:
            raise ValueError(f"async_draft must be one of {', '.join(ASYNC_DRAFT_MODES)}, got {self.async_draft!r}")
        if not 1 <= self.async_outcomes <= 8:
            raise ValueError(f"async_outcomes must be in [1, 8], got {self.async_outcomes}")
        for name, low in (("tree_nodes", 0), ("tree_width", 1), ("tree_branch", 1)):
            value = getattr(self, name)
            if not low <= value <= MAX_TREE_NODES:
                raise ValueError(f"{name} must be in [{low}, {MAX_TREE_NODES}], got {value}")

    def tree_shape(self, nodes: int) -> TreeShape | None:
        """The shape of trees of `nodes` nodes (depth set per step); None (chains) for 0."""
        return TreeShape(width=self.tree_width, branch=self.tree_branch, nodes=nodes) if nodes else None


@dataclass(frozen=True)
class Job:
    prompt_ids: list[int]
    sampling: SamplingConfig
    seed: int | None
    method: int
    k: int  # starting speculation length (0 for AUTOREGRESSIVE)
    fixed_length: bool
    tree_nodes: int = 0  # nodes of a feature draft's trees for greedy requests; 0: chains
    medusa: object = None  # MEDUSA: the resolved MedusaParams for the target (choices filled in)
    lossy: bool = False  # a lossy acceptance rule runs (MEDUSA's typical acceptance, sampled)
    lookahead: LookaheadShape | None = None  # LOOKAHEAD's shape; None for other methods
    async_draft: str = "off"  # off, on or auto (the request's, else the server's)
    async_draft_asked: bool = False  # the request itself set async_draft


def tokenize(request: pb.GenerateRequest, tokenizer) -> list[int]:
    has_prompt, has_messages = bool(request.prompt), bool(request.messages)
    if has_prompt and has_messages:
        raise InvalidArgument("prompt, messages: set exactly one of them, not both")
    if not has_prompt and not has_messages:
        raise InvalidArgument("prompt: must not be empty (or give messages)")
    if has_prompt:
        return list(tokenizer(request.prompt)["input_ids"])
    for i, message in enumerate(request.messages):
        if message.role not in ROLES:
            raise InvalidArgument(f"messages[{i}].role: must be one of {', '.join(ROLES)}, got {message.role!r}")
    if getattr(tokenizer, "chat_template", None) is None:
        raise FailedPrecondition("messages: the model has no chat template; send a raw prompt")
    conversation = [{"role": m.role, "content": m.content} for m in request.messages]
    encoded = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def parse(request: pb.GenerateRequest, tokenizer, limits: Limits, max_context_tokens: int, has_draft: bool,
          medusa_heads: int = 0) -> Job:
    sampling = _sampling(request.sampling, limits)
    method, k, fixed = _speculation(request.speculation, limits, has_draft)
    medusa = None
    if method == pb.MEDUSA:
        medusa, k = _medusa(request.speculation, medusa_heads, sampling)
        fixed = True  # the tree's depth is the heads' reach
    tree_nodes = _tree_nodes(request.speculation, limits)
    prompt_ids = tokenize(request, tokenizer)
    if not prompt_ids:
        raise InvalidArgument("prompt: tokenizes to no tokens")
    if len(prompt_ids) >= max_context_tokens:
        raise InvalidArgument(
            f"prompt: {len(prompt_ids)} tokens leave no room in the context window of {max_context_tokens} tokens"
        )
    seed = request.sampling.seed if request.sampling.HasField("seed") else None
    lossy = medusa is not None and medusa.typical_acceptance and not sampling.greedy
    lookahead = _lookahead(request.speculation, limits) if method == pb.LOOKAHEAD else None
    asked = request.speculation.async_draft
    if asked and asked not in _ASYNC_DRAFT:
        raise InvalidArgument(f"speculation.async_draft: unknown value {asked}")
    async_draft = _ASYNC_DRAFT.get(asked, limits.async_draft)
    return Job(prompt_ids, sampling, seed, method, k, fixed, tree_nodes, medusa, lossy, lookahead, async_draft, bool(asked))


def _lookahead(params, limits: Limits) -> LookaheadShape:
    values = {}
    for name in ("window", "ngram", "guesses"):
        field_name = f"lookahead_{name}"
        values[name] = getattr(params, field_name) if params.HasField(field_name) else getattr(limits.lookahead, name)
    try:
        return LookaheadShape(**values)
    except ValueError as error:
        raise InvalidArgument(f"speculation.lookahead_{error}") from None


def _sampling(params, limits: Limits) -> SamplingConfig:
    max_new = params.max_new_tokens if params.HasField("max_new_tokens") else limits.default_max_new_tokens
    if not 1 <= max_new <= limits.max_new_tokens:
        raise InvalidArgument(f"sampling.max_new_tokens: must be in [1, {limits.max_new_tokens}], got {max_new}")
    if not math.isfinite(params.temperature) or params.temperature < 0:
        raise InvalidArgument(f"sampling.temperature: must be finite and >= 0 (0 means greedy), got {params.temperature}")
    top_p = params.top_p if params.HasField("top_p") else 1.0
    if not math.isfinite(top_p) or not 0.0 < top_p <= 1.0:
        raise InvalidArgument(f"sampling.top_p: must be in (0, 1], got {top_p}")
    # top_k at or beyond the vocabulary keeps every token: the filter is off (documented).
    if len(params.stop) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"sampling.stop: at most {MAX_STOP_STRINGS} stop strings, got {len(params.stop)}")
    for i, stop in enumerate(params.stop):
        if not 1 <= len(stop) <= MAX_STOP_CHARS:
            raise InvalidArgument(f"sampling.stop[{i}]: must hold 1 to {MAX_STOP_CHARS} characters, got {len(stop)}")
    return SamplingConfig(
        temperature=params.temperature, top_p=top_p, top_k=params.top_k, max_new_tokens=max_new, stop=tuple(params.stop)
    )


def _tree_nodes(params, limits: Limits) -> int:
    if not params.HasField("tree_nodes"):
        return limits.tree_nodes
    if params.tree_nodes > MAX_TREE_NODES:
        raise InvalidArgument(f"speculation.tree_nodes: must be in [0, {MAX_TREE_NODES}] (0: chains), got {params.tree_nodes}")
    return params.tree_nodes


def _medusa(params, heads: int, sampling: SamplingConfig):
    """(MedusaParams for the target with the choices resolved, K: the tree's depth or the chain's length)."""
    if heads == 0:
        raise FailedPrecondition("speculation.method: MEDUSA needs a target service with Medusa heads (--medusa), "
                                 "and the configured one has none")
    given = params.medusa
    choices = [list(path.ranks) for path in given.choices] or default_choices(heads)
    tree = build_medusa_tree(choices, heads, field="speculation.medusa.choices")
    threshold = given.posterior_threshold if given.HasField("posterior_threshold") else POSTERIOR_THRESHOLD
    alpha = given.posterior_alpha if given.HasField("posterior_alpha") else POSTERIOR_ALPHA
    if not 0.0 < threshold <= 1.0:
        raise InvalidArgument(f"speculation.medusa.posterior_threshold: must be in (0, 1], got {threshold}")
    if not 0.0 < alpha <= 1.0:
        raise InvalidArgument(f"speculation.medusa.posterior_alpha: must be in (0, 1], got {alpha}")
    resolved = common_pb2.MedusaParams(choices=[common_pb2.MedusaPath(ranks=list(c)) for c in tree.choices],
                               typical_acceptance=given.typical_acceptance, posterior_threshold=threshold,
                               posterior_alpha=alpha)
    chain = not sampling.greedy and not given.typical_acceptance
    return resolved, heads if chain else tree.depth


def _speculation(params, limits: Limits, has_draft: bool) -> tuple[int, int, bool]:
    method = params.method or limits.default_method
    if method not in METHOD_NAMES:
        raise InvalidArgument(f"speculation.method: unknown method {method}")
    if method == pb.DRAFT_MODEL and not has_draft:
        raise FailedPrecondition("speculation.method: DRAFT_MODEL needs a draft service, and none is configured")
    if params.HasField("num_speculative_tokens"):
        k = params.num_speculative_tokens
        if not 1 <= k <= limits.max_speculative_tokens:
            raise InvalidArgument(
                f"speculation.num_speculative_tokens: must be in [1, {limits.max_speculative_tokens}], got {k}"
            )
    else:
        k = limits.default_k.get(method, 0)
    if method in (pb.AUTOREGRESSIVE, pb.LOOKAHEAD):
        k = 0  # lookahead's step size is its shape (window, ngram, guesses)
    return method, k, params.fixed_length


def parse_shape(text: str) -> LookaheadShape:
    """'W,N,G' -> LookaheadShape (ValueError naming what is wrong)."""
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"lookahead: expected window,ngram,guesses as three integers, got {text!r}")
    window, ngram, guesses = (int(p) for p in parts)
    return LookaheadShape(window, ngram, guesses)
