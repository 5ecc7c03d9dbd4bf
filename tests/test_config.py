"""Configuration: presets load, overrides apply, bad keys and values are named."""

from __future__ import annotations

import re

import pytest

from anogan_ray.config import PRESETS, ConfigError, load_config


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load(preset):
    cfg = load_config(preset)
    assert cfg.model.image_size == 64
    assert 0.0 <= cfg.score.lambda_ <= 1.0


def test_paper_preset_is_the_papers_architecture_and_settings():
    cfg = load_config("paper")
    assert cfg.model.base_channels == 64  # D: 64-128-256-512, G: 512-256-128-64
    assert cfg.model.kernel_size == 5
    assert cfg.score.steps == 500
    assert cfg.score.lambda_ == pytest.approx(0.1)

    # the models it builds: G 512-256-128-64, D 64-128-256-512, 5 x 5 filters, 64 x 64 gray
    import torch
    import torch.nn as nn

    from anogan_ray.core.networks import build_models

    generator, discriminator = build_models(cfg.model)
    up = [m for m in generator.modules() if isinstance(m, nn.ConvTranspose2d)]
    down = [m for m in discriminator.modules() if isinstance(m, nn.Conv2d)]
    assert [m.in_channels for m in up] == [512, 256, 128, 64]
    assert [m.out_channels for m in down] == [64, 128, 256, 512]
    assert {m.kernel_size for m in up + down} == {(5, 5)}
    with torch.no_grad():
        fake = generator(torch.zeros(2, cfg.model.latent_dim))
        assert fake.shape == (2, 1, 64, 64)
        assert discriminator(fake).shape == (2,)
    # parameters from the paper's layer sizes: z (100) -> 512 x 4 x 4, four 5 x 5 (transposed)
    # convolutions, BatchNorm scale and shift, D's last linear layer; biases only where no BN
    convs = 512 * 256 + 256 * 128 + 128 * 64  # G's three inner transposed convolutions
    g_params = 100 * 512 * 16 + 25 * (convs + 64 * 1) + 1 + 2 * (512 + 256 + 128 + 64)
    d_params = 25 * (1 * 64 + convs) + 64 + 2 * (128 + 256 + 512) + 512 * 16 + 1
    assert sum(p.numel() for p in generator.parameters()) == g_params
    assert sum(p.numel() for p in discriminator.parameters()) == d_params


def test_overrides_are_parsed_and_applied():
    cfg = load_config("tiny", ["score.steps=7", "score.lambda_=0.25", "score.splits=[test]"])
    assert cfg.score.steps == 7
    assert cfg.score.lambda_ == 0.25
    assert cfg.score.splits == ["test"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("score.setps=3", "score.setps: unknown key; did you mean score.steps?"),
        ("preprocess.epochs=3", "preprocess.epochs: unknown key; did you mean train.epochs?"),
        ("score.qqq=3", "score.qqq: unknown key; allowed keys are "),
        ("scroe.steps=3", "scroe: unknown section; did you mean score?"),
        ("bogus.steps=3", "bogus: unknown section; allowed sections are phantom, preprocess,"),
        ("model.kernel_size=3", "model.kernel_size: 3 is not allowed; choose one of 4, 5"),
        ("score.lambda_=1.5", "score.lambda_: 1.5 must be at most 1.0"),
        ("train.lr_generator=0", "train.lr_generator: 0.0 must be greater than 0"),
        ("score.steps=many", "score.steps: expected an integer"),
        ("score.splits=[train, holdout]", "score.splits: ['holdout'] not allowed"),
        ("steps=3", "expected section.key=value"),
    ],
)
def test_bad_settings_name_the_key_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("tiny", [override])


def test_yaml_file_config(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  latent_dim: 12\nscore:\n  steps: 3\n")
    cfg = load_config(str(path))
    assert (cfg.model.latent_dim, cfg.score.steps) == (12, 3)
    assert cfg.train.lr_generator == pytest.approx(2e-4)  # untouched keys keep their defaults


def test_unknown_preset_or_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="not a preset"):
        load_config(str(tmp_path / "nope.yaml"))
