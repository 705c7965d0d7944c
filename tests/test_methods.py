"""Each method's loss and training on tiny inputs: FLYP's same-class positives, CAR-FT's KL, LP, LP-FT."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from patcher.base.compat import import_open_clip
from patcher.base.errors import PatcherError
from patcher.data.items import TensorItems
from patcher.data.prepared_splits import TrainSplit
from patcher.data.tasks import get_task
from patcher.models import load_clip
from patcher.models.heads import HeadResolver, build_head
from patcher.models.state import project_head, text_state
from patcher.patching.task_vectors import fill_missing
from patcher.training.config import TrainConfig
from patcher.training.loop import train, train_method
from patcher.training.methods import MethodSetup, get_method, parse_params, train_config
from patcher.training.methods.carft import ContextAwareFineTune, ContextParams, context_head
from patcher.training.methods.flyp import ContrastiveFineTune, LabelAwareClipLoss, same_class_targets
from patcher.training.methods.probe import LinearProbe, LinearProbeThenFineTune, ProbeThenFineTuneParams
from patcher.training.sampling import TaskMixture, split_batch

open_clip = import_open_clip()


def _features(n: int, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n, d, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(n, d, generator=generator), dim=-1)
    return images, texts


# FLYP


def test_label_aware_loss_is_clip_loss_when_every_class_differs():
    images, texts = _features(6)
    scale = torch.tensor(10.0)
    ours = LabelAwareClipLoss()(images, texts, scale, torch.arange(6))
    assert ours == pytest.approx(open_clip.ClipLoss()(images, texts, scale).item(), abs=1e-6)


def test_two_same_class_items_are_positives_not_negatives():
    images, texts = _features(3, seed=1)
    scale = torch.tensor(5.0)
    classes = torch.tensor([4, 4, 7])  # items 0 and 1 share a class
    loss = LabelAwareClipLoss()(images, texts, scale, classes)
    logits = scale * images @ texts.T
    positives = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    image_to_text = -(positives * logits.log_softmax(1)).sum(1).mean()
    text_to_image = -(positives * logits.T.log_softmax(1)).sum(1).mean()
    by_hand = (image_to_text + text_to_image) / 2
    assert loss.item() == pytest.approx(by_hand.item(), abs=1e-6)
    swapped = texts[[1, 0, 2]]  # exchanging two same-class captions changes nothing: both are positives
    assert LabelAwareClipLoss()(images, swapped, scale, classes).item() == pytest.approx(loss.item(), abs=1e-6)
    plain = open_clip.ClipLoss()
    assert plain(images, swapped, scale).item() != pytest.approx(plain(images, texts, scale).item(), abs=1e-3)


def test_a_same_class_pair_is_pulled_together_where_clip_loss_pushes_it_apart():
    texts = torch.eye(4)
    classes = torch.tensor([0, 0, 1, 2])
    for loss_fn, sign in ((lambda i: LabelAwareClipLoss()(i, texts, torch.tensor(1.0), classes), -1),
                          (lambda i: open_clip.ClipLoss()(i, texts, torch.tensor(1.0)), 1)):
        images = torch.eye(4).requires_grad_(True)
        loss_fn(images).backward()
        along_partner = images.grad[0] @ texts[1]  # d loss / d (image 0 . caption of its same-class partner)
        assert torch.sign(along_partner).item() == sign


def test_same_class_targets_rows_sum_to_one():
    targets = same_class_targets(torch.tensor([1, 2, 1, 1]))
    assert torch.allclose(targets.sum(1), torch.ones(4))
    assert targets[0, 2] == pytest.approx(1 / 3) and targets[0, 1] == 0


# shared tiny setup


@pytest.fixture(scope="module")
def tiny() -> dict:
    torch.manual_seed(0)
    loaded = load_clip("patcher-tiny")
    digits = get_task("digits")
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(40, 3, 28, 28, generator=generator), torch.randint(10, (40,), generator=generator)
    head = build_head(loaded, list(digits.classnames), list(digits.templates))
    state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    return {"loaded": loaded, "task": digits, "data": TrainSplit(TensorItems(images, labels)), "images": images,
            "labels": labels, "head": head, "state": state}


def _setup(tiny: dict, steps: int = 5, lr: float = 1e-3) -> MethodSetup:
    tiny["loaded"].model.load_state_dict(tiny["state"])
    config = TrainConfig(steps=steps, batch_size=8, lr=lr, warmup_steps=1, weight_decay=0.0)
    return MethodSetup(tiny["loaded"], {"digits": tiny["data"]}, {"digits": tiny["task"]},
                       {"digits": tiny["head"]}, config)


# CAR-FT


def test_carft_kl_is_zero_at_step_zero_and_grows_once_the_encoder_moves(tiny: dict):
    method = ContextAwareFineTune(_setup(tiny), ContextParams(kl_weight=1.0))
    method.encoder.train()
    method.step_loss(0)
    assert method.step_terms()["kl"] == pytest.approx(0.0, abs=1e-6)
    assert method.step_terms()["cross_entropy"] > 0
    with torch.no_grad():
        for parameter in method.encoder.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    method.step_loss(0)
    assert method.step_terms()["kl"] > 1e-4


def test_context_head_has_one_unit_column_per_template(tiny: dict):
    loaded, task = tiny["loaded"], tiny["task"]
    loaded.model.load_state_dict(tiny["state"])
    head = context_head(loaded, list(task.classnames), list(task.templates))
    scale = loaded.model.logit_scale.exp().item()
    assert head.shape == (loaded.embed_dim, len(task.templates))
    assert torch.allclose(head.norm(dim=0), torch.full((len(task.templates),), scale), rtol=1e-4)


# LP and LP-FT


def test_lp_leaves_the_encoder_unchanged_and_trains_a_unit_norm_head(tiny: dict):
    setup = _setup(tiny, steps=20, lr=1e-2)
    before = {k: v.clone() for k, v in setup.loaded.model.visual.state_dict().items()}
    method = LinearProbe(setup, parse_params(LinearProbe, {}))
    train_method(method)
    after = setup.loaded.model.visual.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    head = method.state()["heads.digits"]
    assert not torch.allclose(head, tiny["head"])
    assert torch.allclose(head.norm(dim=0), tiny["head"].norm(dim=0), rtol=1e-4)
    assert set(method.state()) == {"heads.digits"} and method.trained_heads() == ["digits"]


def test_lpft_fine_tuning_stage_starts_from_the_probed_head(tiny: dict):
    setup = _setup(tiny, steps=3)
    params = ProbeThenFineTuneParams(lp_steps=15, lp_lr=1e-2)
    method = LinearProbeThenFineTune(setup, params)
    probe, finetune = method.stages()
    assert probe.train_config.steps == 15 and probe.train_config.lr == 1e-2 and finetune.train_config.lr == 1e-3
    train(probe.module, probe.parameters, probe.step_loss, probe.train_config)
    probed = method.probe.head("digits").detach().clone()
    assert not torch.allclose(probed, tiny["head"])
    images, labels = tiny["images"], tiny["labels"]
    index = [key[0] for key in TaskMixture({"digits": tiny["data"]}, 8, 0).sampler("digits").keys(0)]
    features = F.normalize(method.encoder(images[index]), dim=-1)
    expected = F.cross_entropy(features @ probed, labels[index])
    assert finetune.step_loss(0).item() == pytest.approx(expected.item(), rel=1e-5)
    encoder_before = {k: v.clone() for k, v in method.encoder.state_dict().items()}
    train(finetune.module, finetune.parameters, finetune.step_loss, finetune.train_config)
    assert any(not torch.equal(encoder_before[k], v) for k, v in method.encoder.state_dict().items())
    assert set(method.state()) > {"heads.digits"}


def test_flyp_trains_both_towers_from_class_name_captions(tiny: dict):
    setup = _setup(tiny, steps=3)
    method = ContrastiveFineTune(setup, parse_params(ContrastiveFineTune, {}))
    images, tokens, classes = method.captions(0)
    assert len(images) == len(tokens) == len(classes) == 8
    text_before = setup.loaded.model.token_embedding.weight.clone()
    train_method(method)
    state = method.state()
    assert any(k.startswith("text.") for k in state) and any(k.startswith("visual.") for k in state)
    assert not torch.equal(setup.loaded.model.token_embedding.weight, text_before)


# states, mixtures, parameters


def test_text_states_rebuild_heads_and_probe_heads_are_projected(tiny: dict):
    loaded, task = tiny["loaded"], tiny["task"]
    loaded.model.load_state_dict(tiny["state"])
    resolver = HeadResolver({"digits": tiny["head"]}, {"digits": task}, loaded)
    rebuilt = resolver.heads(text_state(loaded.model))["digits"]
    assert torch.allclose(rebuilt, tiny["head"], atol=1e-5)
    shrunk = resolver.heads({"heads.digits": tiny["head"] * 0.3})["digits"]
    assert torch.allclose(shrunk, project_head(tiny["head"], resolver.scales["digits"]), atol=1e-5)


def test_missing_keys_are_filled_with_the_base_value():
    base = {"a": torch.zeros(2), "b": torch.ones(2)}
    first, second = fill_missing([{"a": torch.full((2,), 3.0)}, {"b": torch.full((2,), 5.0)}], base)
    assert torch.equal(first["b"], base["b"]) and torch.equal(second["a"], base["a"])
    with pytest.raises(PatcherError):
        fill_missing([{"c": torch.zeros(1)}], base)


def test_mixture_batches_are_balanced_and_a_function_of_the_step():
    data = {name: TrainSplit(TensorItems(torch.arange(n).float()[:, None], torch.zeros(n, dtype=torch.long)))
            for name, n in (("a", 10), ("b", 50))}
    mixture = TaskMixture(data, 7, seed=3)
    batch = mixture.batch(2)
    assert batch.slices == {"a": slice(0, 4), "b": slice(4, 7)}
    again = mixture.batch(2).inputs("cpu")  # a step read twice restarts the loaders there
    assert torch.equal(batch.inputs("cpu"), again)
    assert not torch.equal(mixture.batch(3).inputs("cpu"), again)
    assert split_batch(8, 3) == [3, 3, 2]
    with pytest.raises(PatcherError, match="batch size"):
        split_batch(1, 2)


def test_method_parameters_and_defaults():
    assert parse_params(get_method("carft"), {"kl_weight": "0.5"}).kl_weight == 0.5
    with pytest.raises(PatcherError, match="no parameter"):
        parse_params(get_method("carft"), {"lambda": "1"})
    with pytest.raises(PatcherError, match="expected a float"):
        parse_params(get_method("carft"), {"kl_weight": "lots"})
    with pytest.raises(PatcherError, match="unknown --method"):
        get_method("magic")
    assert parse_params(get_method("flyp"), {"same_class_positives": "false"}).same_class_positives is False
    with pytest.raises(PatcherError, match="expected a bool"):
        parse_params(get_method("flyp"), {"same_class_positives": "maybe"})
    assert train_config("ft").lr == 1e-5 and train_config("lp").lr == 1e-3
    assert train_config("lp", lr=0.1).lr == 0.1 and train_config("lp").weight_decay == 0.0


def test_carft_can_keep_clips_imagenet_contexts(tiny: dict):
    method = ContextAwareFineTune(_setup(tiny), ContextParams(contexts="imagenet"))
    assert method.context_heads["digits"].shape[1] == 80
    with pytest.raises(PatcherError, match="contexts"):
        ContextAwareFineTune(_setup(tiny), ContextParams(contexts="everything"))
