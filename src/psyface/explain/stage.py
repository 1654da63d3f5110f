"""Stage `explain`: attribution maps of the trained model on the test split, and how good they are.

Reads the run `train` wrote (`artifacts/train/run.json`), the prepared arrays and `data/` (region and
human-attention mask semantics); writes figures and `reports/explain/metrics.json`, a float16 subset
of the raw maps, and logs all of it into the training run, so lineage stays one click in MLflow.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from psyface.artifacts import (
    EXPLAIN_FIGURES_DIR,
    EXPLAIN_MAPS_FILE,
    EXPLAIN_METRICS_FILE,
    PREPARED_DIR,
    Prepared,
    load_prepared,
)
from psyface.config import NonNegativeInt, PositiveInt, UnitFloat, load_section
from psyface.dataset.layout import DATA_DIR, DatasetSpec, load_dataset
from psyface.errors import PsyfaceError, entry_point
from psyface.explain import figures
from psyface.explain.methods import (
    METHODS,
    Method,
    MethodOptions,
    attribute,
    gradcam_grid,
)
from psyface.explain.scores import (
    area_under_curve,
    defined_mean,
    deletion_curves,
    grid_ceiling,
    mask_share,
    pointing_game,
    random_order,
    randomisation_correlation,
    randomised_copy,
    relevance,
    relevance_mass_accuracy,
)
from psyface.io import replace_dir_atomic, write_atomic, write_json_atomic
from psyface.model import AttributeNet, ModelSpec, to_input

NO_LOCALISATION = ("not available: no region masks for the explained attributes "
                   "(dataset.yaml `masks:` and attributes.*.regions)")


@dataclass(frozen=True)
class ExplainParams:
    """The `explain:` section of params.yaml. A budget of 0 images means the whole test split."""

    methods: list[Method] = field(default_factory=lambda: list(METHODS))
    options: MethodOptions = field(default_factory=lambda: MethodOptions(gradcam_layer="conv3_3"))  # a 16x16 grid at 64 px
    batch_size: PositiveInt = 16
    max_images: dict[str, NonNegativeInt] = field(default_factory=lambda: {"integrated_gradients": 4, "lrp": 16, "occlusion": 4})
    n_top: PositiveInt = 4
    raw_maps_images: NonNegativeInt = 16
    deletion_images: PositiveInt = 4
    deletion_steps: PositiveInt = 8
    sanity_images: PositiveInt = 4
    sanity_threshold: UnitFloat = 0.2
    rma_target: UnitFloat = 0.7
    seed: NonNegativeInt = 0


@dataclass(frozen=True)
class FacesToExplain:
    """The test faces with their per-attribute ground-truth masks (absent: no localisation)."""

    ids: list[str]
    images: np.ndarray  # uint8 (N, S, S, 3)
    region_masks: dict[str, np.ndarray]  # attribute -> bool (N, S, S)
    attention_masks: dict[str, np.ndarray]  # attribute -> bool (N, S, S)
    aligned: bool


def faces_to_explain(dataset: DatasetSpec, prepared: Prepared, attributes: list[str]) -> FacesToExplain:
    """The test rows of the prepared arrays; masks only for attributes with regions to find."""
    rows = prepared.split("test")
    if len(rows) == 0:
        raise PsyfaceError(f"{PREPARED_DIR} holds no test images: check the split fractions")
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
        ids=prepared.table["id"].iloc[rows].tolist(),
        images=np.asarray(prepared.images[rows]),
        region_masks=region_masks,
        attention_masks=attention_masks,
        aligned=dataset.aligned,
    )


def compute_maps(
    net: AttributeNet, images: torch.Tensor, method: Method, options: MethodOptions, batch_size: int, progress: bool = False
) -> torch.Tensor:
    """Maps (N, A, H, W) in batches of `batch_size` images (each batch: all attributes at once)."""
    batches = images.split(batch_size)
    return torch.cat([attribute(net, batch, method, options) for batch in tqdm(batches, desc=f"explain: {method}", disable=not progress)])


def localisation(
    rel: torch.Tensor, masks: dict[str, np.ndarray], attributes: list[str], grid: tuple[int, int] | None = None
) -> dict[str, Any]:
    """Relevance mass accuracy and pointing game per attribute, beside their chance level and, for
    maps computed on a coarse `grid` (Grad-CAM), the best score any map on that grid can reach."""
    scores = {}
    for name, mask in masks.items():
        column = attributes.index(name)
        truth = torch.from_numpy(mask[: len(rel)])
        per_image = {
            "relevance_mass_accuracy": relevance_mass_accuracy(rel[:, column], truth),
            "pointing_game": pointing_game(rel[:, column], truth),
            "chance": mask_share(truth),
            **({"grid_ceiling": grid_ceiling(truth, grid)} if grid else {}),
        }
        scores[name] = {key: defined_mean(values, undefined=None) for key, values in per_image.items()}
        scores[name]["images"] = len(truth)
    return scores


def mean_maps(rel: torch.Tensor) -> np.ndarray:
    """Average over images of each map scaled to a peak of 1: (N, A, H, W) -> (A, H, W)."""
    peaks = rel.flatten(2).amax(2).clamp_min(1e-12)[..., None, None]
    return (rel / peaks).mean(0).numpy()


def quality(
    net: AttributeNet, inputs: torch.Tensor, maps: torch.Tensor, test: FacesToExplain, attributes: list[str],
    params: ExplainParams, method: Method, random_curves: np.ndarray, randomised: nn.Module,
) -> tuple[dict[str, Any], np.ndarray]:
    """Localisation (masks, human attention), deletion vs random order, randomisation sanity check
    against `randomised` (the network with re-initialised weights).

    Returns the scores and the method's mean deletion curve (for the figure).
    """
    rel = relevance(maps)
    result: dict[str, Any] = {}
    grid = None
    if method == "gradcam":
        grid = gradcam_grid(net, inputs, params.options.gradcam_layer)
        result.update(layer=params.options.gradcam_layer, grid=list(grid))
    result["localisation"] = localisation(rel, test.region_masks, attributes, grid)
    if test.attention_masks:
        result["human_attention"] = localisation(rel, test.attention_masks, attributes, grid)
    rmas = [v["relevance_mass_accuracy"] for v in result["localisation"].values() if v["relevance_mass_accuracy"] is not None]
    result["worst_relevance_mass_accuracy"] = min(rmas) if rmas else None

    k = min(len(random_curves), len(maps))
    curves = deletion_curves(net, inputs[:k], rel[:k], params.deletion_steps)
    auc, auc_random = float(area_under_curve(curves).mean()), float(area_under_curve(random_curves[:k]).mean())
    result["deletion"] = {"auc": auc, "auc_random": auc_random, "gain": auc - auc_random, "images": k}

    s = min(params.sanity_images, len(maps))
    random_maps = compute_maps(randomised, inputs[:s], method, params.options, params.batch_size)
    correlation = float(randomisation_correlation(maps[:s], random_maps).mean())
    signed = float(randomisation_correlation(maps[:s], random_maps, signed=True).mean())
    result["randomisation"] = {"rank_correlation": correlation, "passed": correlation < params.sanity_threshold,
                               "rank_correlation_signed": signed, "images": s}
    return result, curves.mean(axis=(0, 1))


def float16_subset(maps: torch.Tensor, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """(maps scaled to a peak |value| of 1 as float16, float32 scales): float16 alone would flush
    the tiny raw values of some methods to zero; map = scaled * scale."""
    kept = maps[:n_images]
    scale = kept.flatten(2).abs().amax(2).clamp_min(1e-30)
    return (kept / scale[..., None, None]).numpy().astype(np.float16), scale.numpy()


def explain_test_set(
    net: AttributeNet, spec: ModelSpec, test: FacesToExplain, params: ExplainParams, figures_dir: Path, progress: bool = False
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Every method's maps, scores and figures for the test faces -> (metrics, raw map subset)."""
    net.eval()
    attributes = spec.attributes
    inputs = to_input(test.images, "cpu", spec.input_mean, spec.input_std).contiguous()
    with torch.no_grad():
        predictions = torch.cat([net(batch) for batch in inputs.split(params.batch_size)]).numpy()
    ratings = spec.to_rating_scale(predictions)
    n_deletion = min(params.deletion_images, len(test.ids))
    order = random_order(torch.Size((n_deletion, len(attributes), *inputs.shape[-2:])), params.seed)
    random_curves = deletion_curves(net, inputs[:n_deletion], order, params.deletion_steps)
    randomised = randomised_copy(net, params.seed)

    metrics: dict[str, Any] = {"aligned": test.aligned, "test_images": len(test.ids)}
    if not test.region_masks:
        metrics["localisation"] = NO_LOCALISATION
    raw: dict[str, np.ndarray] = {"ids": np.array(test.ids[: params.raw_maps_images]), "attributes": np.array(attributes)}
    mean_by_method: dict[str, np.ndarray] = {}
    deletion_by_method: dict[str, np.ndarray] = {}
    for method in params.methods:
        n_images = min(params.max_images.get(method, 0) or len(test.ids), len(test.ids))
        started = time.perf_counter()
        try:
            maps = compute_maps(net, inputs[:n_images], method, params.options, params.batch_size, progress)
        except PsyfaceError as error:  # e.g. Grad-CAM on a transformer, LRP on layers without rules
            print(f"explain: {method} not available for {spec.arch}: {error}")
            metrics[method] = {"available": False, "reason": str(error)}
            continue
        seconds = time.perf_counter() - started
        scores, deletion_by_method[method] = quality(net, inputs, maps, test, attributes, params, method, random_curves,
                                                         randomised)
        metrics[method] = {"images": n_images, "seconds_per_image": seconds / n_images, **scores}
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
    mean_face = test.images.mean(axis=0).astype(np.uint8)
    figures.save_mean_heatmaps(figures_dir / "mean_heatmaps.png", mean_face, mean_by_method, attributes, test.aligned)
    figures.save_deletion_curves(figures_dir / "deletion.png", deletion_by_method, random_curves.mean(axis=(0, 1)))
    metrics["targets"] = targets(metrics, params)
    return metrics, raw


def targets(metrics: dict[str, Any], params: ExplainParams) -> dict[str, bool | None]:
    """The issue's targets, checked: Grad-CAM localisation and randomisation of Grad-CAM and IG."""
    checks: dict[str, bool | None] = {}
    metrics = {method: values for method, values in metrics.items() if not (isinstance(values, dict) and values.get("available") is False)}
    if "gradcam" in metrics:
        worst = metrics["gradcam"]["worst_relevance_mass_accuracy"]
        checks["gradcam_relevance_mass_accuracy"] = None if worst is None else worst >= params.rma_target
    for method in ("gradcam", "integrated_gradients"):
        if method in metrics:
            checks[f"{method}_randomisation"] = metrics[method]["randomisation"]["passed"]
    return checks


def log_to_training_run(run_id: str, tracking_uri: str, metrics: dict[str, Any]) -> None:
    """Metrics and every output into the run that trained the model (no new run: one lineage)."""
    import mlflow

    from psyface.tracking import metric_values, open_run

    with open_run(run_id, tracking_uri):
        mlflow.log_metrics(metric_values(metrics, "explain"))
        mlflow.log_artifacts(str(EXPLAIN_FIGURES_DIR), artifact_path="explain/figures")
        mlflow.log_artifact(str(EXPLAIN_METRICS_FILE), artifact_path="explain")
        mlflow.log_artifact(str(EXPLAIN_MAPS_FILE), artifact_path="explain")


def check_params(params: ExplainParams) -> None:
    unknown = sorted(set(params.max_images) - set(METHODS))
    if unknown:
        raise PsyfaceError(f"params.yaml:explain.max_images names unknown methods {unknown}; known: {list(METHODS)}")
    if not params.methods:
        raise PsyfaceError("params.yaml:explain.methods is empty: name at least one of " + str(list(METHODS)))
    if params.deletion_steps < 1 or params.batch_size < 1:
        raise PsyfaceError("params.yaml:explain.deletion_steps and batch_size must be at least 1")


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
        metrics, raw = explain_test_set(net, spec, test, params, Path(staging), progress=True)
        replace_dir_atomic(EXPLAIN_FIGURES_DIR, lambda folder: shutil.copytree(staging, folder, dirs_exist_ok=True))
    write_atomic(EXPLAIN_MAPS_FILE, lambda tmp: save_npz(tmp, raw))
    write_json_atomic({"explain": metrics}, EXPLAIN_METRICS_FILE)
    log_to_training_run(run.run_id, run.tracking_uri, metrics)
    if "localisation" in metrics:
        print(f"explain: localisation {metrics['localisation']}; faithfulness and sanity checks run")
    summary = ", ".join(f"{k}={v}" for k, v in metrics["targets"].items())
    print(f"explain: {len(test.ids)} test faces, methods {params.methods} -> {EXPLAIN_FIGURES_DIR}, {EXPLAIN_METRICS_FILE} ({summary})")
    return 0


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with path.open("wb") as handle:  # a handle: numpy would append ".npz" to a temporary name
        np.savez_compressed(handle, **arrays)


if __name__ == "__main__":
    sys.exit(main())
