"""Tiny models with known behaviour for the explanation tests (32 px inputs, CPU, milliseconds)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from psyface.model import AttributeNet

SIZE = 32


def tiny_vgg(n_outputs: int = 3, seed: int = 0) -> AttributeNet:
    """A VGG-shaped AttributeNet (in-place ReLUs, max-pools, GAP head) small enough for tests."""
    torch.manual_seed(seed)
    features = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True),
    )  # fmt: skip
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Dropout(0.2))
    return AttributeNet(features, head, nn.Linear(16, n_outputs)).eval()


class Backbone(nn.Module):
    """Features that are not a Sequential (like a timm backbone): Grad-CAM runs on the whole model."""

    def __init__(self, layers: nn.Sequential):
        super().__init__()
        self.layers = layers

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


def tiny_backbone_net(n_outputs: int = 3, seed: int = 0) -> AttributeNet:
    """`tiny_vgg` behind a `Backbone`: the same function, but no VGG layer names to split at."""
    model = tiny_vgg(n_outputs, seed)
    return AttributeNet(Backbone(model.features), model.pre_logits, model.last_layer).eval()


class KeepRegion(nn.Module):
    """Zeroes the input outside a fixed region: whatever follows can only see that region."""

    def __init__(self, region: torch.Tensor):
        super().__init__()
        self.register_buffer("region", region.float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images * self.region


def region_model(region: torch.Tensor, seed: int = 0) -> AttributeNet:
    """One output that depends only on the pixels in `region` (positive weights: positive maps)."""
    torch.manual_seed(seed)
    first, last = nn.Conv2d(3, 8, 1, bias=False), nn.Conv2d(8, 8, 1, bias=False)
    linear = nn.Linear(8, 1)
    with torch.no_grad():
        for layer in (first, last, linear):
            layer.weight.abs_()
    features = nn.Sequential(KeepRegion(region), first, nn.ReLU(), last, nn.ReLU())
    return AttributeNet(features, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)), linear).eval()


def weighted_region_model(region: torch.Tensor, n_outputs: int = 1, seed: int = 0) -> AttributeNet:
    """Outputs that depend only on the pixels in `region` through the *weights* (a dense head that is
    zero outside it), not through a fixed buffer as in `region_model`: randomising the weights
    spreads its maps over the face, so the model passes the randomisation check as well as
    localising the region. Positive weights: positive maps."""
    torch.manual_seed(seed)
    conv, linear = nn.Conv2d(3, 4, 1), nn.Linear(4 * SIZE * SIZE, n_outputs)
    with torch.no_grad():
        conv.weight.abs_()
        conv.bias.zero_()
        linear.weight.copy_((linear.weight.abs().reshape(n_outputs, 4, SIZE, SIZE) * region).flatten(1))
    return AttributeNet(nn.Sequential(conv, nn.ReLU()), nn.Flatten(1), linear).eval()


def box(top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    mask[top:bottom, left:right] = True
    return mask


@pytest.fixture
def images() -> torch.Tensor:
    """Three random positive 32 px inputs (positive: the region model's maps stay positive)."""
    return torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
