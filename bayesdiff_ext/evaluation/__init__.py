"""The filtering evaluation of docs/MATH.md §3: do uncertainty scores find bad images better than chance?

``run_evaluation(EvaluationConfig(...))`` generates N samples of the bundled digits model once,
scores them by every method on the same images, compares filtering by each score with random
removal (FID, KID, CMMD, PRDC over seeds) and detection of the quality oracle's worst images
(AUROC, Spearman), and writes figures and ``EVALUATION.md``. Modules, one job each: ``methods``
(what is compared), ``replay`` (one UNet pass shared by all posteriors), ``posteriors``,
``weight_samples``, ``free_baseline``, ``sweep``, ``cost``, ``generation``, ``oracle``, ``ranking``,
``analysis``, ``figures``, ``report``, ``pipeline``.
"""

from bayesdiff_ext.evaluation.config import EvaluationConfig
from bayesdiff_ext.evaluation.pipeline import run_evaluation

__all__ = ["EvaluationConfig", "run_evaluation"]
