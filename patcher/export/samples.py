"""A real held-out image of each exported task, kept beside the ONNX files (RUN/onnx/samples/<task>.png) so that
`patcher triton` can warm a new version up with real inputs without loading any dataset."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from patcher.base.files import sha256_file
from patcher.export.contract import SAMPLES_DIR, ExportedSample, tensor_name
from patcher.export.heldout import HeldOut
from patcher.runs.manifest import Preprocess


def sample_png(image: np.ndarray, preprocess: Preprocess) -> bytes:
    """A CLIP-normalised [3, H, W] image back to 8-bit RGB pixels, as PNG bytes."""
    mean = np.asarray(preprocess.mean, np.float32).reshape(3, 1, 1)
    std = np.asarray(preprocess.std, np.float32).reshape(3, 1, 1)
    pixels = np.clip(np.rint((image * std + mean) * 255.0), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.transpose(1, 2, 0), "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def write_samples(folder: Path, heldout: HeldOut, preprocess: Preprocess) -> dict[str, ExportedSample]:
    """The first held-out image of each task as `samples/<task>.png` in `folder`; their records."""
    (folder / SAMPLES_DIR).mkdir(exist_ok=True)
    samples = {}
    for task, span in heldout.spans.items():
        relative = f"{SAMPLES_DIR}/{tensor_name(task)}.png"
        (folder / relative).write_bytes(sample_png(heldout.images[span.start].float().numpy(), preprocess))
        samples[task] = ExportedSample(file=relative, sha256=sha256_file(folder / relative),
                                       label=int(heldout.labels[span.start]))
    return samples
