"""Export: trained weights -> the models as they are scored, and the model bundle.

Plain torch and numpy (no Ray): the training harness and the sweep call it with a checkpoint's
state and a sample of real training patches; so can anyone holding a checkpoint.
"""

from __future__ import annotations

import copy
import io
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from anogan_ray.config import Config, ModelConfig
from anogan_ray.core.baselines import AdversarialAutoencoder, PCABaseline
from anogan_ray.core.model import save_bundle
from anogan_ray.core.networks import (
    Discriminator,
    Encoder,
    Generator,
    finalize_batchnorm,
    sample_latent,
)
from anogan_ray.tables import decode_pixels

SAMPLE_GRID = 8  # sample previews are 8 x 8 patches


def exported_module(
    kind: type[nn.Module], state: dict[str, Any], cfg: Config, real_pixels: np.ndarray
) -> nn.Module:
    """The encoder or aCAE as scored: weights from its run's final ``state``, BatchNorm
    statistics finalized over real patches, eval mode."""
    module = kind(cfg.model)
    module.load_state_dict(state["encoder" if kind is Encoder else "autoencoder"])
    real = torch.from_numpy(decode_pixels(real_pixels)).unsqueeze(1)  # (N, 1, 64, 64)
    finalize_batchnorm(module, real.split(cfg.train.batch_size))
    return module.eval()


def exported_models(
    state: dict[str, Any],
    cfg: Config,
    real_pixels: np.ndarray,
    device: torch.device | str = "cpu",
) -> tuple[Generator, Discriminator]:
    """G and D as they are scored: weights from ``state``, BatchNorm statistics finalized, eval.

    G's statistics are exact averages over ``cfg.train.batchnorm_samples`` seeded latent draws,
    D's over ``real_pixels`` (uint8 training patches), both in training-sized batches; the
    same state gives the same models.
    """
    model_cfg, train_cfg = cfg.model, cfg.train
    generator, discriminator = Generator(model_cfg), Discriminator(model_cfg)
    generator.load_state_dict(state["generator"])
    discriminator.load_state_dict(state["discriminator"])
    generator.to(device)
    discriminator.to(device)
    batch_size = train_cfg.batch_size
    num_batches = max(1, train_cfg.batchnorm_samples // batch_size)
    latent_rng = torch.Generator().manual_seed(train_cfg.seed + 1)
    finalize_batchnorm(
        generator,
        (sample_latent(batch_size, model_cfg, latent_rng).to(device) for _ in range(num_batches)),
    )
    real = torch.from_numpy(decode_pixels(real_pixels)).unsqueeze(1)  # (N, 1, 64, 64)
    finalize_batchnorm(discriminator, (chunk.to(device) for chunk in real.split(batch_size)))
    return generator.eval(), discriminator.eval()


def export_bundle(
    out: str,
    state: dict[str, Any],
    cfg: Config,
    metadata: dict[str, Any],
    real_pixels: np.ndarray,
    encoder_state: dict[str, Any] | None = None,
    acae_state: dict[str, Any] | None = None,
    pca: PCABaseline | None = None,
) -> dict[str, Any]:
    """Write the model bundle at ``out`` from a training checkpoint's state.

    The models are :func:`exported_models` over ``real_pixels`` (D's BatchNorm patches, a random
    sample of the training table); the encoder and the aCAE (from their runs' final states) and
    the PCA baseline join the bundle when given. The result records how far G's eval-mode samples
    are from its train-mode samples on the same z.

    Returns:
        ``{"model_id": ..., "batchnorm_check": {...}}``.
    """
    generator, discriminator = exported_models(state, cfg, real_pixels)
    check = batchnorm_check(generator, cfg.model, cfg.train.batch_size, seed=cfg.train.seed + 2)
    baselines = {}
    if acae_state is not None:
        baselines["acae"] = exported_module(AdversarialAutoencoder, acae_state, cfg, real_pixels)
    encoder = None
    if encoder_state is not None:
        encoder = exported_module(Encoder, encoder_state, cfg, real_pixels)
    if pca is not None:
        baselines["pca"] = pca
    model_id = save_bundle(
        out,
        generator,
        discriminator,
        cfg.model,
        {**metadata, "batchnorm_check": check},
        baselines=baselines,
        encoder=encoder,
    )
    return {"model_id": model_id, "batchnorm_check": check}


@torch.no_grad()
def batchnorm_check(
    generator: Generator, model_cfg: ModelConfig, batch_size: int, seed: int = 0
) -> dict[str, float]:
    """Compare G in eval mode (running statistics) with G in train mode (batch statistics).

    Returns the mean absolute pixel difference on the same z and each mode's pixel mean and
    standard deviation; after :func:`finalize_batchnorm` the two modes sample alike.
    """
    z = sample_latent(batch_size, model_cfg, torch.Generator().manual_seed(seed))
    was_training = generator.training
    eval_samples = generator.eval()(z)
    train_samples = copy.deepcopy(generator).train()(z)  # the copy's buffers absorb the update
    generator.train(was_training)
    return {
        "mean_abs_difference": float((eval_samples - train_samples).abs().mean()),
        "eval_mean": float(eval_samples.mean()),
        "train_mean": float(train_samples.mean()),
        "eval_std": float(eval_samples.std()),
        "train_std": float(train_samples.std()),
    }


def sample_grid_png(samples: np.ndarray, border: int = 2) -> bytes:
    """PNG bytes of up to 64 patches (N, H, W) in [-1, 1], laid out 8 per row."""
    count, height, width = samples.shape
    rows = -(-count // SAMPLE_GRID)
    grid = np.full(
        (rows * (height + border) + border, SAMPLE_GRID * (width + border) + border),
        255,
        np.uint8,
    )
    pixels = np.clip(np.rint((samples + 1.0) * 127.5), 0, 255).astype(np.uint8)
    for index, patch in enumerate(pixels):
        top = border + (index // SAMPLE_GRID) * (height + border)
        left = border + (index % SAMPLE_GRID) * (width + border)
        grid[top : top + height, left : left + width] = patch
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    return buffer.getvalue()
