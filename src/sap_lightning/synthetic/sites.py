"""Scanner sites: what changes between centres (gain, noise, bias field), and who is scanned where.

The paper's healthy volunteers came from three centres and its patients from one; the cohort
does the same (docs/cohort.md section 2). A site changes only how a scan is acquired, never the
anatomy, the mimics or the lesions, and the patients' site is also one of the volunteers' sites,
so healthy and patient scans share one noise model except for these stated differences.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Site:
    """One centre's acquisition: per channel (T1, b1000) gain and noise, bias and station steps.

    ``noise`` is the Gaussian sigma of each quadrature channel (Rician magnitude) as a fraction
    of the channel scale; ``bias`` scales the smooth multiplicative field's amplitude;
    ``station_sd`` is the spread of the log gain between the stations of a whole-body DWI.
    """

    index: int
    gain: tuple[float, float]
    noise: tuple[float, float]
    bias: float
    station_sd: float


SITES: tuple[Site, ...] = (
    Site(0, gain=(1.00, 1.00), noise=(0.015, 0.018), bias=1.0, station_sd=0.08),
    Site(1, gain=(1.30, 0.80), noise=(0.012, 0.0225), bias=1.6, station_sd=0.12),
    Site(2, gain=(0.75, 1.20), noise=(0.018, 0.0153), bias=0.7, station_sd=0.05),
)
"""Sites of docs/cohort.md section 2 (assumptions): site 1 with stronger bias and noisier
diffusion, site 2 the other way."""

PATIENT_SITE = 0
"""Every patient is scanned at site 0, which also scans a third of the volunteers."""


def volunteer_site(volunteer: int) -> int:
    """The site of a healthy volunteer (all of their scans): volunteers 0, 3, 6 ... at site 0,
    1, 4, 7 ... at site 1, 2, 5, 8 ... at site 2."""
    return volunteer % len(SITES)
