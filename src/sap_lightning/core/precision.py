"""Precision names (Lightning's) and how reports name them; pure Python, so configuration and
the command line check a precision without importing torch.

What a precision means on a given device (autocast dtypes, oneDNN's fast-kernel check,
float32 fallback) is ``core/mixed_precision.py``'s.
"""

from __future__ import annotations

from sap_lightning.core.errors import ConfigError

AUTOCAST_PRECISIONS: dict[str, str | None] = {
    "32-true": None,
    "bf16-mixed": "bfloat16",
    "16-mixed": "float16",
}
"""The precisions of whole-case inference (``validation.precision``) and of CPU training: float32,
or autocast to the named dtype."""


LIGHTNING_PRECISIONS: tuple[str, ...] = (
    "transformer-engine",
    "transformer-engine-float16",
    "16-true",
    "16-mixed",
    "bf16-true",
    "bf16-mixed",
    "32-true",
    "64-true",
)
"""Every ``precision`` Lightning's Trainer accepts (``lightning.fabric.plugins.precision``;
``tests/unit/test_precision_names.py`` checks the two lists agree)."""

LIGHTNING_ALIASES: dict[str, str] = {
    "64": "64-true",
    "32": "32-true",
    "16": "16-mixed",
    "bf16": "bf16-mixed",
}
"""Lightning's historical names and what it turns them into."""


def trainer_precision(value: object) -> str:
    """``trainer.precision`` as the name Lightning uses (aliases such as ``16`` or ``bf16``
    resolved), refused in one line unless it is a Lightning precision this library trains at.

    An alias kept as written would be unknown to the inference code, which would then run
    float32 after a mixed-precision training; Lightning's ``-true`` and Transformer Engine
    precisions convert the weights themselves, which whole-case inference does not follow.
    """
    name = LIGHTNING_ALIASES.get(str(value), str(value))
    supported = ", ".join(AUTOCAST_PRECISIONS)
    if name not in LIGHTNING_PRECISIONS:
        raise ConfigError(
            f"'trainer.precision' is {value!r}: not a Lightning precision; valid choices: "
            f"{supported} (Lightning also knows {', '.join(sorted(LIGHTNING_ALIASES))} as aliases)"
        )
    if name not in AUTOCAST_PRECISIONS:
        raise ConfigError(
            f"'trainer.precision' is {value!r}: Lightning knows it, but this library trains "
            f"and infers only at {supported} (float32 or autocast)"
        )
    return name


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
