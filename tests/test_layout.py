"""The package layout's promise: the torch core (and the data and analysis layers) work without Ray."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

NO_RAY = textwrap.dedent(
    """
    import importlib.abc
    import sys

    class NoRay(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "ray" or name.startswith("ray."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, NoRay())
    """
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", NO_RAY + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_blocker_blocks_ray():
    result = _run("import ray")
    assert result.returncode != 0 and "blocked by the test" in result.stderr


def test_core_data_and_analysis_import_and_run_without_ray():
    result = _run(
        """
        import importlib, pkgutil
        import numpy as np, torch
        import anogan_ray.core, anogan_ray.data, anogan_ray.analysis, anogan_ray.tables
        for package in (anogan_ray.core, anogan_ray.data, anogan_ray.analysis):
            for module in pkgutil.iter_modules(package.__path__):
                importlib.import_module(f"{package.__name__}.{module.name}")
        from anogan_ray.config import load_config
        from anogan_ray.core.invert import invert_batch
        from anogan_ray.core.metrics import auc
        from anogan_ray.core.networks import build_models

        cfg = load_config("tiny").model
        generator, discriminator = build_models(cfg, seed=0)
        x = torch.zeros(2, 1, 64, 64)
        result = invert_batch((generator, discriminator), x, ["a", "b"], steps=2)
        assert np.isfinite(result.anomaly_score).all()
        assert auc([0.1, 0.9], [0, 1]) == 1.0
        assert "ray" not in sys.modules
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


# --- a house without loops: every import goes down the layers of DESIGN.md §2 ---------------

PACKAGE = Path(__file__).resolve().parents[1] / "anogan_ray"
# lower layers never import higher ones; a layer's modules may import each other without loops
LAYERS = {
    "anogan_ray.config": 0,
    "anogan_ray.storage": 0,
    "anogan_ray.ray_env": 0,
    "anogan_ray.tables": 1,
    "anogan_ray.data": 2,
    "anogan_ray.core": 2,
    "anogan_ray.pipelines": 3,
    "anogan_ray.analysis": 3,
    "anogan_ray.demo": 4,
    "anogan_ray.cli": 4,
}


def _package_imports() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at the top or inside a function."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for alias in node.names:  # `from anogan_ray.data import vendor` is a module
                    inner = f"{node.module}.{alias.name}"
                    imported.add(inner if inner in modules else node.module)
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def _layer(module: str) -> int:
    return max(rank for prefix, rank in LAYERS.items() if (module + ".").startswith(prefix + "."))


def test_no_module_imports_one_of_a_higher_layer():
    upward = [
        f"{module} -> {other}"
        for module, imported in _package_imports().items()
        if module != "anogan_ray"
        for other in imported
        if _layer(other) > _layer(module)
    ]
    assert not upward, upward


def test_no_two_modules_import_each_other_even_through_others():
    graph = _package_imports()
    circles = []

    def visit(module: str, path: list[str]) -> None:
        for other in sorted(graph[module]):
            if other in path:
                circles.append(" -> ".join([*path[path.index(other) :], other]))
            elif other not in done:
                visit(other, [*path, other])
        done.add(module)

    done: set[str] = set()
    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert not circles, circles
