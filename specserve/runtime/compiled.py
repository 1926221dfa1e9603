"""The compiled engine: a Llama-family model through torch.compile over static KV caches.

Eager PyTorch spends most of a small model's forward on per-op overhead (DESIGN.md
section 3). This engine runs the same weights (the Hugging Face model's own tensors; no
copy on disk) through `runtime/static_decoder.py`'s layer function compiled by
torch.compile (inductor: fused C++ kernels around the matrix products):

- Shapes are static so nothing recompiles mid-request: the new rows of a forward are
  padded to a bucket (1, 2, 4, ... 64; more rows run in chunks of the largest), and the
  span of cache slots attended to is a dynamic dimension (one graph for every length).
  The graphs are compiled at load (`compile_s` says how long that took); inductor's
  caches live under the project's cache (`cache_root()/inductor`), so a restart reuses them.
- Each session owns one static cache: keys and values [layers, kv_heads, C, head_dim],
  C = the context window plus the largest bucket (the padding rows' slots). Caches of
  closed sessions are pooled and reused, so memory is bounded by the most sessions
  open at once. Rollback moves the length pointer; keeping a tree's accepted path
  copies its slots down (an index copy).
- Padding rows sit after the real ones, see only their own slot (so every attention
  row is finite), and are never seen: later writes overwrite their slots.
- `forward_batch` runs the rows of several sessions in one pass when they fit the
  largest bucket together: the layer's projections (nearly all its weights) over all
  rows at once, the attention per session (`static_decoder.py`'s three layer parts, each
  compiled per bucket); else each session's rows in turn.

dtypes: float32, bfloat16, and int8 (weight-only: per-channel symmetric int8 weights
quantized at load from the model's float32 weights; bfloat16 activations and caches, since
the int8 product kernel is vectorized for bfloat16 inputs only). `compile=False` runs the
same functions eagerly (the static-cache path without compilation).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from specserve.runtime.engine import Forward, ForwardResult
from specserve.runtime.models import DTYPES, cache_root, eos_token_ids, resolve_model_dir
from specserve.runtime.ragged import supports_ragged
from specserve.runtime.static_decoder import (LayerShape, Projection, attend, decoder_layer, final_norm, layer_inputs,
                                              layer_outputs, layer_shape, layer_weights, project, quantize_int8)

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64)
SPAN_BLOCK = 64  # attended spans are rounded up to a multiple of this
CONTEXT_TOKENS = 4096  # the default context window of a session's static cache
COMPILED_DTYPES = ("float32", "bfloat16", "int8")
# Per-bucket static graphs (no automatic dynamic shapes); enough room for every bucket's graphs.
_DYNAMO_CONFIG = {"automatic_dynamic_shapes": False, "recompile_limit": 64}


def load_compiled(spec: str, dtype: str = "float32", device: str = "cpu", **options) -> CompiledEngine:
    """The compiled engine for a model specification (see `specserve.loading.load_model`)."""
    from transformers import AutoModelForCausalLM

    if dtype not in COMPILED_DTYPES:
        raise ValueError(f"the compiled engine's dtype must be one of {', '.join(COMPILED_DTYPES)}, got {dtype!r}")
    weights_dtype = torch.float32 if dtype == "int8" else DTYPES[dtype]  # int8 is quantized from float32
    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(spec), dtype=weights_dtype, use_safetensors=True)
    return CompiledEngine(spec, model.to(device).eval(), int8=dtype == "int8", **options)


class CompiledEngine:
    """A causal LM of the Llama family ready for compiled forwards; `new_session()` hands out a cache."""

    engine_name = "compiled"
    returns_hidden_states = True
    supports_trees = True
    needs_target_hidden_states = False
    supports_batching = True

    @torch.inference_mode()
    def __init__(self, spec: str, model: torch.nn.Module, int8: bool = False, compile: bool = True,
                 buckets: tuple[int, ...] = BUCKETS, context_tokens: int = CONTEXT_TOKENS, warm_up: bool = True):
        config = model.config
        if not supports_ragged(model) or getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"model {spec!r}: the compiled engine runs Llama-family models (llama, mistral, qwen2 "
                             f"without a sliding window, SiLU MLP), not {getattr(config, 'model_type', '?')!r}")
        base = model.model
        self.spec = spec
        self.dtype = torch.bfloat16 if int8 else base.embed_tokens.weight.dtype  # activations and caches
        self.dtype_name = "int8" if int8 else str(self.dtype).removeprefix("torch.")
        self.quantization = "int8 weight-only, per channel, bfloat16 activations" if int8 else "none"
        self.device = base.embed_tokens.weight.device
        self.vocab_size = int(base.embed_tokens.weight.shape[0])
        self.hidden_size = int(config.hidden_size)
        self.max_context_tokens = min(int(getattr(config, "max_position_embeddings", context_tokens)), context_tokens)
        self.eos_token_ids = eos_token_ids(model)
        self.shape: LayerShape = layer_shape(config)
        self.layers = [layer_weights(layer, int8, self.dtype) for layer in base.layers[: config.num_hidden_layers]]
        self.embed = base.embed_tokens.weight.detach().to(self.dtype)  # [V, H]
        self.norm_weight = base.norm.weight.detach().to(self.dtype)  # [H]
        head = model.lm_head.weight.detach()  # [V, H]
        self.head = Projection(*quantize_int8(head, self.dtype), None) if int8 else Projection(head, None, None)
        self.rotary = base.rotary_emb  # the family's own rotary embedding (its scaling rules included)
        self.buckets = tuple(sorted(buckets))
        self.capacity = -(-(self.max_context_tokens + self.buckets[-1]) // SPAN_BLOCK) * SPAN_BLOCK  # C
        self.compiled = compile
        parts = (decoder_layer, final_norm, layer_inputs, attend, layer_outputs)
        if compile:
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
            parts = tuple(torch.compile(part, fullgraph=True) for part in parts)
        self._layer, self._norm, self._inputs, self._attend, self._outputs = parts
        self._free: list[tuple[torch.Tensor, torch.Tensor]] = []  # caches of closed sessions
        self.compile_s = self.warm_up() if compile and warm_up else 0.0

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Runs every bucket once alone and once as a batch's parts (compiling the graphs, or
        loading them from inductor's cache); the seconds it took."""
        began = time.perf_counter()
        session = self.new_session()
        for b in self.buckets:
            session.extend(list(range(b)), logits_for=1)
            session.rollback(0)
            rows = _Rows(session, 0, list(range(b)), list(range(b)), torch.ones(b, b, dtype=torch.bool).tril())
            self._batched([rows])
        session.close()
        took = time.perf_counter() - began
        log.info("compiled engine: %d buckets %s ready in %.1f s", len(self.buckets), self.buckets, took)
        return took

    def new_session(self) -> CompiledSession:
        return CompiledSession(self)

    def forward_batch(self, forwards: list[Forward]) -> list[ForwardResult]:
        """Every forward in shared passes: the projections over all sessions' rows at once when
        they fit the largest bucket together, else each session's rows in turn."""
        sessions = [f.session for f in forwards]
        if len({id(s) for s in sessions}) != len(sessions):
            raise ValueError("forward_batch: each session may appear once")
        for s in sessions:
            if not isinstance(s, CompiledSession) or s.engine is not self:
                raise ValueError("forward_batch: every session must be a session of this engine")
        if any(f.features is not None for f in forwards):
            raise ValueError("forward_batch: the compiled engine hosts no feature draft (features must be None)")
        return self._run([(f.session, f.token_ids, f.positions, f.visible, f.logits_for, f.hidden) for f in forwards])

    @torch.inference_mode()
    def _run(self, requests: list[tuple]) -> list[ForwardResult]:
        """requests: (session, tokens, positions or None, visible or None, logits_for, hidden). Checks
        all, runs all, then moves every session's length; one head product for every logits row."""
        plans = [session._plan(tokens, positions, visible) for session, tokens, positions, visible, _, _ in requests]
        if len(plans) > 1 and all(len(p) == 1 for p in plans) and sum(len(p[0].tokens) for p in plans) <= self.buckets[-1]:
            states = self._batched([p[0] for p in plans])  # [n, H] per session
        else:
            states = [torch.cat([self._alone(rows) for rows in plan]) for plan in plans]
        wanted = [h[len(h) - r[4]:] for h, r in zip(states, requests)]  # [logits_for, H] each
        logits = self.logits(torch.cat(wanted)) if any(r[4] for r in requests) else None  # [L, V]
        results: list[ForwardResult] = []
        taken = 0
        for (session, tokens, _, _, logits_for, hidden), h in zip(requests, states):
            session.length += len(tokens)
            results.append((logits[taken:taken + logits_for] if logits_for else None, h.cpu() if hidden else None))
            taken += logits_for
        return results

    @torch.inference_mode()
    def _take_cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A free cache; made in inference mode, as every graph input is (a tensor made outside
        it carries another dispatch key, and would compile the graphs again)."""
        if self._free:
            return self._free.pop()
        shape = (len(self.layers), self.shape.kv_heads, self.capacity, self.shape.head_dim)
        return (torch.zeros(shape, dtype=self.dtype, device=self.device),  # keys [layers, kv_heads, C, d]
                torch.zeros(shape, dtype=self.dtype, device=self.device))  # values, likewise

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _mask(self, rows: _Rows, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask [b, L] bool, slots [b]) of rows padded to bucket b: padding rows take the slots
        after the real ones and see only their own."""
        n, start = len(rows.tokens), rows.start
        span = min(-(-(start + b) // SPAN_BLOCK) * SPAN_BLOCK, self.capacity)  # L
        mask = torch.zeros(b, span, dtype=torch.bool)  # [b, L]
        mask[:n, : start + n] = rows.sees
        pad = torch.arange(n, b)
        mask[pad, start + pad] = True
        mask = mask.to(self.device)
        if self.compiled:
            torch._dynamo.mark_dynamic(mask, 1)  # one graph for every span
        return mask, torch.arange(start, start + b, device=self.device)

    def _embed(self, tokens: list[int], positions: list[int], b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embeddings x [b, H] and rotary cos, sin [b, d] of tokens padded to b rows."""
        ids = torch.tensor(tokens + [0] * (b - len(tokens)), device=self.device)  # [b]
        position_ids = torch.tensor([positions + [0] * (b - len(tokens))], device=self.device)  # [1, b]
        x = torch.nn.functional.embedding(ids, self.embed)  # [b, H]
        cos, sin = self.rotary(x, position_ids)  # [1, b, d] each
        return x, cos[0], sin[0]

    @torch.inference_mode()
    def _alone(self, rows: _Rows) -> torch.Tensor:
        """One session's rows (at most the largest bucket) through the whole-layer graph; hidden [n, H]."""
        b = self.bucket(len(rows.tokens))
        mask, slots = self._mask(rows, b)
        x, cos, sin = self._embed(rows.tokens, rows.positions, b)
        keys, values = rows.session.keys, rows.session.values
        with torch._dynamo.config.patch(**_DYNAMO_CONFIG):
            for i, weights in enumerate(self.layers):
                x = self._layer(x, cos, sin, keys[i], values[i], slots, mask, weights, self.shape)
            x = self._norm(x, self.norm_weight, self.shape.eps)  # [b, H]
        return x[: len(rows.tokens)]

    @torch.inference_mode()
    def _batched(self, batch: list[_Rows]) -> list[torch.Tensor]:
        """Several sessions' rows (together at most the largest bucket) in one pass: the layer's
        projections over all rows at once, attention per session; hidden [n, H] per session."""
        ends = [0]
        for rows in batch:
            ends.append(ends[-1] + len(rows.tokens))
        total = self.bucket(ends[-1])
        x, cos, sin = self._embed([t for r in batch for t in r.tokens], [p for r in batch for p in r.positions], total)
        attention = []  # (rows of x [b] (the last repeated as padding), mask, slots, keys, values)
        for rows, a, e in zip(batch, ends, ends[1:]):
            b = self.bucket(e - a)
            index = torch.tensor(list(range(a, e)) + [e - 1] * (b - (e - a)), device=self.device)  # [b]
            attention.append((index, *self._mask(rows, b), rows.session.keys, rows.session.values))
        spare = torch.zeros(total - ends[-1], self.shape.heads * self.shape.head_dim, dtype=self.dtype,
                            device=self.device)  # [total - N, heads * d]: the batch's padding rows
        with torch._dynamo.config.patch(**_DYNAMO_CONFIG):
            for i, weights in enumerate(self.layers):
                q, k, v = self._inputs(x, cos, sin, weights, self.shape)  # [total, heads, d], [total, kv_heads, d] x2
                parts = [self._attend(q[index], k[index], v[index], keys[i], values[i], slots, mask, self.shape)[: e - a]
                         for (index, mask, slots, keys, values), a, e in zip(attention, ends, ends[1:])]
                x = self._outputs(x, torch.cat([*parts, spare]), weights, self.shape)  # [total, H]
            x = self._norm(x, self.norm_weight, self.shape.eps)  # [total, H]
        return [x[a:e] for a, e in zip(ends, ends[1:])]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [l, V] on the CPU of hidden states [l, H]."""
        return project(hidden, self.head).float().cpu()


@dataclass
class _Rows:
    """One session's rows for one pass (at most the largest bucket), written at slots start...;
    sees [n, start + n] bool: which slots each row attends to."""

    session: CompiledSession
    start: int
    tokens: list[int]
    positions: list[int]
    sees: torch.Tensor


class CompiledSession:
    """One sequence's static cache (see `runtime/engine.py` and the module doc)."""

    vocab_ids = None

    def __init__(self, engine: CompiledEngine):
        self.engine = engine
        self.keys, self.values = engine._take_cache()
        self.length = 0

    def extend(self, token_ids: list[int], logits_for: int = 1) -> torch.Tensor:
        return self.engine._run([(self, token_ids, None, None, max(logits_for, 1), False)])[0][0]  # [logits_for, V]

    def extend_with_hidden(self, token_ids: list[int], logits_for: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        return self.engine._run([(self, token_ids, None, None, max(logits_for, 1), True)])[0]  # [logits_for, V], [n, H]

    def extend_tree(self, token_ids: list[int], positions: list[int], visible: torch.Tensor,
                    return_hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.engine._run([(self, token_ids, positions, visible, len(token_ids), return_hidden)])[0]  # [n, V], [n, H]

    @torch.inference_mode()
    def keep(self, start: int, offsets: list[int]) -> None:
        if offsets and (offsets != sorted(set(offsets)) or offsets[0] < 0 or start + offsets[-1] >= self.length):
            raise ValueError(f"keep({start}, {offsets}): offsets must ascend within the {self.length} cached tokens")
        if offsets != list(range(len(offsets))):
            index = torch.tensor([start + o for o in offsets], device=self.keys.device)
            for cache in (self.keys, self.values):  # [layers, kv_heads, C, d]
                cache[:, :, start:start + len(offsets)] = cache.index_select(2, index)
        self.rollback(start + len(offsets))

    def rollback(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back to {length}: the cache holds {self.length} tokens")
        self.length = length

    def close(self) -> None:
        if self.keys is not None:
            self.engine._free.append((self.keys, self.values))
            self.keys = self.values = None
            self.length = 0

    def _plan(self, token_ids: list[int], positions: list[int] | None, visible: torch.Tensor | None) -> list[_Rows]:
        """Checks the rows and splits them into passes of at most the largest bucket (nothing runs)."""
        n, start = len(token_ids), self.length
        if self.keys is None:
            raise ValueError("the session is closed")
        if n == 0:
            raise ValueError("extend: no tokens")
        if start + n > self.engine.max_context_tokens:
            raise ValueError(f"{start + n} tokens exceed the context window of {self.engine.max_context_tokens}")
        if not all(0 <= t < self.engine.vocab_size for t in token_ids):
            raise ValueError(f"a token id outside the vocabulary of {self.engine.vocab_size}")
        total = start + n
        if visible is None:
            positions, allowed = list(range(start, total)), None  # causal, built per pass
        else:
            m = visible.shape[1]
            if visible.shape[0] != n or not n <= m <= total or positions is None or len(positions) != n:
                raise ValueError(f"a tree of {n} nodes needs positions [{n}] and visible [{n}, m], {n} <= m <= {total}")
            allowed = torch.ones(n, total, dtype=torch.bool)  # [n, total]
            allowed[:, total - m:] = visible.bool()
        size = self.engine.buckets[-1]
        plan = []
        for a in range(0, n, size):
            e = min(a + size, n)
            if allowed is None:
                sees = torch.arange(start + e)[None, :] <= torch.arange(start + a, start + e)[:, None]  # [e-a, start+e]
            else:
                if allowed[a:e, start + e:].any():
                    raise ValueError(f"a tree of more than {size} nodes must list each node after the nodes it sees")
                sees = allowed[a:e, : start + e]
            plan.append(_Rows(self, start + a, token_ids[a:e], positions[a:e], sees))
        return plan
