"""The Ray every stage runs in: joining a cluster or starting a local Ray, and the environment of
its workers.

A stage calls :func:`ensure_ray` before its first Ray call. Importing this module does not import
Ray (the contracts in :mod:`anogan_ray.tables` call it from their Ray Data reader only).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

SPARE_WORKERS = 4  # idle Ray workers a local Ray keeps beyond one per CPU (see ensure_ray)

# Environment of the Ray workers that a local Ray starts (ensure_ray) and that a job on a cluster
# gets from cluster/runtime_env.yaml. Ray 2.60's Parquet reader sizes Arrow's CPU thread pool to
# 32 threads in every read task, which holds one CPU: on 2 cores the reading worker grew to
# 1.27 GiB USS over 10^6 patches (each decoding thread keeps its own allocator cache) against
# 0.75-0.77 GiB flat with one thread, at no more CPU (a read-only pipeline, one run each).
READER_ENV = {"RAY_DATA_PARQUET_READER_CPU_COUNT": "1"}


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to the Ray cluster in ``RAY_ADDRESS`` (a job on a cluster), or start a local one.

    Inside ``ray job submit`` Ray is reached through ``RAY_ADDRESS`` (``RAY_ADDRESS=auto`` joins a
    cluster started with ``ray start`` on this machine). Without it a fresh local Ray starts here,
    never silently joining another one. An already initialized Ray (a test fixture) is reused.
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # Ray keeps idle workers up to one per CPU and kills the rest after a second; with every
        # CPU held by a scoring actor, each read or write task then started a fresh worker (its
        # imports cost ~0.06 ms of CPU a patch at 4x10^5 patches, benchmarks/bench_score.py).
        # Keep a few spare ones, unless the user set the limit.
        cpus = num_cpus or os.cpu_count() or 1
        os.environ.setdefault("RAY_num_workers_soft_limit", str(cpus + SPARE_WORKERS))
        for name, value in READER_ENV.items():
            os.environ.setdefault(name, value)
        ray.init(address="local", num_cpus=num_cpus, log_to_driver=True)  # dashboard: 127.0.0.1
    log.info("ray resources: %s", ray.cluster_resources())
