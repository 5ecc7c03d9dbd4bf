"""f-AnoGAN's GAN objective: WGAN-GP (Gulrajani et al. 2017), one training step (plain PyTorch).

An alternative to the paper's eq. (1) (``train.objective: wgan-gp``). D is a critic: its output
is a score, not a logit, and its loss is

    L_D = E[D(G(z))] − E[D(x)] + w · E[(‖∇_x̂ D(x̂)‖₂ − 1)²],  x̂ = ε·x + (1 − ε)·G(z), ε ~ U(0, 1)

with w = ``train.gradient_penalty`` (10); G minimizes −E[D(G(z))] once every
``train.n_critic`` (5) critic updates. The penalty is per patch, so D must not use BatchNorm
(``model.d_norm: layer`` as f-AnoGAN, or ``spectral``). f-AnoGAN trains it with Adam, learning
rate 1e-4, betas (0, 0.9) (``train.lr_*``, ``train.beta1``, ``train.beta2``).

One call is one critic update on one batch of real patches, so ``train.epochs`` counts the
critic's passes over the data and G is updated on every ``n_critic``-th batch. Whether this call
updates G is read from D's optimizer (its update count), which checkpoints restore, so a resumed
run keeps the same schedule.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from anogan_ray.config import ModelConfig, TrainConfig
from anogan_ray.core.networks import sample_latent


def critic_scores_and_penalty(
    critic: nn.Module, real: torch.Tensor, fake: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """D(x), D(G(z)) and the gradient penalty E[(‖∇_x̂ D(x̂)‖₂ − 1)²] on random interpolates x̂.

    One forward pass over real, generated and interpolated patches together (DDP expects one
    forward per backward); the critic treats each patch alone, so this equals three passes.
    """
    batch_size = real.shape[0]
    epsilon = torch.rand(batch_size, 1, 1, 1, device=real.device)  # (B, 1, 1, 1)
    mixed = (epsilon * real + (1 - epsilon) * fake).requires_grad_(True)  # (B, 1, 64, 64)
    scores = critic(torch.cat([real, fake, mixed]))  # (3B,)
    (gradient,) = torch.autograd.grad(scores[2 * batch_size :].sum(), mixed, create_graph=True)
    penalty = ((gradient.flatten(1).norm(2, dim=1) - 1) ** 2).mean()
    return scores[:batch_size], scores[batch_size : 2 * batch_size], penalty


def _updates_done(optimizer: torch.optim.Optimizer) -> int:
    """How many steps ``optimizer`` (Adam) has taken, from its state (0 before the first)."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            state = optimizer.state.get(parameter)
            if state and "step" in state:
                return int(state["step"])
    return 0


def wgan_gp_step(
    generator: nn.Module,
    critic: nn.Module,
    optimizer_g: torch.optim.Optimizer,
    optimizer_d: torch.optim.Optimizer,
    real: torch.Tensor,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    plain_critic: nn.Module,
) -> torch.Tensor:
    """One critic update, and one G update every ``train_cfg.n_critic`` calls.

    G and D may be DDP-wrapped (``plain_critic`` is D unwrapped); z is drawn from torch's global
    generator.

    Args:
        real: (B, 1, 64, 64) patches in [-1, 1], on the models' device.

    Returns:
        A detached (4,) tensor: the critic's loss (with the penalty), G's loss −E[D(G(z))], mean
        D(x) and mean D(G(z)) before the critic's update (critic values, not probabilities).
    """
    batch_size = real.shape[0]

    # (1) Update the critic: minimize E[D(G(z))] − E[D(x)] + w · gradient penalty
    optimizer_d.zero_grad(set_to_none=True)
    z = sample_latent(batch_size, model_cfg, device=real.device)  # (B, latent_dim)
    with torch.no_grad():
        fake = generator(z)  # (B, 1, 64, 64)
    real_scores, fake_scores, penalty = critic_scores_and_penalty(critic, real, fake)  # (B,) x 2
    loss_d = fake_scores.mean() - real_scores.mean() + train_cfg.gradient_penalty * penalty
    loss_d.backward()
    optimizer_d.step()

    # (2) Update G network every n_critic critic updates: minimize −E[D(G(z))]
    # D runs outside its DDP wrapper with frozen weights: only G's gradients are synced.
    if _updates_done(optimizer_d) % train_cfg.n_critic == 0:
        optimizer_g.zero_grad(set_to_none=True)
        plain_critic.requires_grad_(False)
        loss_g = -plain_critic(generator(sample_latent(batch_size, model_cfg, device=real.device)))
        loss_g = loss_g.mean()
        loss_g.backward()
        plain_critic.requires_grad_(True)
        optimizer_g.step()
    else:
        loss_g = -fake_scores.mean()

    with torch.no_grad():
        return torch.stack(
            [loss_d.detach(), loss_g.detach(), real_scores.mean(), fake_scores.mean()]
        )
