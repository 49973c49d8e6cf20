"""The evaluation protocol: threshold tuning, FROC, bootstrap statistics, ICC, reports.

Reading prediction folders lives in :mod:`sap_lightning.evaluation.predictions` and the
comparison report in :mod:`sap_lightning.evaluation.report`; they are not imported here so that
the metrics package can use the statistics without an import cycle.
"""

from sap_lightning.evaluation.froc import froc_auc, froc_curve
from sap_lightning.evaluation.statistics import (
    Summary,
    bonferroni,
    bootstrap_ci,
    icc_2_1,
    mann_whitney,
    paired_wilcoxon,
    summarize,
)
from sap_lightning.evaluation.threshold import (
    ThresholdChoice,
    load_threshold,
    save_threshold,
    tune_threshold,
)

__all__ = [
    "Summary",
    "ThresholdChoice",
    "bonferroni",
    "bootstrap_ci",
    "froc_auc",
    "froc_curve",
    "icc_2_1",
    "load_threshold",
    "mann_whitney",
    "paired_wilcoxon",
    "save_threshold",
    "summarize",
    "tune_threshold",
]
