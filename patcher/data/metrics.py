"""Scores of one task from its confusion matrix: top-1, macro-F1, worst-class and per-class accuracy.

Everything is computed from counts (true class by predicted class), so scores summed over ranks, or over
shards, are exact. All figures are percentages. Macro-F1 follows scikit-learn's `f1_score(average="macro")`:
the mean F1 over every class that occurs as a label or a prediction, 0 where precision and recall are both 0.
Worst-class accuracy is the lowest recall over the classes that have at least one image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METRICS = ("accuracy", "macro_f1", "worst_class_accuracy")


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """[classes, classes] int64 counts: row = true class, column = predicted class."""
    labels, predicted = np.asarray(labels, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    return np.bincount(labels * classes + predicted, minlength=classes * classes).reshape(classes, classes)


@dataclass(frozen=True)
class Scores:
    """One task's confusion matrix and the metrics read from it."""

    confusion: np.ndarray  # [C, C] counts, rows true classes, columns predictions

    @property
    def total(self) -> int:
        """Images scored."""
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        """Top-1 accuracy (%), NaN without images."""
        total = self.total
        return 100.0 * int(np.trace(self.confusion)) / total if total else float("nan")

    @property
    def support(self) -> np.ndarray:
        """Images per true class."""
        return self.confusion.sum(axis=1)

    @property
    def per_class(self) -> list[float | None]:
        """Accuracy (recall, %) of each class; None for a class with no image."""
        correct = np.diag(self.confusion)
        return [100.0 * int(c) / int(n) if n else None for c, n in zip(correct, self.support, strict=True)]

    @property
    def worst_class_accuracy(self) -> float:
        """The lowest per-class accuracy (%) among classes with images, NaN without images."""
        present = [value for value in self.per_class if value is not None]
        return min(present) if present else float("nan")

    @property
    def macro_f1(self) -> float:
        """Macro-averaged F1 (%) over the classes that occur as labels or predictions, NaN without images."""
        correct = np.diag(self.confusion).astype(np.float64)
        support, predicted = self.support.astype(np.float64), self.confusion.sum(axis=0).astype(np.float64)
        present = (support + predicted) > 0
        if not present.any():
            return float("nan")
        denominator = support + predicted  # F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (support + predicted)
        f1 = np.divide(2 * correct, denominator, out=np.zeros_like(correct), where=denominator > 0)
        return 100.0 * float(f1[present].mean())

    def metrics(self) -> dict[str, float]:
        """Top-1, macro-F1 and worst-class accuracy by name (METRICS)."""
        return {name: getattr(self, name) for name in METRICS}
