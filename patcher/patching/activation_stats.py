"""Second moments of the inputs of every linear map of an image encoder, streamed over images with hooks.

For each weight W that maps an input x as W x + b (nn.Linear, a multi-head attention's input and output projections,
a convolution over its patches, open_clip's final `proj`), `InputMoments` accumulates C = sum [x; 1] [x; 1]^T over
every input row the images produce, the trailing 1 standing for the bias: RegMean's Gram matrix (Jin et al., ICLR
2023), the preserved keys' K0 K0^T of AlphaEdit (Fang et al., ICLR 2025). Memory is one (in + 1)^2 matrix per weight,
never the activations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from patcher.base.errors import PatcherError
from patcher.models.state import VISUAL_PREFIX, part
from patcher.patching.session import Session

Moments = dict[str, torch.Tensor]  # weight's state key -> (in + 1) x (in + 1) float64 second moment, per input row
SAMPLES = 2000  # images per supported task


def attention_values(module: nn.MultiheadAttention, query: torch.Tensor) -> torch.Tensor:
    """The input of a self-attention's output projection (heads concatenated), recomputed from its input: torch's
    MultiheadAttention applies `out_proj` functionally, so no hook on it fires."""
    batch_first = module.batch_first
    x = query if batch_first else query.transpose(0, 1)
    q, k, v = F.linear(x, module.in_proj_weight, module.in_proj_bias).chunk(3, dim=-1)
    heads, (batch, length, width) = module.num_heads, x.shape

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, length, heads, width // heads).transpose(1, 2)

    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(batch, length, width)


class InputMoments:
    """Hooks on an encoder's linear maps that add each input's [x; 1] [x; 1]^T to its weight's moment."""

    def __init__(self, encoder: nn.Module, prefix: str = VISUAL_PREFIX) -> None:
        self.sums: Moments = {}
        self.rows: dict[str, int] = {}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        attention_outputs = {f"{name}.out_proj" for name, m in encoder.named_modules()
                             if isinstance(m, nn.MultiheadAttention)}
        for name, module in encoder.named_modules():
            key = f"{prefix}{name}."
            if isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim:
                self._attention(module, key)
            elif isinstance(module, nn.Linear) and name not in attention_outputs:
                self._hook(module, lambda _m, args, key=key: self.add(f"{key}weight", args[0]))
            elif isinstance(module, nn.Conv2d) and module.groups == 1:
                self._hook(module, lambda m, args, key=key: self.add(f"{key}weight", F.unfold(
                    args[0], m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2)))
        self._projection(encoder, prefix)

    def _projection(self, encoder: nn.Module, prefix: str) -> None:
        """open_clip's `pooled @ proj`: its input is ln_post's output, pooled (ln_post runs before or after)."""
        ln_post = getattr(encoder, "ln_post", None)
        if not isinstance(getattr(encoder, "proj", None), nn.Parameter) or not isinstance(ln_post, nn.Module) \
                or getattr(encoder, "attn_pool", None) is not None:
            return

        def hook(_module: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            self.add(f"{prefix}proj", out if out.dim() == 2 else encoder._global_pool(out)[0])

        self.handles.append(ln_post.register_forward_hook(hook))

    def _hook(self, module: nn.Module, hook: Callable[..., None], with_kwargs: bool = False) -> None:
        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=with_kwargs))

    def _attention(self, module: nn.MultiheadAttention, key: str) -> None:
        def hook(attention: nn.MultiheadAttention, args: tuple, kwargs: dict) -> None:
            query = args[0] if args else kwargs["query"]
            if kwargs.get("attn_mask") is not None or kwargs.get("key_padding_mask") is not None:
                raise PatcherError(f"{key}: masked attention's inputs are not collected (image encoders have none)")
            self.add(f"{key}in_proj_weight", query)
            self.add(f"{key}out_proj.weight", attention_values(attention, query))

        self._hook(module, hook, with_kwargs=True)

    def add(self, key: str, inputs: torch.Tensor) -> None:
        """Add the rows of `inputs` (last dimension: the weight's input) to `key`'s moment."""
        rows = inputs.detach().reshape(-1, inputs.shape[-1]).double().cpu()
        rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype)], dim=1)
        moment = rows.T @ rows
        self.sums[key] = self.sums[key] + moment if key in self.sums else moment
        self.rows[key] = self.rows.get(key, 0) + len(rows)

    def mean(self) -> Moments:
        """Each weight's moment divided by its number of input rows."""
        return {key: total / self.rows[key] for key, total in self.sums.items()}

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def encoder_moments(encoder: nn.Module, weights: Mapping[str, torch.Tensor],
                    batches: Iterable[torch.Tensor]) -> Moments:
    """The mean input moments of every linear map of `encoder` at `weights` (no `visual.` prefix) over `batches`."""
    collector = InputMoments(encoder)
    try:
        with torch.no_grad():
            for images in batches:
                functional_call(encoder, dict(weights), (images,))
    finally:
        collector.close()
    return collector.mean()


def supported_moments(session: Session, tasks: list[str], seed: int) -> Moments:
    """The zero-shot encoder's input moments on the supported tasks' held-out images (up to SAMPLES per task, the
    labels never read), each task's mean moment summed, so every task weighs the same."""
    if not tasks:
        raise PatcherError("a null-space merge protects the supported tasks: name at least one with --support")
    encoder = session.loaded.model.visual
    weights = {key: value.to(session.device) for key, value in part(VISUAL_PREFIX, session.zeroshot).items()}
    total: Moments = {}
    for task in tasks:
        store = session.splits.val[task]
        rng = np.random.default_rng(seed)
        indices = np.sort(rng.choice(len(store), size=min(SAMPLES, len(store)), replace=False))
        step = session.eval_batch_size
        batches = (session.splits.normalize(torch.from_numpy(store.read(indices[i:i + step])).to(session.device))
                   for i in range(0, len(indices), step))
        for key, moment in encoder_moments(encoder, weights, batches).items():
            total[key] = total[key] + moment if key in total else moment
    return total
