"""The DCGAN of AnoGAN and its model bundle (plain PyTorch; no Ray).

Paper: G maps z to a 64 x 64 gray patch with 4 fractionally-strided convolutions,
channels 512-256-128-64, 5 x 5 filters, tanh output; D has 4 convolutions 64-128-256-512
and outputs the probability that a patch is real. ``ModelConfig.base_channels`` = 64 is exactly
the paper; smaller values give the tiny models the tests use.

The model bundle (DESIGN.md §3.3) is a folder:
    config.json          architecture, normalization, training run and data fingerprint
    generator.pt         G's state dict (tensors only; loaded with ``weights_only=True``)
    discriminator.pt     D's state dict
    encoder.pt           optional: E's state dict (f-AnoGAN's fast mapping)
    acae.pt              optional: the aCAE baseline's state dict
    pca.npz              optional: the PCA baseline's mean and components (arrays only)
    bundle.json          sha256 of each file and ``model_id``, a hash over all of them
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pickle
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from anogan_ray import storage
from anogan_ray.config import ConfigError, ModelConfig, config_from_dict

BUNDLE_FORMAT = 1
_BUNDLE_FILES = ("config.json", "generator.pt", "discriminator.pt")
ENCODER_FILE = "encoder.pt"  # optional member: the trained encoder E
QUALITY_FILE = "generative_quality.json"  # training's generative-quality record, per epoch
_BASELINE_FILES = {"acae": "acae.pt", "pca": "pca.npz"}  # optional members
_OPTIONAL_FILES = (ENCODER_FILE, *_BASELINE_FILES.values())  # in model_id order


class BundleError(ValueError):
    """A model bundle that is missing, tampered with or incompatible."""


def _padding(kernel_size: int) -> tuple[int, int]:
    """(padding, output_padding) so that a stride-2 (transposed) conv halves (doubles) the size."""
    return (2, 1) if kernel_size == 5 else (1, 0)


class Generator(nn.Module):
    """z (B, latent_dim) -> patch (B, 1, 64, 64) in [-1, 1]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = cfg.base_channels
        k = cfg.kernel_size
        pad, out_pad = _padding(k)
        self.latent_dim = cfg.latent_dim
        self.project = nn.Sequential(  # z -> (8c) x 4 x 4, DCGAN's projection and reshape
            nn.Linear(cfg.latent_dim, 8 * c * 4 * 4, bias=False),
            nn.Unflatten(1, (8 * c, 4, 4)),
            nn.BatchNorm2d(8 * c),
            nn.ReLU(inplace=True),
        )

        def up(cin: int, cout: int, last: bool = False) -> list[nn.Module]:
            conv = nn.ConvTranspose2d(cin, cout, k, 2, pad, out_pad, bias=last)
            return [conv, nn.Tanh()] if last else [conv, nn.BatchNorm2d(cout), nn.ReLU(True)]

        self.upsample = nn.Sequential(
            *up(8 * c, 4 * c),  # state size. (4c) x 8 x 8
            *up(4 * c, 2 * c),  # state size. (2c) x 16 x 16
            *up(2 * c, c),  # state size. c x 32 x 32
            *up(c, 1, last=True),  # state size. 1 x 64 x 64
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.project(z))


def _d_layer(layer: nn.Module, d_norm: str) -> nn.Module:
    """A conv / linear layer of D, spectrally normalized when ``d_norm`` is ``"spectral"``."""
    return spectral_norm(layer) if d_norm == "spectral" else layer


def _d_norm_layer(channels: int, d_norm: str) -> nn.Module:
    """The normalization after a conv of D: BatchNorm, or LayerNorm over (C, H, W) per patch."""
    if d_norm == "batch":
        return nn.BatchNorm2d(channels)
    # one group: LayerNorm over (C, H, W) with a per-channel affine, as WGAN-GP's critic
    return nn.GroupNorm(1, channels)


class Discriminator(nn.Module):
    """patch (B, 1, 64, 64) -> logit (B,); ``features`` is its last convolution layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = cfg.base_channels
        k = cfg.kernel_size
        pad, _ = _padding(k)

        def down(cin: int, cout: int, norm: bool = True) -> list[nn.Module]:
            normalized = norm and cfg.d_norm != "spectral"  # a norm layer follows: no bias
            layers: list[nn.Module] = [
                _d_layer(nn.Conv2d(cin, cout, k, 2, pad, bias=not normalized), cfg.d_norm)
            ]
            if normalized:
                layers.append(_d_norm_layer(cout, cfg.d_norm))
            return [*layers, nn.LeakyReLU(0.2, inplace=True)]

        self.convs = nn.Sequential(
            *down(1, c, norm=False),  # state size. c x 32 x 32 (no BatchNorm on D's input, DCGAN)
            *down(c, 2 * c),  # state size. (2c) x 16 x 16
            *down(2 * c, 4 * c),  # state size. (4c) x 8 x 8
            *down(4 * c, 8 * c),  # state size. (8c) x 4 x 4
        )
        self.classify = nn.Sequential(
            nn.Flatten(), _d_layer(nn.Linear(8 * c * 4 * 4, 1), cfg.d_norm)
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """f(x) of eq. (4): the last convolution layer's activations, (B, 8c, 4, 4)."""
        return self.convs(x)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """D's logits from its last-conv features: (B, 8c, 4, 4) -> (B,); sigmoid -> D(x)."""
        return self.classify(features).squeeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(x))  # (B,) logits


class Encoder(nn.Module):
    """E of f-AnoGAN: patch (B, 1, 64, 64) -> z (B, latent_dim) in (-1, 1) (tanh-bounded).

    D's convolution stack, then a linear layer to the latent size: one forward pass replaces
    (or warm-starts) the iterative mapping of z.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # state size. (8c) x 4 x 4; BatchNorm whatever D uses (E is trained like an autoencoder)
        self.convs = Discriminator(dataclasses.replace(cfg, d_norm="batch")).convs
        self.code = nn.Sequential(
            nn.Flatten(), nn.Linear(8 * cfg.base_channels * 4 * 4, cfg.latent_dim), nn.Tanh()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.code(self.convs(x))


def init_weights(module: nn.Module) -> None:
    """DCGAN initialization: conv/linear weights N(0, 0.02), BatchNorm scale N(1, 0.02), bias 0.

    A spectrally normalized layer gets the same initial weight, and its power-iteration vectors
    are re-estimated for it.
    """
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        if parametrize.is_parametrized(module, "weight"):
            nn.init.normal_(module.parametrizations.weight.original, 0.0, 0.02)
            _restart_power_iteration(module)
        else:
            nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def _restart_power_iteration(module: nn.Module) -> None:
    """Re-estimate a spectrally normalized layer's singular vectors for its current weight, as
    ``spectral_norm`` does when it is applied (15 power iterations)."""
    norm = module.parametrizations.weight[0]
    original = module.parametrizations.weight.original
    norm._power_method(norm._reshape_weight_to_matrix(original), 15)


def build_models(cfg: ModelConfig, seed: int = 0) -> tuple[Generator, Discriminator]:
    """A freshly initialized (G, D) pair; the same seed gives the same weights."""
    torch.manual_seed(seed)
    generator, discriminator = Generator(cfg), Discriminator(cfg)
    generator.apply(init_weights)
    discriminator.apply(init_weights)
    return generator, discriminator


@torch.no_grad()
def finalize_batchnorm(module: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Set every BatchNorm's running statistics to their exact average over ``batches``.

    During training the running statistics are an exponential average that lags the weights;
    exported models run in eval mode, so their statistics must describe the final weights. Each
    batch runs forward in train mode with ``momentum=None`` (a cumulative average); the module's
    mode and momenta are restored afterwards and no parameter changes.

    Args:
        module: the network (G fed with z batches, D fed with real patches).
        batches: inputs of the module, each a full-sized batch like the training batches.

    Returns:
        The number of samples the statistics were computed from.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    was_training = module.training
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    module.train()
    seen = 0
    try:
        for batch in batches:
            module(batch)
            seen += batch.shape[0]
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        module.train(was_training)
    if norms and seen == 0:
        raise ValueError("finalize_batchnorm: no batches given, BatchNorm statistics were reset")
    return seen


def sample_latent(
    n: int, cfg: ModelConfig, generator: torch.Generator | None = None, device: Any = "cpu"
) -> torch.Tensor:
    """n draws from the latent prior, (n, latent_dim)."""
    shape = (n, cfg.latent_dim)
    if cfg.latent_prior == "uniform":
        return torch.rand(shape, generator=generator, device=device) * 2 - 1
    return torch.randn(shape, generator=generator, device=device)


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
    from anogan_ray.core.baselines import AdversarialAutoencoder, PCABaseline

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
