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
- `forward_batch` runs each session's rows through the compiled buckets in turn: the
  results are exactly each session's alone, but the weights are read once per session.

dtypes: float32, bfloat16, and int8 (weight-only: per-channel symmetric int8 weights
quantized at load from the model's float32 weights; bfloat16 activations and caches, since
the int8 product kernel is vectorized for bfloat16 inputs only). `compile=False` runs the
same functions eagerly (the static-cache path without compilation).
"""

from __future__ import annotations

import logging
import os
import time

import torch

from specserve.runtime.engine import Forward, ForwardResult
from specserve.runtime.models import DTYPES, cache_root, eos_token_ids, resolve_model_dir
from specserve.runtime.ragged import supports_ragged
from specserve.runtime.static_decoder import (LayerShape, Projection, decoder_layer, final_norm, layer_shape,
                                              layer_weights, project, quantize_int8)

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
        if compile:
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
            self._layer = torch.compile(decoder_layer, fullgraph=True)
            self._norm = torch.compile(final_norm, fullgraph=True)
        else:
            self._layer, self._norm = decoder_layer, final_norm
        self._free: list[tuple[torch.Tensor, torch.Tensor]] = []  # caches of closed sessions
        self.compile_s = self.warm_up() if compile and warm_up else 0.0

    def warm_up(self) -> float:
        """Runs every bucket once (compiling its graphs, or loading them from inductor's cache);
        the seconds it took."""
        began = time.perf_counter()
        session = self.new_session()
        for bucket in self.buckets:
            session.extend(list(range(bucket)), logits_for=1)
            session.rollback(0)
        session.close()
        took = time.perf_counter() - began
        log.info("compiled engine: %d buckets %s ready in %.1f s", len(self.buckets), self.buckets, took)
        return took

    def new_session(self) -> CompiledSession:
        return CompiledSession(self)

    def forward_batch(self, forwards: list[Forward]) -> list[ForwardResult]:
        """Each session's rows through the compiled buckets in turn (see the module doc)."""
        sessions = [f.session for f in forwards]
        if len({id(s) for s in sessions}) != len(sessions):
            raise ValueError("forward_batch: each session may appear once")
        for s in sessions:
            if not isinstance(s, CompiledSession) or s.engine is not self or s.keys is None:
                raise ValueError("forward_batch: every session must be an open session of this engine")
        if any(f.features is not None for f in forwards):
            raise ValueError("forward_batch: the compiled engine hosts no feature draft (features must be None)")
        for f in forwards:
            f.session._check(f.token_ids, f.positions, f.visible)
        return [f.session._forward(f.token_ids, f.positions, f.visible, f.logits_for, f.hidden) for f in forwards]

    def _take_cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._free:
            return self._free.pop()
        shape = (len(self.layers), self.shape.kv_heads, self.capacity, self.shape.head_dim)
        return (torch.zeros(shape, dtype=self.dtype, device=self.device),  # keys [layers, kv_heads, C, d]
                torch.zeros(shape, dtype=self.dtype, device=self.device))  # values, likewise

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    @torch.inference_mode()
    def rows(self, keys: torch.Tensor, values: torch.Tensor, start: int, tokens: list[int], positions: list[int],
             allowed: torch.Tensor) -> torch.Tensor:
        """The last hidden states [n, H] of n <= max bucket new rows written at slots start..start+n-1.
        allowed [n, start + n] bool: which slots each row sees."""
        n = len(tokens)
        b = self.bucket(n)
        span = min(-(-(start + b) // SPAN_BLOCK) * SPAN_BLOCK, self.capacity)  # L
        mask = torch.zeros(b, span, dtype=torch.bool)  # [b, L]
        mask[:n, : start + n] = allowed
        pad = torch.arange(n, b)
        mask[pad, start + pad] = True  # a padding row sees its own slot only
        ids = torch.tensor(tokens + [0] * (b - n), device=self.device)  # [b]
        position_ids = torch.tensor([positions + [0] * (b - n)], device=self.device)  # [1, b]
        slots = torch.arange(start, start + b, device=self.device)  # [b]
        x = torch.nn.functional.embedding(ids, self.embed)  # [b, H]
        cos, sin = self.rotary(x, position_ids)  # [1, b, d] each
        cos, sin, mask = cos[0], sin[0], mask.to(self.device)
        if self.compiled:
            torch._dynamo.mark_dynamic(mask, 1)  # one graph for every span
        with torch._dynamo.config.patch(**_DYNAMO_CONFIG):
            for i, weights in enumerate(self.layers):
                x = self._layer(x, cos, sin, keys[i], values[i], slots, mask, weights, self.shape)
            x = self._norm(x, self.norm_weight, self.shape.eps)  # [b, H]
        return x[:n]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [l, V] on the CPU of hidden states [l, H]."""
        return project(hidden, self.head).float().cpu()


class CompiledSession:
    """One sequence's static cache (see `runtime/engine.py` and the module doc)."""

    vocab_ids = None

    def __init__(self, engine: CompiledEngine):
        self.engine = engine
        self.keys, self.values = engine._take_cache()
        self.length = 0

    def extend(self, token_ids: list[int], logits_for: int = 1) -> torch.Tensor:
        self._check(token_ids, None, None)
        return self._forward(token_ids, None, None, max(logits_for, 1), False)[0]  # [logits_for, V]

    def extend_with_hidden(self, token_ids: list[int], logits_for: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(token_ids, None, None)
        return self._forward(token_ids, None, None, max(logits_for, 1), True)  # [logits_for, V], [n, H]

    def extend_tree(self, token_ids: list[int], positions: list[int], visible: torch.Tensor,
                    return_hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._check(token_ids, positions, visible)
        return self._forward(token_ids, positions, visible, len(token_ids), return_hidden)  # [n, V], [n, H]

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

    def _check(self, token_ids: list[int], positions: list[int] | None, visible: torch.Tensor | None) -> None:
        n = len(token_ids)
        if self.keys is None:
            raise ValueError("the session is closed")
        if n == 0:
            raise ValueError("extend: no tokens")
        if self.length + n > self.engine.max_context_tokens:
            raise ValueError(f"{self.length + n} tokens exceed the context window of {self.engine.max_context_tokens}")
        if not all(0 <= t < self.engine.vocab_size for t in token_ids):
            raise ValueError(f"a token id outside the vocabulary of {self.engine.vocab_size}")
        if visible is not None:
            m = visible.shape[1]
            if visible.shape[0] != n or not n <= m <= self.length + n or positions is None or len(positions) != n:
                raise ValueError(f"a tree of {n} nodes needs positions [{n}] and visible [{n}, m], {n} <= m <= {self.length + n}")

    def _forward(self, token_ids: list[int], positions: list[int] | None, visible: torch.Tensor | None,
                 logits_for: int, hidden: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Appends the rows in chunks of at most the largest bucket; (logits [logits_for, V] or None,
        hidden [n, H] or None). The length moves only once every chunk has run."""
        engine, start, n = self.engine, self.length, len(token_ids)
        total = start + n
        if visible is None:
            positions = list(range(start, total))
            allowed = None  # causal, built per chunk
        else:
            allowed = torch.ones(n, total, dtype=torch.bool)  # [n, total]
            allowed[:, total - visible.shape[1]:] = visible.bool()
        chunk_size = engine.buckets[-1]
        states = []
        for a in range(0, n, chunk_size):
            e = min(a + chunk_size, n)
            if allowed is None:
                sees = torch.arange(start + e)[None, :] <= torch.arange(start + a, start + e)[:, None]  # [e-a, start+e]
            else:
                if allowed[a:e, start + e:].any():
                    raise ValueError(f"a tree of more than {chunk_size} nodes must list each node after the nodes it sees")
                sees = allowed[a:e, : start + e]
            states.append(engine.rows(self.keys, self.values, start + a, token_ids[a:e], positions[a:e], sees))
        self.length = total
        states = torch.cat(states) if len(states) > 1 else states[0]  # [n, H]
        logits = engine.logits(states[n - logits_for:]) if logits_for else None  # [logits_for, V]
        return logits, (states.cpu() if hidden else None)
