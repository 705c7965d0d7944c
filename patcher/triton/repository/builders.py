"""What one entry's models consist of: each model's config.pbtxt, labels files and version files, from an export."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from patcher.base.errors import PatcherError
from patcher.base.registries import Registered, Registry
from patcher.triton.repository.configs import (
    IMAGE_BYTES,
    NUMPY_TYPES,
    Step,
    Tensors,
    classifier_config,
    ensemble_config,
    preprocess_config,
)
from patcher.triton.repository.entry import Entry, Model
from patcher.triton.repository.entry_context import (
    IMAGE_FORMAT,
    TEMPLATES,
    EntryContext,
    ModelPlan,
    Options,
    Source,
    python_model,
    task_outputs,
)
from patcher.triton.repository.export_info import ExportInfo, TensorSpec, onnx_io
from patcher.triton.repository.openvocab_models import build_classify, build_embed, build_text
from patcher.triton.repository.pixels import PIXELS_INPUT, pixels_graph

__all__ = ["BUILDERS", "TEMPLATES", "EntryContext", "ModelPlan", "Options", "plan_entry"]


def _fill_dims(spec: TensorSpec, declared: dict[str, list[int]]) -> TensorSpec:
    """Unknown non-batch ONNX dims (-1) taken from export.json's shapes where it states them."""
    shape = declared.get(spec.name)
    if not shape or len(shape) != len(spec.shape):
        return spec
    dims = tuple(d if d != -1 else int(shape[i]) for i, d in enumerate(spec.shape))
    return TensorSpec(spec.name, spec.data_type, (spec.shape[0], *dims[1:]))


def classifier_io(info: ExportInfo, path: Path) -> tuple[TensorSpec, list[TensorSpec]]:
    """The image input and the outputs of an exported classifier, checked against export.json."""
    declared = {t.name: t.shape for t in [info.record.input, *info.record.outputs]}
    for record in info.record.tasks.values():
        declared.setdefault(record.output, [-1, len(record.classnames)])
    inputs, outputs = onnx_io(path)
    inputs = [_fill_dims(s, declared) for s in inputs]
    outputs = [_fill_dims(s, declared) for s in outputs]
    if len(inputs) != 1:
        raise PatcherError(f"{path} has {len(inputs)} inputs, expected one image input: re-run `patcher export`")
    frozen = [s.name for s in [*inputs, *outputs] if not s.shape or s.shape[0] != -1]
    if frozen:
        raise PatcherError(f"{path}: batch dimension of {', '.join(frozen)} is fixed, not dynamic: re-export it")
    missing = set(task_outputs(info).values()) - {s.name for s in outputs}
    if missing:
        raise PatcherError(f"{path} lacks outputs {sorted(missing)} that {info.path / 'export.json'} lists")
    if inputs[0].data_type not in NUMPY_TYPES:
        raise PatcherError(f"{path}: image input is {inputs[0].data_type}, expected float32 or float16")
    return inputs[0], outputs


IMAGE_BYTES_SPEC = TensorSpec(IMAGE_BYTES, "TYPE_STRING", (-1, 1))


def build_preprocess(context: EntryContext, model: Model) -> ModelPlan:
    """Encoded image bytes -> the classifier's normalised input (python backend, bounded inputs)."""
    parameters = {**context.common(), "preprocess": context.preprocess, "limits": context.options.limits}
    config = preprocess_config(model.name, context.image, context.options.batching, parameters)
    return context.plan(model, config, python_model("preprocess_model.py", imaging=True))


def _classifier(context: EntryContext, model: Model, spec: TensorSpec, image_format: str | None,
                onnx_file: Source) -> ModelPlan:
    options = context.options
    parameters = context.described()
    if options.intra_op_threads:
        parameters["intra_op_threads"] = str(options.intra_op_threads)
    tensors = Tensors(image=spec, outputs=context.outputs, labels=context.labels, image_format=image_format)
    config = classifier_config(model.name, tensors, options.backend, options.batching, parameters, options.tensorrt)
    # model.onnx serves platform onnxruntime_onnx and the python backend's model.py alike
    return context.plan(model, config, {"model.onnx": onnx_file, **python_model("onnx_model.py")})


def build_classifier(context: EntryContext, model: Model) -> ModelPlan:
    """An exported classifier (patched, zeroshot or an extra one): normalised images in, embedding and logits out."""
    return _classifier(context, model, context.image, None, context.files[model.kind])


def build_pixels(context: EntryContext, model: Model) -> ModelPlan:
    """The patched classifier taking 0-255 NCHW pixels, normalising inside the graph (NVIDIA's image convention)."""
    mean, std = context.preprocess["mean"], context.preprocess["std"]
    source = context.files["patched"]
    return _classifier(context, model, context.pixels, IMAGE_FORMAT,
                       lambda target: pixels_graph(source, target, mean, std))


def build_ensemble(context: EntryContext, model: Model) -> ModelPlan:
    """Encoded images in, embedding and every task's labelled logits out."""
    steps = context.bytes_steps({o.name: o.name for o in context.outputs})
    tensors = Tensors(image=IMAGE_BYTES_SPEC, outputs=context.outputs, labels=context.labels)
    config = ensemble_config(model.name, tensors, steps, context.options.batching.max_batch_size, context.described())
    return context.plan(model, config)


def build_task_pixels(context: EntryContext, model: Model) -> ModelPlan:
    """One task in Triton's image-classification convention: pixels in, one labelled output."""
    output = context.output(model.task or "")
    steps = [Step(context.name("pixels"), {PIXELS_INPUT: PIXELS_INPUT}, {output.name: output.name})]
    parameters = {**context.common(), "tasks": {model.task: output.name}}
    tensors = Tensors(image=context.pixels, outputs=[output], labels=context.labels, image_format=IMAGE_FORMAT)
    config = ensemble_config(model.name, tensors, steps, context.options.batching.max_batch_size, parameters)
    return context.plan(model, config)


def build_task_bytes(context: EntryContext, model: Model) -> ModelPlan:
    """One task: encoded images in, one labelled output."""
    output = context.output(model.task or "")
    parameters = {**context.common(), "tasks": {model.task: output.name},
                  "preprocess_model": context.name("preprocess")}
    tensors = Tensors(image=IMAGE_BYTES_SPEC, outputs=[output], labels=context.labels)
    config = ensemble_config(model.name, tensors, context.bytes_steps({output.name: output.name}),
                             context.options.batching.max_batch_size, parameters)
    return context.plan(model, config)


# What each model is for, as `patcher triton` writes it into the model's config (parameter "description"), so that a
# user reading the config (GET /v2/models/<model>/config, tritonclient's get_model_config) can tell them apart.
DESCRIPTIONS = {
    "ensemble": "START HERE. Encoded images (BYTES [N,1]: JPEG, PNG, PPM files' bytes) in; the patched model's "
                "embedding and every task's logits out (ask class_count=K for 'score:index:label'). Scores are "
                "logits: logit_scale x cosine, softmax them for probabilities.",
    "preprocess": "Step 1 of the {entry} ensembles: encoded image bytes -> the CLIP-normalised float tensor (resize, "
                  "centre crop, mean/std, as parameter 'preprocess' says). Not for direct use.",
    "patched": "The patched image encoder with every task's head. Input: CLIP-NORMALISED float {image} [N,3,H,W] "
               "(already resized, cropped, mean/std applied). For raw 0-255 pixels use {entry}_pixels; for files "
               "use {entry}.",
    "zeroshot": "The zero-shot (unpatched) image encoder with every task's head, for comparison (alpha 0). Input: "
                "CLIP-NORMALISED float {image} [N,3,H,W], like {entry}_patched.",
    "pixels": "The patched model for RAW PIXELS: float 0-255 RGB [N,3,H,W] (FORMAT_NCHW, resized to the model's "
              "size, NOT normalised: the graph normalises), NVIDIA's image_client convention. For normalised "
              "tensors use {entry}_patched.",
    "task_pixels": "Task {task} only, NVIDIA's image-classification convention: raw 0-255 RGB pixels [N,3,H,W] in, "
                   "one labelled logits output.",
    "task_bytes": "Task {task} only: encoded image bytes [N,1] in, one labelled logits output.",
    "text": "The text tower: prompts (BYTES) in, L2-normalised text embeddings out.",
    "embed": "RAW PIXELS in (float 0-255 RGB [N,3,H,W], FORMAT_NCHW, NVIDIA's image convention), the patched "
             "model's L2-normalised image embeddings out. For encoded files, ask {entry} for its 'embedding'.",
    "classify": "Open vocabulary: images plus your labels (and templates, each with one {{}}) in; out: 'scores' per "
                "label (logits: logit_scale x cosine), 'probabilities' (their softmax over your labels) and "
                "'classification' ('probability:index:label', most probable first).",
}
# The conventions the models follow.
PYTHON_BACKEND = "Triton's python backend (github.com/triton-inference-server/python_backend)"
ONNXRUNTIME = ("Triton's onnxruntime backend (github.com/triton-inference-server/onnxruntime_backend), or the python "
               "backend running the same model.onnx (--backend)")
ENSEMBLE = "Triton's ensemble models (triton-inference-server/server, docs/user_guide/ensemble_models.md)"
IMAGE_CLIENT = "NVIDIA's image_client convention (triton-inference-server/client, examples/image_client.py)"
Builder = Callable[[EntryContext, Model], ModelPlan]
# One builder per model kind (entry.py lists the kinds); kinds not named here are extra classifiers.
BUILDERS: Registry[Registered[Builder]] = Registry("model kind", [
    Registered(name=kind, builds=builds, reference=reference, summary=DESCRIPTIONS[kind])
    for kind, builds, reference in (
        ("preprocess", build_preprocess, PYTHON_BACKEND),
        ("patched", build_classifier, ONNXRUNTIME),
        ("zeroshot", build_classifier, ONNXRUNTIME),
        ("pixels", build_pixels, IMAGE_CLIENT),
        ("ensemble", build_ensemble, ENSEMBLE),
        ("task_pixels", build_task_pixels, IMAGE_CLIENT),
        ("task_bytes", build_task_bytes, ENSEMBLE),
        ("text", build_text, PYTHON_BACKEND),
        ("embed", build_embed, IMAGE_CLIENT),
        ("classify", build_classify, PYTHON_BACKEND),
    )
])
EXTRA_CLASSIFIER = "An extra classifier ({kind}), served like {entry}_patched: CLIP-normalised float images in."
CLASSIFIERS = ("patched", "zeroshot", "pixels", "ensemble", "task_pixels", "task_bytes", "embed")


def describe(context: EntryContext, plan: ModelPlan) -> None:
    """Add what the model is for, and for the image models the precision and alpha they serve, to its config."""
    model = plan.model
    registered = BUILDERS.get(model.kind)
    text = registered.summary if registered else EXTRA_CLASSIFIER
    parameters = {"description": text.format(entry=context.entry.name, image=context.image.name, task=model.task,
                                             kind=model.kind)}
    kind = "zeroshot" if model.kind == "zeroshot" else "patched"
    if model.kind in CLASSIFIERS:
        parameters["precision"] = context.options.precision
        record = next((m for m in context.info.record.models.values()
                       if m.model == kind and m.precision == context.options.precision), None)
        if record is not None:
            parameters["alpha"] = f"{record.alpha:g}"
    for key, value in parameters.items():
        plan.config.parameters[key].string_value = value


def _builder(kind: str) -> Builder:
    entry = BUILDERS.get(kind)
    return entry.builds if entry else build_classifier  # an extra classifier


def plan_entry(info: ExportInfo, entry: Entry, files: dict[str, Path], options: Options, record: str
               ) -> list[ModelPlan]:
    """Every model of the entry with its configuration and files; `record` is the version record (patcher.json)."""
    image, outputs = classifier_io(info, files["patched"])
    for kind, path in files.items():
        if kind != "patched" and classifier_io(info, path) != (image, outputs):
            raise PatcherError(f"{path} and {files['patched']} have different inputs or outputs")
    context = EntryContext(info=info, entry=entry, options=options, files=files, image=image, outputs=outputs,
                           record=record)
    plans = [_builder(model.kind)(context, model) for model in entry.models()]
    for plan in plans:
        describe(context, plan)
    return plans
