"""Why fp32 + torch.compile failed on CUDA, and whether the product's compiled path runs: each
variant maps the same patches compiled, in a process of its own (a fresh dynamo and CUDA
context; all variants at once), and is compared with eager fp32; JSON out. Needs PyTorch only.

    python benchmarks/gpu_compile_modes.py --out compile_modes.json          # one GPU, ~1-2 min
    python benchmarks/gpu_compile_modes.py --device cpu --preset tiny --steps 3 --rows 16 \\
        --variants default,product --out /tmp/modes.json                     # smoke run

Variants (``--variants``):

- ``reduce-overhead``: what ``score.compile`` did before: the step's loss through
  ``torch.compile(mode="reduce-overhead")`` (inductor's CUDA-graph trees) on G and D themselves
  (BatchNorm in eval mode), Adam eagerly; on an H200 in fp32 its backward pass raised
  ``AssertionError: expected size 64==64, stride 1024==1 ... convolution_backward``.
- ``reduce-overhead+step-copies``: the same on the step copies (BatchNorm folded).
- ``default``: ``torch.compile`` with mode ``default`` (no CUDA graphs) on G and D themselves.
- ``product`` / ``product+channels_last``: the scorer's compiled path in fp32
  (:class:`~anogan_ray.core.fastpath.FastPath` with compile and CUDA graphs: mode ``default``
  inside a CUDA graph of the whole step that the product captures itself).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

VARIANTS = (
    "reduce-overhead",
    "reduce-overhead+step-copies",
    "default",
    "product",
    "product+channels_last",
)


def _inputs(args):
    from anogan_ray.config import load_config
    from anogan_ray.core.networks import build_models

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    models = build_models(load_config(args.preset).model, seed=0)
    models = tuple(m.to(device).eval().requires_grad_(False) for m in models)
    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(args.rows, 1, 64, 64, generator=generator) * 2 - 1).to(device)
    return device, models, pixels, [f"modes/{i}" for i in range(args.rows)]


def _own_loop(models, pixels, ids, steps: int, mode: str, step_copies: bool) -> np.ndarray:
    """A(x) after ``steps`` steps whose loss is ``torch.compile(mode=mode)``'d, Adam eager."""
    from anogan_ray.core import fastpath, invert

    generator, discriminator = models
    if step_copies:
        generator, discriminator = fastpath.step_models(generator, discriminator, fastpath.EXACT)
    loss = torch.compile(invert._step_loss, dynamic=False, mode=mode)
    z0 = invert.initial_latent(ids, models[0], "normal", pixels.device)
    with torch.no_grad():
        features_x = models[1].features(pixels)
    z = z0.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=0.01)
    with torch.enable_grad():
        for _ in range(steps):
            if mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
            optimizer.zero_grad(set_to_none=True)
            value = loss(
                generator, discriminator, z, pixels, features_x, lambda_=0.1, modes=("feature",)
            )
            value.sum().backward()
            optimizer.step()
    # A(x) at z_Γ, as the product scores it
    return invert.invert_batch(models, pixels, ids, steps=0, initial_z=z.detach()).anomaly_score


def run_variant(args) -> dict:
    from anogan_ray.core import fastpath
    from anogan_ray.core.invert import invert_batch

    device, models, pixels, ids = _inputs(args)
    exact = invert_batch(models, pixels, ids, steps=args.steps).anomaly_score
    started = time.perf_counter()
    row: dict = {}
    try:
        if args.variant.startswith("reduce-overhead"):
            scores = _own_loop(
                models, pixels, ids, args.steps, "reduce-overhead", "step-copies" in args.variant
            )
        elif args.variant == "default":
            scores = _own_loop(models, pixels, ids, args.steps, "default", False)
        else:
            path = fastpath.FastPath(
                "fp32", "channels_last" in args.variant, compile=True, cuda_graph=True
            )
            scores = invert_batch(models, pixels, ids, steps=args.steps, path=path).anomaly_score
            row["fell_back_to_eager"] = fastpath.effective_path(path) != path
        relative = np.abs(scores - exact) / np.maximum(np.abs(exact), 1e-12)
        row.update(ok=True, max_relative_difference_to_eager=float(relative.max()))
    except Exception as err:  # noqa: BLE001 - the point is to record it
        text = f"{type(err).__name__}: {err}"
        row.update(ok=False, error=text[:1500], error_first_line=text.splitlines()[0][:300])
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # one variant, in a child process
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--out", default="compile_modes.json")
    args = parser.parse_args()
    if args.variant:
        Path(args.out).write_text(json.dumps(run_variant(args)))
        return
    children = {}
    for variant in args.variants.split(","):
        target = Path(args.out).with_suffix(f".{variant}.json")
        command = [sys.executable, __file__, "--variant", variant, "--out", str(target)]
        for flag in ("device", "preset", "steps", "rows"):
            command += [f"--{flag}", str(getattr(args, flag))]
        children[variant] = (subprocess.Popen(command), target)
    result = {"device": args.device, "preset": args.preset, "steps": args.steps,
              "rows": args.rows, "torch": torch.__version__, "variants": {}}  # fmt: skip
    for variant, (child, target) in children.items():
        try:
            code = child.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            code = "timeout"
        row = json.loads(target.read_text()) if target.exists() else {"ok": False}
        row["exit_code"] = code
        result["variants"][variant] = row
        target.unlink(missing_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
