"""Cluster definitions stay tied to the code: manifests parse, entrypoints are real job scripts
whose argument parsing accepts the manifest's exact command line, and Ray versions match the pin."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import tomllib
import yaml

from anogan_ray.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((ROOT / "cluster").rglob("*.yaml"))


def _pinned_ray() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray,) = [d for d in deps if d.startswith("ray[")]
    return ray.split("==")[1]


def _ray_versions(node, found: list[str]) -> list[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "rayVersion":
                found.append(str(value))
            elif key == "image" and "rayproject/ray:" in str(value):
                found.append(str(value).split(":")[1].split("-")[0])
            _ray_versions(value, found)
    elif isinstance(node, list):
        for item in node:
            _ray_versions(item, found)
    elif isinstance(node, str):
        found += re.findall(r"ray\[[a-z,]+\]==([0-9.]+)", node)
    return found


def test_there_are_manifests():
    names = {p.relative_to(ROOT / "cluster").as_posix() for p in MANIFESTS}
    assert {"aws.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob-train.yaml"} <= names
    assert "kuberay/rayjob-score.yaml" in names


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_parses_and_pins_the_projects_ray(path):
    document = yaml.safe_load(path.read_text())
    assert isinstance(document, dict)
    versions = _ray_versions(document, [])
    if path.name != "runtime_env.yaml":
        assert versions, f"{path.name} names no Ray version"
    assert set(versions) <= {_pinned_ray()}, f"{path.name}: {versions} vs pin {_pinned_ray()}"


@pytest.mark.parametrize(
    "path", [p for p in MANIFESTS if p.name.startswith("rayjob")], ids=lambda p: p.name
)
def test_rayjob_entrypoint_is_a_job_script_that_accepts_its_flags(path):
    entrypoint = yaml.safe_load(path.read_text())["spec"]["entrypoint"]
    argv = shlex.split(entrypoint)
    assert argv[0] == "python" and argv[1].startswith("jobs/")
    script = ROOT / argv[1]
    assert script.is_file(), f"{path.name}: {argv[1]} does not exist"
    stage = script.stem
    assert f'main(["{stage}", *sys.argv[1:]])' in script.read_text()
    args = build_parser().parse_args([stage, *argv[2:]])  # exits (fails) on an unknown flag
    from anogan_ray.config import load_config

    load_config(args.config, args.overrides)  # the manifest's --set values are valid settings


def test_runtime_env_carries_no_secrets():
    text = (ROOT / "cluster" / "runtime_env.yaml").read_text()
    assert not re.search(r"(?i)(secret|access_key|password|token)\s*:", text)


JOB_ENVS = [p for p in MANIFESTS if p.name == "runtime_env.yaml" or p.name.startswith("rayjob")]


@pytest.mark.parametrize("path", JOB_ENVS, ids=lambda p: p.name)
def test_jobs_on_a_cluster_get_the_workers_environment_of_a_local_ray(path):
    from anogan_ray.ray_env import QUIET_WORKER_ENV, READER_ENV

    document = yaml.safe_load(path.read_text())
    runtime_env = (
        document if path.name == "runtime_env.yaml" else document["spec"]["runtimeEnvYAML"]
    )
    if isinstance(runtime_env, str):
        runtime_env = yaml.safe_load(runtime_env)
    env_vars = runtime_env.get("env_vars", {})
    expected = READER_ENV | QUIET_WORKER_ENV  # a job's workers are quiet unless asked otherwise
    assert {k: env_vars.get(k) for k in expected} == expected, path.name


# --- the cluster is locked (issue 16): Ray token authentication on every cluster definition ---

CLUSTERS = [p for p in MANIFESTS if p.name != "runtime_env.yaml"]


def _ray_start_commands(document: dict) -> list[str]:
    """The cluster launcher's `ray start` commands (head and workers)."""
    commands = document.get("head_start_ray_commands", []) + document.get(
        "worker_start_ray_commands", []
    )
    return [c for c in commands if re.search(r"\bray start\b", c)]


def _token_auth_on(document: dict, command: str | None = None) -> bool:
    """Whether the cluster (or this one `ray start` command of the cluster launcher) runs with
    RAY_AUTH_MODE=token: KubeRay's `authOptions` (KubeRay >= 1.5.1 sets the mode and a generated
    token in every Ray container), or the variable on the command line."""
    if document.get("kind") == "RayCluster":
        return document["spec"].get("authOptions", {}).get("mode") == "token"
    if document.get("kind") == "RayJob":
        return document["spec"]["rayClusterSpec"].get("authOptions", {}).get("mode") == "token"
    return command is not None and re.search(r"(^|\s|export\s)RAY_AUTH_MODE=token\s", command)


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_every_cluster_requires_the_ray_token(path):
    document = yaml.safe_load(path.read_text())
    if document.get("kind") in ("RayCluster", "RayJob"):
        assert _token_auth_on(document), f"{path.name}: no authOptions: {{mode: token}}"
        return
    commands = _ray_start_commands(document)
    assert len(commands) == 2, f"{path.name}: expected a head and a worker `ray start`"
    for command in commands:
        assert _token_auth_on(document, command), f"{path.name}: `{command}` without the token"
    # every node gets the token that `ray get-auth-token --generate` wrote on the user's machine
    assert document["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_no_dashboard_on_every_interface_without_the_token(path):
    document = yaml.safe_load(path.read_text())
    text = path.read_text()
    for command in _ray_start_commands(document):
        if re.search(r"--dashboard-host[= ]0\.0\.0\.0", command):
            assert _token_auth_on(document, command), f"{path.name}: open dashboard: {command}"
    if document.get("kind") in ("RayCluster", "RayJob"):  # KubeRay's default is 0.0.0.0
        assert _token_auth_on(document), f"{path.name}: KubeRay dashboard without the token"
    assert "RAY_AUTH_MODE=disabled" not in text and "mode: disabled" not in text
