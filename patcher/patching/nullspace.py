"""Keeping a merged task vector out of the supported tasks' input subspaces (AlphaEdit's null-space projection).

For a weight W (out x in) with bias b, the merged change [dW db] moves the layer's output on an input x by
[dW db] [x; 1]. With C the supported tasks' second moment of [x; 1] (`activation_stats.py`) and U_k its eigenvectors
covering a share `energy` of its trace, [dW db] (I - U_k U_k^T) leaves the output on every input in span(U_k)
unchanged: the merge no longer moves the supported tasks' features through that layer, as far as their inputs lie in
that span (Fang et al., AlphaEdit, ICLR 2025, who keep the directions of the eigenvalues below a threshold; here the
share of the trace is the hyperparameter, searched on held-out data). Tensors that are no linear map's weight or bias
(layer norms, embeddings) keep the method's delta.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from patcher.patching.activation_stats import Moments
from patcher.patching.merge_methods import TRANSPOSED


def protected_basis(moment: torch.Tensor, energy: float) -> torch.Tensor:
    """[d, k]: the top eigenvectors of a symmetric positive semi-definite `moment` whose eigenvalues sum to at least
    `energy` of its trace (k = 0 for energy 0, every direction for energy 1)."""
    values, vectors = torch.linalg.eigh(moment.double())
    values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)
    total = float(values.sum())
    if energy <= 0 or total <= 0:
        return vectors[:, :0]
    shares = values.cumsum(0) / total
    count = int(torch.searchsorted(shares, torch.tensor(energy, dtype=shares.dtype) - 1e-12)) + 1
    return vectors[:, :min(count, len(values))]


def project(change: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """change (I - U U^T) for change [out, d] and basis U [d, k]: zero on span(U), unchanged on its complement."""
    if basis.shape[1] == 0:
        return change
    wide = change.double()
    return (wide - (wide @ basis.double()) @ basis.double().T).to(change.dtype)


def bias_key(weight_key: str) -> str:
    """The bias beside a weight: `...in_proj_weight` -> `...in_proj_bias`, `...weight` -> `...bias`."""
    return weight_key[: -len("weight")] + "bias" if weight_key.endswith("weight") else weight_key + "_bias"


def protect(delta: Mapping[str, torch.Tensor], moments: Moments, energy: float) -> tuple[dict[str, torch.Tensor],
                                                                                             dict[str, int]]:
    """The delta with each linear map's [dW db] projected off its protected subspace; and the number of protected
    directions per weight."""
    projected = dict(delta)
    ranks: dict[str, int] = {}
    for key, moment in moments.items():
        if key not in delta:
            continue
        transposed = key in TRANSPOSED
        weight = delta[key].T if transposed else delta[key]
        change = weight.reshape(weight.shape[0], -1)
        inputs = change.shape[1]
        bias = bias_key(key)
        joint = bias in delta and not transposed
        if joint:
            change = torch.cat([change, delta[bias].reshape(-1, 1)], dim=1)
        basis = protected_basis(moment if joint else moment[:inputs, :inputs], energy)
        ranks[key] = basis.shape[1]
        change = project(change.float(), basis)
        new_weight = change[:, :inputs].reshape(weight.shape)
        projected[key] = new_weight.T.contiguous() if transposed else new_weight
        if joint:
            projected[bias] = change[:, inputs].reshape(delta[bias].shape)
    return projected, ranks
