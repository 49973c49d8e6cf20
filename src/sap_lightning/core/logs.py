"""Console logging of the ``sap`` command line and of the study's worker processes."""

from __future__ import annotations

import logging


def configure_logging(verbose: bool = False) -> None:
    """One line per message. The ``lightning`` package attaches its own console handler when
    imported; its records stop there instead of reaching the root handler a second time."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("lightning").propagate = False
