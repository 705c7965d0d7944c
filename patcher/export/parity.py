"""The parity rule: when an exported model counts as the PyTorch classifier it came from, on any CPU.

A lower-precision graph (or another CPU's float path) moves every logit a little. Where the float32 reference's
two best classes are nearly tied, that can flip the top-1 class without anything being wrong, so counting every
flip makes the gate pass or fail by CPU model. The rule therefore judges top-1 agreement only on images where
the reference is decisive, and every task's accuracy on all images:

- margin: the reference's top-1 logit minus its top-2, divided by the head's logit scale (cosine units, so the
  threshold means the same for every model); an image is decisive when its margin exceeds the precision's
  `decisive_margin`, chosen many times larger than the error that precision shows on any CPU measured;
- on decisive images, top-1 agreement must reach `min_agreement`; a broken export (other weights, a wrong head,
  a wrong normalisation) changes the top-1 of decisive images and fails here;
- on all images, the task's accuracy must stay within `accuracy_tolerance` points of the reference's (at least
  two images' worth, the finest difference a split of n images resolves);
- float32 only: every output's largest absolute difference stays within `max_abs_diff`.

Pure numpy, so that a reader of export.json can recompute a verdict without torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np


@dataclass(frozen=True)
class PrecisionRule:
    """Pass marks for one precision (export.json records them beside each report)."""

    decisive_margin: float  # cosine units: an image is judged on top-1 when its reference margin exceeds this
    min_agreement: float  # percent top-1 agreement required on decisive images
    accuracy_tolerance: float  # points of accuracy (per task, all images) the export may differ by, at least
    max_abs_diff: float | None = None  # largest |difference| of any output value (float32 only)

    def record(self) -> dict[str, Any]:
        """The rule as export.json stores it."""
        return asdict(self)


# fp32: onnxruntime and PyTorch differ by ~1e-6 in cosine units on the CPUs measured; the 1e-3 absolute bound
# keeps the old gate's strength. fp16: 9e-4 measured on an AMD EPYC (demo model); 0.05 leaves a factor of 50
# for CPUs whose half-precision kernels accumulate in fp16 (Intel AVX-512 FP16). int8 (dynamic quantisation):
# 0.029 measured at most on the AMD EPYC (AVX2, whose u8s8 products can saturate; VNNI and AMX cannot); 0.1 leaves
# a factor of 3.4. A decisive image can only flip when one logit moves by more than half the margin.
RULES: dict[str, PrecisionRule] = {
    "fp32": PrecisionRule(decisive_margin=1e-4, min_agreement=100.0, accuracy_tolerance=1.0, max_abs_diff=1e-3),
    "fp16": PrecisionRule(decisive_margin=0.05, min_agreement=99.5, accuracy_tolerance=1.0),
    "int8": PrecisionRule(decisive_margin=0.1, min_agreement=99.5, accuracy_tolerance=1.0),
}
SMALLEST_RESOLVED_IMAGES = 2  # the accuracy tolerance is at least this many images' worth of a task's split


def rule_for(precision: str, accuracy_tolerance: float | None = None) -> PrecisionRule:
    """The pass marks of a precision, with the user's accuracy tolerance (points) where one is given; KeyError for
    a precision the exporter does not write."""
    rule = RULES[precision]
    return rule if accuracy_tolerance is None else replace(rule, accuracy_tolerance=float(accuracy_tolerance))


def margins(reference: np.ndarray, scale: float) -> np.ndarray:
    """Per row: (top-1 logit - top-2 logit) / scale; infinite for a single-class head."""
    if reference.shape[1] < 2:
        return np.full(len(reference), np.inf)
    top = np.sort(reference, axis=1)[:, -2:]
    return (top[:, 1] - top[:, 0]) / scale


def task_parity(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray, scale: float,
                rule: PrecisionRule) -> dict[str, Any]:
    """One task's figures: top-1 agreement overall and on decisive images, accuracies, the largest error."""
    want, got = reference.argmax(axis=1), candidate.argmax(axis=1)
    decisive = margins(reference, scale) > rule.decisive_margin
    agree = got == want
    count = len(labels)
    return {
        "images": count,
        "decisive_images": int(decisive.sum()),
        "top1_agreement": round(float(agree.mean() * 100), 3),
        "decisive_top1_agreement": round(float(agree[decisive].mean() * 100), 3) if decisive.any() else None,
        "accuracy": round(float((got == labels).mean() * 100), 3),
        "torch_accuracy": round(float((want == labels).mean() * 100), 3),
        "accuracy_tolerance": round(max(rule.accuracy_tolerance, 100.0 * SMALLEST_RESOLVED_IMAGES / count), 3),
        "max_cosine_error": float(np.abs(candidate - reference).max() / scale),
        "logit_scale": float(scale),
    }


def failures(tasks: Mapping[str, Mapping[str, Any]], max_abs_diff: Mapping[str, float],
             rule: PrecisionRule) -> list[str]:
    """What misses its pass mark, as short phrases with the numbers; empty when the model passes."""
    problems = []
    if rule.max_abs_diff is not None:
        problems += [f"max |{name} diff| {diff:.2e} > {rule.max_abs_diff:g}"
                     for name, diff in max_abs_diff.items() if not diff <= rule.max_abs_diff]
    for task, report in tasks.items():
        agreement = report["decisive_top1_agreement"]
        if agreement is not None and agreement < rule.min_agreement:
            problems.append(f"{task} top-1 agreement {agreement:.2f}% < {rule.min_agreement:g}% on the "
                            f"{report['decisive_images']} images where float32 is decisive")
        gap = abs(report["accuracy"] - report["torch_accuracy"])
        if not gap <= report["accuracy_tolerance"]:
            problems.append(f"{task} accuracy {report['accuracy']:.2f}% vs {report['torch_accuracy']:.2f}% in "
                            f"PyTorch (more than {report['accuracy_tolerance']:g} points apart)")
    return problems
