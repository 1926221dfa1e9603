"""The PyTorch engine's batched forward: many sessions' rows in one pass over a ragged batch.

The rows of every session are laid end to end in one sequence of N tokens. The weight
products (projections, MLP, norms, the LM head: nearly all of a forward's work) run once
over all N rows, which is where a batch pays; attention runs per session, over that
session's own KV cache with its own mask (causal after the cache, or a tree's), so no
session ever sees another's tokens and no cache is copied into a padded batch.

It walks the decoder layers itself, calling each layer's own modules, for the model
families whose layer is exactly: x + attn(input_layernorm(x)), then x +
mlp(post_attention_layernorm(x)), with rotary positions and no sliding window
(`supports_ragged`).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from specserve.runtime.engine import Forward, ForwardResult

RAGGED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})


def supports_ragged(model: torch.nn.Module) -> bool:
    """A transformers causal LM whose decoder layers this module can walk (see the module doc)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in RAGGED_MODEL_TYPES or getattr(config, "sliding_window", None):
        return False
    base = getattr(model, "model", None)
    return all(hasattr(base, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")) and hasattr(model, "lm_head")


def _mask(forward: Forward, cached: int) -> torch.Tensor | None:
    """Which keys each new row sees: [n, cached + n] bool, or None (one chain row sees all)."""
    n = len(forward.token_ids)
    total = cached + n
    if forward.is_chain:
        if n == 1:
            return None
        # Row i sits at cached + i and sees every key up to itself.
        return torch.arange(total)[None, :] <= (cached + torch.arange(n))[:, None]
    m = forward.visible.shape[1]
    allowed = torch.ones(n, total, dtype=torch.bool)
    allowed[:, total - m:] = forward.visible
    return allowed


@torch.inference_mode()
def ragged_forward(model: torch.nn.Module, forwards: list[Forward]) -> list[ForwardResult]:
    """Runs every forward (distinct `KVSession`s of `model`) in one pass; see the module doc."""
    base = model.model
    device = base.embed_tokens.weight.device
    input_ids = torch.tensor([[t for f in forwards for t in f.token_ids]], dtype=torch.long, device=device)  # [1, N]
    hidden = ragged_decoder(base, base.embed_tokens(input_ids), forwards)  # [N, H]
    return split_results(hidden, forwards, model.lm_head)


def ragged_decoder(base: torch.nn.Module, embeds: torch.Tensor, forwards: list[Forward]) -> torch.Tensor:
    """The decoder layers and final norm of a transformers base model (`model.model`) over the
    rows of every forward laid end to end, embeds [1, N, H]; the last hidden states [N, H].
    Each session's cache grows by its rows."""
    device = embeds.device
    spans: list[tuple[int, int]] = []
    positions: list[int] = []
    for forward in forwards:
        start, n = forward.session.length, len(forward.token_ids)
        spans.append((len(positions), len(positions) + n))
        positions += forward.positions if forward.positions is not None else range(start, start + n)
    masks = [_mask(f, f.session.length) for f in forwards]
    masks = [None if m is None else m.to(device) for m in masks]
    position_ids = torch.tensor([positions], dtype=torch.long, device=device)  # [1, N]
    hidden = embeds
    cos, sin = base.rotary_emb(hidden, position_ids=position_ids)  # [1, N, head_dim] each
    for layer in base.layers[: base.config.num_hidden_layers]:
        attended = _attention(layer.self_attn, layer.input_layernorm(hidden), cos, sin, forwards, spans, masks)
        hidden = hidden + attended
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    for forward in forwards:
        forward.session.length += len(forward.token_ids)
    return base.norm(hidden)[0]  # [N, H]


def split_results(hidden: torch.Tensor, forwards: list[Forward], head) -> list[ForwardResult]:
    """Each forward's logits (one `head` product over every row that wants them) and hidden
    states, from the batch's hidden states [N, H]."""
    ends = [0]
    for forward in forwards:
        ends.append(ends[-1] + len(forward.token_ids))
    wanted = [i for f, b in zip(forwards, ends[1:]) for i in range(b - f.logits_for, b)]
    logits = head(hidden[wanted]).float().cpu() if wanted else None  # [L, V]
    results: list[ForwardResult] = []
    taken = 0
    for forward, a, b in zip(forwards, ends, ends[1:]):
        rows = None
        if forward.logits_for:
            rows = logits[taken:taken + forward.logits_for]  # [logits_for, V]
            taken += forward.logits_for
        results.append((rows, hidden[a:b].cpu() if forward.hidden else None))  # hidden [n, H]
    return results


def _attention(attn: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, forwards: list[Forward],
               spans: list[tuple[int, int]], masks: list[torch.Tensor | None]) -> torch.Tensor:
    """The layer's attention over x [1, N, H]: shared projections, per-session attention."""
    rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the model family's own
    head_dim = attn.head_dim
    n = x.shape[1]
    query = attn.q_proj(x).view(1, n, -1, head_dim).transpose(1, 2)  # [1, heads, N, d]
    key = attn.k_proj(x).view(1, n, -1, head_dim).transpose(1, 2)  # [1, kv_heads, N, d]
    value = attn.v_proj(x).view(1, n, -1, head_dim).transpose(1, 2)  # [1, kv_heads, N, d]
    query, key = rotate(query, key, cos, sin)
    outputs = []
    for forward, (a, b), mask in zip(forwards, spans, masks):
        # The session's whole cache for this layer, its new rows appended: [1, kv_heads, S, d].
        keys, values = forward.session.cache.update(key[:, :, a:b], value[:, :, a:b], attn.layer_idx)
        outputs.append(F.scaled_dot_product_attention(query[:, :, a:b], keys, values, attn_mask=mask,
                                                      scale=attn.scaling, enable_gqa=True))  # [1, heads, n, d]
    out = torch.cat(outputs, dim=2).transpose(1, 2).reshape(1, n, -1)  # [1, N, heads * d]
    return attn.o_proj(out)
