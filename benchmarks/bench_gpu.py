"""GPU benchmark of the mapping: patches/s per fast path at Γ = 500, agreement with fp32, share of
the GPU's bf16 dense peak, where the time goes, and GAN training patches/s; JSON out. Needs
PyTorch only (no Ray).

    python benchmarks/bench_gpu.py --out bench_gpu.json                      # paper preset, one GPU
    python benchmarks/bench_gpu.py --preset demo --out bench_gpu_demo.json
    python benchmarks/bench_gpu.py --device cpu --preset tiny --steps 5 --patches 32   # smoke run

Each fast path (``--paths``; a name is a precision and ``+``-joined parts: ``channels_last``,
``graph`` (CUDA graphs of the whole step), ``compile``, ``pad`` (padded channels), ``subpixel``
(G's transposed convolutions as sub-pixel convolutions); see anogan_ray/core/fastpath.py) maps the
same ``--patches`` random patches (by default one fixed-shape batch of the device's
:func:`~anogan_ray.core.invert.mapping_rows`) with Γ = ``--steps`` through
:func:`~anogan_ray.core.invert.invert_batch` (the scorer's own call), after a warm-up call of two
steps on the same shape whose seconds (capturing, compiling, cuDNN's autotuning) are reported
apart. A path whose machinery fails falls back to eager steps, as in the scorer: the row says
``fell_back``. Reported per path: patches/s, achieved TFLOP/s (useful FLOPs counted by
``torch.utils.flop_counter`` on CPU), its share of ``--peak-tflops`` (the GPU's dense bf16 peak,
looked up for known GPUs), and the largest and median relative difference of A(x) to the first
path (``fp32``, exact eager), with whether the scorer's check would keep the path.

Then, for the product's path (``--product``): the feature and GAN_R mappings together (one
mapping of twice the rows: what ``score.reference_score`` runs; patches/s counts each patch
once for both), other fixed-shape rows (``--rows-grid``), the same batch mapped twice (how far
two runs of a GPU differ), the agreement check's cost against a batch, and a
``torch.profiler`` table of its steps (``--profile-dir``). Training: GAN steps of the recipe's
own step at the preset's batch size in fp32 and bf16, as patches/s. Weights are freshly
initialized unless ``--model BUNDLE`` gives trained ones: speed does not depend on them, but
agreement does (random weights give tiny differences).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_invert import counted_flops  # noqa: E402

from anogan_ray.config import load_config  # noqa: E402
from anogan_ray.core import fastpath  # noqa: E402
from anogan_ray.core.fastpath import FastPath, fast_path_rtol  # noqa: E402
from anogan_ray.core.invert import (  # noqa: E402
    CHECK_PATCHES,
    check_fast_path,
    invert_batch,
    invert_modes,
    mapping_rows,
)
from anogan_ray.core.model import load_bundle  # noqa: E402
from anogan_ray.core.networks import build_models  # noqa: E402
from anogan_ray.core.recipes import GAN, training_precision  # noqa: E402

# Dense bf16 peak TFLOP/s (no sparsity) by the name torch reports.
PEAKS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0,
         "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}  # fmt: skip

DEFAULT_PATHS = (
    "fp32",
    "bf16+graph",
    "bf16+channels_last+graph",
    "bf16+graph+pad",
    "bf16+channels_last+graph+pad",
    "bf16+channels_last+graph+compile",
    "bf16+channels_last+graph+compile+pad",
    "bf16+channels_last+graph+pad+subpixel",
    "bf16+channels_last+graph+compile+pad+subpixel",
)


def parse_path(name: str) -> FastPath:
    """``"bf16+channels_last+graph+compile"`` -> the FastPath."""
    precision, *parts = name.split("+")
    unknown = set(parts) - {"channels_last", "graph", "compile", "pad", "subpixel"}
    if unknown:
        raise ValueError(f"path {name!r}: unknown part(s) {sorted(unknown)}")
    return FastPath(
        precision,
        "channels_last" in parts,
        "compile" in parts,
        "graph" in parts,
        "pad" in parts,
        "subpixel" in parts,
    )


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


def profile_table(device, function, row_limit: int = 45) -> str:
    """torch.profiler's kernel table of one call, by GPU (or CPU) time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        function()
        _sync(device)
    averages = profiler.key_averages()
    keys = ("device_time_total", "cuda_time_total") if device.type == "cuda" else ()
    for key in (*keys, "self_cpu_time_total"):
        try:
            return averages.table(sort_by=key, row_limit=row_limit)
        except (AttributeError, KeyError, RuntimeError):
            continue
    return averages.table(row_limit=row_limit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=500, help="Γ")
    parser.add_argument("--patches", type=int, default=0, help="0: one batch of mapping_rows")
    parser.add_argument("--paths", default=",".join(DEFAULT_PATHS), help="fast paths to time")
    parser.add_argument(
        "--product",
        default="bf16+channels_last+graph+pad",
        help="the path for the extra measurements (default: the scorer's on CUDA, not compiled)",
    )
    parser.add_argument("--rows-grid", default="", help="other fixed-shape rows, e.g. 2048,4096")
    parser.add_argument("--gan-r", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--model", default=None, help="a trained bundle (its G and D)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak")
    parser.add_argument("--profile-dir", default=None, help="write torch.profiler tables here")
    parser.add_argument(
        "--profile-paths",
        default="bf16+channels_last+graph+pad,bf16+channels_last+graph+compile+pad",
    )
    parser.add_argument("--profile-steps", type=int, default=10)
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
    out = Path(args.out)

    result: dict = {"device": name, "torch": torch.__version__, "preset": args.preset,
                    "model": args.model, "steps": args.steps, "patches": patches,
                    "mapping_rows": rows, "gflop_per_patch": round(flops_per_patch / 1e9, 2),
                    "peak_bf16_tflops": peak, "paths": {}, "product": {}}  # fmt: skip

    def save() -> None:
        out.write_text(json.dumps(result, indent=2) + "\n")

    def rates(seconds: float, count: int, flops: float) -> dict:
        row = {"patches_per_s": round(count / seconds, 2),
               "achieved_tflops": round(count * flops / seconds / 1e12, 3)}  # fmt: skip
        if peak:
            row["share_of_bf16_peak"] = round(row["achieved_tflops"] / peak, 4)
        return row

    def attempt(label: str, where: dict, function) -> None:
        """Run one measurement; a failure is recorded, not fatal."""
        try:
            where[label] = function()
        except Exception as err:  # noqa: BLE001 - a benchmark reports and goes on
            where[label] = {"error": f"{type(err).__name__}: {err}"[:2000]}
            traceback.print_exc()
        print(label, json.dumps(where[label]), flush=True)
        save()

    exact = {}

    def time_path(path_name: str) -> dict:
        path = parse_path(path_name)
        warm_up, _ = _timed(device, invert_batch, models, pixels, ids, steps=2, path=path)
        seconds, scores = _timed(
            device, invert_batch, models, pixels, ids, steps=args.steps, path=path
        )
        row = {"warm_up_s": round(warm_up, 2), **rates(seconds, patches, flops_per_patch),
               "fell_back": fastpath.effective_path(path) != path}  # fmt: skip
        if not exact:
            exact["anomaly"] = scores.anomaly_score
        else:
            worst, median = _relative(scores.anomaly_score, exact["anomaly"])
            row["max_relative_difference_to_fp32"] = worst
            row["median_relative_difference_to_fp32"] = median
            row["within_scorer_tolerance"] = worst <= fast_path_rtol(path)
        return row

    for path_name in args.paths.split(","):
        attempt(path_name, result["paths"], lambda p=path_name: time_path(p))

    product = parse_path(args.product)
    measured = result["product"]
    measured["path"] = args.product

    def gan_r() -> dict:
        both = ("feature", "reference")
        invert_modes(models, pixels, ids, modes=both, steps=2, path=product)  # warm-up
        seconds, _ = _timed(
            device, invert_modes, models, pixels, ids, modes=both, steps=args.steps, path=product
        )
        return rates(seconds, patches, 2 * flops_per_patch)  # both mappings' work

    if args.gan_r:
        attempt("A and GAN_R together", measured, gan_r)

    def other_rows(count: int) -> dict:
        more = (torch.rand(count, 1, 64, 64, generator=generator) * 2 - 1).to(device)
        more_ids = [f"bench/rows/{i}" for i in range(count)]
        common = dict(path=product, rows=count)
        invert_batch(models, more, more_ids, steps=2, **common)  # warm-up
        seconds, _ = _timed(
            device, invert_batch, models, more, more_ids, steps=args.steps, **common
        )
        return rates(seconds, count, flops_per_patch)

    for count in filter(None, args.rows_grid.split(",")):
        attempt(f"rows {int(count)}", measured, lambda c=int(count): other_rows(c))

    def repeat() -> dict:
        first = invert_batch(models, pixels, ids, steps=args.steps, path=product).anomaly_score
        second = invert_batch(models, pixels, ids, steps=args.steps, path=product).anomaly_score
        worst, median = _relative(second, first)
        return {"max_relative_difference": worst, "median_relative_difference": median,
                "bit_identical": bool(np.array_equal(first, second))}  # fmt: skip

    attempt("the same batch twice", measured, repeat)

    def check_cost() -> dict:
        batch_s, scores = _timed(
            device, invert_batch, models, pixels, ids, steps=args.steps, path=product
        )
        sample = slice(0, CHECK_PATCHES)
        common = dict(path=product, lambda_=0.1, steps=args.steps, z_lr=0.01)
        fast = scores.anomaly_score[sample]
        first_s, (ok, worst) = _timed(
            device, check_fast_path, models, pixels[sample], ids[sample], fast, **common
        )
        again_s, _ = _timed(
            device, check_fast_path, models, pixels[sample], ids[sample], fast, **common
        )
        return {"batch_s": round(batch_s, 3), "check_first_s": round(first_s, 3),
                "check_s": round(again_s, 3), "check_over_batch": round(again_s / batch_s, 3),
                "agrees": ok, "max_relative_difference": worst}  # fmt: skip

    attempt("agreement check", measured, check_cost)

    if args.profile_dir:
        folder = Path(args.profile_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for path_name in args.profile_paths.split(","):

            def profiled(path_name: str = path_name) -> dict:
                path = parse_path(path_name)
                call = lambda: invert_batch(  # noqa: E731
                    models, pixels, ids, steps=args.profile_steps, path=path
                )
                call()  # warm
                table = profile_table(device, call)
                target = folder / f"profile_{args.preset}_{path_name.replace('+', '_')}.txt"
                target.write_text(table + "\n")
                return {"table": str(target)}

            attempt(f"profile {path_name}", measured, profiled)

    for precision in ("fp32", "bf16"):
        attempt(
            f"training_patches_per_s_{precision}",
            result,
            lambda p=precision: round(time_training(cfg, device, args.train_steps, p), 2),
        )
    save()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
