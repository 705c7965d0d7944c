"""`patcher verify`'s look at the files a server serves: every model of the entry (baked classifiers, pixels,
preprocessing, ensembles, the open-vocabulary text, classify and embed models) checked against the repository's
publish journal, and each served ONNX graph against the run's export."""

from __future__ import annotations

from pathlib import Path

from patcher.base.errors import PatcherError
from patcher.export.contract import EXPORT_JSON, read_export_record
from patcher.triton.repository.configs import CONFIG_FILE, ENTRY_PARAMETER, parameter, parse_config
from patcher.triton.repository.integrity import integrity_problems
from patcher.triton.repository.stores import open_store

GRAPH = "model.onnx"
WRAPPED = ("_pixels",)  # graphs patcher writes around an exported one (their configs name the file they wrap)


def expected_graphs(export: Path) -> dict[str, set[str]]:
    """The sha256 each kind of served graph may have: the export's patched and zero-shot files, its text tower."""
    record = read_export_record(Path(export) / EXPORT_JSON)
    graphs: dict[str, set[str]] = {"patched": set(), "zeroshot": set(), "text": set()}
    for model in record.models.values():
        graphs.setdefault(model.model, set()).add(model.sha256)
    if record.text is not None:
        graphs["text"] = {text.sha256 for kind, text in record.text.models.items() if kind == "patched"}
    return graphs


def _entry_of(config_text: str | None) -> str | None:
    try:
        return parameter(parse_config(config_text or "", "config.pbtxt"), ENTRY_PARAMETER)
    except PatcherError:
        return None


def _kind(model: str) -> str | None:
    if model.endswith(WRAPPED):
        return None
    if model.endswith("_zeroshot"):
        return "zeroshot"
    return "text" if model.endswith("_text") else "patched"


def served_file_problems(repo: str | Path, entry: str, export: Path) -> tuple[list[str], int]:
    """Why the files served for `entry` are not the run's (empty when they are), and how many models were checked."""
    store = open_store(repo)
    journal = store.journal()
    if not journal.hashes:
        return [f"{store.location} records no file hashes (written before patcher recorded them): write it again "
                "with `patcher triton` to have its files checked"], 0
    models = [m for m in store.models() if _entry_of(store.read(f"{m}/{CONFIG_FILE}")) == entry]
    if not models:
        raise PatcherError(f"{store.location} has no model of entry {entry!r}: pass the repository the server serves")
    graphs = expected_graphs(export)
    problems = []
    for model in models:
        problems += integrity_problems(store, model, journal)
        kind = _kind(model)
        served = {path: digest for path, digest in journal.hashes.items()
                  if path.startswith(f"{model}/") and path.endswith(f"/{GRAPH}")}
        newest = max(served, key=lambda path: int(path.split("/")[1]), default=None)
        if kind is not None and newest is not None and journal.hashes[newest] not in graphs.get(kind, set()):
            problems.append(f"{newest} ({journal.hashes[newest][:12]}) is no {kind} graph of the run's export")
    return problems, len(models)
