"""`ray job submit` of the score job to a real `ray start --head` on 127.0.0.1 (issue 8).

The cluster is started as a user would (the `ray` CLI of this venv, token authentication on, as
Ray 2.60 does for local clusters), with its own ``--temp-dir`` and free ports so it never meets
another Ray on the machine (the session's ``ray_local`` or another test run). It is stopped by
process id, never with ``ray stop``, which would stop every Ray on the machine: ``ray start
--block`` keeps the head in the foreground, SIGTERM makes it shut down the processes it started,
and what is left in its process group, or names its temp dir, is killed. This runs in teardown
even when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest

from anogan_ray import storage

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # the `ray` CLI and the `python` the job runs with
START_TIMEOUT_S = 120  # the head is up in ~10 s on a quiet machine; much slower on a busy one
JOB_TIMEOUT_S = 300


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class Head:
    """A running head node: its job-server address and the environment to talk to it."""

    address: str  # http://127.0.0.1:<dashboard port>, what `ray job submit --address` takes
    env: dict[str, str]  # RAY_AUTH_MODE=token and the token: what a user exports
    temp_dir: str
    log: Path


def _get(url: str, token: str | None) -> int:
    """HTTP status of a GET (0 when nothing listens)."""
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError):
        return 0


def _stop(process: subprocess.Popen, temp_dir: str) -> None:
    """Stop exactly the Ray this module started: by its process ids, never `ray stop`."""
    import psutil

    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)  # `ray start --block` shuts its processes down
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # its own session: start_new_session=True
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)
    # Anything that left the group (workers, the reaper) still names this cluster's temp dir.
    leftovers = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                proc.kill()
                leftovers.append(proc)
    psutil.wait_procs(leftovers, timeout=10)
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` on 127.0.0.1 with token auth; stopped in teardown."""
    temp_dir = tempfile.mkdtemp(prefix="ar-", dir="/tmp")  # short: socket paths max 107 chars
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's `python` is the venv's
        RAY_AUTH_MODE="token",  # token auth on the head; `ray job submit` needs it set too
        RAY_AUTH_TOKEN=token,  # a user would rather run `ray get-auth-token --generate` once
        RAY_USAGE_STATS_ENABLED="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # SIGTERM stops the head at once
        OMP_NUM_THREADS="1",
    )
    gcs, dashboard, client, agent_listen, agent_grpc, runtime_env, metrics = _free_ports(7)
    command = [
        str(VENV_BIN / "ray"), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_listen}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
        f"--metrics-export-port={metrics}", "--num-cpus=2", "--num-gpus=0",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]  # fmt: skip
    log = Path(temp_dir) / "ray-start.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while _get(f"{address}/api/jobs/", token) != 200:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start --head did not come up:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield Head(address, env, temp_dir, log)
    finally:
        _stop(process, temp_dir)


def test_submitted_score_job_writes_every_patch_once(
    ray_head, tmp_path, tiny_bundle, write_patch_table, synthetic_patches
):
    patches, out = tmp_path / "patches", tmp_path / "score"
    split_patches = {"val": synthetic_patches(6, seed=100), "test": synthetic_patches(10, seed=101)}
    ids = write_patch_table(str(patches), split_patches)
    command = [
        str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head.address,
        "--runtime-env", "cluster/runtime_env.yaml",  # working dir `.`, .venv and .git left out
        "--submission-id", f"score-{secrets.token_hex(4)}",
        "--", "python", "jobs/score.py", "--patches", str(patches), "--model", tiny_bundle,
        "--out", str(out), "--config", "tiny",
        "--set", "score.steps=3", "--set", "score.batch_size=8",
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=ROOT, env=ray_head.env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S
    )
    assert result.returncode == 0, f"job failed:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    assert "succeeded" in result.stdout
    # the driver's progress reaches the job's log, which `ray job submit` follows
    assert f"scored {len(ids)} / {len(ids)} patches (100.0 %)" in result.stdout

    files = storage.list_files(str(out / "scores"), ".parquet")
    scores = pads.dataset(files, format="parquet").to_table()
    scored_ids = scores["patch_id"].to_pylist()
    assert sorted(scored_ids) == sorted(ids)  # every patch exactly once
    assert np.all(np.isfinite(scores["anomaly_score"].to_numpy()))
    assert set(scores["steps"].to_pylist()) == {3}  # the job's --set reached the scorer
    summary = json.loads((out / "summary.json").read_text())
    assert summary["patches_scored"] == summary["patches_scored_total"] == len(ids)


def test_cluster_refuses_requests_without_the_token(ray_head):
    assert _get(f"{ray_head.address}/api/jobs/", token=None) == 401
    assert _get(f"{ray_head.address}/api/jobs/", token="not-the-token") == 403
