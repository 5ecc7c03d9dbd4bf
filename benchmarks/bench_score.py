"""Benchmark of the scoring pipeline: Ray Data throughput against the in-process core, and growth.

    python benchmarks/bench_score.py --sizes 100000,1000000 --out bench_score.json

1. Pipeline share: the same patches scored in-process with :func:`score_patches` (one process,
   all cores) and by :func:`score` (Ray Data, actor pool); throughput of the second over the first.
2. Growth: a patch table of each size is scored by a fresh ``score`` job in a subprocess (its own
   local Ray) with a ``tiny`` model and Γ = 1: time per patch, and the peak RSS and USS (sampled every
   0.5 s) of the driver, of the largest Ray worker, of all workers and of the whole process tree
   (driver, Ray services, workers); the score table is checked with DuckDB (every patch once).
   CPU: the CPU seconds of the job's whole process tree per patch, against those of
   :func:`score_patches` alone in-process on the same patches; the difference is the pipeline's
   overhead per patch (Ray, reading, validation, writing, commit). The CPU is also split by kind
   of process (driver, scoring actors, read tasks, other Ray workers, Ray's services) and
   measured "steady": between the first and the last staged file, so that start-up (worker
   imports, model loading) is left out. A table small enough to be read ahead of the actors is
   mostly read before the first file lands (``read_cpu_share_in_steady_window`` says how much
   of the reading the window saw).
3. Resume: the largest size is scored again by a job killed once its staged files hold
   ``--kill-at`` of the patches, then resumed; the table is checked the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil
import pyarrow.parquet as pq
import torch
from synthetic_patches import write_table

from anogan_ray.config import ScoreConfig, load_config
from anogan_ray.core.invert import score_patches
from anogan_ray.core.model import save_bundle
from anogan_ray.core.networks import build_models
from anogan_ray.tables import decode_pixels, pixels_from_column


def _process_kind(process: psutil.Process, root: psutil.Process) -> str:
    """Which part of the job a process is, for the CPU breakdown."""
    if process.pid == root.pid:
        return "driver"
    name = " ".join(process.cmdline())
    if "PatchScorer" in name:
        return "scoring_actors"
    if name.startswith("ray::ReadFiles"):
        return "read_tasks"  # reading the patch table and preparing its batches
    if name.startswith("ray::"):
        return "other_ray_workers"  # write tasks, idle workers, Ray's and our own small actors
    return "ray_services"  # raylet, GCS, dashboard


def _by_kind(cpu: dict) -> dict[str, float]:
    """CPU seconds so far by kind of process."""
    return dict(sorted(cpu["by_kind"].items()))


def _memory(root: psutil.Process, cpu: dict) -> dict[str, int]:
    """Memory now of the job's driver, its largest Ray worker, all workers, and the whole tree:
    RSS, and USS (``*_uss``: pages the process alone holds, leaving out the object store's
    shared memory that RSS counts for every worker that touched it). Adds the CPU seconds each
    process spent since the last call to ``cpu["by_kind"]``, under the kind the process is now
    (a Ray worker runs a read, then idles, then runs a write task); ``cpu["seen"]`` holds each
    pid's CPU seconds so far."""
    now = dict.fromkeys(
        ("driver", "largest_worker", "workers", "tree", "driver_uss", "largest_worker_uss",
         "workers_uss", "tree_uss"), 0,
    )  # fmt: skip
    for process in [root, *root.children(recursive=True)]:
        try:
            memory = process.memory_full_info()
            name = " ".join(process.cmdline()[:1])
            times = process.cpu_times()
            seconds, kind = times.user + times.system, _process_kind(process, root)
            spent = seconds - cpu["seen"].get(process.pid, 0.0)
            cpu["seen"][process.pid] = seconds
            cpu["by_kind"][kind] = cpu["by_kind"].get(kind, 0.0) + spent
        except psutil.Error:
            continue
        for suffix, value in (("", memory.rss), ("_uss", memory.uss)):
            now[f"tree{suffix}"] += value
            if process.pid == root.pid:
                now[f"driver{suffix}"] = value
            elif name.startswith("ray::"):
                now[f"workers{suffix}"] += value
                now[f"largest_worker{suffix}"] = max(now[f"largest_worker{suffix}"], value)
        if kind != "driver":  # which kind of worker the largest one is (USS)
            now[f"largest_uss_{kind}"] = max(now.get(f"largest_uss_{kind}", 0), memory.uss)
    return now


def run_job(
    patches: str, model: str, out: str, cfg: ScoreConfig, kill_after_rows: int | None = None
) -> dict:
    """Run one ``score`` job in a subprocess (its own local Ray); its summary plus the peak RSS and USS
    of its driver, its largest worker, all workers and the whole process tree (sampled every
    0.5 s). With ``kill_after_rows`` the job's whole process tree is SIGKILLed once its staged
    files hold that many rows, and None is returned."""
    code = (
        "import json, sys; from anogan_ray.config import ScoreConfig; "
        "from anogan_ray.pipelines.score import score; "
        f"s = score({patches!r}, {model!r}, {out!r}, ScoreConfig(**json.loads(sys.argv[1])))"
    )
    settings = {
        "steps": cfg.steps,
        "z_lr": cfg.z_lr,
        "batch_size": cfg.batch_size,
        "rows_per_file": cfg.rows_per_file,
        "splits": cfg.splits,
    }
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.perf_counter()
    job = subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(settings)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    root = psutil.Process(job.pid)
    peak: dict[str, int] = {}
    cpu: dict = {"seen": {}, "by_kind": {}}  # see _memory
    window: list[tuple[int, dict[str, float]]] = []  # (staged files, CPU by kind) as files land
    while job.poll() is None:
        now = _memory(root, cpu)
        peak |= {name: max(peak.get(name, 0), value) for name, value in now.items()}
        staged = sum(
            f.endswith(".parquet") for _, _, files in os.walk(f"{out}/_staging") for f in files
        )
        if staged and (not window or staged > window[-1][0]):
            window.append((staged, _by_kind(cpu)))
        if kill_after_rows is not None and staged * cfg.rows_per_file >= kill_after_rows:
            tree = [root, *root.children(recursive=True)]
            for process in tree:
                with contextlib.suppress(psutil.Error):
                    process.kill()
            job.wait()
            psutil.wait_procs(tree, timeout=30)
            return None
        time.sleep(0.5)
    if job.returncode != 0:
        raise RuntimeError(f"score job failed with exit code {job.returncode}")
    with open(f"{out}/summary.json") as f:
        summary = json.load(f)
    summary["wall_seconds"] = round(time.perf_counter() - started, 2)
    summary["peak_memory_gib"] = {name: round(value / 2**30, 3) for name, value in peak.items()}
    summary["cpu_seconds"] = round(sum(cpu["by_kind"].values()), 2)  # the tree's
    summary["cpu_seconds_by_kind"] = {k: round(v, 2) for k, v in _by_kind(cpu).items()}
    if len(window) > 1:  # between the first and the last staged file seen: start-up excluded
        (first_files, first_cpu), (last_files, last_cpu) = window[0], window[-1]
        rows = (last_files - first_files) * cfg.rows_per_file
        summary["steady_cpu_ms_per_patch_by_kind"] = {
            kind: round(1e3 * (last_cpu[kind] - first_cpu.get(kind, 0.0)) / rows, 4)
            for kind in last_cpu
        }
        summary["steady_window_patches"] = rows
        # a small table is read ahead of the actors, before the first file lands: the steady
        # window then misses most of the reading's CPU (which whole-run figures count)
        read = summary["cpu_seconds_by_kind"].get("read_tasks", 0.0)
        if read:
            in_window = last_cpu.get("read_tasks", 0.0) - first_cpu.get("read_tasks", 0.0)
            summary["read_cpu_share_in_steady_window"] = round(in_window / read, 3)
    return summary


def _core_cpu_seconds(folder: str, model_cfg, steps: int, batch_size: int) -> tuple[float, int]:
    """CPU seconds of :func:`score_patches` (one torch thread) over the table in ``folder``."""
    table = pq.read_table(f"{folder}/split=test")
    pixels = pixels_from_column(table["pixels"])
    ids = table["patch_id"].to_pylist()
    models = build_models(model_cfg, seed=0)
    for module in models:
        module.eval().requires_grad_(False)
    torch.set_num_threads(1)
    started = time.process_time()
    for i in range(0, len(ids), batch_size):
        batch = torch.from_numpy(decode_pixels(pixels[i : i + batch_size]))[:, None]
        score_patches(models, batch, ids[i : i + batch_size], steps=steps, z_lr=0.05)
    return time.process_time() - started, len(ids)


def core_cpu_ms_per_patch(
    model_cfg, n: int, steps: int, batch_size: int, processes: int = 1
) -> float:
    """CPU milliseconds per patch of :func:`score_patches` alone (one torch thread, as each CPU
    scoring actor runs it) on the growth runs' patches and settings: what the job would cost
    without Ray, reading or writing. With ``processes`` > 1, that many processes score the
    patches at once (as the job's actors do, sharing the cores' caches and memory bandwidth) and
    the mean over them is returned."""
    import multiprocessing

    folder = tempfile.mkdtemp(prefix="bench_core_")
    try:
        write_table(folder, n)
        if processes == 1:
            seconds, count = _core_cpu_seconds(folder, model_cfg, steps, batch_size)
            return 1e3 * seconds / count
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            runs = pool.starmap(
                _core_cpu_seconds, [(folder, model_cfg, steps, batch_size)] * processes
            )
        return 1e3 * sum(seconds for seconds, _ in runs) / sum(count for _, count in runs)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def exactly_once(out: str, n: int) -> dict:
    """Rows, distinct patch ids and files of a score table (DuckDB over its Parquet files)."""
    import duckdb

    rows, distinct = duckdb.sql(
        f"SELECT count(*), count(DISTINCT patch_id) FROM read_parquet('{out}/scores/*.parquet')"
    ).fetchall()[0]
    files = len([f for f in os.listdir(f"{out}/scores") if f.endswith(".parquet")])
    return {
        "rows": rows,
        "distinct_ids": distinct,
        "files": files,
        "all_once": rows == distinct == n,
    }


def pipeline_share(work: str, model_cfg, model: str, n: int, cfg: ScoreConfig) -> dict:
    """Ray Data scoring throughput as a share of the in-process core's, same patches."""
    patches = f"{work}/share_patches"
    write_table(patches, n)
    bundle_models = build_models(model_cfg, seed=0)
    for module in bundle_models:
        module.eval().requires_grad_(False)
    table = pq.read_table(f"{patches}/split=test")
    pixels = np.stack(
        [np.asarray(p, np.uint8).reshape(64, 64) for p in table["pixels"].to_pylist()]
    )
    ids = table["patch_id"].to_pylist()
    torch.set_num_threads(os.cpu_count())
    started = time.perf_counter()
    for i in range(0, n, cfg.batch_size):
        batch = torch.from_numpy(decode_pixels(pixels[i : i + cfg.batch_size]))[:, None]
        score_patches(bundle_models, batch, ids[i : i + cfg.batch_size], lambda_=cfg.lambda_,
                      steps=cfg.steps, z_lr=cfg.z_lr)  # fmt: skip
    core_rate = n / (time.perf_counter() - started)
    summary = run_job(patches, model, f"{work}/share_out", cfg)
    return {
        "patches": n,
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "core_patches_per_s": round(core_rate, 2),
        "pipeline_patches_per_s": summary["patches_per_s"],
        "pipeline_patches_per_s_incl_startup": round(n / summary["wall_seconds"], 2),
        "pipeline_patches_per_s_after_first_batch": summary["patches_per_s_after_first_batch"],
        "share": round(summary["patches_per_s"] / core_rate, 3),
        "share_after_first_batch": round(
            (summary["patches_per_s_after_first_batch"] or 0) / core_rate, 3
        ),
        "share_incl_startup": round(n / summary["wall_seconds"] / core_rate, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--share-preset", default="demo", help="model for the pipeline share")
    parser.add_argument("--share-patches", type=int, default=1024)
    parser.add_argument("--share-steps", type=int, default=20)
    parser.add_argument("--sizes", default="100000,1000000", help="growth: table sizes")
    parser.add_argument("--growth-steps", type=int, default=1, help="Γ of the growth runs")
    parser.add_argument(
        "--kill-at", type=float, default=0.5, help="kill the largest run at this share, resume"
    )
    parser.add_argument("--skip-share", action="store_true", help="growth only")
    parser.add_argument(
        "--core-patches", type=int, default=8192, help="patches of the in-process CPU reference"
    )
    parser.add_argument("--out", default="bench_score.json")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="bench_score_")
    result: dict = {"cores": os.cpu_count()}
    try:
        share_cfg = load_config(args.share_preset).model
        model = f"{work}/share_model"
        save_bundle(model, *build_models(share_cfg, seed=0), share_cfg)
        cfg = ScoreConfig(steps=args.share_steps, z_lr=0.05, batch_size=128, splits=["test"])
        if not args.skip_share:
            share = pipeline_share(work, share_cfg, model, args.share_patches, cfg)
            result["pipeline_share"] = share
            print(json.dumps(share), flush=True)

        tiny = load_config("tiny").model
        tiny_model = f"{work}/tiny_model"
        save_bundle(tiny_model, *build_models(tiny, seed=0), tiny)
        growth = []
        sizes = [int(size) for size in args.sizes.split(",")]
        for n in sizes:
            patches = f"{work}/patches_{n}"
            write_table(patches, n)
            cfg = ScoreConfig(steps=args.growth_steps, z_lr=0.05, batch_size=256, splits=["test"])
            summary = run_job(patches, tiny_model, f"{work}/out_{n}", cfg)
            row = {
                "patches": n,
                "steps": args.growth_steps,
                "patches_scored": summary["patches_scored"],
                "wall_seconds": summary["wall_seconds"],
                "ms_per_patch": round(1e3 * summary["wall_seconds"] / n, 4),
                "patches_per_s": summary["patches_per_s"],
                "actors": summary["actors"],
                "cpu_ms_per_patch": round(1e3 * summary["cpu_seconds"] / n, 4),
                "cpu_ms_per_patch_by_kind": {
                    kind: round(1e3 * seconds / n, 4)
                    for kind, seconds in summary["cpu_seconds_by_kind"].items()
                },
                "steady_cpu_ms_per_patch_by_kind": summary.get("steady_cpu_ms_per_patch_by_kind"),
                "steady_window_patches": summary.get("steady_window_patches"),
                "read_cpu_share_in_steady_window": summary.get("read_cpu_share_in_steady_window"),
                "peak_memory_gib": summary["peak_memory_gib"],
                "table": exactly_once(f"{work}/out_{n}", n),
            }
            shutil.rmtree(f"{work}/out_{n}", ignore_errors=True)
            if n == sizes[-1] and args.kill_at:  # a killed job at the largest size, resumed
                out = f"{work}/out_{n}_killed"
                run_job(patches, tiny_model, out, cfg, kill_after_rows=int(args.kill_at * n))
                resumed = run_job(patches, tiny_model, out, cfg)
                row["resume_after_kill"] = {
                    "killed_after_rows": int(args.kill_at * n),
                    "recovered": resumed["patches_recovered_from_earlier_run"],
                    "scored_by_resume": resumed["patches_scored"],
                    "resume_wall_seconds": resumed["wall_seconds"],
                    "resume_peak_memory_gib": resumed["peak_memory_gib"],
                    "table": exactly_once(out, n),
                }
                shutil.rmtree(out, ignore_errors=True)
            growth.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(patches, ignore_errors=True)
        core = core_cpu_ms_per_patch(tiny, args.core_patches, args.growth_steps, 256)
        result["core_cpu_ms_per_patch"] = round(core, 4)
        actors = growth[-1]["actors"]  # the same work, as many processes at once as actors
        concurrent = core_cpu_ms_per_patch(
            tiny, args.core_patches, args.growth_steps, 256, processes=actors
        )
        result["core_cpu_ms_per_patch_concurrent"] = round(concurrent, 4)
        result["core_concurrent_processes"] = actors
        for row in growth:  # CPU spent outside score_patches: Ray, reading, validation, writing
            row["overhead_cpu_ms_per_patch"] = round(row["cpu_ms_per_patch"] - core, 4)
            if row["steady_cpu_ms_per_patch_by_kind"]:  # start-up excluded; against the core
                steady = sum(row["steady_cpu_ms_per_patch_by_kind"].values())  # run as the actors
                row["steady_overhead_cpu_ms_per_patch"] = round(steady - concurrent, 4)
        first, last = growth[0], growth[-1]
        if len(growth) > 1:  # growth needs two sizes
            # the CPU one more patch costs beyond the core, start-up excluded (largest vs smallest)
            marginal = (
                last["cpu_ms_per_patch"] * last["patches"]
                - first["cpu_ms_per_patch"] * first["patches"]
            ) / (last["patches"] - first["patches"])
            result["marginal_overhead_cpu_ms_per_patch"] = round(marginal - core, 4)
            # the same against the core run as the actors run it (contention is not Ray's overhead)
            result["marginal_overhead_vs_concurrent_core"] = round(marginal - concurrent, 4)
            result["growth_ratios"] = {
                "patches": last["patches"] / first["patches"],
                "ms_per_patch": round(last["ms_per_patch"] / first["ms_per_patch"], 3),
                **{
                    f"peak_{name}": round(value / max(first["peak_memory_gib"][name], 1e-9), 3)
                    for name, value in last["peak_memory_gib"].items()
                    if name in first["peak_memory_gib"]
                },
            }
        result["growth"] = growth
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
