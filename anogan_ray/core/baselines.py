"""The paper's baselines beside AnoGAN (plain PyTorch, numpy and scikit-learn; no Ray).

- **aCAE**, the adversarial convolutional autoencoder of the paper's Table 1: an encoder E (D's
  convolution stack, then a linear layer to the latent size) and a decoder (G's architecture);
  the codes E(x) are pushed towards the latent prior by a small latent discriminator, as in an
  adversarial autoencoder (Makhzani et al.). Trained on the healthy ``train`` patches with the
  same training harness as the GAN; its score is the reconstruction residual Σ |x − Dec(E(x))|.
- **PCA**, pixel-space principal components fitted on the ``train`` patches; its score is the
  reconstruction residual Σ |x − x̂| (the ten-line baseline every method should beat).

Both scores are "higher = more anomalous" and sum over the patch's pixels like R(x).
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from anogan_ray.config import ModelConfig
from anogan_ray.core.networks import Discriminator, Generator, init_weights, sample_latent

ACAE_ADVERSARIAL_WEIGHT = 0.01  # weight of the latent-prior term against the mean L1 residual


class AdversarialAutoencoder(nn.Module):
    """aCAE: patch (B, 1, 64, 64) -> code (B, latent_dim) -> reconstruction (B, 1, 64, 64)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # state size. (8c) x 4 x 4; BatchNorm whatever the GAN's D uses (model.d_norm)
        self.encoder_convs = Discriminator(dataclasses.replace(cfg, d_norm="batch")).convs
        self.encoder_code = nn.Sequential(
            nn.Flatten(), nn.Linear(8 * cfg.base_channels * 4 * 4, cfg.latent_dim)
        )
        self.decoder = Generator(cfg)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder_code(self.encoder_convs(x))  # (B, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction (B, 1, 64, 64), code (B, latent_dim)): one forward for both losses."""
        code = self.encode(x)
        return self.decoder(code), code


class LatentDiscriminator(nn.Module):
    """code (B, latent_dim) -> logit (B,): a prior draw (real) or an encoded patch (fake)."""

    def __init__(self, cfg: ModelConfig, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(cfg.latent_dim, hidden),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(hidden, hidden),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(hidden, 1),
        )

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.net(code).squeeze(1)


def build_acae(
    cfg: ModelConfig, seed: int = 0
) -> tuple[AdversarialAutoencoder, LatentDiscriminator]:
    """A freshly initialized (aCAE, latent discriminator) pair; the same seed, the same weights."""
    torch.manual_seed(seed)
    autoencoder, latent_discriminator = AdversarialAutoencoder(cfg), LatentDiscriminator(cfg)
    autoencoder.apply(init_weights)
    return autoencoder, latent_discriminator


def acae_step(
    autoencoder: nn.Module,
    latent_discriminator: nn.Module,
    optimizer_autoencoder: torch.optim.Optimizer,
    optimizer_latent: torch.optim.Optimizer,
    real: torch.Tensor,
    model_cfg: ModelConfig,
    plain_latent_discriminator: nn.Module,
) -> torch.Tensor:
    """One aCAE update on a batch of real patches (the modules may be DDP-wrapped).

    Returns:
        A detached (3,) tensor: the mean L1 reconstruction error, the latent discriminator's loss
        and the encoder's adversarial loss.
    """
    batch_size = real.shape[0]
    ones = torch.ones(batch_size, device=real.device)

    # (1) Update the autoencoder: reconstruct x, and make E(x) look like a prior draw
    optimizer_autoencoder.zero_grad(set_to_none=True)
    reconstruction, code = autoencoder(real)  # (B, 1, 64, 64), (B, latent_dim)
    loss_reconstruction = (real - reconstruction).abs().mean()
    plain_latent_discriminator.requires_grad_(False)
    loss_adversarial = F.binary_cross_entropy_with_logits(plain_latent_discriminator(code), ones)
    plain_latent_discriminator.requires_grad_(True)
    (loss_reconstruction + ACAE_ADVERSARIAL_WEIGHT * loss_adversarial).backward()
    optimizer_autoencoder.step()

    # (2) Update the latent discriminator: prior draws are real, codes of patches are fake
    optimizer_latent.zero_grad(set_to_none=True)
    prior = sample_latent(batch_size, model_cfg, device=real.device)  # (B, latent_dim)
    logits = latent_discriminator(torch.cat([prior, code.detach()]))  # (2B,)
    targets = torch.cat([ones, torch.zeros_like(ones)])
    loss_latent = F.binary_cross_entropy_with_logits(logits, targets)
    loss_latent.backward()
    optimizer_latent.step()
    return torch.stack([loss_reconstruction, loss_latent, loss_adversarial]).detach()


@torch.no_grad()
def acae_score(autoencoder: AdversarialAutoencoder, pixels: torch.Tensor) -> np.ndarray:
    """aCAE score: Σ |x − Dec(E(x))| per patch; pixels (B, 1, 64, 64) in [-1, 1] -> (B,)."""
    device = next(autoencoder.parameters()).device
    x = pixels.to(device=device, dtype=torch.float32)
    return (x - autoencoder(x)[0]).abs().flatten(1).sum(1).float().cpu().numpy()


class PCABaseline:
    """Pixel-space PCA: ``k`` components of the training patches, residual Σ |x − x̂| as score."""

    def __init__(self, mean: np.ndarray, components: np.ndarray):
        self.mean = np.asarray(mean, np.float32)  # (P,), P = 64 * 64
        self.components = np.asarray(components, np.float32)  # (k, P), orthonormal rows

    @classmethod
    def fit(cls, pixels: np.ndarray, num_components: int, seed: int = 0) -> PCABaseline:
        """Fit on float patches (N, 64, 64) in [-1, 1]."""
        from sklearn.decomposition import PCA

        flat = np.asarray(pixels, np.float32).reshape(len(pixels), -1)
        k = min(num_components, flat.shape[0], flat.shape[1])
        pca = PCA(n_components=k, svd_solver="randomized", random_state=seed).fit(flat)
        return cls(pca.mean_, pca.components_)

    def score(self, pixels: np.ndarray) -> np.ndarray:
        """Σ |x − x̂| per patch for float patches (B, 64, 64) or (B, 1, 64, 64) -> (B,)."""
        flat = np.asarray(pixels, np.float32).reshape(len(pixels), -1) - self.mean
        reconstruction = (flat @ self.components.T) @ self.components
        return np.abs(flat - reconstruction).sum(1)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, mean=self.mean, components=self.components)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> PCABaseline:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:  # arrays only, no objects
            return cls(arrays["mean"], arrays["components"])
