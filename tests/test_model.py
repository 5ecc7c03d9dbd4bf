"""The DCGAN and its model bundle: shapes, round trip, tampering, final BatchNorm statistics."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from anogan_ray.config import ModelConfig
from anogan_ray.core.export import batchnorm_check
from anogan_ray.core.model import BundleError, load_bundle, save_bundle
from anogan_ray.core.networks import build_models, finalize_batchnorm, sample_latent

TINY = ModelConfig(latent_dim=16, base_channels=8)


def test_generator_and_discriminator_shapes():
    generator, discriminator = build_models(TINY, seed=0)
    z = sample_latent(5, TINY, torch.Generator().manual_seed(0))
    patches = generator(z)
    assert patches.shape == (5, 1, 64, 64)
    assert patches.min() >= -1 and patches.max() <= 1  # tanh output, like the decoded pixels
    assert discriminator(patches).shape == (5,)
    assert discriminator.features(patches).shape == (5, 8 * TINY.base_channels, 4, 4)


def test_same_seed_same_weights():
    first, _ = build_models(TINY, seed=3)
    second, _ = build_models(TINY, seed=3)
    other, _ = build_models(TINY, seed=4)
    first_params = torch.cat([p.flatten() for p in first.parameters()])
    assert torch.equal(first_params, torch.cat([p.flatten() for p in second.parameters()]))
    assert not torch.equal(first_params, torch.cat([p.flatten() for p in other.parameters()]))


def _trained_looking_pair(seed: int = 0):
    """A (G, D) pair whose BatchNorm statistics are not the initial ones."""
    generator, discriminator = build_models(TINY, seed=seed)
    finalize_batchnorm(generator, [sample_latent(32, TINY) for _ in range(2)])
    finalize_batchnorm(discriminator, [generator(sample_latent(32, TINY)) for _ in range(2)])
    return generator.eval(), discriminator.eval()


def test_bundle_round_trip_gives_identical_outputs(tmp_path):
    generator, discriminator = _trained_looking_pair()
    url = str(tmp_path / "model")
    model_id = save_bundle(url, generator, discriminator, TINY, {"run_name": "test"})
    bundle = load_bundle(url)
    assert bundle.model_id == model_id
    assert bundle.model_config == TINY
    assert bundle.metadata == {"run_name": "test"}
    assert not bundle.generator.training and not bundle.discriminator.training
    z = sample_latent(4, TINY, torch.Generator().manual_seed(1))
    with torch.no_grad():
        patches = generator(z)
        assert torch.equal(bundle.generator(z), patches)
        assert torch.equal(bundle.discriminator(patches), discriminator(patches))
        assert torch.equal(bundle.discriminator.features(patches), discriminator.features(patches))
    # the same weights and config give the same model_id; other weights another one
    assert (
        save_bundle(str(tmp_path / "again"), generator, discriminator, TINY, {"run_name": "test"})
        == model_id
    )
    other_generator, other_discriminator = _trained_looking_pair(seed=1)
    assert (
        save_bundle(str(tmp_path / "other"), other_generator, other_discriminator, TINY) != model_id
    )


@pytest.mark.parametrize("name", ["generator.pt", "discriminator.pt", "config.json"])
def test_bundle_with_one_byte_changed_is_rejected(tmp_path, name):
    generator, discriminator = _trained_looking_pair()
    url = str(tmp_path / "model")
    save_bundle(url, generator, discriminator, TINY)
    path = Path(url, name)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{name} does not match its recorded sha256"):
        load_bundle(url)


def _rewrite_with_valid_hashes(url: str, name: str, data: bytes) -> None:
    """Replace one bundle file and re-record its hash, as a careless or hostile tool would."""
    Path(url, name).write_bytes(data)
    index = json.loads(Path(url, "bundle.json").read_text())
    index["sha256"][name] = hashlib.sha256(data).hexdigest()
    joined = "".join(
        f"{n}:{index['sha256'][n]};" for n in ("config.json", "generator.pt", "discriminator.pt")
    )
    index["model_id"] = hashlib.sha256(joined.encode()).hexdigest()[:16]
    Path(url, "bundle.json").write_text(json.dumps(index))


class _NotATensor:
    """An arbitrary class: unpickling it would run code from the bundle."""


def test_bundle_never_unpickles_arbitrary_objects(tmp_path):
    generator, discriminator = _trained_looking_pair()
    url = str(tmp_path / "model")
    save_bundle(url, generator, discriminator, TINY)
    buffer = io.BytesIO()
    torch.save({"weight": _NotATensor()}, buffer)
    _rewrite_with_valid_hashes(url, "generator.pt", buffer.getvalue())
    with pytest.raises(BundleError, match="generator.pt holds more than tensors"):
        load_bundle(url)


def test_bundle_with_incompatible_config_is_rejected(tmp_path):
    generator, discriminator = _trained_looking_pair()
    url = str(tmp_path / "model")
    save_bundle(url, generator, discriminator, TINY)
    config = json.loads(Path(url, "config.json").read_text())
    config["model"]["base_channels"] = 16  # weights were trained with 8
    _rewrite_with_valid_hashes(url, "config.json", json.dumps(config).encode())
    with pytest.raises(BundleError, match="does not fit the config"):
        load_bundle(url)
    config["model"]["kernel_size"] = 3  # not an architecture this code builds
    _rewrite_with_valid_hashes(url, "config.json", json.dumps(config).encode())
    with pytest.raises(BundleError, match="incompatible model config.*kernel_size"):
        load_bundle(url)


def test_missing_bundle_names_the_folder(tmp_path):
    with pytest.raises(BundleError, match=str(tmp_path / "nowhere")):
        load_bundle(str(tmp_path / "nowhere"))


def test_final_batchnorm_statistics_make_eval_mode_sample_like_train_mode():
    cfg = replace(TINY)
    generator, _ = build_models(cfg, seed=0)
    with torch.no_grad():  # make the initial running statistics (0 mean, 1 var) stale
        for parameter in generator.parameters():
            parameter.mul_(3.0)
    stale = batchnorm_check(generator, cfg, batch_size=64, seed=1)
    latent_rng = torch.Generator().manual_seed(2)
    seen = finalize_batchnorm(generator, [sample_latent(64, cfg, latent_rng) for _ in range(16)])
    final = batchnorm_check(generator, cfg, batch_size=64, seed=1)
    assert seen == 16 * 64
    assert stale["mean_abs_difference"] > 0.1  # eval mode with stale statistics is another G
    assert final["mean_abs_difference"] < 0.25 * stale["mean_abs_difference"]
    assert abs(final["eval_std"] - final["train_std"]) < 0.1 * final["train_std"] + 1e-3
    assert abs(final["eval_mean"] - final["train_mean"]) < 0.05
