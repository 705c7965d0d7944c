"""A patching session: one model, its tasks and data; fine-tunes from any state, scores any state, chooses alpha.

States are passed explicitly: `accuracy(state, ...)` evaluates the classifier that state gives without loading it
into the shared model, so no result depends on what ran before. Only `fine_tune` changes the model: it trains
it in place, starting from the state it is given.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from patcher.base.errors import PatcherError
from patcher.base.progress import make_progress
from patcher.data.evaluation import Labelling, Scorer, scores
from patcher.data.image_store import ImageStore
from patcher.data.metrics import Scores
from patcher.data.prepared_splits import Splits
from patcher.data.tasks import Task
from patcher.models import LoadedModel
from patcher.models.classifier import MultiHeadClassifier
from patcher.models.heads import HeadResolver
from patcher.models.state import (
    HEAD_PREFIX,
    TEXT_PREFIX,
    VISUAL_PREFIX,
    State,
    has_text,
    part,
    prefixed,
    text_state,
    visual_state,
)
from patcher.patching.alpha import DEFAULT_GRID, SEARCHES, AlphaRule, Selection
from patcher.patching.task_vectors import fill_missing
from patcher.training.config import TrainConfig
from patcher.training.loop import MethodTracking, train_method
from patcher.training.methods import Method, MethodSetup

AlphaPath = Callable[[float], State]  # alpha -> state: an interpolation or task-arithmetic path


@dataclass
class Trained:
    """A fine-tuned state and what produced it."""

    state: State
    method: Method
    steps: int
    stages: list[dict[str, Any]] = field(default_factory=list)  # each stage's name and hyperparameters


@dataclass(frozen=True, kw_only=True)
class FineTuning:
    """One fine-tune: the method and its parameters, the tasks and hyperparameters, and where training writes
    its checkpoints and log (steps numbered from `step_offset`, stages prefixed with `label`; every log line also
    to `on_log`)."""

    method: type[Method]
    params: Any
    tasks: list[str]
    train_config: TrainConfig
    checkpoints: Path | None = None
    log: Path | None = None
    step_offset: int = 0
    label: str = ""
    on_log: Callable[[dict[str, Any]], None] | None = None


class Session:
    """One model, its tasks and data: fine-tunes methods from any state and scores any state."""

    def __init__(
        self,
        loaded: LoadedModel,
        tasks: Mapping[str, Task],
        zeroshot_heads: Mapping[str, torch.Tensor],
        splits: Splits,
        device: str = "cpu",
        eval_batch_size: int = 256,
    ) -> None:
        self.loaded = loaded
        self.tasks = dict(tasks)
        self.splits = splits
        self.device = device
        self.eval_batch_size = eval_batch_size
        self.resolver = HeadResolver(zeroshot_heads, tasks, loaded, device)
        self.zeroshot = visual_state(loaded.model)
        self._zeroshot_text: State | None = None

    def zeroshot_text(self) -> State:
        """The zero-shot text tower as `text.*`, copied the first time a state needs it (before any changes it)."""
        if self._zeroshot_text is None:
            self._zeroshot_text = text_state(self.loaded.model)
        return self._zeroshot_text

    def complete(self, *states: Mapping[str, torch.Tensor]) -> list[State]:
        """The states with the same keys: any key one lacks takes its zero-shot value."""
        base = {**self.zeroshot, **prefixed(HEAD_PREFIX, self.resolver.zeroshot_heads)}
        if any(has_text(state) for state in states):
            base.update(self.zeroshot_text())
        return fill_missing(states, base)

    def base_values(self, keys: list[str]) -> State:
        """The zero-shot value of each key (encoder, zero-shot heads, text tower): what a merge starts from."""
        base = {**self.zeroshot, **prefixed(HEAD_PREFIX, self.resolver.zeroshot_heads)}
        if any(key.startswith(TEXT_PREFIX) for key in keys):
            base.update(self.zeroshot_text())
        missing = [key for key in keys if key not in base]
        if missing:
            raise PatcherError(f"no zero-shot value for {missing[0]}: the runs come from another architecture")
        return {key: base[key] for key in keys}

    def fine_tune(self, start: Mapping[str, torch.Tensor], fine_tuning: FineTuning) -> Trained:
        """Train the method on its tasks (balanced) from `start`, in place in the session's model; the state is
        `start` with what the method trained. With `eval_every`, the held-out accuracy of every task is measured on
        the weights being trained."""
        if "text" in fine_tuning.method.trains:
            self.zeroshot_text()
        self._load(start)
        setup = MethodSetup(self.loaded, {t: self.splits.train[t] for t in fine_tuning.tasks}, self.tasks,
                            self.resolver.heads(start), fine_tuning.train_config, self.device)
        method = fine_tuning.method(setup, fine_tuning.params)
        stages = [{"stage": f"{fine_tuning.label}{stage.name}", **stage.train_config.as_dict()}
                  for stage in method.stages()]

        def evaluate() -> dict[str, float]:
            return self.accuracy({**dict(start), **method.state()}, self.splits.val)

        tracking = MethodTracking(checkpoint_dir=fine_tuning.checkpoints, log_path=fine_tuning.log,
                                  step_offset=fine_tuning.step_offset, label=fine_tuning.label,
                                  on_log=fine_tuning.on_log)
        steps = train_method(method, self.device, tracking, evaluate if fine_tuning.train_config.eval_every else None)
        self.loaded.model.eval()
        return Trained({**dict(start), **method.state()}, method, steps, stages)

    def _load(self, state: Mapping[str, torch.Tensor]) -> None:
        """Put a state's encoder and text tower (the zero-shot one where it has none) into the model to train it."""
        model = self.loaded.model
        model.visual.load_state_dict(part(VISUAL_PREFIX, state))
        text = part(TEXT_PREFIX, state) or (part(TEXT_PREFIX, self._zeroshot_text) if self._zeroshot_text else {})
        model.load_state_dict(text, strict=False)

    def classifier(self, state: Mapping[str, torch.Tensor], tasks: list[str]) -> MultiHeadClassifier:
        """The classifier a state gives for these tasks, evaluating the encoder at the state's weights."""
        encoder_state, heads = self.resolver.resolve(state)
        weights = {key: value.to(self.device) for key, value in encoder_state.items()}
        return MultiHeadClassifier(self.loaded.model.visual, {task: heads[task] for task in tasks}, weights)

    def labelling(self, task: str) -> Labelling:
        """How a task's predictions are counted: its labels, and the label of each head column."""
        spec = self.tasks[task]
        return Labelling(len(spec.label_names), spec.column_labels)

    def scores(self, state: Mapping[str, torch.Tensor], stores: Mapping[str, ImageStore]) -> dict[str, Scores]:
        """Confusion matrices (top-1, macro-F1, worst-class and per-class accuracy) of the classifier this state
        gives, per task, on the given held-out or test stores."""
        classifier = self.classifier(state, list(stores))
        labelling = {task: self.labelling(task) for task in stores}
        scorer = Scorer(classifier=classifier, normalize=self.splits.normalize, batch_size=self.eval_batch_size,
                        device=self.device)
        return scores(scorer, stores, labelling)

    def accuracy(self, state: Mapping[str, torch.Tensor], stores: Mapping[str, ImageStore]) -> dict[str, float]:
        """Top-1 accuracy (%) of the classifier this state gives, per task, on the given held-out or test stores."""
        return {task: result.accuracy for task, result in self.scores(state, stores).items()}

    def select(
        self,
        path: AlphaPath,
        rule: AlphaRule,
        search: str,
        fixed_alpha: float | None = None,
        description: str = "choosing alpha",
        grid: tuple[float, ...] = DEFAULT_GRID,
    ) -> Selection:
        """Choose alpha on held-out data along `path` with PAINT's rule (search, or a fixed value reported); every
        task evaluated (monitored ones too) keeps its scores at each alpha in `Selection.scores`."""
        evaluated: dict[float, dict[str, Scores]] = {}
        with make_progress() as progress:
            total = len(grid) if fixed_alpha is None else 3
            bar = progress.add_task(description, total=total, status="")

            def evaluate(alpha: float) -> dict[str, float]:
                evaluated[alpha] = self.scores(path(alpha), self.splits.val)
                result = {task: figures.accuracy for task, figures in evaluated[alpha].items()}
                shown = ", ".join(f"{t} {result[t]:.1f}%" for t in rule.patch)
                progress.update(bar, advance=1, status=f"alpha {alpha:g}: {shown}")
                return result

            if fixed_alpha is None:
                selection = SEARCHES.entry(search).builds(evaluate, rule, grid)
                progress.update(bar, total=selection.evaluations)
            else:
                curve = {a: evaluate(a) for a in sorted({0.0, fixed_alpha, 1.0})}
                selection = Selection(alpha=fixed_alpha, rule=f"fixed by --alpha {fixed_alpha:g}",
                                      curve=rule.choose(curve).curve)
        selection.scores = {alpha: evaluated[alpha] for alpha in selection.curve}
        return selection
