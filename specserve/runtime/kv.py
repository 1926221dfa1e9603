"""One sequence's KV cache with rollback: the state a service session holds."""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache


class KVSession:
    """A causal LM plus the KV cache of one sequence: the PyTorch engine's session
    (see `runtime/engine.py`).

    `length` is the number of tokens in the cache. Rolling back is cropping the
    cache; nothing is recomputed.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.cache = DynamicCache()
        self.length = 0
        # Restricted-vocabulary drafts map output index -> token id; None: identity.
        self.vocab_ids: torch.Tensor | None = getattr(model, "vocab_ids", None)
        if self.vocab_ids is not None:
            self.vocab_ids = self.vocab_ids.cpu()
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def extend(self, token_ids: list[int], logits_for: int = 1) -> torch.Tensor:
        """Append tokens; return float32 logits [logits_for, V_out] of the last positions, on the CPU
        (acceptance and sampling run there, with CPU random generators)."""
        input_ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)  # [1, n]
        out = self.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True, logits_to_keep=logits_for)
        self.length += len(token_ids)
        return out.logits[0, -logits_for:].float().cpu()  # [logits_for, V_out]

    @torch.inference_mode()
    def extend_with_hidden(self, token_ids: list[int], logits_for: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Like `extend`, and also the last hidden state (after the final norm) of every new
        position: (float32 logits [logits_for, V] and hidden [n, H] in the model's dtype, on the CPU).
        Needs a transformers causal LM with `.model` and `.lm_head` (the Llama family)."""
        input_ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)  # [1, n]
        hidden = self.model.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True).last_hidden_state[0]  # [n, H]
        self.length += len(token_ids)
        logits = self.model.lm_head(hidden[-logits_for:])  # [logits_for, V]
        return logits.float().cpu(), hidden.cpu()

    @torch.inference_mode()
    def extend_masked(self, token_ids: list[int], positions: list[int], visible: torch.Tensor,
                      module: torch.nn.Module | None = None, **inputs):
        """Append tokens that do not form a chain (tree nodes): each new position i sits at
        `positions[i]` and attends to every cached token before the `visible` block plus the
        new tokens j with visible[i, j]. visible: [n, m] bool over the last m cache slots
        after this call (m >= n: earlier tree nodes may be in it). Returns the model's output
        of `module` (default: the model; e.g. its base `model.model` for hidden states).
        Extra keyword inputs go to it (a feature draft's hidden states)."""
        n, m = visible.shape
        total = self.length + n
        allowed = torch.ones(n, total, dtype=torch.bool)  # [n, total]
        allowed[:, total - m:] = visible
        dtype = next(self.model.parameters()).dtype
        # A float mask is read the same way by every attention implementation.
        mask = torch.zeros(1, 1, n, total, dtype=dtype, device=self.device)  # [1, 1, n, total]
        mask.masked_fill_(~allowed.to(self.device), torch.finfo(dtype).min)
        input_ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)  # [1, n]
        position_ids = torch.tensor([positions], dtype=torch.long, device=self.device)  # [1, n]
        out = (module or self.model)(input_ids, attention_mask=mask, position_ids=position_ids, past_key_values=self.cache,
                         use_cache=True, **inputs)
        self.length = total
        return out

    @torch.inference_mode()
    def extend_tree(self, token_ids: list[int], positions: list[int], visible: torch.Tensor,
                    return_hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tree nodes (see `extend_masked`); float32 logits [n, V] of every node and, when asked,
        hidden [n, H] in the model's dtype, both on the CPU. Needs `.model` and `.lm_head`."""
        hidden = self.extend_masked(token_ids, positions, visible, module=self.model.model).last_hidden_state[0]  # [n, H]
        logits = self.model.lm_head(hidden).float().cpu()  # [n, V]
        return logits, (hidden.cpu() if return_hidden else None)

    @torch.inference_mode()
    def extend_features(self, token_ids: list[int], features: torch.Tensor, logits_for: int = 1,
                        positions: list[int] | None = None, visible: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """A feature draft's rows (`runtime/engine.py`'s Forward.features): tokens with the target's
        hidden states features [n, H], a chain or (with positions and visible) tree nodes. Returns
        (float32 logits [logits_for, V_out] on the CPU or None, predicted hidden states [n, H])."""
        dtype = next(self.model.parameters()).dtype
        features = features.to(device=self.device, dtype=dtype)[None]  # [1, n, H]
        n = len(token_ids)
        if visible is None:
            input_ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)  # [1, n]
            logits, predicted = self.model(input_ids, features, past_key_values=self.cache, use_cache=True,
                                           logits_to_keep=max(logits_for, 1))  # [1, l, V_out], [1, n, H]
            self.length += n
        else:
            logits, predicted = self.extend_masked(token_ids, positions, visible, module=self.model,
                                                   target_hidden=features)  # [1, n, V_out], [1, n, H]
        rows = logits[0, logits.shape[1] - logits_for:].float().cpu() if logits_for else None
        return rows, predicted[0].cpu()

    @torch.inference_mode()
    def keep(self, start: int, offsets: list[int]) -> None:
        """Keep cache slots start + offsets[i] (ascending) at start + i and drop everything after:
        the accepted path of a tree becomes a plain sequence."""
        if offsets != list(range(len(offsets))):
            index = torch.tensor([start + o for o in offsets], dtype=torch.long, device=self.device)
            for layer in self.cache.layers:
                # keys/values: [B, heads, S, head_dim]
                layer.keys[:, :, start:start + len(offsets)] = layer.keys.index_select(2, index)
                layer.values[:, :, start:start + len(offsets)] = layer.values.index_select(2, index)
        self.rollback(start + len(offsets))

    def rollback(self, length: int) -> None:
        """Keep the first `length` tokens."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back to {length}: the cache holds {self.length} tokens")
        if length < self.length:
            self.cache.crop(length - self.length)  # transformers 5: a negative count removes tokens
            self.length = length

    def fork(self) -> KVSession:
        """Another session holding a copy of this cache (a draft's outcomes drafted side by side)."""
        other = copy.copy(self)
        other.cache = copy.deepcopy(self.cache)
        return other

    def close(self) -> None:
        self.cache = DynamicCache()
        self.length = 0
