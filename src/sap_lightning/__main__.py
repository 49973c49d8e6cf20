"""``python -m sap_lightning`` is the same as ``sap``."""

import sys

from sap_lightning.cli import main

sys.exit(main())
