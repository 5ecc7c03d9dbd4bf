"""The command line: help texts, clean errors, and the query / evaluate commands on a score table."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from anogan_ray.cli import build_parser, main

COMMANDS = ("phantom", "preprocess", "train", "score", "query", "evaluate", "report", "demo")


def test_every_stage_has_a_command_with_help(capsys):
    for command in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([command, "--help"])
        assert exit_info.value.code == 0
        assert "--config" in capsys.readouterr().out or command in ("query", "evaluate", "report")


def test_a_bad_setting_is_a_clean_error_with_exit_code_2(tmp_path, capsys):
    code = main(["phantom", "--out", str(tmp_path), "--config", "tiny", "--set", "phantom.hight=3"])
    assert code == 2
    assert "phantom.hight: unknown key" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_phantom_command_writes_a_cohort(tmp_path, capsys):
    assert main(["phantom", "--out", str(tmp_path / "c"), "--config", "tiny"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["volumes"] == 5
    assert (tmp_path / "c" / "manifest.csv").is_file()


def test_query_top_k_to_csv_is_sorted_and_filtered(scored_cohort, tmp_path):
    out = tmp_path / "top.csv"
    args = ["query", "--scores", scored_cohort["scores"], "--top-k", "5", "--split", "test"]
    assert main([*args, "--out", str(out)]) == 0
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5
    scores = [float(r["anomaly_score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    table = pq.read_table(scored_cohort["scores"] + "/split=test")
    assert scores[0] == pytest.approx(max(table.column("anomaly_score").to_pylist()))


def test_query_reports_a_missing_column_by_name(scored_cohort, capsys):
    code = main(["query", "--scores", scored_cohort["scores"], "--score", "no_such_score"])
    assert code == 2
    assert "no_such_score" in capsys.readouterr().err


def test_evaluate_prints_the_papers_table(scored_cohort, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--scores", scored_cohort["scores"], "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "specificity" in captured.err.lower()
    result = json.loads(out.read_text())
    assert result["level"] == "patch"


def test_job_script_is_the_same_command():
    result = subprocess.run(
        [sys.executable, "jobs/score.py", "--help"], capture_output=True, text=True, check=True
    )
    assert "--model" in result.stdout and "score table" in result.stdout
