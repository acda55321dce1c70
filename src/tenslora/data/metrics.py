"""Task scores from predictions, with scikit-learn: accuracy, Matthews correlation (CoLA), binary F1 (MRPC)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from .tasks import TaskSpec

METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy_score,
    "matthews_correlation": matthews_corrcoef,
    "f1": f1_score,  # binary: the F1 of class 1 (MRPC's "equivalent")
}
#: A causal LM's score on prompts and completions: greedy answers equal to the completion (app/generation.py).
GENERATION_METRICS = ("exact_match",)
#: Every score where higher is better: what a sweep records and compares.
SCORES = (*METRICS, *GENERATION_METRICS)
#: The score a task is judged on, the first of these it has: GLUE's own for CoLA (Matthews correlation, which a
#: majority-class guess cannot inflate as it does accuracy) and MRPC (F1), a causal LM's exact match, else accuracy.
MAIN_METRICS = ("matthews_correlation", "f1", "exact_match", "accuracy")


def main_metric(names: Sequence[str]) -> str:
    """Of a task's metric ``names``, the one it is judged on (``MAIN_METRICS``; else its first)."""
    return next((name for name in MAIN_METRICS if name in names), names[0])


def compute_metrics(spec: TaskSpec, predictions: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """The task's scores; ``predictions`` are class ids or logits (one row per example, argmax taken)."""
    predicted = np.asarray(predictions)
    if predicted.ndim == 2:
        predicted = predicted.argmax(axis=-1)
    labels = np.asarray(labels)
    return {name: float(METRICS[name](labels, predicted)) for name in spec.metrics}
