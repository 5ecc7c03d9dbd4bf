"""Progress a person can follow: epoch lines while training, a rate and the time left while scoring.

The lines are formatted by plain functions of numbers (:func:`epoch_line`, :func:`rate_line`).
Work done in Ray actors anywhere in the cluster is counted by one small actor
(:class:`ProgressCounter`); :func:`logged_progress` gives the workers its handle and logs a
:func:`rate_line` from the driver every :data:`PROGRESS_EVERY_S` seconds while the stage runs.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

PROGRESS_EVERY_S = 15.0  # seconds between two progress lines of a running stage


def format_duration(seconds: float) -> str:
    """A duration as a person says it: ``"12 s"``, ``"6 min 47 s"``, ``"2 h 5 min"``."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {seconds} s"
    return f"{seconds} s"


def _time_left(seconds_left: float) -> str:
    return f"about {format_duration(seconds_left)} left" if seconds_left > 0 else "done"


def epoch_line(
    run: str,
    epoch: int,
    epochs: int,
    step: int,
    total_steps: int,
    means: dict[str, float],
    epoch_seconds: float,
    seconds_left: float,
    quality: float | None = None,
) -> str:
    """The line training logs after an epoch.

    Args:
        run: the run's name (``anogan``, ``anogan-encoder``, ...).
        epoch: the epoch just finished, from 1, of ``epochs``.
        step: the optimizer steps done, of ``total_steps``.
        means: the recipe's step metrics (losses, D's outputs) averaged over the epoch.
        epoch_seconds: how long the epoch took.
        seconds_left: the estimated time to the last step.
        quality: the sliced Wasserstein distance of G's samples to real patches, when this
            epoch computed it.

    Example: ``anogan epoch 3/25, step 24/200: d_loss 1.215, g_loss 0.8735, d_real 0.6123,
    d_fake 0.3875; sliced W1 0.02135; 12.4 s, about 4 min 10 s left``.
    """
    metrics = ", ".join(f"{name} {value:.4g}" for name, value in means.items())
    parts = [f"{run} epoch {epoch}/{epochs}, step {step}/{total_steps}: {metrics}"]
    if quality is not None:
        parts.append(f"sliced W1 {quality:.4g}")
    parts.append(f"{epoch_seconds:.1f} s, {_time_left(seconds_left)}")
    return "; ".join(parts)


def rate_line(
    done: int, total: int, rate: float, verb: str, unit: str, workers: dict[str, int] | None = None
) -> str:
    """How far a stage is, at ``rate`` units per second: ``scored 1,234 / 20,000 patches (6.2 %),
    41.3 patches/s, about 7 min 34 s left`` (``verb`` "scored", ``unit`` "patches"), then how
    the ``workers`` work (description -> count): ``; 1 actor: cuda bf16 + CUDA graph``."""
    described = "".join(
        f"; {count} actor{'s' if count > 1 else ''}: {text}"
        for text, count in (workers or {}).items()
    )
    return _rate_line(done, total, rate, verb, unit) + described


def _rate_line(done: int, total: int, rate: float, verb: str, unit: str) -> str:
    share = 100 * done / total if total else 100.0
    line = f"{verb} {done:,} / {total:,} {unit} ({share:.1f} %)"
    if done == 0:
        return f"{line}, waiting for the first results" if total else line
    rate_text = f"{rate:,.1f}" if rate >= 1 else f"{rate:.2g}"
    left = _time_left((total - done) / rate) if rate > 0 else "time left unknown"
    return f"{line}, {rate_text} {unit}/s, {left}"


@ray.remote(num_cpus=0)
class ProgressCounter:
    """Work done anywhere in the cluster, counted in one place: workers call ``add.remote(n)``."""

    def __init__(self) -> None:
        self.done = 0
        self.first: tuple[float, int] | None = None  # (time, count) of the first report
        self.last = 0.0  # time of the last report
        self.described: dict[str, str] = {}  # worker -> how it works (e.g. its fast path)
        self.busy: dict[str, list[float]] = {}  # worker -> [busy seconds, first start, last end]

    def add(self, count: int, worker: str = "", busy_s: float = 0.0) -> None:
        """``count`` more units done; ``worker`` spent the last ``busy_s`` seconds on them."""
        now = time.time()
        busy = self.busy.setdefault(worker, [0.0, now - busy_s, now])
        busy[0] += busy_s
        busy[2] = now
        self.done += count
        self.last = time.time()
        if self.first is None:
            self.first = (self.last, count)

    def count(self) -> int:
        return self.done

    def describe(self, worker: str, text: str) -> None:
        """Record how ``worker`` works now (the scorers: their mapping's fast path, and why)."""
        self.described[worker] = text

    def busy_share(self) -> float | None:
        """The share of their time the workers spent in their work calls, from the start of each
        one's first call to the end of its last (their start-up left out); below 1, they waited
        for work. None before any report."""
        spans = sum(last - first for _, first, last in self.busy.values())
        return sum(busy for busy, _, _ in self.busy.values()) / spans if spans > 0 else None

    def descriptions(self) -> dict[str, int]:
        """Each description and how many workers it describes."""
        counts: dict[str, int] = {}
        for text in self.described.values():
            counts[text] = counts.get(text, 0) + 1
        return counts

    def steady_rate(self) -> float | None:
        """Units per second from the first report to the last: the workers' start-up (a model
        loading, a first batch) left out; None before two reports."""
        if self.first is None or self.last <= self.first[0]:
            return None
        return (self.done - self.first[1]) / (self.last - self.first[0])


@contextlib.contextmanager
def logged_progress(
    total: int, log: logging.Logger, verb: str, unit: str
) -> Iterator[ray.actor.ActorHandle]:
    """A :class:`ProgressCounter` for the workers; meanwhile the driver logs :func:`rate_line`
    to ``log``, every :data:`PROGRESS_EVERY_S` seconds while the block runs and once at its end.
    """
    # on the driver's node: the count outlives any worker node that goes away mid-run
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    counter = ProgressCounter.options(scheduling_strategy=here).remote()
    started = time.perf_counter()
    first_seen: tuple[float, int] | None = None  # (time, count) when results first came
    stop = threading.Event()

    def log_line() -> None:
        nonlocal first_seen
        try:
            done = ray.get(counter.count.remote(), timeout=60)
            workers = ray.get(counter.descriptions.remote(), timeout=60)
        except ray.exceptions.RayError as err:  # progress only: never fail the stage for it
            log.debug("no progress count (%s)", err)
            return
        now = time.perf_counter()
        if first_seen is None and done:
            first_seen = (now, done)
        # The rate since the first results came: the workers' start (loading a model, a node
        # joining the cluster) is not part of it. Until then, the rate since the start.
        if first_seen is not None and done > first_seen[1]:
            rate = (done - first_seen[1]) / (now - first_seen[0])
        else:
            rate = done / (now - started)
        log.info(rate_line(done, total, rate, verb, unit, workers))

    def log_until_stopped() -> None:
        while not stop.wait(PROGRESS_EVERY_S):
            log_line()

    thread = threading.Thread(target=log_until_stopped, name="progress", daemon=True)
    thread.start()
    try:
        yield counter
    finally:
        stop.set()
        thread.join()
    log_line()
    ray.kill(counter)
