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
