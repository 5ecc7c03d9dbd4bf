"""The Ray every stage runs in: joining a cluster or starting a local Ray, the environment of its
workers, and how much of Ray's own logging reaches the user.

A stage calls :func:`ensure_ray` before its first Ray call. Importing this module does not import
Ray (the contracts in :mod:`anogan_ray.tables` call it from their Ray Data reader only).

**Quiet by default.** A command prints its own lines: a stage's start, its progress with a rate
and the time left, warnings, the result. Ray's INFO lines are left out unless the user asks for
them (``anogan-ray --verbose``, or ``--log-level DEBUG``; :func:`set_verbose`); its warnings and
errors always pass. What is left out, and the knob that does it:

- on the driver, the ``ray`` logger's INFO lines (``ray.init(logging_level=WARNING)``: "Started a
  local Ray instance", Ray Tune's and Ray Train's driver lines) and Ray Data's console lines: the
  per-dataset "Starting execution ... / Execution plan ..." banners, the "Running Dataset ...
  Active & requested resources ..." progress tables, "execution finished" (the console handler of
  the ``ray.data`` logger at WARNING; its log file in the Ray session folder keeps everything);
- in the Ray Data executors that run in workers (the split coordinator that feeds Ray Train's
  workers): their banners (``DataContext.print_on_execution_start``, which a dataset carries from
  the driver) and their distributed tqdm bars (``DataContext.use_ray_tqdm``; a worker then logs
  its progress to Ray Data's logger instead, which :data:`QUIET_WORKER_ENV` keeps at WARNING);
- in every worker process, through :data:`QUIET_WORKER_ENV`: Ray Data's INFO lines
  (``RAY_DATA_LOG_LEVEL``, read whenever a worker sets up Ray Data's logging) and the default of
  ``use_ray_tqdm`` for datasets made in a worker (``RAY_TQDM``). A local Ray's workers inherit it
  from the driver's environment when :func:`ensure_ray` starts it; a job on a cluster gets it from
  ``cluster/runtime_env.yaml`` (or its RayJob manifest), which a test ties to this module;
- Ray Train's "Checkpoint successfully created ..." and worker-group lines, in its controller
  and workers: ``RunConfig(logging_config=LoggingConfig(log_level=train_log_level()))``, which
  travels with the trainer; its "Reporting training result ..." lines, which that setting does
  not reach: :func:`hold_train_reports`, called by the training loop in each worker.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

SPARE_WORKERS = 4  # idle Ray workers a local Ray keeps beyond one per CPU (see ensure_ray)

# Environment of the Ray workers that a local Ray starts (ensure_ray) and that a job on a cluster
# gets from cluster/runtime_env.yaml. Ray 2.60's Parquet reader sizes Arrow's CPU thread pool to
# 32 threads in every read task, which holds one CPU: on 2 cores the reading worker grew to
# 1.27 GiB USS over 10^6 patches (each decoding thread keeps its own allocator cache) against
# 0.75-0.77 GiB flat with one thread, at no more CPU (a read-only pipeline, one run each).
READER_ENV = {"RAY_DATA_PARQUET_READER_CPU_COUNT": "1"}

# Environment of the workers of a quiet run (the default; see the module docstring): Ray Data's
# logger at WARNING in every worker, and no distributed tqdm bars from datasets made in workers.
QUIET_WORKER_ENV = {"RAY_DATA_LOG_LEVEL": "WARNING", "RAY_TQDM": "0"}

# Environment of a local Ray (ensure_ray; the tests' Ray too). Ray Train's controller takes one
# report per poll of its workers (every 2 s by default) and a worker reporting sooner waits for
# it: with a laptop's short epochs (the demo's take 1-3 s, the tests' under one) every checkpoint
# waited up to 2 s. A local Ray polls every 0.25 s; a cluster keeps Ray's default.
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # seconds; read by controller and workers
LOCAL_TRAIN_ENV = {TRAIN_POLL_ENV: "0.25"}

# Set in the driver's environment when the user asked for Ray's own lines; a local Ray's workers
# inherit it, so a trainer built in a worker (a sweep's trial) logs as the driver's would.
VERBOSE_ENV = "ANOGAN_RAY_VERBOSE"


def set_verbose(verbose: bool) -> None:
    """Show Ray's own INFO lines (``True``) or only its warnings and errors (``False``).

    Takes effect for a Ray that :func:`ensure_ray` starts after this call (the workers' environment
    is fixed when Ray starts) and for every dataset and trainer built after it.
    """
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)


def is_verbose() -> bool:
    """Whether Ray's own INFO lines are shown (:func:`set_verbose`); quiet by default."""
    return os.environ.get(VERBOSE_ENV) == "1"


def train_log_level() -> str:
    """The level of Ray Train's console lines: ``ray.train.LoggingConfig(log_level=...)``."""
    return "INFO" if is_verbose() else "WARNING"


def hold_train_reports(level: str) -> None:
    """In a Ray Train worker: its "Reporting training result ..." lines at ``level`` or above.

    Ray 2.60 logs them under a logger named by its source file (``logging.getLogger(__file__)``
    in ``ray/train/v2/_internal/execution/context.py``), which Ray Train's own ``LoggingConfig``
    does not reach; this holds that logger to the same level.
    """
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(level)


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to the Ray cluster in ``RAY_ADDRESS`` (a job on a cluster), or start a local one.

    Inside ``ray job submit`` Ray is reached through ``RAY_ADDRESS`` (``RAY_ADDRESS=auto`` joins a
    cluster started with ``ray start`` on this machine). Without it a fresh local Ray starts here,
    never silently joining another one. An already initialized Ray (a test fixture) is reused.
    Either way Ray's own lines on this driver follow :func:`set_verbose`.
    """
    import ray

    _quiet_driver(not is_verbose())
    if ray.is_initialized():
        return
    level = logging.INFO if is_verbose() else logging.WARNING
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, logging_level=level)
        log.info("ray: joined the cluster at %s: %s", address, _resources_text())
        return
    # Ray keeps idle workers up to one per CPU and kills the rest after a second; with every
    # CPU held by a scoring actor, each read or write task then started a fresh worker (its
    # imports cost ~0.06 ms of CPU a patch at 4x10^5 patches, benchmarks/bench_score.py).
    # Keep a few spare ones, unless the user set the limit.
    cpus = num_cpus or os.cpu_count() or 1
    os.environ.setdefault("RAY_num_workers_soft_limit", str(cpus + SPARE_WORKERS))
    worker_env = READER_ENV | LOCAL_TRAIN_ENV | ({} if is_verbose() else QUIET_WORKER_ENV)
    for name, value in worker_env.items():  # the raylet and its workers inherit them
        os.environ.setdefault(name, value)
    context = ray.init(address="local", num_cpus=num_cpus, log_to_driver=True, logging_level=level)
    dashboard = f", dashboard http://{context.dashboard_url}" if context.dashboard_url else ""
    log.info("ray: started a local Ray: %s%s", _resources_text(), dashboard)


def _resources_text() -> str:
    """The cluster's CPUs, GPUs and object store as a person reads them."""
    import ray

    resources = ray.cluster_resources()
    parts = [f"{resources.get('CPU', 0):g} CPUs"]
    if resources.get("GPU"):
        parts.append(f"{resources['GPU']:g} GPUs")
    parts.append(f"{resources.get('object_store_memory', 0) / 2**30:.1f} GiB object store")
    return ", ".join(parts)


def _quiet_driver(quiet: bool) -> None:
    """Ray Data's console lines on this driver, and what its datasets carry to workers."""
    import ray.data  # configures the `ray.data` logger: a log file and the console

    console = logging.WARNING if quiet else logging.INFO
    logger = logging.getLogger("ray.data")
    if not quiet and logger.getEffectiveLevel() > logging.INFO:  # a job's RAY_DATA_LOG_LEVEL
        logger.setLevel(logging.INFO)
    for handler in logger.handlers:
        if handler.name == "console":  # Ray Data's default logging configuration
            handler.setLevel(console)
    context = ray.data.DataContext.get_current()
    context.print_on_execution_start = not quiet
    # Off a terminal Ray Data logs its progress (dropped when quiet); on one it draws tqdm bars.
    # In a worker (a split coordinator feeding Ray Train) distributed tqdm would draw bars on
    # this terminal, or a redraw per line in a log: a quiet run has it log instead.
    context.use_ray_tqdm = not quiet and sys.stdout.isatty()
