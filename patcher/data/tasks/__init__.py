"""Task registry: class names, prompt templates and train / val / test loaders for each task.

`get_task("gtsrb")` (or `get_task("folder:PATH")` for a dataset in ImageFolder layout) gives a Task with
CLIP's published class names and "{}" templates; `task.dataset("val", data_root)` gives its items as
(RGB PIL image, int label), with "val" a seeded holdout of the train split.
"""

from patcher.data.tasks.paths import default_data_root
from patcher.data.tasks.registry import PAINT_TASKS, get_task, known_tasks, short_name, task_of
from patcher.data.tasks.task import Task

__all__ = ["PAINT_TASKS", "Task", "default_data_root", "get_task", "known_tasks", "short_name", "task_of"]
