"""Benchmark: wall time and peak memory of evaluate, calibrate, compare, query and report on a
large score table.

Writes a synthetic score table of ``--rows`` rows (:mod:`anogan_ray.analysis.synthetic`; default
10^7, 40 files) under a temporary folder, then runs each step in a fresh Python process and
records its wall time and peak resident memory (``VmHWM`` of that process: ``ru_maxrss`` would
carry the parent's peak across fork and exec), next to a process that only imports the modules
(the floor every step pays). The table is deleted at the end
unless ``--keep``. ``--code DIR`` runs the steps with another checkout's ``anogan_ray`` (e.g. the
main branch, to compare with the code that loads the table into pandas) and ``--scores DIR``
reuses a table written before.

    python benchmarks/bench_analysis.py [--rows 10000000] [--out bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

# Each step, as the code a fresh process runs; `scores` and `out` are set before it.
STEPS = {
    "import only": "pass",
    "evaluate, patch level": "metrics.evaluate(scores, threshold=120.0)",
    "evaluate, volume level": "metrics.evaluate(scores, threshold=120.0, level='volume')",
    "calibrate (3 levels)": "metrics.calibrate(scores)",
    "compare": "metrics.compare(scores)",
    "query top-k": "query.top_k(scores, k=20)",
    "query aggregate (volume)": "query.aggregate(scores, 'volume')",
    "report (no model, no patches)": "report.report(scores, out)",
}

CHILD = """
import json, sys, time
start = time.perf_counter()
def peak_mb():
    status = open("/proc/self/status").read().split("VmHWM:")[1]
    return round(int(status.split()[0]) / 1024, 1)
from anogan_ray.analysis import query, report
from anogan_ray.core import metrics
scores, out = sys.argv[1], sys.argv[2]
{step}
print(json.dumps({{
    "wall_s": round(time.perf_counter() - start, 2),
    "peak_rss_mb": peak_mb(),
}}))
"""


def _run_step(code: str, scores: str, out: str, pythonpath: str, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD.format(step=code), scores, out],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="score rows to write")
    parser.add_argument("--files", type=int, default=20, help="Parquet files per split")
    parser.add_argument("--scores", help="use this score table instead of writing one")
    parser.add_argument("--keep", action="store_true", help="keep the written table")
    parser.add_argument("--code", default=None, help="checkout whose anogan_ray the steps run")
    parser.add_argument("--only", nargs="*", help="run only these steps (names as in the JSON)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per step")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    work = tempfile.mkdtemp(prefix="bench_analysis_")
    result: dict = {"rows": args.rows, "code": os.path.abspath(args.code or here)}
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        scores = args.scores
        if scores is None:
            from anogan_ray.analysis.synthetic import write_score_table

            scores = os.path.join(work, "scores")
            start = time.perf_counter()
            written = write_score_table(scores, args.rows, files=args.files)
            result["write"] = {**written, "seconds": round(time.perf_counter() - start, 1)}
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(scores) for f in fs)
        result["table_mb"] = round(size / 2**20, 1)
        result["steps"] = {}
        for name, code in STEPS.items():
            if args.only and name not in args.only and name != "import only":
                continue
            out = os.path.join(work, "report")
            step = _run_step(code, scores, out, result["code"], args.timeout)
            result["steps"][name] = step
            print(f"{name}: {step}", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            result["kept"] = work
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
