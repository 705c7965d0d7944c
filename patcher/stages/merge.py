"""`patcher merge`: combine finished runs the parallel way into one run, by task arithmetic or another method.

Each run contributes its task vector, fine-tuned minus zero-shot over what its method trained (encoder,
probed heads, text tower); `--method` (patching/merge_methods.py: task-arithmetic, ties, dare, breadcrumbs,
consensus, wudi, layerwise, layerwise-labelled, and each combining one as `<name>-nullspace`, its merged change kept
out of the supported tasks' input subspaces) turns them into one merged vector, and the merged model is zero-shot +
coefficient * that vector, the coefficient and the method's parameters chosen on held-out data with PAINT's rule
(patch accuracy = mean over every run's patch tasks; `--min-retained` bounds each task's share of its own
fine-tune). Task vectors are read one tensor of each run at a time (`patching/sources.py`), so memory does not grow
with the number of runs. Runs must share the base model (weights digest) and architecture. It is the parallel
strategy over stored task vectors, so it writes its run with build's write step (`stages/outputs.py`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from patcher.base.errors import PatcherError
from patcher.base.progress import console
from patcher.base.staging import staged_output
from patcher.data.options import DataOptions
from patcher.data.prepared_splits import SplitTasks, prepare_splits
from patcher.data.tasks import Task, task_of
from patcher.models import LoadedModel, build_from_config, load_clip, state_dict_digest
from patcher.models.heads import zero_shot_head
from patcher.models.state import HEAD_PREFIX, TEXT_PREFIX, VISUAL_PREFIX, State, prefixed, split_classifier_state
from patcher.patching.alpha import AlphaRule, parse_alpha
from patcher.patching.merge_search import MergeSpec, merge_states
from patcher.patching.session import Session
from patcher.patching.sources import FileVectors, TensorFile
from patcher.patching.strategies import ParallelOutcome
from patcher.runs.layout import text_file
from patcher.runs.manifest import MergedRun, MergedTraining, MethodRecord, Run, TaskRecord, load_run, options_sha256
from patcher.runs.weights import verified_config, verified_weights
from patcher.stages.build import accuracies_of, test_scores
from patcher.stages.outputs import RunContents, write_run
from patcher.training.loop import pick_device


@dataclass
class MergeOptions:
    """What `patcher merge` takes."""

    runs: list[Path]
    out: Path
    support: list[str] = field(default_factory=list)
    tolerance: float = 1.0
    alpha: str = "auto"
    data_dir: Path | None = None
    download: bool = False
    device: str = "auto"
    eval_batch_size: int = 256
    data: DataOptions = field(default_factory=DataOptions)
    merge: MergeSpec = field(default_factory=MergeSpec)

    def fingerprint(self, runs: list[Run]) -> dict[str, Any]:
        """What determines the merged run: the runs (by manifest hash), the rule and the merge method."""
        spec = self.merge
        method = {} if spec == MergeSpec() else {"merge": {"method": spec.method, "params": dict(spec.params),
                                                           "min_retained": spec.min_retained, "seed": spec.seed,
                                                           "search": spec.search}}
        return {"runs": [run.manifest_sha256 for run in runs], "support": self.support,
                "tolerance": self.tolerance, "alpha": self.alpha, **method}


def check_compatible(runs: list[Run]) -> dict[str, Any]:
    """The shared open_clip config; PatcherError when base weights, architecture or preprocessing differ."""
    if len(runs) < 2:
        raise PatcherError("merge needs at least two runs")
    first = runs[0]
    config = verified_config(first)
    for run in runs[1:]:
        if run.manifest.model.weights_sha256 != first.manifest.model.weights_sha256:
            raise PatcherError(f"{run.path} was built from different base model weights than {first.path} "
                               "(weights_sha256 differ): only runs of one base model can be merged")
        if verified_config(run)["model_cfg"] != config["model_cfg"]:
            raise PatcherError(f"{run.path} and {first.path} have different architectures (open_clip configs "
                               "differ): only runs of one architecture can be merged")
        if run.manifest.model.preprocess != first.manifest.model.preprocess:
            raise PatcherError(f"{run.path} and {first.path} preprocess images differently: rebuild one of them")
    return config


def _classifier(run: Run, kind: str) -> tuple[State, dict[str, torch.Tensor]]:
    return split_classifier_state(load_file(str(verified_weights(run, kind))))


def finetuned_state(run: Run) -> State:
    """What the run's method trained, at its fine-tuned value: encoder, probed heads, text tower."""
    encoder, heads = _classifier(run, "finetuned")
    state = prefixed(VISUAL_PREFIX, encoder)
    state.update(prefixed(HEAD_PREFIX, {task: heads[task] for task in run.manifest.method.head_tasks}))
    if run.manifest.text_tower.trained:
        state.update(prefixed(TEXT_PREFIX, load_file(str(run.verified_file(text_file("finetuned"))))))
    return state


def run_files(run: Run) -> list[TensorFile]:
    """The files holding what a run's method trained, for reading its task vector one tensor at a time."""
    heads = {f"{HEAD_PREFIX}{task}" for task in run.manifest.method.head_tasks}
    classifier = verified_weights(run, "finetuned")
    with safe_open(str(classifier), framework="pt") as handle:
        stored = handle.keys()  # safe_open is not iterable
    keys = frozenset(key for key in stored if key.startswith(VISUAL_PREFIX) or key in heads)
    files = [TensorFile(classifier, "", keys)]
    if run.manifest.text_tower.trained:
        files.append(TensorFile(run.verified_file(text_file("finetuned")), TEXT_PREFIX))
    return files


def _tasks(runs: list[Run], extra_support: list[str]) -> tuple[list[str], list[str]]:
    patch = list(dict.fromkeys(task for run in runs for task in run.manifest.patch_tasks))
    support = [t for run in runs for t in run.manifest.support_tasks] + list(extra_support)
    return patch, [t for t in dict.fromkeys(support) if t not in patch]


def _base_model(runs: list[Run], config: dict[str, Any], needs_text: bool, device: str) -> LoadedModel:
    model = runs[0].manifest.model
    if needs_text:
        loaded = load_clip(model.name, model.pretrained, model.image_size, device=device)
        if loaded.weights_sha256 != model.weights_sha256:
            raise PatcherError(f"{model.name} ({model.pretrained}) no longer has the weights these runs were "
                               "built from (weights_sha256 differs): text-tower runs and new supported tasks need it")
        return loaded
    built = build_from_config(config).to(device)
    return LoadedModel(model=built, tokenizer=None, name=model.name,  # type: ignore[arg-type]
                       pretrained=model.pretrained, model_cfg=config["model_cfg"],
                       preprocess_cfg=config.get("preprocess_cfg", {}), weights_sha256=model.weights_sha256)


def _load_tasks(runs: list[Run], names: list[str]) -> dict[str, Task]:
    tasks = {}
    for name in names:
        sources = [run.manifest.tasks[name].source for run in runs if name in run.manifest.tasks]
        task = task_of(name, next((source for source in sources if source), None))
        for run in runs:
            recorded = run.manifest.tasks.get(name)
            if recorded is not None and list(recorded.classnames) != list(task.classnames):
                raise PatcherError(f"{name}'s class names changed since {run.path} was built: rebuild that run")
        tasks[name] = task
    return tasks


def _zeroshot_heads(runs: list[Run], tasks: dict[str, Task], loaded: LoadedModel, device: str) -> dict:
    heads: dict[str, torch.Tensor] = {}
    for run in runs:
        stored = _classifier(run, "zeroshot")[1]
        heads.update({task: head for task, head in stored.items() if task in tasks and task not in heads})
    for name, task in tasks.items():
        if name not in heads:
            heads[name] = zero_shot_head(loaded, list(task.classnames), list(task.templates), device)
    return {name: heads[name] for name in tasks}


def _merged_method(runs: list[Run], reference: str) -> MethodRecord:
    methods = [run.manifest.method for run in runs]
    names = list(dict.fromkeys(method.name for method in methods))
    return MethodRecord(
        name=names[0] if len(names) == 1 else "+".join(names),
        params={run.name: run.manifest.method.params for run in runs},
        trains=list(dict.fromkeys(part for method in methods for part in method.trains)),
        head_tasks=list(dict.fromkeys(task for method in methods for task in method.head_tasks)),
        reference=reference,
    )


def _task_records(runs: list[Run], tasks: dict[str, Task], patch: list[str], session: Session) -> dict:
    def record(task: str, role: str) -> TaskRecord:
        recorded = next((run.manifest.tasks[task].sizes for run in runs
                         if task in run.manifest.tasks and task in run.manifest.patch_tasks), {})
        train = {"train": recorded["train"]} if "train" in recorded else {}
        sizes = {**train, "val": len(session.splits.val[task]), "test": len(session.splits.test[task])}
        return TaskRecord(role, tasks[task].classnames, tasks[task].templates, sizes, source=tasks[task].source)

    return {task: record(task, "patch" if task in patch else "support") for task in tasks}


def merge_runs(options: MergeOptions) -> Path:
    """Merge the runs, choose the coefficient, write the merged run directory; return its path."""
    started = time.perf_counter()
    out = Path(options.out)
    if out.exists():
        raise PatcherError(f"{out} already exists: pass another --out or remove it")
    if options.tolerance < 0:
        raise PatcherError(f"--tolerance {options.tolerance:g} is negative: pass points of accuracy, e.g. 1")
    fixed_alpha = parse_alpha(options.alpha)
    options.merge.check()
    runs = [load_run(path) for path in options.runs]
    config = check_compatible(runs)
    device = pick_device(options.device)
    patch, support = _tasks(runs, options.support)
    known = {t for run in runs for t in run.manifest.tasks}
    needs_text = any(run.manifest.text_tower.trained for run in runs) or bool(set(support) - known)
    loaded = _base_model(runs, config, needs_text, device)

    zeroshot_visual = _classifier(runs[0], "zeroshot")[0]
    for run in runs[1:]:
        if state_dict_digest(_classifier(run, "zeroshot")[0]) != state_dict_digest(zeroshot_visual):
            raise PatcherError(f"{run.path} has another zero-shot encoder than {runs[0].path}: different base models")
    loaded.model.visual.load_state_dict(zeroshot_visual)
    tasks = _load_tasks(runs, [*patch, *support])
    heads = _zeroshot_heads(runs, tasks, loaded, device)

    splits = prepare_splits(SplitTasks(evaluate=list(tasks.values())), loaded.preprocess_cfg, options.data,
                            data_dir=options.data_dir, download=options.download, device=device)
    session = Session(loaded, tasks, heads, splits, device, options.eval_batch_size)
    files = [run_files(run) for run in runs]
    keys = list(dict.fromkeys([*session.zeroshot, *(key for run in files for f in run for key in f.names())]))
    vectors = FileVectors(session.base_values(keys), files)
    own = [((lambda r=run: finetuned_state(r)), list(run.manifest.patch_tasks)) for run in runs]
    states, selection, parts = merge_states(session, options.merge, vectors, AlphaRule(patch, support,
                                            options.tolerance), own, fixed_alpha)
    if selection.warning:
        console.print(f"[yellow]warning:[/] {selection.warning}")
    sources = [MergedRun(run.name, str(run.path), run.manifest_sha256, run.manifest.method,
                         run.manifest.patch_tasks, run.manifest.alpha.chosen) for run in runs]
    outcome = ParallelOutcome(states=states, selection=selection, reference=selection.curve[0.0], trained=[],
                              title=f"merged {', '.join(patch)} ({parts.method.name}): held-out accuracy against "
                              "the coefficient", merged_runs=sources, merge=parts)
    tested = test_scores(session, outcome)
    training = MergedTraining(device=device, total_steps=sum(run.manifest.training.total_steps for run in runs))
    method = _merged_method(runs, parts.method.reference)
    alpha = outcome.alpha_record(fixed_alpha is not None, options.merge.search, options.tolerance,
                                 {task: options.tolerance for task in support})
    contents = RunContents(name=out.name, options_sha256=options_sha256(options.fingerprint(runs)),
                           model=runs[0].manifest.model, open_clip_config=config,
                           tasks=_task_records(runs, tasks, patch, session), method=method, training=training,
                           outcome=outcome, alpha=alpha, test_accuracy=accuracies_of(tested),
                           resolver=session.resolver, timings={}, test_scores=tested)
    with staged_output(out) as staging:  # locked, stale partials cleaned, write faults as one error
        contents.timings["total"] = time.perf_counter() - started
        write_run(staging.open(), contents)
    return out


__all__ = ["MergeOptions", "check_compatible", "finetuned_state", "merge_runs"]
