"""Batched latent inversion and the AnoGAN scores (plain PyTorch; no Ray).

For a query patch x, z is optimized with Adam for Γ steps so that G(z) matches x (METHOD.md §3):

    L_R(z) = Σ |x − G(z)|                         residual loss, eq. (3)
    L_D(z) = Σ |f(x) − f(G(z))|                   discrimination loss, eq. (4); f = D's last conv
    L(z)   = (1 − λ)·L_R(z) + λ·L_D(z)            mapping loss, eq. (5)
    A(x)   = (1 − λ)·R(x) + λ·D(x)                anomaly score, eq. (6)

R(x) and D(x) are L_R and L_D evaluated once more at the final z_Γ, after the last update.
The GAN_R variant ("reference" mode) replaces L_D by the reference discrimination loss of Yeh et
al., the sigmoid cross-entropy of D(G(z)) against "real", both for the mapping and for the score.
When both are asked for, they run as one mapping of twice the rows (:func:`invert_modes`).

A batch of B patches is inverted at once with z of shape (B, nz). The optimized objective is the
sum of the per-patch losses, so each z row receives exactly its own patch's gradient, and Adam is
element-wise: every patch follows the trajectory it would follow alone. z starts from a seed
derived from the patch id.

In floating point "the same trajectory" also needs the same kernels. CPU kernels choose their
algorithm and summation order by the batch shape (a matrix-vector product for one row, a matrix
product for several; oneDNN convolution variants; vectorized bodies and scalar tails of
element-wise kernels such as Adam's), and Adam divides each gradient component by its own
magnitude, so a last-bit difference in a small component can change a whole step. Over 20 steps
one patch scored alone and in a batch of 32 differed by up to 3e-4 relative. The mapping
therefore always runs in batches of exactly :func:`mapping_rows` rows (16 on CPU): B patches run
as ⌈B / rows⌉ fixed-shape batches, the last one padded with copies of its first patch, and p_d
is computed in the same shape.

On CUDA the rows follow the GPU's total memory and the model (:func:`mapping_rows`), so they are
fixed per GPU type and model. The Γ steps run on step copies of G and D (BatchNorm folded into
the convolutions) along a :class:`~anogan_ray.core.fastpath.FastPath` (precision, memory format,
torch.compile, CUDA graphs), all in the same fixed shapes; f(x) and the scores at z_Γ are
computed eagerly in fp32 with G and D themselves.

The guarantee: with the same torch build, CPU capability and thread count and the same fast
path, a patch's scores on CPU are bit-identical whatever batch it is scored in, at whatever
position, next to whichever patches (tests/test_invert.py). Between machines, capabilities or
thread counts they differ by rounding amplified over the Γ steps: on the test model (20 steps)
up to 7e-5 relative between ATEN_CPU_CAPABILITY=default and avx2 / avx512, and between 2 and 3
threads (avx2 and avx512 agree to the bit). On CUDA, cuDNN times its algorithms per process
(``cudnn.benchmark``) and some of them add with atomics, so two runs may differ in the last bits
(benchmarks/bench_gpu.py measures how much). Compare scores from different machines or GPU runs
with a tolerance, not for equality.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from anogan_ray.core.baselines import acae_score
from anogan_ray.core.fastpath import (
    EXACT,
    FastPath,
    fast_path_rtol,
    latent_stepper,
    precision_context,
)
from anogan_ray.core.model import ModelBundle
from anogan_ray.core.networks import Discriminator, Generator, sample_latent
from anogan_ray.tables import patch_seed

log = logging.getLogger(__name__)

Mode = Literal["feature", "reference"]
Mapping = Literal["iterative", "encoder", "encoder+iterative"]
MAPPINGS = ("iterative", "encoder", "encoder+iterative")

# ---------------------------------------------------------------------------------------------
# Losses (per patch; shared by training, inversion and evaluation)
# ---------------------------------------------------------------------------------------------


def residual_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Eq. (3): Σ |x − G(z)| over each patch's pixels; (B, 1, H, W) x 2 -> (B,)."""
    return (x - x_hat).abs().flatten(1).sum(1)


def discrimination_loss(features_x: torch.Tensor, features_hat: torch.Tensor) -> torch.Tensor:
    """Eq. (4), feature matching: Σ |f(x) − f(G(z))| over D's last-conv features; -> (B,)."""
    return (features_x - features_hat).abs().flatten(1).sum(1)


def reference_discrimination_loss(logits_hat: torch.Tensor) -> torch.Tensor:
    """Yeh et al.'s discrimination loss: sigmoid cross-entropy of D(G(z)) against "real"; -> (B,)."""
    return F.softplus(-logits_hat)  # == BCEWithLogits(logits, 1), elementwise


def mapping_loss(
    residual: torch.Tensor, discrimination: torch.Tensor, lambda_: float
) -> torch.Tensor:
    """Eqs. (5) and (6): (1 − λ)·residual + λ·discrimination, per patch."""
    return (1.0 - lambda_) * residual + lambda_ * discrimination


# ---------------------------------------------------------------------------------------------
# Inversion
# ---------------------------------------------------------------------------------------------


@dataclass
class InversionResult:
    """Per-patch results of one mapping, each an array with one entry per patch (B,)."""

    anomaly_score: np.ndarray  # A(x) (or Â(x) in reference mode), eq. (6)
    residual_score: np.ndarray  # R(x): Σ |x − G(z_Γ)|
    discrimination_score: np.ndarray  # D(x): feature matching, or the reference loss
    residual_max: np.ndarray  # max over pixels of |x − G(z_Γ)|
    residual_max_y: np.ndarray  # its row (int32)
    residual_max_x: np.ndarray  # its column (int32)
    z: np.ndarray | None = None  # (B, nz) final latent, on request
    residual_map: np.ndarray | None = None  # (B, H, W) |x − G(z_Γ)|, on request


def initial_latent(
    patch_ids: Sequence[str], generator: Generator, latent_prior: str, device: torch.device
) -> torch.Tensor:
    """z_1 for each patch, drawn from the latent prior with a seed derived from its id; (B, nz).

    Drawn on the CPU and then moved, so the same patch starts from the same z on every device.
    """
    from anogan_ray.config import ModelConfig

    cfg = ModelConfig(latent_dim=generator.latent_dim, latent_prior=latent_prior)
    rng = torch.Generator(device="cpu")
    rows = []
    for pid in patch_ids:
        rng.manual_seed(patch_seed(pid))
        rows.append(sample_latent(1, cfg, generator=rng))
    return torch.cat(rows).to(device)  # (B, nz)


# On CUDA: the share of the GPU's memory one mode's fixed-shape batch may fill with activations
# (GAN_R's mapping doubles it), and the most rows a batch gets.
CUDA_MEMORY_SHARE = 0.25
CUDA_MAX_ROWS = 1024
_CUDA_ROWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # G -> {(device, D): rows}


def mapping_rows(
    device: torch.device, models: tuple[Generator, Discriminator] | None = None
) -> int:
    """The fixed number of rows every batch of the mapping runs with on ``device``.

    16 on CPU: the patch-steps/s of the tiny and demo models are within ~10% from 8 to 64 rows
    per batch there, the paper model's from 16 to 64 (128: 20 % fewer; bench_invert.py), and few
    rows waste little on padding. On CUDA, with the ``models``, as many
    as the GPU's memory holds (:func:`rows_for_memory` of its total memory and the bytes one row
    of the mapping step measurably takes), found once per process, device and model; the total
    memory, not the free, so that every run on the same GPU type gets the same rows. Without the
    models (E(x), p_d, the baselines: :func:`in_fixed_rows`) 256. Changing it changes the scores
    in their last bits.
    """
    if device.type != "cuda":
        return 16
    if models is None:
        return 256
    generator, discriminator = models
    gpu = _device_of(generator)  # "cuda:0" where ``device`` may say "cuda"
    known = _CUDA_ROWS.setdefault(generator, {})
    key = (str(gpu), id(discriminator))
    if key not in known:
        total = torch.cuda.mem_get_info(gpu)[1]
        known[key] = rows_for_memory(total, _cuda_bytes_per_row(generator, discriminator))
        log.info("mapping %d rows per batch on %s", known[key], gpu)
    return known[key]


def rows_for_memory(
    memory_bytes: int, bytes_per_row: int, share: float = CUDA_MEMORY_SHARE,
    max_rows: int = CUDA_MAX_ROWS, min_rows: int = 16,
) -> int:  # fmt: skip
    """The largest power of two of rows whose ``bytes_per_row`` fit in ``share`` of
    ``memory_bytes``, within [``min_rows``, ``max_rows``]."""
    fitting = int(memory_bytes * share) // max(bytes_per_row, 1)
    rows = 1 << (max(fitting, 1).bit_length() - 1)  # round down to a power of two
    return max(min_rows, min(max_rows, rows))


def _cuda_bytes_per_row(generator: Generator, discriminator: Discriminator, probe: int = 16) -> int:
    """Peak CUDA memory of one fp32 mapping step (forward and backward) per row, measured on
    ``probe`` rows."""
    device = _device_of(generator)
    z = torch.zeros(probe, generator.latent_dim, device=device, requires_grad=True)
    x = torch.zeros(probe, 1, 64, 64, device=device)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.enable_grad():
        features_x = discriminator.features(x).detach()
        loss = _step_loss(
            generator, discriminator, z, x, features_x, lambda_=0.5, modes=("feature",)
        )
        loss.sum().backward()
    torch.cuda.synchronize(device)
    return -(-(torch.cuda.max_memory_allocated(device) - before) // probe)  # ceil


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` (n <= rows, ...) with copies of its first row appended up to ``rows`` rows."""
    missing = rows - t.shape[0]
    if missing == 0:
        return t
    return torch.cat([t, t[:1].expand(missing, *t.shape[1:])])


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def invert_batch(
    model: ModelBundle | tuple[Generator, Discriminator],
    pixels: torch.Tensor,
    patch_ids: Sequence[str],
    *,
    mode: Mode = "feature",
    **settings: Any,
) -> InversionResult:
    """Map a batch of patches to the latent space and score them with one discrimination loss.

    ``mode`` is ``"feature"`` (AnoGAN, eq. 4) or ``"reference"`` (GAN_R, Yeh et al.); the other
    arguments are :func:`invert_modes`'.
    """
    return invert_modes(model, pixels, patch_ids, modes=(mode,), **settings)[mode]


def invert_modes(
    model: ModelBundle | tuple[Generator, Discriminator],
    pixels: torch.Tensor,
    patch_ids: Sequence[str],
    *,
    modes: Sequence[Mode] = ("feature",),
    lambda_: float = 0.1,
    steps: int = 500,
    z_lr: float = 0.01,
    latent_prior: str | None = None,
    return_residual_map: bool = False,
    return_z: bool = False,
    path: FastPath = EXACT,
    initial_z: torch.Tensor | None = None,
    rows: int | None = None,
) -> dict[Mode, InversionResult]:
    """Map a batch of patches to the latent space once per discrimination loss, in one mapping.

    With ``modes=("feature", "reference")`` each fixed-shape batch of R patches runs as one
    mapping of 2R rows: rows 0..R−1 optimize the feature-matching loss, rows R..2R−1 the reference
    loss, each row from the patch's own z_1. The optimized objective is still a sum of per-row
    losses, so every row follows its own trajectory, and a GPU sees one wide batch instead of two
    narrow ones. The scores equal those of separate mappings up to rounding (the kernels see 2R
    rows instead of R; tests/test_invert.py states the tolerance), and are bit-identical whatever
    batch a patch comes in, as for one mode.

    Args:
        model: a loaded bundle, or a (G, D) pair (put in eval mode and frozen here).
        pixels: (B, 1, 64, 64) float patches in [-1, 1], on any device (moved to the model's).
        patch_ids: one id per patch; seeds z_1.
        modes: the discrimination losses, each ``"feature"`` or ``"reference"``, each once.
        lambda_: λ of eqs. (5) and (6).
        steps: Γ, Adam updates of z.
        z_lr: Adam learning rate of z.
        latent_prior: ``"normal"`` or ``"uniform"``; by default the bundle's.
        return_residual_map: also return |x − G(z_Γ)|, (B, 64, 64).
        return_z: also return z_Γ, (B, nz).
        path: how the Γ steps run (:class:`~anogan_ray.core.fastpath.FastPath`: precision,
            memory format, compiled, CUDA graph); f(x) and the scores at z_Γ are always computed
            eagerly in fp32 (see :func:`check_fast_path`).
        initial_z: z_1 (B, nz), e.g. E(x) of a trained encoder; by default drawn from the prior
            with a seed derived from each patch id.
        rows: patches per fixed-shape batch; by default :func:`mapping_rows`, the only value
            whose scores the guarantee covers (another changes them in their last bits).

    Returns:
        ``{mode: InversionResult}`` of numpy arrays on the CPU.
    """
    if isinstance(model, ModelBundle):
        generator, discriminator = model.generator, model.discriminator
        latent_prior = latent_prior or model.model_config.latent_prior
    else:
        generator, discriminator = model
        generator.eval().requires_grad_(False)
        discriminator.eval().requires_grad_(False)
    latent_prior = latent_prior or "normal"
    modes = tuple(modes)
    if not modes or len(set(modes)) < len(modes) or set(modes) - {"feature", "reference"}:
        raise ValueError(f"modes {modes!r}: expected 'feature' and/or 'reference', each once")
    if pixels.ndim != 4 or pixels.shape[1] != 1 or len(patch_ids) != pixels.shape[0]:
        raise ValueError(
            f"pixels of shape {tuple(pixels.shape)} with {len(patch_ids)} patch ids: "
            "expected (B, 1, H, W) and one id per patch"
        )
    device = _device_of(generator)
    x = pixels.to(device=device, dtype=torch.float32)  # (B, 1, 64, 64)
    if initial_z is None:
        z0 = initial_latent(patch_ids, generator, latent_prior, device)  # (B, nz)
    else:
        z0 = initial_z.detach().to(device=device, dtype=torch.float32)  # (B, nz)
    rows = rows or mapping_rows(device, (generator, discriminator))
    common = dict(lambda_=lambda_, z_lr=z_lr, modes=modes, path=path)
    parts = []
    for start in range(0, len(patch_ids), rows):
        count = min(rows, len(patch_ids) - start)
        part = _invert_rows(
            generator,
            discriminator,
            _pad_rows(x[start : start + rows], rows),
            _pad_rows(z0[start : start + rows], rows),
            steps=steps,
            **common,
        )
        parts.append({m: {name: t[:count] for name, t in part[m].items()} for m in modes})
    if not parts:  # no patches: empty columns of the right shapes
        parts = [_invert_rows(generator, discriminator, x, z0, steps=0, **common)]

    def cpu(t: torch.Tensor) -> np.ndarray:
        return t.detach().float().cpu().numpy()

    results = {}
    for mode in modes:
        out = {name: torch.cat([part[mode][name] for part in parts]) for name in parts[0][mode]}
        residual_map = out["residual_map"]  # (B, H, W)
        width = residual_map.shape[-1]
        results[mode] = InversionResult(
            anomaly_score=cpu(out["anomaly"]),
            residual_score=cpu(out["residual"]),
            discrimination_score=cpu(out["discrimination"]),
            residual_max=cpu(out["residual_max"]),
            residual_max_y=(out["where"] // width).cpu().numpy().astype(np.int32),
            residual_max_x=(out["where"] % width).cpu().numpy().astype(np.int32),
            z=cpu(out["z"]) if return_z else None,
            residual_map=cpu(residual_map) if return_residual_map else None,
        )
    return results


def _discrimination(
    discriminator: Discriminator,
    x_hat: torch.Tensor,
    features_x: torch.Tensor | None,
    modes: tuple[Mode, ...],
) -> torch.Tensor:
    """The discrimination loss of each row of G(z) (M·R, 1, H, W), row block m in ``modes[m]``;
    ``features_x`` is f(x) of the R patches (R, 8c, 4, 4) when a mode needs it. -> (M·R,)"""
    features_hat = discriminator.features(x_hat)  # (M·R, 8c, 4, 4)
    rows = features_hat.shape[0] // len(modes)
    losses = []
    for block, mode in zip(features_hat.split(rows), modes, strict=True):
        if mode == "feature":
            losses.append(discrimination_loss(features_x, block))
        else:
            losses.append(reference_discrimination_loss(discriminator.logits(block)))
    return torch.cat(losses)


def _step_loss(
    generator: Generator,
    discriminator: Discriminator,
    z: torch.Tensor,
    x_rows: torch.Tensor,
    features_x: torch.Tensor | None,
    *,
    lambda_: float,
    modes: tuple[Mode, ...],
) -> torch.Tensor:
    """L(z) of eq. (5) per row, in the dtype of G and D (their step copies): z (M·R, nz) fp32,
    x_rows (M·R, 1, H, W) and features_x in that dtype -> (M·R,) fp32."""
    x_hat = generator(z.to(x_rows.dtype))  # (M·R, 1 or PADDED_CHANNELS, H, W)
    residual = residual_loss(x_rows, x_hat[:, :1])
    disc = _discrimination(discriminator, x_hat, features_x, modes)
    return mapping_loss(residual, disc, lambda_).float()


def _invert_rows(
    generator: Generator,
    discriminator: Discriminator,
    x: torch.Tensor,
    z0: torch.Tensor,
    *,
    lambda_: float,
    steps: int,
    z_lr: float,
    modes: tuple[Mode, ...],
    path: FastPath = EXACT,
) -> dict[Mode, dict[str, torch.Tensor]]:
    """The mapping of one fixed-shape batch: x (R, 1, H, W), z_1 (R, nz) -> per mode, per-row
    tensors. It runs on M·R rows, the R patches once per mode (see :func:`invert_modes`).

    The Γ steps run along ``path`` (:class:`~anogan_ray.core.fastpath.LatentStepper`); f(x) and
    the scores at z_Γ in eager fp32 with G and D themselves."""
    device, rows = x.device, x.shape[0]
    with torch.no_grad(), precision_context(device, "fp32"):
        features_x = discriminator.features(x) if "feature" in modes else None  # (R, 8c, 4, 4)
    x_rows = x.repeat(len(modes), 1, 1, 1)  # (M·R, 1, H, W)
    z = z0.repeat(len(modes), 1)  # (M·R, nz)
    if steps:
        stepper = latent_stepper(
            _step_loss, (generator, discriminator), path, z_lr, x_rows.shape[0],
            lambda_=lambda_, modes=modes,
        )  # fmt: skip
        with precision_context(device, path.precision):
            z = stepper.run(x_rows, features_x, z, steps)

    # R(x), D(x), A(x) at the final z_Γ (after the last update), in fp32 whatever the steps used
    with torch.no_grad(), precision_context(device, "fp32"):
        x_hat = generator(z)
        residual = residual_loss(x_rows, x_hat)
        disc = _discrimination(discriminator, x_hat, features_x, modes)
        residual_map = (x_rows - x_hat).abs()[:, 0]  # (M·R, H, W)
        residual_max, where = residual_map.flatten(1).max(1)
    out = {
        "anomaly": mapping_loss(residual, disc, lambda_),
        "residual": residual,
        "discrimination": disc,
        "residual_map": residual_map,
        "residual_max": residual_max,
        "where": where,
        "z": z.detach(),
    }
    return {
        mode: {name: t[m * rows : (m + 1) * rows] for name, t in out.items()}
        for m, mode in enumerate(modes)
    }


def in_fixed_rows(function: Any, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``function`` over ``pixels`` (B, ...) run in batches of exactly :func:`mapping_rows` rows.

    Every per-patch output outside the mapping (E(x), p_d, the baselines' scores) goes through
    here, so it is bit-identical whatever batch the patch came in, like the mapping's scores.
    """
    x = pixels.to(device=device, dtype=torch.float32)
    rows = mapping_rows(device)
    parts = [
        function(_pad_rows(x[start : start + rows], rows))[: min(rows, len(x) - start)]
        for start in range(0, len(x), rows)
    ]
    return torch.cat(parts) if parts else function(x)


def encode(model: ModelBundle | Any, pixels: torch.Tensor) -> torch.Tensor:
    """z = E(x) with the bundle's trained encoder; (B, 1, 64, 64) -> (B, nz).

    Raises:
        ValueError: the bundle has no encoder.
    """
    encoder = getattr(model, "encoder", None)
    if encoder is None:
        raise ValueError(
            "this model bundle has no encoder E: train it with train.encoder=true, or score "
            "with score.mapping=iterative"
        )
    with torch.no_grad():
        return in_fixed_rows(encoder, pixels, _device_of(encoder))


def discriminator_probability(
    model: ModelBundle | tuple[Generator, Discriminator], pixels: torch.Tensor
) -> np.ndarray:
    """p_d: D's probability that each patch is real (the paper's P_D baseline); (B,).

    A low probability means "looks unlike training data", so ``1 − p_d`` ranks anomalies; the
    score table keeps p_d itself and evaluation uses ``-p_d``.
    """
    discriminator = model.discriminator if isinstance(model, ModelBundle) else model[1]
    with torch.no_grad():  # the sigmoid too: element-wise kernels round by the tensor's length
        p_d = in_fixed_rows(
            lambda x: torch.sigmoid(discriminator(x)), pixels, _device_of(discriminator)
        )
    return p_d.float().cpu().numpy()


# Score-table columns produced by :func:`score_patches`, in order.
SCORE_COLUMNS = (
    "anomaly_score",
    "residual_score",
    "discrimination_score",
    "p_d",
    "ref_discrimination_score",
    "ref_anomaly_score",
    "residual_max",
    "residual_max_y",
    "residual_max_x",
    "acae_score",
    "pca_score",
)


def score_patches(
    model: ModelBundle | tuple[Generator, Discriminator],
    pixels: torch.Tensor,
    patch_ids: Sequence[str],
    *,
    lambda_: float = 0.1,
    steps: int = 500,
    z_lr: float = 0.01,
    reference_score: bool = False,
    return_z: bool = False,
    path: FastPath = EXACT,
    mapping: Mapping = "iterative",
) -> dict[str, np.ndarray]:
    """All score-table columns for a batch: A, R, D, p_d, GAN_R (NaN unless requested), residual
    max, and the baselines' scores (NaN when the bundle has no such baseline).

    ``mapping`` says where z starts: ``iterative`` (the paper: the patch id's seed, then
    ``steps`` updates), ``encoder`` (z = E(x), no updates: f-AnoGAN) or ``encoder+iterative``
    (z_1 = E(x), then ``steps`` updates); the encoder mappings need a bundle with E.
    ``path`` is :func:`invert_modes`'.

    Returns:
        ``{column: (B,) array}`` for :data:`SCORE_COLUMNS`, plus ``z`` (B, nz) when ``return_z``.
    """
    if mapping not in MAPPINGS:
        raise ValueError(f"mapping {mapping!r}: expected one of {', '.join(MAPPINGS)}")
    initial_z = None
    if mapping != "iterative":
        initial_z = encode(model, pixels)
        steps = 0 if mapping == "encoder" else steps
    modes: tuple[Mode, ...] = ("feature", "reference") if reference_score else ("feature",)
    results = invert_modes(
        model, pixels, patch_ids, modes=modes, lambda_=lambda_, steps=steps, z_lr=z_lr,
        return_z=return_z, path=path, initial_z=initial_z,
    )  # fmt: skip
    feature = results["feature"]
    columns = {f.name: getattr(feature, f.name) for f in fields(feature)}
    columns.pop("residual_map")
    z = columns.pop("z")
    columns["p_d"] = discriminator_probability(model, pixels)
    nan = np.full(len(patch_ids), np.nan, dtype=np.float32)
    columns["ref_discrimination_score"] = columns["ref_anomaly_score"] = nan
    if reference_score:
        ref = results["reference"]
        columns["ref_discrimination_score"] = ref.discrimination_score
        columns["ref_anomaly_score"] = ref.anomaly_score
    columns["acae_score"] = columns["pca_score"] = nan
    baselines = model.baselines if isinstance(model, ModelBundle) else {}
    if "acae" in baselines:
        acae = baselines["acae"]
        columns["acae_score"] = in_fixed_rows(
            lambda x: torch.from_numpy(acae_score(acae, x)), pixels, _device_of(acae)
        ).numpy()
    if "pca" in baselines:
        pca = baselines["pca"]
        columns["pca_score"] = (
            in_fixed_rows(
                lambda x: torch.from_numpy(pca.score(x.numpy())), pixels, torch.device("cpu")
            )
            .numpy()
            .astype(np.float32)
        )
    out = {name: columns[name] for name in SCORE_COLUMNS}
    if return_z:
        out["z"] = z
    return out


# The agreement check maps this many patches of an actor's first batch once more in exact fp32,
# in fixed-shape batches of CHECK_ROWS rows (small: a fraction of a batch's time on a GPU).
CHECK_PATCHES = 8
CHECK_ROWS = 16


def check_fast_path(
    model: ModelBundle | tuple[Generator, Discriminator],
    pixels: torch.Tensor,
    patch_ids: Sequence[str],
    fast_scores: np.ndarray,
    *,
    path: FastPath,
    lambda_: float,
    steps: int,
    z_lr: float,
    initial_z: torch.Tensor | None = None,
) -> tuple[bool, float]:
    """Compare A(x) of a few patches mapped along ``path`` (``fast_scores``, as the batch gave
    them) with the same patches mapped in exact fp32 at :data:`CHECK_ROWS` rows.

    The exact mapping replays its steps in a CUDA graph when ``path`` does (the very kernels of
    eager fp32, without the launches), so the check costs a fraction of a batch.

    Returns:
        (within :func:`~anogan_ray.core.fastpath.fast_path_rtol`, the largest relative difference).
    """
    exact_path = dataclasses.replace(EXACT, cuda_graph=path.cuda_graph)
    exact = invert_batch(
        model, pixels, patch_ids, lambda_=lambda_, steps=steps, z_lr=z_lr, initial_z=initial_z,
        path=exact_path, rows=CHECK_ROWS,
    ).anomaly_score  # fmt: skip
    worst = float(np.max(np.abs(fast_scores - exact) / np.maximum(np.abs(exact), 1e-12)))
    return worst <= fast_path_rtol(path), worst
