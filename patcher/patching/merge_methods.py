"""Merge methods: how N task vectors become one, each declaring its parameters (with search grids), its reference
(paper and authors' code) and the data it needs, as mergekit's registry does (mergekit/merge_methods/registry.py).

Every method here returns a merged task vector `delta` (one tensor per key); the merged model is
base + coefficient * delta, the coefficient and the method's parameters chosen on held-out data under PAINT's rule
(`patching/merge_search.py`). The tensor functions follow the authors' computations, and tests/test_merge_methods.py
checks each against a transcription of the reference code on random tensors. The learnt layer-wise methods
(AdaMerging) are in `patching/layerwise.py`; their entries here carry no `combine`.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from patcher.base.errors import PatcherError
from patcher.base.registries import Parameter, Registry
from patcher.patching.sources import TaskVectors

Delta = dict[str, torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: what it computes, its parameters, where it comes from, what data it needs."""

    name: str
    title: str
    paper: str
    code: str
    needs: str
    parameters: tuple[Parameter, ...] = ()
    combine: Callable[[TaskVectors, Mapping[str, float], int], Delta] | None = None
    learnt: str | None = None  # the loss of a learnt method: "entropy" (unlabelled) or "cross-entropy"
    protect: bool = False  # its delta projected off the supported tasks' input subspaces (patching/nullspace.py)
    notes: str = field(default="", compare=False)

    def settings(self, fixed: Mapping[str, float] | None = None) -> list[dict[str, float]]:
        """Every combination of the parameter grids, a parameter in `fixed` held at its value."""
        fixed = dict(fixed or {})
        unknown = sorted(set(fixed) - {p.name for p in self.parameters})
        if unknown:
            names = ", ".join(p.name for p in self.parameters) or "none"
            raise PatcherError(f"--param {unknown[0]}: {self.name} has no such parameter (its parameters: {names})")
        grids = [(fixed[p.name],) if p.name in fixed else p.grid for p in self.parameters]
        return [{p.name: (int(v) if p.integer else float(v)) for p, v in zip(self.parameters, values, strict=True)}
                for values in itertools.product(*grids)]

    @property
    def summary(self) -> str:
        """One line on what it computes (the registry's shape)."""
        return self.title

    @property
    def reference(self) -> str:
        """Paper and code, as the manifest records them."""
        return f"{self.paper}; code: {self.code}"


# ---- task arithmetic ----------------------------------------------------------------------------------------------

def task_arithmetic_delta(vectors: TaskVectors, params: Mapping[str, float], seed: int) -> Delta:
    """The sum of the task vectors (Ilharco et al., 2023)."""
    return {key: vectors.stacked(key).sum(0) for key in vectors.keys}


# ---- TIES-Merging -------------------------------------------------------------------------------------------------

def ties_thresholds(vectors: TaskVectors, density: float) -> list[float]:
    """Each run's magnitude threshold keeping its top `density` share of the whole flattened task vector."""
    thresholds = []
    total = vectors.numel
    rank = total - int(total * density)  # the reference's k = d - int(d * K), a 1-based rank from the smallest
    for run in range(vectors.count):
        if rank < 1:
            thresholds.append(0.0)
            continue
        magnitudes = torch.empty(total)  # filled tensor by tensor: one flat copy of one run, no list to concatenate
        start = 0
        for piece in vectors.flat(run):
            magnitudes[start:start + piece.numel()] = piece.abs()
            start += piece.numel()
        thresholds.append(float(magnitudes.kthvalue(rank).values))
        del magnitudes
    return thresholds


def ties_trim(stacked: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    """Each run's entries below its threshold set to zero."""
    limits = torch.tensor(thresholds, dtype=stacked.dtype).reshape(-1, *([1] * (stacked.dim() - 1)))
    return stacked * (stacked.abs() >= limits)


def ties_elected_sign(trimmed: torch.Tensor, majority: float) -> torch.Tensor:
    """The sign of the summed trimmed vectors; where that is 0, the majority sign over the whole model."""
    sign = torch.sign(trimmed.sum(0))
    return torch.where(sign == 0, torch.full_like(sign, majority), sign)


def ties_disjoint_mean(trimmed: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """The mean of the entries whose sign agrees with the elected sign (0 where none does)."""
    keep = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * keep
    return selected.sum(0) / (selected != 0).sum(0).float().clamp(min=1)


def ties_delta(vectors: TaskVectors, params: Mapping[str, float], seed: int) -> Delta:
    """Trim each task vector to its top-k magnitudes, elect a sign per entry, average the agreeing entries."""
    thresholds = ties_thresholds(vectors, float(params["density"]))
    sign_total = sum(float(torch.sign(ties_trim(vectors.stacked(key), thresholds).sum(0)).sum())
                     for key in vectors.keys)
    majority = float(torch.sign(torch.tensor(sign_total)))
    delta = {}
    for key in vectors.keys:
        trimmed = ties_trim(vectors.stacked(key), thresholds)
        delta[key] = ties_disjoint_mean(trimmed, ties_elected_sign(trimmed, majority))
    return delta


# ---- DARE ---------------------------------------------------------------------------------------------------------

def dare_generator(seed: int, run: int, key: str) -> torch.Generator:
    """The seeded generator behind one run's drop mask of one key (the same merge gives the same masks)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + run * 7_919 + zlib.crc32(key.encode())) % 2**62)


def dare_drop(vector: torch.Tensor, drop: float, generator: torch.Generator) -> torch.Tensor:
    """Drop each entry with probability `drop` and rescale the rest by 1 / (1 - drop)."""
    mask = torch.bernoulli(torch.full_like(vector, drop), generator=generator)
    kept = vector * (1 - mask)
    return kept if drop == 1.0 else kept / (1 - drop)


def dare_delta(vectors: TaskVectors, params: Mapping[str, float], seed: int) -> Delta:
    """DARE on each task vector, then their sum (DARE with task arithmetic)."""
    drop = float(params["drop"])
    return {key: sum(dare_drop(vectors.vector(run, key), drop, dare_generator(seed, run, key))
                     for run in range(vectors.count)) for key in vectors.keys}


# ---- Model Breadcrumbs --------------------------------------------------------------------------------------------

def breadcrumbs_mask(vector: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Per tensor: drop the `gamma` share of largest magnitudes, then the smallest, keeping `density` of it."""
    if density >= 1:
        return torch.ones_like(vector, dtype=torch.bool)
    count = vector.numel()
    keep = int(density * count)
    top = int(gamma * count)
    bottom = count - keep - top
    if bottom < 0:
        top, bottom = top + bottom, 0
    order = torch.sort(vector.abs().reshape(-1), descending=False).indices
    mask = torch.zeros(count, dtype=torch.bool)
    mask[order[bottom:count - top]] = True
    return mask.reshape(vector.shape)


def breadcrumbs_delta(vectors: TaskVectors, params: Mapping[str, float], seed: int) -> Delta:
    """Breadcrumbs masks on each task vector, then their sum."""
    density, gamma = float(params["density"]), float(params["gamma"])
    delta = {}
    for key in vectors.keys:
        total = torch.zeros_like(vectors.base[key], dtype=torch.float32)
        for run in range(vectors.count):
            vector = vectors.vector(run, key)
            total += vector * breadcrumbs_mask(vector, density, gamma)
        delta[key] = total
    return delta


# ---- TALL masks and Consensus Merging -----------------------------------------------------------------------------

def tall_masks(stacked: torch.Tensor, tall_lambda: float) -> torch.Tensor:
    """[N, ...] TALL masks: |tau_t| > |tau_MTL - tau_t| * lambda, tau_MTL the sum of the task vectors."""
    multi = stacked.sum(0, keepdim=True)
    return stacked.abs() > (multi - stacked).abs() * tall_lambda


def consensus_tensor(stacked: torch.Tensor, tall_lambda: float, agreement: int) -> torch.Tensor:
    """The summed task vectors where at least `agreement` tasks' TALL masks hold, zero elsewhere."""
    votes = tall_masks(stacked, tall_lambda).float().sum(0)
    return stacked.sum(0) * (votes >= agreement)


def consensus_delta(vectors: TaskVectors, params: Mapping[str, float], seed: int) -> Delta:
    """Consensus merging: task arithmetic with the weights fewer than k tasks rely on removed."""
    tall_lambda, agreement = float(params["tall_lambda"]), int(params["agreement"])
    return {key: consensus_tensor(vectors.stacked(key), tall_lambda, agreement) for key in vectors.keys}


# ---- WUDI-Merging -------------------------------------------------------------------------------------------------

# open_clip stores these projections as [in, out] (x @ proj), not nn.Linear's [out, in]: WUDI works on their transpose
TRANSPOSED = ("visual.proj", "text_projection")


def wudi_statistics(vectors: TaskVectors, key: str, transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor,
                                                                                       torch.Tensor]:
    """(sum of the task vectors, G, B) of one matrix, streamed one run at a time: WUDI's objective
    sum_i ||(tau - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2 is tr(tau G tau^T) - 2 tr(tau B^T) + const with
    G = sum_i tau_i^T tau_i / ||tau_i||^2 and B = sum_i tau_i tau_i^T tau_i / ||tau_i||^2, so its gradient
    2 (tau G - B) needs neither all N task vectors at once nor their product at every step (runs that left the
    matrix unchanged add nothing, where the authors' code would divide 0 by 0)."""
    total = gram = target = None
    for run in range(vectors.count):
        vector = vectors.vector(run, key)
        vector = vector.T if transpose else vector
        if total is None:
            total = torch.zeros_like(vector)
            gram = torch.zeros(vector.shape[1], vector.shape[1])
            target = torch.zeros_like(vector)
        total += vector
        norm = float(vector.square().sum())
        if norm > 0:
            product = vector.T @ vector / norm
            gram += product
            target += vector @ product
    assert total is not None and gram is not None and target is not None
    return total, gram, target


def wudi_matrix(total: torch.Tensor, gram: torch.Tensor, target: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """The authors' optimisation: Adam (lr, no weight decay) from the sum of the task vectors, `steps` steps on
    WUDI's objective, its gradient 2 (tau G - B)."""
    merged = torch.nn.Parameter(total.clone())
    optimiser = torch.optim.Adam([merged], lr=lr, weight_decay=0)
    for _ in range(steps):
        optimiser.zero_grad()
        merged.grad = 2 * (merged.detach() @ gram - target)
        optimiser.step()
    return merged.detach()


def wudi_objective(merged: torch.Tensor, gram: torch.Tensor, target: torch.Tensor, constant: float = 0.0) -> float:
    """WUDI's objective from the streamed statistics, up to the constant sum_i ||tau_i tau_i^T||^2 / ||tau_i||^2."""
    return float((merged @ gram * merged).sum() - 2 * (merged * target).sum()) + constant


def wudi_delta(vectors: TaskVectors, params: Mapping[str, float], seed: int) -> Delta:
    """WUDI-Merging: each matrix the minimiser (a few hundred Adam steps) of its interference with every task's
    subspace; other tensors (biases, norms, conv1) the mean of the task vectors that changed them, as the authors'
    code does."""
    steps, lr = int(params["steps"]), float(params["lr"])
    delta = {}
    for key in vectors.keys:
        if vectors.base[key].dim() == 2:
            transpose = key in TRANSPOSED
            merged = wudi_matrix(*wudi_statistics(vectors, key, transpose), steps, lr)
            delta[key] = merged.T.contiguous() if transpose else merged
            continue
        total = torch.zeros_like(vectors.base[key], dtype=torch.float32)
        changed = 0
        for run in range(vectors.count):
            vector = vectors.vector(run, key)
            changed += bool(torch.any(vector != 0))
            total += vector
        delta[key] = total / max(changed, 1)
    return delta


# ---- the registry -------------------------------------------------------------------------------------------------

HELDOUT = "labelled held-out images of every merged and supported task (the coefficient and parameters are chosen)"
LAYERWISE = (Parameter(name="steps", default=60, grid=(60,), help="optimiser steps", integer=True),
             Parameter(name="lr", default=0.05, grid=(0.05,), help="Adam learning rate of the coefficients"),
             Parameter(name="init", default=0.3, grid=(0.3,), help="initial coefficient of every task and block"))

METHODS: Registry[MergeMethod] = Registry("merge method", (
    MergeMethod("task-arithmetic", "Task arithmetic", "Ilharco et al., Editing models with task arithmetic, "
                "ICLR 2023 (arXiv:2212.04089)", "https://github.com/mlfoundations/task_vectors", HELDOUT,
                combine=task_arithmetic_delta),
    MergeMethod("ties", "TIES-Merging", "Yadav et al., TIES-Merging, NeurIPS 2023 (arXiv:2306.01708)",
                "https://github.com/prateeky2806/ties-merging", HELDOUT,
                (Parameter(name="density", default=0.2, grid=(0.1, 0.2, 0.5),
                           help="share of each flattened task vector kept (top-k)"),),
                combine=ties_delta),
    MergeMethod("dare", "DARE (drop and rescale) + task arithmetic", "Yu et al., Language models are Super Mario, "
                "ICML 2024 (arXiv:2311.03099)", "https://github.com/yule-BUAA/MergeLM", HELDOUT,
                (Parameter(name="drop", default=0.9, grid=(0.5, 0.9), help="probability of dropping each entry"),),
                combine=dare_delta),
    MergeMethod("breadcrumbs", "Model Breadcrumbs", "Davari and Belilovsky, Model Breadcrumbs, ECCV 2024 "
                "(arXiv:2312.06795)", "https://github.com/arcee-ai/mergekit (sparsify.magnitude_outliers)", HELDOUT,
                (Parameter(name="density", default=0.2, grid=(0.1, 0.2, 0.5), help="share of each tensor kept"),
                 Parameter(name="gamma", default=0.01, grid=(0.01,),
                           help="share of each tensor's largest magnitudes dropped")),
                combine=breadcrumbs_delta),
    MergeMethod("consensus", "Consensus merging (TALL masks)", "Wang et al., Localizing task information for "
                "improved model merging and compression, ICML 2024 (arXiv:2405.07813)",
                "https://github.com/nik-dim/tall_masks; https://github.com/tanganke/fusion_bench", HELDOUT,
                (Parameter(name="tall_lambda", default=0.6, grid=(0.4, 0.6), help="TALL mask threshold lambda"),
                 Parameter(name="agreement", default=2, grid=(2,), help="tasks whose masks must hold to keep a weight",
                           integer=True)),
                combine=consensus_delta),
    MergeMethod("wudi", "WUDI-Merging (data-free interference minimisation)", "Cheng et al., Whoever started "
                "the interference should end it: guiding data-free model merging via task vectors, ICML 2025 "
                "(arXiv:2503.08099)", "https://github.com/nathanielyvo/WUDI-Merging; https://github.com/tanganke/"
                "fusion_bench (fusion_bench/method/wudi/wudi.py)", "no data to merge (weights only); labelled "
                "held-out images only for patcher's coefficient and PAINT's rule",
                (Parameter(name="steps", default=300, grid=(300,), help="Adam steps per matrix (the authors' iter_num)",
                           integer=True),
                 Parameter(name="lr", default=1e-5, grid=(1e-5, 1e-4), help="Adam learning rate (the authors' 1e-5, "
                           "tuned for ViT-B/32's task-vector scale)")),
                combine=wudi_delta),
    MergeMethod("layerwise", "Layer-wise AdaMerging (entropy, unlabelled)", "Yang et al., AdaMerging, ICLR 2024 "
                "(arXiv:2310.02575)", "https://github.com/EnnengYang/AdaMerging; https://github.com/tanganke/"
                "fusion_bench", "unlabelled held-out images (entropy minimisation; labels never read) to learn one "
                "coefficient per task and block; labelled held-out to bound it by PAINT's rule", LAYERWISE,
                learnt="entropy"),
    MergeMethod("layerwise-labelled", "Layer-wise coefficients, cross-entropy (labelled)", "AdaMerging's "
                "parametrisation trained on labels (Yang et al., 2024)", "https://github.com/EnnengYang/AdaMerging",
                "labelled held-out images, to learn the coefficients and to bound them by PAINT's rule", LAYERWISE,
                learnt="cross-entropy"),
))


NULLSPACE = Parameter(name="energy", default=0.9, grid=(0.7, 0.8, 0.9, 0.95),
                      help="share of the supported tasks' input second moment (its trace) whose directions each "
                      "layer's merged change is kept out of")


def nullspace_variant(method: MergeMethod) -> MergeMethod:
    """`method`, its delta then projected off the supported tasks' input subspaces, layer by layer (AlphaEdit's
    null-space projection on RegMean's input statistics); `energy` searched with its own parameters."""
    return MergeMethod(
        name=f"{method.name}-nullspace", title=f"{method.title}, kept out of the supported tasks' input subspaces",
        paper=f"{method.paper}; projected as AlphaEdit does (Fang et al., AlphaEdit: null-space constrained knowledge "
        "editing, ICLR 2025, arXiv:2410.02355) on RegMean's input statistics (Jin et al., Dataless knowledge fusion "
        "by merging weights of language models, ICLR 2023, arXiv:2212.09849)",
        code=f"{method.code}; https://github.com/jianghoucheng/AlphaEdit; https://github.com/bloomberg/dataless-"
        "model-merging",
        needs=f"{method.needs}; unlabelled held-out images of the supported tasks (their inputs to every layer of the "
        "zero-shot encoder; labels never read)",
        parameters=(*method.parameters, NULLSPACE), combine=method.combine, protect=True)


for _base in [m for m in METHODS.values() if m.combine is not None]:
    METHODS.add(nullspace_variant(_base))
del _base


def get_method(name: str) -> MergeMethod:
    """A registered method by name; PatcherError naming the registered ones otherwise."""
    return METHODS.entry(name)


def parse_params(method: MergeMethod, entries: list[str]) -> dict[str, float]:
    """--param KEY=VALUE entries as numbers for this method's parameters; PatcherError otherwise."""
    values: dict[str, float] = {}
    for entry in entries:
        key, separator, text = entry.partition("=")
        if not separator or not key.strip():
            raise PatcherError(f"--param {entry!r} is not KEY=VALUE: e.g. --param density=0.2")
        try:
            values[key.strip()] = float(text)
        except ValueError:
            raise PatcherError(f"--param {entry!r}: {text!r} is not a number") from None
    method.settings(values)  # refuses unknown names
    return values
