"""The package layout's promise: the torch core (and the data and analysis layers) work without Ray."""

from __future__ import annotations

import subprocess
import sys
import textwrap

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
        from anogan_ray.core.model import build_models

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
