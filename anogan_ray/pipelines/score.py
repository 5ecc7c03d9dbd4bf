"""Patch table -> score table with a Ray Data actor pool (``anogan-ray score``).

Layout of the stage folder ``out`` (local path or ``s3://``):

    out/scores/*.parquet     the score table (DESIGN.md §3.4), one row per patch per scoring key
    out/rejects/*.parquet    patches that could not be scored: patch_id, split, source, reason, key
    out/summary.json         counts, timings and AUCs of the last run
    out/_staging/<key>/<run>/  files the driver is staging now (never read as part of the
                             table); <key> is a hash of the scoring key

Exactly once. A row's identity is (patch_id, scoring key), the key being (model_id, lambda, steps,
z_lr, mapping) (:class:`anogan_ray.tables.ScoringKey`): a re-run with the same bundle and settings
adds nothing, one with another λ adds a new row per patch. The driver stages the scored blocks
as they come into ``out/_staging/<key>/<run>/`` (a file every ``score.rows_per_file`` rows or
``score.flush_s`` seconds, whichever comes first, each written whole or not at all:
:class:`~anogan_ray.pipelines.commit.StagedWriter`), and only the commit step moves complete files
(their Parquet footer reads) into ``out/scores`` and ``out/rejects``, dropping rows whose key is
already there. The commit runs at the end of every run and at the start of the next one, so the
files finished before a kill are kept, half-written ones are discarded, and the next run scores
exactly the patches that are still missing. Jobs of different scoring keys may write into one
``out`` folder at the same time (each commits and clears only its own key's staging); one job at a
time per scoring key.

Memory. Sets of done patch ids are held as sorted 128-bit digests (``tables.id_keys``, 16 bytes
a patch, searched with ``np.searchsorted``): the resume filter ships them once to the object store,
where the reading tasks share them zero-copy, and the commit checks each staged file against them.
Both run in Ray tasks beside the driver, which holds counts and at most one staged file's rows.

While it runs, the driver logs every 15 s how many patches are done, the rate and the time left
(the scoring actors count them in a :class:`~anogan_ray.pipelines.progress.ProgressCounter`).

Malformed patches are not scored; they go to the rejects table with the reason (what counts as
malformed: :mod:`anogan_ray.pipelines.validate`, which the reading tasks run).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import platform
import time
import uuid
from typing import Any

import numpy as np
import pyarrow.dataset as pads
import ray
import ray.util.scheduling_strategies
import torch

from anogan_ray import storage, tables
from anogan_ray.config import ScoreConfig
from anogan_ray.core import metrics
from anogan_ray.core.fastpath import EXACT, choose_fast_path, effective_path
from anogan_ray.core.invert import (
    CHECK_PATCHES,
    CUDA_MAX_ROWS,
    SCORE_COLUMNS,
    check_fast_path,
    encode,
    score_patches,
)
from anogan_ray.core.model import ENCODER_FILE, load_bundle, verify_bundle
from anogan_ray.pipelines.commit import StagedWriter, commit_staged, done_keys, staging_folder
from anogan_ray.pipelines.progress import logged_progress
from anogan_ray.pipelines.validate import META_COLUMNS, REJECT_REASON, PreparePatches
from anogan_ray.ray_env import ensure_ray
from anogan_ray.tables import (
    PATCH_SIZE,
    ScoringKey,
    count_committed,
    count_patches,
    decode_pixels,
    read_patch_table,
)

log = logging.getLogger(__name__)

BATCHES_PER_BLOCK = 2  # scoring batches per block handed to an actor (see score)


# ---------------------------------------------------------------------------------------------
# The scorer actor
# ---------------------------------------------------------------------------------------------


class PatchScorer:
    """Callable scoring class for ``map_batches``: loads the bundle once, scores batches.

    The fast path of its mapping steps (:func:`~anogan_ray.core.fastpath.choose_fast_path`) is
    checked on its first batch: a few patches are mapped once more in exact fp32 and, beyond the
    path's tolerance, the actor switches to exact fp32 with a warning and redoes the batch.
    ``progress``, a :class:`~anogan_ray.pipelines.progress.ProgressCounter`, is told of every
    batch done (scored and rejected patches) and of the path this actor runs, and why.
    """

    def __init__(
        self,
        model: str,
        cfg: ScoreConfig,
        device: str,
        num_threads: int,
        progress: ray.actor.ActorHandle | None = None,
        patches_per_actor: int | None = None,
    ):
        if device == "cpu":
            torch.set_num_threads(num_threads)
        else:  # true fp32 outside the mapping steps too (PyTorch allows TF32 in cuDNN by default)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        self.device = torch.device(device)
        self.bundle = load_bundle(model, device=self.device)
        self.cfg = cfg
        self.progress = progress
        self.path, self.why = choose_fast_path(
            self.device, cfg.precision, cfg.compile, cfg.cuda_graph, cfg.channels_last,
            patches_per_actor,
        )  # fmt: skip
        self.checked = not self.path.needs_check()
        self.scored = 0
        self.described = ""
        self.worker = f"{os.getpid()}@{platform.node()}"

    def _score(self, pixels: torch.Tensor, ids: list[str]) -> dict[str, np.ndarray]:
        return score_patches(
            self.bundle, pixels, ids, lambda_=self.cfg.lambda_, steps=self.cfg.steps,
            z_lr=self.cfg.z_lr, reference_score=self.cfg.reference_score,
            return_z=self.cfg.save_z or self.cfg.save_maps, path=self.path,
            mapping=self.cfg.mapping,
        )  # fmt: skip

    def _check(self, pixels: torch.Tensor, ids: list[str], scores: dict) -> bool:
        """Whether the fast path's A(x) of the batch's first patches agrees with exact fp32; if
        not, the actor maps in exact fp32 from now on."""
        sample = slice(0, CHECK_PATCHES)
        mapping = self.cfg.mapping
        initial_z = None if mapping == "iterative" else encode(self.bundle, pixels[sample])
        started = time.perf_counter()
        ok, worst = check_fast_path(
            self.bundle, pixels[sample], ids[sample], scores["anomaly_score"][sample],
            path=effective_path(self.path), lambda_=self.cfg.lambda_,
            steps=0 if mapping == "encoder" else self.cfg.steps, z_lr=self.cfg.z_lr,
            initial_z=initial_z,
        )  # fmt: skip
        name = effective_path(self.path).label()
        log.info(
            "%s vs exact fp32 on %d patches: largest relative difference of A(x) %.2e "
            "(checked in %.2f s)", name, len(ids[sample]), worst, time.perf_counter() - started,
        )  # fmt: skip
        if not ok:
            log.warning("%s differs from exact fp32 by %.2e; mapping in exact fp32", name, worst)
            self.path = dataclasses.replace(EXACT, cuda_graph=self.path.cuda_graph)
            self.why = f"{name} differed from fp32 by {worst:.1e} on the first batch"
        return ok

    def _describe(self) -> None:
        """Tell the progress counter which path this actor runs, and why (once per change)."""
        path = effective_path(self.path)
        text = f"{self.device.type} {path.label()}"
        if path != self.path:
            text += " (its compiled or CUDA-graph steps failed)"
        elif self.why:
            text += f" ({self.why})"
        if text != self.described and self.progress is not None:
            self.progress.describe.remote(self.worker, text)
        self.described = text

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        n = len(batch["patch_id"])
        good = batch[REJECT_REASON] == ""
        ids = [str(p) for p in batch["patch_id"][good]]
        out = {name: batch[name] for name in (*META_COLUMNS, REJECT_REASON)}
        columns = {name: np.full(n, np.nan, dtype=np.float32) for name in SCORE_COLUMNS}
        for name in ("residual_max_y", "residual_max_x"):
            columns[name] = np.full(n, -1, dtype=np.int32)
        keep_z = self.cfg.save_z or self.cfg.save_maps
        z = np.zeros((n, self.bundle.model_config.latent_dim), dtype=np.float32)
        if ids:
            pixels = torch.from_numpy(decode_pixels(batch["pixels"][good]))[:, None]  # (b,1,64,64)
            scores = self._score(pixels, ids)
            if not self.checked:
                self.checked = True
                if not self._check(pixels, ids, scores):
                    scores = self._score(pixels, ids)  # the batch again, in exact fp32
            self._describe()
            for name in SCORE_COLUMNS:
                columns[name][good] = scores[name]
            if keep_z:
                z[good] = scores["z"]
        out.update(columns)
        if keep_z:
            out["z"] = z
        out["model_id"] = np.full(n, self.bundle.model_id)
        out["lambda"] = np.full(n, self.cfg.lambda_, dtype=np.float64)
        out["steps"] = np.full(n, self.cfg.steps, dtype=np.int32)
        out["z_lr"] = np.full(n, self.cfg.z_lr, dtype=np.float64)
        out["mapping"] = np.full(n, self.cfg.mapping)
        self.scored += len(ids)
        if self.progress is not None:
            self.progress.add.remote(n, self.worker, time.perf_counter() - started)
        return out


# ---------------------------------------------------------------------------------------------
# The scoring key and what is done under it
# ---------------------------------------------------------------------------------------------


def scoring_key(model_id: str, cfg: ScoreConfig) -> ScoringKey:
    """The key of the rows a run with these settings writes."""
    return ScoringKey(model_id, cfg.lambda_, cfg.steps, cfg.z_lr, cfg.mapping)


def _done_count(out: str, key: ScoringKey, splits: list[str] | None = None) -> int:
    """Rows already in the score and rejects tables under this scoring key (of ``splits``)."""
    where = key.expression()
    if splits is not None:
        where = where & pads.field("split").isin(splits)
    return sum(count_committed(storage.join(out, t), where) for t in ("scores", "rejects"))


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


def cluster_gpus() -> tuple[int, int]:
    """(GPUs in the cluster now, GPUs it can have): the second counts what the autoscaler's node
    types may add (the cluster config it publishes in the GCS, as Ray Train reads it)."""
    now = int(ray.cluster_resources().get("GPU", 0))
    try:
        from ray._private.state import state

        limits = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # no autoscaler (a local Ray, a fixed cluster): what is there is all
        limits = {}
    return now, max(now, int(min(limits.get("GPU", 0), 2**20)))


def _gpu_type() -> str:
    """The accelerator type Ray reports for the cluster's GPU nodes (e.g. H100), or ""."""
    types = {
        name.split(":", 1)[1]
        for node in ray.nodes()
        if node.get("Alive")
        for name in node.get("Resources", {})
        if name.startswith("accelerator_type:")
    }
    return ",".join(sorted(types))


def _wait_for_gpus(reachable: int, wait_s: float) -> int:
    """Ask the autoscaler for a GPU node and wait up to ``wait_s`` for one; the GPUs now present.

    Raises:
        RuntimeError: the cluster has no GPU and cannot get one, or none came within ``wait_s``.
    """
    if reachable == 0:
        raise RuntimeError(
            "score.device=cuda, but this cluster has no GPU and its autoscaler cannot add one "
            "(no node type with GPUs); use score.device=cpu or a cluster with GPU workers"
        )
    from ray.autoscaler.sdk import request_resources

    log.info("no GPU node yet; asking the autoscaler for one (waiting up to %.0f s)", wait_s)
    request_resources(bundles=[{"GPU": 1}])
    deadline = time.monotonic() + wait_s
    try:
        while time.monotonic() < deadline:
            now = int(ray.cluster_resources().get("GPU", 0))
            if now:
                return now
            time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))
    finally:
        request_resources(bundles=[])  # the actor pool's own demand keeps the nodes from here
    raise RuntimeError(
        f"no GPU node came up within score.gpu_wait_s={wait_s:g} s although the cluster's "
        f"autoscaler may add {reachable} GPU(s); check the autoscaler's log (ray status), or "
        "use score.device=cpu"
    )


def _actor_pool(**size: int) -> ray.data.ActorPoolStrategy:
    """A scoring actor pool whose actors run the scorer in their main thread.

    By default Ray Data runs an actor's UDF in a side thread (to overlap batching with it), and
    PyTorch's OpenMP kernels called from a side thread ran at half the speed on this 2-core CPU
    (``score_patches`` with 2 threads: 1.03 ms a patch in a side thread against 0.51 in the main
    thread; a 20,000-patch job 709 -> 994 patches/s). One call at a time per actor, in the main
    thread, gives the actor all the threads it was given."""
    return ray.data.ActorPoolStrategy(
        **size, max_concurrent_calls_per_actor=1, enable_true_multi_threading=True
    )


def _resources(
    cfg: ScoreConfig, blocks: int | None = None
) -> tuple[str, ray.data.ActorPoolStrategy, dict[str, Any], int]:
    """(device, the actor pool, per-actor Ray resources, torch threads per actor) for this job.

    ``auto`` takes GPUs whenever the cluster has or can get them (autoscaler node types
    included), ``cuda`` requires them; with none present yet, the autoscaler is asked for one and
    the job waits at most ``score.gpu_wait_s`` before failing with the reason. On GPUs the pool
    starts with the GPUs present and may grow to what the autoscaler can add.

    On CPUs the actors run one torch thread each and together leave one CPU of Ray's to the
    reading tasks (Ray Data's file listing and reads each ask for a whole CPU): one actor per CPU
    asking (C − 1)/C of one on a single node, C − 1 actors of one CPU each on several (fractions
    could leave every node with less than the one CPU a read needs). Single-threaded actors side
    by side beat one actor running several threads: a multi-threaded inversion waits at every
    kernel for its slowest thread, and the readers and Ray's own processes take a core from it
    at random (2 cores, demo preset: 79 against 50 patches/s after the first batch).
    No more CPU actors than the job has ``blocks`` to score (an idle actor costs its start-up);
    ``score.num_actors`` overrides the count. Fewer actors share the CPUs' threads.
    """
    gpus, reachable = cluster_gpus()
    if cfg.device == "cuda" or (cfg.device == "auto" and reachable > 0):
        if gpus == 0:
            gpus = _wait_for_gpus(reachable, cfg.gpu_wait_s)
        if cfg.num_actors:
            return "cuda", _actor_pool(size=cfg.num_actors), {"num_gpus": 1}, 1
        pool = _actor_pool(min_size=gpus, max_size=max(gpus, reachable))
        return "cuda", pool, {"num_gpus": 1}, 1
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    nodes = sum(1 for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0)
    if nodes <= 1:
        actors = cfg.num_actors or min(cpus, blocks or cpus)
        ask = min(1.0, (cpus - 1) / actors)
    else:
        actors = cfg.num_actors or max(1, min(cpus - 1, blocks or cpus))
        ask = 1.0
    threads = max(1, cpus // actors)
    return "cpu", _actor_pool(size=actors), {"num_cpus": ask}, threads


def _aucs(out: str, key: ScoringKey) -> dict[str, float | None]:
    """Patch-level ROC AUC of each score over rows labelled 0 or 1 (None: one class only).

    Scores the run did not compute (all NaN: GAN_R when off, baselines the bundle lacks) are left
    out; p_d enters as 1 - p_d (low = anomalous). Counted in DuckDB over the committed files
    (:class:`~anogan_ray.core.metrics.Ranking`): nothing of the table's size comes into memory.
    """
    if not storage.list_files(storage.join(out, "scores"), ".parquet"):
        return {}
    con, _ = tables.connect(storage.join(out, "scores"), key.row())
    result: dict[str, float | None] = {}
    for column in metrics.score_columns(con, "scores"):
        value = f'1 - "{column}"' if column in metrics.LOWER_IS_ANOMALOUS else f'"{column}"'
        con.execute(
            "CREATE OR REPLACE TEMP VIEW labelled AS "
            f'SELECT label, CAST({value} AS DOUBLE) AS "{column}" FROM scores'
        )
        with metrics.Ranking(con, "labelled", column, None) as ranking:
            auc = ranking.auc()
        result[column] = None if np.isnan(auc) else auc
    return result


def score(patches: str, model: str, out: str, cfg: ScoreConfig) -> dict[str, Any]:
    """Score every patch of the requested splits that this model and setting have not scored yet.

    Args:
        patches: the patch table (its folder or the preprocess stage folder), local or s3.
        model: the model bundle folder.
        out: the stage folder; see the module docstring for its layout.
        cfg: inversion settings, batch size, actors, device.

    Returns:
        The summary, also written to ``out/summary.json``.
    """
    started = time.perf_counter()
    if not storage.list_files(patches, ".parquet"):
        raise FileNotFoundError(f"patch table {patches}: no Parquet files found")
    ensure_ray()
    index = storage.read_json(storage.join(model, "bundle.json"))
    verify_bundle(model)  # an altered or incompatible bundle: one error here, not one per actor
    model_id = index["model_id"]
    if cfg.mapping != "iterative" and ENCODER_FILE not in index.get("sha256", {}):
        raise ValueError(
            f"model bundle {model}: score.mapping={cfg.mapping} needs the encoder E, which this "
            "bundle does not have (train with train.encoder=true, or use score.mapping=iterative)"
        )
    if cfg.mapping == "encoder":  # z = E(x) and no steps: one key whatever score.steps says
        cfg = dataclasses.replace(cfg, steps=0)
    key = scoring_key(model_id, cfg)
    # The commit and the done ids run in tasks on this node (the out folder may be local): the
    # driver holds counts and an object reference, nothing that grows with the table.
    on_this_node = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False
    )
    commit = ray.remote(commit_staged).options(num_cpus=0, scheduling_strategy=on_this_node)
    # a killed run's finished files; half-written ones dropped
    recovered = ray.get(commit.remote(out, key, cfg.rows_per_file))
    if recovered["scored"] or recovered["rejected"] or recovered["partial_files"]:
        log.info("recovered from an earlier run: %s", recovered)
    done = _done_count(out, key)
    log.info("%d patches already scored or rejected under model %s", done, model_id)
    to_score = max(0, count_patches(patches, cfg.splits) - _done_count(out, key, cfg.splits))
    # the done ids as sorted 16-byte keys in the object store, shared zero-copy by the tasks
    done_ref = (
        ray.remote(done_keys).options(num_cpus=0, scheduling_strategy=on_this_node).remote(out, key)
        if done
        else None
    )

    blocks = max(1, math.ceil(to_score / (BATCHES_PER_BLOCK * cfg.batch_size)))
    device, pool, resources, threads = _resources(cfg, blocks)
    actors = pool.min_size
    # on CUDA a whole number of the mapping's largest fixed-shape batches: no padding wasted
    batch_size = cfg.batch_size
    if device == "cuda":
        batch_size = math.ceil(cfg.batch_size / CUDA_MAX_ROWS) * CUDA_MAX_ROWS
    staging = storage.join(staging_folder(out, key), uuid.uuid4().hex[:12])
    log.info(
        "scoring %d patches with %d %s actor(s)%s, batch size %d", to_score, actors, device,
        f" (up to {pool.max_size} as GPU nodes come)" if pool.max_size > actors else "",
        batch_size,
    )  # fmt: skip
    # Blocks of about two scoring batches: each actor task scores a few batches and hands them on.
    context = ray.data.DataContext.get_current()
    saved_block_size = context.target_max_block_size
    context.target_max_block_size = BATCHES_PER_BLOCK * batch_size * (PATCH_SIZE * PATCH_SIZE + 256)
    scoring_started = time.perf_counter()
    try:
        with logged_progress(to_score, log, verb="scored", unit="patches") as progress:
            scorer_args = (model, cfg, device, threads, progress, math.ceil(to_score / actors))
            scored = (
                read_patch_table(patches, cfg.splits)
                .map_batches(PreparePatches(cfg.splits, done_ref), batch_format="pyarrow")
                .map_batches(
                    PatchScorer,
                    fn_constructor_args=scorer_args,
                    batch_size=batch_size,
                    batch_format="numpy",
                    compute=pool,
                    **resources,
                )
            )
            # The driver stages the scored blocks itself (a file every rows_per_file rows or
            # flush_s seconds), where the out folder is reachable, as the commit does.
            with StagedWriter(staging, cfg.rows_per_file, cfg.flush_s) as writer:
                for block in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
                    writer.add(block)
            steady_rate = ray.get(progress.steady_rate.remote())
            fast_paths = ray.get(progress.descriptions.remote())
            busy_share = ray.get(progress.busy_share.remote())
    finally:
        context.target_max_block_size = saved_block_size
    scoring_seconds = time.perf_counter() - scoring_started
    committed = ray.get(commit.remote(out, key, cfg.rows_per_file))

    maps = None
    if cfg.save_maps:  # each method's residual stitched onto every scored B-scan
        from anogan_ray.pipelines.maps import write_maps

        maps = write_maps(patches, model, out, key, cfg)
    rejected_total = count_committed(storage.join(out, "rejects"), key.expression())
    summary = {
        "key": str(key),
        "model_id": model_id,
        "lambda": cfg.lambda_,
        "steps": cfg.steps,
        "z_lr": cfg.z_lr,
        "mapping": cfg.mapping,
        "reference_score": cfg.reference_score,
        "splits": cfg.splits,
        "device": device,
        "gpu_type": _gpu_type() if device == "cuda" else "",
        "actors": actors,
        "max_actors": pool.max_size,
        "batch_size": batch_size,
        # each actor's mapping steps: "cuda bf16 + channels_last + CUDA graph (why)" -> actors
        "fast_paths": fast_paths,
        "patches_scored": committed["scored"],
        "patches_rejected": committed["rejected"],
        "patches_recovered_from_earlier_run": recovered["scored"] + recovered["rejected"],
        "partial_files_discarded": recovered["partial_files"] + committed["partial_files"],
        "patches_skipped_already_done": done,
        "patches_scored_total": count_committed(storage.join(out, "scores"), key.expression()),
        "patches_rejected_total": rejected_total,
        "seconds": round(time.perf_counter() - started, 3),
        "patches_per_s": round(committed["scored"] / scoring_seconds, 3),
        # from the first finished batch to the last: the pipeline's throughput without start-up
        "patches_per_s_after_first_batch": round(steady_rate, 3) if steady_rate else None,
        # the share of their time the actors spent in their calls, from each one's first call to
        # its last: below 1, they waited for their input (on a GPU: the pipeline idles it)
        "actor_busy_share": None if busy_share is None else round(busy_share, 3),
        "auc": _aucs(out, key),  # patch level
        "maps": maps,  # the map table's summary (score.save_maps), else None
        "scores": storage.join(out, "scores"),
        "rejects": storage.join(out, "rejects"),
    }
    storage.write_json(storage.join(out, "summary.json"), summary)
    log.info(
        "scored %d patches (%d rejected) in %.1f s; AUC %s",
        summary["patches_scored"], summary["patches_rejected"], summary["seconds"],
        summary["auc"],
    )  # fmt: skip
    return summary
