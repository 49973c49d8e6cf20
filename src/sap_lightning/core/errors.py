"""Exceptions the command line reports as a clear one-line error instead of a traceback."""

from __future__ import annotations


class SapError(Exception):
    """Base class: a user-facing problem (bad input, bad config, bad checkpoint)."""


class DatasetError(SapError):
    """A dataset is missing, malformed or inconsistent; the message names case, file and problem."""


class ConfigError(SapError):
    """A configuration key is unknown, has the wrong type or a required value is missing."""


class CheckpointError(SapError):
    """A checkpoint is unreadable, unsafe, of the wrong task or incompatible with the model."""
