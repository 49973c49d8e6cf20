"""``trainer.precision``: Lightning's names, resolved and checked when the config is loaded, and
the precision whole-case inference then runs at (``16`` used to give float32 inference)."""

from __future__ import annotations

from typing import get_args

import pytest
import torch
from lightning.fabric.plugins.precision.precision import (
    _PRECISION_INPUT_STR,
    _PRECISION_INPUT_STR_ALIAS_CONVERSION,
)

from sap_lightning.config import load_config
from sap_lightning.core import mixed_precision
from sap_lightning.core.errors import ConfigError
from sap_lightning.core.precision import (
    AUTOCAST_PRECISIONS,
    LIGHTNING_ALIASES,
    LIGHTNING_PRECISIONS,
    inference_precision,
)


def test_the_names_are_lightnings() -> None:
    assert set(LIGHTNING_PRECISIONS) == set(get_args(_PRECISION_INPUT_STR))
    assert LIGHTNING_ALIASES == _PRECISION_INPUT_STR_ALIAS_CONVERSION


@pytest.mark.parametrize(
    ("given", "stored", "inference"),
    [
        ("16", "16-mixed", "16-mixed"),
        ("bf16", "bf16-mixed", "bf16-mixed"),
        ("32", "32-true", "32-true"),
        ("bf16-mixed", "bf16-mixed", "bf16-mixed"),
        ("16-mixed", "16-mixed", "16-mixed"),
    ],
)
def test_aliases_become_lightnings_names_and_inference_follows(given, stored, inference) -> None:
    cfg = load_config(None, [f"trainer.precision={given}"])
    assert cfg.trainer.precision == stored
    assert inference_precision(cfg.validation.precision, cfg.trainer.precision) == inference


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("fp16", r"'trainer.precision' is 'fp16': not a Lightning precision; valid choices: "),
        ("16-true", r"Lightning knows it, but this library trains and infers only at"),
        ("64", r"'trainer.precision' is '64': Lightning knows it"),
        ("transformer-engine", r"Lightning knows it"),
    ],
)
def test_other_precisions_are_refused_in_one_line(given: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(None, [f"trainer.precision={given}"])
    assert "\n" not in str(caught.value)
    assert all(name in str(caught.value) for name in AUTOCAST_PRECISIONS)


def _pretend_gpu(monkeypatch: pytest.MonkeyPatch, bf16: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_both_mixed_precisions_train_as_given_on_a_gpu(monkeypatch, precision: str) -> None:
    _pretend_gpu(monkeypatch, bf16=True)
    assert mixed_precision.training_precision(precision, "gpu") == precision
    assert mixed_precision.effective_precision(precision, "cuda") == precision


def test_bf16_on_a_gpu_without_it_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _pretend_gpu(monkeypatch, bf16=False)
    with pytest.raises(
        ConfigError, match=r"Tesla V100 has no bfloat16.*trainer.precision=16-mixed"
    ):
        mixed_precision.training_precision("bf16-mixed", "gpu")
    assert mixed_precision.training_precision("16-mixed", "auto") == "16-mixed"
