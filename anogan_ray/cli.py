"""The ``anogan-ray`` command: one subcommand per stage, plus ``demo`` that chains them.

Every stage reads and writes local paths or ``s3://`` URLs and leaves a ``summary.json`` next to
its outputs. Stage functions are imported lazily so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from anogan_ray.config import PRESETS, Config, ConfigError, load_config
from anogan_ray.ray_env import set_verbose

log = logging.getLogger("anogan_ray")
# The AWS SDK's loggers: at DEBUG they print each request's Authorization header (with the access
# key id), so --log-level DEBUG leaves them at INFO; no credential reaches a log.
_CREDENTIAL_LOGGERS = ("botocore", "aiobotocore", "boto3", "s3transfer")

_CONFIG_HELP = (
    f"a preset ({', '.join(PRESETS)}) or a YAML file with the same sections (default: %(default)s)"
)
# One example per command, closing its --help; the stages' read and write `make demo`'s folders.
EXAMPLES = {
    "phantom": "anogan-ray phantom --config tiny --out cohort",
    "manifest": "anogan-ray manifest --from scans/ --out scans.csv --label-from-folder "
    "NORMAL=0,DME=1",
    "preprocess": "anogan-ray preprocess --manifest demo-out/cohort/manifest.csv "
    "--out demo-out/preprocess",
    "train": "anogan-ray train --patches demo-out/preprocess/patches --out demo-out/model "
    "--set train.epochs=20",
    "score": "anogan-ray score --patches demo-out/preprocess/patches --model demo-out/model "
    "--out demo-out/score --set score.steps=40",
    "tune": "anogan-ray tune --patches demo-out/preprocess/patches --out demo-out/sweep "
    "--set tune.num_samples=4",
    "query": "anogan-ray query --scores demo-out/score/scores --aggregate volume --split test",
    "evaluate": "anogan-ray evaluate --scores demo-out/score/scores --threshold demo-out/model",
    "report": "anogan-ray report --scores demo-out/score/scores --patches "
    "demo-out/preprocess/patches --model demo-out/model --out demo-out/report",
    "demo": "anogan-ray demo --config tiny --out demo-tiny",
}


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's layout, but the example closing a command's help stays one line to copy."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("example:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _add_config_options(parser: argparse.ArgumentParser, default: str = "demo") -> None:
    parser.add_argument("--config", default=default, metavar="PRESET|FILE", help=_CONFIG_HELP)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting, e.g. --set score.steps=200 (repeatable)",
    )


def _add_log_options(parser: argparse.ArgumentParser, top: bool) -> None:
    """``--log-level`` and ``--verbose``, before the command or after it (``score -v ...``)."""

    def default(value: Any) -> Any:  # a subcommand's flag only overrides the top one when given
        return value if top else argparse.SUPPRESS

    group = parser if top else parser.add_argument_group("output")
    group.add_argument(
        "--log-level",
        default=default("INFO"),
        choices=["DEBUG", "INFO", "WARNING"],
        help="level of this program's lines; DEBUG also shows Ray's own (default: INFO)",
    )
    group.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default(False),
        help="also show Ray's own lines: Ray Data's per-dataset banners and progress tables, "
        "Ray Train's per-report and worker-group lines (Ray's warnings and errors always show)",
    )


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


# ---------------------------------------------------------------------------------------------
# Stage commands: each builds the config and calls one package function.
# ---------------------------------------------------------------------------------------------


def _phantom(args: argparse.Namespace) -> dict[str, Any]:
    from anogan_ray.data.phantom import write_cohort

    return write_cohort(_config(args).phantom, args.out)


def _manifest(args: argparse.Namespace) -> dict[str, Any] | None:
    from anogan_ray.data import manifest

    labels = args.label_from_folder and manifest.parse_labels(args.label_from_folder)
    report = manifest.build_manifest(
        args.root,
        args.out,
        pattern=args.pattern,
        label_from_folder=labels or None,
        split=manifest.parse_split(args.split),
        split_from_folder=args.split_from_folder,
        train_healthy_only=args.train_healthy_only,
        seed=args.seed,
        modality=args.modality,
        spacing_x_um=args.spacing_x_um,
        bscan_folders=args.bscan_folders,
        threads=args.threads,
    )
    print(manifest.format_report(report), file=sys.stderr if args.json else sys.stdout)
    return report if args.json else None


def _preprocess(args: argparse.Namespace) -> dict[str, Any]:
    from anogan_ray.pipelines.preprocess import preprocess

    return preprocess(args.manifest, args.out, _config(args).preprocess)


def _train(args: argparse.Namespace) -> dict[str, Any]:
    from anogan_ray.pipelines.train import train

    return train(args.patches, args.out, _config(args))


def _score(args: argparse.Namespace) -> dict[str, Any]:
    from anogan_ray.pipelines.score import score

    return score(args.patches, args.model, args.out, _config(args).score)


def _tune(args: argparse.Namespace) -> dict[str, Any]:
    import pyarrow as pa

    from anogan_ray.analysis.query import format_table
    from anogan_ray.pipelines.tune import leaderboard, sweep_mappings, tune

    if args.model:  # a mapping sweep of one trained bundle
        summary = sweep_mappings(args.patches, args.model, args.out, _config(args))
        print(format_table(pa.Table.from_pylist(summary["mappings"])), file=sys.stderr)
        return summary
    summary = tune(args.patches, args.out, _config(args))
    print(leaderboard(args.out), file=sys.stderr)
    return summary


def _query(args: argparse.Namespace) -> None:
    from anogan_ray.analysis import query

    filters = dict(split=args.split, key=_key(args))
    if args.keys:
        table = query.keys(args.scores)
    elif args.sql:
        table = query.sql(args.scores, args.sql)
    elif args.aggregate:
        table = query.aggregate(
            args.scores, level=args.aggregate, threshold=args.threshold, score=args.score, **filters
        )
    else:
        table = query.top_k(
            args.scores,
            k=args.top_k,
            score=args.score,
            subject=args.subject,
            volume=args.volume,
            **filters,
        )
    query.write_result(table, args.out, args.format)


def _evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from anogan_ray.core import metrics

    if args.level == "pixel":
        return _evaluate_pixels(args)
    if args.compare:  # every scoring key side by side (AUCs only)
        rows = metrics.compare(args.scores, split=args.split, level=args.level,
                               aggregate=args.aggregate)  # fmt: skip
        print(metrics.format_comparison(rows), file=sys.stderr)
        return {"keys": rows}
    threshold: float | str | None = args.threshold
    if args.calibrate:  # calibrate on val, store with the model, evaluate at that threshold
        if not args.model:
            raise ValueError("--calibrate stores the threshold with the model: give --model")
        metrics.calibrate(
            args.scores,
            out=args.model,
            method=args.calibrate,
            percentile=args.percentile,
            key=_key(args),
        )
        threshold = threshold if threshold is not None else args.model
    result = metrics.evaluate(
        args.scores,
        threshold=threshold,
        level=args.level,
        split=args.split,
        aggregate=args.aggregate,
        percentile=args.percentile,
        key=_key(args),
    )
    print(metrics.format_paper_table(result), file=sys.stderr)
    if args.json:
        from anogan_ray import storage

        storage.write_json(args.json, result)
    return {k: v for k, v in result.items() if k != "roc"}


def _evaluate_pixels(args: argparse.Namespace) -> dict[str, Any]:
    """``evaluate --level pixel``: the map table against the manifest's masks."""
    from anogan_ray import storage
    from anogan_ray.analysis.pixels import evaluate_pixels, format_pixel_table

    if not args.manifest:
        raise ValueError("--level pixel compares maps with masks: give --manifest")
    maps = args.maps or [storage.join(storage.parent(s), "maps") for s in args.scores]
    result = evaluate_pixels(
        maps,
        args.manifest,
        key=_key(args),
        splits=[s for s in args.split.split(",") if s],
        percentile=args.percentile,
        smooth_sigma=args.smooth,
        standardize=args.standardize,
    )
    print(format_pixel_table(result), file=sys.stderr)
    if args.json:
        storage.write_json(args.json, result)
    return result


def _add_key_options(p: argparse.ArgumentParser) -> None:
    """Options that pick one scoring key of a score table holding several."""
    g = p.add_argument_group(
        "scoring key",
        "a score table can hold rows of several models and settings; these pick one (needed "
        "only when the table holds several; `query --keys` lists them)",
    )
    g.add_argument("--key", help="a key as `query --keys` and score's summary print it")
    g.add_argument("--model-id", help="rows of this model_id")
    g.add_argument("--lambda", dest="lambda_", type=float, help="rows scored with this λ")
    g.add_argument("--steps", type=int, help="rows scored with this many mapping steps Γ")
    g.add_argument("--z-lr", type=float, help="rows scored with this z learning rate")
    g.add_argument("--mapping", help="rows of this mapping (iterative, encoder, ...)")


def _key(args: argparse.Namespace) -> dict[str, Any]:
    from anogan_ray.tables import parse_key

    key = parse_key(args.key or "")
    given = dict(model_id=args.model_id, steps=args.steps, z_lr=args.z_lr, mapping=args.mapping)
    given["lambda"] = args.lambda_
    return key | {field: value for field, value in given.items() if value is not None}


def _threshold(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value  # a threshold.json or a model bundle that holds one


def _report(args: argparse.Namespace) -> dict[str, Any]:
    from anogan_ray.analysis.report import report

    return report(
        args.scores,
        args.out,
        patches=args.patches,
        model=args.model,
        threshold=args.threshold,
        split=args.split,
        top_k=args.top_k,
        clusters=args.clusters,
        key=_key(args),
        manifest=args.manifest,
        bscans=args.bscans,
    )


def _demo(args: argparse.Namespace) -> dict[str, Any]:
    from anogan_ray.demo import run_demo

    return run_demo(args.out, _config(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anogan-ray",
        description=(
            "AnoGAN on Ray: train a DCGAN on healthy retinal OCT patches, then score every patch "
            "of a cohort by latent inversion (Schlegl et al. 2017). Paths may be local or s3://."
        ),
    )
    _add_log_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str,
        func: Callable,
        help_text: str,
        paths: Sequence[tuple[str, str]] = (),
        config: bool = False,
    ) -> argparse.ArgumentParser:
        """A subcommand with its required path flags and (for the stages) config options.

        ``--scores`` takes one or more score tables wherever it is a required path.
        """
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=f"example:\n  {EXAMPLES[name]}",
            formatter_class=_HelpFormatter,
        )
        p.set_defaults(func=func)
        _add_log_options(p, top=False)
        for flag, text in paths:
            p.add_argument(
                flag, required=True, help=text, nargs="+" if flag == "--scores" else None
            )
        if config:
            _add_config_options(p)
        return p

    command(
        "phantom",
        _phantom,
        "Write a synthetic OCT cohort (volumes, pixel-level pathology masks, true layer "
        "boundaries and a manifest) for testing and demos.",
        [
            ("--out", "cohort folder (local or s3://)"),
        ],
        config=True,
    )

    p = command(
        "manifest",
        _manifest,
        "Write a cohort manifest for a folder of scans (local or s3://): every file of a "
        "supported format (one row per image, e.g. Kermany's class folders), every RETOUCH case "
        "folder; each scan is read once (unreadable ones are skipped with the reason) and its "
        "spacing taken from the file. Masks (*_mask.*, *mask* folders) fill mask_path. Splits are "
        "by subject, shuffled with --seed; with labels, subjects with a label-1 volume stay out "
        "of train. Prints what it found and skipped.",
    )
    p.add_argument(
        "--from", dest="root", required=True, metavar="DIR", help="folder of scans (or s3://)"
    )
    p.add_argument("--out", required=True, help="the manifest to write, .csv or .parquet")
    p.add_argument(
        "--pattern",
        metavar="REGEX",
        help="ids from the path relative to DIR: named group subject (and optionally volume), "
        r"e.g. '(?P<subject>\d+)-\d+\.jpeg$' (Kermany), 'Subject_(?P<subject>\d+)' (Duke); "
        "paths it does not match are skipped (default: subject = file stem, volume = "
        "relative path)",
    )
    p.add_argument(
        "--label-from-folder",
        metavar="NAME=LABEL,...",
        help="label 0/1 from the nearest enclosing folder of that name (case-insensitive), e.g. "
        "NORMAL=0,DME=1,CNV=1,DRUSEN=1; scans under none are skipped (default: no labels)",
    )
    p.add_argument(
        "--split",
        default="train=0.8,val=0.1,test=0.1",
        metavar="NAME=FRACTION,...",
        help="fractions of subjects per split, summing to 1 (default: %(default)s)",
    )
    p.add_argument(
        "--split-from-folder",
        action="store_true",
        help="folders named train / val / test decide the split instead of --split",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the subject shuffle (default 0)")
    p.add_argument(
        "--train-healthy-only",
        action=argparse.BooleanOptionalAction,
        help="subjects with any label-1 volume never go to train but to val/test in proportion "
        "(default: on when --label-from-folder gives labels)",
    )
    p.add_argument(
        "--modality", choices=["oct", "image"], default="oct", help="of every row (default oct)"
    )
    p.add_argument(
        "--spacing-x-um",
        type=float,
        help="A-scan spacing in µm for scans whose file states none (plain images, .npy)",
    )
    p.add_argument(
        "--bscan-folders",
        action="store_true",
        help="a leaf folder holding only images is one volume of B-scans, not one row per image",
    )
    p.add_argument("--threads", type=int, default=4, help="scans read at once (default 4)")
    p.add_argument(
        "--json", action="store_true", help="print the report as JSON (the text goes to stderr)"
    )

    command(
        "preprocess",
        _preprocess,
        "Normalize, resample to 22 µm, segment and flatten each OCT volume of a manifest and "
        "write its 64 x 64 patches as a Parquet patch table (Ray Data).",
        [
            ("--manifest", "cohort manifest, CSV or Parquet"),
            ("--out", "output folder for the patch table"),
        ],
        config=True,
    )

    command(
        "train",
        _train,
        "Train the DCGAN on the healthy `train` patches with Ray Train (DDP), checkpointing and "
        "resuming by run name; then the encoder E (train.encoder) and the aCAE and PCA "
        "baselines (train.baselines); export one model bundle.",
        [
            ("--patches", "patch table written by `preprocess`"),
            ("--out", "model bundle folder"),
        ],
        config=True,
    )

    command(
        "score",
        _score,
        "Score patches by batched latent inversion on a Ray Data actor pool (z from the patch "
        "id's seed or from the encoder: score.mapping) and write the score table, baselines "
        "included; re-running scores only what is missing.",
        [
            ("--patches", "patch table written by `preprocess`"),
            ("--model", "model bundle written by `train`"),
            ("--out", "output folder for the score table"),
        ],
        config=True,
    )

    p = command(
        "tune",
        _tune,
        "Sweep G's and D's learning rates (and z's rate, the inversion steps) with Ray Tune, "
        "each trial a Ray Train run like `train`, ASHA stopping weak trials; every trial's "
        "model is scored after each epoch at each λ on the val split (labelled AUC, or without "
        "labels a label-free objective: tune.objective). On a cluster with GPUs each trial takes "
        "tune.gpus_per_trial of them (fractions too). Prints the leaderboard and, where val is "
        "labelled, how well each label-free objective agreed; writes the trials table and the "
        "best model bundle; re-running resumes an interrupted sweep.",
        [
            ("--patches", "patch table written by `preprocess`"),
            ("--out", "sweep folder: trials, best_model, summary"),
        ],
        config=True,
    )
    p.add_argument(
        "--model",
        help="a trained model bundle: sweep its mapping, Γ and z's rate (tune.mappings x "
        "tune.steps x tune.z_lr; on GPUs in bf16 like `score`) instead of training; prints AUC "
        "and cost per setting and the cheapest that keeps the AUC",
    )

    p = command(
        "query",
        _query,
        "Query score tables with DuckDB: the top-k most anomalous patches (default), "
        "per-volume or per-subject aggregates, or any SQL against the view `scores`.",
        [("--scores", "one or more score tables")],
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--top-k", type=int, default=20, help="most anomalous patches (default 20)")
    mode.add_argument("--aggregate", choices=["volume", "subject"], help="aggregate per level")
    mode.add_argument(
        "--sql",
        help="SQL over the view `scores` (every row, all keys), e.g. 'SELECT count(*) FROM scores'",
    )
    mode.add_argument("--keys", action="store_true", help="list the scoring keys in the table")
    p.add_argument("--score", default="anomaly_score", help="score column (default: %(default)s)")
    p.add_argument("--subject", help="only this subject_id")
    p.add_argument("--volume", help="only this volume_id")
    p.add_argument("--split", help="only this split")
    p.add_argument("--threshold", type=float, help="with --aggregate: count patches above it")
    p.add_argument("--out", help="write to this file (.csv, .parquet, .json) instead of printing")
    p.add_argument("--format", choices=["table", "csv", "parquet", "json"], help="output format")
    _add_key_options(p)

    p = command(
        "evaluate",
        _evaluate,
        "ROC/AUC of A, R, D, p_d and GAN_R and the paper's table (precision, recall, "
        "sensitivity, specificity, AUC) at a calibrated threshold, at patch, volume or subject "
        "level; --level pixel: pixel AUROC, AUPRO and lesion detection of each method's maps "
        "against the manifest's masks.",
        [("--scores", "one or more score tables")],
    )
    p.add_argument(
        "--threshold",
        type=_threshold,
        help="a number, a threshold.json or a model bundle holding one (default: calibrate on val)",
    )
    p.add_argument("--model", help="model bundle: where --calibrate stores threshold.json")
    p.add_argument(
        "--calibrate",
        choices=["percentile", "youden", "f1"],
        help="calibrate on the val split (percentile of healthy scores, Youden's J or best F1)",
    )
    p.add_argument("--percentile", type=float, default=99.0, help="healthy percentile (99)")
    p.add_argument(
        "--level",
        choices=["patch", "volume", "subject", "pixel"],
        default="patch",
        help="pixel: pixel AUROC, AUPRO and lesion detection of the maps (score.save_maps) "
        "against the manifest's masks (default: %(default)s)",
    )
    p.add_argument(
        "--maps", nargs="+", help="--level pixel: map table(s) (default: maps/ beside --scores)"
    )
    p.add_argument("--manifest", help="--level pixel: the cohort manifest (its masks)")
    p.add_argument(
        "--smooth",
        type=float,
        default=0.0,
        metavar="SIGMA",
        help="--level pixel: smooth every method's maps with a Gaussian of SIGMA pixels (0: off)",
    )
    p.add_argument(
        "--standardize",
        action="store_true",
        help="--level pixel: score every method's maps against the healthy val pixels' residual "
        "at the same reconstructed gray value (standard scores), before smoothing",
    )
    p.add_argument("--aggregate", choices=["max", "mean"], default="max", help="patch -> volume")
    p.add_argument(
        "--split",
        default="test",
        help="split to evaluate; --level pixel takes several, e.g. val,test (default: %(default)s)",
    )
    p.add_argument(
        "--json", help="also write the full result (with ROC curves of at most 2,000 points) here"
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help="AUCs of every scoring key in the table side by side (mappings, Γ, λ, models)",
    )
    _add_key_options(p)

    p = command(
        "report",
        _report,
        "Pictures with an index page: ROC curves, score histograms, the top-k patches with G(z) "
        "and residuals, per-volume heat maps and en-face maps, t-SNE of D's features, and "
        "clusters of the most anomalous patches (marker discovery).",
    )
    p.add_argument("--scores", required=True, help="score table")
    p.add_argument("--out", required=True, help="report folder (PNGs + index.html)")
    p.add_argument("--patches", help="patch table (pixels for heat maps, top-k, t-SNE, markers)")
    p.add_argument("--model", help="model bundle (G(z) for top-k, D's features)")
    p.add_argument("--threshold", type=_threshold, help="a number or a threshold.json / bundle")
    p.add_argument("--split", default="test", help="split to report on (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=8, help="patches in the top-k figure")
    p.add_argument("--clusters", type=int, default=4, help="marker clusters (k-means)")
    p.add_argument("--manifest", help="cohort manifest: outline its masks on the B-scans shown")
    p.add_argument(
        "--bscans", type=int, default=3, help="most anomalous B-scans shown with their maps"
    )
    _add_key_options(p)

    p = command(
        "demo",
        _demo,
        "Run every stage end to end on the built-in synthetic cohort with a local Ray.",
    )
    p.add_argument("--out", default="demo-out", help="output folder (default: %(default)s)")
    _add_config_options(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    set_verbose(args.verbose or args.log_level == "DEBUG")  # Ray's own lines, or only its warnings
    for name in _CREDENTIAL_LOGGERS:  # their debug lines print signed request headers
        logging.getLogger(name).setLevel(max(logging.getLogger(name).level, logging.INFO))
    try:
        summary = args.func(args)
    except ConfigError as err:
        print(f"anogan-ray {args.command}: configuration error: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:  # bad input: say what, without a traceback
        log.debug("details", exc_info=True)
        print(f"anogan-ray {args.command}: error: {err}", file=sys.stderr)
        return 2
    if summary is not None:  # for scripts: indented on a terminal, one line in a log or a pipe
        indent = 2 if sys.stdout.isatty() else None
        print(json.dumps(summary, indent=indent, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
