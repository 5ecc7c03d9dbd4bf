"""The Ray layer: each stage is a Ray program over files; the torch/numpy core never imports Ray.

How a stage joins or starts Ray lives below every layer that needs it, in
:mod:`anogan_ray.ray_env`.
"""
