"""The registries share one shape (patcher/base/registries.py): every entry names itself, says what it does and where
it comes from, and an unknown name is one error line naming the nearest registered ones."""

from __future__ import annotations

import pytest

from patcher.base.errors import PatcherError
from patcher.base.registries import Registered, Registry


def test_an_unknown_name_suggests_the_nearest_and_lists_them_all():
    registry = Registry("--search", [Registered(name="golden", summary="g", builds=min),
                                     Registered(name="grid", summary="every point", builds=max)])
    assert list(registry) == ["golden", "grid"] and registry["grid"].builds is max and "grid" in registry
    with pytest.raises(PatcherError, match=r"unknown --search 'gird': did you mean grid\? use one of golden, grid"):
        registry.entry("gird")
    with pytest.raises(PatcherError, match=r"unknown --search 'nope': use one of golden, grid$"):
        registry.entry("nope")
    with pytest.raises(ValueError, match="registered twice"):
        registry.add(Registered(name="grid", summary="again", builds=max))


def test_every_registry_entry_declares_what_it_does_and_where_it_comes_from():
    from patcher.data.tasks.registry import TASKS
    from patcher.patching.alpha import SEARCHES
    from patcher.patching.merge_methods import METHODS as MERGE_METHODS
    from patcher.patching.strategies import STRATEGIES
    from patcher.training.methods import METHODS
    from patcher.triton.repository.builders import BUILDERS

    for registry in (SEARCHES, STRATEGIES, METHODS, BUILDERS, MERGE_METHODS, TASKS):
        assert isinstance(registry, Registry) and len(registry) >= 2
        for name, entry in registry.items():
            assert entry.name == name and entry.summary and entry.reference, (registry.what, name)
    assert [(p.name, p.default) for p in METHODS["carft"].parameters] == [("kl_weight", 1.0), ("contexts", "task")]
    assert [p.name for p in MERGE_METHODS["ties"].parameters] == ["density"]


def test_build_names_the_nearest_search_and_strategy():
    from patcher.stages.build import BuildOptions, check_options

    with pytest.raises(PatcherError, match="did you mean golden"):
        check_options(BuildOptions(task="digits", search="goldn"))
    with pytest.raises(PatcherError, match="did you mean parallel"):
        check_options(BuildOptions(task="digits,mnist", multi="paralel"))
