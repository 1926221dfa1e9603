"""A feature-level draft (EAGLE-style): it reads the target's own hidden states.

The target's last hidden state (after its final norm, what its LM head reads)
says most of what the next token will be. This draft takes, at each position j,
the target's hidden state h[j-1] and the token x[j] that followed it, and predicts
h[j]; the target's own (tied) embedding rows turn that prediction into logits for
x[j+1]. Drafting several tokens feeds the predicted states back in.

    input j:  fc([embed(x[j]) ; h[j-1]])          [1, n, 2H] -> [1, n, H]
    body:     Llama decoder layer(s) + RMSNorm     -> predicted h[j]  [1, n, H]
    head:     h[j] @ W.T                           -> [1, n, V_out]

W is the target's (tied) embedding rows for `vocab_ids`, or a trained head of the
draft's own when it was initialised from a token draft (`own_head` in the config).

The draft's cache position j-1 holds pair j, so its sequence is one shorter than
the token sequence. The input embedding is the target's, frozen and not stored:
`load_feature_draft` reads it from the target's safetensors.

On disk: `drafter.json` ("format": "specserve-feature-drafter/1") and
`model.safetensors` (fc, the layers, the norm, the head if its own, vocab_ids; bf16).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import GenerationConfig, LlamaConfig, LlamaModel

from specserve.drafter.model import CONFIG_NAME, WEIGHTS_NAME, llama_config, target_embedding, write_drafter

FORMAT = "specserve-feature-drafter/1"


class FeatureDraft(nn.Module):
    """Predicts the target's next hidden state; see the module docstring."""

    needs_target_hidden_states = True

    def __init__(self, config: LlamaConfig, vocab_ids: torch.Tensor, embedding: torch.Tensor):
        super().__init__()
        self.config = config
        self.generation_config = GenerationConfig(eos_token_id=config.eos_token_id)
        hidden = config.hidden_size
        self.embed_tokens = nn.Embedding.from_pretrained(embedding.float(), freeze=True)  # [V, H], the target's
        self.fc = nn.Linear(2 * hidden, hidden, bias=True)  # [H, 2H]
        body_config = LlamaConfig(**{**config.to_dict(), "vocab_size": 1, "pad_token_id": None,
                                     "bos_token_id": None, "eos_token_id": None})
        self.body = LlamaModel(body_config)
        self.body.embed_tokens = None  # inputs arrive as embeddings
        self.register_buffer("vocab_ids", vocab_ids.long().clone(), persistent=True)  # [V_out]
        # A trained head of its own (when initialised from a token draft); else the target's rows.
        self.lm_head = nn.Linear(hidden, vocab_ids.numel(), bias=False) if getattr(config, "own_head", False) else None

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def head_weight(self) -> torch.Tensor:
        if self.lm_head is not None:
            return self.lm_head.weight  # [V_out, H]
        return self.embed_tokens.weight[self.vocab_ids]  # [V_out, H]

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, n]: x[j]
        target_hidden: torch.Tensor,  # [B, n, H]: h[j-1]
        past_key_values=None,
        use_cache: bool = True,
        logits_to_keep: int = 0,
        position_ids: torch.Tensor | None = None,  # [B, n]
        attention_mask: torch.Tensor | None = None,  # [B, 1, n, past + n] for tree drafting
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, keep, V_out], predicted hidden states [B, n, H])."""
        embeds = self.embed_tokens(input_ids).to(target_hidden.dtype)  # [B, n, H]
        fused = self.fc(torch.cat([embeds, target_hidden], dim=-1))  # [B, n, H]
        out = self.body(inputs_embeds=fused, past_key_values=past_key_values, use_cache=use_cache, position_ids=position_ids,
                        attention_mask=attention_mask)
        predicted = out.last_hidden_state  # [B, n, H]
        kept = predicted[:, -logits_to_keep:] if logits_to_keep else predicted
        logits = kept @ self.head_weight().to(kept.dtype).T  # [B, keep, V_out]
        return logits, predicted

    @torch.inference_mode()
    def forward_batch(self, forwards: list) -> list:
        """Several sessions' rows in one pass (continuous batching; `runtime/engine.py`'s
        Forward with `features`): shared products, per-session attention (`runtime/ragged.py`)."""
        from specserve.runtime.ragged import ragged_decoder, split_results

        device, dtype = self.fc.weight.device, self.fc.weight.dtype
        input_ids = torch.tensor([[t for f in forwards for t in f.token_ids]], dtype=torch.long, device=device)  # [1, N]
        features = torch.cat([f.features for f in forwards]).to(device=device, dtype=dtype)[None]  # [1, N, H]
        fused = self.fc(torch.cat([self.embed_tokens(input_ids).to(dtype), features], dim=-1))  # [1, N, H]
        predicted = ragged_decoder(self.body, fused, forwards)  # [N, H]
        head = self.head_weight()
        return split_results(predicted, forwards, lambda rows: rows @ head.to(rows.dtype).T)


def build_feature_draft(target: nn.Module, vocab_ids: torch.Tensor, layer_id: int = -1) -> FeatureDraft:
    """A feature draft initialised from a loaded Llama-family target: its body is a copy of
    one of the target's decoder layers (the last by default) and its final norm."""
    config = llama_config(target.config.to_dict(), num_hidden_layers=1, tie_word_embeddings=False, use_cache=True)
    config.draft_layer_id = layer_id
    draft = FeatureDraft(config, vocab_ids, target.get_input_embeddings().weight.detach()).float()
    src = target.model
    with torch.no_grad():
        draft.body.layers[0].load_state_dict({k: v.float() for k, v in src.layers[layer_id].state_dict().items()})
        draft.body.norm.weight.copy_(src.norm.weight.float())
        # Start as "the target's next state is its previous one, nudged by the token".
        hidden = config.hidden_size
        draft.fc.weight.zero_()
        draft.fc.weight[:, hidden:].copy_(torch.eye(hidden))
        draft.fc.weight[:, :hidden].copy_(0.1 * torch.eye(hidden))
        draft.fc.bias.zero_()
    return draft


def feature_draft_from_token_draft(draft: nn.Module) -> FeatureDraft:
    """A feature draft that starts as a trained token draft (`DraftLM`): its layers, norm and
    head, with fc passing the token embedding through and ignoring the hidden state at first."""
    config = llama_config(draft.config.to_dict(), own_head=True)
    model = FeatureDraft(config, draft.vocab_ids, draft.get_input_embeddings().weight.detach()).float()
    hidden = config.hidden_size
    with torch.no_grad():
        model.body.layers.load_state_dict({k: v.float() for k, v in draft.model.layers.state_dict().items()})
        model.body.norm.weight.copy_(draft.model.norm.weight.float())
        model.lm_head.weight.copy_(draft.lm_head.weight.float())
        model.fc.weight.zero_()
        model.fc.weight[:, :hidden].copy_(torch.eye(hidden))
        model.fc.bias.zero_()
    return model


def save_feature_draft(model: FeatureDraft, directory: str | Path, target_spec: str = "smollm2", extra: dict | None = None) -> None:
    write_drafter(directory, model, FORMAT, target_spec, skip=lambda name: name.startswith("embed_tokens."),
                  embedding="shared with the target (read from its safetensors at load); the head is its rows for vocab_ids",
                  extra=extra)


def is_feature_draft(directory: str | Path) -> bool:
    path = Path(directory) / CONFIG_NAME
    return path.is_file() and json.loads(path.read_text()).get("format") == FORMAT


def load_feature_draft(directory: str | Path, dtype: torch.dtype = torch.float32, target_dir: str | Path | None = None) -> FeatureDraft:
    directory = Path(directory)
    meta = json.loads((directory / CONFIG_NAME).read_text())
    config = llama_config(meta["llama_config"])
    if target_dir is None:
        from specserve.runtime.models import resolve_model_dir

        target_dir = resolve_model_dir(meta["target"])
    state = load_file(str(directory / WEIGHTS_NAME))
    model = FeatureDraft(config, state["vocab_ids"], target_embedding(Path(target_dir)))
    model.load_state_dict(state, strict=False)  # the embedding came from the target
    missing = set(model.state_dict()) - set(state) - {"embed_tokens.weight"}
    if missing:
        raise ValueError(f"{directory}: weights missing: {sorted(missing)}")
    return model.to(dtype).eval()
