"""Faults while `patcher triton` writes a repository: kill -9 at many moments, a real full filesystem, bad and
colliding names. The repository is always either as it was or completely updated (or, killed while publishing,
completed by the next run); the next run cleans up and writes what an uninterrupted run writes; no version number
is skipped and nothing is left over."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faults_support import ForkedCLI, SmallFilesystem, everything, hidden, run_cli, the_error_line, wait_for
from serving_support import entry_models, variant

from patcher.base.errors import PatcherError
from patcher.base.files import sha256_file
from patcher.base.locks import lock_path, output_lock
from patcher.triton.repository.publish import STAGING_PREFIX, read_journal
from patcher.triton.repository.writer import RepositoryOptions, model_versions, write_repository

pytestmark = pytest.mark.slow
KILLS = 9
SMALL = 512 * 1024  # configs, labels and model.py files fit; one classifier (~0.5 MB) does not


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkedCLI]:
    forked = ForkedCLI(tmp_path_factory.mktemp("cli"))
    yield forked
    forked.close()


@pytest.fixture(scope="module")
def exports(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny run's export, and a second one (patched and zero-shot exchanged) to write as version 2."""
    return tiny_export, variant(tiny_export, tmp_path_factory.mktemp("faults") / "onnx-swapped", swap=True)


def deployed(repo: Path) -> dict[str, str]:
    """Every visible file's sha256 (patcher.json without its write time), by relative path."""
    files = {}
    for path in sorted(p for p in repo.rglob("*") if p.is_file()):
        relative = path.relative_to(repo)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.name == "patcher.json":
            record = json.loads(path.read_text())
            record.pop("created")
            files[str(relative)] = json.dumps(record, sort_keys=True)
        else:
            files[str(relative)] = sha256_file(path)
    return files


def state(repo: Path, models: list[str]) -> str:
    """What a killed run left: untouched, staged (a staging folder only), publishing, or complete."""
    versions = {model: model_versions(repo / model) for model in models}
    if read_journal(repo).publishing:
        return "publishing"
    assert len({tuple(v) for v in versions.values()}) == 1, versions  # committed: every model alike
    if versions[models[0]] == [1, 2]:
        return "complete"
    return "staged" if list(repo.glob(f"{STAGING_PREFIX}*")) else "untouched"


@pytest.fixture(scope="module")
def reference(cli: ForkedCLI, exports: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Version 1 written; a copy updated to version 2 uninterrupted, with how long that took."""
    root = tmp_path_factory.mktemp("reference")
    first, second = exports
    code, stderr = cli.run("triton", str(first), "--repo", str(root / "v1"))
    assert code == 0, stderr
    shutil.copytree(root / "v1", root / "v2")
    started = time.perf_counter()
    child = cli.start("triton", str(second), "--repo", str(root / "v2"))
    anchor = wait_for(lambda: bool(list((root / "v2").glob(f"{STAGING_PREFIX}*"))) or child.poll() is not None, 300,
                      interval=0.002)
    wait_for(lambda: child.poll() is not None, 300)
    assert child.poll() == 0, child.stderr()
    return {"v1": root / "v1", "v2": root / "v2", "anchor": anchor, "total": time.perf_counter() - started,
            "models": entry_models(first)}


def test_kill9_during_patcher_triton_leaves_the_old_or_the_new_repository_and_the_next_run_finishes(
    cli: ForkedCLI, exports: tuple[Path, Path], reference: dict, tmp_path: Path
) -> None:
    second, models, seen = exports[1], reference["models"], []
    expected = deployed(reference["v2"])
    assert deployed(reference["v1"]) != expected and [model_versions(reference["v2"] / m) for m in models] == [
        [1, 2]] * len(models)
    for moment in range(KILLS):
        repo = tmp_path / f"repo{moment}"
        shutil.copytree(reference["v1"], repo)
        child = cli.start("triton", str(second), "--repo", str(repo))
        if moment == 0:  # moment 0: almost at once (the forked child must have made its process group)
            time.sleep(0.05)
        elif moment < KILLS - 1:  # then spread over the reference run's time from when staging starts
            wait_for(lambda r=repo, c=child: bool(list(r.glob(f"{STAGING_PREFIX}*"))) or c.poll() is not None, 300,
                     interval=0.002)
            time.sleep((reference["total"] - reference["anchor"]) * (moment - 1) / (KILLS - 2))
        else:  # the last: after the run ended, however long a loaded machine made it take
            wait_for(lambda c=child: c.poll() is not None, 300)
        child.kill9()
        seen.append(state(repo, models))
        if seen[-1] == "untouched":
            assert deployed(repo) == deployed(reference["v1"])
        if lock_path(repo).exists():  # a lock a killed writer left is free
            with output_lock(repo):
                pass
        code, stderr = cli.run("triton", str(second), "--repo", str(repo))
        assert code == 0, stderr
        assert deployed(repo) == expected, moment  # the same files as an uninterrupted run: no version 3
        assert hidden(repo) == [".patcher-journal.json", ".patcher-publish.lock"] and not hidden(tmp_path), moment
        assert not read_journal(repo).publishing
    assert seen[0] == "untouched" and seen[-1] == "complete" and len(set(seen)) >= 3, seen


@pytest.fixture
def small(tmp_path: Path) -> Iterator[SmallFilesystem]:
    filesystem = SmallFilesystem(tmp_path / "small", SMALL)
    yield filesystem
    filesystem.remove()


def test_a_full_disk_is_one_error_line_and_the_repository_stays_whole(small: SmallFilesystem,
                                                                      exports: tuple[Path, Path]) -> None:
    first, second = exports
    repo = small.folder / "repo"
    result = run_cli("triton", str(first), "--repo", str(repo), preexec_fn=small.limit)
    assert result.returncode == 2, result.stderr
    line = the_error_line(result.stderr)
    assert f"cannot write {repo}" in line and small.fault in line and "nothing was written" in line, line
    assert everything(small.folder) == []  # no repository, staging, journal or lock

    small.grow(64 << 20)
    assert run_cli("triton", str(first), "--repo", str(repo)).returncode == 0
    before = deployed(repo)
    used = sum(p.stat().st_size for p in repo.rglob("*") if p.is_file())
    small.grow(used + SMALL if small.mounted else SMALL)  # version 1 fits, version 2 does not (its classifiers
    # are each larger than SMALL)
    result = run_cli("triton", str(second), "--repo", str(repo), preexec_fn=small.limit)
    assert result.returncode == 2, result.stderr
    line = the_error_line(result.stderr)
    assert small.fault in line and "nothing was written" in line, line
    assert deployed(repo) == before and not list(repo.glob(f"{STAGING_PREFIX}*"))
    assert all((repo / m / "config.pbtxt").is_file() for m in entry_models(first))

    small.grow(64 << 20)
    result = run_cli("triton", str(second), "--repo", str(repo))
    assert result.returncode == 0, result.stderr
    assert [model_versions(repo / m) for m in entry_models(first)] == [[1, 2]] * len(entry_models(first))


def test_bad_and_colliding_names_are_one_error_line(cli: ForkedCLI, exports: tuple[Path, Path],
                                                    tmp_path: Path) -> None:
    first = exports[0]
    repo = tmp_path / "repo"
    for name, message in [("a/b", "not a Triton model name .* e.g. 'a_b'"), ("x" * 300, "300 characters long")]:
        code, stderr = cli.run("triton", str(first), "--repo", str(repo), "--name", name)
        assert code == 2 and re.search(message, the_error_line(stderr)), stderr
    assert not repo.exists()
    assert write_repository(first, repo, RepositoryOptions(name="a_b")).version == 1
    # a_b's models and a's do not overlap
    assert write_repository(first, repo, RepositoryOptions(name="a")).version == 1
    before = deployed(repo)
    with pytest.raises(PatcherError, match=r"model a_b_digits_pixels in .* belongs to entry 'a_b'.*--name"):
        # its `a_b_digits_pixels` is a_b's per-task model
        write_repository(first, repo, RepositoryOptions(name="a_b_digits"))
    foreign = repo / "mine"
    (foreign / "1").mkdir(parents=True)
    (foreign / "config.pbtxt").write_text('name: "mine" backend: "python"\n')
    with pytest.raises(PatcherError, match="belongs to a model patcher did not write"):
        write_repository(first, repo, RepositoryOptions(name="mine"))
    assert deployed(repo) == {**before, "mine/config.pbtxt": sha256_file(foreign / "config.pbtxt")}
