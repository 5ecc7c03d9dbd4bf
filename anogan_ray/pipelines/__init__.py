"""The Ray layer: each stage is a Ray program over files; the torch/numpy core never imports Ray.

How a stage joins or starts Ray lives below every layer that needs it, in
:mod:`anogan_ray.ray_env`; its names stay importable from here for the stage modules that still
import them from this package.
"""

from __future__ import annotations

from anogan_ray.ray_env import READER_ENV, ensure_ray

__all__ = ["READER_ENV", "ensure_ray"]
