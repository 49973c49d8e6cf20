"""Precision names (Lightning's) and how reports name them; pure Python, so configuration and
the command line check a precision without importing torch.

What a precision means on a given device (autocast dtypes, oneDNN's fast-kernel check,
float32 fallback) is ``core/mixed_precision.py``'s.
"""

from __future__ import annotations

AUTOCAST_PRECISIONS: dict[str, str | None] = {
    "32-true": None,
    "bf16-mixed": "bfloat16",
    "16-mixed": "float16",
}
"""The precisions of whole-case inference (``validation.precision``) and of CPU training: float32,
or autocast to the named dtype."""


def describe_precision(precision: str) -> str:
    """How reports name a precision: ``float32``, ``bfloat16 autocast``; other names as given."""
    if precision not in AUTOCAST_PRECISIONS:
        return precision
    dtype = AUTOCAST_PRECISIONS[precision]
    return "float32" if dtype is None else f"{dtype} autocast"


def inference_precision(configured: str | None, trainer_precision: str) -> str:
    """``validation.precision`` when set, else the trainer's autocast (16-/bf16-mixed) or
    float32: a network trained under autocast is validated and predicted under it."""
    if configured is not None:
        return configured
    return trainer_precision if trainer_precision in AUTOCAST_PRECISIONS else "32-true"
