"""Scoring on a multi-node Ray cluster (issue 8): a head and two worker nodes on this machine.

`ray.cluster_utils.Cluster` starts real raylets, one per node, on 127.0.0.1. One scoring run
serves both tests: once its first staged file is written, a worker node that hosts a scoring
actor is killed (SIGKILL, like a lost machine). Ray restarts the actor on a surviving node and
retries its tasks; the staging/commit step of `score` keeps the table exactly-once.

A driver process talks to one Ray at a time, so the session's local Ray (`ray_local`) is shut
down for this module and brought back afterwards (`without_session_ray` in conftest.py).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from anogan_ray import storage
from anogan_ray.config import ScoreConfig
from anogan_ray.pipelines.score import score

PATCHES = 64
SCORE = ScoreConfig(steps=20, batch_size=4, num_actors=2, rows_per_file=4)  # 16 staged files
OBJECT_STORE = 80 * 1024 * 1024  # per node; the whole table is ~300 KB
RUN_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(without_session_ray, loopback_cluster):
    """A head (2 CPUs, also runs the read and write tasks) and two 1-CPU worker nodes."""
    head_args = dict(
        num_cpus=2,
        object_store_memory=OBJECT_STORE,
        include_dashboard=True,  # the state API (list_actors) answers through it
        dashboard_host="127.0.0.1",
        dashboard_port=_free_port(),
    )
    workers = [dict(num_cpus=1, object_store_memory=OBJECT_STORE)] * 2
    with loopback_cluster(head_args, workers) as started:
        yield started


def _alive_scoring_actors(cluster: Cluster) -> list:
    """Ray Data's scoring actors (``MapWorker(...PatchScorer)``), from the state API."""
    actors = list_actors(
        address=cluster.address,
        filters=[("state", "=", "ALIVE")],
        limit=10_000,
        raise_on_missing_output=False,
    )
    return [a for a in actors if "PatchScorer" in a.class_name]


def _rows(files: list[str]) -> int:
    """Rows in the complete (footer-readable) Parquet files among ``files``."""
    rows = 0
    for url in files:
        with contextlib.suppress(OSError, pa.ArrowInvalid):  # still being written
            rows += pq.read_metadata(storage.filesystem(url)[1]).num_rows
    return rows


@pytest.fixture(scope="module")
def run_losing_a_node(tiny_bundle, write_patch_table, synthetic_patches, tmp_path_factory, cluster):
    """Score 64 patches; kill a worker node with a scoring actor once scoring is under way."""
    cluster, workers = cluster
    root = tmp_path_factory.mktemp("multinode")
    patches, out = str(root / "patches"), str(root / "score")
    ids = write_patch_table(patches, {"test": synthetic_patches(PATCHES, seed=100)})
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = score(patches, tiny_bundle, out, SCORE)
        except BaseException as err:  # surfaced in the test, not lost in the thread
            result["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    worker_by_id = {node.node_id: node for node in workers}
    removal = None
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while thread.is_alive() and removal is None and time.monotonic() < deadline:
        staged = storage.list_files(storage.join(out, "_staging"), ".parquet")
        if staged:  # scoring is under way: some patches done, most still to do
            nodes = [a.node_id for a in _alive_scoring_actors(cluster)]
            on_workers = [n for n in nodes if n in worker_by_id]
            if on_workers and len(nodes) == SCORE.num_actors:  # both scoring
                cluster.remove_node(worker_by_id[on_workers[0]], allow_graceful=False)
                removal = {"node": on_workers[0], "actor_nodes": nodes, "staged": _rows(staged)}
        time.sleep(0.1)
    thread.join(timeout=max(1.0, deadline - time.monotonic()))
    assert not thread.is_alive(), f"scoring did not finish within {RUN_TIMEOUT_S} s"
    if "error" in result:
        raise result["error"]
    files = storage.list_files(storage.join(out, "scores"), ".parquet")
    table = pads.dataset(files, format="parquet").to_table(columns=["patch_id"])
    return {
        "ids": ids,
        "scored_ids": table["patch_id"].to_pylist(),
        "summary": result["summary"],
        "removal": removal,
    }


def test_scoring_places_actors_on_more_than_one_node(run_losing_a_node):
    removal = run_losing_a_node["removal"]
    assert removal is not None, "scoring finished before a node could be removed"
    assert len(set(removal["actor_nodes"])) == SCORE.num_actors == 2  # both alive, apart


def test_losing_a_worker_node_mid_run_still_scores_every_patch_once(run_losing_a_node):
    removal, summary = run_losing_a_node["removal"], run_losing_a_node["summary"]
    assert removal is not None, "scoring finished before a node could be removed"
    assert removal["staged"] < PATCHES  # the node went down with patches still to score
    scored = run_losing_a_node["scored_ids"]
    assert sorted(scored) == sorted(run_losing_a_node["ids"])  # every patch, exactly once
    assert summary["patches_scored"] == summary["patches_scored_total"] == PATCHES
    assert summary["patches_recovered_from_earlier_run"] == 0  # one run, no rerun


# --- which device a scoring job takes (issue 17): real nodes that advertise GPUs, and the cluster
# config an autoscaler publishes in the GCS ---


def _publish_autoscaler_config(gpu_nodes: int) -> None:
    """Publish a cluster config with a GPU node type, as Ray's autoscaler does in the GCS."""
    from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    key, namespace = GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE
    if gpu_nodes == 0:
        _internal_kv_del(key, namespace=namespace)
        return
    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add(name="gpu-workers", min_count=0, max_count=gpu_nodes)
    group.resources.update({"CPU": 8, "GPU": 1})
    _internal_kv_put(key, config.SerializeToString(), namespace=namespace)


def test_scoring_device_follows_what_the_cluster_can_get(cluster):
    from anogan_ray.pipelines.score import _gpu_type, _resources, cluster_gpus

    cluster_obj, _ = cluster
    # CPU nodes only, no autoscaler: auto takes the CPUs, cuda fails at once and says why
    # (several nodes: one-thread actors of a whole CPU each, one CPU left for reading)
    device, pool, resources, threads = _resources(ScoreConfig(device="auto"))
    assert device == "cpu" and resources == {"num_cpus": 1} and threads == 1
    assert pool.min_size == pool.max_size == int(ray.cluster_resources()["CPU"]) - 1
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="no GPU and its autoscaler cannot add one"):
        _resources(ScoreConfig(device="cuda", gpu_wait_s=60))
    assert time.monotonic() - started < 10

    # an autoscaler that may add two GPU nodes: auto asks for GPUs and waits (bounded) for one
    _publish_autoscaler_config(gpu_nodes=2)
    try:
        assert cluster_gpus() == (0, 2)
        started = time.monotonic()
        with pytest.raises(RuntimeError, match=r"no GPU node came up within score.gpu_wait_s=2 s"):
            _resources(ScoreConfig(device="auto", gpu_wait_s=2))
        assert time.monotonic() - started < 15

        # a GPU node joins: GPU actors, starting with the GPUs there, growing to what may come
        gpu_node = cluster_obj.add_node(
            num_cpus=1, num_gpus=1, resources={"accelerator_type:H100": 1},
            object_store_memory=OBJECT_STORE,
        )  # fmt: skip
        try:
            cluster_obj.wait_for_nodes()
            device, pool, resources, _ = _resources(ScoreConfig(device="auto"))
            assert device == "cuda" and resources == {"num_gpus": 1}
            assert (pool.min_size, pool.max_size) == (1, 2)
            assert _gpu_type() == "H100"
            assert _resources(ScoreConfig(device="cpu"))[0] == "cpu"
        finally:
            cluster_obj.remove_node(gpu_node)
    finally:
        _publish_autoscaler_config(gpu_nodes=0)
