"""The manifest's record of a merge beyond task arithmetic: the method, its chosen parameters, every setting tried,
and each merged task's accuracy retained from its own fine-tune (docs/contracts.md, `multi.merge`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from patcher.base.records import OMIT_NONE


@dataclass(frozen=True)
class MergeSetting:
    """One setting of a merge method's parameters tried on held-out data: its best coefficient and figures."""

    params: dict[str, float]
    coefficient: float
    val_patch_accuracy: float  # mean over the merged tasks at that coefficient
    val_worst_retained: float | None  # the lowest merged / own fine-tune held-out accuracy
    feasible: bool  # whether the rule held (supported tasks within tolerance, --min-retained)


@dataclass(frozen=True)
class MergeRecord:
    """Which merge method (patching/merge_methods.py), its chosen parameters, and every setting tried."""

    method: str
    title: str
    reference: str
    needs: str
    params: dict[str, float]
    seed: int
    min_retained: float | None
    own_val_accuracy: dict[str, float]  # each merged task under its own fine-tune
    own_test_accuracy: dict[str, float]
    val_retained: dict[str, float]  # patched / own, held-out
    test_retained: dict[str, float]  # patched / own, test
    worst_task: str  # the merged task with the lowest test_retained
    settings: list[MergeSetting]
    layerwise: dict[str, dict[str, float]] | None = field(default=None, metadata=OMIT_NONE)  # {task: {block: c}}
