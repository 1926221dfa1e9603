"""What a forward pass costs here: measured once per (model, dtype, device, threads, CPU), cached.

A target service measures a forward over k new tokens for chains (logits for every
token) and trees (tree attention) at a few context lengths; a draft service one
drafting step (one token) and one tree level (w nodes). Each point also carries the
least bytes the forward reads (weights + KV cache) and its FLOPs, so `specserve
profile` can show how far each shape is from this machine's limits, which
`measure_limits` measures with torch: memory read bandwidth and matmul peak.

The measurement runs against an engine's session factory (`Engine.new_session`:
`extend`, `extend_tree`, `rollback`, `length`; a feature draft's sessions also take
its hidden states through `extend_masked`), so every engine is profiled the same way.
Results are cached as JSON under `cache_root()/profiles`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from specserve.core.controller import CostPoint, CostProfile, CostTable
from specserve.core.tree import DraftTree, ancestor_mask
from specserve.runtime.engine import Engine
from specserve.runtime.models import cache_root

PROFILE_VERSION = 2  # 2: interleaved rounds, fastest run, monotone envelope
CONTEXTS = (128, 1024)
CHAIN_TOKENS = (1, 2, 4, 8, 16, 32, 64)
TREE_TOKENS = (4, 16, 64)
LEVEL_WIDTHS = (1, 4, 16)
REPEATS = 3
FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


class ForwardSession(Protocol):
    """What is measured: `EngineSession` (runtime/engine.py), or any session like it."""

    length: int

    def extend(self, token_ids: list[int], logits_for: int = 1) -> Any: ...

    def extend_tree(self, token_ids: list[int], positions: list[int], visible: torch.Tensor, return_hidden: bool = False) -> Any: ...

    def rollback(self, length: int) -> None: ...


@dataclass
class ProfileSubject:
    """What to measure: a fresh session per call of `new_session`, the model's role and shape.
    `extra_inputs(n)`: keyword inputs a forward over n tokens needs besides the tokens (a
    feature draft's hidden states); {} for a plain causal LM."""

    name: str  # the model specification
    role: str  # "target" or "draft"
    dtype: str
    device: str
    new_session: Callable[[], ForwardSession]
    extra_inputs: Callable[[int], dict] = field(default=lambda n: {})
    weight_bytes: float = 0.0  # bytes of weights a forward reads (all but the input embedding)
    body_params: float = 0.0  # parameters used per token outside the embeddings and the head
    head_params: float = 0.0  # output head parameters (one [V, H] product per logits row)
    kv_bytes_per_token: float = 0.0  # KV cache bytes per cached token, all layers
    attention_width: float = 0.0  # layers x heads x head_dim: attention FLOPs per token pair / 4
    max_context_tokens: int = 1 << 30  # measured contexts stay within the model's window
    supports_trees: bool = True  # the target's sessions take extend_tree (else no tree table)
    engine: str = "torch"  # the engine's name: engines differ in cost on the same model and dtype


@dataclass
class MeasuredProfile:
    costs: CostProfile
    machine: dict  # cpu, flags, threads, device, dtype, model, role
    memory_gb_s: float  # measured read bandwidth
    matmul_gflop_s: float  # measured matmul peak in the model's dtype
    measured_s: float  # how long measuring took
    from_cache: bool = False


def subject_for(loaded: Engine, role: str, device: str = "cpu") -> ProfileSubject:
    """An engine's subject: its sessions; bytes and FLOPs per shape when it is a torch module."""
    model = getattr(loaded, "model", None)
    subject = ProfileSubject(name=loaded.spec, role=role, dtype=loaded.dtype_name, device=device,
                             new_session=loaded.new_session, max_context_tokens=loaded.max_context_tokens,
                             supports_trees=loaded.supports_trees, engine=getattr(loaded, "engine_name", "torch"))
    if not isinstance(model, torch.nn.Module):
        return subject  # another engine: costs only
    size = next(model.parameters()).element_size()
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_params = float(head.weight.numel()) if head is not None else float(getattr(model, "vocab_ids", torch.empty(0)).numel()
                                                                          * embed.shape[1])
    params = {id(p): p.numel() for p in model.parameters()}
    body = float(sum(params.values()) - embed.numel() - (head.weight.numel() if head is not None and id(head.weight) != id(embed) else 0))
    config = getattr(model, "config", None)
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    kv_heads = int(getattr(config, "num_key_value_heads", heads) or heads)
    head_dim = int(getattr(config, "head_dim", 0) or (config.hidden_size // heads if heads else 0))
    hidden_size = int(getattr(config, "hidden_size", embed.shape[1]))
    extra: Callable[[int], dict] = lambda n: {}
    if loaded.needs_target_hidden_states:
        dtype = next(model.parameters()).dtype
        extra = lambda n: {"target_hidden": torch.randn(1, n, hidden_size, generator=torch.Generator().manual_seed(n)).to(dtype)}
    return dataclasses.replace(
        subject, extra_inputs=extra, weight_bytes=(body + head_params) * size, body_params=body, head_params=head_params,
        kv_bytes_per_token=2.0 * layers * kv_heads * head_dim * size, attention_width=float(layers * heads * head_dim),
    )


def machine_facts() -> dict:
    cpu, flags = platform.processor(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == platform.processor():
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    except OSError:
        pass
    return {"cpu": cpu, "flags": sorted(set(flags) & set(FLAGS_OF_INTEREST)),
            "flags_sha": hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:12], "cores": os.cpu_count(),
            "torch": torch.__version__}


def measure_limits(dtype: torch.dtype, repeats: int = 5) -> tuple[float, float]:
    """(memory read GB/s, matmul GFLOP/s in dtype), best of `repeats`, a fraction of a second."""
    data = torch.ones(32 * 2**20, dtype=torch.float32)  # 128 MB, larger than any cache
    data.sum()
    read_s = min(_timed(lambda: data.sum()) for _ in range(repeats))
    a = torch.randn(1024, 1024).to(dtype)
    b = torch.randn(1024, 1024).to(dtype)
    a @ b
    matmul_s = min(_timed(lambda: a @ b) for _ in range(repeats))
    return data.numel() * 4 / read_s / 1e9, 2 * 1024**3 / matmul_s / 1e9


def _timed(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def _point(subject: ProfileSubject, context: int, new_tokens: int, logits_rows: int, ms: float) -> CostPoint:
    flops = (2 * subject.body_params * new_tokens + 2 * subject.head_params * logits_rows
             + 4 * subject.attention_width * (context + new_tokens) * new_tokens)
    return CostPoint(context, new_tokens, ms, subject.weight_bytes + subject.kv_bytes_per_token * (context + new_tokens), flops)


@torch.inference_mode()
def measure(subject: ProfileSubject, contexts=CONTEXTS, repeats: int = REPEATS) -> CostProfile:
    """The cost tables of the subject's role (see the module doc).

    Every shape runs once to warm up, then `repeats` rounds over all shapes; a shape keeps
    its fastest run. Rounds spread a burst of other work over different shapes, and since
    such work only ever adds time, the tables are then made monotone from above: a forward
    over k tokens costs at most what one over more tokens, or at a longer context, took."""
    room = subject.max_context_tokens - max(CHAIN_TOKENS + TREE_TOKENS + LEVEL_WIDTHS) - 1
    shapes: list[tuple[str, int, int, Callable[[], None]]] = []  # (table, context, tokens, forward)
    sessions = []
    for context in sorted({max(min(c, room), 1) for c in contexts}):
        session = subject.new_session()
        sessions.append(session)
        _prefill(subject, session, context)
        if subject.role == "target":
            shapes += [("verify_chain", context, k, _forward(subject, session, context, k, "chain")) for k in CHAIN_TOKENS]
            shapes += [("verify_tree", context, k, _forward(subject, session, context, k, "tree"))
                       for k in (TREE_TOKENS if subject.supports_trees else ())]
        else:
            feature_draft = bool(subject.extra_inputs(1))
            shapes.append(("draft_step", context, 1, _forward(subject, session, context, 1, "tree" if feature_draft else "chain")))
            # Only feature drafts draft trees; a level is `width` siblings.
            shapes += [("draft_tree_level", context, w, _forward(subject, session, context, w, "level"))
                       for w in (LEVEL_WIDTHS if feature_draft else ())]
    best = [float("inf")] * len(shapes)
    for round_ in range(repeats + 1):
        for i, (_, _, _, forward) in enumerate(shapes):
            took = _timed(forward)
            if round_:  # round 0 warms every shape up
                best[i] = min(best[i], took * 1e3)
    for session in sessions:
        getattr(session, "close", lambda: None)()
    tables: dict[str, list[CostPoint]] = {}
    for (table, context, tokens, _), ms in zip(shapes, _monotone(shapes, best)):
        tables.setdefault(table, []).append(_point(subject, context, tokens, tokens, ms))
    return CostProfile(**{name: CostTable.of(points) for name, points in tables.items()})


def _monotone(shapes: list[tuple[str, int, int, Callable]], best: list[float]) -> list[float]:
    """Each shape's time, at most that of any shape of its table with as many tokens or more
    at as long a context or longer."""
    return [min(b for (t2, c2, k2, _), b in zip(shapes, best) if t2 == table and c2 >= context and k2 >= tokens)
            for (table, context, tokens, _) in shapes]


def _forward(subject: ProfileSubject, session: ForwardSession, context: int, tokens: int, kind: str) -> Callable[[], None]:
    """One forward over `tokens` new tokens after `context`, rolled back after: a chain (logits
    for each), a chain-shaped tree through tree attention (its cost barely depends on the
    shape), or a tree level of `tokens` siblings."""
    new = [1000 + i for i in range(tokens)]
    chain = DraftTree.chain(new[1:])
    if kind == "level":
        positions, mask = [context] * tokens, torch.eye(tokens, dtype=torch.bool)  # [n, n]
    else:
        positions, mask = [context + d for d in [0, *chain.depths()]], ancestor_mask(chain)  # mask [n, n]

    def forward() -> None:
        if kind == "chain":
            session.extend(new, logits_for=tokens)
        else:
            extra = subject.extra_inputs(tokens)
            if extra:  # a feature draft: its own inputs besides the tokens
                session.extend_masked(new, positions, mask, **extra)
            else:
                session.extend_tree(new, positions, mask)
        session.rollback(context)
    return forward


def _prefill(subject: ProfileSubject, session: ForwardSession, context: int) -> None:
    tokens = [100 + i % 1000 for i in range(context)]
    extra = subject.extra_inputs(context)
    if extra:
        visible = torch.ones(context, context, dtype=torch.bool).tril()  # [n, n] causal
        session.extend_masked(tokens, list(range(context)), visible, **extra)
    else:
        session.extend(tokens)


def cache_key(subject: ProfileSubject) -> dict:
    key = {"version": PROFILE_VERSION, "model": subject.name, "role": subject.role, "dtype": subject.dtype,
           "device": subject.device, "threads": torch.get_num_threads(), **machine_facts()}
    if subject.engine not in ("torch", "llama.cpp"):  # those two are told apart by dtype; their keys stay as they were
        key["engine"] = subject.engine
    return key


def cache_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = Path(key["model"]).name or "model"
    return cache_root() / "profiles" / f"{key['role']}-{name}-{key['dtype']}-{digest}.json"


def load_or_measure(subject: ProfileSubject, refresh: bool = False) -> MeasuredProfile:
    """The cached profile for this subject on this machine, measuring it when missing."""
    key = cache_key(subject)
    path = cache_path(key)
    if path.is_file() and not refresh:
        try:
            return profile_from_json(json.loads(path.read_text()), from_cache=True)
        except (ValueError, KeyError, TypeError):
            pass  # an unreadable cache entry is measured again
    began = time.perf_counter()
    costs = measure(subject)
    # Another engine's own types (llama.cpp's "Q4_1") have no torch matmul: its limits are read in float32.
    dtype = getattr(torch, subject.dtype, None)
    memory, matmul = measure_limits(dtype if isinstance(dtype, torch.dtype) else torch.float32)
    profile = MeasuredProfile(costs, key, memory, matmul, time.perf_counter() - began)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(f".{os.getpid()}.tmp")
    staging.write_text(json.dumps(profile_to_json(profile), indent=1))
    staging.replace(path)  # atomic: services starting together never read half a file
    return profile


def profile_for(loaded: Engine, role: str, device: str = "cpu", refresh: bool = False) -> MeasuredProfile | None:
    """A loaded model's profile; None for a simulated model (it has no real cost to measure)."""
    if loaded.spec.startswith("sim:"):
        return None
    return load_or_measure(subject_for(loaded, role, device), refresh)


TABLES = ("verify_chain", "verify_tree", "draft_step", "draft_tree_level")


def profile_to_json(profile: MeasuredProfile) -> dict:
    out = {"machine": profile.machine, "memory_gb_s": profile.memory_gb_s, "matmul_gflop_s": profile.matmul_gflop_s,
           "measured_s": profile.measured_s}
    for name in TABLES:
        table = getattr(profile.costs, name)
        if table is not None:
            out[name] = [asdict(p) for p in table.points]
    return out


def profile_from_json(data: dict, from_cache: bool = False) -> MeasuredProfile:
    costs = CostProfile(**{name: CostTable.of(CostPoint(**p) for p in data[name]) for name in TABLES if data.get(name)})
    return MeasuredProfile(costs, data["machine"], data["memory_gb_s"], data["matmul_gflop_s"], data["measured_s"], from_cache)
