"""patcher's torch-free tokenizer against open_clip's SimpleTokenizer, token for token; label sets and their heads."""

from __future__ import annotations

import random
import string

import numpy as np
import pytest
import torch

from patcher.base.compat import import_open_clip
from patcher.data.tasks import get_task, known_tasks
from patcher.export.openvocab import (
    HeadCache,
    LabelSet,
    LabelSetError,
    check_label_set,
    class_heads,
    probabilities,
    rank,
    ranked_labels,
)
from patcher.export.tokenizer import MAX_WORD_BYTES, ClipTokenizer, PromptError, decode_prompts, stdlib_split

open_clip = import_open_clip()
from open_clip.tokenizer import SimpleTokenizer, default_bpe  # noqa: E402

# Ordinary and awkward text: accents, curly quotes, ligatures, full-width forms, CJK, emoji, HTML entities,
# contractions in both cases, digits and numerals, control characters, special tokens, very long prompts.
CORPUS = [
    "a photo of a dog.", "T-shirt/top", "ankle boot", "It's a DOG's life, isn't it?", 'a photo of the number: "7".',
    "naïve café — “quoted” ‘single’", "ﬁne ﬂower", "ＦＵＬＬ　ｗｉｄｔｈ", "日本語のテキスト", "emoji 🐶🐱 ok",
    "&amp; &lt;tag&gt;", "  many   spaces\tand\nnewlines ", "ÅNGSTRÖM Kelvin K ſtrange 'ſ", "<start_of_text> inside",
    "123,456.78 ½ Ⅻ", "x" * 300, "word " * 50, "don't won't y'all 'LL 'RE", "İstanbul ß straße", "a\u200bzero width",
    "control\x07char", "<b>bold</b> &amp;", "Ελληνικά и русский", "!!!???...", "'", "''s", "!'s", "",
]
MOJIBAKE = ["ÃƒÂ© mojibake"]  # text decoded with the wrong codec: ftfy repairs it, the stdlib fallback does not


def registered_prompts() -> list[str]:
    """Every prompt of every registered task (class names x templates), ImageNet's included."""
    prompts = []
    for name in known_tasks():
        task = get_task(name)
        prompts += [template.format(c) for c in task.classnames for template in task.templates[:3]]
    return prompts


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return registered_prompts() + CORPUS + MOJIBAKE


@pytest.mark.parametrize("context", [77, 24])
def test_token_for_token_with_open_clip(prompts: list[str], context: int) -> None:
    theirs = SimpleTokenizer(context_length=context)(prompts).numpy()
    ours = ClipTokenizer(default_bpe(), context)(prompts)
    assert ours.dtype == np.int64 and ours.shape == theirs.shape == (len(prompts), context)
    differing = [prompts[i] for i in np.flatnonzero((ours != theirs).any(axis=1))]
    assert differing == [] and len(prompts) > 5_000


@pytest.mark.parametrize("clean", ["whitespace", "canonicalize"])
def test_other_cleanings_match_open_clip(clean: str) -> None:
    theirs = SimpleTokenizer(context_length=77, clean=clean)(CORPUS).numpy()
    assert (ClipTokenizer(default_bpe(), 77, clean)(CORPUS) == theirs).all()


def test_the_stdlib_fallback_differs_only_on_mojibake() -> None:
    """Without ftfy and regex (NVIDIA's container, unless installed): the same ids, mojibake aside."""
    theirs = SimpleTokenizer(context_length=77)(CORPUS + MOJIBAKE).numpy()
    ours = ClipTokenizer(default_bpe(), 77, exact=False)(CORPUS + MOJIBAKE)
    assert (ours[: len(CORPUS)] == theirs[: len(CORPUS)]).all()
    assert not (ours[len(CORPUS) :] == theirs[len(CORPUS) :]).all()
    assert stdlib_split("it's 12 cats!!") == ["it", "'s", "1", "2", "cats", "!!"]


def test_long_prompts_are_cut_as_open_clip_cuts_them_or_refused() -> None:
    tokenizer = ClipTokenizer(default_bpe(), 24)
    long = "a photo of " + "very " * 30 + "long things"
    cut = tokenizer([long])
    assert (cut == SimpleTokenizer(context_length=24)([long]).numpy()).all() and cut[0, -1] == tokenizer.eot
    with pytest.raises(PromptError, match=r"item 1: prompt .* has over 24 tokens, more than the model's "
                                          r"context_length=24 \(open_clip would truncate it"):
        tokenizer(["fits", long], truncate=False)
    assert tokenizer.token_count("fits") == 3


def test_long_words_and_prompts_without_tokens_are_refused_before_any_bpe() -> None:
    tokenizer = ClipTokenizer(default_bpe(), 24)
    word = "".join(random.Random(0).choices(string.ascii_lowercase, k=4000))
    with pytest.raises(PromptError, match=r"item 0: prompt .* is 4000 bytes long, more than MAX_WORD_BYTES=64"):
        tokenizer([word], strict=True)
    assert max(map(len, tokenizer.cache)) < 100  # never given to BPE (its BPE alone takes seconds)
    longest = "".join(random.Random(1).choices(string.ascii_lowercase, k=MAX_WORD_BYTES))
    assert (tokenizer([longest], strict=True) == SimpleTokenizer(context_length=24)([longest]).numpy()).all()
    with pytest.raises(PromptError, match=r"item 1: prompt .* has no tokens"):
        tokenizer(["a cat", "\x01\x02"], strict=True)


def test_prompt_bytes_are_checked_item_by_item() -> None:
    assert decode_prompts([b"a dog", "é".encode()], 100) == ["a dog", "é"]
    for items, message in [([b"ok", b"\xff\xfe"], r"item 1: prompt is not UTF-8 \(byte 0: b'\\xff'\)"),
                           ([b"x" * 101], r"item 0: prompt of 101 bytes exceeds max_prompt_bytes=100"),
                           ([b"ok", b"  "], r"item 1: prompt is empty")]:
        with pytest.raises(PromptError, match=message):
            decode_prompts(items, 100)


def test_label_sets_are_checked_naming_the_item_and_the_limit() -> None:
    checked = check_label_set([b"cat", "dog"], [b"a photo of a {}.", "{}"], 5, 5)
    assert checked == LabelSet(("cat", "dog"), ("a photo of a {}.", "{}"))
    assert checked.prompts() == ["a photo of a cat.", "cat", "a photo of a dog.", "dog"]
    assert checked.source(3) == "label 'dog' with template '{}'"
    assert check_label_set(["cat"], None, 5, 5).prompts() == ["cat"]
    bad = [
        (([], None), "the label set is empty"),
        ((["a"] * 6, None), "6 labels exceed max_labels=5"),
        ((["a", "b", "a"], None), "label 2 'a' repeats label 0"),
        ((["a", " "], None), "label 1 is empty"),
        (([b"a", b"\xc3("], None), r"label 1 is not UTF-8"),
        ((["a"], []), "the template list is empty"),
        ((["a"], ["{}"] * 6), "6 templates exceed max_templates=5"),
        ((["a"], ["{}", "a photo"]), r"template 1 'a photo' must hold exactly one \{\} for the label"),
        ((["a"], ["{} and {}"]), r"template 0 .* must hold exactly one \{\}"),
        ((["a"], ["{name}"]), r"template 0 .* must hold exactly one \{\}"),
        ((["a"], ["a {"]), r"template 0 'a \{' is not a format string"),
        ((["a"], [b"\xff{}"]), r"template 0 is not UTF-8"),
    ]
    for (labels, templates), message in bad:
        with pytest.raises(LabelSetError, match=message):
            check_label_set(labels, templates, 5, 5)
    assert check_label_set(["a"], ["{{literal}} {}"], 5, 5).prompts() == ["{literal} a"]


def test_heads_are_open_clips_zero_shot_classifier() -> None:
    import torch

    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(3 * 4, 8)).astype(np.float32)
    normalised = torch.nn.functional.normalize(torch.from_numpy(embeddings), dim=-1)
    expected = normalised.reshape(3, 4, 8).mean(dim=1)
    expected = (expected / expected.norm(dim=1, keepdim=True)).T * 50.0
    np.testing.assert_allclose(class_heads(embeddings, 3, 4, 50.0), expected.numpy(), rtol=1e-5, atol=1e-6)
    ranked = rank(np.array([[1.0, 3.0, 2.0]]), ("a", "b", "c"), 2)
    torch_probs = torch.softmax(torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64), 0).numpy()
    assert [(e["label"], e["index"], e["score"]) for e in ranked[0]] == [("b", 1, 3.0), ("c", 2, 2.0)]
    np.testing.assert_allclose([e["probability"] for e in ranked[0]], torch_probs[[1, 2]], rtol=1e-6)


def test_probabilities_and_ranked_labels_are_the_softmax_over_the_request_labels() -> None:
    scores = np.array([[10.0, 12.0, 11.0], [800.0, -800.0, 0.0]], dtype=np.float32)  # the second would overflow exp
    probs = probabilities(scores)
    expected = torch.softmax(torch.tensor(scores, dtype=torch.float64), 1).numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-6, atol=1e-30)
    assert probs.dtype == np.float32 and np.isfinite(probs).all()
    ranked = ranked_labels(probs, ("cat", "dog", "a:b"))
    assert ranked.shape == (2, 3) and ranked[0, 0].startswith(b"0.") and ranked[0, 0].endswith(b":1:dog")
    parsed = [item.decode().split(":", 2) for item in ranked[0]]
    assert [int(index) for _, index, _ in parsed] == [1, 2, 0] and parsed[1][2] == "a:b"  # a colon kept in a label
    assert [float(p) for p, _, _ in parsed] == sorted((float(p) for p, _, _ in parsed), reverse=True)


def test_the_head_cache_is_bounded_and_drops_the_least_recently_used() -> None:
    cache = HeadCache(2)
    sets = [LabelSet((name,)) for name in "abc"]
    for index, label_set in enumerate(sets[:2]):
        assert cache.get(label_set) is None
        cache.put(label_set, np.full((1, 1), index))
    assert cache.get(sets[0]) is not None  # a is now the most recent
    cache.put(sets[2], np.zeros((1, 1)))
    assert list(cache.heads) == [sets[0], sets[2]] and cache.get(sets[1]) is None
    assert (cache.hits, cache.misses) == (1, 3)
    assert LabelSet(("a",), ("{}",)) == sets[0] and LabelSet(("a",), ("x {}",)) != sets[0]
    empty = HeadCache(0)
    empty.put(sets[0], np.zeros((1, 1)))
    assert empty.get(sets[0]) is None
