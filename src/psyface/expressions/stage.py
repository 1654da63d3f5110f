"""Stage `expressions`: per-expression classifiers, IG landmark ranking, iterative reduction.

Reads `artifacts/landmarks/normalised.npz` and dataset.yaml's landmark regions; writes
`reports/landmarks/` (metrics.json, curves/*.csv for `dvc plots`, ranking.csv, figures,
summary.json for the report) and one MLflow run with a nested run per expression, registering the
full and the reduced model as two versions of one registered model (aliases `full`, `reduced`).
"""

from __future__ import annotations

import argparse
import json
import pickle
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch

import psyface
from psyface import tracking
from psyface.artifacts import (
    NORMALISED_LANDMARKS_FILE,
    NOT_AVAILABLE,
    SPLITS,
    NormalisedLandmarks,
    missing_landmarks,
    write_placeholder_png,
)
from psyface.config import NonNegativeFloat, NonNegativeInt, PositiveInt, load_section
from psyface.dataset.layout import DATA_DIR, load_dataset
from psyface.errors import PsyfaceError, entry_point
from psyface.expressions.classifier import (
    TrainingParams,
    binary_scores,
    predict_proba,
    seconds_per_face,
    train_classifier,
)
from psyface.expressions.figures import plot_curves, plot_kept_landmarks
from psyface.expressions.reduction import (
    ExpressionResult,
    Fitted,
    choose_step,
    count_steps,
    reduce_landmarks,
)
from psyface.expressions.relevance import Baseline, baselines_for, landmark_relevance
from psyface.expressions.served import (
    ExpressionClassifier,
    LandmarkExpressionModel,
    feature_columns,
)
from psyface.parallel import process_map, usable_cores
from psyface.io import (
    replace_dir_atomic,
    write_atomic,
    write_csv_atomic,
    write_json_atomic,
)
from psyface.shapes import coordinate_columns, flatten

REPORT_DIR = Path("reports/landmarks")


@dataclass(frozen=True)
class ExpressionsParams:
    """params.yaml `expressions:`. `regions` maps each expression to the dataset.yaml landmark
    regions that express it (the ground truth the kept landmarks are scored against)."""

    seed: NonNegativeInt = 0
    training: TrainingParams = field(default_factory=TrainingParams)
    baseline: Baseline = "other_class"
    ig_steps: PositiveInt = 32
    ig_split: Literal["val", "test"] = "test"
    drop_per_step: PositiveInt = 2
    min_landmarks: PositiveInt = 4
    tolerance: NonNegativeFloat = 0.01  # reduced set: fewest landmarks with val log loss <= full + tolerance (nats)
    regions: dict[str, list[str]] = field(default_factory=lambda: {
        "neutral": ["mouth", "brows", "eyes"], "happy": ["mouth"], "sad": ["mouth", "brows"],
        "surprised": ["mouth", "brows", "eyes"], "angry": ["brows", "mouth"]})
    experiment: str = "psyface-landmarks"
    registered_model: str = "psyface-landmark-expressions"


@dataclass(frozen=True)
class SplitData:
    """Flattened normalised coordinates and labels per split."""

    features: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]

    @classmethod
    def from_landmarks(cls, data: NormalisedLandmarks) -> SplitData:
        features = flatten(data.points.astype(np.float64))
        missing = [s for s in SPLITS if not (data.split == s).any()]
        if missing:
            raise PsyfaceError(f"{NORMALISED_LANDMARKS_FILE}: no faces in split(s) {missing}")
        return cls(
            {s: features[data.split == s] for s in SPLITS}, {s: data.labels[data.split == s] for s in SPLITS}
        )


# ---------------------------------------------------------------------------------------------
# Pure core.


def fitter(
    data: SplitData, positive: str, classes: list[str], params: ExpressionsParams
) -> Callable[[np.ndarray], Fitted]:
    """`fit(kept)` for the reduction loop: train on the kept landmarks, score, rank by IG."""
    for split in ("train", params.ig_split):
        if not (data.labels[split] == positive).any():
            raise PsyfaceError(f"no {positive!r} face in the {split} split: cannot train or explain it")

    def fit(kept: np.ndarray) -> Fitted:
        columns = feature_columns(kept)
        x = {s: data.features[s][:, columns] for s in SPLITS}
        y = {s: data.labels[s] == positive for s in SPLITS}
        model = train_classifier(x["train"], y["train"], params.training, params.seed)
        scores = {
            f"{s}_{name}": value
            for s in ("val", "test")
            for name, value in binary_scores(y[s], predict_proba(model, x[s])).items()
        }
        scores["us_per_face"] = 1e6 * seconds_per_face(model, x["test"])
        baselines = baselines_for(params.baseline, x["train"], data.labels["train"], positive, classes)
        explained = x[params.ig_split][y[params.ig_split]]
        relevance = landmark_relevance(model, explained, baselines, params.ig_steps)
        return Fitted(scores, relevance, model)

    return fit


def reduce_expression(splits: SplitData, expression: str, classes: list[str], params: ExpressionsParams,
                      n_points: int) -> bytes:
    """One expression's whole reduction path, pickled: the expressions are independent, so the stage
    runs them on separate cores. Plain pickle bytes, not torch's shared-memory tensor passing, which
    would hold a file descriptor open per returned tensor. One thread each: for these tiny MLPs
    thread hand-offs cost more than they save."""
    torch.set_num_threads(1)
    steps = reduce_landmarks(n_points, fitter(splits, expression, classes, params), params.drop_per_step,
                             params.min_landmarks)
    return pickle.dumps(ExpressionResult(expression, steps, choose_step(steps, "val_log_loss", params.tolerance)))


def region_share(kept: np.ndarray, regions: list[str], landmark_regions: dict[str, list[int]]) -> float:
    """Share of `kept` landmarks that lie in any of `regions`."""
    inside = {index for region in regions for index in landmark_regions[region]}
    return float(np.mean([int(k) in inside for k in kept])) if len(kept) else 0.0


def region_of(landmark_regions: dict[str, list[int]], n_points: int) -> list[str]:
    names = [""] * n_points
    for region, indices in landmark_regions.items():
        for index in indices:
            names[index] = region
    return names


def curve_table(result: ExpressionResult) -> pd.DataFrame:
    rows = [{"n_landmarks": step.n_landmarks, **step.fitted.scores} for step in result.steps]
    return pd.DataFrame(rows).assign(chosen=[i == result.chosen for i in range(len(result.steps))])


def ranking_table(results: list[ExpressionResult], regions: list[str]) -> pd.DataFrame:
    """Dataset-level IG ranking of the full (all-landmark) model, per expression."""
    rows = []
    for result in results:
        relevance = result.full.fitted.relevance
        for rank, landmark in enumerate(np.argsort(-relevance, kind="stable"), start=1):
            rows.append({"expression": result.expression, "rank": rank, "landmark": int(landmark),
                         "region": regions[landmark], "relevance": float(relevance[landmark])})
    return pd.DataFrame(rows)


def metrics(
    results: list[ExpressionResult], params: ExpressionsParams, landmark_regions: dict[str, list[int]]
) -> dict:
    """reports/landmarks/metrics.json: stable keys, nested by expression then full/reduced."""
    per_expression = {}
    for result in results:
        n_points = result.full.n_landmarks
        top = np.argsort(-result.full.fitted.relevance, kind="stable")[: result.reduced.n_landmarks]
        regions = params.regions[result.expression]
        per_expression[result.expression] = {
            "full": {"n_landmarks": n_points, **result.full.fitted.scores},
            "reduced": {
                "n_landmarks": result.reduced.n_landmarks,
                "landmark_fraction": result.reduced.n_landmarks / n_points,
                "region_share": region_share(result.reduced.kept, regions, landmark_regions),
                "full_ranking_top_region_share": region_share(top, regions, landmark_regions),
                "speedup": result.full.fitted.scores["us_per_face"] / result.reduced.fitted.scores["us_per_face"],
                **result.reduced.fitted.scores,
            },
        }
    values = per_expression.values()
    return {
        "expressions": {
            **per_expression,
            "summary": {
                "min_full_test_accuracy": min(v["full"]["test_accuracy"] for v in values),
                "max_test_accuracy_drop": max(
                    v["full"]["test_accuracy"] - v["reduced"]["test_accuracy"] for v in values
                ),
                "max_landmark_fraction": max(v["reduced"]["landmark_fraction"] for v in values),
                "mean_region_share": float(np.mean([v["reduced"]["region_share"] for v in values])),
            },
        }
    }


def served_model(
    results: list[ExpressionResult], data: NormalisedLandmarks, variant: Literal["full", "reduced"]
) -> LandmarkExpressionModel:
    return LandmarkExpressionModel(
        data.reference,
        data.anchors,
        {
            r.expression: ExpressionClassifier(getattr(r, variant).fitted.model, getattr(r, variant).kept)
            for r in results
        },
    )


def check_regions(params: ExpressionsParams, classes: list[str], landmark_regions: dict[str, list[int]]) -> None:
    missing = [c for c in classes if c not in params.regions]
    if missing:
        raise PsyfaceError(f"params.yaml:expressions.regions lacks expression(s) {missing}")
    unknown = sorted({r for rs in params.regions.values() for r in rs} - set(landmark_regions))
    if unknown:
        raise PsyfaceError(
            f"params.yaml:expressions.regions names {unknown}, not in dataset.yaml landmarks.regions "
            f"{sorted(landmark_regions)}"
        )


# ---------------------------------------------------------------------------------------------
# Edges: files and MLflow.


def write_reports(
    results: list[ExpressionResult],
    data: NormalisedLandmarks,
    params: ExpressionsParams,
    landmark_regions: dict[str, list[int]],
) -> dict:
    """Everything under reports/landmarks/; returns the metrics written."""

    def write_curves(folder: Path) -> None:
        for result in results:
            curve_table(result).to_csv(folder / f"{result.expression}.csv", index=False)

    names = region_of(landmark_regions, data.points.shape[1])
    replace_dir_atomic(REPORT_DIR / "curves", write_curves)
    write_csv_atomic(ranking_table(results, names), REPORT_DIR / "ranking.csv")
    values = metrics(results, params, landmark_regions)
    write_json_atomic(values, REPORT_DIR / "metrics.json")
    curves_png, kept_png = REPORT_DIR / "accuracy_vs_landmarks.png", REPORT_DIR / "kept_landmarks.png"
    write_atomic(curves_png, lambda tmp: plot_curves(results, tmp))
    write_atomic(kept_png, lambda tmp: plot_kept_landmarks(results, data, tmp))
    kept = {
        r.expression: [{"landmark": int(k), "region": names[k], "relevance": float(v)}
                       for k, v in zip(r.reduced.kept, r.reduced.fitted.relevance, strict=True)]
        for r in results
    }
    timing = [
        {"expression": r.expression, "landmarks_full": r.full.n_landmarks, "landmarks_reduced": r.reduced.n_landmarks,
         "us_per_face_full": r.full.fitted.scores["us_per_face"],
         "us_per_face_reduced": r.reduced.fitted.scores["us_per_face"]}
        for r in results
    ]
    summary = {
        "title": "Landmark-based expression classifiers (Di Luzio et al.)",
        "figures": [
            {"path": curves_png.name, "caption": "Test accuracy and inference time vs number of landmarks; "
                                                 "circles mark the chosen reduced set"},
            {"path": kept_png.name, "caption": "Kept landmarks (coloured, size = IG relevance) on the mean "
                                               "normalised face of each expression"},
        ],
        "timing": timing,
        "kept_landmarks": kept,
        "metrics": "metrics.json",
    }
    write_json_atomic(summary, REPORT_DIR / "summary.json")
    return values


def track(
    results: list[ExpressionResult], data: NormalisedLandmarks, params: ExpressionsParams, values: dict
) -> dict:
    """One parent run (params, summary metrics, reports, two pyfunc models registered as versions of
    `registered_model` with aliases full/reduced) and a nested run per expression (its curve)."""
    import mlflow
    from mlflow import MlflowClient

    tracking.use_tracking()
    tracking.ensure_experiment(params.experiment)
    flat_params = pd.json_normalize(asdict(params), sep=".").iloc[0].to_dict()
    with mlflow.start_run(run_name="expressions") as parent:
        mlflow.log_params({k: str(v) for k, v in flat_params.items()})
        mlflow.log_metrics(values["expressions"]["summary"])
        for result in results:
            with mlflow.start_run(run_name=result.expression, nested=True):
                mlflow.log_params({"expression": result.expression, "regions": params.regions[result.expression]})
                for index, step in enumerate(result.steps):
                    mlflow.log_metrics({"n_landmarks": step.n_landmarks, **step.fitted.scores}, step=index)
                reduced = values["expressions"][result.expression]["reduced"]
                mlflow.log_metrics({f"reduced_{k}": v for k, v in reduced.items()})
                mlflow.log_dict({"kept": result.reduced.kept.tolist()}, "kept_landmarks.json")
        mlflow.log_artifacts(str(REPORT_DIR), artifact_path="reports")
        # Any shape is a valid input (normalisation is idempotent), so normalised faces serve as example.
        example = pd.DataFrame(flatten(data.points[:3].astype(np.float64)), columns=coordinate_columns(data.points.shape[1]))
        # Declared, not inferred: inference re-imports the model in a subprocess (slow) to guess them.
        requirements = [f"{name}=={version(name)}" for name in ("mlflow", "torch", "numpy", "pandas", "scikit-learn")]
        client = MlflowClient()
        versions = {}
        for variant in ("full", "reduced"):
            info = mlflow.pyfunc.log_model(
                name=f"{variant}_model",
                python_model=served_model(results, data, variant),
                input_example=example,
                code_paths=[str(Path(psyface.__file__).parent)],
                pip_requirements=requirements,
                registered_model_name=params.registered_model,
            )
            versions[variant] = str(info.registered_model_version)
            client.set_registered_model_alias(params.registered_model, variant, versions[variant])
    return {"run_id": parent.info.run_id, "registered_model": params.registered_model, "versions": versions}


def write_not_available(reason: str) -> None:
    """The outputs dvc.yaml declares, each saying the stage could not run and why."""
    note = {"status": NOT_AVAILABLE, "reason": reason}
    replace_dir_atomic(REPORT_DIR / "curves",
                       lambda folder: pd.DataFrame(columns=["n_landmarks", "test_accuracy"]).to_csv(
                           folder / "not_available.csv", index=False))
    write_csv_atomic(pd.DataFrame([note]), REPORT_DIR / "ranking.csv")
    write_json_atomic({"title": "Landmark-based expression classifiers (Di Luzio et al.)", **note},
                      REPORT_DIR / "summary.json")
    write_json_atomic({"expressions": note}, REPORT_DIR / "metrics.json")
    for name in ("accuracy_vs_landmarks.png", "kept_landmarks.png"):
        write_placeholder_png(REPORT_DIR / name, reason)


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="psyface expressions", description=__doc__.splitlines()[0])
    parser.add_argument("--no-tracking", action="store_true", help="skip MLflow (reports only)")
    args = parser.parse_args(argv)
    params = load_section("expressions", ExpressionsParams)
    spec = load_dataset(DATA_DIR)
    reason = missing_landmarks(spec)
    if reason:
        write_not_available(reason)
        print(f"expressions: skipped, {reason}; {REPORT_DIR}/ says '{NOT_AVAILABLE}'")
        return 0
    assert spec.landmarks is not None
    landmark_regions = spec.landmarks.regions
    data = NormalisedLandmarks.load(NORMALISED_LANDMARKS_FILE)
    classes = data.label_names.tolist()
    check_regions(params, classes, landmark_regions)
    splits = SplitData.from_landmarks(data)
    n_points = data.points.shape[1]
    for expression in classes:  # a missing class fails here, before any worker starts
        fitter(splits, expression, classes, params)
    jobs = [(splits, expression, classes, params, n_points) for expression in classes]
    bar = {"desc": f"expressions: {count_steps(n_points, params.drop_per_step, params.min_landmarks)} fits each",
           "unit": "expression"}
    results = [pickle.loads(result) for result in process_map(reduce_expression, jobs, usable_cores(), bar)]
    values = write_reports(results, data, params, landmark_regions)
    if not args.no_tracking:
        lineage = track(results, data, params, values)
        summary_path = REPORT_DIR / "summary.json"
        write_json_atomic(json.loads(summary_path.read_text()) | {"mlflow": lineage}, summary_path)
    for name, value in values["expressions"]["summary"].items():
        print(f"expressions: {name} = {value:.3f}")
    return 0


if __name__ == "__main__":
    main()
