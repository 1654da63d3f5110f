"""Stage `explain`: attribution maps of the trained model on the test split, how good they are, and
which method (if any) a researcher can trust for each attribute.

Reads the run `train` wrote (`artifacts/train/run.json`), the prepared arrays and `data/` (region and
human-attention mask semantics, identities), and `reports/explain/ground_truth.json` where present;
writes figures and `reports/explain/metrics.json` (per method: localisation with identity-grouped
bootstrap intervals beside chance, deletion and insertion against a random order, cascading
randomisation; per attribute: the verdict), a float16 subset of the raw maps, and logs all of it into
the training run, so lineage stays one click in MLflow.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from psyface.artifacts import (
    EXPLAIN_FIGURES_DIR,
    EXPLAIN_GROUND_TRUTH_FILE,
    EXPLAIN_MAPS_FILE,
    EXPLAIN_METRICS_FILE,
    PREPARED_DIR,
    Prepared,
    load_prepared,
)
from psyface.config import NonNegativeInt, OpenUnitFloat, PositiveFloat, PositiveInt, UnitFloat, load_section, read_yaml
from psyface.dataset.layout import DATA_DIR, DatasetSpec, load_dataset
from psyface.errors import PsyfaceError, entry_point
from psyface.explain import figures
from psyface.explain.methods import (
    CAMS,
    METHODS,
    Method,
    MethodOptions,
    attribute_many,
    cam_layer,
    gradcam_grid,
    integrated_gradients_with_delta,
)
from psyface.explain.scores import (
    area_under_curve,
    bootstrap_mean_interval,
    cascading_randomisation,
    covering_score,
    defined_mean,
    grid_ceiling,
    mask_share,
    other_identity_donors,
    perturbation_curves,
    pointing_game,
    random_order,
    randomisation_correlation,
    region_share,
    relevance,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    swap_changes,
)
from psyface.io import replace_dir_atomic, write_atomic, write_json_atomic
from psyface.metrics import pearson_columns
from psyface.model import AttributeNet, ModelSpec, to_input
from psyface.resampling import face_groups

NO_LOCALISATION = ("not available: no region masks for the explained attributes "
                   "(dataset.yaml `masks:` and attributes.*.regions)")
GROUND_TRUTH_NOT_CHECKED = "not checked"
# What a plain `dvc repro` runs, and how many test faces the costly methods explain (0: all). Integrated
# gradients, SmoothGrad and occlusion (3, 12 and 5 s an image on the default network, each paid again at
# every cascading randomisation step) are available but off by default: they fit no demo budget (IG
# alone cost 37 s of the default run; README "Explanations that are measured" keeps its figures).
DEFAULT_METHODS: tuple[Method, ...] = ("gradcam", "hirescam", "gradcam_plusplus", "layercam", "lrp")
# The CAM family (.09 s an image) explains the whole test split: on 32 faces Grad-CAM++'s RMA moved by
# up to .4 between seeds and the verdict picked the luckiest method (README "Explanations that are measured").
# LRP (about 1 s an image) gets 32 faces: on 8 its interval spanned up to .25.
DEFAULT_BUDGETS: dict[str, int] = {"hirescam": 0, "gradcam_plusplus": 0, "layercam": 0, "lrp": 32,
                                   "integrated_gradients": 2, "occlusion": 4, "smoothgrad": 2}
# Methods whose maps live on a layer's grid (`methods.cam_layer`), upsampled: their localisation is
# bounded by `grid_ceiling`. The CAM family of methods.py; a new one on a layer grid belongs here.
LAYER_GRID_METHODS = frozenset(CAMS)  # maps computed on a convolution's grid: scored against its ceiling
LOCALISATION_SCORES = {
    "relevance_mass_accuracy": relevance_mass_accuracy,
    "relevance_rank_accuracy": relevance_rank_accuracy,
    "pointing_game": pointing_game,
}


@dataclass(frozen=True)
class ExplainParams:
    """The `explain:` section of params.yaml. A budget of 0 images means the whole test split."""

    methods: list[Method] = field(default_factory=lambda: list(DEFAULT_METHODS))
    # conv3_3: a 16x16 grid at 64 px. HiResCAM at conv2_1 (32x32): over three seeds its worst RMA is higher
    # on five attributes than either CAM's at conv3_3, which swing by up to .45 with the seed (README).
    options: MethodOptions = field(default_factory=lambda: MethodOptions(gradcam_layer="conv3_3", cam_layers={"hirescam": "conv2_1"}))
    batch_size: PositiveInt = 16
    max_images: dict[str, NonNegativeInt] = field(default_factory=lambda: dict(DEFAULT_BUDGETS))
    region_swap_images: NonNegativeInt = 100  # test faces whose region and rest are swapped with a donor's (0: all)
    n_top: PositiveInt = 4
    raw_maps_images: NonNegativeInt = 16
    perturbation_images: PositiveInt = 4  # deletion and insertion curves
    perturbation_steps: PositiveInt = 8
    sanity_images: PositiveInt = 2  # cascading randomisation: maps recomputed once per cascade step
    sanity_threshold: UnitFloat = 0.2
    rma_target: UnitFloat = 0.7
    n_boot: PositiveInt = 1000  # bootstrap resamples (of identities) for the localisation intervals
    ci: OpenUnitFloat = 0.95
    min_test_r: UnitFloat = 0.3  # below it the model does not predict the attribute: no map is trusted
    ig_max_relative_gap: PositiveFloat = 0.05  # IG completeness: median |sum(map) - (f(x) - f(baseline))| / |f(x) - f(baseline)|
    seed: NonNegativeInt = 0


@dataclass(frozen=True)
class FacesToExplain:
    """The test faces with their ratings, identities and per-attribute ground-truth masks (absent: no
    localisation)."""

    ids: list[str]
    images: np.ndarray  # uint8 (N, S, S, 3)
    ratings: np.ndarray  # float (N, A): the prepared test targets, in the model's attribute order
    groups: np.ndarray  # (N,) who each face is (the bootstrap resamples identities)
    region_masks: dict[str, np.ndarray]  # attribute -> bool (N, S, S)
    attention_masks: dict[str, np.ndarray]  # attribute -> bool (N, S, S)
    aligned: bool


def faces_to_explain(dataset: DatasetSpec, prepared: Prepared, attributes: list[str]) -> FacesToExplain:
    """The test rows of the prepared arrays; masks only for attributes with regions to find."""
    rows = prepared.split("test")
    if len(rows) == 0:
        raise PsyfaceError(f"{PREPARED_DIR} holds no test images: check the split fractions")
    table = prepared.table.iloc[rows]
    unrated = [name for name in attributes if name not in table]
    if unrated:
        raise PsyfaceError(f"{PREPARED_DIR}/table.csv has no ratings of the model's attributes {unrated}")
    region_masks: dict[str, np.ndarray] = {}
    if prepared.masks is not None and dataset.masks is not None:
        bitfields = np.asarray(prepared.masks[rows])
        for name in attributes:
            if name in dataset.attributes and dataset.attributes[name].regions:
                region_masks[name] = dataset.attribute_mask(bitfields, name)
    attention_masks: dict[str, np.ndarray] = {}
    if prepared.attention is not None and dataset.human_attention is not None:
        # Human attention: bit k marks where people looked when rating attribute `regions[k]`.
        bitfields = np.asarray(prepared.attention[rows])
        for bit, name in enumerate(dataset.human_attention.regions):
            if name in attributes:
                attention_masks[name] = (bitfields & (1 << bit)) != 0
    return FacesToExplain(
        ids=table["id"].tolist(),
        images=np.asarray(prepared.images[rows]),
        ratings=table[attributes].to_numpy(np.float64),
        groups=face_groups(table, dataset.identity_column),
        region_masks=region_masks,
        attention_masks=attention_masks,
        aligned=dataset.aligned,
    )


def compute_maps(
    net: AttributeNet, images: torch.Tensor, methods: Sequence[Method], options: MethodOptions, batch_size: int,
    progress: bool = False,
) -> dict[Method, torch.Tensor]:
    """Each method's maps (N, A, H, W) in batches of `batch_size` images (each batch: all attributes at
    once, the CAM family's methods from one shared pass: `methods.attribute_many`)."""
    batches = tqdm(images.split(batch_size), desc=f"explain: {'+'.join(methods)}", disable=not progress)
    parts = [attribute_many(net, batch, methods, options) for batch in batches]
    return {method: torch.cat([part[method] for part in parts]) for method in methods}


def attribution_passes(budgets: dict[Method, int]) -> list[tuple[int, list[Method]]]:
    """(faces, methods) of each attribution pass for per-method `budgets` of test faces: the CAM
    family's methods with equal budgets share one pass (they read the same activations and
    gradients), every other method has its own."""
    passes: list[tuple[int, list[Method]]] = []
    shared: dict[int, list[Method]] = {}
    for method, n_images in budgets.items():
        if method not in CAMS:
            passes.append((n_images, [method]))
        elif n_images in shared:
            shared[n_images].append(method)
        else:
            shared[n_images] = [method]
            passes.append((n_images, shared[n_images]))
    return passes


def integrated_gradients_checked(
    net: AttributeNet, images: torch.Tensor, params: ExplainParams, progress: bool = False
) -> tuple[torch.Tensor, dict[str, Any]]:
    """IG maps with their completeness (Captum's convergence delta): IG's maps must sum to
    f(x) - f(baseline); a median relative gap above `ig_max_relative_gap` means too few steps."""
    parts = [integrated_gradients_with_delta(net, batch, params.options)
             for batch in tqdm(images.split(params.batch_size), desc="explain: integrated_gradients", disable=not progress)]
    relative = np.concatenate([part.relative for part in parts]).ravel()
    relative = relative[np.isfinite(relative)]
    median = float(np.median(relative)) if relative.size else None
    completeness = {"median_relative_gap": median, "max_relative_gap": float(relative.max()) if relative.size else None,
                    "bound": params.ig_max_relative_gap, "steps": params.options.ig_steps,
                    "passed": median is not None and median <= params.ig_max_relative_gap}
    return torch.cat([part.maps for part in parts]), completeness


def finite_or_none(value: float) -> float | None:
    """JSON for DVC holds no NaN: an undefined number is null."""
    return float(value) if np.isfinite(value) else None


def localisation(
    rel: torch.Tensor, masks: dict[str, np.ndarray], attributes: list[str], groups: np.ndarray, params: ExplainParams,
    grid: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Relevance mass accuracy, relevance rank accuracy and pointing game per attribute, each with
    its bootstrap interval over identities, beside their common chance level (the mask's share) and,
    for maps computed on a coarse `grid`, the best relevance mass any map on that grid can reach and
    what the mask itself scores when drawn on that grid (`scores.covering_score`)."""
    scores = {}
    for name, mask in masks.items():
        column = attributes.index(name)
        truth = torch.from_numpy(mask[: len(rel)])
        entry: dict[str, Any] = {}
        for score, compute in LOCALISATION_SCORES.items():
            per_image = compute(rel[:, column], truth)
            low, high = bootstrap_mean_interval(per_image, groups[: len(truth)], params.n_boot, params.ci, params.seed)
            entry |= {score: defined_mean(per_image, undefined=None), f"{score}_ci_low": finite_or_none(low),
                      f"{score}_ci_high": finite_or_none(high)}
        entry["chance"] = defined_mean(mask_share(truth), undefined=None)
        if grid:
            entry["grid_ceiling"] = defined_mean(grid_ceiling(truth, grid), undefined=None)
            entry["covering_score"] = defined_mean(covering_score(truth, grid), undefined=None)
        entry["images"] = len(truth)
        scores[name] = entry
    return scores


def model_region_shares(net: AttributeNet, inputs: torch.Tensor, test: FacesToExplain, attributes: list[str],
                        params: ExplainParams) -> dict[str, Any] | str:
    """How local the model itself is, per attribute with regions: on the first `region_swap_images`
    test faces, the mean output change when the region comes from a face of another identity, when
    the rest does, and the region's share of the two (`scores.region_share`). It is what a faithful
    map's relevance mass accuracy can be expected near, so a verdict's miss reads as the map's or the
    model's."""
    n_images = min(params.region_swap_images or len(inputs), len(inputs))
    donors = other_identity_donors(test.groups[:n_images], params.seed)
    if donors is None:
        return "not available: the test faces are of one identity, so there is no other face to swap parts with"
    batches = torch.arange(n_images).split(params.batch_size)
    shares = {}
    for name, mask in test.region_masks.items():
        truth = torch.from_numpy(mask[:n_images])
        changes = [swap_changes(net, inputs[rows], inputs[donors[rows]], truth[rows], attributes.index(name)) for rows in batches]
        region, rest = (np.concatenate(parts) for parts in zip(*changes))
        shares[name] = {"region_share": finite_or_none(region_share(region, rest)),
                        "region_change": defined_mean(region, undefined=None), "rest_change": defined_mean(rest, undefined=None),
                        "images": n_images}
    return shares


def mean_maps(rel: torch.Tensor) -> np.ndarray:
    """Average over images of each map scaled to a peak of 1: (N, A, H, W) -> (A, H, W)."""
    peaks = rel.flatten(2).amax(2).clamp_min(1e-12)[..., None, None]
    return (rel / peaks).mean(0).numpy()


@dataclass(frozen=True)
class RandomBaseline:
    """What every method is compared with: curves of a random pixel order on the first test faces."""

    deletion: np.ndarray  # (K, A, steps + 1)
    insertion: np.ndarray


def faithfulness(net: AttributeNet, inputs: torch.Tensor, rel: torch.Tensor, params: ExplainParams,
                 random: RandomBaseline) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Deletion and insertion area under the curve against the random order (gain > 0: the map's
    order moves the prediction faster than chance) -> (scores, mean curve per kind for the figure)."""
    k = min(len(random.deletion), len(rel))
    curves = dict(zip(("deletion", "insertion"), perturbation_curves(net, inputs[:k], rel[:k], params.perturbation_steps)))
    scores = {}
    for kind, curve in curves.items():
        auc = float(area_under_curve(curve).mean())
        auc_random = float(area_under_curve(getattr(random, kind)[:k]).mean())
        scores[kind] = {"auc": auc, "auc_random": auc_random, "gain": auc - auc_random, "images": k}
    return scores, {kind: curve.mean(axis=(0, 1)) for kind, curve in curves.items()}


def quality(
    net: AttributeNet, inputs: torch.Tensor, maps: torch.Tensor, test: FacesToExplain, attributes: list[str],
    params: ExplainParams, method: Method, random: RandomBaseline,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Localisation (masks, human attention) and faithfulness of one method's maps -> (scores, mean
    deletion and insertion curves). Randomisation is scored for all methods at once (`sanity`)."""
    rel = relevance(maps)
    result: dict[str, Any] = {}
    grid = None
    if method in LAYER_GRID_METHODS:
        layer = cam_layer(params.options, method)
        grid = gradcam_grid(net, inputs, layer)
        result.update(layer=layer, grid=list(grid))
    result["localisation"] = localisation(rel, test.region_masks, attributes, test.groups, params, grid)
    if test.attention_masks:
        result["human_attention"] = localisation(rel, test.attention_masks, attributes, test.groups, params, grid)
    rmas = [v["relevance_mass_accuracy"] for v in result["localisation"].values() if v["relevance_mass_accuracy"] is not None]
    result["worst_relevance_mass_accuracy"] = min(rmas) if rmas else None
    faithful, curves = faithfulness(net, inputs, rel, params, random)
    return result | faithful, curves


def sanity(
    net: AttributeNet, inputs: torch.Tensor, trained_maps: dict[Method, torch.Tensor], params: ExplainParams
) -> dict[Method, dict[str, Any]]:
    """Cascading randomisation (Adebayo et al. 2018) of every method: the rank correlation of |maps|
    with the trained model's as the layers are re-initialised from the output down.

    `passed` means the correlation is below `sanity_threshold` once every layer is randomised. That
    end of the cascade is where no trained weight is left to explain, and it does not depend on how
    an architecture's layers are grouped into steps; `first_below_threshold` (the first step whose
    correlation is below it) and the whole `cascade` curve show how far down the maps still follow
    the trained weights. The signed correlation at the end is reported beside it.
    """
    cascade: dict[Method, dict[str, float]] = {method: {} for method in trained_maps}
    signed: dict[Method, float] = {}
    passes = attribution_passes({method: len(maps) for method, maps in trained_maps.items()})
    for step, randomised in cascading_randomisation(net, params.seed):
        for n_images, methods in passes:
            random_maps = compute_maps(randomised, inputs[:n_images], methods, params.options, params.batch_size)
            for method in methods:
                maps = trained_maps[method]
                cascade[method][step] = float(randomisation_correlation(maps, random_maps[method]).mean())
                signed[method] = float(randomisation_correlation(maps, random_maps[method], signed=True).mean())
    results = {}
    for method, curve in cascade.items():
        final = list(curve.values())[-1]
        below = [step for step, correlation in curve.items() if correlation < params.sanity_threshold]
        results[method] = {"cascade": curve, "rank_correlation": final, "rank_correlation_signed": signed[method],
                           "first_below_threshold": below[0] if below else None,
                           "passed": final < params.sanity_threshold, "images": len(trained_maps[method])}
    return results


def float16_subset(maps: torch.Tensor, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """(maps scaled to a peak |value| of 1 as float16, float32 scales): float16 alone would flush
    the tiny raw values of some methods to zero; map = scaled * scale."""
    kept = maps[:n_images]
    scale = kept.flatten(2).abs().amax(2).clamp_min(1e-30)
    return (kept / scale[..., None, None]).numpy().astype(np.float16), scale.numpy()


def explain_test_set(
    net: AttributeNet, spec: ModelSpec, test: FacesToExplain, params: ExplainParams, figures_dir: Path,
    ground_truth: dict[str, Any] | None = None, progress: bool = False,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Every method's maps, scores and figures for the test faces, and the verdict per attribute
    (`ground_truth`: reports/explain/ground_truth.json's content, None when it was not written)
    -> (metrics, raw map subset)."""
    net.eval()
    attributes = spec.attributes
    inputs = to_input(test.images, "cpu", spec.input_mean, spec.input_std).contiguous()
    with torch.no_grad():
        predictions = torch.cat([net(batch) for batch in inputs.split(params.batch_size)]).numpy()
    ratings = spec.to_rating_scale(predictions)
    n_perturbed = min(params.perturbation_images, len(test.ids))
    order = random_order(torch.Size((n_perturbed, len(attributes), *inputs.shape[-2:])), params.seed)
    random = RandomBaseline(*perturbation_curves(net, inputs[:n_perturbed], order, params.perturbation_steps))

    test_r = dict(zip(attributes, map(finite_or_none, pearson_columns(ratings, test.ratings))))
    metrics: dict[str, Any] = {"aligned": test.aligned, "test_images": len(test.ids), "test_r": test_r}
    if not test.region_masks:
        metrics["localisation"] = NO_LOCALISATION
    raw: dict[str, np.ndarray] = {"ids": np.array(test.ids[: params.raw_maps_images]), "attributes": np.array(attributes)}
    mean_by_method: dict[str, np.ndarray] = {}
    curves_by_method: dict[str, dict[str, np.ndarray]] = {}
    sanity_maps: dict[Method, torch.Tensor] = {}
    budgets = {method: min(params.max_images.get(method, 0) or len(test.ids), len(test.ids)) for method in params.methods}
    computed: dict[Method, tuple[torch.Tensor, dict[str, Any]]] = {}
    passes = attribution_passes(budgets)
    while passes:
        n_images, methods = passes.pop(0)
        started = time.perf_counter()
        completeness = {}
        try:
            if methods == ["integrated_gradients"]:
                maps, completeness["completeness"] = integrated_gradients_checked(net, inputs[:n_images], params, progress)
                pass_maps: dict[Method, torch.Tensor] = {"integrated_gradients": maps}
            else:
                pass_maps = compute_maps(net, inputs[:n_images], methods, params.options, params.batch_size, progress)
        except PsyfaceError as error:  # e.g. Grad-CAM on a transformer, LRP on layers without rules
            if len(methods) > 1:  # one CAM method's layer may be missing from this network: alone, each says
                passes[:0] = [(n_images, [method]) for method in methods]
                continue
            for method in methods:
                print(f"explain: {method} not available for {spec.arch}: {error}")
                computed[method] = (torch.empty(0), {"available": False, "reason": str(error)})
            continue
        timing: dict[str, Any] = {"images": n_images, "seconds_per_image": (time.perf_counter() - started) / n_images}
        if len(methods) > 1:
            timing["shared_pass"] = list(methods)  # the seconds are the pass's, for all of them together
        for method in methods:
            computed[method] = (pass_maps[method], timing | completeness)
    for method in dict.fromkeys(params.methods):  # a method named twice is explained once
        maps, entry = computed.pop(method)
        if entry.get("available") is False:
            metrics[method] = entry
            continue
        n_images = entry["images"]
        scores, curves_by_method[method] = quality(net, inputs, maps, test, attributes, params, method, random)
        metrics[method] = entry | scores
        sanity_maps[method] = maps[: params.sanity_images]
        rel = relevance(maps)
        mean_by_method[method] = mean_maps(rel)
        figures.save_extremes(
            figures_dir / f"extremes_{method}.png",
            test.images[:n_images],
            rel.numpy(),
            ratings[:n_images],
            attributes,
            f"{method}: highest- and lowest-predicted of {n_images} test faces per attribute",
            params.n_top,
        )
        raw[method], raw[f"{method}_scale"] = float16_subset(maps, params.raw_maps_images)
    for method, result in sanity(net, inputs, sanity_maps, params).items():
        metrics[method]["randomisation"] = result
    mean_face = test.images.mean(axis=0).astype(np.uint8)
    figures.save_mean_heatmaps(figures_dir / "mean_heatmaps.png", mean_face, mean_by_method, attributes, test.aligned)
    figures.save_perturbation_curves(figures_dir / "deletion_insertion.png", curves_by_method,
                                     {"deletion": random.deletion.mean(axis=(0, 1)), "insertion": random.insertion.mean(axis=(0, 1))})
    figures.save_randomisation_curves(figures_dir / "randomisation.png",
                                      {method: metrics[method]["randomisation"]["cascade"] for method in sanity_maps},
                                      params.sanity_threshold)
    shares: dict[str, Any] = {}
    if test.region_masks:
        metrics["region_swap"] = model_region_shares(net, inputs, test, attributes, params)
        shares = metrics["region_swap"] if isinstance(metrics["region_swap"], dict) else {}
    by_method = {method: metrics[method] for method in params.methods}
    metrics["verdict"] = {name: attribute_verdict(name, by_method, test_r[name], name in test.region_masks,
                                                  ground_truth_status(ground_truth, name), params,
                                                  (shares.get(name) or {}).get("region_share"))
                          for name in attributes}
    return metrics, raw


def ground_truth_status(ground_truth: dict[str, Any] | None, name: str) -> str:
    """`valid`, `not valid (...)` with the ground_truth stage's numbers, or `not checked`."""
    entry = (ground_truth or {}).get("attributes", {}).get(name)
    if entry is None:
        return GROUND_TRUTH_NOT_CHECKED
    if entry.get("valid"):
        return "valid"
    if entry.get("reason"):
        return f"not valid ({entry['reason']})"
    numbers = ", ".join(f"{key} {value:.2f}" for key, value in entry.items()
                        if key != "valid" and isinstance(value, int | float) and not isinstance(value, bool))
    return f"not valid ({numbers})" if numbers else "not valid"


def method_failures(result: dict[str, Any], name: str, params: ExplainParams) -> list[str]:
    """Why one method's maps of attribute `name` cannot be trusted (empty: they can)."""
    if result.get("available") is False:
        return [f"not available ({result['reason']})"]
    reasons = []
    sanity_result = result["randomisation"]
    if not sanity_result["passed"]:
        reasons.append(f"fails randomisation (rank correlation {sanity_result['rank_correlation']:.2f} >= "
                       f"{params.sanity_threshold:g} with every layer randomised)")
    completeness = result.get("completeness")
    if completeness is not None and not completeness["passed"]:
        gap = completeness["median_relative_gap"]
        reasons.append(f"incomplete (median completeness gap {'undefined' if gap is None else f'{gap:.1%}'} > "
                       f"{completeness['bound']:.0%} of f(x) - f(baseline) at {completeness['steps']} steps)")
    scores = result["localisation"].get(name)
    if scores is None:
        return reasons
    low, chance = scores["relevance_mass_accuracy_ci_low"], scores["chance"]
    if low is None or chance is None:
        reasons.append(f"no interval (relevance mass undefined or fewer than two identities among {scores['images']} faces)")
    elif low <= chance:
        reasons.append(f"not above chance (RMA {params.ci:.0%} CI lower bound {low:.2f} <= chance {chance:.2f}, "
                       f"{scores['images']} faces)")
    ceiling = scores.get("grid_ceiling")
    if ceiling is not None and ceiling < params.rma_target:
        reasons.append(f"grid ceiling ({ceiling:.2f} < target {params.rma_target:g}: the target cannot be met on "
                       f"its {'x'.join(map(str, result['grid']))} grid)")
    return reasons


def attribute_verdict(
    name: str, by_method: dict[str, dict[str, Any]], test_r: float | None, has_regions: bool, ground_truth: str,
    params: ExplainParams, model_region_share: float | None = None,
) -> dict[str, Any]:
    """Which method a researcher can trust for attribute `name`, and why the others fail.

    A method is a candidate when it passes cascading randomisation and its relevance mass accuracy's
    interval lies above chance (and, on a layer grid, the grid can reach `rma_target`); the best
    candidate (highest RMA) is trusted unless the model does not predict the attribute (test r below
    `min_test_r`: its maps explain noise), it has no region masks (localisation not checked) or its
    ground truth is not valid (the ground_truth stage's check). `model_region_share` (the
    `region_swap` block: how local the model itself is) is carried along and named in the verdict.
    """
    failing = {method: "; ".join(reasons) for method, result in by_method.items()
               if (reasons := method_failures(result, name, params))}
    candidates = [method for method in by_method if method not in failing] if has_regions else []
    best = max(candidates, key=lambda m: by_method[m]["localisation"][name]["relevance_mass_accuracy"], default=None)
    predicted = test_r is not None and test_r >= params.min_test_r
    if not predicted:
        r = "undefined" if test_r is None else f"{test_r:.2f}"
        why = f"not predicted (test r {r} < {params.min_test_r:g}): its maps explain noise, no method is trusted"
    elif not has_regions:
        why = "no region masks: localisation not checked, no method is trusted"
    elif best is None:
        why = "no method passes randomisation with localisation above chance"
    elif ground_truth.startswith("not valid"):
        why = f"{best} localises best, but the ground truth is {ground_truth}: reported, not trusted"
    else:
        why = f"{best} passes randomisation and localises above chance (ground truth {ground_truth})"
    if model_region_share is not None and predicted and has_regions:
        why += f"; the model's own region share (parts swapped between faces) is {model_region_share:.2f}"
    trusted = best if predicted and not ground_truth.startswith("not valid") else None
    scores = by_method[best]["localisation"][name] if best else {}
    keys = ("relevance_mass_accuracy", "relevance_mass_accuracy_ci_low", "relevance_mass_accuracy_ci_high", "chance",
            "covering_score", "images")
    return {"test_r": test_r, "predicted": predicted, "ground_truth": ground_truth, "trusted": trusted is not None,
            "trusted_method": trusted, "best_method": best, **{key: scores.get(key) for key in keys},
            "model_region_share": model_region_share, "failing": failing, "verdict": why}


def read_ground_truth(path: Path = EXPLAIN_GROUND_TRUTH_FILE) -> dict[str, Any] | None:
    """The ground_truth stage's check of every attribute's regions, None when it has not run."""
    return read_yaml(path) if path.is_file() else None


def log_to_training_run(run_id: str, tracking_uri: str, metrics: dict[str, Any]) -> None:
    """Metrics and every output into the run that trained the model (no new run: one lineage)."""
    import mlflow

    from psyface.tracking import metric_values, open_run

    with open_run(run_id, tracking_uri):
        mlflow.log_metrics(metric_values(metrics, "explain"))
        mlflow.set_tags({f"explain.trusted.{name}": verdict["trusted_method"] or "none"
                         for name, verdict in metrics["verdict"].items()})
        mlflow.log_artifacts(str(EXPLAIN_FIGURES_DIR), artifact_path="explain/figures")
        mlflow.log_artifact(str(EXPLAIN_METRICS_FILE), artifact_path="explain")
        mlflow.log_artifact(str(EXPLAIN_MAPS_FILE), artifact_path="explain")


def check_params(params: ExplainParams) -> None:
    unknown = sorted(set(params.max_images) - set(METHODS))
    if unknown:
        raise PsyfaceError(f"params.yaml:explain.max_images names unknown methods {unknown}; known: {list(METHODS)}")
    not_cams = sorted(set(params.options.cam_layers) - set(CAMS))
    if not_cams:
        raise PsyfaceError(f"params.yaml:explain.options.cam_layers names {not_cams}, which are not CAM methods; "
                           f"CAM methods: {list(CAMS)}")
    if not params.methods:
        raise PsyfaceError("params.yaml:explain.methods is empty: name at least one of " + str(list(METHODS)))
    repeated = sorted({method for method in params.methods if params.methods.count(method) > 1})
    if repeated:
        raise PsyfaceError(f"params.yaml:explain.methods names {repeated} more than once")


@entry_point
def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m psyface.explain", description=__doc__.split("\n\n")[0]).parse_args(argv)
    params = load_section("explain", ExplainParams)
    check_params(params)
    from psyface.tracking import load_model, read_run_file

    run = read_run_file()
    net, spec = load_model(run.model_uri, run.tracking_uri)
    test = faces_to_explain(load_dataset(DATA_DIR), load_prepared(PREPARED_DIR), spec.attributes)
    with tempfile.TemporaryDirectory() as staging:
        metrics, raw = explain_test_set(net, spec, test, params, Path(staging), read_ground_truth(), progress=True)
        replace_dir_atomic(EXPLAIN_FIGURES_DIR, lambda folder: shutil.copytree(staging, folder, dirs_exist_ok=True))
    write_atomic(EXPLAIN_MAPS_FILE, lambda tmp: save_npz(tmp, raw))
    write_json_atomic({"explain": metrics}, EXPLAIN_METRICS_FILE)
    log_to_training_run(run.run_id, run.tracking_uri, metrics)
    if "localisation" in metrics:
        print(f"explain: localisation {metrics['localisation']}; faithfulness and sanity checks run")
    summary = ", ".join(f"{name}: {verdict['trusted_method'] or 'none'}" for name, verdict in metrics["verdict"].items())
    print(f"explain: {len(test.ids)} test faces, methods {params.methods} -> {EXPLAIN_FIGURES_DIR}, {EXPLAIN_METRICS_FILE} (trusted: {summary})")
    return 0


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with path.open("wb") as handle:  # a handle: numpy would append ".npz" to a temporary name
        np.savez_compressed(handle, **arrays)


if __name__ == "__main__":
    sys.exit(main())
