"""Training recipes: what one training step of each trained model is (plain PyTorch; no Ray).

A recipe names its modules, builds them and their optimizers, and defines one step on a batch
of real patches. The Ray Train harness (:mod:`anogan_ray.pipelines.train`) runs any recipe: it
owns DDP, data sharding and shuffling, checkpoints (every module's and optimizer's state dict,
under the module's name), resume, failure handling, progress and reports.

- ``gan``: AnoGAN's DCGAN, G and D (the paper's eq. (1); or f-AnoGAN's WGAN-GP with
  ``train.objective: wgan-gp``, :mod:`anogan_ray.core.wgan_gp`).
- ``acae``: the adversarial convolutional autoencoder baseline (:mod:`anogan_ray.core.baselines`).
- ``encoder``: f-AnoGAN's encoder E (izi_f), trained with the exported G and D frozen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from anogan_ray.config import ModelConfig, TrainConfig
from anogan_ray.core.baselines import acae_step, build_acae
from anogan_ray.core.networks import Encoder, build_models, init_weights, sample_latent
from anogan_ray.core.wgan_gp import wgan_gp_step

Modules = dict[str, nn.Module]
Optimizers = dict[str, torch.optim.Optimizer]


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (a single worker is not wrapped)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


@dataclass(frozen=True)
class Recipe:
    """One trained model: its modules, their optimizers and one training step."""

    name: str
    build: Callable[[ModelConfig, int], Modules]  # (model config, seed) -> fresh modules
    learning_rates: Callable[[TrainConfig], dict[str, float]]  # module name -> Adam lr
    step: Callable[[Modules, Optimizers, torch.Tensor, ModelConfig, TrainConfig], torch.Tensor]
    metric_names: tuple[str, ...]  # what ``step``'s returned vector holds, in order
    samples: str | None = None  # module whose G(z) the epoch previews show (None: no previews)
    frozen: tuple[str, ...] = ()  # modules loaded from an earlier run's export, never trained

    def optimizers(self, modules: Modules, train_cfg: TrainConfig) -> Optimizers:
        betas = (train_cfg.beta1, train_cfg.beta2)
        return {
            name: torch.optim.Adam(modules[name].parameters(), lr=lr, betas=betas)
            for name, lr in self.learning_rates(train_cfg).items()
        }


# ---------------------------------------------------------------------------------------------
# The GAN (AnoGAN's DCGAN)
# ---------------------------------------------------------------------------------------------


def gan_step(
    generator: nn.Module,
    discriminator: nn.Module,
    optimizer_g: torch.optim.Optimizer,
    optimizer_d: torch.optim.Optimizer,
    real: torch.Tensor,
    model_cfg: ModelConfig,
) -> torch.Tensor:
    """One adversarial update of D, then of G, on a batch of real patches.

    G and D may be DDP-wrapped; z is drawn from torch's global generator, one per real patch.

    Args:
        real: (B, 1, 64, 64) patches in [-1, 1], on the models' device.

    Returns:
        A detached (4,) tensor: D's loss, G's loss, mean D(x), mean D(G(z)) before D's update.
    """
    batch_size = real.shape[0]
    real_target = torch.ones(batch_size, device=real.device)
    fake_target = torch.zeros(batch_size, device=real.device)

    # (1) Update D network: maximize log(D(x)) + log(1 - D(G(z)))
    optimizer_d.zero_grad(set_to_none=True)
    real_logits = discriminator(real)  # (B,)
    loss_d_real = F.binary_cross_entropy_with_logits(real_logits, real_target)
    loss_d_real.backward()
    z = sample_latent(batch_size, model_cfg, device=real.device)  # (B, latent_dim)
    fake = generator(z)  # (B, 1, 64, 64)
    fake_logits = discriminator(fake.detach())
    loss_d_fake = F.binary_cross_entropy_with_logits(fake_logits, fake_target)
    loss_d_fake.backward()
    optimizer_d.step()

    # (2) Update G network: maximize log(D(G(z))), the non-saturating form of
    # minimizing log(1 - D(G(z))) (same fixed point, stronger gradients early on).
    # D runs outside its DDP wrapper with frozen weights: only G's gradients are synced.
    optimizer_g.zero_grad(set_to_none=True)
    plain_discriminator = unwrap(discriminator).requires_grad_(False)
    loss_g = F.binary_cross_entropy_with_logits(plain_discriminator(fake), real_target)
    loss_g.backward()
    plain_discriminator.requires_grad_(True)
    optimizer_g.step()

    with torch.no_grad():
        return torch.stack(
            [
                (loss_d_real + loss_d_fake).detach(),
                loss_g.detach(),
                torch.sigmoid(real_logits).mean(),
                torch.sigmoid(fake_logits).mean(),
            ]
        )


def _build_gan(model_cfg: ModelConfig, seed: int) -> Modules:
    generator, discriminator = build_models(model_cfg, seed=seed)
    return {"generator": generator, "discriminator": discriminator}


def _gan_recipe_step(
    m: Modules, o: Optimizers, real: torch.Tensor, cfg: ModelConfig, train_cfg: TrainConfig
) -> torch.Tensor:
    models = (m["generator"], m["discriminator"], o["generator"], o["discriminator"], real, cfg)
    if train_cfg.objective == "gan":
        return gan_step(*models)
    return wgan_gp_step(*models, train_cfg, unwrap(m["discriminator"]))


GAN = Recipe(
    name="gan",
    build=_build_gan,
    learning_rates=lambda t: {"generator": t.lr_generator, "discriminator": t.lr_discriminator},
    step=_gan_recipe_step,
    metric_names=("d_loss", "g_loss", "d_real", "d_fake"),
    samples="generator",
)


# ---------------------------------------------------------------------------------------------
# The aCAE baseline
# ---------------------------------------------------------------------------------------------


def _build_acae(model_cfg: ModelConfig, seed: int) -> Modules:
    autoencoder, latent_discriminator = build_acae(model_cfg, seed=seed)
    return {"autoencoder": autoencoder, "latent_discriminator": latent_discriminator}


ACAE = Recipe(
    name="acae",
    build=_build_acae,
    learning_rates=lambda t: {
        "autoencoder": t.lr_generator,
        "latent_discriminator": t.lr_discriminator,
    },
    step=lambda m, o, real, cfg, _: acae_step(
        m["autoencoder"],
        m["latent_discriminator"],
        o["autoencoder"],
        o["latent_discriminator"],
        real,
        cfg,
        unwrap(m["latent_discriminator"]),
    ),
    metric_names=("reconstruction_l1", "latent_d_loss", "latent_g_loss"),
)

# ---------------------------------------------------------------------------------------------
# The encoder (f-AnoGAN's izi_f), with G and D frozen
# ---------------------------------------------------------------------------------------------

IZIF_KAPPA = 1.0  # κ: weight of the feature residual in the izi_f loss (f-AnoGAN's default)


def encoder_step(
    encoder: nn.Module,
    optimizer: torch.optim.Optimizer,
    real: torch.Tensor,
    generator: nn.Module,
    discriminator: nn.Module,
) -> torch.Tensor:
    """One izi_f update of E: MSE(x, G(E(x))) + κ·MSE(f(x), f(G(E(x)))), G and D frozen (eval).

    Returns:
        A detached (2,) tensor: the image and the feature mean squared errors.
    """
    optimizer.zero_grad(set_to_none=True)
    reconstruction = generator(encoder(real))  # (B, 1, 64, 64)
    with torch.no_grad():
        features_real = discriminator.features(real)  # (B, 8c, 4, 4)
    loss_image = F.mse_loss(reconstruction, real)
    loss_features = F.mse_loss(discriminator.features(reconstruction), features_real)
    (loss_image + IZIF_KAPPA * loss_features).backward()
    optimizer.step()
    return torch.stack([loss_image, loss_features]).detach()


def _build_encoder(model_cfg: ModelConfig, seed: int) -> Modules:
    torch.manual_seed(seed)
    encoder = Encoder(model_cfg)
    encoder.apply(init_weights)
    generator, discriminator = build_models(model_cfg, seed=seed)  # weights come from the export
    return {"encoder": encoder, "generator": generator, "discriminator": discriminator}


ENCODER = Recipe(
    name="encoder",
    build=_build_encoder,
    learning_rates=lambda t: {"encoder": t.lr_generator},
    step=lambda m, o, real, cfg, _: encoder_step(
        m["encoder"], o["encoder"], real, m["generator"], m["discriminator"]
    ),
    metric_names=("image_mse", "feature_mse"),
    frozen=("generator", "discriminator"),
)

RECIPES = {recipe.name: recipe for recipe in (GAN, ACAE, ENCODER)}


# ---------------------------------------------------------------------------------------------
# Generative quality: how far G's samples are from real patches, independent of D
# ---------------------------------------------------------------------------------------------


def patch_features(pixels: torch.Tensor | np.ndarray) -> np.ndarray:
    """Fixed features of patches (N, 64, 64) or (N, 1, 64, 64) in [-1, 1]: 4 x 4 average pools.

    (N, 256). Pooling keeps structure (layers, edges, blobs) and averages speckle away, so the
    distance below measures what G has to learn, not the noise it cannot copy.
    """
    x = torch.as_tensor(np.asarray(pixels, np.float32)).reshape(-1, 1, 64, 64)
    return F.avg_pool2d(x, 4).flatten(1).numpy()


def sliced_wasserstein(
    real: np.ndarray, generated: np.ndarray, projections: int = 256, seed: int = 0
) -> float:
    """Sliced Wasserstein-1 distance between two feature sets (N, F) and (M, F).

    The mean over ``projections`` fixed random unit directions of the 1-D Wasserstein distance
    between the projected sets (quantiles at N points when the sizes differ). 0 for identical
    distributions; compare with the distance between two disjoint real samples (the noise floor).
    """
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((real.shape[1], projections)).astype(np.float32)
    directions /= np.linalg.norm(directions, axis=0, keepdims=True)
    a = np.sort(real @ directions, axis=0)  # (N, projections)
    b = np.sort(generated @ directions, axis=0)
    if len(a) != len(b):
        q = (np.arange(len(a)) + 0.5) / len(a)
        b = np.quantile(b, q, axis=0)
    return float(np.abs(a - b).mean())


def freeze(recipe: Recipe, modules: Modules, frozen: dict[str, nn.Module | dict]) -> None:
    """Load the recipe's frozen modules (modules or state dicts), in eval mode, without gradients."""
    for name in recipe.frozen:
        source = frozen[name]
        state = source.state_dict() if isinstance(source, nn.Module) else source
        modules[name].load_state_dict(state)
        modules[name].eval().requires_grad_(False)


def training_precision(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The arithmetic of a training step: ``bf16`` is bfloat16 autocast around the whole step
    (no loss scaling: bf16 has fp32's range), ``fp32`` true fp32 (TF32 off on CUDA)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
