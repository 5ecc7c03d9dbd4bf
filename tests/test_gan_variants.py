"""The GAN variants behind options: D's normalization (model.d_norm) and WGAN-GP (train.objective).

The defaults are the paper's DCGAN; each variant must build, train a step, survive the bundle
round trip, and leave the encoder and the aCAE baseline as they are.
"""

from __future__ import annotations

import pytest
import torch

from anogan_ray.config import ConfigError, load_config
from anogan_ray.core.baselines import build_acae
from anogan_ray.core.model import load_bundle, save_bundle
from anogan_ray.core.networks import Encoder, build_models
from anogan_ray.core.recipes import GAN


def _config(*overrides: str):
    return load_config("tiny", list(overrides))


def test_wgan_gp_refuses_batchnorm_in_d():
    with pytest.raises(ConfigError, match="model.d_norm"):
        _config("train.objective=wgan-gp")
    assert _config("train.objective=wgan-gp", "model.d_norm=layer").train.objective == "wgan-gp"


@pytest.mark.parametrize("d_norm", ["spectral", "layer"])
def test_d_variants_round_trip_through_the_bundle(tmp_path, d_norm):
    cfg = _config(f"model.d_norm={d_norm}")
    generator, discriminator = build_models(cfg.model, seed=0)
    names = [type(m).__name__ for m in discriminator.modules()]
    assert "BatchNorm2d" not in names
    x = torch.rand(4, 1, 64, 64) * 2 - 1
    discriminator.eval()
    save_bundle(str(tmp_path), generator.eval(), discriminator, cfg.model)
    bundle = load_bundle(str(tmp_path))
    assert bundle.model_config.d_norm == d_norm
    assert torch.equal(bundle.discriminator(x), discriminator(x))
    assert torch.equal(bundle.discriminator.features(x), discriminator.features(x))


def test_spectral_norm_bounds_each_layer():
    cfg = _config("model.d_norm=spectral")
    _, discriminator = build_models(cfg.model, seed=0)
    for module in discriminator.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            matrix = module.weight.detach().flatten(1)  # the normalized weight
            assert torch.linalg.matrix_norm(matrix, ord=2) == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("d_norm", ["spectral", "layer"])
def test_encoder_and_acae_do_not_depend_on_d_norm(d_norm):
    base, variant = _config(), _config(f"model.d_norm={d_norm}")
    for build in (lambda cfg: Encoder(cfg.model), lambda cfg: build_acae(cfg.model, seed=0)[0]):
        torch.manual_seed(0)
        a = build(base).state_dict()
        torch.manual_seed(0)
        b = build(variant).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_wgan_gp_updates_g_every_n_critic_steps():
    cfg = _config(
        "model.d_norm=layer",
        "train.objective=wgan-gp",
        "train.n_critic=3",
        "train.beta1=0",
        "train.beta2=0.9",
    )
    modules = GAN.build(cfg.model, cfg.train.seed)
    optimizers = GAN.optimizers(modules, cfg.train)
    assert optimizers["generator"].defaults["betas"] == (0.0, 0.9)
    torch.manual_seed(0)
    real = torch.rand(8, 1, 64, 64) * 2 - 1
    g_updated = []
    for _ in range(7):
        before = [p.clone() for p in modules["generator"].parameters()]
        metrics = GAN.step(modules, optimizers, real, cfg.model, cfg.train)
        after = list(modules["generator"].parameters())
        g_updated.append(any(not torch.equal(a, b) for a, b in zip(after, before)))
        assert torch.isfinite(metrics).all() and metrics.shape == (4,)
    assert g_updated == [False, False, True, False, False, True, False]


@pytest.mark.parametrize("objective", ["gan", "wgan-gp"])
def test_bf16_training_steps_learn_and_keep_fp32_weights(synthetic_patches, objective):
    """train.precision=bf16: steps under bfloat16 autocast move D towards telling real from
    generated patches as fp32 steps do, with fp32 weights and optimizer states."""
    from anogan_ray.core.recipes import training_precision

    extra = ["model.d_norm=layer"] if objective == "wgan-gp" else []
    cfg = _config(f"train.objective={objective}", "train.precision=bf16", *extra)
    real = torch.from_numpy(synthetic_patches(256, seed=4)).float()[:, None]
    torch.manual_seed(0)
    modules = GAN.build(cfg.model, 0)
    optimizers = GAN.optimizers(modules, cfg.train)
    before = {k: v.clone() for k, v in modules["generator"].state_dict().items()}
    steps = []
    # gan: enough steps for D to learn; wgan-gp: two G updates (one every n_critic = 5 steps)
    for i in range(30 if objective == "gan" else 2 * cfg.train.n_critic):
        with training_precision(torch.device("cpu"), cfg.train.precision):
            batch = real[(i * 32) % 256 : (i * 32) % 256 + 32]
            steps.append(GAN.step(modules, optimizers, batch, cfg.model, cfg.train))
    metrics = torch.stack(steps)
    assert torch.isfinite(metrics).all()
    for module in modules.values():
        assert all(p.dtype == torch.float32 for p in module.parameters())
    for optimizer in optimizers.values():
        moments = [s["exp_avg"] for s in optimizer.state.values()]
        assert moments and all(m.dtype == torch.float32 for m in moments)
    after = modules["generator"].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    if objective == "gan":  # D tells real (d_real, column 2) from generated (d_fake, column 3)
        assert metrics[-5:, 2].mean() > metrics[-5:, 3].mean() + 0.1
