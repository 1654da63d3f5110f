"""Attribution methods behind one signature: (model, images, options) -> maps (N, A, H, W).

Every method explains all A outputs (attributes) of a batch at once: the batch is expanded to N*A
rows with per-row targets (or, for occlusion, every output is attributed in the same pass), so there
is no Python loop over images or attributes. Pixel maps are summed over colour channels and stay
signed; `scores.relevance` decides how signs count.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from captum.attr import (
    LRP,
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    Occlusion,
)
from captum.attr._utils.lrp_rules import EpsilonRule, GammaRule
from torch import nn

from psyface.config import PositiveInt
from psyface.errors import PsyfaceError
from psyface.model import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AttributeEnsemble,
    is_block_end,
    n_outputs_of,
)

Method = Literal["gradcam", "integrated_gradients", "lrp", "occlusion"]
METHODS: tuple[Method, ...] = ("gradcam", "integrated_gradients", "lrp", "occlusion")
Baseline = Literal["black", "mean"]


@dataclass(frozen=True)
class MethodOptions:
    """Knobs of the costly methods (the `explain:` params section embeds this)."""

    ig_steps: PositiveInt = 16
    ig_baseline: Baseline = "black"
    ig_internal_batch_size: PositiveInt = 64
    occlusion_window: PositiveInt = 8
    occlusion_stride: PositiveInt = 4
    occlusion_batch: PositiveInt = 64  # occluded images per forward pass
    gradcam_layer: str = "last"  # last: the last convolution; convB_L: VGG block B, layer L (a finer grid)


AttributionFn = Callable[[nn.Module, torch.Tensor, MethodOptions], torch.Tensor]


def attribute(model: nn.Module, images: torch.Tensor, method: Method, options: MethodOptions = MethodOptions()) -> torch.Tensor:
    """Maps (N, A, H, W) of every output of `model` for normalised `images` (N, 3, H, W).

    A per-attribute ensemble (the peer's protocol) is explained member by member: attribute k's map
    comes from the network that predicts it (its own last convolution for Grad-CAM)."""
    if method not in ATTRIBUTIONS:
        raise PsyfaceError(f"unknown attribution method {method!r}; known: {list(METHODS)}")
    model.eval()
    if isinstance(model, AttributeEnsemble):
        return torch.cat([attribute(member, images, method, options) for member in model.members], dim=1)
    return ATTRIBUTIONS[method](model, images, options).detach().float()


def expand_targets(rows: torch.Tensor, n_targets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat each row once per target: (N, ...) -> (N*A, ...) and the matching target indices."""
    expanded = rows.repeat_interleave(n_targets, dim=0)
    targets = torch.arange(n_targets, device=rows.device).repeat(rows.shape[0])
    return expanded, targets


def vgg_conv_names(features: nn.Sequential) -> dict[str, int]:
    """VGG's names for the convolutions of a `features` stack ('conv1_1' ... 'conv5_3') -> index."""
    names, block, layer = {}, 1, 0
    for index, module in enumerate(features):
        if isinstance(module, nn.Conv2d):
            layer += 1
            names[f"conv{block}_{layer}"] = index
        elif is_block_end(module):
            block, layer = block + 1, 0
    return names


def split_at_conv(model: nn.Module, layer_name: str = "last") -> tuple[nn.Module, nn.Module, nn.Module]:
    """(trunk, tail, layer): `tail(trunk(x)) == model(x)`, `layer` is where Grad-CAM attributes.

    For a VGG-like `features` Sequential the trunk ends at the named convolution (`last`: the last
    one) and the tail starts with an Identity standing for its output, so the expensive trunk runs
    once per image while only the tail is repeated per attribute. Other backbones attribute on the
    whole model at their last convolution. The tail may hold in-place ReLUs: only Captum (which
    hooks a copy of the layer output) runs it.
    """
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential):
        if layer_name != "last":
            raise PsyfaceError(f"gradcam_layer {layer_name!r} needs a VGG architecture; use 'last'")
        return nn.Identity(), model, model.last_conv  # type: ignore[return-value]
    names = vgg_conv_names(features)
    if layer_name == "last":
        index = max(names.values())
    elif layer_name in names:
        index = names[layer_name]
    else:
        raise PsyfaceError(f"unknown gradcam_layer {layer_name!r}; this network has 'last' and {list(names)}")
    layer = nn.Identity()
    tail = nn.Sequential(layer, *features[index + 1 :], model.pre_logits, model.last_layer)
    return features[: index + 1], tail.eval(), layer


def gradcam_grid(model: nn.Module, images: torch.Tensor, layer_name: str = "last") -> tuple[int, int]:
    """Height and width of the Grad-CAM layer's output for inputs like `images`: the map's resolution."""
    if isinstance(model, AttributeEnsemble):
        model = model.members[0]
    trunk, _, _ = split_at_conv(model, layer_name)
    with torch.no_grad():
        if isinstance(trunk, nn.Identity):
            return tuple(model.features(images[:1]).shape[-2:])  # type: ignore[return-value]
        return tuple(trunk(images[:1]).shape[-2:])  # type: ignore[return-value]


def gradcam(model: nn.Module, images: torch.Tensor, options: MethodOptions) -> torch.Tensor:
    """Grad-CAM (ReLU of the gradient-weighted channels of `options.gradcam_layer`), upsampled bilinearly."""
    trunk, tail, layer = split_at_conv(model, options.gradcam_layer)
    with torch.no_grad():
        activations = trunk(images)
    expanded, targets = expand_targets(activations, n_outputs_of(model))
    cams = LayerGradCam(tail, layer).attribute(expanded, target=targets, relu_attributions=True)
    cams = LayerAttribution.interpolate(cams, tuple(images.shape[-2:]), interpolate_mode="bilinear")
    return cams.reshape(images.shape[0], -1, *images.shape[-2:])


def baseline_image(images: torch.Tensor, kind: Baseline) -> torch.Tensor:
    """`black`: a black image after normalisation; `mean`: the ImageNet mean colour (zeros)."""
    if kind == "mean":
        return torch.zeros_like(images[:1])
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (-mean / std).expand_as(images[:1]).contiguous()


def integrated_gradients(model: nn.Module, images: torch.Tensor, options: MethodOptions) -> torch.Tensor:
    expanded, targets = expand_targets(images, n_outputs_of(model))
    maps = IntegratedGradients(model).attribute(
        expanded,
        baselines=baseline_image(images, options.ig_baseline),
        target=targets,
        n_steps=options.ig_steps,
        internal_batch_size=options.ig_internal_batch_size,
    )
    return maps.sum(dim=1).reshape(images.shape[0], -1, *images.shape[-2:])


def lrp_ready(model: nn.Module) -> nn.Module:
    """A copy of `model` Captum's LRP can run, with a VGG composite (Montavon et al. 2019).

    LRP-gamma on the lower third of the convolutions, LRP-epsilon (0.25) above them, LRP-0 on the
    dense layers. In-place ReLUs break Captum's backward hooks, so they become out-of-place;
    `Flatten` only reshapes and an `Identity` (a skipped max-pool) does nothing, so relevance passes
    them unchanged (epsilon rule on an identity).
    """
    ready = copy.deepcopy(model).eval()
    convs = [m for m in ready.modules() if isinstance(m, nn.Conv2d)]
    lower = set(map(id, convs[: max(1, len(convs) // 3)]))
    for module in ready.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
        if isinstance(module, nn.Conv2d):
            module.rule = GammaRule(gamma=0.25) if id(module) in lower else EpsilonRule(epsilon=0.25)
        elif isinstance(module, nn.Linear):
            module.rule = EpsilonRule(epsilon=1e-9)
        elif isinstance(module, nn.Flatten | nn.Identity):
            module.rule = EpsilonRule(epsilon=1e-9)
    return ready


def lrp(model: nn.Module, images: torch.Tensor, options: MethodOptions) -> torch.Tensor:
    nets = list(model.members) if isinstance(model, AttributeEnsemble) else [model]
    if any(hasattr(getattr(net, "features", None), "backbone") for net in nets):  # a torchvision/timm adapter
        raise PsyfaceError("LRP is not available for this architecture: its rules here fit plain convolution "
                           "stacks (VGG), not residual, depthwise or attention blocks")
    ready = lrp_ready(model)
    expanded, targets = expand_targets(images, n_outputs_of(ready))
    try:
        maps = LRP(ready).attribute(expanded.requires_grad_(), target=targets)
    except TypeError as error:
        raise PsyfaceError(f"LRP cannot explain this architecture: {error}") from None
    return maps.sum(dim=1).reshape(images.shape[0], -1, *images.shape[-2:])


def occlusion(model: nn.Module, images: torch.Tensor, options: MethodOptions) -> torch.Tensor:
    """Output change when a window is greyed out (ImageNet mean), for every output in one sweep."""
    window, stride = options.occlusion_window, options.occlusion_stride
    maps = Occlusion(model).attribute(
        images,
        sliding_window_shapes=(images.shape[1], window, window),
        strides=(images.shape[1], stride, stride),
        baselines=0.0,
        target=None,  # attribute every output element: (N*A, C, H, W), row i*A + a
        perturbations_per_eval=max(1, options.occlusion_batch // images.shape[0]),
    )
    return maps.sum(dim=1).reshape(images.shape[0], -1, *images.shape[-2:])


ATTRIBUTIONS: dict[str, AttributionFn] = {
    "gradcam": gradcam,
    "integrated_gradients": integrated_gradients,
    "lrp": lrp,
    "occlusion": occlusion,
}
