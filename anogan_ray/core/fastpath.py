"""How the Γ mapping steps run: their arithmetic and machinery (plain PyTorch; no Ray).

The mapping of :mod:`anogan_ray.core.invert` spends all its time in Γ Adam steps of z, each a
forward and backward pass through G and D's features. A :class:`FastPath` says how those steps
run, never what they compute:

- ``precision``: true fp32, TF32 (CUDA) or bfloat16. The steps run on *step copies* of G and D
  (:func:`step_models`): frozen, with every eval-mode BatchNorm folded into the convolution or
  linear layer before it (one pass over the activations less per layer, forward and backward),
  spectral norms made plain weights, in the step's dtype (bf16 weights: no per-step casts) and
  memory format. z, its gradient and Adam's moments stay fp32.
- ``channels_last``: the copies in channels_last memory format (cuDNN's NHWC kernels).
- ``compile``: the step's loss through ``torch.compile`` (mode ``default``: inductor's fused
  kernels, no CUDA graphs of its own).
- ``cuda_graph`` (CUDA only): one whole step (G, D, the backward pass and z's Adam update) is
  captured once per fixed shape and replayed Γ times: no kernel launches from Python.

A failure of the machinery (compiling, capturing, replaying; in the forward or the backward
pass) switches the process to eager steps with one warning, and the batch is redone
(:class:`LatentStepper`); a fast precision or layout is checked against fp32 by the scorer
(:func:`fast_path_rtol`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "tf32", "bf16")
# Largest relative difference of A(x) to fp32 a fast precision may show on the check's sample
# before the scorer switches it off.
PRECISION_RTOL = {"tf32": 1e-2, "bf16": 5e-2}
# The same for steps whose kernels sum in another order (compiled, channels_last, another
# batch shape): Adam amplifies last-bit differences over the steps (measured 2.6e-7 compiled
# on the test model at Γ = 20 on CPU; 1 vs 32 rows up to 2.9e-4 on a Xeon with AMX).
ROUNDING_RTOL = 1e-3
# On CUDA, score.compile=auto compiles when an actor has at least this many patches to map.
# Measured on an H200 at the paper preset (benchmarks/bench_gpu.py, docs/gpu.md): compiling
# took 12-17 s per process and sped the steps up from 314 to 417 patches/s (0.79 ms a patch
# saved), so it repays itself after ~22,000 patches.
COMPILE_MIN_PATCHES = 25_000


@dataclass(frozen=True)
class FastPath:
    """How the Γ steps run (see the module docstring); the default is exact eager fp32."""

    precision: str = "fp32"  # "fp32", "tf32" (CUDA) or "bf16"
    channels_last: bool = False  # step copies of G and D in channels_last memory format
    compile: bool = False  # torch.compile the step's loss (inductor, mode "default")
    cuda_graph: bool = False  # CUDA: capture one whole step, replay it Γ times
    pad_channels: bool = False  # the one-channel image layers (G's last, D's first) widened to
    # PADDED_CHANNELS with zero weights: tensor-core shapes, the same values
    subpixel: bool = False  # G's 5 x 5 stride-2 transposed convolutions as one 3 x 3 convolution
    # of four output phases and a pixel shuffle (forward kernels instead of cuDNN's dgrad ones;
    # not yet measured on a GPU: benchmarks/bench_gpu.py's "subpixel" paths)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}"
            )

    def label(self) -> str:
        """E.g. ``"bf16 + channels_last + CUDA graph + compiled"``."""
        parts = [self.precision]
        parts += ["channels_last"] if self.channels_last else []
        parts += ["CUDA graph"] if self.cuda_graph else []
        parts += ["compiled"] if self.compile else []
        parts += ["padded channels"] if self.pad_channels else []
        parts += ["sub-pixel"] if self.subpixel else []
        return " + ".join(parts)

    def eager(self) -> FastPath:
        """The same arithmetic without the machinery that can fail (compile, CUDA graphs)."""
        return dataclasses.replace(self, compile=False, cuda_graph=False)

    def needs_check(self) -> bool:
        """Whether its scores can differ from eager fp32's beyond the last bit of each kernel
        (a CUDA graph replays the very kernels it captured)."""
        return self.precision != "fp32" or self.compile or self.channels_last or self.subpixel


EXACT = FastPath()


def fast_path_rtol(path: FastPath) -> float:
    """The largest relative difference of A(x) to eager fp32 the scorer's check allows ``path``:
    its precision's, plus rounding (another shape or kernel order) when it is not fp32 eager."""
    return PRECISION_RTOL.get(path.precision, 0.0) + (ROUNDING_RTOL if path.needs_check() else 0)


def choose_fast_path(
    device: torch.device | str,
    precision: str = "auto",
    compile: bool | str = "auto",
    cuda_graph: bool = True,
    channels_last: bool | str = "auto",
    patches_per_actor: int | None = None,
) -> tuple[FastPath, str]:
    """The fast path for ``score``'s settings on ``device``, and why, in words.

    ``auto``: bf16, channels_last, CUDA graphs and padded channels on CUDA, with compiling when
    an actor maps at least :data:`COMPILE_MIN_PATCHES` patches; exact eager fp32 on CPU (the
    scores its tests and benchmarks measure; ``score.precision=bf16`` or
    ``score.channels_last=true`` are faster on some CPUs, README). Padded channels are exact
    (zero weights) and always on on CUDA: +13 % at the paper preset on an H200 (+4 % compiled).
    """
    cuda = torch.device(device).type == "cuda"
    why = []
    if precision == "auto":
        precision = "bf16" if cuda else "fp32"
        why.append(f"{precision} (auto on {'CUDA' if cuda else 'CPU'})")
    if channels_last == "auto":
        channels_last = cuda
    if compile == "auto":
        enough = patches_per_actor is not None and patches_per_actor >= COMPILE_MIN_PATCHES
        compile = cuda and enough
        if cuda:
            count = "unknown" if patches_per_actor is None else f"{patches_per_actor:,}"
            relation = "≥" if enough else "<"
            why.append(
                f"{'compiled' if compile else 'not compiled'} (auto: {count} patches per actor "
                f"{relation} {COMPILE_MIN_PATCHES:,})"
            )
    if cuda and compile and not channels_last:
        # inductor's compiled backward assumes contiguous convolution gradients where cuDNN
        # returns channels_last ones in fp32 ("expected size 64==64, stride 1024==1" on an
        # H200, benchmarks/gpu_compile_modes.py): compiled steps run in channels_last
        channels_last = True
        why.append("channels_last (compiled steps need it on CUDA)")
    path = FastPath(
        precision, bool(channels_last), bool(compile), bool(cuda_graph and cuda), pad_channels=cuda
    )
    return path, "; ".join(why)


@contextlib.contextmanager
def precision_context(device: torch.device, precision: str) -> Iterator[None]:
    """The matmul / convolution arithmetic on CUDA while inside (a no-op on CPU).

    ``fp32`` and ``bf16`` get true fp32: TF32 off for matmuls *and* cuDNN convolutions (PyTorch
    allows TF32 in cuDNN convolutions by default); ``tf32`` switches both on.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = (
            precision == "tf32"
        )
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ---------------------------------------------------------------------------------------------
# Step copies of G and D
# ---------------------------------------------------------------------------------------------


def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as y = x·scale + shift per channel (float64)."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return scale, bn.bias.double() - bn.running_mean.double() * scale


def _folded(layer: nn.Module, bn: nn.BatchNorm2d, per_channel: int = 1) -> nn.Module:
    """``layer`` (Conv2d, ConvTranspose2d or Linear) followed by eval-mode ``bn``, as one layer.

    ``per_channel``: a Linear's consecutive outputs per BatchNorm channel (its output is
    unflattened to (C, H, W) before the BatchNorm)."""
    scale, shift = _bn_scale_shift(bn)
    folded = copy.deepcopy(layer)
    weight = layer.weight.detach().double()
    if isinstance(layer, nn.ConvTranspose2d):  # (Cin, Cout, k, k)
        weight = weight * scale.view(1, -1, 1, 1)
    elif isinstance(layer, nn.Conv2d):  # (Cout, Cin, k, k)
        weight = weight * scale.view(-1, 1, 1, 1)
    else:  # Linear (C·per_channel, in)
        scale, shift = scale.repeat_interleave(per_channel), shift.repeat_interleave(per_channel)
        weight = weight * scale.view(-1, 1)
    bias = shift if layer.bias is None else layer.bias.detach().double() * scale + shift
    folded.weight = nn.Parameter(weight.to(layer.weight.dtype), requires_grad=False)
    folded.bias = nn.Parameter(bias.to(layer.weight.dtype), requires_grad=False)
    return folded


def fold_batchnorm(sequence: nn.Sequential) -> nn.Sequential:
    """The layers of ``sequence`` with each eval-mode BatchNorm2d folded into the convolution or
    linear layer before it (also across an ``Unflatten``); others kept as they are."""
    layers, out, i = list(sequence), [], 0
    while i < len(layers):
        layer = layers[i]
        following = layers[i + 1 : i + 3]
        if (
            isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d))
            and following
            and isinstance(following[0], nn.BatchNorm2d)
        ):
            out.append(_folded(layer, following[0]))
            i += 2
        elif (
            isinstance(layer, nn.Linear)
            and len(following) == 2
            and isinstance(following[0], nn.Unflatten)
            and isinstance(following[1], nn.BatchNorm2d)
        ):
            per_channel = int(torch.tensor(following[0].unflattened_size[1:]).prod())
            out += [_folded(layer, following[1], per_channel), following[0]]
            i += 3
        else:
            out.append(layer)
            i += 1
    return nn.Sequential(*out)


def _step_copy(module: nn.Module, dtype: torch.dtype, channels_last: bool) -> nn.Module:
    """A frozen eval-mode copy of G or D for the mapping steps (see :func:`step_models`)."""
    module = copy.deepcopy(module).eval()
    for sub in list(module.modules()):  # spectral norm: its eval-mode weight, made plain
        for name in list(getattr(sub, "parametrizations", {}) or {}):
            parametrize.remove_parametrizations(sub, name, leave_parametrized=True)
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Sequential):
            setattr(module, name, fold_batchnorm(child))
    module.requires_grad_(False).to(dtype)
    if channels_last:
        module.to(memory_format=torch.channels_last)
    return module


_STEP_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # G -> {key: (G', D')}


def step_models(
    generator: nn.Module, discriminator: nn.Module, path: FastPath
) -> tuple[nn.Module, nn.Module]:
    """The step copies of (G, D) for ``path``: frozen, BatchNorm folded, spectral norms plain,
    in the path's dtype (bf16 or fp32) and memory format; made once per process and model."""
    dtype = torch.bfloat16 if path.precision == "bf16" else torch.float32
    device = next(generator.parameters()).device  # the copies follow a model that moved
    key = (id(discriminator), device, dtype, path.channels_last, path.pad_channels, path.subpixel)
    copies = _STEP_MODELS.setdefault(generator, {})
    if key not in copies:
        step_generator, step_discriminator = (
            _step_copy(generator, dtype, path.channels_last),
            _step_copy(discriminator, dtype, path.channels_last),
        )
        if path.pad_channels:
            _pad_image_channels(step_generator, step_discriminator)
        if path.subpixel:
            _subpixel_transposed_convolutions(step_generator)
        if (path.pad_channels or path.subpixel) and path.channels_last:  # the new weights too
            step_generator.to(memory_format=torch.channels_last)
            step_discriminator.to(memory_format=torch.channels_last)
        copies[key] = step_generator, step_discriminator
    return copies[key]


PADDED_CHANNELS = 8


def _pad_image_channels(generator: nn.Module, discriminator: nn.Module) -> None:
    """Widen G's last layer (→ 1 channel) and D's first (1 channel →) to PADDED_CHANNELS with
    zero weights and bias, in place: G(z) gets PADDED_CHANNELS − 1 channels of exact zeros
    (tanh(0)), which D's added zero weights ignore; the residual reads channel 0."""
    last = [m for m in generator.modules() if isinstance(m, nn.ConvTranspose2d)][-1]
    first = next(m for m in discriminator.modules() if isinstance(m, nn.Conv2d))
    if last.out_channels != 1 or first.in_channels != 1:
        return
    with torch.no_grad():
        weight = last.weight.new_zeros(last.in_channels, PADDED_CHANNELS, *last.kernel_size)
        weight[:, :1] = last.weight
        last.weight = nn.Parameter(weight, requires_grad=False)
        if last.bias is not None:
            bias = last.bias.new_zeros(PADDED_CHANNELS)
            bias[:1] = last.bias
            last.bias = nn.Parameter(bias, requires_grad=False)
        last.out_channels = PADDED_CHANNELS
        weight = first.weight.new_zeros(first.out_channels, PADDED_CHANNELS, *first.kernel_size)
        weight[:, :1] = first.weight
        first.weight = nn.Parameter(weight, requires_grad=False)
        first.in_channels = PADDED_CHANNELS


class SubPixelTransposedConv(nn.Module):
    """A ConvTranspose2d(k=5, stride=2, padding=2, output_padding=1) as one 3 x 3 convolution
    whose output channels are the four phases of each output pixel (row and column parity),
    then a pixel shuffle: the same values (to rounding) from forward-convolution kernels.

    Output row 2m + a takes input rows m − 1, m, m + 1 with kernel rows (4, 2, 0) for a = 0
    and (−, 3, 1) for a = 1 (− a zero tap); columns alike.
    """

    TAPS = {0: {0: 4, 1: 2, 2: 0}, 1: {1: 3, 2: 1}}  # phase -> {3 x 3 offset: 5 x 5 index}

    def __init__(self, layer: nn.ConvTranspose2d):
        super().__init__()
        weight = layer.weight.detach()  # (Cin, Cout, 5, 5)
        cin, cout = weight.shape[:2]
        phases = weight.new_zeros(4 * cout, cin, 3, 3)  # channel co·4 + a·2 + b
        for a, rows in self.TAPS.items():
            for b, cols in self.TAPS.items():
                for u, kh in rows.items():
                    for v, kw in cols.items():
                        phases[a * 2 + b :: 4, :, u, v] = weight[:, :, kh, kw].T
        self.conv = nn.Conv2d(cin, 4 * cout, 3, padding=1, bias=layer.bias is not None)
        self.conv.weight = nn.Parameter(phases, requires_grad=False)
        if layer.bias is not None:
            self.conv.bias = nn.Parameter(
                layer.bias.detach().repeat_interleave(4), requires_grad=False
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.pixel_shuffle(self.conv(x), 2)  # (B, Cout, 2H, 2W)


def _subpixel_transposed_convolutions(module: nn.Module) -> None:
    """Replace, in place, every 5 x 5 stride-2 transposed convolution of ``module`` that doubles
    its input (padding 2, output padding 1) by a :class:`SubPixelTransposedConv`."""
    for name, child in list(module.named_children()):
        if (
            isinstance(child, nn.ConvTranspose2d)
            and child.kernel_size == (5, 5)
            and child.stride == (2, 2)
            and child.padding == (2, 2)
            and child.output_padding == (1, 1)
            and child.groups == 1
            and child.dilation == (1, 1)
        ):
            setattr(module, name, SubPixelTransposedConv(child))
        else:
            _subpixel_transposed_convolutions(child)


# ---------------------------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------------------------

# StepLoss(G', D', z, x_rows, features_x, **settings) -> per-row loss (rows,), fp32; x_rows and
# features_x come in the step copies' dtype, settings are the mapping's (λ, modes).
StepLoss = Callable[..., torch.Tensor]

_EAGER_ONLY = False  # set for the process once compiling or capturing has failed
_COMPILED: dict[Any, Any] = {}  # torch.compile'd step losses, per loss function


def _compiled(loss: StepLoss) -> StepLoss:
    if loss not in _COMPILED:
        _COMPILED[loss] = torch.compile(loss, dynamic=False)
    return _COMPILED[loss]


def switch_to_eager(err: BaseException) -> None:
    """From now on this process maps eagerly; warns once."""
    global _EAGER_ONLY
    if not _EAGER_ONLY:
        log.warning("the mapping's fast path failed, mapping eagerly from now on: %s", err)
    _EAGER_ONLY = True


def effective_path(path: FastPath) -> FastPath:
    """``path`` as this process runs it now: without its machinery once that has failed."""
    return path.eager() if _EAGER_ONLY else path


class LatentStepper:
    """The Γ Adam steps of z for one fixed shape, one model pair and one fast path.

    Eagerly: a fresh Adam per batch, Γ times (zero the gradient, the loss, backward, step). With
    ``cuda_graph``: the step is captured once (after warm-up steps on a side stream, which also
    run cuDNN's autotuning and any compilation) with Adam's state on the GPU, and each batch
    copies its x, f(x) and z_1 into the captured tensors, resets Adam's moments and step count,
    and replays the graph Γ times.
    """

    def __init__(
        self,
        loss: StepLoss,
        models: tuple[nn.Module, nn.Module],
        path: FastPath,
        z_lr: float,
        settings: dict[str, Any],
    ):
        self.loss, self.path, self.z_lr, self.settings = loss, path, z_lr, settings
        self.generator, self.discriminator = step_models(*models, path)
        self.dtype = next(self.generator.parameters()).dtype
        self.graph: torch.cuda.CUDAGraph | None = None

    def run(
        self, x_rows: torch.Tensor, features_x: torch.Tensor | None, z0: torch.Tensor, steps: int
    ) -> torch.Tensor:
        """z_Γ (rows, nz), fp32, from z_1 ``z0`` for the rows ``x_rows`` (rows, 1, H, W) and
        their D features ``features_x`` (or None when no row needs them)."""
        x_rows = x_rows.to(self.dtype)
        features_x = None if features_x is None else features_x.to(self.dtype)
        path = effective_path(self.path)
        if path.compile or path.cuda_graph:
            try:
                return self._run_fast(x_rows, features_x, z0, steps, path)
            except Exception as err:  # compile, capture or replay; forward or backward
                switch_to_eager(err)
                self.graph = None
        return self._run_eager(x_rows, features_x, z0, steps, self.loss)

    def _loss_sum(self, loss: StepLoss, z, x_rows, features_x) -> torch.Tensor:
        return loss(
            self.generator, self.discriminator, z, x_rows, features_x, **self.settings
        ).sum()

    def _run_eager(self, x_rows, features_x, z0, steps: int, loss: StepLoss) -> torch.Tensor:
        z = z0.detach().clone().requires_grad_(True)  # (rows, nz)
        optimizer = torch.optim.Adam([z], lr=self.z_lr)
        with torch.enable_grad():
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                # sum of per-row losses: independent row gradients
                self._loss_sum(loss, z, x_rows, features_x).backward()
                optimizer.step()
        return z.detach()

    def _run_fast(self, x_rows, features_x, z0, steps: int, path: FastPath) -> torch.Tensor:
        loss = _compiled(self.loss) if path.compile else self.loss
        if not path.cuda_graph or x_rows.device.type != "cuda":
            return self._run_eager(x_rows, features_x, z0, steps, loss)
        if self.graph is None:
            self._capture(x_rows, features_x, z0, loss)
        with torch.no_grad():
            self.x_rows.copy_(x_rows)
            if features_x is not None:
                self.features_x.copy_(features_x)
            self.z.copy_(z0)
            state = self.optimizer.state[self.z]
            for name in ("exp_avg", "exp_avg_sq", "step"):
                state[name].zero_()
        for _ in range(steps):
            self.graph.replay()
        return self.z.detach().clone()

    def _capture(self, x_rows, features_x, z0, loss: StepLoss, warm_up: int = 3) -> None:
        """Capture one step on the batch's shapes (warm-up steps first, on a side stream)."""
        self.x_rows = x_rows.clone()
        self.features_x = None if features_x is None else features_x.clone()
        self.z = z0.detach().clone().requires_grad_(True)
        try:  # one kernel for the whole update, its step count on the GPU
            self.optimizer = torch.optim.Adam([self.z], lr=self.z_lr, capturable=True, fused=True)
        except (RuntimeError, ValueError):
            self.optimizer = torch.optim.Adam([self.z], lr=self.z_lr, capturable=True)
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN may time its algorithms

        def step() -> None:
            self._loss_sum(loss, self.z, self.x_rows, self.features_x).backward()
            self.optimizer.step()

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.enable_grad(), torch.cuda.stream(side):
            for _ in range(warm_up):
                self.optimizer.zero_grad(set_to_none=True)
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad(), torch.cuda.graph(graph):
            step()
        self.graph = graph


_STEPPERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # G -> {key: LatentStepper}
MAX_STEPPERS = 4  # per model: each holds its captured graph's memory


def latent_stepper(
    loss: StepLoss,
    models: tuple[nn.Module, nn.Module],
    path: FastPath,
    z_lr: float,
    rows: int,
    **settings: Any,
) -> LatentStepper:
    """The process's :class:`LatentStepper` for these models, path, rate, rows and the loss's
    ``settings`` (hashable: λ, modes), all of which a captured graph bakes in."""
    steppers = _STEPPERS.setdefault(models[0], {})
    device = next(models[0].parameters()).device
    key = (id(models[1]), device, path, z_lr, rows, loss, tuple(sorted(settings.items())))
    if key not in steppers:
        if len(steppers) >= MAX_STEPPERS:
            steppers.pop(next(iter(steppers)))
        steppers[key] = LatentStepper(loss, models, path, z_lr, settings)
    return steppers[key]
