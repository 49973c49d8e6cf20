"""Cached cases as the patch planners and patch datasets read them, opened once per process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sap_lightning.cache.reader import CachedCase, PreprocessedCache


class CaseStore:
    """Cached cases opened memory-mapped on first use and kept open in this process.

    Opened memory maps are dropped when the store is pickled (a ``spawn`` worker would
    otherwise copy whole volumes into the pickle); each process reopens what it reads.
    """

    def __init__(self, cache: PreprocessedCache) -> None:
        self.cache = cache
        self._open: dict[str, CachedCase] = {}

    @property
    def root(self) -> Path:
        return self.cache.root

    def meta(self, case_id: str) -> dict[str, Any]:
        return self.cache.meta(case_id)

    def get(self, case_id: str) -> CachedCase:
        case = self._open.get(case_id)
        if case is None:
            case = self._open[case_id] = self.cache.load(case_id, mmap=True)
        return case

    def __getstate__(self) -> dict[str, Any]:
        return {"cache": self.cache, "_open": {}}
