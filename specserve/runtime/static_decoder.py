"""A Llama-family decoder layer as one plain function over a static KV cache: what the
compiled engine (`runtime/compiled.py`) hands to torch.compile.

The layer is the one `runtime/ragged.py` walks (Llama, Mistral without a sliding window,
Qwen2): x + attn(norm(x)), then x + mlp(norm(x)), rotary positions. Its weights are the
Hugging Face model's own tensors; only q/k/v and gate/up are laid side by side (one
product each instead of three and two). With `quantize_int8` every projection holds
int8 weights and one float scale per output channel (symmetric, per channel),
multiplied through `aten._weight_int8pack_mm`, which reads the int8 weights directly.

The cache of one layer is keys and values [kv_heads, C, head_dim] for C slots. A
forward over b rows writes its keys and values into the slots `slots` [b] and attends
over the first L slots with a boolean mask [b, L]: which rows see which slots is the
caller's business (a chain, a tree, padding rows). L varies from call to call (the
compiled graph treats it as dynamic); b is a bucket size, compiled once each. One
session's forward runs `decoder_layer` whole; a batch of sessions runs its three parts:
the projections over every session's rows at once, the attention per session.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class Projection(NamedTuple):
    """y = x @ weight.T (* scale) (+ bias): weight [out, in] float or int8; scale [out] or None."""

    weight: torch.Tensor
    scale: torch.Tensor | None
    bias: torch.Tensor | None


class LayerWeights(NamedTuple):
    input_norm: torch.Tensor  # [H]
    qkv: Projection  # out = (heads + 2 kv_heads) * head_dim
    out: Projection  # [H, heads * head_dim]
    post_norm: torch.Tensor  # [H]
    gate_up: Projection  # out = 2 * intermediate
    down: Projection  # [H, intermediate]


class LayerShape(NamedTuple):
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    scaling: float


def project(x: torch.Tensor, p: Projection) -> torch.Tensor:
    """x [b, in] -> [b, out]."""
    if p.scale is None:
        y = F.linear(x, p.weight)
    else:
        y = torch.ops.aten._weight_int8pack_mm(x, p.weight, p.scale)
    return y if p.bias is None else y + p.bias


def quantize_int8(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (int8 [out, in], scale [out] in dtype), weight ~ int8 * scale."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # [out]
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As the Llama family computes it: in float32, back to x's dtype, then the weight."""
    t = x.float()
    t = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps)
    return weight * t.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions on x [b, heads, d] with cos, sin [b, d] (halves rotated, as in Llama)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def layer_inputs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, w: LayerWeights, shape: LayerShape
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values of rows x [b, H] at their positions (cos, sin [b, d]):
    q [b, heads, d], k and v [b, kv_heads, d]."""
    b = x.shape[0]
    heads, kv_heads, d = shape.heads, shape.kv_heads, shape.head_dim
    qkv = project(rms_norm(x, w.input_norm, shape.eps), w.qkv)  # [b, (heads + 2 kv_heads) d]
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    return _rotate(q.view(b, heads, d), cos, sin), _rotate(k.view(b, kv_heads, d), cos, sin), v.view(b, kv_heads, d)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
           slots: torch.Tensor, mask: torch.Tensor, shape: LayerShape) -> torch.Tensor:
    """Writes k, v [b, kv_heads, d] into `slots` [b] of keys, values [kv_heads, C, d] (in place), then
    q [b, heads, d] attends over the first L slots with mask [b, L] (bool); [b, heads * d]."""
    keys.index_copy_(1, slots, k.transpose(0, 1))
    values.index_copy_(1, slots, v.transpose(0, 1))
    span = mask.shape[-1]
    attended = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], keys[None, :, :span], values[None, :, :span],  # [1, heads, b, d], [1, kv_heads, L, d] x2
        attn_mask=mask, scale=shape.scaling, enable_gqa=True)  # [1, heads, b, d]
    return attended[0].transpose(0, 1).reshape(q.shape[0], -1)


def layer_outputs(x: torch.Tensor, attended: torch.Tensor, w: LayerWeights, shape: LayerShape) -> torch.Tensor:
    """The rest of the layer: x [b, H] plus the projected attention [b, heads * d], then the MLP."""
    x = x + project(attended, w.out)  # [b, H]
    gate, up = project(rms_norm(x, w.post_norm, shape.eps), w.gate_up).chunk(2, dim=-1)  # [b, I] each
    return x + project(F.silu(gate) * up, w.down)  # [b, H]


def decoder_layer(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  slots: torch.Tensor, mask: torch.Tensor, w: LayerWeights, shape: LayerShape) -> torch.Tensor:
    """One whole layer over one session's rows x [b, H] (the three parts above); the new rows [b, H]."""
    q, k, v = layer_inputs(x, cos, sin, w, shape)
    return layer_outputs(x, attend(q, k, v, keys, values, slots, mask, shape), w, shape)


def final_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm(x, weight, eps)


def _projection(linears: list[torch.nn.Linear], int8: bool, dtype: torch.dtype) -> Projection:
    weight = linears[0].weight if len(linears) == 1 else torch.cat([m.weight for m in linears])
    biases = [m.bias for m in linears]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b.detach() if b is not None else torch.zeros(m.out_features) for m, b in zip(linears, biases)]).to(dtype)
    if int8:
        return Projection(*quantize_int8(weight, dtype), bias)
    return Projection(weight.detach(), None, bias)


def layer_weights(layer: torch.nn.Module, int8: bool, dtype: torch.dtype) -> LayerWeights:
    """A transformers decoder layer's weights, q/k/v and gate/up laid side by side; int8: quantized,
    everything else in dtype (the activations')."""
    attn, mlp = layer.self_attn, layer.mlp
    return LayerWeights(
        input_norm=layer.input_layernorm.weight.detach().to(dtype),
        qkv=_projection([attn.q_proj, attn.k_proj, attn.v_proj], int8, dtype),
        out=_projection([attn.o_proj], int8, dtype),
        post_norm=layer.post_attention_layernorm.weight.detach().to(dtype),
        gate_up=_projection([mlp.gate_proj, mlp.up_proj], int8, dtype),
        down=_projection([mlp.down_proj], int8, dtype),
    )


def layer_shape(config) -> LayerShape:
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return LayerShape(heads, int(getattr(config, "num_key_value_heads", None) or heads), head_dim,
                      float(config.rms_norm_eps), head_dim ** -0.5)
