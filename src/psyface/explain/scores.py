"""How good are the maps? Localisation, faithfulness and a sanity check, on tensors and arrays.

Definitions follow the literature as Quantus implements it: relevance mass accuracy (Arras et al.
2022), pointing game (Zhang et al. 2018), deletion / pixel flipping against a random order (Samek et
al. 2017, Petsiuk et al. 2018) and model-parameter randomisation (Adebayo et al. 2018). Captum has
none of these and Quantus 0.6 would add OpenCV and scikit-image to the environment for a few lines
each, so they are written here, batched over images and attributes.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn


def relevance(maps: torch.Tensor) -> torch.Tensor:
    """What the scores rank: |attribution|. A region that lowers a rating is looked at too."""
    return maps.abs()


def defined_mean(values: np.ndarray, undefined: float | None = float("nan")) -> float | None:
    """Mean of the finite values (scores are NaN where undefined); `undefined` when there are none."""
    defined = values[np.isfinite(values)]
    return float(defined.mean()) if defined.size else undefined


def relevance_mass_accuracy(relevance_maps: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    """Share of each map's relevance inside its mask, (N, H, W) -> (N,); NaN where undefined."""
    total = relevance_maps.flatten(1).sum(1)
    inside = (relevance_maps * masks).flatten(1).sum(1)
    share = inside / total
    share[(total <= 0) | ~masks.flatten(1).any(1)] = float("nan")
    return share.numpy()


def grid_ceiling(masks: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """The highest relevance mass accuracy any non-negative map on a coarse `grid` can score once
    upsampled bilinearly to the masks' size (as Grad-CAM's maps are). Upsampling is linear with
    non-negative weights, so a map's score is a weighted mean of its cells' own scores and the best
    map is the single best cell: a Grad-CAM score below this is the network's doing, a target above
    it cannot be met on that layer. (N, H, W) -> (N,); NaN for empty masks."""
    cells = grid[0] * grid[1]
    one_hot = torch.eye(cells).reshape(cells, 1, *grid)
    basis = torch.nn.functional.interpolate(one_hot, size=tuple(masks.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
    basis = basis / basis.flatten(1).sum(1)[:, None, None]
    ceiling = torch.einsum("chw,nhw->nc", basis, masks.float()).amax(1)
    ceiling[~masks.flatten(1).any(1)] = float("nan")
    return ceiling.numpy()


def pointing_game(relevance_maps: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    """1.0 where the most relevant pixel lies in the mask, else 0.0; NaN for empty masks or maps."""
    flat = relevance_maps.flatten(1)
    hits = masks.flatten(1).gather(1, flat.argmax(1, keepdim=True)).squeeze(1).float()
    hits[(flat.amax(1) <= 0) | ~masks.flatten(1).any(1)] = float("nan")
    return hits.numpy()


def mask_share(masks: torch.Tensor) -> np.ndarray:
    """The chance level of both localisation scores: the mask's share of the image, (N,)."""
    share = masks.flatten(1).float().mean(1)
    share[share == 0] = float("nan")
    return share.numpy()


def deletion_curves(
    model: nn.Module, images: torch.Tensor, order_maps: torch.Tensor, steps: int, batch_size: int = 64
) -> np.ndarray:
    """Prediction change as pixels are greyed out most-relevant first: (N, A, steps + 1).

    `order_maps` (N, A, H, W) rank the pixels (highest first) for each image and attribute. Entry
    [i, a, k] is |f_a(x_k) - f_a(x)| with the top k/steps of the pixels replaced by the ImageNet mean
    colour (0 after normalisation). A faithful map moves the prediction faster than a random order.
    """
    n_images, n_attributes = order_maps.shape[:2]
    ranks = order_maps.flatten(2).argsort(dim=2, descending=True).argsort(dim=2)  # rank of each pixel
    rows = images.repeat_interleave(n_attributes, dim=0)
    targets = torch.arange(n_attributes).repeat(n_images)
    ranks = ranks.reshape(n_images * n_attributes, 1, *images.shape[-2:])
    n_pixels = images.shape[-1] * images.shape[-2]
    outputs = []
    with torch.no_grad():
        for k in range(steps + 1):
            deleted = rows * (ranks >= round(k * n_pixels / steps))
            predictions = torch.cat([model(chunk) for chunk in deleted.split(batch_size)])
            outputs.append(predictions.gather(1, targets[:, None]).squeeze(1))
    curves = torch.stack(outputs, dim=1)
    return (curves - curves[:, :1]).abs().reshape(n_images, n_attributes, steps + 1).numpy()


def random_order(shape: torch.Size, seed: int) -> torch.Tensor:
    """Uniform random pixel priorities: the deletion baseline every method must beat."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def area_under_curve(curves: np.ndarray) -> np.ndarray:
    """Mean over the deletion fractions (trapezoid on [0, 1]) along the last axis."""
    return np.trapezoid(curves, dx=1.0 / (curves.shape[-1] - 1), axis=-1)


def rank_correlation(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Spearman correlation of matching rows (M, P) -> (M,); a constant row shares no order: 0."""
    first_ranks = rankdata(first, axis=1)
    second_ranks = rankdata(second, axis=1)
    first_ranks -= first_ranks.mean(axis=1, keepdims=True)
    second_ranks -= second_ranks.mean(axis=1, keepdims=True)
    scale = np.sqrt((first_ranks**2).sum(axis=1) * (second_ranks**2).sum(axis=1))
    covariance = (first_ranks * second_ranks).sum(axis=1)
    return np.divide(covariance, scale, out=np.zeros_like(covariance), where=scale > 0)


def randomised_copy(model: nn.Module, seed: int) -> nn.Module:
    """The same architecture with every parameterised layer re-initialised (Adebayo et al. 2018)."""
    randomised = copy.deepcopy(model)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for module in randomised.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return randomised.eval()


def randomisation_correlation(trained_maps: torch.Tensor, randomised_maps: torch.Tensor, signed: bool = False) -> np.ndarray:
    """Rank correlation of |maps| (N, A, H, W) of the trained and the randomised model -> (N * A,).

    A method whose maps survive randomising the weights explains the input, not the model: it fails
    the sanity check (high correlation). `signed` ranks the maps with their signs (Adebayo et al.
    report both): a method can keep the input's structure in |map| while its signs become random.
    """
    if not signed:
        trained_maps, randomised_maps = relevance(trained_maps), relevance(randomised_maps)
    trained = trained_maps.flatten(2).flatten(0, 1)
    randomised = randomised_maps.flatten(2).flatten(0, 1)
    return rank_correlation(trained.numpy(), randomised.numpy())
