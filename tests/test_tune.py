"""Ray Tune sweeps: complete results, the best trial is the argmax and scores, resume, bad spaces."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time

import numpy as np
import pandas as pd
import pytest
import ray
import torch

from anogan_ray import storage
from anogan_ray.config import ConfigError, load_config
from anogan_ray.core import objectives
from anogan_ray.core.invert import score_patches
from anogan_ray.core.model import load_bundle
from anogan_ray.pipelines.tune import (
    SweepInterrupted,
    TuneError,
    add_synthetic_lesion,
    check_gpus_per_trial,
    evaluate_objective,
    lambda_key,
    leaderboard,
    make_evaluation_set,
    objective_key,
    sweep_mappings,
    trial_scaling,
    tune,
)
from anogan_ray.tables import decode_pixels, encode_pixels, read_patch_table

LAMBDAS = [0.1, 0.3]


def _config(*overrides: str):
    return load_config(
        "tiny",
        [
            "phantom.healthy_subjects=5",
            "phantom.pathological_subjects=2",
            "preprocess.patches_per_bscan=16",
            "train.batchnorm_samples=256",
            f"tune.lambdas={LAMBDAS}",
            "tune.num_samples=2",
            "tune.lr_generator=[0.0001, 0.003]",
            "tune.lr_discriminator=[0.0001, 0.003]",
            "score.steps=15",
            "tune.val_patches=32",
            "tune.synthetic_patches=16",
            "tune.cutpaste_patches=16",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def phantom_patches(ray_local, tmp_path_factory) -> str:
    """A phantom patch table whose `val` split holds a healthy and a pathological subject."""
    from anogan_ray.data.phantom import write_cohort
    from anogan_ray.pipelines.preprocess import preprocess

    cfg = _config()
    root = tmp_path_factory.mktemp("tune_phantom")
    write_cohort(cfg.phantom, str(root / "cohort"))
    manifest = pd.read_csv(root / "cohort" / "manifest.csv")
    pathological = sorted(manifest.loc[manifest["label"] == 1, "subject_id"])[0]
    manifest.loc[manifest["subject_id"] == pathological, "split"] = "val"  # a labelled val split
    manifest.to_csv(root / "cohort" / "manifest.csv", index=False)
    preprocess(str(root / "cohort" / "manifest.csv"), str(root / "patches"), cfg.preprocess)
    return str(root / "patches")


def test_sweep_results_are_complete_and_the_best_trial_is_the_argmax_and_scores(
    phantom_patches, tmp_path, monkeypatch, scored_cohort
):
    cfg = _config("tune.scheduler=asha", "tune.grace_period=1")
    # a relative output folder, as typed on the command line: trials run in folders of their own
    monkeypatch.chdir(tmp_path.parent)
    summary = tune(phantom_patches, tmp_path.name, cfg)

    trials = pd.read_parquet(tmp_path / "trials.parquet")
    history = pd.read_parquet(tmp_path / "history.parquet")
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    assert summary["objective"] == "labels" and summary["val_anomalous"] > 0
    # every trial is in the table with its config, and every λ was scored on its model
    assert len(trials) == cfg.tune.num_samples == trials["trial_id"].nunique()
    assert (trials["status"] == "terminated").all()
    for column in ("lr_generator", "lr_discriminator", "objective", "val_auc", "synthetic_auc"):
        assert trials[column].notna().all(), column
    for lambda_ in LAMBDAS:
        assert trials[lambda_key("val_auc", lambda_)].between(0, 1).all()
        assert trials[lambda_key("synthetic_auc", lambda_)].between(0, 1).all()
    # the objective is the best λ's labelled AUC, and the best trial has the best objective
    per_lambda = trials[[lambda_key("val_auc", lam) for lam in LAMBDAS]]
    np.testing.assert_allclose(trials["objective"], per_lambda.max(axis=1))
    best_row = trials.loc[trials["objective"].idxmax()]
    assert summary["best"]["trial_id"] == best_row["trial_id"]
    assert summary["best"]["objective"] == pytest.approx(best_row["objective"])
    assert summary["best"]["config"]["lambda"] in LAMBDAS
    lr_range = cfg.tune.lr_generator
    assert lr_range[0] <= summary["best"]["config"]["lr_generator"] <= lr_range[1]
    # ASHA may stop a trial after its grace epoch; every trial reported each epoch it trained
    assert trials["epochs"].between(1, cfg.train.epochs).all()
    assert (trials["stopped_early"] == (trials["epochs"] < cfg.train.epochs)).all()
    assert len(history) == trials["epochs"].sum()
    # where val is labelled, the summary says how each label-free objective ranked the trials
    agreement = summary["agreement"]
    assert agreement["best_val_auc"] == pytest.approx(trials["objective_labels"].max())
    for name in ("synthetic", "cutpaste", "residual", "quality", "cohort"):
        result = agreement["objectives"][name]
        assert result["trials"] == len(trials) and result["trial_epochs"] == len(history)
        assert 0 <= result["regret"] <= 1 and result["picked_trial"] in set(trials["trial_id"])
    # each trial is a Ray Train run with its own checkpoints and sample grids, as many at once
    # as the 2 CPUs hold; stopped or finished, no trial leaves workers holding them
    assert summary["max_concurrent_trials"] == 2
    for trial_id in trials["trial_id"]:
        trial = tmp_path / "_trials" / cfg.tune.run_name / trial_id
        assert list((trial / "_runs" / cfg.train.run_name).glob("checkpoint_*/state.pt"))
        assert len(list((trial / "samples").glob("epoch_*.png"))) >= 1
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.5)

    # the best model is a bundle that loads and scores; it is the best trial's last epoch
    bundle = load_bundle(summary["best_model"])
    assert bundle.model_id == summary["model_id"]
    assert bundle.metadata["epochs"] == best_row["epochs"]
    val = read_patch_table(phantom_patches, ["val"]).take(8)
    pixels = torch.from_numpy(decode_pixels(np.stack([row["pixels"] for row in val])))[:, None]
    scores = score_patches(
        bundle, pixels, [row["patch_id"] for row in val], lambda_=0.1, steps=5, z_lr=0.05
    )
    assert np.isfinite(scores["anomaly_score"]).all()

    # beside the best model, its sweep's leaderboard: the labelled AUC and the label-free
    # objectives side by side, and how well they agreed; the report of a model shows both
    sweep = json.loads((tmp_path / "best_model" / "sweep.json").read_text())
    board = pd.DataFrame(sweep["leaderboard"])
    assert list(board["trial_id"]) == list(
        trials.sort_values("objective", ascending=False)["trial_id"]
    )
    assert {"val_auc", "synthetic_auc", "cohort_auc", "sliced_wasserstein"} <= set(board)
    assert sweep["agreement"] == summary["agreement"]
    printed = leaderboard(str(tmp_path))  # what `anogan-ray tune` prints
    assert all(name in printed for name in ("val_auc", "cutpaste_auc", "Spearman", "regret"))
    from anogan_ray.analysis.report import report

    model = tmp_path / "scored_model"  # a scored bundle, as if this sweep had chosen it
    shutil.copytree(scored_cohort["model"], model)
    shutil.copy(tmp_path / "best_model" / "sweep.json", model)
    page = report(scored_cohort["scores"], str(tmp_path / "report"), model=str(model))
    html = (tmp_path / "report" / "index.html").read_text()
    assert page["sweep"]["leaderboard"] == sweep["leaderboard"]
    assert all(trial_id in html for trial_id in trials["trial_id"])
    assert "regret" in html and "cutpaste" in html


class InterruptAt(ray.tune.Callback):
    """Stops the sweep as Ctrl+C does (a real SIGINT to this process) at each of ``points``:
    ``(trials finished, epoch)``, when that many trials have finished and another one reports
    that epoch. Each point fires once; Tune keeps the callback and its state with the
    experiment, so the copy a resumed sweep runs knows which points already fired."""

    def __init__(self, *points: tuple[int, int]):
        self.points = [list(point) for point in points]
        self.fired: list[list[int]] = []
        self.finished: list[str] = []  # a resumed sweep does not report the trials it skips

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finished.append(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        point = [len(self.finished), result["epoch"]]
        if point in self.points and point not in self.fired and trial.trial_id not in self.finished:
            self.fired.append(point)
            os.kill(os.getpid(), signal.SIGINT)

    def get_state(self):
        return {"fired": self.fired, "finished": self.finished}

    def set_state(self, state):
        self.fired, self.finished = state["fired"], state["finished"]


def test_an_interrupted_sweep_resumes_where_it_was_interrupted(phantom_patches, bucket):
    # one trial at a time
    cfg = _config("tune.scheduler=fifo", "tune.max_concurrent=1", "train.epochs=2")
    out = f"{bucket}/sweep"
    experiment = storage.join(out, "_tune", cfg.tune.run_name)

    def last_epochs() -> dict[str, int]:
        results = {
            url: storage.read_bytes(url) for url in storage.list_files(experiment, "result.json")
        }
        return {
            url: json.loads(data.splitlines()[-1])["epoch"] for url, data in results.items() if data
        }

    # Ctrl+C once the first trial finished and the second one is part-way: the resume must skip
    # the one and continue the other
    interrupt = InterruptAt((1, 1))
    with pytest.raises(SweepInterrupted, match="1 of 2 trials finished; run the same command"):
        tune(phantom_patches, out, cfg, callbacks=[interrupt])
    epochs = last_epochs()
    assert sorted(epochs.values()) == [1, 2]
    finished = next(url for url, epoch in epochs.items() if epoch == 2)
    finished_results = storage.read_bytes(finished)

    summary = tune(phantom_patches, out, cfg)
    assert summary["resumed"] and summary["trials"] == 2
    assert summary["max_concurrent_trials"] == 1
    trials = pd.read_parquet(storage.open_file(summary["trials_table"]))
    assert (trials["status"] == "terminated").all() and trials["objective"].notna().all()
    # the finished trial was not run again: its results are byte for byte what they were
    assert storage.read_bytes(finished) == finished_results
    # the part-way trial's Train run went on from its epoch-1 checkpoint, not from the start
    history = pd.read_parquet(storage.open_file(summary["history_table"]))
    assert history.groupby("trial_id")["epoch"].apply(list).tolist() == [[1, 2], [1, 2]]
    assert load_bundle(summary["best_model"]).model_id == summary["model_id"]


@pytest.mark.parametrize(
    "override, key",
    [
        ("tune.lr_generator=[-0.001, 0.001]", "tune.lr_generator"),
        ("tune.lr_discriminator=[0.01, 0.001]", "tune.lr_discriminator"),
        ("tune.lambdas=[0.1, 1.5]", "tune.lambdas"),
        ("tune.z_lr=[0.0]", "tune.z_lr"),
        ("tune.gpus_per_trial=-1", "tune.gpus_per_trial"),
        ("tune.gpus_per_trial=many", "tune.gpus_per_trial"),
    ],
)
def test_an_invalid_search_space_is_rejected_before_any_trial_starts(override, key, tmp_path):
    with pytest.raises(ConfigError, match=key):
        tune(str(tmp_path / "no-patches"), str(tmp_path / "out"), _config(override))
    assert not os.path.exists(tmp_path / "out")  # nothing was read, started or written


def test_gpus_asked_for_on_a_cluster_without_any_are_refused_before_trials_start(
    phantom_patches, encoder_bundles, tmp_path
):
    # the session's local Ray: 2 CPUs, no GPU, no autoscaler (tests/test_tune_cluster.py has one)
    for sweep in (
        lambda: tune(phantom_patches, str(tmp_path / "a"), _config("tune.gpus_per_trial=1")),
        lambda: tune(phantom_patches, str(tmp_path / "b"), _config("train.use_gpu=true")),
        lambda: sweep_mappings(
            phantom_patches,
            encoder_bundles["plain"],
            str(tmp_path / "c"),
            _config("tune.gpus_per_trial=0.5"),
        ),  # fmt: skip
    ):
        with pytest.raises(TuneError, match="no GPU and its autoscaler cannot add one"):
            sweep()
    assert not os.path.exists(tmp_path / "a" / "_tune")  # nothing started


# --- the objectives, without Ray: a small GAN trained on synthetic healthy patches ---


def test_synthetic_lesions_are_local_and_reproducible(synthetic_patches):
    patch = synthetic_patches(1, seed=3)[0]
    lesioned = add_synthetic_lesion(patch, seed=11)
    changed = lesioned != patch
    assert 10 < changed.sum() < 0.1 * patch.size  # one small lesion, the rest untouched
    np.testing.assert_array_equal(lesioned, add_synthetic_lesion(patch, seed=11))
    assert lesioned.min() >= -1 and lesioned.max() <= 1


def test_lesions_drawn_from_the_data_are_visible_local_and_reproducible(synthetic_patches):
    patch, donor = synthetic_patches(2, seed=5)
    for kind in objectives.DATA_LESION_KINDS:
        for seed in range(5):
            lesioned, mask, drawn = objectives.data_lesion(patch, donor, seed, kind)
            assert drawn == kind and lesioned.min() >= -1 and lesioned.max() <= 1
            # one local lesion the model can see; the rest of the patch untouched
            assert 0.01 * patch.size < mask.sum() < 0.3 * patch.size
            assert np.abs(lesioned - patch)[mask].mean() >= objectives.MIN_CHANGE
            np.testing.assert_array_equal(lesioned[~mask], patch[~mask])
            again = objectives.data_lesion(patch, donor, seed, kind)
            np.testing.assert_array_equal(again[0], lesioned)
    # a transplant is the donor's tissue: its pixels are a region of the donor
    lesioned, mask, _ = objectives.data_lesion(patch, donor, 0, "transplant")
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    region = lesioned[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    windows = np.lib.stride_tricks.sliding_window_view(donor, region.shape)
    assert (windows == region).all(axis=(2, 3)).any()


def test_label_free_lesions_come_from_healthy_volumes_only(synthetic_patches):
    """A val split with a pathological volume: copies are made of the healthy volumes' patches
    only (as in a cohort without labels), and drawn lesions take another volume's tissue."""
    cfg = _config("tune.val_patches=40", "tune.synthetic_patches=8", "tune.cutpaste_patches=8")
    pixels = encode_pixels(synthetic_patches(40, seed=4))
    volumes = np.repeat(["healthy-a", "healthy-b", "pathological"], [14, 14, 12])
    ids = np.array([f"{v}/b0000/y0000x{i:04d}" for i, v in enumerate(volumes)])
    labels = np.zeros(40, np.int8)
    labels[-3:] = 1  # three lesion patches: the whole volume is not healthy
    data = make_evaluation_set(ids, labels, pixels, cfg, volumes=volumes)
    assert data.objective == "labels" and data.count == 40 and data.val_anomalous == 3
    assert data.healthy[:40].sum() == 28 and not data.healthy[28:].any()
    for kind in ("synthetic", "cutpaste"):
        copies = data.copies(kind)
        assert len(copies) == 8 and (data.labels[copies] == -1).all()
        assert data.healthy[data.source[copies]].all()  # originals from healthy volumes
        assert all(data.ids[c].startswith(data.ids[data.source[c]]) for c in copies)


@pytest.mark.parametrize("objective", ["auto", "cutpaste", "residual", "lesions"])
def test_without_labels_a_label_free_objective_ranks_and_every_candidate_is_reported(
    objective, tiny_bundle, synthetic_patches
):
    cfg = _config(
        "tune.val_patches=24", "tune.synthetic_patches=12", "tune.cutpaste_patches=12",
        f"tune.objective={objective}",
    )  # fmt: skip
    val = encode_pixels(synthetic_patches(24, seed=2))
    ids = np.array([f"val/b0000/y0000x{i:04d}" for i in range(24)])
    data = make_evaluation_set(ids, np.full(24, -1), val, cfg)  # no labels at all
    # no volume known to be healthy: auto takes the objective that needs none
    expected = objectives.FALLBACK_LABEL_FREE if objective == "auto" else objective
    assert data.objective == expected and len(data.copies("cutpaste")) == 12
    bundle = load_bundle(tiny_bundle)
    kwargs = dict(steps=30, z_lr=0.05, latent_prior="normal")
    fixed = {"sliced_wasserstein": 0.25}
    metrics = evaluate_objective(
        bundle.generator, bundle.discriminator, data, LAMBDAS, fixed_metrics=fixed, **kwargs
    )
    assert math.isnan(metrics["val_auc"]) and objective_key("labels") not in metrics
    # the objective is its best λ's value; every label-free candidate is there beside it
    parts = objectives.OBJECTIVES[expected].metrics
    per_lambda = [
        objectives.objective_value(expected, {m: metrics[lambda_key(m, lam)] for m in parts})
        for lam in LAMBDAS
    ]
    assert metrics["objective"] == max(per_lambda) == metrics[objective_key(expected)]
    assert metrics[objective_key("quality")] == -0.25
    # no volume is known to be healthy: no cohort AUC, nor blend, which needs it
    for candidate in objectives.LABEL_FREE:
        if "cohort_auc" not in objectives.OBJECTIVES[candidate].metrics:
            assert math.isfinite(metrics[objective_key(candidate)]), candidate
    assert objective_key("cohort") not in metrics and objective_key("blend") not in metrics
    # a GAN trained on healthy patches flags pasted lesions, ours and the data's
    assert metrics["synthetic_auc"] > 0.5 and metrics["cutpaste_auc"] > 0.5
    again = evaluate_objective(
        bundle.generator, bundle.discriminator, data, LAMBDAS, fixed_metrics=fixed, **kwargs
    )
    assert again == metrics  # a fixed evaluation set and seeded z: the same objective


def test_the_cohort_objective_separates_healthy_volumes_from_a_cohort_without_its_labels(
    tiny_bundle, synthetic_patches
):
    """Patches of a healthy volume (labelled 0) against an eye whose patches, half of them
    lesioned, are unlabelled: the AUC is above chance and the same whether or not that eye's
    patch labels are known (it never reads them)."""
    cfg = _config(
        "tune.val_patches=32", "tune.synthetic_patches=2", "tune.cutpaste_patches=2",
        "tune.objective=cohort",
    )  # fmt: skip
    patches = synthetic_patches(32, seed=6)
    lesioned = np.arange(16, 32, 2)
    patches[lesioned] = [add_synthetic_lesion(patches[i], seed=int(i)) for i in lesioned]
    volumes = np.repeat(["healthy-eye", "cohort-eye"], 16)
    ids = np.array([f"{v}/b0000/y0000x{i:04d}" for i, v in enumerate(volumes)])
    labels = np.r_[np.zeros(16), np.full(16, -1)].astype(np.int8)
    truth = labels.copy()
    truth[16:] = 0
    truth[lesioned] = 1
    bundle = load_bundle(tiny_bundle)
    kwargs = dict(steps=30, z_lr=0.05, latent_prior="normal")
    results = []
    for known in (labels, truth):
        data = make_evaluation_set(ids, known, encode_pixels(patches), cfg, volumes=volumes)
        assert data.objective == "cohort" and data.reference[:32].sum() == 16
        results.append(evaluate_objective(
            bundle.generator, bundle.discriminator, data, LAMBDAS, **kwargs
        ))  # fmt: skip
    unlabelled, labelled = results
    assert unlabelled["objective"] == labelled["objective"] == labelled[objective_key("cohort")]
    assert unlabelled["objective"] > 0.6  # the lesioned half of the cohort scores higher
    # blend: at its own best λ, the mean of the cohort AUC and the pasted-ellipse AUC
    blends = [
        (unlabelled[lambda_key("cohort_auc", lam)] + unlabelled[lambda_key("synthetic_auc", lam)])
        / 2
        for lam in LAMBDAS
    ]
    assert unlabelled[objective_key("blend")] == pytest.approx(max(blends))
    auto = _config("tune.val_patches=32", "tune.objective=auto")
    data = make_evaluation_set(ids, labels, encode_pixels(patches), auto, volumes=volumes)
    assert data.objective == objectives.DEFAULT_LABEL_FREE  # what auto takes without labels
    only_healthy = np.zeros(32, np.int8)
    with pytest.raises(TuneError, match=r"my/patches: the cohort objective needs .* 32 and 0"):
        make_evaluation_set(ids, only_healthy, encode_pixels(patches), cfg, "my/patches", volumes)


def test_agreement_rewards_an_objective_that_ranks_as_the_labels_do():
    labelled = np.array([0.61, 0.70, 0.55, 0.82, 0.66, 0.74])
    same = objectives.agreement(labelled * 2 - 0.1, labelled)
    assert same["spearman"] == 1.0 and same["spearman_ci95"] == [1.0, 1.0]
    assert same["regret"] == 0.0 and same["picked"] == 3
    reversed_ = objectives.agreement(-labelled, labelled)
    assert reversed_["spearman"] == -1.0 and reversed_["regret"] == pytest.approx(0.82 - 0.55)
    noise = np.random.default_rng(0).normal(size=6)
    low, high = objectives.agreement(noise, labelled)["spearman_ci95"]
    assert low < objectives.spearman(noise, labelled) < high  # an interval around it


@pytest.mark.parametrize(
    "gpus, workers, fine",
    [("auto", 4, True), (0, 2, True), (0.25, 1, True), (2, 2, True), (1, 2, False), (2, 1, False)],
)
def test_gpus_per_trial_give_each_ddp_worker_a_whole_gpu_or_one_worker_a_part(gpus, workers, fine):
    cfg = _config(f"tune.gpus_per_trial={gpus}", f"train.num_workers={workers}")
    if not fine:
        with pytest.raises(ConfigError, match="tune.gpus_per_trial"):
            check_gpus_per_trial(cfg.tune, workers)
        return
    check_gpus_per_trial(cfg.tune, workers)
    if gpus != "auto":
        scaling = trial_scaling(cfg, float(gpus))
        assert scaling.num_workers == workers and scaling.use_gpu == bool(gpus)
        assert scaling.resources_per_worker.get("GPU", 0) * workers == pytest.approx(gpus)


def test_a_mapping_sweep_scores_each_mapping_and_names_the_cheapest_that_keeps_the_auc(
    phantom_patches, encoder_bundles, tmp_path
):
    """`tune --model`: one Tune trial per (mapping, Γ) of a trained bundle, on the val split."""
    cfg = _config(
        "tune.steps=[0, 4]", "tune.val_patches=24", "tune.synthetic_patches=0",
        "tune.cutpaste_patches=0",
    )  # fmt: skip
    summary = sweep_mappings(phantom_patches, encoder_bundles["with_encoder"], str(tmp_path), cfg)
    settings = [(row["mapping"], int(row["steps"])) for row in summary["mappings"]]
    # encoder+iterative with Γ = 0 is the encoder mapping: it runs once
    assert settings == [
        ("encoder", 0),
        ("iterative", 0),
        ("encoder+iterative", 4),
        ("iterative", 4),
    ]
    assert summary["objective_kind"] == "labels"
    for row in summary["mappings"]:
        assert 0.0 <= row["objective"] <= 1.0 and row["seconds_per_patch"] > 0
    cheapest = summary["cheapest_within_tolerance"]
    best = max(row["objective"] for row in summary["mappings"])
    assert cheapest["objective"] >= best - cfg.tune.auc_tolerance
    table = pd.read_parquet(tmp_path / "mappings.parquet")
    assert len(table) == 4
    with pytest.raises(TuneError, match="no encoder"):
        sweep_mappings(phantom_patches, encoder_bundles["plain"], str(tmp_path / "x"),
                       _config("tune.mappings=[encoder]"))  # fmt: skip
