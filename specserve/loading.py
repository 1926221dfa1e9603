"""Loading any model specification as an engine (see `specserve/runtime/engine.py`).

The packages that own a kind of model resolve its specification: drafter directories
(`specserve.drafter`), simulated benchmark models ("sim:...", `specserve.bench`), GGUF
files on llama.cpp (`specserve.runtime.llama_engine`), everything else on PyTorch
(`specserve.runtime.models`). The runtime itself imports none of the packages above it.
"""

from __future__ import annotations

import importlib.util

from specserve.runtime.engine import Engine

ENGINES = ("auto", "torch", "llama.cpp", "compiled")


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def resolve_engine(engine: str, spec: str, device: str = "cpu") -> str:
    """The engine `auto` means for a model: llama.cpp for a GGUF model (a packaged one or a .gguf
    file) on the CPU when llama-cpp-python is installed, else torch. llama.cpp gives hidden
    states and trees too, so every method and draft the torch engine serves still works."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine != "auto":
        return engine
    from specserve.runtime.models import gguf_file

    if device == "cpu" and not spec.startswith("sim:") and gguf_file(spec) is not None and llama_cpp_available():
        return "llama.cpp"
    return "torch"


def load_model(spec: str, dtype: str = "float32", device: str = "cpu", engine: str = "torch", threads: int = 0) -> Engine:
    """The engine for a model specification (services, benchmarks, tools and tests call this).
    `dtype` and `device` are the torch engine's; llama.cpp computes in the GGUF's own types on
    the CPU with `threads` threads (0: as many as this process may use). Drafters and simulated
    models are PyTorch modules whatever engine was asked for."""
    if spec.startswith("sim:"):
        from specserve.bench.simulated import load_simulated
        from specserve.runtime.models import DTYPES

        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        return load_simulated(spec, DTYPES[dtype])
    from specserve.drafter.loading import is_drafter_dir, load_drafter_engine

    if is_drafter_dir(spec):
        return load_drafter_engine(spec, dtype, device)
    if resolve_engine(engine, spec, device) == "compiled":
        from specserve.runtime.compiled import load_compiled

        return load_compiled(spec, dtype, device)
    if resolve_engine(engine, spec, device) == "llama.cpp":
        from specserve.runtime.llama_engine import LlamaEngine
        from specserve.runtime.models import gguf_file

        path = gguf_file(spec)
        if not llama_cpp_available():
            raise ValueError("engine llama.cpp: llama-cpp-python is not installed (make install builds it)")
        if path is None:
            raise ValueError(f"model {spec!r}: the llama.cpp engine needs a GGUF model (a packaged model or a .gguf file)")
        return LlamaEngine(spec, path, threads=threads or None)
    from specserve.runtime import models

    return models.load_model(spec, dtype, device)
