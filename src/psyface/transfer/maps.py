"""What transfers: LRP and Grad-CAM mean heatmaps of the base models and of the networks trained from
them, side by side, with localisation scores against the synthetic data's ground-truth regions; and
binary vs multi-class heads for one attribute (Arbabzadah et al.: "multi-class is more feature-rich").

`psyface transfer maps` (after the base models exist) trains one cell per initialisation at the
smallest training fraction and first seed (where transfer matters most), explains the first test
faces with the explain stage's methods and scores, and writes `reports/transfer/heatmaps_{lrp,gradcam}.png`,
`localisation.csv` and `maps.json`; then the two heads of `transfer.head_attribute` -> `heads.csv`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from psyface.artifacts import PREPARED_DIR, load_prepared
from psyface.dataset.layout import DATA_DIR, DatasetSpec, load_dataset
from psyface.errors import PsyfaceError
from psyface.explain.figures import overlay, save_mosaic
from psyface.explain.methods import attribute
from psyface.explain.scores import (
    defined_mean,
    mask_share,
    relevance,
    relevance_mass_accuracy,
)
from psyface.io import write_csv_atomic, write_json_atomic
from psyface.model import AttributeNet, build_model, predict_standardised, to_input
from psyface.training import Data, split_data
from psyface.transfer.core import (
    CLASSIFICATION,
    REPORT_DIR,
    SCRATCH,
    TransferParams,
    accuracy,
    cell_recipe,
    downsampled,
    fit,
    nested_subsets,
    run_cell,
    sweep_targets,
)

MAP_METHODS = ("lrp", "gradcam")


def mean_relevance(net: torch.nn.Module, images: np.ndarray, method: str, batch_size: int = 32) -> np.ndarray:
    """Per-image |relevance| maps (N, A, H, W), each scaled to sum 1 so every face weighs the same."""
    parts = []
    for start in range(0, len(images), batch_size):
        maps = relevance(attribute(net, to_input(images[start : start + batch_size]), method))  # type: ignore[arg-type]
        parts.append(maps / maps.flatten(2).sum(2).clamp_min(1e-12)[..., None, None])
    return torch.cat(parts).numpy()


def downsampled_masks(bitfields: np.ndarray, size: int) -> np.ndarray:
    """Region bitfields resized with nearest neighbour (bits must not be blended)."""
    if bitfields.shape[1] == size:
        return np.asarray(bitfields)
    small = F.interpolate(torch.as_tensor(np.asarray(bitfields)).float()[:, None], size=(size, size), mode="nearest")
    return small[:, 0].to(torch.uint8).numpy()


def localisation(maps: np.ndarray, bitfields: np.ndarray, dataset: DatasetSpec, attributes: list[str]) -> dict[str, dict[str, float]]:
    """Relevance mass accuracy (share of relevance inside the attribute's regions) and its chance level
    (the regions' share of the image) per attribute with regions; maps (N, A, H, W)."""
    scores = {}
    for index, name in enumerate(attributes):
        if not dataset.attributes[name].regions:
            continue
        masks = torch.as_tensor(dataset.attribute_mask(bitfields, name))
        rma = relevance_mass_accuracy(torch.as_tensor(maps[:, index]), masks)
        scores[name] = {"relevance_mass": defined_mean(rma), "chance": defined_mean(mask_share(masks))}
    return scores


def spread(maps: np.ndarray) -> float:
    """Entropy (bits) of the mean normalised relevance map: how many pixels the evidence spreads over."""
    mean = maps.mean(axis=(0, 1)).ravel()
    mean = mean[mean > 0] / mean.sum()
    return float(-(mean * np.log2(mean)).sum())


def run_maps(params: TransferParams, max_images: int = 64) -> pd.DataFrame:
    """Base champions and one cell per init (smallest fraction, first seed): mean maps and scores."""
    from psyface import tracking

    torch.use_deterministic_algorithms(not torch.cuda.is_available())
    prepared, dataset = load_prepared(PREPARED_DIR), load_dataset(DATA_DIR)
    attributes = sweep_targets(dataset, params)
    images = downsampled(prepared.images, params.image_size)
    data, _, _ = split_data(images, prepared.table, attributes)
    test = prepared.split("test")[:max_images]
    faces = images[test]
    bitfields = downsampled_masks(prepared.masks[test], images.shape[1]) if prepared.masks is not None else None
    fraction, seed = min(params.fractions), params.seeds[0]
    subset = nested_subsets(len(data["train"].images), params.fractions, seed)[fraction]
    tracking.use_tracking()
    models: dict[str, tuple[torch.nn.Module, list[str]]] = {}
    for base in params.bases:
        net, spec = tracking.load_model(f"models:/{params.base_prefix}{base}@{tracking.CHAMPION}")
        models[f"base {base}"] = (net, spec.attributes)
    for init in [SCRATCH, *params.bases]:
        uri = SCRATCH if init == SCRATCH else f"models:/{params.base_prefix}{init}@{tracking.CHAMPION}"
        _, _, _, net = run_cell(data, subset, cell_recipe(params, uri, seed, len(subset)), attributes)
        models[f"{init} -> attributes @{fraction:g}"] = (net, attributes)
    rows, tiles = [], {method: [] for method in MAP_METHODS}
    mean_face = faces.astype(np.float64).mean(0).astype(np.uint8)
    for label, (net, outputs) in models.items():
        net = net.cpu().eval()
        assert isinstance(net, AttributeNet)
        for method in MAP_METHODS:
            maps = mean_relevance(net, faces, method)
            per_attribute = [overlay(mean_face, maps[:, k].mean(0)) for k in range(len(outputs))] if outputs == attributes else []
            tiles[method].append([overlay(mean_face, maps.mean(axis=(0, 1))), *per_attribute])
            row = {"model": label, "method": method, "entropy_bits": spread(maps)}
            if bitfields is not None and outputs == attributes:
                scores = localisation(maps, bitfields, dataset, attributes)
                row |= {f"rma_{name}": s["relevance_mass"] for name, s in scores.items()}
                row["rma_mean"] = float(np.mean([s["relevance_mass"] for s in scores.values()]))
                row["rma_chance"] = float(np.mean([s["chance"] for s in scores.values()]))
            rows.append(row)
    table = pd.DataFrame(rows)
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    for method, method_tiles in tiles.items():
        width = max(map(len, method_tiles))
        padded = [row + [np.full_like(row[0], 255)] * (width - len(row)) for row in method_tiles]
        save_mosaic(REPORT_DIR / f"heatmaps_{method}.png", padded, list(models), ["mean", *attributes][:width],
                    f"{method}: mean |relevance| over {len(faces)} test faces (base models: all outputs)")
    write_csv_atomic(table, REPORT_DIR / "localisation.csv")
    write_json_atomic({"transfer_maps": {"fraction": fraction, "seed": seed, "n_images": len(faces),
                                         "rows": table.to_dict(orient="records")}}, REPORT_DIR / "maps.json")
    return table


def binned(values: np.ndarray, train_rows: np.ndarray, n_classes: int) -> np.ndarray:
    """Class index per row from the train split's quantiles (2 classes: below/above the median)."""
    edges = np.quantile(values[train_rows], np.linspace(0, 1, n_classes + 1)[1:-1])
    return np.searchsorted(edges, values, side="right")


def upper_half_accuracy(logits: np.ndarray, classes: np.ndarray, n_classes: int) -> float:
    """Binary accuracy of a k-class head collapsed at the median: P(upper half of bins) > 0.5 vs truth."""
    probabilities = torch.softmax(torch.as_tensor(logits), dim=1).numpy()
    upper = probabilities[:, n_classes // 2 :].sum(1) > 0.5
    return float((upper == (classes >= n_classes // 2)).mean())


def run_heads(params: TransferParams, max_images: int = 64) -> pd.DataFrame:
    """Binary (median split) vs `params.head_classes`-class heads for `params.head_attribute`:
    accuracy, accuracy collapsed to the binary question, and LRP richness (entropy, relevance mass
    in the attribute's regions)."""
    torch.use_deterministic_algorithms(not torch.cuda.is_available())
    prepared, dataset = load_prepared(PREPARED_DIR), load_dataset(DATA_DIR)
    name = params.head_attribute
    if name not in dataset.attributes:
        raise PsyfaceError(f"transfer.head_attribute {name!r} is not an attribute of {dataset.name!r}")
    images = downsampled(prepared.images, params.image_size)
    values = prepared.table[name].to_numpy(np.float64)
    test = prepared.split("test")
    bitfields = downsampled_masks(prepared.masks[test[:max_images]], images.shape[1]) if prepared.masks is not None else None
    recipe = dataclasses.replace(params.train, epochs=params.base_epochs, init=SCRATCH, freeze=0)
    rows = []
    for n_classes in (2, params.head_classes):
        classes = binned(values, prepared.split("train"), n_classes)
        data = {split: Data(images[prepared.split(split)], classes[prepared.split(split)][:, None].astype(np.float32))
                for split in ("train", "val", "test")}
        torch.manual_seed(recipe.seed)
        net = build_model(recipe.arch, recipe.head, n_classes, recipe.last_conv_stride)
        fit(net, data["train"], data["val"], recipe, CLASSIFICATION, label=f"{name} {n_classes} classes ")
        net = net.cpu().eval()
        logits = predict_standardised(net, data["test"].images, 64, torch.device("cpu"), autocast=False)
        maps = mean_relevance(net, images[test[:max_images]], "lrp")
        row = {"attribute": name, "n_classes": n_classes, "accuracy": float(accuracy(logits, data["test"].targets)[0]),
               "chance": float(np.bincount(classes[test]).max() / len(test)),
               "binary_accuracy": upper_half_accuracy(logits, classes[test], n_classes),
               "lrp_entropy_bits": spread(maps)}
        if bitfields is not None and dataset.attributes[name].regions:
            masks = torch.as_tensor(dataset.attribute_mask(bitfields, name))
            row["lrp_relevance_mass"] = defined_mean(relevance_mass_accuracy(torch.as_tensor(maps.mean(1)), masks))
            row["mask_share"] = defined_mean(mask_share(masks))
        rows.append(row)
    table = pd.DataFrame(rows)
    write_csv_atomic(table, REPORT_DIR / "heads.csv")
    return table
