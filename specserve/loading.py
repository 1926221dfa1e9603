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


class IncompatibleOptions(ValueError):
    """Flags that cannot be honoured together; the message names the flags and the fix."""


def resolve_engine(engine: str, spec: str, device: str = "cpu", dtype: str = "auto") -> str:
    """The engine that serves a model, honouring `dtype` or refusing.

    `auto` means llama.cpp for a GGUF model (a packaged one or a .gguf file) on the CPU when
    llama-cpp-python is installed and no dtype was asked for (`dtype` "auto"); with an explicit
    dtype it means torch, which computes in that dtype. llama.cpp computes in the GGUF file's own
    (quantized) types, so `--engine llama.cpp` with an explicit dtype is refused rather than
    silently serving other weights than the ones asked for.
    """
    if engine not in ENGINES:
        raise IncompatibleOptions(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    from specserve.drafter.loading import is_drafter_dir

    if spec.startswith("sim:") or is_drafter_dir(spec):
        return "torch"  # drafters and simulated models are PyTorch modules, whatever engine was asked for
    if dtype == "int8" and engine != "compiled":
        raise IncompatibleOptions("--dtype int8 (weight-only int8) runs on --engine compiled only")
    if engine == "llama.cpp" and dtype != "auto":
        raise IncompatibleOptions(
            f"--engine llama.cpp computes in the GGUF file's own quantized types, not in {dtype}: "
            f"use --engine torch (or --engine auto) for --dtype {dtype}, or --dtype auto for llama.cpp")
    if engine != "auto":
        return engine
    from specserve.runtime.models import gguf_file

    if dtype == "auto" and device == "cpu" and gguf_file(spec) is not None and llama_cpp_available():
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
    # An explicit dtype keeps `auto` on torch (see resolve_engine); llama.cpp ignores `dtype`.
    resolved = resolve_engine(engine, spec, device, dtype if engine == "auto" else "auto")
    if resolved == "compiled":
        from specserve.runtime.compiled import load_compiled

        return load_compiled(spec, dtype, device)
    if resolved == "llama.cpp":
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
