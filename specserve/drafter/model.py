"""A small draft model for a Llama-family target, with a restricted-vocabulary head.

Architecture: the target's token embedding (frozen, shared: not stored with the
drafter), a few Llama decoder layers at the target's width (initialised from some
of the target's own layers), a final RMSNorm, and an output head over the most
frequent `V_out` tokens only. `vocab_ids` [V_out] maps output index -> token id;
the runtime (`KVSession`, `DraftWorker`) reads it. The KV cache is the standard
transformers `DynamicCache`, so rollback is `cache.crop(-n)`.

On disk (a "drafter directory"): `drafter.json` (config, the target the embedding
comes from, provenance) and `model.safetensors` (layers, norm, head, vocab_ids;
bf16 weights). The embedding is read from the target's own safetensors at load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GenerationConfig, LlamaConfig, LlamaModel
from transformers.modeling_outputs import CausalLMOutputWithPast

CONFIG_NAME = "drafter.json"
WEIGHTS_NAME = "model.safetensors"
EMBED_KEY = "model.embed_tokens.weight"


class DraftLM(nn.Module):
    """Llama decoder layers + a restricted output head; obeys the causal-LM call contract."""

    def __init__(self, config: LlamaConfig, vocab_ids: torch.Tensor):
        super().__init__()
        self.config = config
        self.generation_config = GenerationConfig(eos_token_id=config.eos_token_id)
        self.model = LlamaModel(config)  # embed_tokens [V, H], layers, norm
        self.lm_head = nn.Linear(config.hidden_size, vocab_ids.numel(), bias=False)  # [V_out, H]
        self.register_buffer("vocab_ids", vocab_ids.long().clone(), persistent=True)  # [V_out]

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, S]
        past_key_values=None,
        use_cache: bool = True,
        logits_to_keep: int = 0,
        attention_mask: torch.Tensor | None = None,  # [B, past + S]
        position_ids: torch.Tensor | None = None,  # [B, S]
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            attention_mask=attention_mask,
            position_ids=position_ids,
        )
        hidden = out.last_hidden_state  # [B, S, H]
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]  # [B, keep, H]
        logits = self.lm_head(hidden)  # [B, keep, V_out]
        return CausalLMOutputWithPast(logits=logits, past_key_values=out.past_key_values)


def target_embedding(target_dir: Path) -> torch.Tensor:
    """The target's input embedding [V, H], read straight from its safetensors."""
    for path in sorted(Path(target_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            if EMBED_KEY in f.keys():
                return f.get_tensor(EMBED_KEY)
    raise FileNotFoundError(f"{EMBED_KEY} not found in {target_dir}")


def build_from_target(target: nn.Module, layer_ids: list[int], vocab_ids: torch.Tensor) -> DraftLM:
    """A drafter initialised from a loaded target (a transformers LlamaForCausalLM).

    Copies the embedding, the chosen decoder layers, the final norm, and the
    embedding rows of `vocab_ids` into the head (the target's head is tied).
    """
    cfg = target.config.to_dict()
    cfg.update(num_hidden_layers=len(layer_ids), tie_word_embeddings=False, use_cache=True)
    cfg.pop("architectures", None)
    cfg.pop("dtype", None)
    config = LlamaConfig(**cfg)
    config.draft_layer_ids = list(layer_ids)
    draft = DraftLM(config, vocab_ids).float()
    src = target.model
    with torch.no_grad():
        draft.model.embed_tokens.weight.copy_(src.embed_tokens.weight.float())
        for mine, i in zip(draft.model.layers, layer_ids):
            mine.load_state_dict({k: v.float() for k, v in src.layers[i].state_dict().items()})
        draft.model.norm.weight.copy_(src.norm.weight.float())
        head = target.get_output_embeddings().weight  # [V, H]
        draft.lm_head.weight.copy_(head[vocab_ids].float())
    return draft


def save_drafter(model: DraftLM, directory: str | Path, target_spec: str = "smollm2", extra: dict | None = None) -> None:
    """Writes drafter.json + model.safetensors (bf16; the shared embedding is not stored)."""
    write_drafter(directory, model, "specserve-drafter/1", target_spec, skip=lambda name: name == EMBED_KEY,
                  embedding="shared with the target (read from its safetensors at load)", extra=extra)


def write_drafter(directory: str | Path, model: nn.Module, format_name: str, target_spec: str, skip, embedding: str,
                  extra: dict | None = None) -> None:
    """A drafter directory: model.safetensors (floating tensors as bf16, without the names `skip`
    accepts) and drafter.json (format, target, config, provenance)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: t.detach().to(torch.bfloat16).contiguous() if t.is_floating_point() else t.detach().contiguous()
        for name, t in model.state_dict().items()
        if not skip(name)
    }
    save_file(tensors, str(directory / WEIGHTS_NAME))
    meta = {
        "format": format_name,
        "target": target_spec,
        "embedding": embedding,
        "llama_config": model.config.to_dict(),
        "vocab_out": int(model.vocab_ids.numel()),
        **(extra or {}),
    }
    (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2, default=str) + "\n")


def llama_config(cfg: dict, **overrides) -> LlamaConfig:
    """A LlamaConfig from a config dict, without the keys that describe a checkpoint, not the model."""
    cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "dtype", "torch_dtype", "transformers_version")}
    return LlamaConfig(**{**cfg, **overrides})


def load_drafter(directory: str | Path, dtype: torch.dtype = torch.float32, target_dir: str | Path | None = None) -> DraftLM:
    """Loads a drafter directory; the embedding comes from the target named in drafter.json."""
    directory = Path(directory)
    meta = json.loads((directory / CONFIG_NAME).read_text())
    config = llama_config(meta["llama_config"])
    state = load_file(str(directory / WEIGHTS_NAME))
    model = DraftLM(config, state["vocab_ids"])
    if EMBED_KEY not in state:
        if target_dir is None:
            from specserve.runtime.models import resolve_model_dir

            target_dir = resolve_model_dir(meta["target"])
        state[EMBED_KEY] = target_embedding(Path(target_dir))
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval()
