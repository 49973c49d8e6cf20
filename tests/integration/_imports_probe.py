"""``sap`` that reports the heavy libraries it loaded: ``python _imports_probe.py <sap arguments>``.

Runs ``sap_lightning.cli.main`` in this fresh process, then prints one last stdout line,
``IMPORTS-PROBE {json}``: the command's exit status and, for every library of ``WATCHED`` found
in ``sys.modules``, the ``sap_lightning`` frames (``file:line``, innermost first) that imported
it first, so a failing test names the import to make lazy. ``sys.modules`` decides; the frames
only explain.
"""

from __future__ import annotations

import importlib.abc
import json
import sys
import traceback
from collections.abc import Sequence
from importlib.machinery import ModuleSpec

WATCHED = ("torch", "lightning", "pytorch_lightning", "monai", "torchio", "torchmetrics")
MARKER = "IMPORTS-PROBE "


class _FirstImporter(importlib.abc.MetaPathFinder):
    """Records who imports each watched library first; finds nothing itself."""

    def __init__(self) -> None:
        self.importers: dict[str, list[str]] = {}

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: object = None
    ) -> ModuleSpec | None:
        top = name.partition(".")[0]
        if top in WATCHED and top not in self.importers:
            frames = [f for f in traceback.extract_stack() if "sap_lightning" in f.filename]
            self.importers[top] = [
                f"{f.filename.rpartition('sap_lightning')[2].lstrip('/')}:{f.lineno}"
                for f in reversed(frames)
            ]
        return None


def main(argv: list[str]) -> int:
    finder = _FirstImporter()
    sys.meta_path.insert(0, finder)
    from sap_lightning.cli import main as sap

    try:
        status = sap(argv)
    except SystemExit as stop:  # --help, a bad option
        status = stop.code if isinstance(stop.code, int) else 1
    loaded = {name: finder.importers.get(name, []) for name in WATCHED if name in sys.modules}
    sys.stdout.flush()
    print(MARKER + json.dumps({"status": status, "loaded": loaded}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
