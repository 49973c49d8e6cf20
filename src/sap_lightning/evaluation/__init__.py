"""The evaluation protocol: threshold tuning, FROC, bootstrap statistics, ICC, reports.

Reading prediction folders lives in :mod:`sap_lightning.evaluation.predictions` and the
comparison report in :mod:`sap_lightning.evaluation.report`. FROC and ICC are metrics
(:mod:`sap_lightning.metrics`); they are re-exported here for convenience.
"""

from sap_lightning.evaluation.endpoints import (
    PairedEffect,
    hodges_lehmann,
    observed_power,
    paired_effect,
    pooled_effect,
    wilcoxon_pratt,
)
from sap_lightning.evaluation.statistics import Summary, bonferroni, bootstrap_ci, summarize
from sap_lightning.evaluation.threshold import (
    ThresholdChoice,
    load_threshold,
    save_threshold,
    tune_threshold,
)
from sap_lightning.metrics.agreement import icc_2_1
from sap_lightning.metrics.froc import froc_auc, froc_curve

__all__ = [
    "PairedEffect",
    "Summary",
    "ThresholdChoice",
    "bonferroni",
    "bootstrap_ci",
    "froc_auc",
    "froc_curve",
    "hodges_lehmann",
    "icc_2_1",
    "load_threshold",
    "observed_power",
    "paired_effect",
    "pooled_effect",
    "save_threshold",
    "summarize",
    "tune_threshold",
    "wilcoxon_pratt",
]
