"""Effective receptive field (Luo, Li, Urtasun & Zemel, NeurIPS 2016/2017, "Understanding the
Effective Receptive Field in Deep Convolutional Neural Networks").

For a layer, take its output, pick the centre unit of the spatial map, sum it over channels, and
back-propagate to the input: the ERF is |d out_centre / d input| summed over the colour channels and
averaged over the images, normalised to a maximum of 1.

Conv outputs (B, C, h, w) are used as they are; token outputs (B, T, C) have their prefix tokens
(CLS, registers) dropped and are reshaped to the patch grid (B, C, gh, gw); NHWC stage outputs
(timm Swin) are permuted. Memory-safe: one layer per backward pass, the forward is cut right after
the hooked layer, gradients are taken w.r.t. the input only (parameter `.grad` untouched), hooks are
removed and every submodule's train/eval mode is restored in `finally`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from core.diagnostics._common import eval_mode, module_device, new_figure, save_figure, to_display_images
from core.errors import ConfigError

__all__ = [
    "effective_receptive_field",
    "erf_grid",
    "erf_extent",
    "plot_erf_grid",
    "resolve_layer",
    "default_erf_layers",
]


class _StopForward(Exception):
    """Raised by the hook to stop the forward pass once the hooked layer has run."""


def _named_layers(model: nn.Module) -> dict[str, nn.Module]:
    layers = {}
    if hasattr(model, "layers") and callable(getattr(model, "layers")):
        try:
            layers = dict(model.layers())
        except NotImplementedError:
            layers = {}
    return layers


def resolve_layer(model: nn.Module, layer) -> tuple[str, nn.Module]:
    """`layer` (a module of `model`, a name from `model.layers()` or from `named_modules()`) ->
    (name, module). ConfigError listing the choices when the name is unknown."""
    if isinstance(layer, nn.Module):
        for name, m in model.named_modules():
            if m is layer:
                return name or type(m).__name__, m
        raise ConfigError(f"layer {type(layer).__name__} is not a submodule of {type(model).__name__}")
    name = str(layer)
    named = _named_layers(model)
    if name in named:
        return name, named[name]
    modules = dict(model.named_modules())
    if name in modules:
        return name, modules[name]
    choices = list(named) or [n for n in modules if n][:30]
    raise ConfigError(f"unknown layer {name!r} for the receptive-field diagnostic; choose one of {choices}")


def default_erf_layers(model: nn.Module) -> dict[str, nn.Module]:
    """`model.layers()` when the model is a twinseg Backbone; else its top-level children."""
    named = _named_layers(model)
    if named:
        return named
    return {n: m for n, m in model.named_children()}


def _attr_chain(model: nn.Module, attr: str):
    for obj in (model, getattr(model, "library_model", None) if _safe_has(model, "library_model") else None,
                getattr(model, "timm_model", None), getattr(model, "vp_model", None)):
        if obj is not None and hasattr(obj, attr):
            v = getattr(obj, attr)
            if v is not None and not callable(v):
                return v
    return None


def _safe_has(obj, attr) -> bool:
    try:
        return hasattr(obj, attr)
    except Exception:
        return False


def _patch_size(model: nn.Module):
    p = _attr_chain(model, "patch_size")
    if p is None:
        pe = getattr(model, "patch_embed", None) or getattr(getattr(model, "timm_model", None), "patch_embed", None)
        p = getattr(pe, "patch_size", None)
    if isinstance(p, (tuple, list)):
        p = p[0]
    return int(p) if p else None


def _tokens_to_grid(out: Tensor, model: nn.Module, image_hw: tuple[int, int], num_prefix_tokens: int | None) -> Tensor:
    """(B, T, C) tokens -> (B, C, gh, gw) patch grid, prefix tokens dropped.

    Prefix count: the explicit argument; else T - (H/p)(W/p) when the patch size p is known (this
    also handles outputs without prefix, e.g. a patch embedding); else the model's
    `num_prefix_tokens`; else the smallest count leaving a grid with the input's aspect ratio
    (trying 1 first when the model declares a CLS token).
    """
    b, t, c = out.shape
    h, w = image_hw
    grid = None
    if num_prefix_tokens is not None:
        grid = _grid_for(t - int(num_prefix_tokens), h, w, _patch_size(model))
    else:
        patch = _patch_size(model)
        if patch:
            gh, gw = h // patch, w // patch
            if gh * gw > 0 and 0 <= t - gh * gw <= 64:
                num_prefix_tokens, grid = t - gh * gw, (gh, gw)
        if grid is None:
            declared = _attr_chain(model, "num_prefix_tokens")
            has_cls = _attr_chain(model, "has_cls_token")
            candidates = [int(declared)] if declared is not None else []
            if has_cls is not None:
                candidates.append(1 if has_cls else 0)
            candidates += list(range(0, 17))
            for k in dict.fromkeys(candidates):
                grid = _grid_for(t - k, h, w, None)
                if grid is not None:
                    num_prefix_tokens = k
                    break
    if grid is None:
        raise ValueError(
            f"cannot reshape {t} tokens to a patch grid for a {h}x{w} input "
            f"(prefix tokens: {num_prefix_tokens}); pass num_prefix_tokens="
        )
    gh, gw = grid
    patches = out[:, int(num_prefix_tokens):, :]
    return patches.transpose(1, 2).reshape(b, c, gh, gw)


def _grid_for(n: int, h: int, w: int, patch) -> tuple[int, int] | None:
    """Grid (gh, gw) with gh*gw == n matching the input aspect ratio, or None."""
    if n <= 0:
        return None
    if patch:
        gh, gw = h // int(patch), w // int(patch)
        if gh * gw == n:
            return gh, gw
    gh = int(round(math.sqrt(n * h / w)))
    for cand in (gh, gh - 1, gh + 1):
        if cand > 0 and n % cand == 0:
            gw = n // cand
            if abs(cand / gw - h / w) <= 0.25 * (h / w) + 1e-9:
                return cand, gw
    return None


def _is_nhwc(model: nn.Module, module: nn.Module, out: Tensor, layout: str) -> bool:
    if layout == "nhwc":
        return True
    if layout == "nchw":
        return False
    fmt = None
    for obj in (module, model, getattr(model, "timm_model", None)):
        if obj is not None and isinstance(getattr(obj, "output_fmt", None), str):
            fmt = str(getattr(obj, "output_fmt"))
            break
        if obj is not None and getattr(getattr(obj, "output_fmt", None), "name", None):
            fmt = str(obj.output_fmt.name)
            break
    return fmt is not None and fmt.upper() == "NHWC"


def _backbone_converter(model: nn.Module):
    """The backbone's own `layer_output_to_map` when its class overrides the base one, else None."""
    fn = getattr(type(model), "layer_output_to_map", None)
    if fn is None:
        return None
    try:
        from core.models.backbones.base import Backbone

        if fn is Backbone.layer_output_to_map:
            return None
    except Exception:
        pass
    return getattr(model, "layer_output_to_map")


def _output_to_map(out, model: nn.Module, module: nn.Module, image_hw, num_prefix_tokens, layout) -> Tensor:
    """Any layer output -> (B, C, h, w) (or (B, C) for pooled outputs)."""
    convert = _backbone_converter(model) if layout == "auto" and num_prefix_tokens is None else None
    if convert is not None:
        # The backbone knows its layouts (ViT tokens, Swin NHWC); trust a 4-D answer as NCHW.
        mapped = convert(out, tuple(image_hw))
        if isinstance(mapped, Tensor) and mapped.ndim == 4:
            return mapped
        out = mapped
    if isinstance(out, (tuple, list)):
        out = next(o for o in out if isinstance(o, Tensor))
    elif isinstance(out, dict):
        out = next(o for o in out.values() if isinstance(o, Tensor))
    elif hasattr(out, "dense") and isinstance(getattr(out, "dense"), Tensor):  # BackboneOutput
        out = out.dense
    if not isinstance(out, Tensor):
        raise TypeError(f"layer output of type {type(out).__name__} is not a tensor")
    if out.ndim == 4:
        return out.permute(0, 3, 1, 2) if _is_nhwc(model, module, out, layout) else out
    if out.ndim == 3:
        return _tokens_to_grid(out, model, image_hw, num_prefix_tokens)
    if out.ndim == 2:
        return out
    raise ValueError(f"unsupported layer output shape {tuple(out.shape)} for the receptive field")


def _centre_objective(fmap: Tensor) -> Tensor:
    if fmap.ndim == 2:  # pooled (B, C): no spatial centre, use the whole vector
        return fmap.sum()
    _, _, gh, gw = fmap.shape
    return fmap[:, :, gh // 2, gw // 2].sum()


def effective_receptive_field(
    model: nn.Module,
    layer,
    images: Tensor,
    *,
    normalize: str | None = "max",
    num_prefix_tokens: int | None = None,
    layout: str = "auto",
    forward=None,
) -> np.ndarray:
    """ERF of the centre unit of `layer`'s output w.r.t. the input, (H, W) float array.

    Args:
        model: the network (a twinseg Backbone, a timm/torchvision model, any nn.Module).
        layer: an nn.Module inside `model`, or its name in `model.layers()` / `model.named_modules()`.
        images: (B, 3, H, W) model-input images (not modified).
        normalize: "max" (peak = 1, default), "sum" (sums to 1) or None (raw mean |grad|).
        num_prefix_tokens: for token outputs, the number of leading non-patch tokens; default from
            `model.num_prefix_tokens` (or the wrapped timm model's), else from the patch size and the
            input size, else inferred as the smallest count leaving a grid of the input's aspect.
        layout: "auto" (NHWC when the model/layer declares `output_fmt == "NHWC"`, e.g. timm Swin),
            "nchw" or "nhwc" for 4-D outputs.
        forward: optional callable(model, x) used instead of `model(x)`.

    The centre unit of an (h, w) map is (h // 2, w // 2). The model runs in eval mode (BatchNorm with
    running statistics, so images do not interact); gradients w.r.t. the input only.
    """
    name, module = resolve_layer(model, layer)
    if images.ndim == 3:
        images = images.unsqueeze(0)
    device = module_device(model)
    h, w = images.shape[-2:]
    captured: dict[str, object] = {}

    def hook(_m, _inp, out):
        captured["out"] = out
        raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        # Works from inside Lightning's validation/inference-mode hooks as well.
        with torch.inference_mode(False), torch.enable_grad(), eval_mode(model):
            x = images.detach().to(device=device, dtype=torch.float32).clone().requires_grad_(True)
            try:
                (forward or (lambda m, inp: m(inp)))(model, x)
            except _StopForward:
                pass
            if "out" not in captured:
                raise RuntimeError(f"layer {name!r} was not called during the forward pass")
            fmap = _output_to_map(captured.pop("out"), model, module, (h, w), num_prefix_tokens, layout)
            objective = _centre_objective(fmap)
            if not objective.requires_grad:
                raise RuntimeError(f"the output of layer {name!r} does not depend on the input")
            (grad,) = torch.autograd.grad(objective, x, retain_graph=False)
            del fmap, objective
        erf = grad.detach().abs().sum(1).mean(0).double().cpu().numpy()
    finally:
        handle.remove()
        captured.clear()
    if normalize == "max":
        m = erf.max()
        if m > 0:
            erf = erf / m
    elif normalize == "sum":
        s = erf.sum()
        if s > 0:
            erf = erf / s
    elif normalize is not None:
        raise ValueError(f"normalize={normalize!r}: use 'max', 'sum' or None")
    return erf.astype(np.float32)


def erf_grid(model: nn.Module, layers, images: Tensor, **kw) -> dict[str, np.ndarray]:
    """ERF for several layers (one forward/backward each): {name: (H, W) array}.

    `layers`: {name: module}, a list of names/modules, or None (`model.layers()` or the children).
    """
    if layers is None:
        layers = default_erf_layers(model)
    if isinstance(layers, Mapping):
        items = list(layers.items())
    else:
        items = []
        for layer in layers:
            n, m = resolve_layer(model, layer)
            items.append((n, m))
    return {name: effective_receptive_field(model, module, images, **kw) for name, module in items}


def erf_extent(erf: np.ndarray, mass: float = 0.95) -> float:
    """Side (pixels) of a square with as many pixels as the fewest needed to hold `mass` of the ERF."""
    v = np.sort(np.asarray(erf, dtype=np.float64).ravel())[::-1]
    total = v.sum()
    if total <= 0:
        return 0.0
    k = int(np.searchsorted(np.cumsum(v) / total, mass) + 1)
    return float(math.sqrt(min(k, v.size)))


def plot_erf_grid(
    erfs: Mapping[str, np.ndarray],
    path,
    *,
    image: Tensor | None = None,
    title: str | None = None,
    cmap: str = "viridis",
    gamma: float = 1.0,
    max_cols: int = 6,
    panel_size: float = 2.2,
    dpi: int = 100,
) -> Path:
    """One panel per layer (the ERF map, peak-normalised, with its 95%-mass extent in pixels).

    `image` (optional, (3, H, W) model input) is shown as the first panel for scale.
    `gamma` < 1 brightens the tails (display only).
    """
    panels = list(erfs.items())
    n = len(panels) + (1 if image is not None else 0)
    if n == 0:
        raise ValueError("plot_erf_grid needs at least one ERF")
    cols = min(max_cols, n)
    rows = math.ceil(n / cols)
    fig = new_figure(figsize=(panel_size * cols, panel_size * rows + (0.4 if title else 0)))
    axes = fig.subplots(rows, cols, squeeze=False)
    k = 0
    if image is not None:
        ax = axes.flat[0]
        ax.imshow(to_display_images(image)[0])
        ax.set_title("input", fontsize=8)
        k = 1
    for name, erf in panels:
        ax = axes.flat[k]
        k += 1
        e = np.asarray(erf, dtype=np.float64)
        m = e.max()
        e = e / m if m > 0 else e
        if gamma != 1.0:
            e = e ** gamma
        ax.imshow(e, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{name}\n95%: {erf_extent(erf):.0f}px", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[k:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi=dpi)
