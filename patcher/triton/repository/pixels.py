"""The raw-pixel classifier: an exported graph with CLIP's normalisation prepended, for clients that send 0-255.

NVIDIA's image_client.py (`-s NONE`) and most outside clients resize an image to the model's H x W and send its
pixel values as floats: `pixels` [N, 3, H, W] in 0..255. The graph computes `image = (pixels - 255 mean) /
(255 std)`, exactly the tensor the exported classifier takes, and runs it unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

PIXELS_INPUT = "pixels"
_DTYPES = {1: np.float32, 10: np.float16}  # ONNX element types the exported image input may have


def pixels_graph(source: Path, target: Path, mean: Sequence[float], std: Sequence[float]) -> Path:
    """Write `target`: `source`'s graph taking raw pixels (input PIXELS_INPUT) and normalising them first."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    (image,) = [value for value in graph.input if value.name not in initializers]
    dtype = _DTYPES[image.type.tensor_type.elem_type]
    shape = (1, len(mean), 1, 1)
    scale = np.float64(255.0)
    offset = numpy_helper.from_array((np.asarray(mean, np.float64) * scale).astype(dtype).reshape(shape),
                                     "patcher_pixels_mean")
    divisor = numpy_helper.from_array((np.asarray(std, np.float64) * scale).astype(dtype).reshape(shape),
                                      "patcher_pixels_std")
    pixels = onnx.ValueInfoProto()
    pixels.CopyFrom(image)
    pixels.name = PIXELS_INPUT
    centred = "patcher_pixels_centred"
    nodes = [helper.make_node("Sub", [PIXELS_INPUT, offset.name], [centred], name="patcher_pixels_sub"),
             helper.make_node("Div", [centred, divisor.name], [image.name], name="patcher_pixels_div")]
    graph.initializer.extend([offset, divisor])
    inputs = [PIXELS_INPUT if value.name == image.name else None for value in graph.input]
    graph.input.remove(image)
    graph.input.insert(inputs.index(PIXELS_INPUT), pixels)
    for node in reversed(nodes):
        graph.node.insert(0, node)
    model.doc_string = f"{model.doc_string} (raw 0-255 pixels in, CLIP normalisation inside the graph)".strip()
    onnx.checker.check_model(model)
    onnx.save(model, str(target))
    return target
