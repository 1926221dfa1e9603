"""Loading any model specification as an engine (see `specserve/runtime/engine.py`).

The packages that own a kind of model resolve its specification: drafter directories
(`specserve.drafter`), simulated benchmark models ("sim:...", `specserve.bench`), GGUF
files on llama.cpp (`specserve.runtime.llama_engine`), everything else on PyTorch
(`specserve.runtime.models`). The runtime itself imports none of the packages above it.
"""

from __future__ import annotations

from specserve.runtime.engine import Engine


def load_model(spec: str, dtype: str = "float32", device: str = "cpu") -> Engine:
    """The engine for a model specification (services, benchmarks, tools and tests call this)."""
    if spec.startswith("sim:"):
        from specserve.bench.simulated import load_simulated
        from specserve.runtime.models import DTYPES

        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        return load_simulated(spec, DTYPES[dtype])
    from specserve.drafter.loading import is_drafter_dir, load_drafter_engine

    if is_drafter_dir(spec):
        return load_drafter_engine(spec, dtype, device)
    from specserve.runtime import models

    return models.load_model(spec, dtype, device)
