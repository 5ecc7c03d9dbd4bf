#!/usr/bin/env bash
# The GPU check: the mapping's speed on one GPU, then the whole product on it, JSON under OUTDIR.
#
#   bash .gpu/with_ray.sh bash benchmarks/gpu_check.sh OUTDIR      # a GPU machine without Ray
#   bash benchmarks/gpu_check.sh OUTDIR                            # a GPU machine with the project
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh OUTDIR --device cpu   # a CPU smoke run
#
# In order, each step timed and logged (OUTDIR/steps.jsonl; the logs and profiler tables end up
# in OUTDIR/logs.tgz), later steps only while they fit in GPU_CHECK_BUDGET_S (default 480)
# seconds, none running a minute beyond it:
#   1. bench_gpu.py at the paper preset: patches/s per fast path at Γ = 500 (1,024 patches),
#      agreement with fp32, A and GAN_R together, the check's cost, torch.profiler tables; meanwhile
#      on the CPUs: a demo-sized phantom -> preprocess, and synthetic patch tables for the jobs;
#   2. anogan-ray score at the paper preset's defaults (A alone; random weights) on 10^4,
#      4 x 10^4 or 10^5 patches (the most that ~2.5 minutes at the benchmark's best rate allow):
#      the product's default fast path (compiled when an actor has enough patches), its rate
#      after the first batch over the benchmark's rate of the same path;
#   3. anogan-ray train --config paper on the GPU (a few steps of G/D, E and the aCAE; PCA), while
#      gpu_compile_modes.py compiles fp32 steps each way in processes of their own;
#   4. anogan-ray score with score.mapping=encoder+iterative on 10^4 patches with the trained
#      bundle (not compiled);
#   5. bench_gpu.py at the demo preset (its rows, other rows);
# then OUTDIR/gpu_check.json: every figure and the assertions (no step failed, device cuda, the
# fast paths within tolerance of fp32). Exit 1 when an assertion fails.
set -u
out=${1:?usage: gpu_check.sh OUTDIR [--device cpu]}
device=cuda
[ "${2:-}" = "--device" ] && device=${3:?--device needs a value}
root=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 RAY_DISABLE_USAGE_STATS=1
py=${PYTHON:-python3}
budget=${GPU_CHECK_BUDGET_S:-480}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cli=("$py" -m anogan_ray.cli)
# Ray unpacked from wheels without their file modes (.gpu/with_ray.sh) has binaries that do not run
ray_core=$("$py" -c 'import os, ray; print(os.path.dirname(ray.__file__))' 2>/dev/null)/core/src
[ -w "$ray_core" ] && find "$ray_core" -type f ! -perm -u+x -exec chmod u+x {} +

if [ "$device" = cuda ]; then
  preset=paper steps=500 sizes="10000 40000 100000" train_steps=40 job_seconds=150 bench=()
  demo_paths=fp32,bf16+channels_last+graph,bf16+channels_last+graph+pad,bf16+channels_last+graph+compile+pad
else  # a smoke run of every step, tiny, not compiled (compiling on a small CPU takes minutes)
  preset=tiny steps=5 sizes="256 384 512" train_steps=4 job_seconds=5 budget=${GPU_CHECK_BUDGET_S:-3000}
  demo_paths=fp32,bf16+channels_last+graph
  bench=(--device cpu --steps 5 --patches 32 --train-steps 2 --paths "$demo_paths"
         --profile-paths bf16+channels_last+graph)
fi
small=${sizes%% *}

# step NAME TIMEOUT COMMAND...: run it (at most until the budget ends), log it, record its exit
# code and seconds
step() {
  local name=$1 limit=$2 started=$SECONDS code
  shift 2
  [ $((budget + 60 - SECONDS)) -lt "$limit" ] && limit=$((budget + 60 - SECONDS))
  echo "== $name (at $((SECONDS))s, at most ${limit}s)"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  code=$?
  printf '{"step": "%s", "exit_code": %d, "seconds": %d}\n' "$name" "$code" \
    "$((SECONDS - started))" >> "$out/steps.jsonl"
  tail -n 3 "$out/$name.log"
  return $code
}
# in_time SECONDS: whether a step of about that long still fits in the budget
in_time() { [ $((SECONDS + $1)) -le "$budget" ]; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
} > "$out/machine.txt" 2>&1
: > "$out/steps.jsonl"

# 1. the core's speed on the GPU; the cohort and the tables on the CPUs meanwhile
(
  step phantom 300 "${cli[@]}" phantom --out "$work/cohort" --config demo &&
  step preprocess 300 "${cli[@]}" preprocess --manifest "$work/cohort/manifest.csv" \
    --out "$work/pre" --config demo
  step tables 300 "$py" -c "
import sys; sys.path.insert(0, '$root/benchmarks')
from synthetic_patches import write_table
for n in '$sizes'.split(): write_table(f'$work/table-{n}', int(n))"
) &
cpu_side=$!
step bench_paper 300 "$py" "$root/benchmarks/bench_gpu.py" --preset "$preset" "${bench[@]}" \
  --out "$out/bench_gpu_paper.json" --profile-dir "$out"
wait $cpu_side

# 2. the scoring job at the defaults (A alone) on the largest table ~job_seconds allow at the
#    core's best rate, with random paper weights (speed does not depend on them): G and D only
rate=$("$py" -c "
import json
paths = json.load(open('$out/bench_gpu_paper.json'))['paths']
print(max([r.get('patches_per_s', 0) for r in paths.values()] + [1]))" 2>/dev/null || echo 1)
patches=$small
for n in $sizes; do
  "$py" -c "import sys; sys.exit(0 if $n <= float('$rate') * $job_seconds else 1)" && patches=$n
done
"$py" -c "
from anogan_ray.config import load_config
from anogan_ray.core.model import save_bundle
from anogan_ray.core.networks import build_models
cfg = load_config('$preset').model
save_bundle('$work/random', *build_models(cfg, seed=0), cfg)"
if in_time $((patches * 5 / 4 / ${rate%.*} + 40)); then
  step score_default 420 "${cli[@]}" score --patches "$work/table-$patches" --model "$work/random" \
    --out "$work/score_default" --config "$preset" --set score.reference_score=false
  cp "$work/score_default/summary.json" "$out/score_default.json" 2>/dev/null
fi

# 3. a short training run on the GPU; the compile variants meanwhile
if in_time 100; then
  [ "${GPU_CHECK_MODES:-1}" = 1 ] && "$py" "$root/benchmarks/gpu_compile_modes.py" --device "$device" --preset "$preset" \
    --steps $((steps < 20 ? steps : 20)) --rows 64 --timeout 200 \
    --out "$out/compile_modes.json" > "$out/compile_modes.log" 2>&1 &
  modes=$!  # (or a no-op's)
  step train 240 "${cli[@]}" train --patches "$work/pre/patches" --out "$work/model" --config "$preset" \
    --set train.num_workers=1 --set train.max_steps=$train_steps --set train.epochs=1 \
    --set train.use_gpu=$([ "$device" = cuda ] && echo true || echo false)
  wait $modes
fi

# 4. the trained bundle: encoder+iterative (10^4 patches: below score.compile=auto's threshold)
if in_time 80 && [ -f "$work/model/bundle.json" ]; then
  step score_encoder 200 "${cli[@]}" score --patches "$work/table-$small" --model "$work/model" \
    --out "$work/score_encoder" --config "$preset" \
    --set score.reference_score=false --set score.mapping=encoder+iterative
  cp "$work/score_encoder/summary.json" "$out/score_encoder.json" 2>/dev/null
fi

# 5. the demo preset's model on the GPU
if in_time 60; then
  step bench_demo 200 "$py" "$root/benchmarks/bench_gpu.py" --preset demo "${bench[@]}" \
    --paths "$demo_paths" \
    --rows-grid 4096 --train-steps 5 --no-gan-r \
    --out "$out/bench_gpu_demo.json"
fi

# the verdict; the logs and profiles in one archive beside the JSON
wait  # the compile variants, if still running
tar -C "$out" -czf "$work/logs.tgz" --exclude '*.json' . && mv "$work/logs.tgz" "$out/" &&
  find "$out" -maxdepth 1 -type f ! -name '*.json' ! -name logs.tgz ! -name steps.jsonl -delete
"$py" - "$out" "$device" <<'EOF'
import json, sys
from pathlib import Path

out, device = Path(sys.argv[1]), sys.argv[2]
read = lambda name: json.loads((out / name).read_text()) if (out / name).exists() else None
steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
result = {"steps": steps, "seconds": sum(s["seconds"] for s in steps)}
for name in ("bench_gpu_paper", "bench_gpu_demo", "compile_modes", "score_default", "score_encoder"):
    result[name] = read(f"{name}.json")
checks = {"no step failed": all(s["exit_code"] == 0 for s in steps)}
for job in ("score_default", "score_encoder"):
    summary = result[job]
    if summary is None:
        checks[f"{job} ran"] = False
        continue
    checks[f"{job} on {device}"] = summary["device"] == device
    paths = " ".join(summary.get("fast_paths", {}))
    checks[f"{job} kept its fast path"] = "differed" not in paths and "failed" not in paths
bench = result["bench_gpu_paper"] or {}
for name, row in bench.get("paths", {}).items():
    if "within_scorer_tolerance" in row:
        checks[f"bench {name} within tolerance of fp32"] = row["within_scorer_tolerance"]
# the job's rate after its first batch over the benchmark's rate of the path it ran
job = result["score_default"]
if job and job.get("patches_per_s_after_first_batch"):
    label = next(iter(job.get("fast_paths", {})), "").split(" (")[0]  # "cuda bf16 + ..."
    words = {"channels_last": "channels_last", "CUDA graph": "graph", "compiled": "compile",
             "padded channels": "pad"}
    precision, *parts = label.split(" ", 1)[-1].split(" + ")
    wanted = {precision, *(words[p] for p in parts if p in words)}
    for name, row in bench.get("paths", {}).items():
        if set(name.split("+")) == wanted and "patches_per_s" in row:
            rate = job["patches_per_s_after_first_batch"]
            result["job_over_core"] = round(rate / row["patches_per_s"], 3)
            result["job_core_path"] = name
result["checks"] = checks
(out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps({"checks": checks, "job_over_core": result.get("job_over_core"), "seconds": result["seconds"]}, indent=2))
sys.exit(0 if all(checks.values()) else 1)
EOF
