"""Benchmark of the inversion core on CPU: share of matmul FLOP/s by rows per fixed-shape batch
and by variant (plain, channels_last, torch.compile, thread count).

    python benchmarks/bench_invert.py --preset paper --steps 3 --out bench_invert.json
    python benchmarks/bench_invert.py --preset paper --rows 16,64 --variants eager,compile

For each variant and row count one fixed-shape batch of that many patches (the mapping's
``rows``; the scorer uses :func:`mapping_rows`, 16 on CPU) runs ``--steps`` Adam steps after a
warm-up call (which, for ``compile``, compiles that shape). The useful FLOPs of the timed call
are counted with ``torch.utils.flop_counter`` (a 1-step and a 2-step inversion of one
fixed-shape batch give the per-patch per-step and once-per-call parts) and compared with the
same machine's dense fp32 matmul FLOP/s, measured before every round. The rounds repeat the
whole grid (``--repeats``), interleaved, so a shared machine's changing load hits every variant
alike; the table reports the median and the range over rounds.

Variants: ``eager`` (what the scorer runs by default), ``channels_last`` (the step copies of G
and D in channels_last memory format: ``score.channels_last``), ``compile`` (``score.compile``),
``threads=N`` (N torch threads instead of ``--threads``), and combinations joined by ``+``
(``channels_last+compile``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from anogan_ray.config import load_config
from anogan_ray.core.fastpath import FastPath
from anogan_ray.core.invert import invert_batch, mapping_rows
from anogan_ray.core.networks import build_models


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


def time_variant(models, variant: str, rows: int, steps: int, threads: int) -> float:
    """Seconds of one fixed-shape batch of ``rows`` patches mapped for ``steps`` steps."""
    pixels = torch.rand(rows, 1, 64, 64, generator=torch.Generator().manual_seed(rows)) * 2 - 1
    ids = [f"bench/{i}" for i in range(rows)]
    parts = variant.split("+")
    path = FastPath(channels_last="channels_last" in parts, compile="compile" in parts)
    settings = dict(z_lr=0.01, rows=rows, path=path)
    for part in parts:
        if part.startswith("threads="):
            torch.set_num_threads(int(part.split("=")[1]))
    try:
        invert_batch(models, pixels, ids, steps=1, **settings)  # warm-up (compiles this shape)
        started = time.perf_counter()
        invert_batch(models, pixels, ids, steps=steps, **settings)
        return time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--rows", default="16,32,64,128", help="rows per fixed-shape batch")
    parser.add_argument("--variants", default="eager,channels_last,compile")
    parser.add_argument("--steps", type=int, default=3, help="timed Adam steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the whole grid")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default="bench_invert.json")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    cfg = load_config(args.preset).model
    models = build_models(cfg, seed=0)
    for module in models:
        module.eval().requires_grad_(False)
    once_flops, step_flops = counted_flops(models)  # per patch
    grid = [(v, int(r)) for v in args.variants.split(",") for r in args.rows.split(",")]
    shares: dict[tuple[str, int], list[float]] = {cell: [] for cell in grid}
    rates: dict[tuple[str, int], list[float]] = {cell: [] for cell in grid}
    for round_ in range(args.repeats):
        matmul = max(matmul_flops_per_s(), matmul_flops_per_s())
        for variant, rows in grid:
            seconds = time_variant(models, variant, rows, args.steps, args.threads)
            flops = (once_flops + step_flops * args.steps) * rows  # the timed call's work
            shares[variant, rows].append(flops / seconds / matmul)
            rates[variant, rows].append(rows * args.steps / seconds)
            print(
                f"round {round_}: {variant:>13} rows {rows:>4}: {rates[variant, rows][-1]:8.1f} "
                f"patch-steps/s, {shares[variant, rows][-1]:.3f} of matmul "
                f"({matmul / 1e9:.0f} GFLOP/s)",
                flush=True,
            )
    table = [
        {
            "variant": variant,
            "rows": rows,
            "patch_steps_per_s": round(statistics.median(rates[variant, rows]), 2),
            "share_of_matmul": round(statistics.median(shares[variant, rows]), 3),
            "share_of_matmul_range": [
                round(min(shares[variant, rows]), 3),
                round(max(shares[variant, rows]), 3),
            ],  # fmt: skip
        }
        for variant, rows in grid
    ]
    result = {
        "preset": args.preset,
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": args.threads,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "gflop_per_patch_step": round(step_flops / 1e9, 4),
        "scorer_rows": mapping_rows(torch.device("cpu")),
        "by_variant_and_rows": table,
        "best": max(table, key=lambda row: row["share_of_matmul"]),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
