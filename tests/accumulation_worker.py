"""Run by tests/test_distributed.py under `torchrun --nproc-per-node 2`: ft, flyp and carft with 4 micro-batches of
each rank's half of the batch; rank 0 saves the trained states to OUT/<method>.safetensors, every rank its
few-shot choice of digits' training images to OUT/shots-<rank>.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from scale_support import fine_tune, tiny_setup

from patcher.base import distributed
from patcher.data.shots import dataset_labels, few_shot_indices
from patcher.data.tasks import get_task

METHODS = ("ft", "flyp", "carft")


def main(out: Path) -> None:
    """Train each method and write what the test compares."""
    distributed.init_from_environment("cpu")
    try:
        for name in METHODS:
            state = fine_tune(name, tiny_setup(torch.float64, accum_steps=4))
            if distributed.is_main():
                save_file({key: value.contiguous() for key, value in state.items()}, str(out / f"{name}.safetensors"))
        chosen = few_shot_indices(dataset_labels(get_task("digits").dataset("train")), 5, seed=0, num_classes=10)
        (out / f"shots-{distributed.rank()}.json").write_text(json.dumps(chosen.tolist()))
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
