"""The filtering evaluation of docs/MATH.md §3: do uncertainty scores find bad images better than chance?

``run_evaluation(EvaluationConfig(...))`` generates N samples of a model (a bundled one, or a user's
model folder with its real images) once, scores them by every registered score on the same images,
compares filtering by each score with random removal (FID, KID, CMMD, PRDC over seeds) and detection
of a quality oracle's worst images (AUROC, Spearman), and writes figures and the model's section of
``EVALUATION.md``. Modules, one job each: ``config`` (settings), ``subject`` (what is evaluated),
``posteriors``, ``sources`` (how scores sample), ``registry`` (what a score is, the registry) and
``scores``/``inference_scores`` (what is compared),
``replay``, ``sweep``, ``cost``, ``progress``, ``generation``, ``cache``,
``oracle``, ``ranking``, ``analysis``, ``figures``, ``report``, ``pipeline``.

Importing this package loads only the settings (no torch), so that the command line's help can
show their defaults; ``run_evaluation`` loads the rest on first use.
"""

from bayesdiff_ext.evaluation.config import EvaluationConfig

__all__ = ["EvaluationConfig", "run_evaluation"]


def __getattr__(name: str):
    if name == "run_evaluation":
        from bayesdiff_ext.evaluation.pipeline import run_evaluation

        return run_evaluation
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
