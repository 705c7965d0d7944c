"""`<name>_classify` is warmed with its task's own label set: `patcher triton` writes the set's head beside the
version and a model_warmup asking for it, and the model loads, warms and answers that set without its text model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from patcher.base.errors import PatcherError
from patcher.export.openvocab import check_label_set
from patcher.triton.client import ClassifyOptions, Endpoint
from patcher.triton.onnxruntime_local import LocalModel
from patcher.triton.openvocab_client import classify_labels
from patcher.triton.repository.configs import read_config
from patcher.triton.repository.warmup import WARM_HEAD_FILE, WARMUP_DIR
from patcher.triton.repository.writer import RepositoryOptions, write_repository
from patcher.triton.serving.server import ServerSettings, TritonServer


@pytest.mark.slow
def test_classify_is_warmed_with_its_task_label_set_and_serves_it_without_the_text_model(
        tiny_export: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_repository(tiny_export, repo, RepositoryOptions(max_batch_size=8))
    record = json.loads((tiny_export / "export.json").read_text())
    labels = list(record["tasks"]["digits"]["classnames"])
    templates = list(record["text"]["templates"]["digits"])
    [warmup] = read_config(repo / "digits_classify").model_warmup
    assert warmup.name == "digits_label_set" and warmup.batch_size == 1
    assert dict(warmup.inputs)["labels"].dims == [len(labels)] and set(warmup.inputs) == {
        "image_bytes", "labels", "templates"}
    assert (repo / "digits_classify" / WARMUP_DIR / "labels").is_file()
    with np.load(repo / "digits_classify" / "1" / WARM_HEAD_FILE, allow_pickle=False) as saved:
        assert list(saved["labels"]) == labels and list(saved["templates"]) == templates
        local = LocalModel(tiny_export)
        expected_head = local.head(check_label_set(labels, templates, 1000, 1000))
        np.testing.assert_allclose(saved["head"], expected_head, rtol=1e-5, atol=1e-5)

    sample = tiny_export / record["samples"]["digits"]["file"]
    # served alone: the warmup (Triton runs it before READY) and the task's label set need no `digits_text`
    with TritonServer(repo, models=["digits_classify"], settings=ServerSettings(startup_timeout_s=120)) as server:
        [served] = classify_labels([sample], "digits", labels, templates, endpoint=Endpoint(url=server.grpc_url),
                                   options=ClassifyOptions(top_k=len(labels)))
        with pytest.raises(PatcherError, match="digits_text"):  # any other label set asks the text model
            classify_labels([sample], "digits", ["a cat", "a dog"], endpoint=Endpoint(url=server.grpc_url))
    [expected] = local.classify_labels([sample.read_bytes()], [sample.name],
                                       check_label_set(labels, templates, 1000, 1000), len(labels))
    assert [item["label"] for item in served["tasks"]["labels"]] == [item["label"] for item in expected]
    np.testing.assert_allclose([item["score"] for item in served["tasks"]["labels"]],
                               [item["score"] for item in expected], rtol=1e-4, atol=1e-4)
