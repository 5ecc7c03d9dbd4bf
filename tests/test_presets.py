"""Every preset runs the whole flow (issue 16): `tiny` through the command line, phantom to
evaluate, in one test; `demo` and `paper` dry (their configs, models and training plan built from
the preset's own phantom, nothing trained)."""

from __future__ import annotations

import json

import pytest
import torch

from anogan_ray.cli import build_parser, main
from anogan_ray.config import PRESETS, load_config
from anogan_ray.core.networks import sample_latent
from anogan_ray.core.recipes import ACAE, ENCODER, GAN
from anogan_ray.data.phantom import assign_splits
from anogan_ray.pipelines.train import TrainingPatches, plan_steps


def _train_patches_of_the_phantom(cfg) -> int:
    """Training patches that `preprocess` cuts from the preset's phantom."""
    train_subjects = sum(split == "train" for _, _, split in assign_splits(cfg.phantom))
    volumes = train_subjects * cfg.phantom.volumes_per_subject
    return volumes * cfg.phantom.bscans_per_volume * cfg.preprocess.patches_per_bscan


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_builds_its_stages_and_its_phantom_feeds_training(preset):
    cfg = load_config(preset)
    # train: at least one full batch on every worker from the phantom the preset writes
    planned = TrainingPatches(None, _train_patches_of_the_phantom(cfg), "", f"{preset} phantom")
    steps_per_epoch, total = plan_steps(planned, cfg)
    assert steps_per_epoch >= 1 and total >= cfg.train.epochs
    # the models every recipe trains, and what they make of a batch of patches
    recipes = [GAN] + [ACAE] * cfg.train.baselines + [ENCODER] * cfg.train.encoder
    built = {recipe.name: recipe.build(cfg.model, cfg.train.seed) for recipe in recipes}
    for recipe in recipes:
        assert set(recipe.learning_rates(cfg.train)) <= set(built[recipe.name])
    generator, discriminator = built[GAN.name]["generator"], built[GAN.name]["discriminator"]
    patches = torch.zeros(2, 1, 64, 64)
    with torch.no_grad():
        fake = generator.eval()(sample_latent(2, cfg.model))
        assert fake.shape == patches.shape
        assert discriminator.eval()(patches).shape[0] == 2
    # scoring with E(x) needs a bundle trained with E
    assert "encoder" not in cfg.score.mapping or cfg.train.encoder
    # every stage's command line accepts the preset
    parser = build_parser()
    for argv in (
        ["phantom", "--out", "c"],
        ["preprocess", "--manifest", "c/manifest.csv", "--out", "p"],
        ["train", "--patches", "p/patches", "--out", "m"],
        ["score", "--patches", "p/patches", "--model", "m", "--out", "s"],
        ["tune", "--patches", "p/patches", "--out", "t"],
    ):
        args = parser.parse_args([*argv, "--config", preset])
        assert load_config(args.config, args.overrides) == cfg


def test_tiny_preset_runs_phantom_to_evaluate_through_the_command_line(ray_local, tmp_path, capsys):
    out = tmp_path
    stages = [
        ["phantom", "--out", f"{out}/cohort", "--config", "tiny"],
        ["preprocess", "--manifest", f"{out}/cohort/manifest.csv", "--out", f"{out}/preprocess",
         "--config", "tiny"],
        ["train", "--patches", f"{out}/preprocess/patches", "--out", f"{out}/model",
         "--config", "tiny"],
        ["score", "--patches", f"{out}/preprocess/patches", "--model", f"{out}/model",
         "--out", f"{out}/score", "--config", "tiny"],
        ["evaluate", "--scores", f"{out}/score/scores"],
    ]  # fmt: skip
    summaries = {}
    for argv in stages:
        assert main(["--log-level", "WARNING", *argv]) == 0, capsys.readouterr().err[-3000:]
        summaries[argv[0]] = json.loads(capsys.readouterr().out)
    assert summaries["train"]["train_patches"] >= load_config("tiny").train.batch_size
    scored = summaries["score"]["patches_scored"]
    assert scored == sum(summaries["preprocess"]["patches_per_split"][s] for s in ("val", "test"))
    assert 0.0 <= summaries["evaluate"]["scores"]["A"]["auc"] <= 1.0
