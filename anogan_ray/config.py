"""Configuration: one dataclass per stage, built from one YAML section each.

A run's configuration is a preset (``tiny``, ``demo``, ``paper``; YAML files in
``anogan_ray/presets``) or a YAML file of the same shape, plus ``section.key=value``
overrides from the command line. Unknown sections or keys and invalid values raise
:class:`ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRESETS = ("tiny", "demo", "paper")


class ConfigError(ValueError):
    """A configuration key or value that cannot be used."""


def _choices(*allowed: Any, default: Any) -> Any:
    return field(default=default, metadata={"choices": allowed})


def _positive(default: Any) -> Any:
    return field(default=default, metadata={"min": 0, "exclusive": True})


def _at_least(minimum: float, default: Any) -> Any:
    return field(default=default, metadata={"min": minimum})


def _auto_or_bool(default: Any = "auto") -> Any:
    return field(default=default, metadata={"auto_or_bool": True})


def _unit(default: float) -> Any:
    return field(default=default, metadata={"min": 0.0, "max": 1.0})


@dataclass
class PhantomConfig:
    """The synthetic OCT cohort (``anogan-ray phantom``)."""

    healthy_subjects: int = _at_least(0, 6)  # subjects with no pathology
    pathological_subjects: int = _at_least(0, 4)  # subjects with a mix of pathologies
    volumes_per_subject: int = _at_least(1, 1)  # eyes / visits per subject
    bscans_per_volume: int = _at_least(1, 9)  # B-scans per volume (the central ones show the fovea)
    height: int = _at_least(128, 496)  # pixels along z (depth), like Spectralis
    width: int = _at_least(64, 512)  # A-scans per B-scan, like Spectralis
    spacing_x_um: float = _positive(11.5)  # A-scan spacing; resampled to 22 µm this is ~256 columns
    speckle_looks: float = _positive(4.0)  # gamma shape of the speckle: 1 = one raw frame; higher
    # = averaged frames, as Spectralis' ART averaging (the paper's data) gives
    pathology_burden: float = _positive(1.0)  # scales the number and size of lesions
    pathologies: list[str] = field(
        default_factory=lambda: ["intraretinal_fluid", "subretinal_fluid", "foci", "drusen"],
        metadata={
            "each_of": ("intraretinal_fluid", "subretinal_fluid", "foci", "drusen"),
        },
    )  # the lesion types pathological subjects draw from
    volume_format: str = _choices("npy", "tiff", default="npy")  # how volumes are written
    write_png_bscans: bool = False  # also write every B-scan as a PNG (public-dataset layout)
    val_fraction: float = _unit(0.2)  # share of healthy subjects put in `val`
    seed: int = 0  # the same seed writes the same bytes


@dataclass
class PreprocessConfig:
    """Manifest -> patch table (``anogan-ray preprocess``)."""

    target_spacing_um: float = _positive(22.0)  # resample OCT along x to this A-scan spacing
    patch_size: int = _choices(64, default=64)  # the paper's 64 x 64 patches
    patches_per_bscan: int = _at_least(1, 16)  # train split: K random patches centred in the retina
    grid_stride: int = _at_least(1, 32)  # val/test splits: grid stride covering the whole retina
    retina_margin: int = _at_least(0, 8)  # pixels kept above the ILM and below the RPE
    rows_per_file: int = _at_least(1, 50_000)  # Parquet rows per output file (upper bound)
    seed: int = 0  # random patch positions depend only on this and the patch's B-scan
    # ILM / BM for flattening: the file's layer segmentation when it has one (auto), ours (own),
    # or the file's and reject volumes without one (file)
    segmentation: str = _choices("auto", "own", "file", default="auto")


@dataclass
class ModelConfig:
    """The DCGAN (paper: channels 512-256-128-64, 5 x 5 filters, 64 x 64 patches)."""

    latent_dim: int = _at_least(1, 100)  # size of z
    base_channels: int = _at_least(1, 64)  # D: base, 2x, 4x, 8x; G mirrors it (paper: 64)
    kernel_size: int = _choices(4, 5, default=5)  # paper: 5 x 5 filters
    image_size: int = _choices(64, default=64)  # patch side in pixels
    latent_prior: str = _choices("normal", "uniform", default="normal")  # distribution of z
    d_norm: str = _choices("batch", "spectral", "layer", default="batch")  # D's normalization:
    # BatchNorm (DCGAN, the paper), spectral norm on every layer and no BatchNorm (SN-GAN), or
    # LayerNorm (a WGAN-GP critic, f-AnoGAN); E and the aCAE keep BatchNorm whatever this says


@dataclass
class TrainConfig:
    """Adversarial training with Ray Train (``anogan-ray train``)."""

    epochs: int = _at_least(1, 20)  # passes over the training patches (reviews report 20)
    batch_size: int = _at_least(1, 64)  # per worker
    lr_generator: float = _positive(2e-4)  # Adam learning rate of G
    lr_discriminator: float = _positive(2e-4)  # Adam learning rate of D
    beta1: float = _unit(0.5)  # Adam beta1, as in DCGAN
    beta2: float = _unit(0.999)  # Adam beta2 (WGAN-GP and f-AnoGAN: beta1 0, beta2 0.9)
    objective: str = _choices("gan", "wgan-gp", default="gan")  # the GAN's loss: eq. (1) of the
    # paper, or f-AnoGAN's WGAN-GP (needs model.d_norm spectral or layer: no BatchNorm in D)
    n_critic: int = _at_least(1, 5)  # wgan-gp: D (critic) updates per G update
    gradient_penalty: float = _at_least(0.0, 10.0)  # wgan-gp: weight of the gradient penalty
    num_workers: int = _at_least(1, 1)  # DDP workers
    use_gpu: bool = False  # one GPU per worker (NCCL) instead of CPU (gloo)
    checkpoint_every: int = _at_least(1, 200)  # steps between checkpoints
    max_steps: int = _at_least(0, 0)  # stop after this many steps (0: no limit)
    run_name: str = "anogan"  # re-running with the same name resumes
    max_failures: int = _at_least(0, 2)  # worker failures tolerated (restart from checkpoint)
    seed: int = 0
    batchnorm_samples: int = _at_least(1, 4096)  # z draws / real patches for final BN statistics
    encoder: bool = True  # also train f-AnoGAN's encoder E after the GAN (fast mappings)
    encoder_epochs: int = _at_least(0, 0)  # passes of the encoder's training (0: train.epochs)
    baselines: bool = True  # also train the aCAE and fit PCA (the paper's Table 1 baselines)
    pca_components: int = _at_least(1, 8)  # components of the PCA baseline
    precision: str = _choices("fp32", "bf16", default="fp32")  # bf16: every training step's
    # forward and backward passes under bfloat16 autocast (weights, optimizer states and the
    # exported bundle stay fp32)


@dataclass
class ScoreConfig:
    """Latent inversion and anomaly scores (``anogan-ray score``)."""

    lambda_: float = _unit(0.1)  # weight of the discrimination loss, eqs. (5) and (6)
    steps: int = _at_least(0, 500)  # Γ: optimization steps on z (none with mapping "encoder")
    mapping: str = _choices(
        "iterative", "encoder", "encoder+iterative", default="iterative"
    )  # z_1 from the patch id's seed (the paper) or E(x) (f-AnoGAN), then Γ steps
    z_lr: float = _positive(0.01)  # Adam learning rate of z (the paper does not give one)
    batch_size: int = _at_least(1, 64)  # patches per scoring call on CPU (scores do not depend
    # on it); on CUDA rounded up to a multiple of the largest fixed-shape batch of the mapping
    num_actors: int = _at_least(0, 0)  # scoring actors (0: one per GPU, or per CPU)
    reference_score: bool = False  # also run the GAN_R mapping (Yeh et al. discrimination loss)
    save_z: bool = False  # keep the final z in the score table
    splits: list[str] = field(
        default_factory=lambda: ["val", "test"], metadata={"each_of": ("train", "val", "test")}
    )  # which splits of the patch table to score
    device: str = _choices("auto", "cpu", "cuda", default="auto")  # where inversion runs; auto:
    # GPUs whenever the cluster has or its autoscaler can add them, else CPU
    gpu_wait_s: float = _positive(600.0)  # how long a GPU job waits for the autoscaler's first GPU
    precision: str = _choices("auto", "fp32", "tf32", "bf16", default="auto")  # arithmetic of
    # the Γ mapping steps: auto is bf16 on CUDA and fp32 on CPU; true fp32, TF32 (CUDA) or
    # bfloat16; scores at z_Γ always in fp32; a fast one is checked against fp32 on the first
    # batch and switched off beyond tolerance
    compile: bool | str = _auto_or_bool()  # torch.compile the mapping step: auto compiles on
    # CUDA when each actor has enough patches to repay the compilation, never on CPU; a failure
    # at compile or run time maps eagerly (the batch is redone)
    cuda_graph: bool = True  # on CUDA, capture the whole Γ step (G, D, backward, z's Adam update)
    # once per fixed shape and replay it; eager if capturing fails
    channels_last: bool | str = _auto_or_bool()  # the mapping steps' G and D in channels_last
    # memory format: auto is on on CUDA, off on CPU (where on gave 7-13 % more patches/s on a
    # 2-core AVX-512 CPU: true to have it, at scores that differ from fp32's in the last bits)
    save_maps: bool = False  # also write the map table: each method's residual stitched onto
    # every scored B-scan (DESIGN.md §3.4a)
    rows_per_file: int = _at_least(1, 10_000)  # score-table rows per file
    flush_s: float = _positive(60.0)  # staged results land at least this often (seconds), so a
    # kill loses at most about this much work per actor


@dataclass
class TuneConfig:
    """Hyperparameter sweep with Ray Tune (``anogan-ray tune``)."""

    num_samples: int = _at_least(1, 8)  # trials
    lr_generator: list[float] = field(default_factory=lambda: [1e-4, 1e-3])  # log-uniform range
    lr_discriminator: list[float] = field(default_factory=lambda: [1e-4, 1e-3])  # log-uniform
    lambdas: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.3])  # grid over λ
    scheduler: str = _choices("asha", "fifo", default="asha")  # ASHA stops weak trials early
    grace_period: int = _at_least(1, 1)  # epochs before ASHA may stop a trial
    max_concurrent: int = _at_least(1, 2)  # trials at once (fewer when the CPUs / GPUs are fewer)
    gpus_per_trial: float | str = "auto"  # GPUs each trial takes: auto is one per DDP worker
    # (one per `tune --model` trial) when the cluster has or can get GPUs, else none; a number
    # (fractions too: 0.25 puts four one-worker trials on a GPU) or 0 (CPUs only)
    z_lr: list[float] = field(default_factory=list)  # choices of z's Adam rate ([]: score.z_lr)
    steps: list[int] = field(default_factory=list)  # choices of inversion steps ([]: score.steps)
    mappings: list[str] = field(default_factory=list)  # `tune --model`: mappings swept ([]: all
    # the bundle can run)
    auc_tolerance: float = _at_least(0.0, 0.01)  # `tune --model`: the cheapest setting within
    # this much of the best objective is recommended
    reduction_factor: float = _at_least(2, 3)  # ASHA keeps the best 1/reduction_factor per rung
    objective: str = _choices(
        "auto", "labels", "synthetic", "cutpaste", "residual", "quality", "lesions", "cohort",
        "blend", default="auto",
    )  # fmt: skip
    # what ranks trials (anogan_ray/core/objectives.py): auto is labels when `val` holds
    # healthy and anomalous patches, else blend (cohort and synthetic) when it holds healthy
    # volumes (manifest label 0) and others, else synthetic (docs/tune.md: the measurements)
    val_patches: int = _at_least(2, 256)  # val patches inverted per evaluation (fixed subset)
    synthetic_patches: int = _at_least(0, 128)  # healthy val patches copied with an ellipse lesion
    cutpaste_patches: int = _at_least(0, 128)  # healthy val patches copied with a lesion drawn
    # from the data (CutPaste, another volume's tissue, another tissue's gray level)
    run_name: str = "sweep"  # re-running with the same name resumes the sweep
    seed: int = 0  # seeds the sampled learning rates and the evaluation set


@dataclass
class Config:
    """A whole run: one section per stage."""

    phantom: PhantomConfig = field(default_factory=PhantomConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_value(section: str, f: dataclasses.Field, value: Any) -> Any:
    key = f"{section}.{f.name}"
    expected = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if f.metadata.get("auto_or_bool"):
        if not isinstance(value, bool) and value != "auto":
            raise ConfigError(f"{key}: expected auto, true or false, got {value!r}")
        return value
    if expected == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
    elif expected == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
    elif expected == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        value = float(value)
    elif expected == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
    elif expected.startswith("list"):
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if expected == "list[float]":
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise ConfigError(f"{key}: expected a list of numbers, got {value!r}")
            value = [float(v) for v in value]
    meta = f.metadata
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(repr(c) for c in meta["choices"])
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {allowed}")
    if "each_of" in meta:
        bad = [v for v in value if v not in meta["each_of"]]
        if bad or not value:
            allowed = ", ".join(repr(c) for c in meta["each_of"])
            raise ConfigError(
                f"{key}: {bad or value!r} not allowed; use a non-empty list of {allowed}"
            )
    if "min" in meta:
        low = meta["min"]
        if value < low or (meta.get("exclusive") and value == low):
            relation = "greater than" if meta.get("exclusive") else "at least"
            raise ConfigError(f"{key}: {value!r} must be {relation} {low}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{key}: {value!r} must be at most {meta['max']}")
    return value


def _suggest_key(section: str, key: str) -> str:
    """What to say about an unknown ``section.key``: the closest key of the section (a typo) and
    the same key in another section, or else every key of the section."""
    sections = dataclasses.fields(Config)
    classes = {f.name: type(f.default_factory()) for f in sections}  # type: ignore[misc]
    keys = [f.name for f in dataclasses.fields(classes[section])]
    close = [f"{section}.{k}" for k in difflib.get_close_matches(str(key), keys, n=1)]
    elsewhere = [
        f"{other}.{key}"
        for other, cls in classes.items()
        if key in {f.name for f in dataclasses.fields(cls)}
    ]
    if close or elsewhere:
        return f"did you mean {' or '.join(close + elsewhere)}?"
    return f"allowed keys are {', '.join(sorted(keys))}"


def _build_section(name: str, cls: type, values: dict[str, Any]) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}: unknown key; {_suggest_key(name, unknown[0])}")
    instance = cls()
    for key, value in values.items():
        setattr(instance, key, _check_value(name, fields[key], value))
    for f in fields.values():  # defaults are checked too, so a bad preset fails loudly
        _check_value(name, f, getattr(instance, f.name))
    return instance


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build a :class:`Config` from a mapping ``{section: {key: value}}``."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    unknown = sorted(set(data) - set(sections))
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), list(sections), n=1)
        hint = (
            f"did you mean {close[0]}?" if close else "allowed sections are " + ", ".join(sections)
        )
        raise ConfigError(f"{unknown[0]}: unknown section; {hint}")
    built = {}
    for name, f in sections.items():
        cls = f.default_factory().__class__  # type: ignore[misc]
        built[name] = _build_section(name, cls, data.get(name) or {})
    if built["train"].objective == "wgan-gp" and built["model"].d_norm == "batch":
        raise ConfigError(
            "train.objective: 'wgan-gp' penalizes D's gradient per patch, which BatchNorm mixes "
            "across the batch; set model.d_norm to 'layer' (f-AnoGAN) or 'spectral'"
        )
    return Config(**built)


def _read_preset(name: str) -> dict[str, Any]:
    text = importlib.resources.files("anogan_ray").joinpath(f"presets/{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides; values are parsed as YAML (``0.1``, ``[a, b]``)."""
    data = {k: dict(v or {}) for k, v in data.items()}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(
                f"override {item!r}: expected section.key=value, e.g. score.steps=100"
            )
        dotted, raw = item.split("=", 1)
        section, key = dotted.split(".", 1)
        data.setdefault(section, {})[key] = yaml.safe_load(raw) if raw else ""
    return data


def load_config(preset_or_path: str = "demo", overrides: list[str] | None = None) -> Config:
    """Load a preset by name or a YAML file by path, then apply overrides.

    Args:
        preset_or_path: ``tiny``, ``demo``, ``paper`` or the path of a YAML file.
        overrides: ``section.key=value`` strings, applied in order.
    """
    if preset_or_path in PRESETS:
        data = _read_preset(preset_or_path)
    else:
        path = Path(preset_or_path)
        if not path.is_file():
            raise ConfigError(
                f"config {preset_or_path!r}: not a preset ({', '.join(PRESETS)}) nor a YAML file"
            )
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return config_from_dict(apply_overrides(data, overrides or []))
