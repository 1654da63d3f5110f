from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from captum.attr import LayerAttribution, LayerGradCam
from pytorch_grad_cam import GradCAMPlusPlus, HiResCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from psyface.errors import PsyfaceError
from psyface.explain.methods import (
    CAMS,
    METHODS,
    MethodOptions,
    attribute,
    attribute_many,
    gradcam_grid,
    vgg_conv_names,
)
from psyface.model import (
    NARROW_VGG16,
    AttributeEnsemble,
    AttributeNet,
    ModelSpec,
    build_model,
    freeze_blocks,
    load_trained,
    save_trained,
)
from psyface.run_safety import training_bytes
from tests.explain_models import (  # noqa: F401 (images: a fixture)
    SIZE,
    images,
    tiny_backbone_net,
    tiny_vgg,
)

OPTIONS = MethodOptions(ig_steps=8, occlusion_window=8, occlusion_stride=4)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_finite_maps_for_every_image_and_attribute(method, images):
    maps = attribute(tiny_vgg(n_outputs=3), images, method, OPTIONS)
    assert maps.shape == (3, 3, SIZE, SIZE)
    assert torch.isfinite(maps).all()
    assert (maps.flatten(2).abs().amax(2) > 0).all(), "every (image, attribute) map carries signal"


@pytest.mark.parametrize("method", [m for m in METHODS if m != "smoothgrad"])  # its noise draws depend on the batch
def test_batched_maps_equal_maps_of_single_images(method, images):
    model = tiny_vgg(n_outputs=3)
    batched = attribute(model, images, method, OPTIONS)
    single = torch.cat([attribute(model, images[i : i + 1], method, OPTIONS) for i in range(len(images))])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-6)


def test_gradcam_equals_captum_on_the_whole_model_one_image_and_attribute_at_a_time(images):
    model = tiny_vgg(n_outputs=3)
    maps = attribute(model, images, "gradcam")
    for i in range(len(images)):
        for target in range(3):
            cam = LayerGradCam(model, model.last_conv).attribute(images[i : i + 1], target=target, relu_attributions=True)
            cam = LayerAttribution.interpolate(cam, (SIZE, SIZE), interpolate_mode="bilinear")
            torch.testing.assert_close(maps[i, target], cam[0, 0].detach(), rtol=1e-4, atol=1e-6)


def test_an_unknown_method_is_a_user_error(images):
    with pytest.raises(PsyfaceError, match="unknown attribution method 'saliency'"):
        attribute(tiny_vgg(), images, "saliency")  # type: ignore[arg-type]


def test_gradcam_on_a_backbone_that_cannot_be_split_gives_the_same_maps(images):
    model = tiny_vgg(n_outputs=3)
    wrapped = tiny_backbone_net(n_outputs=3)
    torch.testing.assert_close(attribute(wrapped, images, "gradcam"), attribute(model, images, "gradcam"), rtol=1e-4, atol=1e-7)


def test_gradcam_on_a_named_earlier_convolution_is_captums_on_that_layer_at_its_finer_grid(images):
    model = tiny_vgg(n_outputs=3)
    options = MethodOptions(gradcam_layer="conv2_1")
    assert vgg_conv_names(model.features) == {"conv1_1": 0, "conv2_1": 3, "conv3_1": 6}
    assert gradcam_grid(model, images, "conv2_1") == (16, 16) and gradcam_grid(model, images) == (8, 8)
    maps = attribute(model, images, "gradcam", options)
    cam = LayerGradCam(model, model.features[3]).attribute(images, target=1, relu_attributions=True)
    cam = LayerAttribution.interpolate(cam, (SIZE, SIZE), interpolate_mode="bilinear")
    torch.testing.assert_close(maps[:, 1], cam[:, 0].detach(), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(maps, attribute(model, images, "gradcam"))


def test_cam_layers_move_one_cam_method_to_its_own_layer_and_leave_the_others(images):
    model = tiny_vgg(n_outputs=3)
    own = MethodOptions(cam_layers={"hirescam": "conv2_1"})
    torch.testing.assert_close(attribute(model, images, "hirescam", own),
                               attribute(model, images, "hirescam", MethodOptions(gradcam_layer="conv2_1")))
    assert not torch.allclose(attribute(model, images, "hirescam", own), attribute(model, images, "hirescam"))
    torch.testing.assert_close(attribute(model, images, "gradcam", own), attribute(model, images, "gradcam"))


@pytest.mark.parametrize("layers", [{}, {"hirescam": "conv2_1"}, {"gradcam": "conv2_1", "layercam": "conv1_1"}])
def test_the_cam_family_from_one_shared_pass_equals_each_method_alone(layers, images):
    """One forward and backward pass at the finest of the layers feeds every CAM method's maths."""
    model, options = tiny_vgg(n_outputs=3), MethodOptions(cam_layers=layers)
    shared = attribute_many(model, images, list(CAMS), options)
    assert list(shared) == list(CAMS)
    for method in CAMS:
        torch.testing.assert_close(shared[method], attribute(model, images, method, options), rtol=1e-4, atol=1e-7)
    mixed = attribute_many(model, images, ["lrp", "hirescam"], options)  # other methods keep their own path
    assert list(mixed) == ["lrp", "hirescam"]
    torch.testing.assert_close(mixed["lrp"], attribute(model, images, "lrp", options))


def library_raw_cams(model, images, cam_class, layer_index: int, n_outputs: int) -> torch.Tensor:
    """pytorch-grad-cam's own pass per attribute on the whole model, its raw cam (before the library's
    min-max scaling) through the class's `get_cam_image`, upsampled as psyface does."""
    ready = copy.deepcopy(model)
    for module in ready.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    layer = ready.features[layer_index]
    maps = torch.zeros(len(images), n_outputs, SIZE, SIZE)
    with cam_class(ready, [layer]) as cam:
        for target in range(n_outputs):
            cam(images, [ClassifierOutputTarget(target)] * len(images))
            recorded = cam.activations_and_grads
            raw = np.maximum(cam.get_cam_image(images, layer, None, recorded.activations[0].numpy(),
                                               recorded.gradients[0].numpy(), False), 0)
            maps[:, target] = LayerAttribution.interpolate(torch.from_numpy(raw)[:, None], (SIZE, SIZE),
                                                           interpolate_mode="bilinear")[:, 0]
    return maps


def test_the_shared_pass_equals_pytorch_grad_cams_own_pass_at_a_layer_after_the_split(images):
    """HiResCAM at conv1_1 puts the split there; Grad-CAM++ at the last convolution is then read
    from a hook behind it, and both equal the library's own one-pass-per-attribute maps."""
    model = tiny_vgg(n_outputs=3)
    shared = attribute_many(model, images, ["hirescam", "gradcam_plusplus"], MethodOptions(cam_layers={"hirescam": "conv1_1"}))
    torch.testing.assert_close(shared["hirescam"], library_raw_cams(model, images, HiResCAM, 0, 3), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(shared["gradcam_plusplus"], library_raw_cams(model, images, GradCAMPlusPlus, 6, 3),
                               rtol=1e-4, atol=1e-7)


def test_the_shared_pass_on_a_backbone_that_cannot_be_split_is_each_method_at_the_last_convolution(images):
    model = tiny_vgg(n_outputs=3)
    wrapped = tiny_backbone_net(n_outputs=3)
    shared = attribute_many(wrapped, images, list(CAMS))
    for method in CAMS:
        torch.testing.assert_close(shared[method], attribute(model, images, method), rtol=1e-4, atol=1e-7)
    with pytest.raises(PsyfaceError, match="needs a VGG architecture"):
        attribute_many(wrapped, images, list(CAMS), MethodOptions(cam_layers={"hirescam": "conv2_1"}))


def test_an_unknown_gradcam_layer_is_a_user_error_naming_the_layers(images):
    with pytest.raises(PsyfaceError, match=r"unknown gradcam_layer 'conv9_9'.*'conv1_1', 'conv2_1', 'conv3_1'"):
        attribute(tiny_vgg(), images, "gradcam", MethodOptions(gradcam_layer="conv9_9"))
    model = tiny_vgg()
    wrapped = tiny_backbone_net(n_outputs=3)
    with pytest.raises(PsyfaceError, match="needs a VGG architecture"):
        attribute(wrapped, images, "gradcam", MethodOptions(gradcam_layer="conv2_1"))


@pytest.mark.parametrize("method", METHODS)
def test_a_per_attribute_ensemble_is_explained_by_the_member_that_predicts_each_attribute(method, images):
    members = [tiny_vgg(n_outputs=1, seed=seed) for seed in (1, 2, 3)]
    maps = attribute(AttributeEnsemble(members), images, method, OPTIONS)
    assert maps.shape == (3, 3, SIZE, SIZE)
    for k, member in enumerate(members):
        torch.testing.assert_close(maps[:, k : k + 1], attribute(member, images, method, OPTIONS))
    assert gradcam_grid(AttributeEnsemble(members), images) == gradcam_grid(members[0], images)


@pytest.mark.slow
def test_a_smaller_last_conv_stride_gives_gradcam_a_finer_grid_with_the_same_layers_and_weights(tmp_path):
    torch.manual_seed(0)
    inputs = torch.randn(2, 3, 64, 64)
    default, fine = build_model(NARROW_VGG16, "gap", 2).eval(), build_model(NARROW_VGG16, "gap", 2, last_conv_stride=4).eval()
    assert gradcam_grid(default, inputs) == (4, 4) and gradcam_grid(fine, inputs) == (16, 16)
    assert gradcam_grid(build_model(NARROW_VGG16, "gap", 2, last_conv_stride=8), inputs) == (8, 8)
    assert vgg_conv_names(fine.features) == vgg_conv_names(default.features)  # conv5_3 is still conv5_3
    assert fine.state_dict().keys() == default.state_dict().keys()  # weights move between the two
    assert freeze_blocks(fine, 4) == freeze_blocks(build_model(NARROW_VGG16, "gap", 2), 4)
    for method in METHODS:
        maps = attribute(fine, inputs, method, OPTIONS)
        assert maps.shape == (2, 2, 64, 64) and torch.isfinite(maps).all(), method

    spec = ModelSpec(arch=NARROW_VGG16, attributes=["a", "b"], image_size=64, target_mean=[0.0, 0.0],
                     target_std=[1.0, 1.0], last_conv_stride=4)
    paths = save_trained(fine, spec, tmp_path)
    reloaded, _ = load_trained(paths["weights"], paths["spec"])
    assert gradcam_grid(reloaded, inputs) == (16, 16)  # the spec rebuilds the same network, not a coarse one
    torch.testing.assert_close(reloaded(inputs.contiguous(memory_format=torch.channels_last)), fine(inputs))


def test_an_impossible_last_conv_stride_is_a_user_error():
    with pytest.raises(PsyfaceError, match=r"last_conv_stride must be one of \[1, 2, 4, 8, 16\], not 3"):
        build_model("vgg11", "gap", 2, last_conv_stride=3)
    with pytest.raises(PsyfaceError, match="needs a VGG architecture"):
        build_model("test_efficientnet", "gap", 2, last_conv_stride=8)
    with pytest.raises(PsyfaceError, match="last_conv_stride"):  # the train stage's check, before any MLflow run
        training_bytes("vgg16_bn", "gap", 7, last_conv_stride=5)
