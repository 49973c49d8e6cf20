"""What a precision means on a device: autocast dtypes, oneDNN's fast-kernel check (a CPU without
fast kernels for a type runs float32), and bfloat16 training on the CPU made safe for small 3-D
convolutions.

oneDNN's bfloat16 weight gradient of a 3-D convolution (3x3x3 kernel, padding 1) returns NaN
in some calls when the input is 2 voxels deep: torch 2.13.0 on an AVX512-BF16 CPU gave NaN
weight gradients in 39 of 200 random calls for a (2, 64, 2, 2, 2) input, also for (2, 16, 16)
and (2, 32, 32) voxels, and in none for 1, 3 to 8 or 32 voxels per axis (transposed
convolutions and input gradients were unaffected). The tiny U-Net's bottleneck is 2 x 2 x 2 on
a 32^3 patch, so a bfloat16 training run went NaN within about a hundred steps.
:func:`guard_small_convolutions` runs convolutions with an axis under 3 voxels in float32 while
gradients are recorded (``tests/unit/test_mixed_precision.py`` checks their gradients against
float32's); they are the cheapest of the network (a few hundred voxels), and every other
convolution keeps bfloat16's speed. Inference (no gradients) is left as it is.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
from torch import nn

from sap_lightning.core.errors import ConfigError
from sap_lightning.core.precision import AUTOCAST_PRECISIONS

log = logging.getLogger(__name__)

AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    name: None if dtype is None else getattr(torch, dtype)
    for name, dtype in AUTOCAST_PRECISIONS.items()
}
"""Each precision name's autocast dtype (None: float32, no autocast)."""


_CPU_SUPPORT = {
    torch.bfloat16: "_is_mkldnn_bf16_supported",
    torch.float16: "_is_mkldnn_fp16_supported",
}
"""oneDNN's own checks for fast reduced-precision CPU kernels (torch has no public query)."""


@functools.cache
def _cpu_supports(dtype: torch.dtype) -> bool:
    check = getattr(torch.ops.mkldnn, _CPU_SUPPORT[dtype], None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


@functools.cache
def _warn_float32_instead(precision: str) -> None:
    log.warning("this CPU has no fast kernels for %s: inference runs in float32", precision)


def effective_precision(precision: str, device: torch.device | str) -> str:
    """The precision whole-case inference runs at on ``device``: ``precision``, except on a CPU
    without fast kernels for its type (oneDNN's check: AVX512 for bfloat16, AVX512-FP16 or AMX
    for float16), which runs float32 (warned once): emulated, it would be slower for no gain."""
    if precision not in AUTOCAST_PRECISIONS:
        raise ValueError(
            f"inference precision {precision!r} is not one of {list(AUTOCAST_PRECISIONS)}"
        )
    if torch.device(device).type == "cpu" and not cpu_has_fast_kernels(precision):
        _warn_float32_instead(precision)
        return "32-true"
    return precision


def cpu_has_fast_kernels(precision: str) -> bool:
    """Whether this CPU computes ``precision`` (one of :data:`AUTOCAST_PRECISIONS`) natively;
    float32 always."""
    dtype = AUTOCAST_DTYPES[precision]
    return dtype is None or _cpu_supports(dtype)


def inference_autocast(
    precision: str, device: torch.device | str
) -> contextlib.AbstractContextManager:
    """The autocast context of whole-case inference at ``precision`` on ``device``
    (:func:`effective_precision`); ``32-true`` turns autocast off, also inside a
    mixed-precision trainer's validation."""
    device_type = torch.device(device).type
    dtype = AUTOCAST_DTYPES[effective_precision(precision, device)]
    if dtype is None:
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=dtype)


SMALLEST_SAFE_SIZE = 3
"""Convolution inputs with a spatial size below this run in float32 under CPU bf16 autocast."""


def _unsafe_under_cpu_bf16(conv: nn.Conv3d, x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and torch.is_grad_enabled()
        and conv.weight.requires_grad
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and min(x.shape[2:]) < SMALLEST_SAFE_SIZE
    )


class GuardedConv3d(nn.Conv3d):
    """``nn.Conv3d`` that runs in float32 where CPU bfloat16 autocast would give NaN gradients
    (module docstring); otherwise exactly ``nn.Conv3d``. Same parameters and state-dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _unsafe_under_cpu_bf16(self, x):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


def guard_small_convolutions(net: nn.Module) -> int:
    """Turn every plain ``nn.Conv3d`` of ``net`` into a :class:`GuardedConv3d` in place (same
    object, weights and keys); returns how many. Subclasses of ``nn.Conv3d`` are left alone:
    their own ``forward`` may differ."""
    guarded = 0
    for module in net.modules():
        if type(module) is nn.Conv3d:
            module.__class__ = GuardedConv3d
            guarded += 1
    return guarded


def runs_on_cpu(accelerator: str) -> bool:
    """Whether Lightning's ``accelerator`` setting trains on the CPU on this machine."""
    if accelerator == "cpu":
        return True
    if accelerator != "auto":
        return False
    mps = getattr(torch.backends, "mps", None)
    return not torch.cuda.is_available() and not (mps is not None and mps.is_available())


def runs_on_cuda(accelerator: str) -> bool:
    """Whether Lightning's ``accelerator`` setting trains on CUDA GPUs on this machine."""
    return accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()


def training_precision(precision: str, accelerator: str) -> str:
    """The precision a run trains at: ``precision``, except bfloat16 / float16 autocast on a CPU
    without fast kernels for the type (oneDNN's check, as for inference), which trains in
    float32 (warned once): emulated, it would be several times slower for no gain. On CUDA,
    ``16-mixed`` and ``bf16-mixed`` are both kept; ``bf16-mixed`` on a GPU without bfloat16
    (before Ampere) is refused in one line rather than silently run at another precision."""
    if precision not in AUTOCAST_PRECISIONS:
        return precision
    if runs_on_cuda(accelerator):
        if precision == "bf16-mixed" and not torch.cuda.is_bf16_supported(
            including_emulation=False
        ):
            name = torch.cuda.get_device_name()
            raise ConfigError(
                f"trainer.precision=bf16-mixed: {name} has no bfloat16 arithmetic (it needs an "
                "Ampere or newer GPU); use trainer.precision=16-mixed"
            )
        return precision
    if not runs_on_cpu(accelerator):
        return precision
    if cpu_has_fast_kernels(precision):
        return precision
    _warn_float32_training(precision)
    return "32-true"


@functools.cache
def _warn_float32_training(precision: str) -> None:
    log.warning("this CPU has no fast kernels for %s: training runs in float32", precision)
