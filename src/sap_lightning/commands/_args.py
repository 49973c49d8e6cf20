"""Range-checked ``argparse`` types shared by every command.

A bad value is refused while the command line is parsed, before any file or folder is written,
with one line naming the option and the valid range (``argparse`` adds the option's name).
``float("nan")`` parses, so every float type also refuses non-finite values.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _number(text: str, kind: type, valid: str, ok: Callable[[float], bool]) -> float:
    """``text`` as ``kind``, finite and passing ``ok``; else one message naming the range."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or not ok(value):
        number = "an integer" if kind is int else "a finite number"
        raise argparse.ArgumentTypeError(f"must be {number} {valid}, got {text!r}")
    return value


def probability(text: str) -> float:
    """A probability threshold in (0, 1]."""
    return _number(text, float, "in (0, 1]", lambda v: 0.0 < v <= 1.0)


def unit_interval_open(text: str) -> float:
    """A fraction in [0, 1) (sliding-window overlap: 1 would never advance)."""
    return _number(text, float, "in [0, 1)", lambda v: 0.0 <= v < 1.0)


def positive_float(text: str) -> float:
    """A finite number > 0 (a tolerance in mm, a spacing)."""
    return _number(text, float, "> 0", lambda v: v > 0.0)


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (a volume cut-off)."""
    return _number(text, float, ">= 0", lambda v: v >= 0.0)


def positive_int(text: str) -> int:
    """An integer >= 1 (batch sizes, workers, counts, window sizes)."""
    return int(_number(text, int, ">= 1", lambda v: v >= 1))


def device(text: str) -> str:
    """A torch device that exists here: ``cpu``, ``cuda``, ``cuda:1``, ``mps``, ...

    Parsed with ``torch.device`` and checked against what this machine has, so ``--device
    cuda`` on a CPU-only machine stops at once instead of after the data was read.
    """
    import torch

    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)"
        ) from None
    if parsed.type == "cpu":
        return text
    backend = torch.backends.mps if parsed.type == "mps" else getattr(torch, parsed.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise argparse.ArgumentTypeError(f"{text!r}: no {parsed.type} device on this machine")
    count = getattr(backend, "device_count", None)
    if parsed.index is not None and count is not None and parsed.index >= count():
        raise argparse.ArgumentTypeError(
            f"{text!r}: this machine has {count()} {parsed.type} device(s), "
            f"indices 0..{count() - 1}"
        )
    return text
