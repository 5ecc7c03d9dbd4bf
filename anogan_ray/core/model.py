"""The model bundle of AnoGAN (DESIGN.md §3.3, §3.5): trained networks as files (no Ray).

The model bundle is a folder:
    config.json          architecture, normalization, training run and data fingerprint
    generator.pt         G's state dict (tensors only; loaded with ``weights_only=True``)
    discriminator.pt     D's state dict
    encoder.pt           optional: E's state dict (f-AnoGAN's fast mapping)
    acae.pt              optional: the aCAE baseline's state dict
    pca.npz              optional: the PCA baseline's mean and components (arrays only)
    bundle.json          sha256 of each file and ``model_id``, a hash over all of them

The networks are defined in :mod:`anogan_ray.core.networks` and the baselines in
:mod:`anogan_ray.core.baselines`, both below this module.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from anogan_ray import storage
from anogan_ray.config import ConfigError, ModelConfig, config_from_dict
from anogan_ray.core.baselines import AdversarialAutoencoder, PCABaseline
from anogan_ray.core.networks import Discriminator, Encoder, Generator

BUNDLE_FORMAT = 1
_BUNDLE_FILES = ("config.json", "generator.pt", "discriminator.pt")
ENCODER_FILE = "encoder.pt"  # optional member: the trained encoder E
QUALITY_FILE = "generative_quality.json"  # training's generative-quality record, per epoch
_BASELINE_FILES = {"acae": "acae.pt", "pca": "pca.npz"}  # optional members
_OPTIONAL_FILES = (ENCODER_FILE, *_BASELINE_FILES.values())  # in model_id order


class BundleError(ValueError):
    """A model bundle that is missing, tampered with or incompatible."""


# ---------------------------------------------------------------------------------------------
# Model bundle
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelBundle:
    """A frozen, trained (G, D) pair with its configuration and content hash."""

    generator: Generator
    discriminator: Discriminator
    model_config: ModelConfig
    metadata: dict[str, Any]  # training run id, data fingerprint, normalization, ...
    model_id: str
    baselines: dict[str, Any] = field(default_factory=dict)  # "acae" module, "pca" PCABaseline
    encoder: Encoder | None = None  # E, when the bundle has one (fast mappings)

    def to(self, device: Any) -> ModelBundle:
        self.generator.to(device)
        self.discriminator.to(device)
        if self.encoder is not None:
            self.encoder.to(device)
        if "acae" in self.baselines:
            self.baselines["acae"].to(device)
        return self


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _model_id(file_hashes: dict[str, str]) -> str:
    """A hash over G, D and the config, then every optional member present, in a fixed order."""
    names = [*_BUNDLE_FILES, *(n for n in _OPTIONAL_FILES if n in file_hashes)]
    joined = "".join(f"{name}:{file_hashes[name]};" for name in names)
    return _sha256(joined.encode())[:16]


def _state_bytes(module: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, buffer)
    return buffer.getvalue()


def save_bundle(
    url: str,
    generator: Generator,
    discriminator: Discriminator,
    model_cfg: ModelConfig,
    metadata: dict[str, Any] | None = None,
    baselines: dict[str, Any] | None = None,
    encoder: Encoder | None = None,
) -> str:
    """Write a model bundle folder at ``url`` and return its ``model_id``.

    The caller exports BatchNorm statistics that are final (see the training stage).
    ``baselines`` may hold the trained ``"acae"`` module and the fitted ``"pca"`` baseline;
    ``encoder`` is the trained E.
    """
    config = {
        "format": BUNDLE_FORMAT,
        "model": asdict(model_cfg),
        "normalization": "uint8 pixels / 127.5 - 1, i.e. [-1, 1]",
        "metadata": metadata or {},
    }
    contents = {
        "config.json": json.dumps(config, indent=2, sort_keys=True).encode(),
        "generator.pt": _state_bytes(generator),
        "discriminator.pt": _state_bytes(discriminator),
    }
    if encoder is not None:
        contents[ENCODER_FILE] = _state_bytes(encoder)
    baselines = baselines or {}
    if "acae" in baselines:
        contents[_BASELINE_FILES["acae"]] = _state_bytes(baselines["acae"])
    if "pca" in baselines:
        contents[_BASELINE_FILES["pca"]] = baselines["pca"].to_bytes()
    hashes = {name: _sha256(data) for name, data in contents.items()}
    model_id = _model_id(hashes)
    storage.makedirs(url)
    for name, data in contents.items():
        storage.write_bytes(storage.join(url, name), data)
    storage.write_json(storage.join(url, "bundle.json"), {"model_id": model_id, "sha256": hashes})
    return model_id


def load_bundle(url: str, device: Any = "cpu") -> ModelBundle:
    """Load a bundle, verify every file's hash, and return G and D frozen in eval mode.

    Raises:
        BundleError: a file is missing, was changed after export, or the architecture does not
            match the weights.
    """
    try:
        index = storage.read_json(storage.join(url, "bundle.json"))
        members = [*_BUNDLE_FILES, *(n for n in _OPTIONAL_FILES if n in index["sha256"])]
        contents = {name: storage.read_bytes(storage.join(url, name)) for name in members}
    except (FileNotFoundError, OSError) as err:
        raise BundleError(f"model bundle {url}: cannot read it ({err})") from err
    except json.JSONDecodeError as err:
        raise BundleError(f"model bundle {url}: bundle.json is not valid JSON ({err})") from err
    except (KeyError, TypeError) as err:
        raise BundleError(f"model bundle {url}: bundle.json has no sha256 table") from err
    recorded = index.get("sha256") if isinstance(index, dict) else None
    if not isinstance(recorded, dict):
        raise BundleError(f"model bundle {url}: bundle.json has no sha256 table")
    for name, data in contents.items():
        if _sha256(data) != recorded.get(name):
            raise BundleError(f"model bundle {url}: {name} does not match its recorded sha256")
    model_id = _model_id(recorded)
    if model_id != index.get("model_id"):
        raise BundleError(f"model bundle {url}: model_id does not match the files' hashes")
    config = json.loads(contents["config.json"])
    if config.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"model bundle {url}: format {config.get('format')!r} is not supported")
    try:  # the same checks as a preset: unknown keys or values outside the allowed ones fail
        model_cfg = config_from_dict({"model": config["model"]}).model
    except (ConfigError, KeyError) as err:
        raise BundleError(f"model bundle {url}: incompatible model config ({err})") from err
    generator, discriminator = Generator(model_cfg), Discriminator(model_cfg)
    modules = [(generator, "generator.pt"), (discriminator, "discriminator.pt")]
    baselines: dict[str, Any] = {}
    encoder = Encoder(model_cfg) if ENCODER_FILE in contents else None
    if encoder is not None:
        modules.append((encoder, ENCODER_FILE))
    if _BASELINE_FILES["acae"] in contents:
        baselines["acae"] = AdversarialAutoencoder(model_cfg)
        modules.append((baselines["acae"], _BASELINE_FILES["acae"]))
    for module, name in modules:
        try:  # weights_only: tensors and plain containers, never arbitrary objects
            state = torch.load(io.BytesIO(contents[name]), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise BundleError(f"model bundle {url}: {name} holds more than tensors: {err}") from err
        try:
            module.load_state_dict(state)
        except RuntimeError as err:
            raise BundleError(f"model bundle {url}: {name} does not fit the config: {err}") from err
        module.eval().requires_grad_(False)
    if _BASELINE_FILES["pca"] in contents:
        try:
            baselines["pca"] = PCABaseline.from_bytes(contents[_BASELINE_FILES["pca"]])
        except (ValueError, KeyError, OSError) as err:
            raise BundleError(f"model bundle {url}: pca.npz is not a PCA baseline: {err}") from err
    bundle = ModelBundle(
        generator, discriminator, model_cfg, config["metadata"], model_id, baselines, encoder
    )
    return bundle.to(device)


def verify_bundle(url: str) -> str:
    """Check the model bundle at ``url`` as every scoring worker will load it, before any work.

    A stage calls it on its driver first, so a missing, altered or incompatible bundle is one
    error there instead of one traceback per worker. It runs :func:`load_bundle` on the CPU:
    every member's sha256 and the ``model_id``, the format and model config, and the weights
    fitting the architecture.

    Returns:
        The bundle's ``model_id``.

    Raises:
        BundleError: naming the bundle, the file and what is wrong with it.
    """
    return load_bundle(url).model_id
