"""How good are the maps? Localisation with intervals, faithfulness and a sanity check, on tensors.

Definitions follow the literature as Quantus implements them: relevance mass accuracy and relevance
rank accuracy (Arras et al. 2022, CLEVR-XAI), pointing game (Zhang et al. 2018), deletion and
insertion against a random order (Samek et al. 2017, Petsiuk et al. 2018) and cascading
model-parameter randomisation (Adebayo et al. 2018). They are hand-written because the stage scores
every image and attribute of a method in one tensor operation, where Quantus 0.6 takes one
attribute's batch at a time through its own preprocessing, recomputes maps through its own
explain-function signature for randomisation, and would add OpenCV and scikit-image to the runtime.
Quantus is a dev dependency instead: tests/test_explain_quantus.py checks that these localisation
scores equal Quantus's on the same maps. Intervals come from scipy's bootstrap of the mean over
whole identities (`bootstrap_mean_interval`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import numpy as np
import torch
from captum.attr import FeatureAblation, LayerAttribution
from scipy.stats import bootstrap, rankdata
from torch import nn

from psyface.model import AttributeEnsemble, is_block_end


def relevance(maps: torch.Tensor) -> torch.Tensor:
    """What the scores rank: |attribution|. A region that lowers a rating is looked at too."""
    return maps.abs()


def defined_mean(values: np.ndarray, undefined: float | None = float("nan")) -> float | None:
    """Mean of the finite values (scores are NaN where undefined); `undefined` when there are none."""
    defined = values[np.isfinite(values)]
    return float(defined.mean()) if defined.size else undefined


def bootstrap_mean_interval(
    values: np.ndarray, groups: np.ndarray, n_boot: int, level: float, seed: int
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of the finite `values` (N,), resampling whole
    `groups` (identities: psyface.resampling.face_groups) with replacement; (NaN, NaN) with fewer
    than two groups.

    The mean over resampled identities is sum(values) / count(values) over their faces, so scipy's
    bootstrap resamples the pairs (per-group sum, per-group count) and the statistic is their
    ratio: an identity-grouped (cluster) bootstrap from library code, vectorised over resamples.
    """
    defined = np.isfinite(values)
    labels, members = np.unique(groups[defined], return_inverse=True)
    if len(labels) < 2:
        return float("nan"), float("nan")
    sums = np.bincount(members, weights=values[defined], minlength=len(labels))
    counts = np.bincount(members, minlength=len(labels)).astype(np.float64)
    result = bootstrap((sums, counts), lambda s, c, axis=-1: s.sum(axis) / c.sum(axis), paired=True,
                       vectorized=True, n_resamples=n_boot, confidence_level=level, method="percentile",
                       rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def relevance_mass_accuracy(relevance_maps: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    """Share of each map's relevance inside its mask, (N, H, W) -> (N,); NaN where undefined."""
    total = relevance_maps.flatten(1).sum(1)
    inside = (relevance_maps * masks).flatten(1).sum(1)
    share = inside / total
    share[(total <= 0) | ~masks.flatten(1).any(1)] = float("nan")
    return share.numpy()


def upsampled_as_cams(cells: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(K, 1, h, w) grid maps -> (K, H, W) at the masks' size, through the call the CAM family's maps take
    (Captum's bilinear `LayerAttribution.interpolate`, methods.RawCams), so grid scores match the maps."""
    return LayerAttribution.interpolate(cells, tuple(masks.shape[-2:]), interpolate_mode="bilinear")[:, 0]


def grid_ceiling(masks: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """The highest relevance mass accuracy any non-negative map on a coarse `grid` can score once
    upsampled bilinearly to the masks' size (as Grad-CAM's maps are). Upsampling is linear with
    non-negative weights, so a map's score is a weighted mean of its cells' own scores and the best
    map is the single best cell: a Grad-CAM score below this is the network's doing, a target above
    it cannot be met on that layer. (N, H, W) -> (N,); NaN for empty masks."""
    cells = grid[0] * grid[1]
    one_hot = torch.eye(cells).reshape(cells, 1, *grid)
    basis = upsampled_as_cams(one_hot, masks)
    basis = basis / basis.flatten(1).sum(1)[:, None, None]
    ceiling = torch.einsum("chw,nhw->nc", basis, masks.float()).amax(1)
    ceiling[~masks.flatten(1).any(1)] = float("nan")
    return ceiling.numpy()


def covering_score(masks: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """The relevance mass accuracy of the mask itself as a map on a coarse `grid`: each cell the
    share of it that lies in the mask (area pooling), upsampled bilinearly as CAM maps are. Where
    `grid_ceiling` is the bound reached by pointing at one cell, this is what a map that marks the
    *whole* region, evenly and as finely as the grid allows, scores: the blur of the grid alone
    costs it the rest. It is a combination of single cells, so never above `grid_ceiling`.
    Hand-written: no library scores maps against their own grid. (N, H, W) -> (N,); NaN for empty masks."""
    cells = torch.nn.functional.adaptive_avg_pool2d(masks.float()[:, None], grid)
    return relevance_mass_accuracy(upsampled_as_cams(cells, masks), masks)


def other_identity_donors(groups: np.ndarray, seed: int) -> np.ndarray | None:
    """For each face, the row of a face of another identity (seeded), or None with one identity: the
    donor whose parts `swap_changes` puts into the face. A swapped image is then made of two real
    faces, where a grey or mean-face fill is an image the model never saw in training."""
    if len(np.unique(groups)) < 2:
        return None
    rng = np.random.default_rng(seed)
    return np.array([rng.choice(np.flatnonzero(groups != group)) for group in groups])


def swap_changes(model: nn.Module, inputs: torch.Tensor, donors: torch.Tensor, masks: torch.Tensor,
                 target: int) -> tuple[np.ndarray, np.ndarray]:
    """How much output `target` moves when the face's region comes from its donor, and when the rest of
    the face does: (|f(x) - f(region swapped)|, |f(x) - f(rest swapped)|), (N,) each, NaN where the
    mask is empty or the whole image. Captum's FeatureAblation with the mask as its two feature groups
    (1 the region, 0 the rest) and the donor image as the baseline; it gives every pixel of a group
    that group's change."""
    groups = masks.long()[:, None].expand(-1, inputs.shape[1], -1, -1)
    with torch.no_grad():
        changes = FeatureAblation(model).attribute(inputs, baselines=donors, target=target, feature_mask=groups,
                                                   perturbations_per_eval=2)[:, 0]
    inside, outside = masks.flatten(1).float(), (~masks).flatten(1).float()
    flat = changes.flatten(1).abs()
    region, rest = (flat * inside).sum(1) / inside.sum(1), (flat * outside).sum(1) / outside.sum(1)
    return region.numpy(), rest.numpy()


def region_share(region_changes: np.ndarray, rest_changes: np.ndarray) -> float:
    """The model's own answer to "how much of this output is read from the region": the mean change a
    swapped region causes over that and the mean change a swapped rest causes, on the faces where both
    are defined (NaN without any). Relevance mass accuracy asks the same of a map pixel by pixel; here
    whole parts are exchanged between real faces, so a map that puts much less than this in the mask
    spreads further than the model's own behaviour does. Hand-written: Captum and Quantus measure maps,
    not how local the model itself is."""
    both = np.isfinite(region_changes) & np.isfinite(rest_changes)
    region, rest = region_changes[both].mean() if both.any() else np.nan, rest_changes[both].mean() if both.any() else np.nan
    return float(region / (region + rest)) if region + rest > 0 else float("nan")


def pointing_game(relevance_maps: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    """1.0 where the most relevant pixel lies in the mask, else 0.0; NaN for empty masks or maps.
    Pixels tied at the peak count by their share in the mask (the expectation over which of them a
    pointer picks: a flat map scores chance, not a hit because one of its pixels is inside)."""
    flat, inside = relevance_maps.flatten(1), masks.flatten(1)
    peaks = flat == flat.amax(1, keepdim=True)
    hits = (peaks & inside).sum(1) / peaks.sum(1)
    hits[(flat.amax(1) <= 0) | ~inside.any(1)] = float("nan")
    return hits.numpy()


def relevance_rank_accuracy(relevance_maps: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    """Share of the K most relevant pixels that lie in the mask, K = the mask's size (Arras et al.
    2022): (N, H, W) -> (N,); NaN for empty masks or maps. Unlike relevance mass it ignores how much
    relevance the top pixels carry, so a few very bright pixels cannot dominate it. Pixels tied at
    the K-th value (the zeros of a sparse map) fill the remaining places by their share in the mask:
    the expectation over tie orders, where a sort would pick them arbitrarily."""
    flat, inside = relevance_maps.flatten(1), masks.flatten(1)
    sizes = inside.sum(1)
    kth = flat.sort(dim=1, descending=True).values.gather(1, (sizes - 1).clamp_min(0)[:, None])
    above, tied = flat > kth, flat == kth
    places = sizes - above.sum(1)  # top-K places left for the tied pixels
    hits = (above & inside).sum(1) + places * (tied & inside).sum(1) / tied.sum(1)
    share = hits / sizes.clamp_min(1)
    share[(flat.amax(1) <= 0) | (sizes == 0)] = float("nan")
    return share.float().numpy()


def mask_share(masks: torch.Tensor) -> np.ndarray:
    """The chance level of all three localisation scores: the mask's share of the image, (N,). A
    uniformly random map puts that share of its mass, of its top-K pixels and (for its peak) of its
    probability in the mask."""
    share = masks.flatten(1).float().mean(1)
    share[share == 0] = float("nan")
    return share.numpy()


def perturbation_curves(
    model: nn.Module, images: torch.Tensor, order_maps: torch.Tensor, steps: int, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Deletion and insertion curves, (N, A, steps + 1) each, in the model's standardised units.

    `order_maps` (N, A, H, W) rank the pixels (highest first) for each image and attribute; the
    baseline is the ImageNet mean colour (0 after normalisation). Deletion [i, a, k] is
    |f_a(x) - f_a(x without its top k/steps pixels)|: how far the prediction has moved. Insertion
    starts from the baseline image and adds the top k/steps pixels back: |f_a(x) - f_a(baseline)| -
    |f_a(x) - f_a(x_k)|, how much of the way back to the prediction it has come. Both run from 0 to
    |f_a(x) - f_a(baseline)|, so a faithful map rises faster (a larger area) than a random order.
    """
    n_images, n_attributes = order_maps.shape[:2]
    ranks = order_maps.flatten(2).argsort(dim=2, descending=True).argsort(dim=2)  # rank of each pixel
    rows = images.repeat_interleave(n_attributes, dim=0)
    targets = torch.arange(n_attributes).repeat(n_images)
    ranks = ranks.reshape(n_images * n_attributes, 1, *images.shape[-2:])
    n_pixels = images.shape[-1] * images.shape[-2]

    def predict(batch: torch.Tensor) -> torch.Tensor:
        return torch.cat([model(chunk) for chunk in batch.split(batch_size)])

    def predict_rows(batch: torch.Tensor) -> torch.Tensor:  # row i * A + a: attribute a of image i
        return predict(batch).gather(1, targets[:, None]).squeeze(1)

    with torch.no_grad():  # each image and the baseline once; the ends of both curves are known
        full = predict(images)[:, :n_attributes].reshape(-1)
        span = (predict(torch.zeros_like(images[:1]))[0, targets] - full).abs()
        nothing = torch.zeros_like(span)
        deleted, inserted = [nothing], [nothing]
        for k in range(1, steps):
            top = ranks < round(k * n_pixels / steps)
            deleted.append((predict_rows(rows * ~top) - full).abs())
            inserted.append(span - (predict_rows(rows * top) - full).abs())
        deleted.append(span)
        inserted.append(span)
    shape = (n_images, n_attributes, steps + 1)
    return torch.stack(deleted, 1).reshape(shape).numpy(), torch.stack(inserted, 1).reshape(shape).numpy()


def random_order(shape: torch.Size, seed: int) -> torch.Tensor:
    """Uniform random pixel priorities: the deletion and insertion baseline every method must beat."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def area_under_curve(curves: np.ndarray) -> np.ndarray:
    """Mean over the perturbed fractions (trapezoid on [0, 1]) along the last axis."""
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


def cascade_steps(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """The layers cascading randomisation resets, top (output) first: `head` (the last linear layer
    and the pre-logits), then the feature stack's blocks from the last to the first.

    A VGG `features` stack is cut at its pools (`block5` ... `block1`); any other backbone at its
    children, going down while a module wraps a single child (an adapter around a timm model). A
    per-attribute ensemble randomises the same step of every member at once. A handful of steps
    keeps the check cheap: the maps are recomputed once per step.
    """
    if isinstance(model, AttributeEnsemble):
        per_member = [cascade_steps(member) for member in model.members]
        return [(name, [m for steps in per_member for m in steps[index][1]]) for index, (name, _) in enumerate(per_member[0])]
    head = [m for m in (*model.pre_logits.modules(), model.last_layer) if has_parameters(m)]
    features: nn.Module = model.features
    while len(children := [c for c in features.children() if has_parameters(c)]) == 1 and not isinstance(features, nn.Sequential):
        features = children[0]
    if isinstance(features, nn.Sequential) and any(is_block_end(layer) for layer in features):
        blocks: list[list[nn.Module]] = [[]]
        for layer in features:
            blocks[-1].append(layer)
            if is_block_end(layer):
                blocks.append([])
    else:
        blocks = [[child] for child in features.children()]
    kept = [block for block in blocks if any(map(has_parameters, block))]
    named = [(f"block{index + 1}", block) for index, block in enumerate(kept)]
    return [("head", head), *reversed(named)]


def has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def cascading_randomisation(model: nn.Module, seed: int) -> Iterator[tuple[str, nn.Module]]:
    """(step name, network) with the layers of `cascade_steps` re-initialised cumulatively from the
    top (Adebayo et al. 2018): after the last step no trained weight is left. One copy of `model`
    is randomised in place step by step, so use each network before asking for the next."""
    randomised = copy.deepcopy(model).eval()
    generator = torch.Generator().manual_seed(seed)
    for name, layers in cascade_steps(randomised):
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
            for layer in layers:
                for module in layer.modules():
                    if hasattr(module, "reset_parameters"):
                        module.reset_parameters()
        yield name, randomised


def randomisation_correlation(trained_maps: torch.Tensor, randomised_maps: torch.Tensor, signed: bool = False) -> np.ndarray:
    """Rank correlation of |maps| (N, A, H, W) of the trained and a randomised model -> (N * A,).

    A method whose maps survive randomising the weights explains the input, not the model: it fails
    the sanity check (high correlation). `signed` ranks the maps with their signs (Adebayo et al.
    report both): a method can keep the input's structure in |map| while its signs become random.
    """
    if not signed:
        trained_maps, randomised_maps = relevance(trained_maps), relevance(randomised_maps)
    trained = trained_maps.flatten(2).flatten(0, 1)
    randomised = randomised_maps.flatten(2).flatten(0, 1)
    return rank_correlation(trained.numpy(), randomised.numpy())
