"""The evaluation protocol: threshold tuning, FROC, bootstrap statistics, ICC, reports.

Reading prediction folders lives in :mod:`sap_lightning.evaluation.predictions` and the
comparison report in :mod:`sap_lightning.evaluation.report`. FROC and ICC are metrics
(:mod:`sap_lightning.metrics`); they are re-exported here for convenience.
"""

from sap_lightning.evaluation.statistics import (
    Summary,
    bonferroni,
    bootstrap_ci,
    mann_whitney,
    paired_wilcoxon,
    paired_wilcoxon_power,
    summarize,
)
from sap_lightning.evaluation.threshold import (
    ThresholdChoice,
    load_threshold,
    save_threshold,
    tune_threshold,
)
from sap_lightning.metrics.agreement import icc_2_1
from sap_lightning.metrics.froc import froc_auc, froc_curve

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
    "paired_wilcoxon_power",
    "save_threshold",
    "summarize",
    "tune_threshold",
]
