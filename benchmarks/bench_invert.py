"""Benchmark of the inversion core: patch-steps/s by batch size and achieved FLOP/s.

    python benchmarks/bench_invert.py --preset paper --steps 3 --out bench_invert.json

For each batch size the feature-matching inversion runs ``--steps`` Adam steps (after one warm-up
call). The useful FLOPs of that call are counted with ``torch.utils.flop_counter`` (a 1-step and
a 2-step inversion of one fixed-shape batch of ``mapping_rows`` patches give the per-patch
per-step and once-per-call parts; the mapping pads a batch to a multiple of ``mapping_rows``, so
small batches also spend work on padding rows, which is not counted) and compared with the same
machine's dense fp32 matmul FLOP/s, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from anogan_ray.config import load_config
from anogan_ray.core.invert import invert_batch, mapping_rows
from anogan_ray.core.model import build_models


def matmul_flops_per_s(size: int = 2048, repeats: int = 10) -> float:
    """Dense fp32 matmul FLOP/s of this machine with the current torch thread count."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def counted_flops(models) -> tuple[float, float]:
    """Per patch: (FLOPs once per call: f(x) and the final evaluation, FLOPs per Adam step).

    Counted on one full fixed-shape batch of the mapping (``mapping_rows``), so no padding rows.
    """
    rows = mapping_rows(next(models[0].parameters()).device)
    pixels = torch.rand(rows, 1, 64, 64) * 2 - 1
    ids = [f"flops/{i}" for i in range(rows)]
    counts = []
    for steps in (1, 2):
        with FlopCounterMode(display=False) as counter:
            invert_batch(models, pixels, ids, steps=steps, z_lr=0.01)
        counts.append(counter.get_total_flops() / rows)
    per_step = float(counts[1] - counts[0])
    return float(counts[0]) - per_step, per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--batch-sizes", default="1,4,16,64,256")
    parser.add_argument("--steps", type=int, default=3, help="timed Adam steps per batch size")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default="bench_invert.json")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    cfg = load_config(args.preset).model
    generator, discriminator = build_models(cfg, seed=0)
    models = (generator, discriminator)
    matmul_before = matmul_flops_per_s()
    once_flops, step_flops = counted_flops(models)  # per patch
    rows = []
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        pixels = torch.rand(batch_size, 1, 64, 64) * 2 - 1
        ids = [f"bench/{i}" for i in range(batch_size)]
        invert_batch(models, pixels, ids, steps=1, z_lr=0.01)  # warm-up
        started = time.perf_counter()
        invert_batch(models, pixels, ids, steps=args.steps, z_lr=0.01)
        seconds = time.perf_counter() - started
        total_flops = (once_flops + step_flops * args.steps) * batch_size  # the timed call's work
        row = {
            "batch_size": batch_size,
            "seconds": round(seconds, 3),
            "patch_steps_per_s": round(batch_size * args.steps / seconds, 2),
            "gflop_per_patch_step": round(step_flops / 1e9, 4),
            "achieved_gflop_per_s": round(total_flops / seconds / 1e9, 2),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    # the best of a measurement before and after the sweep (a shared machine's load varies)
    matmul = max(matmul_before, matmul_flops_per_s())
    for row in rows:
        row["share_of_matmul"] = round(row["achieved_gflop_per_s"] * 1e9 / matmul, 3)
    single = next((r for r in rows if r["batch_size"] == 1), None)
    best = max(rows, key=lambda r: r["patch_steps_per_s"])
    result = {
        "preset": args.preset,
        "steps": args.steps,
        "threads": args.threads,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "matmul_gflop_per_s": round(matmul / 1e9, 2),
        "by_batch_size": rows,
        "best_batch_size": best["batch_size"],
        "batched_over_one_at_a_time": (
            round(best["patch_steps_per_s"] / single["patch_steps_per_s"], 2) if single else None
        ),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
