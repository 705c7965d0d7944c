"""The miniature eight-task suite: rendered tasks that are seeded item by item, class names the reference model
learnt in another domain, and `patcher tasks` that says what is here."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from patcher.cli import app
from patcher.data.tasks import get_task
from patcher.data.tasks.rendered.canvas import rendered
from patcher.data.tasks.rendered.catalog import RENDERED_TASKS
from patcher.data.tasks.suites import MINI_EIGHT, MINI_EIGHT_SUPPORT, suite_tasks

SYNTHETIC = sorted(set(RENDERED_TASKS) - {"fashion-sketch"})
runner = CliRunner()


def test_every_suite_task_names_classes_a_pretraining_source_taught():
    sources = {get_task(name).classnames for name in suite_tasks("reference-pretraining")}
    assert len(MINI_EIGHT) >= 8 and MINI_EIGHT_SUPPORT in suite_tasks("reference-pretraining")
    for name in MINI_EIGHT:
        assert get_task(name).classnames in sources, name


@pytest.mark.parametrize("name", SYNTHETIC)
def test_a_rendered_item_depends_on_its_seed_alone(name: str):
    spec = get_task(name).load.__self__
    draw = [spec.render(label, np.random.default_rng([spec.seed, 1, index])) for index, label in ((0, 0), (7, 1))]
    again = [spec.render(label, np.random.default_rng([spec.seed, 1, index])) for index, label in ((0, 0), (7, 1))]
    assert all(image.dtype == np.uint8 and image.shape[:2] == (28, 28) for image in draw)
    assert all(np.array_equal(a, b) for a, b in zip(draw, again, strict=True))
    train = spec.render(0, np.random.default_rng([spec.seed, 0, 0]))
    assert not np.array_equal(train, draw[0])  # the parts are drawn apart


def test_a_part_is_its_items_drawn_alone_in_label_order():
    spec = get_task("dice").load.__self__
    images, labels = rendered(spec, "test")
    assert np.array_equal(labels, np.repeat(np.arange(6), spec.per_class[1]))
    for index in (0, len(labels) // 2, len(labels) - 1):
        alone = spec.render(int(labels[index]), np.random.default_rng([spec.seed, 1, index]))
        assert np.array_equal(alone, images[index])


def test_splits_of_a_rendered_task_are_disjoint_and_held_out():
    task = get_task("dice")
    sizes = {split: len(task.dataset(split)) for split in ("train", "val", "test")}
    assert sizes["train"] + sizes["val"] == 6 * 300 and sizes["val"] == 180 and sizes["test"] == 600


def test_patcher_tasks_lists_suites_and_data_as_json():
    result = runner.invoke(app, ["tasks", "--suite", "mini-8", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert set(rows) == set(MINI_EIGHT)
    assert all("mini-8" in row["suites"] and row["classes"] == len(row["classnames"]) for row in rows.values())
    assert all(rows[name]["data_here"] for name in SYNTHETIC if name in rows)


def test_an_unknown_suite_is_one_error_line():
    result = runner.invoke(app, ["tasks", "--suite", "mini-9"])
    assert result.exit_code == 2 and result.stderr.strip().splitlines() == [
        "error: unknown suite 'mini-9'; suites: mini-8, mini-8-support, reference-pretraining, case-studies, paint, "
        "imagenet-shifts"]
