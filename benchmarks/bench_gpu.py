"""GPU benchmark: scoring patches/s per precision at the paper preset, agreement with fp32, share
of the GPU's bf16 dense peak, and GAN training patches/s; JSON out.

    python benchmarks/bench_gpu.py --out bench_gpu.json                      # one GPU, ~5 min
    python benchmarks/bench_gpu.py --device cpu --preset tiny --steps 5 --patches 64   # smoke run

For each ``score.precision`` (fp32 = true fp32, TF32 off everywhere; tf32; bf16 autocast around
G and D) it maps ``--patches`` random patches with Γ = ``--steps`` through
:func:`anogan_ray.core.invert.invert_batch` (the scorer's own call, in its fixed-shape rows) and
reports patches/s, achieved TFLOP/s (useful FLOPs counted by ``torch.utils.flop_counter``), that as
a share of ``--peak-tflops`` (the GPU's dense bf16 peak; looked up for known GPUs), and the
largest and median relative difference of A(x) to fp32 on the same patches (the scorer's check
switches a precision off beyond ``PRECISION_RTOL``). Training: GAN steps/s of the recipe's own
step at the preset's batch size in fp32, as patches/s. Weights are freshly initialized unless
``--model BUNDLE`` gives trained ones: speed does not depend on them, but agreement does (random
weights give tiny differences; a trained demo bundle on CPU gave bf16 a largest difference of
1.1 % over 256 patches at Γ = 50, median 0.06 %), so pass a trained bundle for the agreement.
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
from anogan_ray.core.invert import PRECISION_RTOL, PRECISIONS, invert_batch  # noqa: E402
from anogan_ray.core.model import build_models, load_bundle  # noqa: E402
from anogan_ray.core.recipes import GAN  # noqa: E402

# Dense bf16 peak TFLOP/s (no sparsity) by the name torch reports.
PEAKS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0,
         "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_scoring(models, pixels, ids, steps: int, precision: str, device) -> tuple[float, np.ndarray]:
    """(seconds, A(x)) of mapping every patch once, after a one-batch warm-up."""
    invert_batch(models, pixels[:8], ids[:8], steps=2, z_lr=0.01, precision=precision)
    _sync(device)
    started = time.perf_counter()
    scores = invert_batch(models, pixels, ids, steps=steps, z_lr=0.01, precision=precision)
    _sync(device)
    return time.perf_counter() - started, scores.anomaly_score


def time_training(cfg, device, steps: int) -> float:
    """GAN training patches/s of the recipe's step (fp32), after two warm-up steps."""
    modules = {name: m.to(device) for name, m in GAN.build(cfg.model, 0).items()}
    optimizers = GAN.optimizers(modules, cfg.train)
    real = torch.rand(cfg.train.batch_size, 1, 64, 64, device=device) * 2 - 1
    for index in range(steps + 2):
        if index == 2:
            _sync(device)
            started = time.perf_counter()
        GAN.step(modules, optimizers, real, cfg.model, cfg.train)
    _sync(device)
    return steps * cfg.train.batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=500, help="Γ")
    parser.add_argument("--patches", type=int, default=1024)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--model", default=None, help="a trained bundle (its G and D)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak")
    parser.add_argument("--out", default="bench_gpu.json")
    args = parser.parse_args()

    device = torch.device(args.device)
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
    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(args.patches, 1, 64, 64, generator=generator) * 2 - 1).to(device)
    ids = [f"bench/{i}" for i in range(args.patches)]

    result: dict = {"device": name, "preset": args.preset, "model": args.model, "steps": args.steps,
                    "patches": args.patches, "gflop_per_patch": round(flops_per_patch / 1e9, 2),
                    "peak_bf16_tflops": peak, "precisions": {}}  # fmt: skip
    exact = None
    for precision in PRECISIONS:
        seconds, scores = time_scoring(models, pixels, ids, args.steps, precision, device)
        rate = args.patches / seconds
        row = {"patches_per_s": round(rate, 2),
               "achieved_tflops": round(rate * flops_per_patch / 1e12, 2)}  # fmt: skip
        if peak:
            row["share_of_bf16_peak"] = round(rate * flops_per_patch / 1e12 / peak, 3)
        if exact is None:
            exact = scores
        else:
            relative = np.abs(scores - exact) / np.maximum(np.abs(exact), 1e-12)
            row["max_relative_difference_to_fp32"] = float(relative.max())
            row["median_relative_difference_to_fp32"] = float(np.median(relative))
            row["within_scorer_tolerance"] = bool(relative.max() <= PRECISION_RTOL[precision])
        result["precisions"][precision] = row
        print(precision, json.dumps(row), flush=True)
    result["training_patches_per_s_fp32"] = round(time_training(cfg, device, args.train_steps), 2)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
