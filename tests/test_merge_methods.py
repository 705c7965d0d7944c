"""Each merge method against a few-line transcription of its authors' computation, on random tensors, within 1e-6.

The references (read from the authors' repositories, not vendored) are transcribed in `reference_*` below, each
citing the file and function it follows; patcher's implementation streams one tensor of each run at a time, the
references work on the flattened model, so agreement also shows the streaming changes nothing.
"""

from __future__ import annotations

import pytest
import torch

from patcher.base.errors import PatcherError
from patcher.patching.merge_methods import (
    METHODS,
    breadcrumbs_delta,
    breadcrumbs_mask,
    consensus_delta,
    dare_delta,
    dare_drop,
    dare_generator,
    get_method,
    parse_params,
    task_arithmetic_delta,
    ties_delta,
    wudi_delta,
    wudi_matrix,
    wudi_objective,
    wudi_statistics,
)
from patcher.patching.sources import FileVectors, StateVectors, TensorFile

SHAPES = {"a.weight": (7, 5), "a.bias": (7,), "b.weight": (3, 4, 2), "c": (11,)}


def random_states(runs: int, seed: int = 0) -> tuple[dict, list[dict]]:
    generator = torch.Generator().manual_seed(seed)
    base = {key: torch.randn(shape, generator=generator) for key, shape in SHAPES.items()}
    finetuned = [{key: value + 0.1 * torch.randn(value.shape, generator=generator) for key, value in base.items()}
                 for _ in range(runs)]
    return base, finetuned


def flatten(state: dict) -> torch.Tensor:
    """ties-merging src/ties_minimal.ipynb, state_dict_to_vector: keys sorted, values flattened and concatenated."""
    return torch.cat([state[key].reshape(-1) for key in sorted(state)])


def unflatten(vector: torch.Tensor, like: dict) -> dict:
    out, start = {}, 0
    for key in sorted(like):
        out[key] = vector[start:start + like[key].numel()].reshape(like[key].shape)
        start += like[key].numel()
    return out


def reference_ties(flat: torch.Tensor, density: float) -> torch.Tensor:
    """prateeky2806/ties-merging src/ties_minimal.ipynb: topk_values_mask, resolve_sign (+ resolve_zero_signs
    'majority'), disjoint_merge 'mean', as called by ties_merging(reset_thresh=K, merge_func='dis-mean')."""
    _n, d = flat.shape
    k = d - int(d * density)
    kth, _ = flat.abs().kthvalue(k, dim=1, keepdim=True)
    trimmed = flat * (flat.abs() >= kth)
    sign = torch.sign(trimmed.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    keep = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * keep
    return selected.sum(dim=0) / torch.clamp((selected != 0).sum(dim=0).float(), min=1)


def reference_dare(tensor: torch.Tensor, rate: float) -> torch.Tensor:
    """yule-BUAA/MergeLM model_merging_methods/mask_weights_utils.py, mask_input_with_mask_rate(strategy='random',
    use_rescale=True)."""
    mask = torch.bernoulli(torch.full_like(input=tensor, fill_value=rate))
    return torch.div(input=tensor * (1 - mask), other=1 - rate)


def reference_breadcrumbs(tensor: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """arcee-ai/mergekit mergekit/sparsify.py, magnitude_outliers(rescale=False), which mergekit registers as
    'breadcrumbs' (mergekit/merge_methods/registry.py)."""
    num = tensor.numel()
    target, n_top = int(density * num), int(gamma * num)
    n_bot = num - target - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    indices = torch.sort(tensor.abs().view(-1).float(), descending=False).indices
    mask = torch.zeros_like(tensor)
    mask.view(-1)[indices[n_bot:-n_top]] = 1
    return tensor * mask


def reference_consensus(flat_tv: torch.Tensor, flat_ft: torch.Tensor, flat_ptm: torch.Tensor, tall_lambda: float,
                        k: int) -> torch.Tensor:
    """tanganke/fusion_bench fusion_bench/method/tall_mask/utils.py: generate_task_masks (|theta_0 - theta_t| >
    |theta_mt - theta_t| * lambda, theta_mt = theta_0 + sum of task vectors) and construct_consensus_mask (count of
    masks >= k), applied to the task-arithmetic vector as consensus task arithmetic does."""
    flat_multi = flat_ptm + flat_tv.sum(0)
    masks = (flat_ptm - flat_ft).abs() > (flat_multi - flat_ft).abs() * tall_lambda
    consensus = masks.float().sum(0) >= k
    return flat_tv.sum(0) * consensus


def reference_wudi_loss(merged: torch.Tensor, tvs: torch.Tensor) -> torch.Tensor:
    """tanganke/fusion_bench fusion_bench/method/wudi/wudi.py, wudi_merging (as nathanielyvo/WUDI-Merging's
    get_redundant_task_vector): the loss of one 2-D key, tvs stacked [N, out, in]."""
    l2_norms = torch.square(torch.norm(tvs.reshape(tvs.shape[0], -1), p=2, dim=-1))
    disturbing_vectors = merged.unsqueeze(0) - tvs
    product = torch.matmul(disturbing_vectors, tvs.transpose(1, 2))
    return torch.sum(torch.square(product) / l2_norms.unsqueeze(-1).unsqueeze(-1))


def reference_wudi(tvs: torch.Tensor, iter_num: int, lr: float) -> torch.Tensor:
    """The same file: a 2-D key starts at the sum and takes iter_num Adam(lr, weight_decay=0) steps on that loss;
    any other key is the mean of the task vectors."""
    if tvs.dim() != 3:
        return tvs.sum(0) / len(tvs)
    merged = torch.nn.Parameter(torch.sum(tvs, dim=0))
    optimizer = torch.optim.Adam([merged], lr=lr, weight_decay=0)
    for _ in range(iter_num):
        loss = reference_wudi_loss(merged, tvs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return merged.detach()


def _vectors(base: dict, finetuned: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    flat_ptm = flatten(base)
    flat_ft = torch.vstack([flatten(state) for state in finetuned])
    return flat_ft - flat_ptm, flat_ft, flat_ptm


def _close(delta: dict, expected: torch.Tensor, base: dict) -> None:
    expected_state = unflatten(expected, base)
    for key in base:
        assert torch.allclose(delta[key], expected_state[key], atol=1e-6, rtol=0), key


@pytest.mark.parametrize("runs,density", [(2, 0.2), (3, 0.5), (5, 0.1)])
def test_ties_matches_the_authors_notebook(runs: int, density: float):
    base, finetuned = random_states(runs, seed=runs)
    tv, _, _ = _vectors(base, finetuned)
    delta = ties_delta(StateVectors(base, finetuned), {"density": density}, 0)
    _close(delta, reference_ties(tv, density), base)


def test_ties_trims_the_whole_model_not_each_tensor():
    """Top-k over the flattened vector: a tensor of tiny changes loses all of them, unlike a per-tensor top-k."""
    base, finetuned = random_states(2)
    for state in finetuned:
        state["c"] = base["c"] + 1e-4
    delta = ties_delta(StateVectors(base, finetuned), {"density": 0.3}, 0)
    assert torch.count_nonzero(delta["c"]) == 0 and torch.count_nonzero(delta["a.weight"]) > 0


@pytest.mark.parametrize("rate", [0.5, 0.9])
def test_dare_matches_mergelm_with_the_same_random_stream(rate: float):
    base, finetuned = random_states(3)
    vectors = StateVectors(base, finetuned)
    for run in range(3):
        for key in base:
            seed = dare_generator(7, run, key).initial_seed()
            torch.manual_seed(seed)
            expected = reference_dare(vectors.vector(run, key), rate)
            assert torch.allclose(dare_drop(vectors.vector(run, key), rate, dare_generator(7, run, key)), expected,
                                  atol=1e-6, rtol=0)
    delta = dare_delta(vectors, {"drop": rate}, 7)
    for key in base:
        total = 0
        for run in range(3):
            torch.manual_seed(dare_generator(7, run, key).initial_seed())
            total = total + reference_dare(vectors.vector(run, key), rate)
        assert torch.allclose(delta[key], total, atol=1e-6, rtol=0)
    assert delta.keys() == dare_delta(vectors, {"drop": rate}, 7).keys()
    again = dare_delta(vectors, {"drop": rate}, 7)
    assert all(torch.equal(delta[key], again[key]) for key in base)  # seeded: the same merge twice
    other = dare_delta(vectors, {"drop": rate}, 8)
    assert not all(torch.equal(delta[key], other[key]) for key in base)


@pytest.mark.parametrize("density,gamma", [(0.2, 0.1), (0.5, 0.05), (0.9, 0.2)])
def test_breadcrumbs_matches_mergekit_per_tensor(density: float, gamma: float):
    base, finetuned = random_states(3)
    vectors = StateVectors(base, finetuned)
    delta = breadcrumbs_delta(vectors, {"density": density, "gamma": gamma}, 0)
    for key in base:
        if int(gamma * base[key].numel()) == 0:
            continue  # mergekit's slice [n_bot:-0] keeps nothing there; patcher keeps the density asked for
        expected = sum(reference_breadcrumbs(vectors.vector(run, key), density, gamma) for run in range(3))
        assert torch.allclose(delta[key], expected, atol=1e-6, rtol=0), key


def test_breadcrumbs_keeps_the_density_where_no_outlier_is_dropped():
    vector = torch.arange(1.0, 11.0)
    mask = breadcrumbs_mask(vector, 0.3, 0.05)  # int(0.05 * 10) = 0 outliers: keep the 3 largest
    assert mask.tolist() == [False] * 7 + [True] * 3


@pytest.mark.parametrize("runs,tall_lambda,k", [(2, 0.6, 2), (4, 0.4, 2), (4, 0.6, 3)])
def test_consensus_matches_fusion_bench(runs: int, tall_lambda: float, k: int):
    base, finetuned = random_states(runs, seed=10 + runs)
    tv, ft, ptm = _vectors(base, finetuned)
    delta = consensus_delta(StateVectors(base, finetuned), {"tall_lambda": tall_lambda, "agreement": k}, 0)
    _close(delta, reference_consensus(tv, ft, ptm, tall_lambda, k), base)
    assert any(torch.count_nonzero(delta[key]) < delta[key].numel() for key in base)  # the mask removed some


def test_task_arithmetic_is_the_sum():
    base, finetuned = random_states(3)
    tv, _, _ = _vectors(base, finetuned)
    _close(task_arithmetic_delta(StateVectors(base, finetuned), {}, 0), tv.sum(0), base)


def test_vectors_read_lazily_from_files_equal_the_states(tmp_path):
    """The same merge from safetensors files read one tensor at a time, a key a run lacks counting as no change."""
    from safetensors.torch import save_file

    base, finetuned = random_states(3)
    files = []
    for number, state in enumerate(finetuned):
        kept = {k: v for k, v in state.items() if not (number == 2 and k == "c")}
        save_file({k.replace("a.", "x."): v for k, v in kept.items()}, str(tmp_path / f"{number}.safetensors"))
        files.append([TensorFile(tmp_path / f"{number}.safetensors")])
    renamed = {k.replace("a.", "x."): v for k, v in base.items()}
    finetuned[2]["c"] = base["c"]
    from_files = ties_delta(FileVectors(renamed, files), {"density": 0.4}, 0)
    in_memory = ties_delta(StateVectors(base, finetuned), {"density": 0.4}, 0)
    for key in base:
        assert torch.equal(from_files[key.replace("a.", "x.")], in_memory[key])


def test_registry_declares_parameters_references_and_data():
    for method in METHODS.values():
        assert method.paper and method.code.startswith("https://") and method.needs
        assert (method.combine is None) == (method.learnt is not None)
        assert method.settings()  # at least one setting
    assert len(METHODS["ties"].settings()) == 3 and METHODS["ties"].settings({"density": 0.3}) == [{"density": 0.3}]
    with pytest.raises(PatcherError, match="no such parameter"):
        parse_params(get_method("ties"), ["drop=0.3"])
    with pytest.raises(PatcherError, match="unknown merge method"):
        get_method("slerp")


def test_layerwise_gradient_streamed_per_run_equals_autograd_through_the_coefficients():
    """d loss / d lambda[t, block] = <d loss / d theta, tau_t> over the block: what `layerwise.learn` streams."""
    from patcher.patching.layerwise import _coefficient_gradient, _merged, block_of

    base, finetuned = random_states(3)
    base = {f"visual.transformer.resblocks.{i % 2}.{k}": v for i, (k, v) in enumerate(base.items())}
    finetuned = [{f"visual.transformer.resblocks.{i % 2}.{k}": v for i, (k, v) in enumerate(s.items())}
                 for s in finetuned]
    vectors = StateVectors(base, finetuned)
    blocks = list(dict.fromkeys(block_of(key) for key in base))
    groups = {key: blocks.index(block_of(key)) for key in base}
    assert blocks == ["visual.transformer.resblocks.0", "visual.transformer.resblocks.1"]
    weights = {key: torch.randn(value.shape, generator=torch.Generator().manual_seed(5)) for key, value in base.items()}

    def loss(state: dict) -> torch.Tensor:
        return sum(((state[key] * weights[key]).sum() ** 2) for key in state)

    coefficients = torch.rand(3, 2, generator=torch.Generator().manual_seed(1), requires_grad=True)
    direct = {key: base[key] + sum(coefficients[run, groups[key]] * vectors.vector(run, key) for run in range(3))
              for key in base}
    loss(direct).backward()
    merged = _merged(vectors, list(base), groups, coefficients.detach())
    loss(merged).backward()
    streamed = _coefficient_gradient(vectors, merged, groups, (3, 2))
    assert torch.allclose(streamed, coefficients.grad, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("runs", [2, 5])
def test_wudi_objective_and_gradient_match_the_authors_loss(runs: int):
    """The streamed statistics give the authors' loss (up to its constant) and its autograd gradient."""
    base, finetuned = random_states(runs, seed=20 + runs)
    vectors = StateVectors(base, finetuned)
    tvs = vectors.stacked("a.weight").double()
    total, gram, target = (t.double() for t in wudi_statistics(vectors, "a.weight"))
    assert torch.allclose(total, tvs.sum(0))
    constant = float(sum(torch.square(t @ t.T).sum() / torch.square(t).sum() for t in tvs))
    for point in (total, total + 0.05 * torch.randn(total.shape, generator=torch.Generator().manual_seed(3),
                                                     dtype=torch.float64)):
        merged = point.clone().requires_grad_(True)
        loss = reference_wudi_loss(merged, tvs)
        loss.backward()
        value = float(loss.detach())
        assert abs(wudi_objective(point, gram, target, constant) - value) <= 1e-6 * max(1.0, value)
        assert torch.allclose(2 * (point @ gram - target), merged.grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("runs,steps,lr", [(2, 50, 1e-3), (4, 300, 1e-5), (4, 100, 1e-2)])
def test_wudi_matches_the_authors_optimisation_with_the_same_steps(runs: int, steps: int, lr: float):
    """Same start, optimiser, steps and learning rate as fusion_bench's wudi_merging: the same merged vector."""
    base, finetuned = random_states(runs, seed=30 + runs)
    vectors = StateVectors(base, finetuned)
    delta = wudi_delta(vectors, {"steps": steps, "lr": lr}, 0)
    for key in base:
        expected = reference_wudi(vectors.stacked(key), steps, lr)
        assert torch.allclose(delta[key], expected, atol=1e-6, rtol=0), key
    assert not torch.allclose(delta["a.weight"], vectors.stacked("a.weight").sum(0), atol=1e-4)  # it moved


def test_wudi_lowers_the_objective_and_transposes_open_clips_projection():
    base, finetuned = random_states(3, seed=40)
    base["visual.proj"] = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))  # [in, out] in open_clip
    for number, state in enumerate(finetuned):
        state["visual.proj"] = base["visual.proj"] + 0.1 * torch.randn(5, 7, generator=torch.Generator()
                                                                         .manual_seed(number + 2))
    vectors = StateVectors(base, finetuned)
    total, gram, target = wudi_statistics(vectors, "a.weight")
    assert wudi_objective(wudi_matrix(total, gram, target, 100, 1e-3), gram, target) < wudi_objective(total, gram,
                                                                                                        target)
    delta = wudi_delta(vectors, {"steps": 60, "lr": 1e-3}, 0)
    expected = reference_wudi(vectors.stacked("visual.proj").transpose(1, 2), 60, 1e-3).T
    assert torch.allclose(delta["visual.proj"], expected, atol=1e-6, rtol=0)


def test_wudi_leaves_out_runs_that_did_not_change_a_key():
    """A probed head only one run trained: that run's vector (the authors' mean and loss would divide by N, by 0)."""
    base, finetuned = random_states(3, seed=50)
    for state in finetuned[1:]:
        state["a.weight"], state["a.bias"] = base["a.weight"], base["a.bias"]
    vectors = StateVectors(base, finetuned)
    delta = wudi_delta(vectors, {"steps": 300, "lr": 1e-3}, 0)
    assert torch.allclose(delta["a.bias"], vectors.vector(0, "a.bias"), atol=1e-7)
    assert torch.allclose(delta["a.weight"], vectors.vector(0, "a.weight"), atol=1e-5)
    assert all(torch.isfinite(value).all() for value in delta.values())
