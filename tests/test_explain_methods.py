from __future__ import annotations

import pytest
import torch
from captum.attr import LayerAttribution, LayerGradCam

from psyface.errors import PsyfaceError
from psyface.explain.methods import METHODS, MethodOptions, attribute
from psyface.model import AttributeNet

from tests.explain_models import SIZE, images, tiny_vgg  # noqa: F401 (images: a fixture)

OPTIONS = MethodOptions(ig_steps=8, occlusion_window=8, occlusion_stride=4)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_finite_maps_for_every_image_and_attribute(method, images):
    maps = attribute(tiny_vgg(n_outputs=3), images, method, OPTIONS)
    assert maps.shape == (3, 3, SIZE, SIZE)
    assert torch.isfinite(maps).all()
    assert (maps.flatten(2).abs().amax(2) > 0).all(), "every (image, attribute) map carries signal"


@pytest.mark.parametrize("method", METHODS)
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


class Backbone(torch.nn.Module):
    """Features that are not a Sequential (like a timm backbone): Grad-CAM runs on the whole model."""

    def __init__(self, layers: torch.nn.Sequential):
        super().__init__()
        self.layers = layers

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


def test_gradcam_on_a_backbone_that_cannot_be_split_gives_the_same_maps(images):
    model = tiny_vgg(n_outputs=3)
    wrapped = AttributeNet(Backbone(model.features), model.pre_logits, model.last_layer).eval()
    torch.testing.assert_close(attribute(wrapped, images, "gradcam"), attribute(model, images, "gradcam"), rtol=1e-4, atol=1e-7)
