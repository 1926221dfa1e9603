"""Deployment files, checked offline: the Kubernetes manifests against the Kubernetes API
schemas (kubernetes-validate bundles them), the compose files against the compose
specification (compose-spec), and both against what the services expect."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from compose_spec import PyCompose

from specserve.launcher import free_port

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30.0"  # gRPC probes are stable from 1.27


def base_resources() -> list[dict]:
    kustomization = yaml.safe_load((KUBERNETES / "base" / "kustomization.yaml").read_text())
    resources = []
    for name in kustomization["resources"]:
        resources += [doc for doc in yaml.safe_load_all((KUBERNETES / "base" / name).read_text()) if doc]
    return resources


def apply_json_patch(resource: dict, operations: list[dict]) -> dict:
    """RFC 6902 "add" operations, the only kind the overlay uses."""
    resource = copy.deepcopy(resource)
    for op in operations:
        assert op["op"] == "add", op
        *parents, last = [part.replace("~1", "/").replace("~0", "~") for part in op["path"].lstrip("/").split("/")]
        node = resource
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if isinstance(node, list):
            node.append(op["value"]) if last == "-" else node.insert(int(last), op["value"])
        else:
            node[last] = op["value"]
    return resource


def gpu_resources() -> list[dict]:
    overlay = yaml.safe_load((KUBERNETES / "gpu" / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["../base"]
    resources = base_resources()
    for patch in overlay["patches"]:
        target = patch["target"]
        matches = [i for i, r in enumerate(resources) if r["kind"] == target["kind"] and r["metadata"]["name"] == target["name"]]
        assert len(matches) == 1, target
        resources[matches[0]] = apply_json_patch(resources[matches[0]], yaml.safe_load(patch["patch"]))
    return resources


@pytest.mark.parametrize("variant", ["base", "gpu"])
def test_kubernetes_manifests_are_valid(variant):
    resources = base_resources() if variant == "base" else gpu_resources()
    assert {r["kind"] for r in resources} == {"Deployment", "Service"}
    for resource in resources:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def test_kubernetes_discovery_and_probes_fit_the_services():
    resources = base_resources()
    services = {r["metadata"]["name"]: r for r in resources if r["kind"] == "Service"}
    deployments = {r["metadata"]["name"]: r for r in resources if r["kind"] == "Deployment"}
    orchestrator = deployments["specserve-orchestrator"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in orchestrator["env"]}
    for role, variable in (("target", "SPECSERVE_TARGET_ADDR"), ("draft", "SPECSERVE_DRAFT_ADDR")):
        name, port = env[variable].removeprefix("dns:///").split(":")
        service = services[name]
        # Headless: the name resolves to every ready replica, which the orchestrator balances itself.
        assert service["spec"]["clusterIP"] == "None"
        assert [p["port"] for p in service["spec"]["ports"]] == [int(port)]
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["specserve", role]
        container_env = {e["name"]: e["value"] for e in container["env"]}
        assert container_env[f"SPECSERVE_{role.upper()}_PORT"] == port
        assert container["readinessProbe"]["grpc"]["port"] == int(port) == container["livenessProbe"]["grpc"]["port"]
        assert service["spec"]["selector"] == deployments[name]["spec"]["selector"]["matchLabels"]
    assert env["SPECSERVE_REDIS_URL"].startswith("redis://specserve-redis:6379")
    gpu = {r["metadata"]["name"]: r for r in gpu_resources() if r["kind"] == "Deployment"}
    for name in ("specserve-target", "specserve-draft"):
        limits = gpu[name]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == 1


def compose(*names: str) -> dict:
    """The compose files merged as `docker compose -f a -f b` does for the keys they use, their
    variables interpolated as with none set in the environment (each `${NAME:-default}` its default)."""
    merged: dict = {}
    for name in names:
        _merge(merged, yaml.safe_load(interpolate((ROOT / name).read_text())))
    return merged


def interpolate(text: str) -> str:
    assert "$$" not in text and not re.search(r"\$(?!\{[A-Z0-9_]+:-[^}]*\})", text), "only ${NAME:-default} is used"
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", lambda match: match.group(1), text)


def _merge(into: dict, other: dict) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


@pytest.mark.parametrize("files", [("docker-compose.yml",), ("docker-compose.yml", "docker-compose.gpu.yml")])
def test_compose_files_follow_the_compose_specification(files):
    spec = compose(*files)
    PyCompose.from_json(json.dumps(spec))  # raises ValueError on anything the specification forbids
    for name in ("target", "draft", "orchestrator"):
        check = spec["services"][name]["healthcheck"]["test"]
        assert check[:3] == ["CMD", "specserve", "health"]
    # Nothing from an image registry but the base: every service runs the image the Dockerfile builds.
    for name, service in spec["services"].items():
        assert service["build"]["context"] == ".", name
        assert service["image"].startswith("specserve:"), name


def test_the_compose_validator_rejects_what_the_specification_forbids():
    spec = compose("docker-compose.yml")
    spec["services"]["target"]["restart"] = "sometimes"
    with pytest.raises(ValueError):
        PyCompose.from_json(json.dumps(spec))


def test_the_kubernetes_validator_rejects_what_the_schemas_forbid():
    deployment = next(r for r in base_resources() if r["metadata"]["name"] == "specserve-target")
    deployment = copy.deepcopy(deployment)
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "not a port"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_the_healthcheck_answers_quickly_without_loading_torch(tiny_stack):
    """`specserve health`, the compose healthcheck, runs every few seconds within a timeout: it must
    not pay for importing torch and transformers (seconds on a busy machine)."""
    code = ("import sys; from specserve.cli import main; rc = main(['health', sys.argv[1]]); "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')]; sys.exit(rc)")
    assert subprocess.run([sys.executable, "-c", code, tiny_stack.address], timeout=60).returncode == 0
    nothing_there = f"127.0.0.1:{free_port()}"
    assert subprocess.run([sys.executable, "-c", code, nothing_there], timeout=60).returncode == 1
