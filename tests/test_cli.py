"""The command line: help texts, clean errors, and the query / evaluate commands on a score table."""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from anogan_ray.cli import build_parser, main

COMMANDS = (
    "manifest",
    "phantom",
    "preprocess",
    "train",
    "score",
    "tune",
    "query",
    "evaluate",
    "report",
    "demo",
)


def test_every_stage_has_a_command_with_help(capsys):
    for command in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([command, "--help"])
        assert exit_info.value.code == 0
        assert "--config" in capsys.readouterr().out or command in (
            "manifest",
            "query",
            "evaluate",
            "report",
        )


def test_every_commands_help_ends_with_an_example_that_parses(capsys):
    parser = build_parser()
    (commands,) = [a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(commands) >= set(COMMANDS)
    for name, command in commands.items():
        last = command.format_help().rstrip().splitlines()[-2:]
        assert last[0] == "example:", name
        words = shlex.split(last[1])
        assert words[:2] == ["anogan-ray", name]
        args = parser.parse_args(words[1:])  # the example is a valid command line
        assert args.command == name


def test_a_bad_setting_is_a_clean_error_with_exit_code_2(tmp_path, capsys):
    code = main(["phantom", "--out", str(tmp_path), "--config", "tiny", "--set", "phantom.hight=3"])
    assert code == 2
    assert "phantom.hight: unknown key; did you mean phantom.height?" in capsys.readouterr().err
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


def test_a_table_of_two_keys_needs_a_key_on_the_command_line(scored_cohort, tmp_path, capsys):
    two = tmp_path / "scores"
    shutil.copytree(scored_cohort["scores"], two)
    other = pq.read_table(two / "split=test" / "a.parquet")
    other = other.set_column(other.schema.get_field_index("lambda"), "lambda",
                             pa.array([0.5] * other.num_rows))  # fmt: skip
    pq.write_table(other, two / "split=test" / "c.parquet")
    assert main(["query", "--scores", str(two), "--keys"]) == 0
    listed = capsys.readouterr().out
    assert "lambda=0.1," in listed and "lambda=0.5," in listed
    assert main(["evaluate", "--scores", str(two)]) == 2
    error = capsys.readouterr().err
    assert "several scoring keys" in error and "lambda=0.5" in error
    assert main(["evaluate", "--scores", str(two), "--lambda", "0.1"]) == 0
    assert (
        json.loads(capsys.readouterr().out)["n"]
        == pq.read_table(scored_cohort["scores"] + "/split=test").num_rows
    )  # every test patch once, not the λ 0.5 copies too
    assert main(["query", "--scores", str(two), "--top-k", "3", "--key", "lambda=0.5"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--scores", str(two), "--compare"]) == 0  # both keys side by side
    rows = json.loads(capsys.readouterr().out)["keys"]
    assert sorted(row["lambda"] for row in rows) == [0.1, 0.5]


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


def test_a_stage_prints_its_own_lines_not_rays_chatter(tmp_path, tiny_config):
    """Quiet by default: preprocess prints Ray's start, its progress and its result, not Ray Data's
    per-dataset banners and progress tables (those come with ``--verbose``)."""
    from anogan_ray.data.phantom import write_cohort

    write_cohort(tiny_config.phantom, str(tmp_path / "cohort"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own
    command = [str(Path(sys.executable).parent / "anogan-ray"), "preprocess", "--config", "tiny"]
    paths = ["--manifest", str(tmp_path / "cohort" / "manifest.csv"), "--out", str(tmp_path / "p")]
    result = subprocess.run(
        [*command, *paths], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert "ray: started a local Ray" in result.stderr
    assert "preprocessed 5 / 5 volumes (100.0 %)" in result.stderr  # progress, rate, time left
    assert "preprocess: 5 volumes read, 0 rejected" in result.stderr
    for chatter in ("Starting execution of Dataset", "Execution plan", "Active & requested"):
        assert chatter not in result.stderr
    assert len(lines) <= 5, "\n".join(lines)  # Ray's start (and its token warning), ours: 3
    (summary,) = result.stdout.splitlines()  # the summary for scripts: one line off a terminal
    assert json.loads(summary)["volumes_read"] == 5


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]


def test_score_refuses_an_altered_bundle_in_one_line_before_scoring(
    ray_local, tiny_bundle, write_patch_table, synthetic_patches, tmp_path, capsys
):
    write_patch_table(str(tmp_path / "patches"), {"val": synthetic_patches(8, seed=3)})
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    weights = bytearray((bundle / "generator.pt").read_bytes())
    weights[-100] ^= 0xFF  # one byte of G's weights changed after export
    (bundle / "generator.pt").write_bytes(bytes(weights))
    out = tmp_path / "score"
    argv = ["score", "--patches", str(tmp_path / "patches"), "--model", str(bundle)]
    assert main([*argv, "--out", str(out), "--config", "tiny"]) == 2
    captured = capsys.readouterr()
    assert _error_lines(captured.err) == [
        f"anogan-ray score: error: model bundle {bundle}: generator.pt does not match its "
        "recorded sha256"
    ]
    assert not captured.out  # no summary: nothing was scored
    assert not list(out.rglob("*.parquet"))


def test_train_refuses_a_table_that_is_not_a_patch_table_in_one_line(tmp_path, capsys):
    folder = tmp_path / "not_patches" / "split=train"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"patch_id": ["a/b0000/y0000x0000"], "score": [1.0]}),
                   folder / "part-0.parquet")  # fmt: skip
    code = main(["train", "--patches", str(tmp_path / "not_patches"), "--out",
                 str(tmp_path / "model"), "--config", "tiny"])  # fmt: skip
    assert code == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert line.startswith(f"anogan-ray train: error: patch table {tmp_path / 'not_patches'}: ")
    assert line.endswith("part-0.parquet has no column pixels; expected a patch table written "
                         "by `anogan-ray preprocess`")  # fmt: skip
    assert not (tmp_path / "model").exists()
