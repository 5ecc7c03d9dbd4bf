"""GPU benchmark: scoring patches/s per fast path of the mapping at the paper preset, agreement
with fp32, share of the GPU's bf16 dense peak, and GAN training patches/s; JSON out.

    python benchmarks/bench_gpu.py --out bench_gpu.json     # one GPU, ~5 min (estimated, not run)
    python benchmarks/bench_gpu.py --device cpu --preset tiny --steps 5 --patches 16   # smoke run

Each fast path maps ``--patches`` random patches (by default one fixed-shape batch of the
device's :func:`~anogan_ray.core.invert.mapping_rows`, 1024 on a large GPU) with Γ = ``--steps``
through :func:`~anogan_ray.core.invert.invert_batch` (the scorer's own call) after a warm-up call
on the same shape (which compiles, for ``+compile``; its seconds are reported apart):

- ``fp32`` (true fp32, TF32 off everywhere), ``tf32``, ``bf16`` (autocast around G and D):
  ``score.precision``;
- ``+compile``: ``score.compile`` (torch.compile; CUDA graphs on a GPU);
- ``+channels_last``: ``score.channels_last`` (G and D's weights in channels_last);
- ``GAN_R together`` / ``GAN_R apart``: the feature and reference mappings as one mapping of
  twice the rows (what the scorer runs with ``score.reference_score``) or one after the other,
  in ``--gan-r-precision``; patches/s counts each patch once for both scores.

Reported per path: patches/s, achieved TFLOP/s (useful FLOPs counted by
``torch.utils.flop_counter`` on CPU), that as a share of ``--peak-tflops`` (the GPU's dense bf16
peak; looked up for known GPUs), and the largest and median relative difference of A(x) to fp32
on the same patches, with whether the scorer's check would keep the path
(:func:`~anogan_ray.core.invert.fast_path_rtol`). Training: GAN steps/s of the recipe's own step
at the preset's batch size in fp32, as patches/s. Weights are freshly initialized unless
``--model BUNDLE`` gives trained ones: speed does not depend on them, but agreement does (random
weights give tiny differences), so pass a trained bundle for the agreement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_invert import counted_flops  # noqa: E402

from anogan_ray.config import load_config  # noqa: E402
from anogan_ray.core.invert import (  # noqa: E402
    fast_path_rtol,
    invert_batch,
    invert_modes,
    mapping_rows,
)
from anogan_ray.core.model import build_models, load_bundle  # noqa: E402
from anogan_ray.core.recipes import GAN  # noqa: E402
from anogan_ray.pipelines.train import training_precision  # noqa: E402

# Dense bf16 peak TFLOP/s (no sparsity) by the name torch reports.
PEAKS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0,
         "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}  # fmt: skip

# The fast paths: name -> (score.precision, score.compile, score.channels_last).
PATHS = {
    "fp32": ("fp32", False, False),
    "tf32": ("tf32", False, False),
    "bf16": ("bf16", False, False),
    "fp32+compile": ("fp32", True, False),
    "bf16+compile": ("bf16", True, False),
    "fp32+channels_last": ("fp32", False, True),
    "bf16+channels_last": ("bf16", False, True),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(device: torch.device, function, *args, **kwargs):
    """(seconds, result) of one call, synchronized."""
    _sync(device)
    started = time.perf_counter()
    result = function(*args, **kwargs)
    _sync(device)
    return time.perf_counter() - started, result


def time_path(models, pixels, ids, steps: int, path: str, device) -> dict:
    """Warm-up seconds, seconds and A(x) of mapping every patch once along a fast path."""
    precision, compile, channels_last = PATHS[path]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for module in models:
        module.to(memory_format=memory_format)
    settings = dict(z_lr=0.01, precision=precision, compile=compile)
    try:
        warm_up, _ = _timed(device, invert_batch, models, pixels[:1], ids[:1], steps=2, **settings)
        seconds, scores = _timed(device, invert_batch, models, pixels, ids, steps=steps, **settings)
    finally:
        for module in models:
            module.to(memory_format=torch.contiguous_format)
    return {"warm_up_s": warm_up, "seconds": seconds, "anomaly": scores.anomaly_score}


def time_gan_r(models, pixels, ids, steps: int, precision: str, device) -> dict:
    """Seconds and (A, Â) of the feature and GAN_R mappings together and apart."""
    settings = dict(z_lr=0.01, steps=steps, precision=precision)
    both = ("feature", "reference")
    invert_modes(models, pixels[:1], ids[:1], modes=both, **{**settings, "steps": 2})  # warm-up
    together_s, together = _timed(device, invert_modes, models, pixels, ids, modes=both, **settings)
    apart_s, apart = 0.0, {}
    for mode in both:
        seconds, apart[mode] = _timed(
            device, invert_batch, models, pixels, ids, mode=mode, **settings
        )
        apart_s += seconds
    relative = max(
        _relative(together[mode].anomaly_score, apart[mode].anomaly_score)[0] for mode in both
    )
    return {"together_s": together_s, "apart_s": apart_s, "max_relative_difference": relative}


def _relative(scores: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    """Largest and median relative difference."""
    relative = np.abs(scores - exact) / np.maximum(np.abs(exact), 1e-12)
    return float(relative.max()), float(np.median(relative))


def time_training(cfg, device, steps: int, precision: str = "fp32") -> float:
    """GAN training patches/s of the recipe's step in ``precision`` (``train.precision``), after
    two warm-up steps."""
    modules = {name: m.to(device) for name, m in GAN.build(cfg.model, 0).items()}
    optimizers = GAN.optimizers(modules, cfg.train)
    real = torch.rand(cfg.train.batch_size, 1, 64, 64, device=device) * 2 - 1
    arithmetic = training_precision(device, precision)
    for index in range(steps + 2):
        if index == 2:
            _sync(device)
            started = time.perf_counter()
        with arithmetic:
            GAN.step(modules, optimizers, real, cfg.model, cfg.train)
    _sync(device)
    return steps * cfg.train.batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=500, help="Γ")
    parser.add_argument("--patches", type=int, default=0, help="0: one batch of mapping_rows")
    parser.add_argument("--paths", default=",".join(PATHS), help="fast paths to time")
    parser.add_argument("--gan-r-precision", default="bf16", help="'' skips GAN_R")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--model", default=None, help="a trained bundle (its G and D)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak")
    parser.add_argument("--out", default="bench_gpu.json")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":  # true fp32 outside the mapping steps, as the scorer sets it
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    cfg = load_config(args.preset)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAKS.items() if k in name), None)
    if args.model:
        bundle = load_bundle(args.model)
        cfg.model = bundle.model_config
        models = (bundle.generator, bundle.discriminator)
    else:
        models = build_models(cfg.model, seed=0)
    once, per_step = counted_flops(tuple(m.cpu() for m in models))  # counted on CPU, exact
    models = tuple(m.to(device).eval().requires_grad_(False) for m in models)
    flops_per_patch = once + per_step * args.steps
    rows = mapping_rows(device, models)
    patches = args.patches or rows
    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(patches, 1, 64, 64, generator=generator) * 2 - 1).to(device)
    ids = [f"bench/{i}" for i in range(patches)]

    result: dict = {"device": name, "preset": args.preset, "model": args.model, "steps": args.steps,
                    "patches": patches, "mapping_rows": rows,
                    "gflop_per_patch": round(flops_per_patch / 1e9, 2),
                    "peak_bf16_tflops": peak, "paths": {}}  # fmt: skip

    def rates(seconds: float, flops: float) -> dict:
        row = {"patches_per_s": round(patches / seconds, 2),
               "achieved_tflops": round(patches * flops / seconds / 1e12, 3)}  # fmt: skip
        if peak:
            row["share_of_bf16_peak"] = round(row["achieved_tflops"] / peak, 4)
        return row

    exact = None
    for path in args.paths.split(","):
        timed = time_path(models, pixels, ids, args.steps, path, device)
        row = {
            "warm_up_s": round(timed["warm_up_s"], 2),
            **rates(timed["seconds"], flops_per_patch),
        }
        if exact is None and path == "fp32":
            exact = timed["anomaly"]
        elif exact is not None:
            worst, median = _relative(timed["anomaly"], exact)
            precision, compile, _ = PATHS[path]
            row["max_relative_difference_to_fp32"] = worst
            row["median_relative_difference_to_fp32"] = median
            row["within_scorer_tolerance"] = worst <= fast_path_rtol(precision, compile)
        result["paths"][path] = row
        print(path, json.dumps(row), flush=True)
    if args.gan_r_precision:
        timed = time_gan_r(models, pixels, ids, args.steps, args.gan_r_precision, device)
        for how in ("together", "apart"):
            row = rates(timed[f"{how}_s"], 2 * flops_per_patch)  # both mappings' work
            if how == "together":
                row["max_relative_difference_to_apart"] = timed["max_relative_difference"]
            result["paths"][f"GAN_R {how} ({args.gan_r_precision})"] = row
            print(f"GAN_R {how}", json.dumps(row), flush=True)
    for precision in ("fp32", "bf16"):
        rate = time_training(cfg, device, args.train_steps, precision)
        result[f"training_patches_per_s_{precision}"] = round(rate, 2)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
