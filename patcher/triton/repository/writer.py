"""Write an export into a Triton model repository as one entry: every model gets a new version, all or none.

    write_repository(run / "onnx", repo)          # entry <patch task>; its models: repository/entry.py
    write_repository(run / "onnx", repo, RepositoryOptions(name="signs", max_batch_size=8))

The update is staged in full, then published under the repository's journal (patcher.triton.repository.publish): a
killed or failing `patcher triton` leaves the repository as it was or, if it was killed while publishing, in
a state the next run completes; `patcher serve` loads only committed updates.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from patcher.base.errors import PatcherError
from patcher.base.faults import naming
from patcher.base.files import now_iso, sha256_file
from patcher.base.records import to_json
from patcher.triton.repository.builders import TEMPLATES, ModelPlan, Options, plan_entry
from patcher.triton.repository.configs import CONFIG_FILE, ENTRY_PARAMETER, config_text, parameter
from patcher.triton.repository.entry import Entry, check_entry_name, check_repository_path
from patcher.triton.repository.export_info import ExportInfo, load_export
from patcher.triton.repository.provenance import stamp
from patcher.triton.repository.publish import DEFAULT_REPOSITORY, Staged, stage_model
from patcher.triton.repository.request import RepositoryOptions, WrittenEntry, WrittenModel
from patcher.triton.repository.stores import Store, model_versions, open_store
from patcher.triton.repository.warmup import warm

__all__ = ["DEFAULT_REPOSITORY", "TEMPLATES", "RepositoryOptions", "WrittenEntry", "model_versions",
           "write_repository"]
VERSION_RECORD = "patcher.json"
CLASSIFIERS = ("patched", "zeroshot")


def _version_key(store: Store, model: str, version: int) -> tuple[str, str] | None:
    try:
        data = json.loads(store.read(f"{model}/{version}/{VERSION_RECORD}") or "")
    except json.JSONDecodeError:
        return None
    return data.get("content_sha256"), data.get("precision")


def _existing_version(store: Store, entry: Entry, key: tuple[str, str]) -> int | None:
    """The version that already holds this export in every model of the entry, if one does."""
    common: set[int] | None = None
    for model in entry.models():
        holding = {v for v in store.versions(model.name) if _version_key(store, model.name, v) == key}
        common = holding if common is None else common & holding
    return max(common) if common else None


def _check_owners(store: Store, entry: Entry) -> None:
    """PatcherError when a model name of the entry is taken by another entry or by a model patcher did not write."""
    repo = store.location
    for model in entry.models():
        text = store.read(f"{model.name}/{CONFIG_FILE}")
        if text is None and not store.versions(model.name):
            continue
        owner = parameter(_parse_config(text, f"{repo}/{model.name}"), ENTRY_PARAMETER) if text is not None else None
        if owner != entry.name:
            whose = f"entry {owner!r} (`patcher triton --name {owner}`)" if owner else "a model patcher did not write"
            raise PatcherError(f"model {model.name} in {repo} belongs to {whose}: choose another --name")


def _parse_config(text: str, where: str) -> mc.ModelConfig:
    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as error:
        raise PatcherError(f"cannot read Triton config {where}/{CONFIG_FILE}: {error}") from None


def _entry_name(info: ExportInfo, name: str | None) -> str:
    if name is not None:
        return check_entry_name(name)
    default = info.default_name()
    try:
        return check_entry_name(default)
    except PatcherError:
        raise PatcherError(f"the patch task's name {info.patch_task!r} does not make a Triton model name: "
                           "pass --name (letters, digits and _)") from None


def _record(info: ExportInfo, key: tuple[str, str]) -> str:
    return json.dumps({"content_sha256": key[0], "export_json_sha256": info.sha256, "precision": key[1],
                       "run": to_json(info.record.run), "alpha": info.record.alpha,
                       "source": str(info.path.resolve()), "created": now_iso()}, indent=2)


def _stage(plan: ModelPlan, staged: Staged) -> None:
    """Write one model's config, labels and (for a new version) version files into its staging folders."""
    (staged.model_dir / CONFIG_FILE).write_text(config_text(plan.config))
    for filename, classnames in plan.labels.items():
        (staged.model_dir / filename).write_text("".join(" ".join(str(c).split()) + "\n" for c in classnames))
    for relative, data in plan.model_files.items():
        (staged.model_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        (staged.model_dir / relative).write_bytes(data)
    if staged.version is None:
        return
    for filename, source in plan.files.items():
        target = staged.version_dir / filename
        with naming(target):
            if isinstance(source, Path):
                _copy(source, target)
            elif isinstance(source, str):
                target.write_text(source)
            else:
                source(target)


def _copy(source: Path, target: Path) -> None:
    """shutil.copyfile, its write faults naming the file written (sendfile names the source first)."""
    try:
        shutil.copyfile(source, target)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) and error.filename2 is not None:
            raise OSError(error.errno, error.strerror, error.filename2) from error
        raise


def _version_identity(info: ExportInfo, options: Options) -> tuple[str, str]:
    """What a version serves: the export's content (and any extra classifier's bytes) at a precision."""
    if not options.extra_classifiers:
        return info.content_sha256, options.precision
    extras = {kind: sha256_file(path) for kind, path in sorted(options.extra_classifiers.items())}
    text = json.dumps({"export": info.content_sha256, "extra": extras}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest(), options.precision


def write_repository(export_dir: Path, repo: Path | str | Store,
                     options: RepositoryOptions | None = None) -> WrittenEntry:
    """Add an export to a model repository as a new version of every model of one entry (`options.name`, default
    the patch task); `repo` is a folder or an s3:// location (stores.py).

    An export already in the repository gets no new version (configs and labels are refreshed).
    """
    options = options or RepositoryOptions()
    check_repository_path(Path(repo))
    checked = options.checked()
    info = load_export(export_dir)
    entry = Entry(_entry_name(info, options.name), tuple(info.record.tasks), tuple(checked.extra_classifiers),
                  info.record.text is not None)
    files = {**{kind: info.model_file(kind, checked.precision) for kind in CLASSIFIERS}, **checked.extra_classifiers}
    key = _version_identity(info, checked)
    plans = plan_entry(info, entry, files, checked, _record(info, key))
    stamp(plans, info, files)
    note = None
    if options.warmup:
        note = warm(plans, info, checked.batching.max_batch_size,
                    gpu=checked.tensorrt is not None or checked.batching.gpu, limits=checked.limits)
    return _publish(open_store(repo), entry, plans, key, checked.backend, note)


def _publish(store: Store, entry: Entry, plans: list[ModelPlan], key: tuple[str, str], backend: str,
             note: str | None) -> WrittenEntry:
    """Stage every model and publish them under the journal: a new version, or the one already holding `key`
    (`note`: the warmup's, added to the message)."""
    models = entry.models()
    with store.writing():
        recovered = store.recover()
        _check_owners(store, entry)
        existing = _existing_version(store, entry, key)
        if existing is not None:
            version, new = existing, False
            message = (f"this export ({key[0][:12]}) is already version {version} of {entry.name}: "
                       "no new version written")
        else:
            version = 1 + max([0, *(v for m in models for v in store.versions(m.name))])
            new = True
            message = f"wrote version {version} of {entry.name} ({len(models)} models)"
        message = message if note is None else f"{message}; {note}"
        with store.staging() as staging:
            staged = [stage_model(staging, plan.model.name, version if new else None) for plan in plans]
            for plan, item in zip(plans, staged, strict=True):
                _stage(plan, item)
            journal = store.publish(staging, staged, entry.name, version if new else None)
    return WrittenEntry(
        repository=store.location, name=entry.name, backend=backend, precision=key[1], version=version, new_version=new,
        message=message, recovered=recovered, serial=journal.serial, content_sha256=key[0],
        models={m.name: WrittenModel(kind=m.kind, task=m.task, version=version, versions=store.versions(m.name))
                for m in models})
