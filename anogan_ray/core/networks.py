"""The networks of AnoGAN: the DCGAN's G and D, and the encoder E (plain PyTorch; no Ray).

Paper: G maps z to a 64 x 64 gray patch with 4 fractionally-strided convolutions,
channels 512-256-128-64, 5 x 5 filters, tanh output; D has 4 convolutions 64-128-256-512
and outputs the probability that a patch is real. ``ModelConfig.base_channels`` = 64 is exactly
the paper; smaller values give the tiny models the tests use. The trained networks are stored as a
model bundle (:mod:`anogan_ray.core.model`); the baselines reuse them
(:mod:`anogan_ray.core.baselines`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from anogan_ray.config import ModelConfig


def _padding(kernel_size: int) -> tuple[int, int]:
    """(padding, output_padding) so that a stride-2 (transposed) conv halves (doubles) the size."""
    return (2, 1) if kernel_size == 5 else (1, 0)


class Generator(nn.Module):
    """z (B, latent_dim) -> patch (B, 1, 64, 64) in [-1, 1]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = cfg.base_channels
        k = cfg.kernel_size
        pad, out_pad = _padding(k)
        self.latent_dim = cfg.latent_dim
        self.project = nn.Sequential(  # z -> (8c) x 4 x 4, DCGAN's projection and reshape
            nn.Linear(cfg.latent_dim, 8 * c * 4 * 4, bias=False),
            nn.Unflatten(1, (8 * c, 4, 4)),
            nn.BatchNorm2d(8 * c),
            nn.ReLU(inplace=True),
        )

        def up(cin: int, cout: int, last: bool = False) -> list[nn.Module]:
            conv = nn.ConvTranspose2d(cin, cout, k, 2, pad, out_pad, bias=last)
            return [conv, nn.Tanh()] if last else [conv, nn.BatchNorm2d(cout), nn.ReLU(True)]

        self.upsample = nn.Sequential(
            *up(8 * c, 4 * c),  # state size. (4c) x 8 x 8
            *up(4 * c, 2 * c),  # state size. (2c) x 16 x 16
            *up(2 * c, c),  # state size. c x 32 x 32
            *up(c, 1, last=True),  # state size. 1 x 64 x 64
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.project(z))


def _d_layer(layer: nn.Module, d_norm: str) -> nn.Module:
    """A conv / linear layer of D, spectrally normalized when ``d_norm`` is ``"spectral"``."""
    return spectral_norm(layer) if d_norm == "spectral" else layer


def _d_norm_layer(channels: int, d_norm: str) -> nn.Module:
    """The normalization after a conv of D: BatchNorm, or LayerNorm over (C, H, W) per patch."""
    if d_norm == "batch":
        return nn.BatchNorm2d(channels)
    # one group: LayerNorm over (C, H, W) with a per-channel affine, as WGAN-GP's critic
    return nn.GroupNorm(1, channels)


class Discriminator(nn.Module):
    """patch (B, 1, 64, 64) -> logit (B,); ``features`` is its last convolution layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = cfg.base_channels
        k = cfg.kernel_size
        pad, _ = _padding(k)

        def down(cin: int, cout: int, norm: bool = True) -> list[nn.Module]:
            normalized = norm and cfg.d_norm != "spectral"  # a norm layer follows: no bias
            layers: list[nn.Module] = [
                _d_layer(nn.Conv2d(cin, cout, k, 2, pad, bias=not normalized), cfg.d_norm)
            ]
            if normalized:
                layers.append(_d_norm_layer(cout, cfg.d_norm))
            return [*layers, nn.LeakyReLU(0.2, inplace=True)]

        self.convs = nn.Sequential(
            *down(1, c, norm=False),  # state size. c x 32 x 32 (no BatchNorm on D's input, DCGAN)
            *down(c, 2 * c),  # state size. (2c) x 16 x 16
            *down(2 * c, 4 * c),  # state size. (4c) x 8 x 8
            *down(4 * c, 8 * c),  # state size. (8c) x 4 x 4
        )
        self.classify = nn.Sequential(
            nn.Flatten(), _d_layer(nn.Linear(8 * c * 4 * 4, 1), cfg.d_norm)
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """f(x) of eq. (4): the last convolution layer's activations, (B, 8c, 4, 4)."""
        return self.convs(x)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """D's logits from its last-conv features: (B, 8c, 4, 4) -> (B,); sigmoid -> D(x)."""
        return self.classify(features).squeeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(x))  # (B,) logits


class Encoder(nn.Module):
    """E of f-AnoGAN: patch (B, 1, 64, 64) -> z (B, latent_dim) in (-1, 1) (tanh-bounded).

    D's convolution stack, then a linear layer to the latent size: one forward pass replaces
    (or warm-starts) the iterative mapping of z.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # state size. (8c) x 4 x 4; BatchNorm whatever D uses (E is trained like an autoencoder)
        self.convs = Discriminator(dataclasses.replace(cfg, d_norm="batch")).convs
        self.code = nn.Sequential(
            nn.Flatten(), nn.Linear(8 * cfg.base_channels * 4 * 4, cfg.latent_dim), nn.Tanh()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.code(self.convs(x))


def init_weights(module: nn.Module) -> None:
    """DCGAN initialization: conv/linear weights N(0, 0.02), BatchNorm scale N(1, 0.02), bias 0.

    A spectrally normalized layer gets the same initial weight, and its power-iteration vectors
    are re-estimated for it.
    """
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        if parametrize.is_parametrized(module, "weight"):
            nn.init.normal_(module.parametrizations.weight.original, 0.0, 0.02)
            _restart_power_iteration(module)
        else:
            nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def _restart_power_iteration(module: nn.Module) -> None:
    """Re-estimate a spectrally normalized layer's singular vectors for its current weight, as
    ``spectral_norm`` does when it is applied (15 power iterations)."""
    norm = module.parametrizations.weight[0]
    original = module.parametrizations.weight.original
    norm._power_method(norm._reshape_weight_to_matrix(original), 15)


def build_models(cfg: ModelConfig, seed: int = 0) -> tuple[Generator, Discriminator]:
    """A freshly initialized (G, D) pair; the same seed gives the same weights."""
    torch.manual_seed(seed)
    generator, discriminator = Generator(cfg), Discriminator(cfg)
    generator.apply(init_weights)
    discriminator.apply(init_weights)
    return generator, discriminator


@torch.no_grad()
def finalize_batchnorm(module: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Set every BatchNorm's running statistics to their exact average over ``batches``.

    During training the running statistics are an exponential average that lags the weights;
    exported models run in eval mode, so their statistics must describe the final weights. Each
    batch runs forward in train mode with ``momentum=None`` (a cumulative average); the module's
    mode and momenta are restored afterwards and no parameter changes.

    Args:
        module: the network (G fed with z batches, D fed with real patches).
        batches: inputs of the module, each a full-sized batch like the training batches.

    Returns:
        The number of samples the statistics were computed from.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    was_training = module.training
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    module.train()
    seen = 0
    try:
        for batch in batches:
            module(batch)
            seen += batch.shape[0]
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        module.train(was_training)
    if norms and seen == 0:
        raise ValueError("finalize_batchnorm: no batches given, BatchNorm statistics were reset")
    return seen


def sample_latent(
    n: int, cfg: ModelConfig, generator: torch.Generator | None = None, device: Any = "cpu"
) -> torch.Tensor:
    """n draws from the latent prior, (n, latent_dim)."""
    shape = (n, cfg.latent_dim)
    if cfg.latent_prior == "uniform":
        return torch.rand(shape, generator=generator, device=device) * 2 - 1
    return torch.randn(shape, generator=generator, device=device)
