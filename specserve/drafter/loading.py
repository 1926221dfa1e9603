"""Drafters as PyTorch engines: the hook `specserve.loading.load_model` calls for a
directory holding drafter.json (written by `specserve train-draft` / `train-token-draft`)."""

from __future__ import annotations

from pathlib import Path

from specserve.runtime.models import DTYPES, LoadedModel, from_module


def is_drafter_dir(spec: str) -> bool:
    return (Path(spec).expanduser() / "drafter.json").is_file()


def load_drafter_engine(spec: str, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """A token draft (restricted-vocabulary causal LM) or a feature draft, on the PyTorch engine."""
    from specserve.drafter.feature_model import is_feature_draft, load_feature_draft
    from specserve.drafter.model import load_drafter

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    load = load_feature_draft if is_feature_draft(spec) else load_drafter
    model = load(Path(spec), DTYPES[dtype]).to(device).eval()
    return from_module(spec, model, DTYPES[dtype])
