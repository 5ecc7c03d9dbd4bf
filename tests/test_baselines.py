"""The paper's baselines: aCAE and pixel PCA, in the bundle and in the score columns."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from anogan_ray.core.baselines import PCABaseline, acae_score
from anogan_ray.core.invert import score_patches
from anogan_ray.core.model import BundleError, load_bundle, save_bundle
from anogan_ray.core.networks import build_models
from anogan_ray.core.recipes import ACAE


@pytest.fixture(scope="module")
def healthy_and_anomalous(synthetic_patches):
    healthy = synthetic_patches(64, seed=11)
    anomalous = synthetic_patches(64, seed=12, anomalous=True)
    return healthy, anomalous


@pytest.fixture(scope="module")
def trained_acae(tiny_config, synthetic_patches, train_recipe):
    train = torch.from_numpy(synthetic_patches(512, seed=10))[:, None]
    train_cfg = dataclasses.replace(tiny_config.train, batch_size=32, lr_generator=1e-3, seed=0)
    modules, history = train_recipe(ACAE, train, tiny_config.model, train_cfg, steps=200)
    return modules["autoencoder"].eval(), torch.stack(history)


def _auc(healthy_scores, anomalous_scores) -> float:
    labels = np.r_[np.zeros(len(healthy_scores)), np.ones(len(anomalous_scores))]
    return roc_auc_score(labels, np.r_[healthy_scores, anomalous_scores])


def test_pca_scores_anomalies_higher_and_survives_its_file(
    synthetic_patches, healthy_and_anomalous
):
    pca = PCABaseline.fit(synthetic_patches(512, seed=10), num_components=8)
    healthy, anomalous = healthy_and_anomalous
    assert _auc(pca.score(healthy), pca.score(anomalous)) > 0.9
    again = PCABaseline.from_bytes(pca.to_bytes())
    np.testing.assert_array_equal(again.score(anomalous), pca.score(anomalous))


def test_acae_learns_to_reconstruct_and_scores_anomalies_higher(
    trained_acae, healthy_and_anomalous
):
    autoencoder, history = trained_acae
    reconstruction = history[:, 0]  # mean L1 per step
    assert reconstruction[-20:].mean() < 0.6 * reconstruction[:20].mean()
    healthy, anomalous = healthy_and_anomalous
    as_tensor = lambda a: torch.from_numpy(a)[:, None]  # noqa: E731
    scores_h = acae_score(autoencoder, as_tensor(healthy))
    scores_a = acae_score(autoencoder, as_tensor(anomalous))
    assert _auc(scores_h, scores_a) > 0.75


def test_bundle_with_baselines_scores_them_and_has_its_own_id(
    tmp_path, tiny_config, trained_acae, synthetic_patches, healthy_and_anomalous
):
    generator, discriminator = build_models(tiny_config.model, seed=0)
    generator.eval()
    discriminator.eval()
    pca = PCABaseline.fit(synthetic_patches(256, seed=10), num_components=4)
    plain = save_bundle(str(tmp_path / "plain"), generator, discriminator, tiny_config.model)
    with_baselines = save_bundle(
        str(tmp_path / "full"),
        generator,
        discriminator,
        tiny_config.model,
        baselines={"acae": trained_acae[0], "pca": pca},
    )
    assert plain != with_baselines
    bundle = load_bundle(str(tmp_path / "full"))
    assert bundle.model_id == with_baselines and set(bundle.baselines) == {"acae", "pca"}
    healthy, _ = healthy_and_anomalous
    pixels = torch.from_numpy(healthy[:4])[:, None]
    ids = [f"p{i}" for i in range(4)]
    columns = score_patches(bundle, pixels, ids, steps=2)
    np.testing.assert_allclose(columns["pca_score"], pca.score(healthy[:4]), rtol=1e-5)
    assert np.isfinite(columns["acae_score"]).all()
    plain_columns = score_patches(load_bundle(str(tmp_path / "plain")), pixels, ids, steps=2)
    assert (
        np.isnan(plain_columns["pca_score"]).all() and np.isnan(plain_columns["acae_score"]).all()
    )
    np.testing.assert_array_equal(plain_columns["anomaly_score"], columns["anomaly_score"])


def test_tampered_baseline_member_is_refused(tmp_path, tiny_config, synthetic_patches):
    generator, discriminator = build_models(tiny_config.model, seed=0)
    pca = PCABaseline.fit(synthetic_patches(64, seed=10), num_components=2)
    url = str(tmp_path / "bundle")
    save_bundle(url, generator, discriminator, tiny_config.model, baselines={"pca": pca})
    data = bytearray((tmp_path / "bundle" / "pca.npz").read_bytes())
    data[-10] ^= 0xFF
    (tmp_path / "bundle" / "pca.npz").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="pca.npz does not match"):
        load_bundle(url)
    # dropping a member from the index changes the id, which no longer matches
    index = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    del index["sha256"]["pca.npz"]
    (tmp_path / "bundle" / "bundle.json").write_text(json.dumps(index))
    with pytest.raises(BundleError, match="model_id does not match"):
        load_bundle(url)
