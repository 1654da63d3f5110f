"""Stage `ground_truth`: is each attribute's region mask the whole truth about where it is?

An explanation is scored by how much of its relevance falls inside the attribute's masks, which is
only fair when no pixel outside the masks carries information about the rating. This stage checks
that on the data itself, with no trained model: a fixed random-feature probe (random convolution
filters, ReLU, average pooling, then scikit-learn's `RidgeCV`) predicts every face out of fold
(identity-grouped k-fold over all faces, so a rating that belongs to a person is never learnt from
that person's other photos), twice per attribute, scored as Pearson r with a 95 % identity-grouped
bootstrap interval:

- **outside**: every face with its mask region replaced by the mean face. Valid masks leave nothing
  to learn: |r| < `max_outside_r`.
- **inside**: only the mask region kept (the rest is the mean face). The probe must find the
  attribute there: r > `min_inside_r`, else "no information outside" only means a weak probe.

Ratings that depend on a sensitive feature whatever the face shows (`rating_biases` in dataset.yaml,
e.g. the synthetic raters' bias against group B) are visible through that feature's cues, which lie
everywhere (skin tone); the check then also reports both numbers with the bias features partialled
out of the ratings, and judges validity on those. An attribute without regions (the `control`) is
probed on the whole face: a valid control has |r| < `max_outside_r` there.

The random-feature probe is hand-written because no library offers a fixed, model-free image feature
map: it is a few lines of torch, deterministic from `seed`, and the same for every dataset.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import RidgeCV
from tqdm import tqdm

from psyface.artifacts import EXPLAIN_GROUND_TRUTH_FILE, PREPARED_DIR, Prepared, load_prepared
from psyface.config import Bound, NonNegativeInt, PositiveFloat, PositiveInt, UnitFloat, load_section
from psyface.dataset.layout import DATA_DIR, DatasetSpec, load_dataset
from psyface.errors import entry_point
from psyface.io import write_json_atomic
from psyface.metrics import pearson_columns
from psyface.resampling import face_groups, grouped_bootstrap_r, grouped_folds

NO_MASKS = "not available: the dataset declares no region masks (dataset.yaml `masks:`), so there is nothing to check"


@dataclass(frozen=True)
class ProbeFeatures:
    """The fixed random-feature map: `channels` random `kernel` x `kernel` filters, ReLU, then the
    mean over `pool` x `pool` cells (a coarse spatial code the ridge reads)."""

    channels: PositiveInt = 32
    kernel: PositiveInt = 5
    pool: PositiveInt = 8


@dataclass(frozen=True)
class GroundTruthParams:
    """The `ground_truth:` section of params.yaml."""

    features: ProbeFeatures = field(default_factory=ProbeFeatures)
    alphas: list[PositiveFloat] = field(default_factory=lambda: [1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0])
    folds: Annotated[int, Bound(2)] = 5
    max_outside_r: UnitFloat = 0.1
    min_inside_r: UnitFloat = 0.8
    n_boot: PositiveInt = 1000
    batch_size: PositiveInt = 256
    seed: NonNegativeInt = 0


def random_feature_map(features: ProbeFeatures, seed: int) -> torch.nn.Module:
    """Random unit-norm filters with small random biases, fixed by `seed`: a model-free feature map."""
    generator = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(3, features.channels, features.kernel, padding=features.kernel // 2)
    with torch.no_grad():
        weight = torch.randn(conv.weight.shape, generator=generator)
        conv.weight.copy_(weight / weight.flatten(1).norm(dim=1)[:, None, None, None])
        conv.bias.copy_(0.1 * torch.randn(conv.bias.shape, generator=generator))
    return torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.AvgPool2d(features.pool), torch.nn.Flatten(1)).eval()


def probe_features(images: np.ndarray, feature_map: torch.nn.Module, batch_size: int) -> np.ndarray:
    """(N, S, S, 3) float images in [0, 1] -> (N, F) features, centred on mid-grey as the filters are."""
    inputs = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2) - 0.5
    with torch.no_grad():
        return torch.cat([feature_map(batch) for batch in inputs.split(batch_size)]).numpy()


def out_of_fold(features: np.ndarray, ratings: np.ndarray, folds: np.ndarray, alphas: list[float]
                ) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, ratings), both centred within each fold: each face predicted by a ridge probe
    fitted on the other folds (penalty by RidgeCV's efficient leave-one-out within them).

    Centring per fold matters for a null result: a fold whose ratings run high leaves a training
    mean that runs low, so pooled out-of-fold predictions of pure noise correlate *negatively* with
    the ratings (about -.05 to -.1 here), which would eat into the `max_outside_r` margin."""
    predicted, centred = np.empty(len(ratings)), np.empty(len(ratings))
    for fold in np.unique(folds):
        fit, held = folds != fold, folds == fold
        mean, std = features[fit].mean(0), features[fit].std(0) + 1e-6
        ridge = RidgeCV(alphas=alphas).fit((features[fit] - mean) / std, ratings[fit])
        predicted[held] = ridge.predict((features[held] - mean) / std)
        predicted[held] -= predicted[held].mean()
        centred[held] = ratings[held] - ratings[held].mean()
    return predicted, centred


def without_biases(ratings: np.ndarray, table: pd.DataFrame, biases: list[str]) -> np.ndarray:
    """Ratings minus their mean in each group of the bias features: what the face has to explain."""
    return ratings - pd.Series(ratings).groupby([table[b].astype(str).to_numpy() for b in biases]).transform("mean").to_numpy()


def check_ground_truth(spec: DatasetSpec, prepared: Prepared, params: GroundTruthParams,
                       progress: bool = False) -> dict[str, Any]:
    """Outside / inside probe r and the verdict for every attribute of `spec` (see the module doc)."""
    if prepared.masks is None or spec.masks is None:
        return {"available": False, "reason": NO_MASKS}
    groups = face_groups(prepared.table, spec.identity_column)
    folds = grouped_folds(groups, params.folds, params.seed)
    images = prepared.images.astype(np.float32) / 255.0
    mean_face = images.mean(axis=0)
    feature_map = random_feature_map(params.features, params.seed)
    attributes: dict[str, Any] = {}
    for name, attribute in tqdm(spec.attributes.items(), desc="ground truth: probes", unit="attribute", disable=not progress):
        ratings = prepared.table[name].to_numpy(dtype=np.float64)
        targets = {"rating": ratings}
        if attribute.rating_biases:
            targets["without_biases"] = without_biases(ratings, prepared.table, attribute.rating_biases)
        # No regions: the whole face is "outside" (nothing may be learnt) and nothing is inside.
        mask = (spec.attribute_mask(prepared.masks, name) if attribute.regions
                else np.zeros(images.shape[:3], dtype=bool))[..., None]
        outside = probe_features(np.where(mask, mean_face, images), feature_map, params.batch_size)
        inside = probe_features(np.where(mask, images, mean_face), feature_map, params.batch_size) if attribute.regions else None
        entry: dict[str, Any] = {"regions": list(attribute.regions), "mask_share": float(mask.mean())}
        for key, y in targets.items():
            suffix = "" if key == "rating" else "_without_biases"
            for side, features in (("outside", outside), ("inside", inside)):
                if features is None:
                    entry[f"{side}_r{suffix}"] = None
                    continue
                predicted, rated = out_of_fold(features, y, folds, params.alphas)
                low, high, _, _ = grouped_bootstrap_r(predicted[:, None], rated[:, None], groups, params.n_boot, seed=params.seed)
                entry[f"{side}_r{suffix}"] = float(pearson_columns(predicted, rated)[0])
                entry[f"{side}_r{suffix}_ci"] = [float(low[0]), float(high[0])]
        if attribute.rating_biases:
            entry["rating_biases"] = list(attribute.rating_biases)
        entry["valid"], entry["reason"] = verdict(entry, "_without_biases" if attribute.rating_biases else "", params)
        attributes[name] = entry
    return {"available": True, "faces": len(groups), "identities": int(len(np.unique(groups))), "folds": params.folds,
            "max_outside_r": params.max_outside_r, "min_inside_r": params.min_inside_r, "attributes": attributes}


def verdict(entry: dict[str, Any], judged: str, params: GroundTruthParams) -> tuple[bool, str]:
    """(valid, why in one line): are an attribute's masks the whole truth about where it is?"""
    outside, inside = entry[f"outside_r{judged}"], entry[f"inside_r{judged}"]
    problems = []
    if abs(outside) >= params.max_outside_r:
        where = "outside the masks" if entry["regions"] else "of the face (it has no regions)"
        problems.append(f"pixels {where} predict it (r = {outside:.2f}): the masks miss information")
    if inside is not None and inside <= params.min_inside_r:
        problems.append(f"the masked region alone predicts it weakly (r = {inside:.2f} <= {params.min_inside_r})")
    if problems:
        return False, "; ".join(problems)
    bias = " once the rating biases are partialled out" if judged else ""
    found = "no facial signal anywhere" if inside is None else f"inside r = {inside:.2f}"
    return True, f"valid{bias}: outside r = {outside:.2f}, {found}"


@entry_point
def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m psyface.ground_truth", description=__doc__.split("\n\n")[0]).parse_args(argv)
    params = load_section("ground_truth", GroundTruthParams)
    result = check_ground_truth(load_dataset(DATA_DIR), load_prepared(PREPARED_DIR), params, progress=True)
    write_json_atomic(result, EXPLAIN_GROUND_TRUTH_FILE)
    if not result["available"]:
        print(f"ground truth: {result['reason']}")
    for name, entry in result.get("attributes", {}).items():
        print(f"ground truth: {name}: {'valid' if entry['valid'] else 'NOT VALID'} ({entry['reason']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
