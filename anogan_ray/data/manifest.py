"""Write a cohort manifest (DESIGN.md §3.1) for a folder of scans: ``anogan-ray manifest``.

The folder (local or ``s3://``) is walked recursively, and every scan found is read once with
:func:`anogan_ray.data.volumes.read_scan`: that proves preprocess can read it and gives the
A-scan spacing where the file states one. What is a scan:

* every file whose suffix :func:`~anogan_ray.data.volumes.scan_format` knows (``.npy``, TIFF,
  PNG / JPEG, HEYEX ``.vol`` / ``.e2e`` / ``.xml``, Duke ``.mat``, DICOM, Topcon, Zeiss);
* a RETOUCH case folder (one holding ``oct.mhd``) is one scan; its files are not listed apart;
* a HEYEX XML export (an ``.xml`` whose root is ``<HEDX``) owns the images in its folder;
* one image is one row (the class-folder layout of the public sets, e.g. Kermany's
  ``OCT2017/train/NORMAL/NORMAL-1016042-1.jpeg``); with ``bscan_folders`` every leaf folder
  holding only images is one volume instead;
* masks are not scans: a file named ``*_mask.*`` or lying in a folder whose name contains
  ``mask``. A scan ``X.npy`` takes as its ``mask_path`` the mask ``X_mask.*`` beside it, else
  ``*mask*/X.*`` in a folder beside its own (the phantom's ``volumes/`` + ``masks/``) or in its
  own; a mask without its scan is listed as skipped;
* files of other suffixes (``.txt``, ``.csv``, RETOUCH's ``.raw`` outside a case, ...) and hidden
  files (``.name``) are not scans: counted per suffix as ``ignored``, not listed one by one.

Columns: ``subject_id`` and ``volume_id`` come from the path relative to the folder, through the
``pattern``'s named groups ``subject`` (and ``volume``) when one is given (a path it does not match
is skipped), else the file's stem (a folder's name) and the relative path without suffix, ``/``
written ``__``. ``spacing_x_um`` is the file's, else the ``spacing_x_um`` given, else empty (for
OCT a warning: preprocess rejects such rows). ``label`` comes from the nearest enclosing folder
named in ``label_from_folder`` (case-insensitive; a scan under none is skipped).

Splits are by subject: subjects, sorted, are shuffled with ``numpy.random.default_rng(seed)`` and
cut by the split fractions, so the same files and seed give the same manifest. With
``train_healthy_only`` (on by default when labels are known, as is common practice for anomaly
detection, where the model learns healthy anatomy) a subject with any label-1 volume never goes
to ``train``: healthy subjects are cut by all three fractions, the others between ``val`` and
``test`` in proportion. Folders named ``train`` / ``val`` / ``test`` decide the split only with
``split_from_folder`` (then label-1 subjects a ``train`` folder holds go to ``val`` under
``train_healthy_only``).
"""

from __future__ import annotations

import collections
import io
import logging
import os
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from anogan_ray import storage
from anogan_ray.data import vendor, volumes

log = logging.getLogger(__name__)

COLUMNS = volumes.REQUIRED_COLUMNS + volumes.OPTIONAL_COLUMNS  # DESIGN.md §3.1's order
DEFAULT_SPLIT = {"train": 0.8, "val": 0.1, "test": 0.1}
LISTED = 50  # skipped paths listed in the printed report


@dataclass
class _Candidate:
    """A scan found by the walk, before it is read."""

    url: str  # file, or folder for RETOUCH / B-scan folders
    relative: str  # path relative to the walked folder, with "/"
    is_folder: bool = False
    mask_url: str | None = None

    @property
    def default_ids(self) -> tuple[str, str]:
        """subject_id and volume_id without a pattern: the stem (a folder's name) and the
        relative path without suffix, ``/`` written ``__``."""
        if self.is_folder:
            return posixpath.basename(self.relative), self.relative.replace("/", "__")
        stem, relative = _stem(self.relative), posixpath.splitext(self.relative)[0]
        return stem, relative.replace("/", "__")


def parse_assignments(text: str, what: str) -> dict[str, str]:
    """``"A=1,B=2"`` as ``{"A": "1", "B": "2"}``.

    Raises:
        ValueError: an item without ``=`` or an empty name, naming ``what`` (e.g. ``--split``).
    """
    pairs = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"{what}: {item!r} is not NAME=VALUE (e.g. {what} A=0,B=1)")
        pairs[name.strip()] = value.strip()
    if not pairs:
        raise ValueError(f"{what}: empty (expected NAME=VALUE,...)")
    return pairs


def parse_labels(text: str) -> dict[str, int]:
    """``--label-from-folder NORMAL=0,DME=1`` as ``{"NORMAL": 0, "DME": 1}``."""
    labels = parse_assignments(text, "--label-from-folder")
    bad = {name: value for name, value in labels.items() if value not in ("0", "1")}
    if bad:
        name, value = next(iter(bad.items()))
        raise ValueError(f"--label-from-folder: label {value!r} of {name!r} is not 0 or 1")
    return {name: int(value) for name, value in labels.items()}


def parse_split(text: str) -> dict[str, float]:
    """``--split train=0.8,val=0.1,test=0.1`` as fractions (checked by :func:`build_manifest`)."""
    fractions = {}
    for name, value in parse_assignments(text, "--split").items():
        try:
            fractions[name] = float(value)
        except ValueError:
            raise ValueError(f"--split: {name}={value!r} is not a number") from None
    return fractions


def _checked_split(split: dict[str, float]) -> dict[str, float]:
    unknown = [name for name in split if name not in volumes.SPLITS]
    if unknown:
        raise ValueError(f"split {unknown[0]!r} unknown; use {', '.join(volumes.SPLITS)}")
    if any(not 0 <= f <= 1 for f in split.values()) or abs(sum(split.values()) - 1) > 1e-6:
        raise ValueError(f"split fractions must lie in [0, 1] and sum to 1, got {split}")
    return {name: float(split.get(name, 0.0)) for name in volumes.SPLITS}


def _checked_pattern(pattern: str | None) -> re.Pattern | None:
    if pattern is None:
        return None
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"pattern {pattern!r} is not a regular expression ({exc})") from exc
    if "subject" not in compiled.groupindex:
        raise ValueError(f"pattern {pattern!r} has no named group (?P<subject>...)")
    return compiled


# ---------------------------------------------------------------------------------------------
# The walk: which files and folders are scans
# ---------------------------------------------------------------------------------------------


def _stem(url: str) -> str:
    return posixpath.splitext(posixpath.basename(url.rstrip("/")))[0]


def _is_mask(relative: str, is_folder: bool = False) -> bool:
    """A mask by convention: ``*_mask.*``, or in a folder whose name contains ``mask``."""
    parts = relative.lower().split("/")
    if is_folder:
        return any("mask" in part for part in parts)
    return _stem(parts[-1]).endswith("_mask") or any("mask" in part for part in parts[:-1])


def _is_heyex_export(url: str) -> bool:
    with storage.open_file(url, "rb") as f:
        return b"<HEDX" in f.read(4096)


def _find_scans(
    root: str, files: list[str], bscan_folders: bool
) -> tuple[list[_Candidate], list[dict[str, str]], dict[str, int]]:
    """The scans under ``root`` (sorted by relative path), the masks that match no scan (as
    skipped entries) and the files that are no scan, counted per suffix."""

    def relative(url: str) -> str:
        return url[len(root) + 1 :] if url != root else posixpath.basename(root)

    ignored: collections.Counter[str] = collections.Counter()
    by_folder: dict[str, list[str]] = collections.defaultdict(list)
    for url in files:
        if any(part.startswith(".") for part in relative(url).split("/")):
            ignored["(hidden)"] += 1
        else:
            by_folder[posixpath.dirname(url)].append(url)

    # Folders that are one scan (RETOUCH cases; B-scan folders when asked), and HEYEX XML
    # exports, which own the images beside them
    candidates, owned = [], set()
    for folder, names in by_folder.items():
        if any(posixpath.basename(url) == "oct.mhd" for url in names):
            candidates.append(_Candidate(folder, relative(folder), is_folder=True))
            for other, other_names in by_folder.items():  # the case's files, subfolders too
                if other == folder or other.startswith(folder + "/"):
                    owned.update(other_names)
        elif any(url.lower().endswith(".xml") and _is_heyex_export(url) for url in names):
            owned.update(url for url in names if url.lower().endswith(vendor.IMAGE_SUFFIXES))
    if bscan_folders:
        above = {posixpath.dirname(folder) for folder in by_folder}
        for folder in list(above):  # every ancestor up to root holds a folder
            while folder.startswith(root + "/"):
                folder = posixpath.dirname(folder)
                above.add(folder)
        for folder, names in by_folder.items():
            if (
                folder not in above
                and all(url.lower().endswith(vendor.IMAGE_SUFFIXES) for url in names)
                and not _is_mask(relative(folder), is_folder=True)
                and owned.isdisjoint(names)
            ):
                candidates.append(_Candidate(folder, relative(folder), is_folder=True))
                owned.update(names)

    # Masks, found by folder and stem: beside the scan (X_mask.*), or in a *mask* folder beside
    # the scan's folder (volumes/X.npy + masks/X.npy) or in it (X.npy + masks/X.npy)
    visible = [url for names in by_folder.values() for url in names if url not in owned]
    masks = {url for url in visible if _is_mask(relative(url))}
    beside: dict[tuple[str, str], str] = {}
    in_mask_folder: dict[tuple[str, str], str] = {}
    for url in sorted(masks):
        if not url.lower().endswith(volumes.VOLUME_SUFFIXES):
            continue
        folder, stem = posixpath.dirname(url), _stem(url)
        if stem.lower().endswith("_mask"):
            beside.setdefault((folder, stem[: -len("_mask")]), url)
        else:
            in_mask_folder.setdefault((posixpath.dirname(folder), stem), url)

    for url in visible:
        if url in masks:
            continue
        if volumes.scan_format(url) is None:
            ignored[posixpath.splitext(url)[1].lower() or "(no suffix)"] += 1
            continue
        folder, stem = posixpath.dirname(url), _stem(url)
        mask = (
            beside.get((folder, stem))
            or in_mask_folder.get((posixpath.dirname(folder), stem))  # volumes/X + masks/X
            or in_mask_folder.get((folder, stem))  # X + masks/X
        )
        candidates.append(_Candidate(url, relative(url), mask_url=mask))

    used = {candidate.mask_url for candidate in candidates}
    skipped = [
        {"path": relative(url), "reason": "a mask (by its name) that belongs to no scan"}
        for url in sorted(masks - used)
    ]
    return sorted(candidates, key=lambda c: c.relative), skipped, dict(sorted(ignored.items()))


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


def _cut(
    subjects: list[str], fractions: dict[str, float], rng: np.random.Generator
) -> dict[str, str]:
    """Shuffle ``subjects`` and cut them by ``fractions`` (in the order train, val, test)."""
    bounds = np.rint(np.cumsum([fractions[s] for s in volumes.SPLITS]) * len(subjects))
    order = rng.permutation(len(subjects))
    return {
        subjects[index]: volumes.SPLITS[min(int(np.searchsorted(bounds, rank, "right")), 2)]
        for rank, index in enumerate(order)
    }


def _split_subjects(
    labels_by_subject: dict[str, set], fractions: dict[str, float], seed: int, healthy_only: bool
) -> dict[str, str]:
    rng = np.random.default_rng(seed)
    subjects = sorted(labels_by_subject)
    if not healthy_only:
        return _cut(subjects, fractions, rng)
    sick = [s for s in subjects if 1 in labels_by_subject[s]]
    healthy = [s for s in subjects if 1 not in labels_by_subject[s]]
    held_out = fractions["val"] + fractions["test"]
    if sick and held_out == 0:
        raise ValueError(
            f"{len(sick)} subject(s) have label 1, which train_healthy_only keeps out of train, "
            "but the split gives val and test nothing (give them a fraction, or turn "
            "train_healthy_only off: --no-train-healthy-only)"
        )
    split_of = _cut(healthy, fractions, rng)
    if sick:
        share = {
            "train": 0.0,
            "val": fractions["val"] / held_out,
            "test": fractions["test"] / held_out,
        }
        split_of |= _cut(sick, share, rng)
    return split_of


def _assign_splits(
    rows: list[dict[str, Any]],
    fractions: dict[str, float],
    seed: int,
    healthy_only: bool,
    from_folder: bool,
) -> list[str]:
    """Fill each row's ``split`` by subject (or keep its folder's); returns warnings."""
    labels_by_subject: dict[str, set] = collections.defaultdict(set)
    for row in rows:
        labels_by_subject[row["subject_id"]].add(row["label"])
    if not from_folder:
        split_of = _split_subjects(labels_by_subject, fractions, seed, healthy_only)
        for row in rows:
            row["split"] = split_of[row["subject_id"]]
        return []
    warnings = []
    moved = 0
    for row in rows:
        if healthy_only and row["split"] == "train" and 1 in labels_by_subject[row["subject_id"]]:
            row["split"], moved = "val", moved + 1
    if moved:
        warnings.append(
            f"{moved} volume(s) of subjects with label 1 lie in a train folder and "
            "went to val (train_healthy_only)"
        )
    splits_by_subject = collections.defaultdict(set)
    for row in rows:
        splits_by_subject[row["subject_id"]].add(row["split"])
    mixed = sorted(subject for subject, found in splits_by_subject.items() if len(found) > 1)
    if mixed:
        warnings.append(
            f"{len(mixed)} subject(s) have volumes in several split folders, e.g. "
            f"{', '.join(mixed[:5])}"
        )
    return warnings


def _nearest_folder(candidate: _Candidate, names: dict[str, Any]) -> Any:
    """The value in ``names`` of the nearest folder enclosing the scan (a folder scan counts
    itself), names compared case-insensitively; None when no enclosing folder is named."""
    lowered = {name.lower(): value for name, value in names.items()}
    folders = candidate.relative.split("/")
    for folder in reversed(folders if candidate.is_folder else folders[:-1]):
        if folder.lower() in lowered:
            return lowered[folder.lower()]
    return None


# ---------------------------------------------------------------------------------------------
# The manifest
# ---------------------------------------------------------------------------------------------


def _row(
    candidate: _Candidate,
    pattern: re.Pattern | None,
    labels: dict[str, int],
    split_from_folder: bool,
    modality: str,
) -> dict[str, Any] | str:
    """The manifest row that the scan's path gives (split and spacing may still be open), or
    the reason the scan is skipped."""
    subject, volume_id = candidate.default_ids
    if pattern is not None:
        match = pattern.search(candidate.relative)
        if match is None or not match.group("subject"):
            return f"does not match the pattern '{pattern.pattern}'"
        subject = match.group("subject")
        volume_id = match.groupdict().get("volume") or volume_id
    label = _nearest_folder(candidate, labels)
    if labels and label is None:
        return f"under no folder named {', '.join(labels)}"
    split = None
    if split_from_folder:
        split = _nearest_folder(candidate, {name: name for name in volumes.SPLITS})
        if split is None:
            return f"under no folder named {', '.join(volumes.SPLITS)}"
    return {"subject_id": subject, "volume_id": volume_id, "path": candidate.url,
            "modality": modality, "split": split, "spacing_x_um": None, "label": label,
            "mask_path": candidate.mask_url}  # fmt: skip


def _probe(url: str) -> tuple[str, float | None] | str:
    """Read one scan: its format and the spacing its file states, or why it cannot be used."""
    try:
        scan = volumes.read_scan(url)
    except volumes.VolumeError as exc:
        return " ".join(str(exc).split())  # libraries' messages may span lines
    return scan.format, scan.spacing_x_um


def _probe_all(urls: list[str], threads: int) -> list[tuple[str, float | None] | str]:
    """:func:`_probe` every scan, ``threads`` at once (object-storage latency overlaps)."""
    probes = []
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for done, probe in enumerate(pool.map(_probe, urls), start=1):
            probes.append(probe)
            if len(urls) >= 100 and done % (len(urls) // 10) == 0:  # every tenth
                log.info("read %d / %d scan(s)", done, len(urls))
    return probes


def _manifest_path(url: str, out_folder: str) -> str:
    """``url`` relative to the manifest's folder when both are local and it lies under it."""
    if storage.is_remote(url) or storage.is_remote(out_folder):
        return url
    if url.startswith(out_folder.rstrip("/") + "/"):
        return os.path.relpath(url, out_folder)
    return url


def _write(out: str, rows: list[dict[str, Any]]) -> None:
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    frame["spacing_x_um"] = frame["spacing_x_um"].astype("float64")
    frame["label"] = frame["label"].astype("Int64")
    buffer = io.BytesIO()
    if out.lower().endswith(".parquet"):
        frame.to_parquet(buffer, index=False)
    else:
        frame.to_csv(buffer, index=False)
    storage.write_bytes(out, buffer.getvalue())


def build_manifest(
    root: str,
    out: str,
    *,
    pattern: str | None = None,
    label_from_folder: dict[str, int] | None = None,
    split: dict[str, float] | None = None,
    split_from_folder: bool = False,
    train_healthy_only: bool | None = None,
    seed: int = 0,
    modality: str = "oct",
    spacing_x_um: float | None = None,
    bscan_folders: bool = False,
    threads: int = 4,
) -> dict[str, Any]:
    """Walk ``root``, read every scan and write the manifest ``out`` (see the module docstring).

    Args:
        root: folder of scans, local or ``s3://``.
        out: the manifest, ``*.csv`` or ``*.parquet`` (local or ``s3://``); ``path`` is written
            relative to its folder for local scans under it, else absolute.
        pattern: regular expression with the named group ``subject`` (optionally ``volume``),
            searched in each scan's path relative to ``root``.
        label_from_folder: folder name -> label 0/1; scans under none of them are skipped.
        split: fractions of subjects per split, summing to 1 (default 0.8 / 0.1 / 0.1).
        split_from_folder: folders named train / val / test decide the split (``split`` unused).
        train_healthy_only: keep subjects with a label-1 volume out of ``train`` (default: on
            when ``label_from_folder`` is given).
        seed: seeds the shuffle of subjects.
        modality: ``oct`` or ``image``, for every row.
        spacing_x_um: A-scan spacing for scans whose file states none.
        bscan_folders: a leaf folder holding only images is one volume (not one row per image).
        threads: scans read at once (overlaps object-storage latency).

    Returns:
        The report: counts per format, split, label and spacing source, the skipped paths with
        their reasons, the ignored files per suffix and warnings.

    Raises:
        ValueError: a bad option, or no scan found under ``root``.
        FileNotFoundError: ``root`` does not exist.
    """
    if modality not in volumes.MODALITIES:
        raise ValueError(f"modality {modality!r} unknown; use {', '.join(volumes.MODALITIES)}")
    if spacing_x_um is not None and not spacing_x_um > 0:
        raise ValueError(f"spacing_x_um {spacing_x_um} is not a positive number")
    fractions = _checked_split(DEFAULT_SPLIT if split is None else split)
    compiled = _checked_pattern(pattern)
    labels = label_from_folder or {}
    healthy_only = bool(labels) if train_healthy_only is None else train_healthy_only

    fs, path = storage.filesystem(root)
    root = f"s3://{path}" if storage.is_remote(root) else path
    if not fs.isdir(path):
        raise FileNotFoundError(f"{root}: no such folder")
    candidates, skipped, ignored = _find_scans(root, storage.list_files(root), bscan_folders)

    # Rows from the paths: what the pattern, the label or split folders do not cover is skipped
    # unread; then every scan is read once
    found = []
    for candidate in candidates:
        row = _row(candidate, compiled, labels, split_from_folder, modality)
        if isinstance(row, str):
            skipped.append({"path": candidate.relative, "reason": row})
        else:
            found.append((row, candidate))
    log.info("reading %d scan(s) under %s", len(found), root)
    probes = _probe_all([candidate.url for _, candidate in found], threads)

    readable, formats, spacing_sources = [], collections.Counter(), collections.Counter()
    first_of: dict[str, str] = {}  # volume_id -> the path that has it
    overridden = []  # files whose spacing differs from the one given
    for (row, candidate), probe in zip(found, probes):
        if isinstance(probe, str):
            skipped.append({"path": candidate.relative, "reason": probe})
            continue
        if row["volume_id"] in first_of:
            reason = (
                f"volume_id {row['volume_id']!r} is already that of {first_of[row['volume_id']]}"
            )
            skipped.append({"path": candidate.relative, "reason": reason})
            continue
        first_of[row["volume_id"]] = candidate.relative
        fmt, file_spacing = probe
        formats[fmt] += 1
        if file_spacing is not None:  # the file's spacing wins; preprocess checks it anyway
            row["spacing_x_um"] = round(file_spacing, 4)
            spacing_sources["file"] += 1
            if spacing_x_um is not None and abs(spacing_x_um - file_spacing) > 0.01 * file_spacing:
                overridden.append(f"{candidate.relative} ({file_spacing:.4g} µm)")
        elif spacing_x_um is not None:
            row["spacing_x_um"] = spacing_x_um
            spacing_sources["given"] += 1
        else:
            spacing_sources["missing"] += 1
        readable.append(row)
    if not readable:
        seen = f"ignored: {', '.join(f'{k}={v}' for k, v in ignored.items()) or 'nothing'}"
        if skipped:
            seen = f"{len(skipped)} skipped, e.g. {skipped[0]['path']}: {skipped[0]['reason']}"
        raise ValueError(f"{root}: no usable scan found ({seen})")

    warnings = []
    if overridden:
        warnings.append(
            f"{len(overridden)} file(s) state a spacing more than 1 % from the "
            f"{spacing_x_um:g} µm given, and theirs is written: {', '.join(overridden[:5])}"
        )
    missing = [row["volume_id"] for row in readable if row["spacing_x_um"] is None]
    if modality == "oct" and missing:
        warnings.append(
            f"{len(missing)} oct volume(s) without spacing_x_um (the file states none; give "
            f"--spacing-x-um): preprocess will reject them, e.g. {', '.join(missing[:5])}"
        )
    warnings += _assign_splits(readable, fractions, seed, healthy_only, split_from_folder)

    out_folder = storage.parent(out)
    for row in readable:
        row["path"] = _manifest_path(row["path"], out_folder)
        if row["mask_path"]:
            row["mask_path"] = _manifest_path(row["mask_path"], out_folder)
    _write(out, readable)
    volumes.read_manifest(out)  # what this writes, preprocess accepts

    labels_found = collections.Counter(
        "unlabelled" if r["label"] is None else str(r["label"]) for r in readable
    )
    return {
        "root": root,
        "out": out,
        "volumes": len(readable),
        "subjects": len({row["subject_id"] for row in readable}),
        "formats": dict(sorted(formats.items())),
        "splits": {s: sum(row["split"] == s for row in readable) for s in volumes.SPLITS},
        "subjects_per_split": {
            s: len({row["subject_id"] for row in readable if row["split"] == s})
            for s in volumes.SPLITS
        },
        "labels": dict(sorted(labels_found.items())),
        "spacing": {source: spacing_sources[source] for source in ("file", "given", "missing")},
        "masks": sum(bool(row["mask_path"]) for row in readable),
        "skipped": sorted(skipped, key=lambda s: s["path"]),
        "ignored": ignored,
        "warnings": warnings,
    }


def format_report(report: dict[str, Any]) -> str:
    """The report of :func:`build_manifest` as plain text for a person."""

    def counts(values: dict) -> str:
        return ", ".join(f"{k}={v}" for k, v in values.items()) or "none"

    splits = ", ".join(
        f"{s}={report['splits'][s]}/{report['subjects_per_split'][s]}" for s in volumes.SPLITS
    )
    lines = [
        f"{report['out']}: {report['volumes']} volume(s) of {report['subjects']} subject(s) "
        f"from {report['root']}",
        f"  formats: {counts(report['formats'])}",
        f"  splits (volumes / subjects): {splits}",
        f"  labels: {counts(report['labels'])}",
        f"  spacing_x_um: {counts(report['spacing'])}",
        f"  masks: {report['masks']}",
        f"  ignored (not a scan format): {counts(report['ignored'])}",
        f"skipped: {len(report['skipped'])}",
    ]
    lines += [f"  {s['path']}: {s['reason']}" for s in report["skipped"][:LISTED]]
    if len(report["skipped"]) > LISTED:
        lines.append(f"  and {len(report['skipped']) - LISTED} more")
    if report["warnings"]:
        lines.append(f"warnings: {len(report['warnings'])}")
        lines += [f"  {w}" for w in report["warnings"]]
    return "\n".join(lines)
