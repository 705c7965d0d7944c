"""The null-space merge (patching/nullspace.py, activation_stats.py): the projection annihilates the protected
subspace and leaves its complement alone, on random tensors; the hooks collect each linear map's real inputs; and a
merged encoder with every supported direction protected gives the supported images the zero-shot features."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from patcher.base.compat import import_open_clip
from patcher.base.errors import PatcherError
from patcher.patching.activation_stats import InputMoments, attention_values, encoder_moments, supported_moments
from patcher.patching.merge_methods import METHODS, get_method
from patcher.patching.nullspace import bias_key, project, protect, protected_basis


def _orthonormal(d: int, k: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))[0][:, :k]


@pytest.mark.parametrize(("d", "k"), [(6, 2), (17, 5), (9, 0)])
def test_projection_annihilates_the_protected_subspace_and_keeps_its_complement(d: int, k: int):
    generator = torch.Generator().manual_seed(1)
    basis = _orthonormal(d, d)
    protected, free = basis[:, :k], basis[:, k:]
    change = torch.randn(7, d, generator=generator, dtype=torch.float64)
    projected = project(change, protected)
    inside = protected @ torch.randn(k, 4, generator=generator, dtype=torch.float64)
    outside = free @ torch.randn(d - k, 4, generator=generator, dtype=torch.float64)
    assert torch.allclose(projected @ inside, torch.zeros(7, 4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(projected @ outside, change @ outside, atol=1e-12)


def test_the_basis_covers_the_asked_share_of_the_trace():
    rotation = _orthonormal(4, 4)
    moment = rotation @ torch.diag(torch.tensor([5.0, 3.0, 1.0, 1.0], dtype=torch.float64)) @ rotation.T
    counts = {energy: protected_basis(moment, energy).shape[1] for energy in (0, 0.5, 0.8, 0.81, 0.9, 1.0)}
    assert counts == {0: 0, 0.5: 1, 0.8: 2, 0.81: 3, 0.9: 3, 1.0: 4}
    top = protected_basis(moment, 0.5)[:, 0]
    assert abs(float(top @ rotation[:, 0])) == pytest.approx(1.0, abs=1e-10)  # the largest eigenvalue's direction


def test_protect_keeps_a_layer_unchanged_on_the_protected_inputs_bias_included():
    generator = torch.Generator().manual_seed(2)
    inputs = torch.randn(5, 8, generator=generator, dtype=torch.float64)  # 5 rows of 8 inputs: a rank-5 moment
    augmented = torch.cat([inputs, torch.ones(5, 1, dtype=torch.float64)], dim=1)
    moments = {"l.weight": augmented.T @ augmented / 5, "visual.proj": inputs.T @ inputs / 5}
    delta = {"l.weight": torch.randn(3, 8, generator=generator), "l.bias": torch.randn(3, generator=generator),
             "visual.proj": torch.randn(8, 4, generator=generator), "ln.weight": torch.randn(8, generator=generator)}
    projected, ranks = protect(delta, moments, 1.0)
    assert ranks == {"l.weight": 5, "visual.proj": 5}
    moved = inputs.float() @ projected["l.weight"].T + projected["l.bias"]
    assert torch.allclose(moved, torch.zeros(5, 3), atol=1e-5)  # [dW db] [x; 1] = 0 on every protected input
    assert torch.allclose(inputs.float() @ projected["visual.proj"], torch.zeros(5, 4), atol=1e-5)  # x @ proj
    assert torch.equal(projected["ln.weight"], delta["ln.weight"])  # no linear map's weight: unchanged
    assert float(projected["l.weight"].norm()) > 0.1  # what acts outside the inputs' span stays
    assert protect(delta, moments, 0.0)[0]["l.weight"].equal(delta["l.weight"])
    assert bias_key("a.attn.in_proj_weight") == "a.attn.in_proj_bias" and bias_key("a.c_fc.weight") == "a.c_fc.bias"


def _encoder() -> torch.nn.Module:
    """open_clip's VisionTransformer, 2 blocks of width 32 on 14 px images (4 patches and the class token)."""
    torch.manual_seed(0)
    vit = import_open_clip().transformer.VisionTransformer
    return vit(image_size=14, patch_size=7, width=32, layers=2, heads=2, mlp_ratio=2.0, output_dim=8).eval()


def test_attention_values_are_what_the_output_projection_receives():
    attention = _encoder().transformer.resblocks[0].attn
    x = torch.randn(3, 5, 32)
    values = attention_values(attention, x)
    expected = attention(x, x, x, need_weights=False)[0]
    assert torch.allclose(torch.nn.functional.linear(values, attention.out_proj.weight, attention.out_proj.bias),
                          expected, atol=1e-5)


def test_hooks_collect_every_linear_map_and_are_removed():
    encoder = _encoder()
    collector = InputMoments(encoder)
    with torch.no_grad():
        encoder(torch.randn(2, 3, 14, 14))
    collector.close()
    weights = {f"visual.{k}" for k, v in encoder.state_dict().items() if v.dim() >= 2 and "embedding" not in k}
    assert set(collector.sums) == weights
    assert collector.rows["visual.conv1.weight"] == 2 * 4 and collector.rows["visual.proj"] == 2
    assert collector.rows["visual.transformer.resblocks.0.attn.out_proj.weight"] == 2 * 5
    assert collector.sums["visual.transformer.resblocks.1.mlp.c_proj.weight"].shape == (65, 65)
    assert not encoder._forward_pre_hooks and not encoder.conv1._forward_pre_hooks


def test_every_supported_direction_protected_keeps_the_supported_features():
    """Energy 1 on 4 images (fewer input rows than any layer's width): the merged encoder, with norms and embeddings
    left at zero-shot, gives those images exactly the zero-shot features, and other images others."""
    encoder = _encoder()
    weights = dict(encoder.state_dict())
    supported, other = torch.randn(4, 3, 14, 14), torch.randn(4, 3, 14, 14)
    moments = encoder_moments(encoder, weights, [supported])
    linear = [key for key in weights if key in {"proj", "conv1.weight"} or key.endswith(("_weight", "_bias"))
              or (key.endswith((".weight", ".bias")) and ".ln_" not in key and not key.startswith("ln_"))]
    generator = torch.Generator().manual_seed(3)
    delta = {f"visual.{key}": 0.3 * torch.randn(weights[key].shape, generator=generator) for key in linear}
    projected, ranks = protect(delta, moments, 1.0)
    assert len(ranks) == 1 + 1 + 2 * 4  # conv1, proj, and in_proj, out_proj, c_fc, c_proj of both blocks
    merged = {key: value + projected.get(f"visual.{key}", torch.zeros_like(value)) for key, value in weights.items()}
    with torch.no_grad():
        before, after = encoder(supported), torch.func.functional_call(encoder, merged, (supported,))
        moved = torch.func.functional_call(encoder, merged, (other,)) - encoder(other)
    assert torch.allclose(before, after, atol=1e-4)
    assert float(moved.abs().max()) > 1e-2


def test_registry_has_a_nullspace_variant_of_every_combining_method():
    for name, method in list(METHODS.items()):
        if method.combine is not None and not method.protect:
            variant = get_method(f"{name}-nullspace")
            assert variant.protect and variant.combine is method.combine
            assert [p.name for p in variant.parameters] == [*(p.name for p in method.parameters), "energy"]
            assert "arXiv:2410.02355" in variant.paper and "AlphaEdit" in variant.code
            assert "labels never read" in variant.needs
    assert get_method("wudi-nullspace").settings({"lr": 1e-5, "steps": 3}) == [
        {"steps": 3, "lr": 1e-5, "energy": e} for e in (0.7, 0.8, 0.9, 0.95)]
    with pytest.raises(PatcherError, match="no such parameter"):
        get_method("task-arithmetic").settings({"energy": 0.9})


def test_a_nullspace_merge_without_a_supported_task_is_refused():
    with pytest.raises(PatcherError, match="--support"):
        supported_moments(None, [], 0)  # type: ignore[arg-type]


class _Unlabelled:
    """A held-out store whose labels fail when read."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def read(self, indices: object) -> object:
        return self.images[torch.as_tensor(indices)].numpy()

    @property
    def labels(self) -> object:
        raise AssertionError("a supported task's label was read")


def test_supported_moments_read_images_only_and_weigh_each_task_the_same():
    encoder = _encoder()
    zeroshot = {f"visual.{key}": value for key, value in encoder.state_dict().items()}
    first, second = torch.randn(6, 3, 14, 14), torch.randn(30, 3, 14, 14)
    splits = SimpleNamespace(val={"a": _Unlabelled(first), "b": _Unlabelled(second)}, normalize=lambda x: x)
    session = SimpleNamespace(loaded=SimpleNamespace(model=SimpleNamespace(visual=encoder)), zeroshot=zeroshot,
                              device="cpu", splits=splits, eval_batch_size=4)
    both = supported_moments(session, ["a", "b"], 0)  # type: ignore[arg-type]
    alone = [encoder_moments(encoder, dict(encoder.state_dict()), [images]) for images in (first, second)]
    for key, moment in both.items():
        # the encoder runs in float32, in batches of 4 here and whole there: threaded kernels round each batch size
        # differently (4e-8 on entries of about 1 seen with 2 threads), so equal up to float32's rounding
        assert torch.allclose(moment, alone[0][key] + alone[1][key], rtol=1e-6, atol=1e-6), key
