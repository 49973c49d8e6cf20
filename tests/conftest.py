"""Shared pytest setup: quiet, offline, deterministic and CPU-only."""

from __future__ import annotations

import os

# Keep every run offline and free of secrets: W&B never reaches a server from the tests.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("PYTHONHASHSEED", "0")
