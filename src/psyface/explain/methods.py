"""Attribution methods behind one signature: (model, images, options) -> maps (N, A, H, W).

Every method explains all A outputs (attributes) of a batch at once: the batch is expanded to N*A
rows with per-row targets (or, for occlusion, every output is attributed in the same pass), so there
is no Python loop over images or attributes. Pixel maps are summed over colour channels and stay
signed; `scores.relevance` decides how signs count.

The maths is the reference libraries': Captum (integrated gradients, SmoothGrad, occlusion),
pytorch-grad-cam (the CAM family), zennit (LRP). Hand-written here is only what they do not do:
batching over attributes, the trunk/tail split and CAM post-processing that keeps maps comparable.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, TypeVar, get_args

import numpy as np
import torch
from captum.attr import (
    IntegratedGradients,
    LayerAttribution,
    NoiseTunnel,
    Occlusion,
    Saliency,
)
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat, NameLayerMapComposite, layer_map_base
from zennit.core import Composite
from zennit.rules import Epsilon, Gamma, ZBox
from zennit.types import Convolution

from psyface.config import OpenUnitFloat, PositiveFloat, PositiveInt
from psyface.errors import PsyfaceError
from psyface.model import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AttributeEnsemble,
    is_block_end,
    n_outputs_of,
)

Method = Literal[
    "gradcam", "hirescam", "gradcam_plusplus", "layercam", "integrated_gradients", "smoothgrad", "lrp", "occlusion"
]
METHODS: tuple[Method, ...] = get_args(Method)
Baseline = Literal["black", "mean"]
LrpComposite = Literal["gamma_low_epsilon_high", "epsilon_gamma_box", "epsilon_plus_flat"]
SMOOTHGRAD_SEED = 0  # SmoothGrad's noise is drawn from this seed on every call: the same maps on every run


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
    # a layer per CAM method where it differs from gradcam_layer, e.g. {hirescam: conv2_1}
    cam_layers: dict[str, str] = field(default_factory=dict)
    # gamma_low_epsilon_high (default): Montavon et al.'s rules by depth, 3.8x chance on `happy` of the default
    # data where zennit's all-gamma EpsilonGammaBox stays at chance (README: Explanations that are measured);
    # epsilon_gamma_box and epsilon_plus_flat: zennit's own VGG composites.
    lrp_composite: LrpComposite = "gamma_low_epsilon_high"
    # gamma_low_epsilon_high's epsilon above block 2: on the default model 0.1 and 0.5 localise worse (README)
    lrp_epsilon: PositiveFloat = 0.25
    smoothgrad_samples: PositiveInt = 16  # noisy copies averaged per image
    smoothgrad_stdev: OpenUnitFloat = 0.15  # noise SD as a share of the pixel range (Smilkov et al.: 0.1-0.2)
    smoothgrad_samples_batch: PositiveInt = 4  # noisy copies of each row per forward pass


LayersT = TypeVar("LayersT")
AttributionFn = Callable[[nn.Module, torch.Tensor, MethodOptions], torch.Tensor]


def attribute(model: nn.Module, images: torch.Tensor, method: Method, options: MethodOptions = MethodOptions()) -> torch.Tensor:
    """Maps (N, A, H, W) of every output of `model` for normalised `images` (N, 3, H, W)."""
    return attribute_many(model, images, [method], options)[method]


def attribute_many(
    model: nn.Module, images: torch.Tensor, methods: Sequence[Method], options: MethodOptions = MethodOptions()
) -> dict[Method, torch.Tensor]:
    """Each method's maps (N, A, H, W) of every output of `model` for normalised `images`; the CAM
    family's methods among them share one forward and backward pass (`cam_family`).

    A per-attribute ensemble (the peer's protocol) is explained member by member: attribute k's map
    comes from the network that predicts it (its own last convolution for Grad-CAM)."""
    unknown = [method for method in methods if method not in ATTRIBUTIONS]
    if unknown:
        raise PsyfaceError(f"unknown attribution method {unknown[0]!r}; known: {list(METHODS)}")
    model.eval()
    if isinstance(model, AttributeEnsemble):
        members = [attribute_many(member, images, methods, options) for member in model.members]
        return {method: torch.cat([maps[method] for maps in members], dim=1) for method in methods}
    cams = [method for method in methods if method in CAMS]
    maps = cam_family(model, images, options, cams) if cams else {}
    maps |= {method: ATTRIBUTIONS[method](model, images, options) for method in methods if method not in CAMS}
    return {method: maps[method].detach().float() for method in methods}


def expand_targets(rows: torch.Tensor, n_targets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat each row once per target: (N, ...) -> (N*A, ...) and the matching target indices."""
    expanded = rows.repeat_interleave(n_targets, dim=0)
    targets = torch.arange(n_targets, device=rows.device).repeat(rows.shape[0])
    return expanded, targets


def per_image(maps: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """(N*A, C, H, W) row maps -> (N, A, H, W), colour channels summed."""
    return maps.sum(dim=1).reshape(images.shape[0], -1, *images.shape[-2:])


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


def conv_index(features: nn.Sequential, layer_name: str) -> int:
    """Index in a VGG `features` stack of the convolution `layer_name` ('convB_L', or 'last')."""
    names = vgg_conv_names(features)
    if layer_name == "last":
        return max(names.values())
    if layer_name not in names:
        raise PsyfaceError(f"unknown gradcam_layer {layer_name!r}; this network has 'last' and {list(names)}")
    return names[layer_name]


def split_at_conv(model: nn.Module, layer_name: str = "last") -> tuple[nn.Module, nn.Module, nn.Module]:
    """(trunk, tail, layer): `tail(trunk(x)) == model(x)`, `layer` is where Grad-CAM attributes.

    For a VGG-like `features` Sequential the trunk ends at the named convolution (`last`: the last
    one) and the tail starts with an Identity standing for its output, so the expensive trunk runs
    once per image while only the tail is repeated per attribute. Other backbones attribute on the
    whole model at their last convolution. The tail shares the model's modules (in-place ReLUs
    included): `cam_ready` copies it before hooks see its activations.
    """
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential):
        if layer_name != "last":
            raise PsyfaceError(f"gradcam_layer {layer_name!r} needs a VGG architecture; use 'last'")
        return nn.Identity(), model, model.last_conv  # type: ignore[return-value]
    index = conv_index(features, layer_name)
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


class RawCams:
    """pytorch-grad-cam's CAM maths (each class's `get_cam_image`) with psyface's post-processing.

    The library min-max scales every cam to [0, 1] and resizes it with OpenCV, so a faint map and a
    strong one look alike and maps cannot be compared across images or attributes. Here each layer's
    cam keeps its raw scale (ReLU only, as the library does) and is upsampled bilinearly to the image
    (Captum's `LayerAttribution.interpolate`, as Grad-CAM always was here). Several layers (LayerCAM)
    are averaged after bringing each to the first (finest) layer's density: a coarse cell sums what
    several fine ones do, so its value is divided by how many of the first layer's cells it covers.
    Only the maths is used, on what one shared pass recorded (`cam_family`); the object's own
    `__call__`, one pass per method, is not.
    """

    image_size: tuple[int, int]

    def layer_cams(self: Any, input_tensor: torch.Tensor, targets: list, activations: list[np.ndarray],
                   gradients: list[np.ndarray]) -> list[torch.Tensor]:
        """Each of `target_layers`' cams from its recorded activations and gradients, at image size."""
        first_cells = activations[0].shape[-2] * activations[0].shape[-1]
        cams = []
        for layer, activation, gradient in zip(self.target_layers, activations, gradients, strict=True):
            cam = np.maximum(self.get_cam_image(input_tensor, layer, targets, activation, gradient, False), 0)
            cam = torch.from_numpy(cam)[:, None] * (cam.shape[-2] * cam.shape[-1] / first_cells)
            cams.append(LayerAttribution.interpolate(cam, self.image_size, interpolate_mode="bilinear"))
        return cams

    def aggregate_multi_layers(self, cams: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(cams).mean(0)


CAMS: dict[str, type[BaseCAM]] = {
    name: type(f"Raw{cam.__name__}", (RawCams, cam), {})
    for name, cam in (("gradcam", GradCAM), ("hirescam", HiResCAM), ("gradcam_plusplus", GradCAMPlusPlus), ("layercam", LayerCAM))
}


def cam_ready(tail: nn.Module, layers: LayersT) -> tuple[nn.Module, LayersT]:
    """A copy of `tail` (and of the modules in `layers`, any container of them) pytorch-grad-cam can hook: it keeps references to the
    activations it records, which a later in-place ReLU would overwrite; and no parameter gradients
    (only the layers' are needed)."""
    ready, ready_layers = copy.deepcopy((tail, layers))
    for module in ready.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    ready.requires_grad_(False)
    return ready.eval(), ready_layers


def cam_layer(options: MethodOptions, method: str) -> str:
    """The layer a CAM method attributes at: its own in `options.cam_layers`, else `gradcam_layer`."""
    return options.cam_layers.get(method, options.gradcam_layer)


class SharedCamPass(BaseCAM):
    """pytorch-grad-cam's forward and backward pass (`BaseCAM.forward`: the targets' outputs summed
    and backpropagated) without a method's maths: it returns every hooked layer's (activations,
    gradients) in the order the forward pass reached them (the library's recording order), so several
    CAM methods are computed from one pass. The library runs one pass per method object."""

    def compute_cam_per_layer(  # type: ignore[override]
        self, input_tensor: torch.Tensor, targets: list, eigen_smooth: bool,  # noqa: ARG002
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        recorded = self.activations_and_grads
        return [(a.numpy(), g.numpy()) for a, g in zip(recorded.activations, recorded.gradients, strict=True)]

    def aggregate_multi_layers(self, cam_per_target_layer: list) -> list:  # type: ignore[override]
        return cam_per_target_layer


def cam_family(model: nn.Module, images: torch.Tensor, options: MethodOptions, methods: Sequence[Method]) -> dict[Method, torch.Tensor]:
    """pytorch-grad-cam methods, each at its `cam_layer` (LayerCAM: it and every later convolution, so
    coarse late layers add what the finer chosen one misses), one regression target per row.

    The network is split at the earliest of the methods' layers, every layer any of them reads is
    hooked, and one forward and backward pass per row feeds every method's maths: with HiResCAM at
    `conv2_1`, Grad-CAM, Grad-CAM++ and LayerCAM at `conv3_3` add only their hooks and their maths
    (`benchmarks/bench_explain.py` times the four against a pass each). A layer's activations and
    gradients do not depend on where the split is, so the maps are each method's own."""
    names = {method: cam_layer(options, method) for method in methods}
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential):
        trunk, tail, first = split_at_conv(model, next((name for name in names.values() if name != "last"), "last"))
        method_layers = {method: [first] for method in methods}
        hooked = [first]
    else:
        indices = {method: conv_index(features, name) for method, name in names.items()}
        split = min(indices.values())
        trunk, tail, first = split_at_conv(model, next(name for method, name in names.items() if indices[method] == split))
        convs = [first, *(module for module in tail.modules() if isinstance(module, nn.Conv2d))]
        method_layers = {}
        for method, index in indices.items():
            position = convs.index(first if index == split else features[index])
            method_layers[method] = convs[position:] if method == "layercam" else [convs[position]]
        hooked = [layer for layer in convs if any(layer in layers for layers in method_layers.values())]
    ready, (ready_hooked, ready_method_layers) = cam_ready(tail, (hooked, method_layers))
    with torch.no_grad():
        activations = trunk(images)
    expanded, targets = expand_targets(activations, n_outputs_of(model))
    expanded.requires_grad_()
    targets = [ClassifierOutputTarget(int(t)) for t in targets]
    shared = SharedCamPass(ready, ready_hooked)
    try:  # not `with`: BaseCAM.__exit__ prints and swallows an IndexError
        recorded = dict(zip(ready_hooked, shared(expanded, targets), strict=True))
    finally:
        shared.activations_and_grads.release()
    shared.outputs, expanded.grad = None, None  # the graph and the split's gradient are no longer needed
    maps = {}
    for method in methods:
        layers = ready_method_layers[method]
        cam = CAMS[method](ready, layers)
        cam.activations_and_grads.release()  # only the method's maths runs, on what the shared pass recorded
        cam.image_size = tuple(images.shape[-2:])
        per_layer = cam.layer_cams(expanded, targets, [recorded[layer][0] for layer in layers],
                                   [recorded[layer][1] for layer in layers])
        maps[method] = cam.aggregate_multi_layers(per_layer).reshape(images.shape[0], -1, *images.shape[-2:])
    return maps


def gradcam(model: nn.Module, images: torch.Tensor, options: MethodOptions) -> torch.Tensor:
    """Grad-CAM: ReLU of the channels of `options.gradcam_layer` weighted by their mean gradient."""
    return cam_family(model, images, options, ["gradcam"])["gradcam"]


def hirescam(model: nn.Module, images: torch.Tensor, options: MethodOptions) -> torch.Tensor:
    """HiResCAM: gradient times activation per position, summed over channels (faithful to the layer)."""
    return cam_family(model, images, options, ["hirescam"])["hirescam"]


def gradcam_plusplus(model: nn.Module, images: torch.Tensor, options: MethodOptions) -> torch.Tensor:
    """Grad-CAM++: channel weights from positive higher-order gradient terms."""
    return cam_family(model, images, options, ["gradcam_plusplus"])["gradcam_plusplus"]


def layercam(model: nn.Module, images: torch.Tensor, options: MethodOptions) -> torch.Tensor:
    """LayerCAM: positive gradient times activation per position, over the chosen and later layers."""
    return cam_family(model, images, options, ["layercam"])["layercam"]


def pixel_bounds(device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The lowest and highest normalised input (pixel values 0 and 1), (1, 3, 1, 1) each: z-box's box."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return -mean / std, (1 - mean) / std


def baseline_image(images: torch.Tensor, kind: Baseline) -> torch.Tensor:
    """`black`: a black image after normalisation; `mean`: the ImageNet mean colour (zeros)."""
    if kind == "mean":
        return torch.zeros_like(images[:1])
    return pixel_bounds(images.device)[0].expand_as(images[:1]).contiguous()


class Completeness(NamedTuple):
    """Integrated gradients and how far they are from completeness: the maps should sum to
    f(x) - f(baseline); `delta` (N, A) is the absolute gap (Captum's convergence delta), `relative`
    that gap over |f(x) - f(baseline)| (inf where the output does not move)."""

    maps: torch.Tensor
    delta: np.ndarray
    relative: np.ndarray


def integrated_gradients_with_delta(model: nn.Module, images: torch.Tensor, options: MethodOptions = MethodOptions()) -> Completeness:
    """IG maps (N, A, H, W) with their completeness gap; an ensemble member by member."""
    model.eval()
    if isinstance(model, AttributeEnsemble):
        parts = [integrated_gradients_with_delta(member, images, options) for member in model.members]
        return Completeness(*(np.concatenate(p, 1) if i else torch.cat(p, 1) for i, p in enumerate(zip(*parts, strict=True))))
    expanded, targets = expand_targets(images, n_outputs_of(model))
    baseline = baseline_image(images, options.ig_baseline)
    maps, delta = IntegratedGradients(model).attribute(
        expanded,
        baselines=baseline,
        target=targets,
        n_steps=options.ig_steps,
        internal_batch_size=options.ig_internal_batch_size,
        return_convergence_delta=True,
    )
    with torch.no_grad():
        gap = (model(images) - model(baseline)).abs().flatten()
    delta = delta.detach().abs()
    relative = torch.where(gap > 0, delta / gap, torch.inf)
    shape = (images.shape[0], -1)
    return Completeness(per_image(maps, images).detach().float(), delta.reshape(shape).numpy(), relative.reshape(shape).numpy())


def integrated_gradients(model: nn.Module, images: torch.Tensor, options: MethodOptions) -> torch.Tensor:
    return integrated_gradients_with_delta(model, images, options).maps


def smoothgrad(model: nn.Module, images: torch.Tensor, options: MethodOptions) -> torch.Tensor:
    """SmoothGrad: the signed gradient averaged over noisy copies (Captum's NoiseTunnel over Saliency).

    Over Saliency rather than IG: that is SmoothGrad as published (Smilkov et al. 2017), and IG is
    already here; over IG it would cost ig_steps times more. The noise SD is `smoothgrad_stdev` of
    the pixel range in normalised units (the mean over colour channels of 1 / std: they differ by
    2%); the noise comes from a fixed seed, so the maps are reproducible, though not identical for
    an image explained alone or in a batch (the draws differ)."""
    expanded, targets = expand_targets(images, n_outputs_of(model))
    stdev = options.smoothgrad_stdev * float(np.mean(1 / np.asarray(IMAGENET_STD)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SMOOTHGRAD_SEED)
        maps = NoiseTunnel(Saliency(model)).attribute(
            expanded,
            nt_type="smoothgrad",
            nt_samples=options.smoothgrad_samples,
            nt_samples_batch_size=options.smoothgrad_samples_batch,
            stdevs=stdev,
            target=targets,
            abs=False,
        )
    return per_image(maps, images)


LOW_BLOCKS = 2  # gamma_low_epsilon_high: VGG blocks (from the input) whose convolutions take the gamma rule
GAMMA = 0.25  # zennit's default gamma


def lrp_composite(
    name: str, model: nn.Module, device: torch.device | str = "cpu", epsilon: float = MethodOptions.lrp_epsilon
) -> Composite:
    """The LRP composite `name` for `model`, with batch norm merged into the convolution before it.

    `gamma_low_epsilon_high` assigns rules by depth as Montavon et al. (2019, "Layer-wise relevance
    propagation: an overview") do for VGG-16: z-box on the input layer, gamma on the lower
    convolutions (blocks 1-2), epsilon above them and on the linear head (they use LRP-0 on the
    topmost layers; one `epsilon` for blocks 3-5 keeps a single knob). It is built from
    zennit's rules with zennit's `NameLayerMapComposite`: zennit ships no composite that assigns rules
    by depth. `epsilon_gamma_box` (gamma on every convolution) and `epsilon_plus_flat` are zennit's.

    `SequentialMergeBatchNorm` (what zennit's `VGGCanonizer` is) merges every batch norm that directly
    follows a convolution among the model's leaf modules in registration order; AttributeNet's
    `features` Sequential is registered in forward order, so every conv -> BN pair merges (tested)."""
    canonizers = [SequentialMergeBatchNorm()]
    low, high = pixel_bounds(device)
    if name == "gamma_low_epsilon_high":
        first, *lower = lower_convolutions(model, LOW_BLOCKS)
        name_map = [((first,), ZBox(low=low, high=high)), *([(tuple(lower), Gamma(gamma=GAMMA))] if lower else [])]
        layer_map = [*layer_map_base(), (Convolution, Epsilon(epsilon=epsilon)), (nn.Linear, Epsilon())]
        return NameLayerMapComposite(name_map=name_map, layer_map=layer_map, canonizers=canonizers)
    if name == "epsilon_gamma_box":
        return EpsilonGammaBox(low=low, high=high, canonizers=canonizers)
    if name == "epsilon_plus_flat":
        return EpsilonPlusFlat(canonizers=canonizers)
    raise PsyfaceError(f"unknown lrp_composite {name!r}; known: {list(get_args(LrpComposite))}")


def lower_convolutions(model: nn.Module, blocks: int) -> list[str]:
    """Module names (as `model.named_modules` gives them) of the convolutions in the first `blocks`
    VGG blocks of `model.features` (`vgg_conv_names`' convB_L with B <= `blocks`), input first."""
    prefix = next(name for name, module in model.named_modules() if module is model.features)
    return [f"{prefix}.{index}" for name, index in vgg_conv_names(model.features).items()
            if int(name.removeprefix("conv").split("_")[0]) <= blocks]


def lrp_relevance(model: nn.Module, images: torch.Tensor, composite: Composite) -> torch.Tensor:
    """Input relevance (N*A, C, H, W; image-major, as `expand_targets` orders rows) of every output
    under `composite`: one forward pass of the images through the rule-modified model (zennit's
    `composite.context`), then one backward pass per output with the graph kept, each starting from
    that output alone (its value, as Captum starts: the input relevance then sums to about the
    prediction). Sharing the forward is what zennit's `Gradient`, one call per output, cannot do;
    repeating each image once per output in a single pass instead was 2.6x slower than small
    batches (AMD EPYC, 16 images: 112-row activations leave the caches)."""
    n_outputs = n_outputs_of(model)
    inputs = images.detach().clone().requires_grad_()
    relevance = images.new_empty(len(images), n_outputs, *images.shape[1:])
    with torch.enable_grad(), composite.context(model) as modified:
        output = modified(inputs)
        for k in range(n_outputs):
            start = torch.zeros_like(output)
            start[:, k] = output[:, k].detach()
            (relevance[:, k],) = torch.autograd.grad(output, inputs, grad_outputs=start, retain_graph=k < n_outputs - 1)
    return relevance.flatten(0, 1)


def lrp(model: nn.Module, images: torch.Tensor, options: MethodOptions) -> torch.Tensor:
    """Layer-wise relevance propagation with zennit's `options.lrp_composite`."""
    if not isinstance(getattr(model, "features", None), nn.Sequential):  # e.g. a torchvision/timm adapter
        raise PsyfaceError("LRP is not available for this architecture: its rules here fit plain convolution "
                           "stacks (VGG), not residual, depthwise or attention blocks")
    return per_image(lrp_relevance(model, images, lrp_composite(options.lrp_composite, model, images.device, options.lrp_epsilon)), images)


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
    return per_image(maps, images)


ATTRIBUTIONS: dict[str, AttributionFn] = {
    "gradcam": gradcam,
    "hirescam": hirescam,
    "gradcam_plusplus": gradcam_plusplus,
    "layercam": layercam,
    "integrated_gradients": integrated_gradients,
    "smoothgrad": smoothgrad,
    "lrp": lrp,
    "occlusion": occlusion,
}
