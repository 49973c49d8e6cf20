"""The tiny U-Net every training test uses, defined once (``tests/tiny.yaml``).

``TINY_CONFIG`` is an experiment file for modules and data built without a CPU experiment;
``TINY_NETWORK`` puts the same widths over any experiment file (``model.kwargs.features=...``).
"""

from __future__ import annotations

from pathlib import Path

import yaml

TINY_CONFIG = Path(__file__).with_name("tiny.yaml")
TINY_FEATURES: list[int] = yaml.safe_load(TINY_CONFIG.read_text())["model"]["kwargs"]["features"]
TINY_NETWORK = f"model.kwargs.features=[{','.join(map(str, TINY_FEATURES))}]"
