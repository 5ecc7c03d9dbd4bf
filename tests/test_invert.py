"""The inversion core: per-patch independence, determinism, frozen models, anomaly separation."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from anogan_ray.core import fastpath
from anogan_ray.core.fastpath import EXACT, PRECISION_RTOL, ROUNDING_RTOL, FastPath
from anogan_ray.core.invert import (
    SCORE_COLUMNS,
    check_fast_path,
    discrimination_loss,
    initial_latent,
    invert_batch,
    invert_modes,
    mapping_rows,
    reference_discrimination_loss,
    residual_loss,
    rows_for_memory,
    score_patches,
)
from anogan_ray.core.model import load_bundle

# A patch's scores do not depend on the batch it is scored in, to the bit: the mapping always
# runs in fixed-shape batches of mapping_rows() rows (anogan_ray/invert.py). Checked on an
# AVX-512 EPYC under ATEN_CPU_CAPABILITY=default, avx2 and avx512 and with 1, 2 and 3 threads:
# bit-identical within each setting (before, alone vs in a batch of 32 differed by up to 1e-6
# here and 2.9e-4 on a Xeon with AMX, against a tolerance of 1e-4).

# Patch-level AUC floor of A(x) for the in-test tiny model on synthetic fluid pockets / foci:
# measured 0.83-0.85 (40 steps, z_lr 0.05-0.1); chance is 0.5, mean intensity alone gives 0.48.
AUC_FLOOR = 0.7


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return load_bundle(tiny_bundle)


@pytest.fixture(scope="module")
def batch(synthetic_patches):
    images = np.concatenate(
        [synthetic_patches(16, seed=1), synthetic_patches(16, seed=2, anomalous=True)]
    )
    return torch.from_numpy(images)[:, None], [f"vol/b0000/y0000x{i:04d}" for i in range(32)]


# Largest relative difference between the scores of the feature and GAN_R mappings run as one
# mapping of 2R rows and run separately in R rows: the kernels see other shapes. Measured 0 (to
# the bit) on an AVX-512 EPYC for the tiny, demo and paper models; 1 vs 32 rows differed by up to
# 2.9e-4 on a Xeon with AMX, hence the margin.
MODES_TOGETHER_RTOL = 1e-3


def test_a_patch_scores_bit_identically_in_any_batch_position_and_company(bundle, batch):
    pixels, ids = batch
    settings = dict(lambda_=0.1, steps=20, z_lr=0.05, reference_score=True)
    together = score_patches(bundle, pixels, ids, **settings)
    assert np.isfinite(together["ref_anomaly_score"]).all()  # GAN_R mapped with the feature one
    # alone, and in batches of other sizes (each padded to the mapping's fixed shape)
    bounds = [0, 1, 6, 13, 31, 32]
    parts = [score_patches(bundle, pixels[a:b], ids[a:b], **settings) for a, b in pairwise(bounds)]
    # shuffled, and longer than one fixed-shape batch: the first 8 patches again, in the second
    order = torch.randperm(32, generator=torch.Generator().manual_seed(0)).tolist() + list(range(8))
    shuffled = score_patches(bundle, pixels[order], [ids[i] for i in order], **settings)
    for name in SCORE_COLUMNS:
        np.testing.assert_array_equal(
            np.concatenate([part[name] for part in parts]), together[name], err_msg=name
        )
        np.testing.assert_array_equal(shuffled[name], together[name][order], err_msg=name)


def test_feature_and_reference_mappings_together_score_as_apart(bundle, batch):
    """GAN_R's mapping batched with the feature mapping (one mapping of 2R rows) gives the scores
    of the two mappings run one after the other."""
    pixels, ids = batch
    common = dict(lambda_=0.1, steps=20, z_lr=0.05, return_z=True)
    together = invert_modes(bundle, pixels, ids, modes=("feature", "reference"), **common)
    for mode in ("feature", "reference"):
        apart = invert_batch(bundle, pixels, ids, mode=mode, **common)
        for name in ("anomaly_score", "residual_score", "discrimination_score", "z"):
            np.testing.assert_allclose(
                getattr(together[mode], name), getattr(apart, name),
                rtol=MODES_TOGETHER_RTOL, atol=1e-6, err_msg=f"{mode} {name}",
            )  # fmt: skip
    assert not np.allclose(together["feature"].z, together["reference"].z)  # two trajectories
    with pytest.raises(ValueError, match="each once"):
        invert_modes(bundle, pixels, ids, modes=("feature", "feature"), **common)


def test_same_patch_id_same_start_and_same_scores(bundle, batch):
    pixels, ids = batch
    z_a = initial_latent(ids[:4], bundle.generator, "normal", torch.device("cpu"))
    z_b = initial_latent(ids[:4], bundle.generator, "normal", torch.device("cpu"))
    assert torch.equal(z_a, z_b)
    assert not torch.equal(z_a[0], z_a[1])  # different patches start from different z
    first = invert_batch(bundle, pixels[:4], ids[:4], steps=5, z_lr=0.05, return_z=True)
    second = invert_batch(bundle, pixels[:4], ids[:4], steps=5, z_lr=0.05, return_z=True)
    np.testing.assert_array_equal(first.anomaly_score, second.anomaly_score)
    np.testing.assert_array_equal(first.z, second.z)


def test_models_stay_frozen_and_untouched(bundle, batch):
    pixels, ids = batch
    before = {k: v.clone() for k, v in bundle.generator.state_dict().items()}
    invert_batch(bundle, pixels[:4], ids[:4], steps=3)
    for name, value in bundle.generator.state_dict().items():
        assert torch.equal(value, before[name]), name  # BatchNorm running stats too
    for module in (bundle.generator, bundle.discriminator):
        assert not module.training
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())


def test_scores_are_the_papers_sums_at_the_final_z(bundle, batch):
    pixels, ids = batch
    result = invert_batch(
        bundle, pixels[:4], ids[:4], lambda_=0.1, steps=5, z_lr=0.05,
        return_z=True, return_residual_map=True,
    )  # fmt: skip
    with torch.no_grad():
        x_hat = bundle.generator(torch.from_numpy(result.z))
        residual = residual_loss(pixels[:4], x_hat).numpy()
        disc = discrimination_loss(
            bundle.discriminator.features(pixels[:4]), bundle.discriminator.features(x_hat)
        ).numpy()
    np.testing.assert_allclose(result.residual_score, residual, rtol=1e-5)
    np.testing.assert_allclose(result.discrimination_score, disc, rtol=1e-5)
    np.testing.assert_allclose(result.anomaly_score, 0.9 * residual + 0.1 * disc, rtol=1e-5)
    residual_map = result.residual_map  # (4, 64, 64)
    assert residual_map.shape == (4, 64, 64)
    np.testing.assert_allclose(residual_map.sum((1, 2)), residual, rtol=1e-5)
    for i in range(4):
        peak = residual_map[i, result.residual_max_y[i], result.residual_max_x[i]]
        assert peak == residual_map[i].max() == result.residual_max[i]


def test_loss_functions():
    x = torch.rand(3, 1, 64, 64)
    assert torch.equal(residual_loss(x, x), torch.zeros(3))
    assert residual_loss(x, x + 0.5).tolist() == pytest.approx([0.5 * 4096] * 3)
    f = torch.rand(3, 8, 4, 4)
    assert discrimination_loss(f, f + 1).tolist() == pytest.approx([128.0] * 3)
    logits = torch.tensor([-3.0, 0.0, 4.0])
    expected = F.binary_cross_entropy_with_logits(logits, torch.ones(3), reduction="none")
    torch.testing.assert_close(reference_discrimination_loss(logits), expected)


def test_anomalous_patches_score_higher(bundle, synthetic_patches):
    healthy = synthetic_patches(40, seed=100)
    anomalous = synthetic_patches(40, seed=101, anomalous=True)
    pixels = torch.from_numpy(np.concatenate([healthy, anomalous]))[:, None]
    labels = np.r_[np.zeros(40), np.ones(40)]
    ids = [f"auc/{i}" for i in range(80)]
    scores = score_patches(bundle, pixels, ids, lambda_=0.1, steps=40, z_lr=0.1)
    auc = roc_auc_score(labels, scores["anomaly_score"])
    assert auc >= AUC_FLOOR, f"AUC of A(x) {auc:.3f} below the floor {AUC_FLOOR}"


def test_bf16_mapping_agrees_with_fp32_and_fp32_stays_exact(bundle, batch):
    """The bf16 fast path (bf16 step copies of G and D, z and Adam in fp32) ranks and scores the
    patches as fp32 does, within the tolerance its check enforces; asking for fp32 explicitly
    changes nothing."""
    pixels, ids = batch
    common = dict(steps=20, z_lr=0.05)
    exact = invert_batch(bundle, pixels, ids, **common).anomaly_score
    assert np.array_equal(
        exact, invert_batch(bundle, pixels, ids, path=EXACT, **common).anomaly_score
    )
    bf16 = FastPath("bf16")
    fast = invert_batch(bundle, pixels, ids, path=bf16, **common).anomaly_score
    relative = np.abs(fast - exact) / np.abs(exact)
    assert relative.max() < PRECISION_RTOL["bf16"]
    labels = np.r_[np.zeros(16), np.ones(16)]
    assert abs(roc_auc_score(labels, fast) - roc_auc_score(labels, exact)) < 0.02
    ok, worst = check_fast_path(
        bundle, pixels[:8], ids[:8], fast[:8], path=bf16, lambda_=0.1, **common
    )
    assert ok and worst < PRECISION_RTOL["bf16"]
    with pytest.raises(ValueError, match="precision 'fp16'"):
        FastPath("fp16")


def test_compiled_mapping_agrees_with_eager_and_stays_batch_invariant(bundle, batch):
    """torch.compile'd mapping steps score within ROUNDING_RTOL of eager ones (measured up to
    2.6e-7 relative here), and a patch still scores to the bit alike in any batch."""
    pixels, ids = batch
    common = dict(lambda_=0.1, steps=20, z_lr=0.05)
    compiled_path = FastPath(compile=True)
    eager = score_patches(bundle, pixels, ids, **common)
    compiled = score_patches(bundle, pixels, ids, path=compiled_path, **common)
    for name in ("anomaly_score", "residual_score", "discrimination_score"):
        np.testing.assert_allclose(compiled[name], eager[name], rtol=ROUNDING_RTOL, err_msg=name)
    alone = score_patches(bundle, pixels[5:6], ids[5:6], path=compiled_path, **common)
    assert alone["anomaly_score"][0] == compiled["anomaly_score"][5]
    ok, worst = check_fast_path(
        bundle, pixels[:8], ids[:8], compiled["anomaly_score"][:8], path=compiled_path, **common
    )
    assert ok and worst <= ROUNDING_RTOL


class _FailsInBackward(torch.autograd.Function):
    """What inductor's CUDA-graph trees did on an H200 in fp32: a forward pass that runs and a
    backward pass that raises."""

    @staticmethod
    def forward(ctx, loss):
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        raise AssertionError("expected size 64==64, stride 1024==1 (convolution_backward)")


def _fails_in_backward(function, **options):
    return lambda *args, **kwargs: _FailsInBackward.apply(function(*args, **kwargs))


def _fails_at_compile(function, **options):
    def compiled(*args, **kwargs):
        raise RuntimeError("inductor: no working C++ compiler")

    return compiled


@pytest.mark.parametrize("fake_compile", [_fails_in_backward, _fails_at_compile])
def test_a_failing_compiled_step_maps_eagerly_with_one_warning(
    bundle, batch, monkeypatch, caplog, fake_compile
):
    """A compiled step that fails, in its backward pass or when it compiles, switches the
    process to eager steps with one warning, and the batch is redone: the scores are eager's."""
    pixels, ids = batch
    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(fastpath, "_COMPILED", {})
    monkeypatch.setattr(fastpath, "_EAGER_ONLY", False)
    monkeypatch.setattr(fastpath, "_STEPPERS", type(fastpath._STEPPERS)())
    common = dict(lambda_=0.1, steps=3, z_lr=0.05)
    with caplog.at_level("WARNING", logger=fastpath.__name__):
        first = invert_batch(bundle, pixels[:4], ids[:4], path=FastPath(compile=True), **common)
        again = invert_batch(bundle, pixels[4:8], ids[4:8], path=FastPath(compile=True), **common)
    warnings = [r for r in caplog.records if "mapping eagerly" in r.getMessage()]
    assert len(warnings) == 1
    assert fastpath.effective_path(FastPath(compile=True)) == EXACT
    eager = invert_batch(bundle, pixels[:8], ids[:8], **common)
    np.testing.assert_array_equal(first.anomaly_score, eager.anomaly_score[:4])
    np.testing.assert_array_equal(again.anomaly_score, eager.anomaly_score[4:])


def test_step_copies_fold_batchnorm_into_the_layers_and_compute_alike(bundle):
    """G and D's step copies (BatchNorm folded, frozen) give G's and D's features to rounding."""
    models = (bundle.generator, bundle.discriminator)
    generator, discriminator = fastpath.step_models(*models, EXACT)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in generator.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in discriminator.modules())
    assert not any(p.requires_grad for p in [*generator.parameters(), *discriminator.parameters()])
    z = torch.randn(8, bundle.generator.latent_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(generator(z), bundle.generator(z), rtol=1e-4, atol=1e-5)
        x = bundle.generator(z)
        torch.testing.assert_close(
            discriminator.features(x), bundle.discriminator.features(x), rtol=1e-4, atol=1e-5
        )


def test_fast_path_choice_is_bf16_and_graphs_on_cuda_and_exact_on_cpu():
    """score's auto settings: exact eager fp32 on CPU; bf16, channels_last, CUDA graphs and
    padded channels on CUDA, compiled only when an actor has enough patches to repay compiling,
    and then in channels_last (inductor's compiled backward failed on contiguous fp32 steps)."""
    cpu, why = fastpath.choose_fast_path("cpu", patches_per_actor=10**6)
    assert cpu == EXACT and "fp32" in why
    small, why = fastpath.choose_fast_path("cuda", patches_per_actor=1_000)
    assert small == FastPath("bf16", True, cuda_graph=True, pad_channels=True)
    assert "not compiled" in why
    large, _ = fastpath.choose_fast_path("cuda", patches_per_actor=fastpath.COMPILE_MIN_PATCHES)
    assert large.compile and large.precision == "bf16"
    fp32_compiled, why = fastpath.choose_fast_path("cuda", "fp32", True, True, False)
    assert fp32_compiled.channels_last and "compiled steps need it" in why
    exact_on_cuda = fastpath.choose_fast_path("cuda", "fp32", False, False, False)[0]
    assert exact_on_cuda == FastPath(pad_channels=True) and not exact_on_cuda.needs_check()


def test_rows_on_a_gpu_follow_its_memory_in_powers_of_two():
    """The CUDA mapping's fixed rows: the largest power of two whose activations fit in a quarter
    of the GPU's memory, at least 16 and at most 1024; the CPU's stay 16."""
    gib, mib = 2**30, 2**20
    assert rows_for_memory(80 * gib, 4 * mib) == 1024  # an H100: capped
    assert rows_for_memory(16 * gib, 8 * mib) == 512  # 4 GiB / 8 MiB = 512
    assert rows_for_memory(16 * gib, 9 * mib) == 256  # 455 rows fit: rounded down
    assert rows_for_memory(1 * gib, 64 * mib) == 16  # 4 fit: never fewer than 16
    assert rows_for_memory(24 * gib, 0) == 1024
    assert mapping_rows(torch.device("cpu")) == 16


def test_channels_last_models_score_alike_and_stay_batch_invariant(tiny_bundle, batch):
    """Step copies in channels_last memory format (score.channels_last) give the same scores up
    to rounding (oneDNN picks other kernels), still bit-identical whatever batch a patch is in."""
    pixels, ids = batch
    common = dict(lambda_=0.1, steps=20, z_lr=0.05)
    model = load_bundle(tiny_bundle)
    contiguous = score_patches(model, pixels, ids, **common)
    layout = FastPath(channels_last=True)
    together = score_patches(model, pixels, ids, path=layout, **common)
    alone = score_patches(model, pixels[5:6], ids[5:6], path=layout, **common)
    assert alone["anomaly_score"][0] == together["anomaly_score"][5]
    np.testing.assert_allclose(
        together["anomaly_score"], contiguous["anomaly_score"], rtol=MODES_TOGETHER_RTOL
    )


def test_padded_channels_map_as_the_one_channel_layers(bundle, batch):
    """Padded channels (G's last and D's first layer widened with zero weights, the CUDA
    default) change the kernels, not the values."""
    pixels, ids = batch
    common = dict(lambda_=0.1, steps=10, z_lr=0.05)
    exact = invert_batch(bundle, pixels, ids, **common).anomaly_score
    padded = FastPath(pad_channels=True)
    assert not padded.needs_check()
    scores = invert_batch(bundle, pixels, ids, path=padded, **common).anomaly_score
    np.testing.assert_allclose(scores, exact, rtol=ROUNDING_RTOL)


def test_subpixel_transposed_convolutions_compute_what_the_transposed_ones_do():
    """G's step copy with sub-pixel convolutions (one 3 x 3 convolution of four output phases
    and a pixel shuffle) draws the patches G draws, at the paper's 5 x 5 stride-2 layers."""
    from anogan_ray.config import load_config
    from anogan_ray.core.networks import build_models

    models = build_models(load_config("tiny").model, seed=0)
    generator = models[0].eval()
    subpixel, _ = fastpath.step_models(*models, FastPath(subpixel=True, pad_channels=True))
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in subpixel.modules())
    z = torch.randn(8, generator.latent_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(subpixel(z)[:, :1], generator(z), rtol=1e-4, atol=1e-5)
