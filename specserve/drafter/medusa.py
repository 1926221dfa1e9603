"""Medusa heads: extra output heads on the target's last hidden state.

Head k (0-based) reads the target's last hidden state h[t] (after its final norm,
what the LM head reads) and guesses the token k + 2 positions ahead (the LM head
itself gives t + 1):

    head k:  x = h[t];  x = x + SiLU(W1 x + b1)   (num_layers times)   [.., H]
             logits = W2 x                                             [.., V_out]

W1 starts at zero (the block is the identity) and W2 at the target's LM head, so
an untrained head predicts the next token again. A head may cover the most
frequent `V_out` tokens only (`vocab_ids` [V_out] maps output index -> token id),
as the shipped drafts do: verification stays over the full vocabulary.

On disk, the published Medusa layout: `config.json` with `medusa_num_heads`,
`medusa_num_layers` and `base_model_name_or_path`, and the heads' weights in
`medusa_lm_head.safetensors` (or `medusa_lm_head.pt`) under the names
`{head}.{layer}.linear.weight|bias` and `{head}.{num_layers}.weight`, optionally
prefixed `medusa_head.`. Heads written here add `vocab_ids` to that file and a
`specserve` block (the target spec, provenance) to the config.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")


class ResBlock(nn.Module):
    """x + SiLU(linear(x)); linear starts at zero, so the block starts as the identity."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.linear(x))


class MedusaHeads(nn.Module):
    """`num_heads` heads of `num_layers` residual blocks and an output projection each."""

    def __init__(self, hidden: int, vocab_out: int, num_heads: int, num_layers: int = 1,
                 vocab_ids: torch.Tensor | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.heads = nn.ModuleList(
            nn.Sequential(*[ResBlock(hidden) for _ in range(num_layers)], nn.Linear(hidden, vocab_out, bias=False))
            for _ in range(num_heads))
        # Output index -> token id for a restricted head; None: the full vocabulary.
        self.vocab_ids = None if vocab_ids is None else vocab_ids.long().clone()

    @property
    def hidden_size(self) -> int:
        return self.heads[0][-1].in_features

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> logits [num_heads, ..., V_out]."""
        return torch.stack([head(hidden) for head in self.heads])

    def init_from_lm_head(self, lm_head_weight: torch.Tensor) -> None:
        """Every output projection starts as the target's LM head rows [V, H] (for `vocab_ids`)."""
        rows = lm_head_weight if self.vocab_ids is None else lm_head_weight[self.vocab_ids]
        with torch.no_grad():
            for head in self.heads:
                head[-1].weight.copy_(rows.float())

    def to_token_ids(self, indices: torch.Tensor) -> torch.Tensor:
        """Head output indices -> token ids (any shape)."""
        return indices if self.vocab_ids is None else self.vocab_ids[indices]


def is_medusa_checkpoint(directory: str | Path) -> bool:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        return False
    config = json.loads(path.read_text())
    return "medusa_num_heads" in config and any((Path(directory) / n).is_file() for n in WEIGHTS_NAMES)


def save_medusa(heads: MedusaHeads, directory: str | Path, base_model: str, extra: dict | None = None,
                dtype: torch.dtype = torch.bfloat16) -> None:
    """Writes the published layout (see the module docstring) plus `vocab_ids` and provenance."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to(dtype).contiguous() for name, t in heads.heads.state_dict().items()}
    if heads.vocab_ids is not None:
        tensors["vocab_ids"] = heads.vocab_ids.contiguous()
    save_file(tensors, str(directory / WEIGHTS_NAMES[0]))
    config = {"medusa_num_heads": heads.num_heads, "medusa_num_layers": heads.num_layers,
              "base_model_name_or_path": base_model, "hidden_size": heads.hidden_size,
              "vocab_size": heads.heads[0][-1].out_features}
    if extra:
        config["specserve"] = extra
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str) + "\n")


def load_medusa(directory: str | Path, dtype: torch.dtype = torch.float32) -> tuple[MedusaHeads, dict]:
    """(heads, config) from a checkpoint directory in the published layout."""
    directory = Path(directory)
    config = json.loads((directory / CONFIG_NAME).read_text())
    num_heads, num_layers = int(config["medusa_num_heads"]), int(config.get("medusa_num_layers", 1))
    path = next((directory / n for n in WEIGHTS_NAMES if (directory / n).is_file()), None)
    if path is None:
        raise FileNotFoundError(f"{directory}: no {' or '.join(WEIGHTS_NAMES)}")
    state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("medusa_head."): v for k, v in state.items()}
    vocab_ids = state.pop("vocab_ids", None)
    out_weight = state.get(f"0.{num_layers}.weight")
    if out_weight is None:
        raise ValueError(f"{path}: no weight '0.{num_layers}.weight' for medusa_num_layers={num_layers}")
    vocab_out, hidden = out_weight.shape
    heads = MedusaHeads(hidden, vocab_out, num_heads, num_layers, vocab_ids)
    heads.heads.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return heads.to(dtype).eval(), config
