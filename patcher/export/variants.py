"""The derived forms of a traced graph: onnxruntime's offline optimisation and half precision."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx

from patcher.base.errors import PatcherError

OPTIMIZATION_LEVEL = "extended"


def optimize_onnx(source: Path, target: Path) -> onnx.ModelProto:
    """onnxruntime's offline graph optimisation at the extended level, which stays portable across machines."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # "all" adds layout transforms tied to this CPU (NCHWc); "extended" only fuses (BiasGelu, ...) into
    # com.microsoft ops that every onnxruntime build and execution provider runs.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(target)
    try:
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own exception types
        raise PatcherError(f"onnxruntime could not optimise {source.name}: {error}") from error
    model = onnx.load(str(target))
    prune_opset_imports(model)
    return model


def prune_opset_imports(model: onnx.ModelProto) -> None:
    """Drop the opset imports of domains no node uses (onnxruntime writes every domain it knows)."""
    used = {node.domain for node in model.graph.node} | {""}
    kept = [opset for opset in model.opset_import if opset.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Half-precision weights and compute with float32 inputs and outputs (cast nodes at the edges)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    # Transpose stays float32: an fp16 Transpose feeding a MatMul makes onnxruntime >= 1.24 on x86-64
    # crash (SIGSEGV in NchwcTransformer while creating a default session; microsoft/onnxruntime#28392).
    blocked = [*DEFAULT_OP_BLOCK_LIST, "Transpose"]
    logger = logging.getLogger("onnxruntime.transformers.float16")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one "value truncated to fp16" warning per small weight
            half = convert_float_to_float16(model, keep_io_types=True, op_block_list=blocked)
    finally:
        logger.setLevel(previous)
    topological_sort(half.graph)
    return half


def topological_sort(graph: onnx.GraphProto) -> None:
    """Order nodes so each comes after its inputs' producers (the fp16 converter appends its casts at the end)."""
    available = {value.name for value in graph.input} | {init.name for init in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        waiting = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            raise PatcherError(f"graph {graph.name} has a cycle or a dangling input at {waiting[0].name}")
        pending = waiting
    del graph.node[:]
    graph.node.extend(ordered)


def to_int8(source: Path, target: Path) -> onnx.ModelProto:
    """Dynamic int8 quantisation (onnxruntime): int8 weights, activations quantised per batch at run time, float32
    inputs and outputs. Measured against static QDQ calibrated on held-out images in bench/results/int8.md."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = target.with_name(f".{target.name}.prepared")
    logger = logging.getLogger()
    previous = logger.level
    logger.setLevel(logging.ERROR)  # the quantiser logs advice on every run
    try:
        # onnxruntime's symbolic shape inference cannot follow open_clip's reshapes; its optimiser can
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8, per_channel=False)
    except Exception as error:  # onnxruntime raises its own exception types
        raise PatcherError(f"onnxruntime could not quantise {source.name} to int8: {error}") from error
    finally:
        logger.setLevel(previous)
        prepared.unlink(missing_ok=True)
    return onnx.load(str(target))
