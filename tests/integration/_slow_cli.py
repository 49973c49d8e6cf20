"""``sap`` whose preprocessing writes slowly: ``python _slow_cli.py SECONDS <sap arguments>``.

Each cached array takes ``SECONDS`` longer to write, as a whole-body case on a network file system
does, so that processes started together really overlap while their temporary case folders
exist (tiny test cases are otherwise written faster than the processes start).
"""

from __future__ import annotations

import sys
import time

import sap_lightning.cache.build as build
from sap_lightning.cli import main

if __name__ == "__main__":
    delay = float(sys.argv[1])
    save_array = build._save_array

    def slow_save_array(path, array):  # type: ignore[no-untyped-def]
        save_array(path, array)
        time.sleep(delay)

    build._save_array = slow_save_array
    sys.exit(main(sys.argv[2:]))
