"""The new methods against the libraries they come from and the properties they promise: LRP
(zennit) conserves relevance and agrees with Captum's LRP, the CAM family (pytorch-grad-cam) keeps
raw scale, integrated gradients reports its completeness gap, SmoothGrad is reproducible."""

from __future__ import annotations

import copy

import pytest
import torch
from captum.attr import LRP, LayerAttribution, LayerGradCam, Saliency
from captum.attr._utils.lrp_rules import EpsilonRule, GammaRule
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from zennit.composites import LayerMapComposite, layer_map_base
from zennit.rules import Epsilon, Gamma
from zennit.types import Convolution

from psyface.errors import PsyfaceError
from psyface.explain.methods import (
    MethodOptions,
    attribute,
    expand_targets,
    integrated_gradients_with_delta,
    lrp_composite,
    lrp_relevance,
    vgg_conv_names,
)
from psyface.model import AttributeEnsemble, AttributeNet, build_model
from tests.explain_models import SIZE, images, tiny_backbone_net, tiny_vgg  # noqa: F401 (images: a fixture)


def vgg_like(bias: bool = True, batch_norm: bool = False, seed: int = 0) -> AttributeNet:
    """tiny_vgg's layout, optionally without biases (relevance has nowhere to leak) or with batch norm
    (random running statistics, so merging it changes the convolutions)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    channels = 3
    for index, width in enumerate((8, 8, 16)):
        layers.append(nn.Conv2d(channels, width, 3, padding=1, bias=bias))
        if batch_norm:
            norm = nn.BatchNorm2d(width)
            norm.running_mean.uniform_(-0.2, 0.2), norm.running_var.uniform_(0.5, 2.0)
            norm.weight.data.uniform_(0.5, 1.5), norm.bias.data.uniform_(-0.1, 0.1)
            layers.append(norm)
        layers += [nn.ReLU(inplace=True), *([nn.MaxPool2d(2)] if index < 2 else [])]
        channels = width
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Dropout(0.2))
    return AttributeNet(nn.Sequential(*layers), head, nn.Linear(16, 3, bias=bias)).eval()


def epsilon_composite() -> LayerMapComposite:
    """LRP-epsilon with a negligible epsilon everywhere (LRP-0): equals gradient x input on ReLU nets."""
    return LayerMapComposite(layer_map=[*layer_map_base(), (Convolution, Epsilon(1e-9)), (nn.Linear, Epsilon(1e-9))])


def row_outputs(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """f(x)[a] for every expanded row (image i, attribute a), as lrp_relevance orders them."""
    with torch.no_grad():
        return model(inputs).flatten()


@pytest.mark.parametrize("composite", ["epsilon", "gamma_low_epsilon_high", "epsilon_gamma_box", "epsilon_plus_flat"])
def test_lrp_conserves_relevance_on_a_bias_free_network(composite, images):
    """Without biases nothing but the rules' 1e-6 stabilisers (and the average pool's) absorbs relevance:
    the input relevance sums to the explained output within 0.1% (measured: <= 0.05%).
    gamma_low_epsilon_high's epsilon absorbs relevance by design (0.25 beside this untrained net's
    tiny pre-activations takes most of it), so its rules are checked with a stabiliser-sized one."""
    model = vgg_like(bias=False)
    rules = epsilon_composite() if composite == "epsilon" else lrp_composite(composite, model, epsilon=1e-6)
    totals = lrp_relevance(model, images, rules).flatten(1).sum(1)
    torch.testing.assert_close(totals, row_outputs(model, images), rtol=1e-3, atol=0)


def test_gamma_low_epsilon_high_takes_z_box_on_the_input_gamma_in_vgg_blocks_1_2_and_epsilon_above():
    model = build_model("vgg16_bn", "gap", 2, last_conv_stride=8)
    composite, context = lrp_composite("gamma_low_epsilon_high", model), {}
    rules = {name: type(composite.module_map(context, name, module)).__name__
             for name, module in model.named_modules() if isinstance(module, nn.Conv2d | nn.Linear)}
    conv_rules = [rules[f"features.{index}"] for index in vgg_conv_names(model.features).values()]
    assert conv_rules == ["ZBox", "Gamma", "Gamma", "Gamma"] + ["Epsilon"] * 9
    assert rules["last_layer"] == "Epsilon"


def test_with_biases_lrp_epsilon_leaks_the_biases_share(images):
    """With biases a ReLU net's output is sum(x * df/dx) + sum(b * df/db) (it is piecewise linear in
    (x, b) jointly) and LRP-epsilon gives the biases their share: the input relevance falls short of
    f(x) by sum(b * df/db), up to the stabilisers (0.5%; measured <= 0.2%: the average pool's 1e-6
    stabiliser is not small beside this untrained net's tiny activations). On the box/gamma composites the biases' share is reweighted by the
    rule, so only a bias-free network (above) bounds their leak tightly."""
    model = vgg_like(bias=True)
    totals = lrp_relevance(model, images, epsilon_composite()).flatten(1).sum(1)
    expanded, targets = expand_targets(images, 3)
    biases = [module.bias for module in model.modules() if isinstance(module, nn.Conv2d | nn.Linear)]
    shares = []
    for row, target in zip(expanded, targets, strict=True):
        gradients = torch.autograd.grad(model(row[None])[0, target], biases)
        shares.append(sum((b * g).sum() for b, g in zip(biases, gradients, strict=True)))
    torch.testing.assert_close(totals, row_outputs(model, images) - torch.stack(shares).detach(), rtol=5e-3, atol=1e-7)


@pytest.mark.parametrize("composite", ["gamma_low_epsilon_high", "epsilon_gamma_box", "epsilon_plus_flat"])
def test_the_canonizer_merges_batch_norm_so_lrp_sees_the_fused_network(composite, images):
    """zennit's rules pass relevance through a batch norm untouched, so it must be merged into the
    convolution before it: the maps equal those of the network fused by torch, and the model's output
    is unchanged afterwards (the canonizer reverts)."""
    model = vgg_like(batch_norm=True)
    before = model(images).detach()
    layers, fused = list(model.features), []
    while layers:
        layer = layers.pop(0)
        fused.append(fuse_conv_bn_eval(layer, layers.pop(0)) if layers and isinstance(layers[0], nn.BatchNorm2d) else layer)
    reference = AttributeNet(nn.Sequential(*copy.deepcopy(fused)), model.pre_logits, model.last_layer).eval()
    options = MethodOptions(lrp_composite=composite)
    maps, expected = attribute(model, images, "lrp", options), attribute(reference, images, "lrp", options)
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    torch.testing.assert_close(model(images), before, rtol=0, atol=0)


def test_zennit_and_captum_lrp_agree_with_the_same_rules(images):
    """Gamma (0.25) on every convolution, epsilon on the linear layer, on a bias-free tiny VGG (Captum's
    gamma rule leaves biases as they are, zennit's raises them too: with biases they differ slightly)."""
    model = vgg_like(bias=False)
    rules = LayerMapComposite(layer_map=[*layer_map_base(), (Convolution, Gamma(0.25)), (nn.Linear, Epsilon(1e-6))])
    zennit_maps = lrp_relevance(model, images, rules)
    captum_model = copy.deepcopy(model)
    for module in captum_model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
        if isinstance(module, nn.Conv2d):
            module.rule = GammaRule(gamma=0.25)
        elif isinstance(module, nn.Linear | nn.Flatten):
            module.rule = EpsilonRule(epsilon=1e-6)
    expanded, targets = expand_targets(images, 3)
    captum_maps = LRP(captum_model).attribute(expanded.clone().requires_grad_(), target=targets)
    captum_maps = captum_maps.detach()
    torch.testing.assert_close(zennit_maps, captum_maps, rtol=1e-3, atol=1e-3 * float(captum_maps.abs().max()))


def test_batched_lrp_equals_zennits_one_call_per_attribute(images):
    model = vgg_like(batch_norm=True)
    maps = attribute(model, images, "lrp")
    for target in range(3):
        one_hot = nn.functional.one_hot(torch.full((len(images),), target), 3).float()
        with torch.no_grad():
            start = model(images) * one_hot
        relevance = lrp_relevance_for(model, images, start)
        torch.testing.assert_close(maps[:, target], relevance.sum(1), rtol=1e-4, atol=1e-6 * float(maps.abs().max()))


def lrp_relevance_for(model: nn.Module, inputs: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """zennit's documented way: one attributor call with a fixed output relevance."""
    from zennit.attribution import Gradient

    with Gradient(model=model, composite=lrp_composite(MethodOptions().lrp_composite, model)) as attributor:
        return attributor(inputs, start)[1]


def test_an_unknown_lrp_composite_is_a_user_error_naming_the_known_ones(images):
    with pytest.raises(PsyfaceError, match=r"unknown lrp_composite 'alpha_beta'; known: \['gamma_low_epsilon_high', 'epsilon_gamma_box', 'epsilon_plus_flat'\]"):
        attribute(tiny_vgg(), images, "lrp", MethodOptions(lrp_composite="alpha_beta"))  # type: ignore[arg-type]


def test_lrp_on_an_adapted_backbone_says_why_it_is_not_available(images):
    adapted = tiny_backbone_net()
    with pytest.raises(PsyfaceError, match="LRP is not available for this architecture: its rules here fit plain convolution stacks"):
        attribute(adapted, images, "lrp")


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "layercam"])
def test_cams_keep_their_raw_scale(method, images):
    """pytorch-grad-cam would min-max scale each cam to [0, 1]; here a network whose outputs are 10x
    larger gives 10x larger maps, so maps stay comparable across images and attributes."""
    model = tiny_vgg()
    louder = copy.deepcopy(model)
    louder.last_layer.weight.data *= 10
    louder.last_layer.bias.data *= 10
    options = MethodOptions(gradcam_layer="conv2_1")
    torch.testing.assert_close(attribute(louder, images, method, options), 10 * attribute(model, images, method, options))


def test_layercam_averages_the_chosen_and_later_layers_at_the_chosen_layers_density(images):
    """conv2_1 (16x16) and conv3_1 (8x8): one conv3_1 cell covers four conv2_1 cells, so its value
    counts a quarter; each layer's map is ReLU(sum_c ReLU(dy/dA) * A), upsampled bilinearly."""
    model = tiny_vgg()
    expected = []
    for target in range(3):
        per_layer = []
        for index, cells in ((3, 1.0), (6, 0.25)):
            activation = model.features[: index + 1](images).detach().requires_grad_()
            output = nn.Sequential(*model.features[index + 1 :], model.pre_logits, model.last_layer)(activation.clone())
            gradient, = torch.autograd.grad(output[:, target].sum(), activation)
            cam = (gradient.clamp_min(0) * activation).sum(1, keepdim=True).clamp_min(0) * cells
            per_layer.append(LayerAttribution.interpolate(cam.detach(), (SIZE, SIZE), interpolate_mode="bilinear"))
        expected.append(torch.stack(per_layer).mean(0)[:, 0])
    maps = attribute(model, images, "layercam", MethodOptions(gradcam_layer="conv2_1"))
    torch.testing.assert_close(maps, torch.stack(expected, 1), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("layer", ["last", "conv2_1"])
def test_pytorch_grad_cams_gradcam_equals_captums_layergradcam(layer, images):
    model = tiny_vgg()
    conv = model.last_conv if layer == "last" else model.features[3]
    maps = attribute(model, images, "gradcam", MethodOptions(gradcam_layer=layer))
    for target in range(3):
        cam = LayerGradCam(model, conv).attribute(images, target=target, relu_attributions=True)
        cam = LayerAttribution.interpolate(cam, (SIZE, SIZE), interpolate_mode="bilinear")
        torch.testing.assert_close(maps[:, target], cam[:, 0].detach(), rtol=1e-4, atol=1e-7)


def test_integrated_gradients_completeness_gap_shrinks_with_steps_and_is_small_at_the_default(images):
    """Captum's convergence delta, |sum(maps) - (f(x) - f(baseline))|: below 5% of the output change at
    the default 16 steps on the tiny net (measured: <= 2%), and smaller with 64 steps (Gauss-Legendre: not monotone step by step, e.g. 32 is worse than 16 here)."""
    model = tiny_vgg()
    coarse = integrated_gradients_with_delta(model, images, MethodOptions(ig_steps=4))
    default = integrated_gradients_with_delta(model, images)
    fine = integrated_gradients_with_delta(model, images, MethodOptions(ig_steps=64))
    assert default.delta.shape == default.relative.shape == (3, 3)
    assert fine.delta.mean() < default.delta.mean() < coarse.delta.mean()
    assert default.relative.max() < 0.05
    torch.testing.assert_close(default.maps, attribute(model, images, "integrated_gradients"))
    members = integrated_gradients_with_delta(AttributeEnsemble([tiny_vgg(1, seed) for seed in (1, 2)]), images)
    assert members.maps.shape == (3, 2, SIZE, SIZE) and members.delta.shape == (3, 2)


def test_smoothgrad_is_reproducible_and_tends_to_the_gradient_as_the_noise_vanishes(images):
    model = tiny_vgg()
    options = MethodOptions(smoothgrad_samples=4, smoothgrad_stdev=1e-6)
    maps = attribute(model, images, "smoothgrad", options)
    torch.testing.assert_close(maps, attribute(model, images, "smoothgrad", options), rtol=0, atol=0)
    expanded, targets = expand_targets(images, 3)
    gradient = Saliency(model).attribute(expanded, target=targets, abs=False).sum(1).reshape(3, 3, SIZE, SIZE)
    torch.testing.assert_close(maps, gradient, rtol=1e-2, atol=1e-3 * float(gradient.abs().max()))
    noisy = attribute(model, images, "smoothgrad", MethodOptions(smoothgrad_samples=4))
    assert not torch.allclose(noisy, gradient, atol=1e-3 * float(gradient.abs().max()))
