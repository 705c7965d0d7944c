"""patcher.api as a user calls it: build from Python, load a run and classify/embed in process, the same entry
served by the real bundled Triton through api.Client (issue 33 row 9)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_user_data_build import shapes
from triton_support import requires_bundled_triton
from typer.testing import CliRunner

from patcher import api
from patcher.base.errors import PatcherError
from patcher.cli import app
from patcher.data.tasks import get_task


def digit_files(folder: Path, count: int = 6) -> list[Path]:
    data = get_task("digits").dataset("test")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"{index}.png"
        data[index][0].save(path)
        paths.append(path)
    return paths


@pytest.mark.slow
def test_build_from_python(tmp_path: Path) -> None:
    data = shapes(tmp_path / "shapes", {"train": 4, "test": 2})
    run = api.build(f"folder:{data}", task_name="toys", model="patcher-tiny", pretrained=None, steps=2,
                    batch_size=8, alpha="0.5", eval_batch_size=16, out=tmp_path / "run")
    manifest = json.loads((run / "manifest.json").read_text())
    assert run == tmp_path / "run" and manifest["patch_tasks"] == ["toys"]
    with pytest.raises(PatcherError, match="has no option colour"):
        api.build("digits", colour="red")


def test_load_classifies_and_embeds_like_the_cli(tiny_export: Path, tmp_path: Path) -> None:
    files = digit_files(tmp_path / "img")
    model = api.load(tiny_export)
    assert set(model.tasks) == {"digits", "fashion-mnist"} and len(model.tasks["digits"]) == 10
    from_files = model.classify(files, top_k=2)
    as_bytes = model.classify([path.read_bytes() for path in files], top_k=2)
    as_pil = model.classify([Image.open(io.BytesIO(path.read_bytes())) for path in files], top_k=2)
    assert from_files == as_bytes
    assert [r["digits"][0]["label"] for r in as_pil] == [r["digits"][0]["label"] for r in from_files]
    assert all(len(result["digits"]) == 2 and set(result) == {"digits", "fashion-mnist"} for result in from_files)

    embeddings = model.embed(files)
    assert embeddings.shape[0] == len(files)
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-4)
    assert model.embed_text(["a photo of the number: \"3\"."]).shape == (1, embeddings.shape[1])

    labels = ["0", "1", "7"]
    mine = model.classify(files, labels=labels, templates=["a photo of a {}."], top_k=3)
    cli = CliRunner().invoke(app, ["classify", *map(str, files), "--run", str(tiny_export), "--labels",
                                   ",".join(labels), "--templates", "a photo of a {}.", "--top-k", "3", "--json"])
    assert cli.exit_code == 0, cli.output
    assert [r["tasks"] for r in json.loads(cli.output)] == mine  # inline --templates: the same label set
    with pytest.raises(PatcherError, match="image 0 is a int"):
        model.classify([3])


@pytest.mark.slow
@requires_bundled_triton()
def test_client_answers_as_the_model_in_process(tiny_export: Path, tmp_path: Path) -> None:
    from serving_support import Served

    from patcher.triton.repository.writer import RepositoryOptions, write_repository

    files = digit_files(tmp_path / "img")
    repo = tmp_path / "repo"
    write_repository(tiny_export, repo, RepositoryOptions(max_batch_size=8))
    served = Served(repo, tmp_path / "key.json")
    try:
        client = api.Client(f"http://{served.grpc_url}", "digits")  # a scheme is accepted, as users write it
        local = api.load(tiny_export)
        answered = client.classify([files[0], files[1].read_bytes(), Image.open(files[2]), *files[3:]], top_k=1)
        expected = local.classify(files, top_k=1)
        assert [r["digits"][0]["label"] for r in answered] == [r["digits"][0]["label"] for r in expected]
        assert np.allclose(client.embed(files), local.embed(files), atol=1e-4)
        labels = client.classify(files, labels=["0", "1"], templates=["a photo of a {}."], top_k=1)
        assert [r["labels"][0]["label"] for r in labels] == [
            r["labels"][0]["label"] for r in local.classify(files, labels=["0", "1"], templates=["a photo of a {}."],
                                                            top_k=1)]
    finally:
        assert served.stop() == 0
