"""Fast mapping: f-AnoGAN's encoder E (izi_f) and the three mappings of the scorer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anogan_ray.core.invert import MAPPINGS, score_patches
from anogan_ray.core.model import BundleError, load_bundle

STEPS = 5  # Γ of the tests: the mappings' equalities hold for any Γ


def test_encoder_training_reduces_the_izif_loss_and_leaves_g_and_d_alone(
    encoder_bundles, tiny_bundle
):
    history = encoder_bundles["history"]  # (steps, 2): image MSE, feature MSE
    loss = history[:, 0] + history[:, 1]
    # measured: 1.2 over the first 10 steps, 0.82 over the last 20 (the floor is the speckle a
    # tiny G cannot reproduce)
    assert loss[-20:].mean() < 0.8 * loss[:10].mean(), (loss[:10].mean(), loss[-20:].mean())
    before, after = load_bundle(tiny_bundle), load_bundle(encoder_bundles["with_encoder"])
    for a, b in zip(before.generator.parameters(), after.generator.parameters()):
        assert torch.equal(a, b)


def test_bundles_with_and_without_encoder_have_their_own_ids_and_a_tampered_encoder_is_refused(
    encoder_bundles, tmp_path
):
    plain = load_bundle(encoder_bundles["plain"])
    full = load_bundle(encoder_bundles["with_encoder"])
    assert plain.encoder is None and full.encoder is not None
    assert plain.model_id != full.model_id
    pixels = torch.zeros(2, 1, 64, 64)
    with pytest.raises(ValueError, match="has no encoder"):
        score_patches(plain, pixels, ["a", "b"], steps=1, mapping="encoder")
    import shutil

    shutil.copytree(encoder_bundles["with_encoder"], tmp_path / "bundle")
    data = bytearray((tmp_path / "bundle" / "encoder.pt").read_bytes())
    data[-20] ^= 0xFF
    (tmp_path / "bundle" / "encoder.pt").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="encoder.pt does not match"):
        load_bundle(str(tmp_path / "bundle"))


def test_encoder_mapping_is_the_warm_start_with_no_steps(encoder_bundles, synthetic_patches):
    bundle = load_bundle(encoder_bundles["with_encoder"])
    pixels = torch.from_numpy(synthetic_patches(6, seed=21))[:, None]
    ids = [f"p{i}" for i in range(6)]
    encoder = score_patches(bundle, pixels, ids, steps=STEPS, mapping="encoder")
    warm_zero = score_patches(bundle, pixels, ids, steps=0, mapping="encoder+iterative")
    for name in ("anomaly_score", "residual_score", "discrimination_score"):
        np.testing.assert_array_equal(encoder[name], warm_zero[name])
    warm = score_patches(bundle, pixels, ids, steps=STEPS, z_lr=0.05, mapping="encoder+iterative")
    # a few steps of the same mapping from E(x) lower the mapping loss A of every patch
    assert (warm["anomaly_score"] < encoder["anomaly_score"]).all()


@pytest.mark.parametrize("mapping", MAPPINGS)
def test_every_mapping_scores_a_patch_identically_in_a_batch_and_alone(
    mapping, encoder_bundles, synthetic_patches
):
    bundle = load_bundle(encoder_bundles["with_encoder"])
    pixels = torch.from_numpy(synthetic_patches(8, seed=22))[:, None]
    ids = [f"q{i}" for i in range(8)]
    batch = score_patches(bundle, pixels, ids, steps=STEPS, z_lr=0.05, mapping=mapping)
    for i in (0, 5):
        alone = score_patches(
            bundle, pixels[i : i + 1], ids[i : i + 1], steps=STEPS, z_lr=0.05, mapping=mapping
        )
        for name in ("anomaly_score", "residual_score", "discrimination_score"):
            np.testing.assert_array_equal(alone[name], batch[name][i : i + 1])
