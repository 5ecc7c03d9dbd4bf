"""Sweeps on a cluster with GPUs (issue 32), on this CPU-only machine.

A `ray.cluster_utils.Cluster` with a CPU head and a worker node that advertises one GPU, as the
scoring device test does (tests/test_multinode.py): Ray schedules by the resources a node
advertises, so trials land on the GPU node with the share of its GPU they asked for. There is no
CUDA here, so a trial given a GPU maps on the CPU (and says so); on a GPU machine the same trial
maps in bf16 with CUDA graphs (``tune.evaluation_path``).

A driver process talks to one Ray at a time, so the session's local Ray (`ray_local`) is shut
down for this module and brought back afterwards (`without_session_ray` in conftest.py).
"""

from __future__ import annotations

import pytest

from anogan_ray.config import load_config
from anogan_ray.pipelines.tune import max_concurrent_trials, sweep_mappings, trial_gpus

OBJECT_STORE = 80 * 1024 * 1024  # per node


@pytest.fixture(scope="module")
def gpu_cluster(without_session_ray, loopback_cluster):
    """A head with 2 CPUs and a worker node with 2 CPUs and one (advertised) GPU."""
    head_args = dict(num_cpus=2, object_store_memory=OBJECT_STORE)
    gpu_node = dict(
        num_cpus=2, num_gpus=1, resources={"accelerator_type:H100": 1},
        object_store_memory=OBJECT_STORE,
    )  # fmt: skip
    with loopback_cluster(head_args, [gpu_node]) as (_, (node,)):
        yield node


def _config(*overrides: str):
    return load_config(
        "tiny",
        [
            "tune.lambdas=[0.1]",
            "tune.mappings=[iterative]",
            "tune.steps=[0, 2]",
            "tune.val_patches=16",
            "tune.synthetic_patches=4",
            "tune.cutpaste_patches=4",
            "tune.max_concurrent=8",
            *overrides,
        ],
    )


def test_sweep_trials_ask_for_the_gpus_the_cluster_has(gpu_cluster):
    # auto: a whole GPU per DDP worker, as `train` runs; the cluster's one GPU holds one trial
    assert trial_gpus(_config()) == 1.0
    assert max_concurrent_trials(_config(), 1.0) == 1
    assert trial_gpus(_config("train.num_workers=1", "tune.gpus_per_trial=0.25")) == 0.25
    assert max_concurrent_trials(_config(), 0.25) == 4  # four quarter-GPU trials share it
    assert trial_gpus(_config("tune.gpus_per_trial=0")) == 0.0  # CPUs only, when asked


def test_mapping_trials_run_on_their_share_of_a_gpu_node(
    gpu_cluster, encoder_bundles, write_patch_table, synthetic_patches, tmp_path
):
    """`tune --model` with tune.gpus_per_trial=0.5: every trial runs on the GPU node with its
    half of GPU 0, two at a time; without CUDA (this machine) each maps on the CPU."""
    patches = str(tmp_path / "patches")
    write_patch_table(patches, {"val": synthetic_patches(16, seed=31)})
    cfg = _config("tune.gpus_per_trial=0.5")
    summary = sweep_mappings(patches, encoder_bundles["plain"], str(tmp_path / "sweep"), cfg)
    assert summary["gpus_per_trial"] == 0.5 and summary["max_concurrent_trials"] == 2
    rows = summary["mappings"]
    assert [(row["mapping"], row["steps"]) for row in rows] == [("iterative", 0), ("iterative", 2)]
    for row in rows:
        assert row["node_id"] == gpu_cluster.node_id and row["gpu_ids"] == "0"
        assert row["device"] == "cpu" and row["path"] == "fp32"  # no CUDA in this process
        assert 0.0 <= row["objective"] <= 1.0  # no labels: the default label-free objective
