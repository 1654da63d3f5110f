"""Stage `evaluate`: test-set metrics per attribute, the reliability ceiling, and the promotion rule.

Metrics go to `reports/metrics.json` (`evaluate.test.<attribute>.<metric>`, stable keys for
`dvc metrics diff`), to `dvc plots` sources under `reports/evaluate/`, and into the training run.
Every test r carries a 95 % identity-grouped bootstrap interval (`pearson_r_ci_low/high`); with
`split.folds` the train stage's per-fold figures appear beside them as `evaluate.cv.<attribute>`.
The newly registered version becomes `champion` only if its test mean Pearson r beats the current
champion's on the same data and split (the champion is re-scored here when it was scored elsewhere);
the decision and its reason are tags on the version, and a failed or worse candidate never moves it.
The decision is `promotion.promote`, which runs under `tracking.registry_lock`: two evaluates at once (on one machine
or against a shared server) cannot both promote against the same old champion.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from mlflow.entities.model_registry import ModelVersion
from scipy import stats
from sklearn.metrics import mean_absolute_error, r2_score

from psyface.artifacts import (
    CV_FILE,
    EVALUATE_METRICS_FILE,
    EVALUATE_PLOTS_DIR,
    PREPARED_DIR,
    Prepared,
    load_prepared,
)
from psyface.dataset.layout import DATA_DIR, DatasetSpec, load_dataset
from psyface.errors import PsyfaceError, entry_point
from psyface.io import write_csv_atomic, write_json_atomic
from psyface.metrics import pearson_columns
from psyface.model import AttributeEnsemble, AttributeNet, ModelSpec, predict_ratings
from psyface.promotion import Score
from psyface.resampling import face_groups, grouped_bootstrap_r

BOOTSTRAP_RESAMPLES = 1000  # identities drawn with replacement per resample; fixed seed 0: reruns agree
CI_LEVEL = 0.95
METRIC_NAMES = ("pearson_r", "spearman_rho", "r2", "mae", "ceiling", "r_over_ceiling")


def attribute_metrics(predicted: np.ndarray, rated: np.ndarray, reliability: float | None) -> dict[str, float]:
    """Pearson r, Spearman rho, R², MAE (rating units) and r relative to the reliability ceiling.

    The ceiling is sqrt(reliability): the highest correlation any predictor can reach against mean
    ratings whose split-half reliability is `reliability` (attenuation); NaN when unknown."""
    r = float(pearson_columns(predicted, rated)[0])
    rho = math.nan if math.isnan(r) else float(stats.spearmanr(predicted, rated).statistic)
    ceiling = math.sqrt(reliability) if reliability and reliability > 0 else math.nan
    return {"pearson_r": r, "spearman_rho": rho, "r2": float(r2_score(rated, predicted, force_finite=False)),
            "mae": float(mean_absolute_error(rated, predicted)), "ceiling": ceiling, "r_over_ceiling": r / ceiling}


def split_metrics(predicted: np.ndarray, rated: np.ndarray, attributes: list[str],
                 reliability: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per attribute metrics plus `mean` (the mean of each metric over attributes)."""
    table = {name: attribute_metrics(predicted[:, i], rated[:, i], reliability.get(name))
             for i, name in enumerate(attributes)}
    table["mean"] = {metric: float(np.mean([table[a][metric] for a in attributes])) for metric in METRIC_NAMES}
    return table


def score_model(net: AttributeNet | AttributeEnsemble, spec: ModelSpec, prepared: Prepared,
                dataset: DatasetSpec) -> tuple[dict[str, dict[str, float]], pd.DataFrame]:
    """Metrics on the test split and the long table (id, attribute, rated, predicted) behind them."""
    if spec.image_size != prepared.images.shape[1]:
        raise PsyfaceError(f"model expects {spec.image_size}px images, prepared data has {prepared.images.shape[1]}px")
    missing = [a for a in spec.attributes if a not in prepared.table]
    if missing:
        raise PsyfaceError(f"the prepared table lacks the model's attributes {missing}")
    rows = prepared.split("test")
    predicted = predict_ratings(net, spec, np.asarray(prepared.images[rows]))
    rated = prepared.table[spec.attributes].to_numpy(np.float64)[rows]
    ids = prepared.table["id"].to_numpy()[rows]
    long = pd.concat([pd.DataFrame({"id": ids, "attribute": name, "rated": rated[:, i], "predicted": predicted[:, i]})
                      for i, name in enumerate(spec.attributes)], ignore_index=True)
    metrics = split_metrics(predicted, rated, spec.attributes, dataset.reliability)
    groups = face_groups(prepared.table, dataset.identity_column)[rows]
    low, high, mean_low, mean_high = grouped_bootstrap_r(predicted, rated, groups, BOOTSTRAP_RESAMPLES, CI_LEVEL)
    for i, name in enumerate(spec.attributes):
        metrics[name].update(pearson_r_ci_low=float(low[i]), pearson_r_ci_high=float(high[i]))
    metrics["mean"].update(pearson_r_ci_low=float(mean_low), pearson_r_ci_high=float(mean_high))
    return metrics, long


def scatter_figure(long: pd.DataFrame, metrics: dict[str, dict[str, float]]) -> Figure:
    attributes = list(dict.fromkeys(long["attribute"]))
    columns = min(4, len(attributes))
    rows = math.ceil(len(attributes) / columns)
    figure = Figure(figsize=(3.2 * columns, 3.2 * rows))  # no pyplot: no global figure state
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis, name in zip(axes.flat, attributes, strict=False):
        part = long[long["attribute"] == name]
        axis.scatter(part["rated"], part["predicted"], s=6, alpha=0.5)
        low, high = part[["rated", "predicted"]].min().min(), part[["rated", "predicted"]].max().max()
        axis.plot([low, high], [low, high], "k:", linewidth=1)
        axis.set(title=f"{name}: r={metrics[name]['pearson_r']:.2f}", xlabel="rated", ylabel="predicted")
    for axis in list(axes.flat)[len(attributes):]:
        axis.axis("off")
    figure.tight_layout()
    return figure


def rescore(champion: ModelVersion, prepared: Prepared, dataset: DatasetSpec, here: Score) -> Score:
    """The champion scored on this data and split (when its tags hold no comparable score)."""
    from psyface import tracking

    try:
        net, spec = tracking.load_model(f"models:/{champion.name}/{champion.version}")
        metrics, _ = score_model(net, spec, prepared, dataset)
    except PsyfaceError as error:
        print(f"evaluate: champion v{champion.version} cannot be re-scored here ({error})")
        return Score(math.nan, str(champion.tags.get("data_hash")), str(champion.tags.get("split_hash")))
    return Score(metrics["mean"]["pearson_r"], here.data_hash, here.split_hash)


@entry_point
def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="psyface evaluate", description=__doc__.split("\n\n")[0]).parse_args(argv)
    import mlflow
    from mlflow.tracking import MlflowClient

    from psyface import promotion, tracking

    run = tracking.read_run_file()
    dataset = load_dataset(DATA_DIR)
    prepared = load_prepared(PREPARED_DIR)
    net, spec = tracking.load_model(run.model_uri, run.tracking_uri)
    metrics, long = score_model(net, spec, prepared, dataset)
    cv = json.loads(CV_FILE.read_text(encoding="utf-8")) if CV_FILE.is_file() else {"folds": 0}
    results: dict = {"test": metrics}
    if cv["folds"]:
        results["cv"] = {"folds": cv["folds"], "recipe": cv["recipe"], **cv["summary"]}
    write_json_atomic({"evaluate": results}, EVALUATE_METRICS_FILE)
    per_attribute = pd.DataFrame([{"attribute": a, **metrics[a]} for a in spec.attributes])
    write_csv_atomic(per_attribute, EVALUATE_PLOTS_DIR / "per_attribute.csv")
    write_csv_atomic(long, EVALUATE_PLOTS_DIR / "predictions.csv")

    tags = MlflowClient().get_run(run.run_id).data.tags
    here = Score(metrics["mean"]["pearson_r"], tags.get("data_hash", "untracked"), tags.get("split_hash", ""))
    trained = MlflowClient().get_run(run.run_id).info.status == "FINISHED"
    with tracking.open_run(run.run_id, run.tracking_uri):
        mlflow.log_metrics({f"test_{a}_{m}": v for a, values in metrics.items() for m, v in values.items()
                            if math.isfinite(v)})
        mlflow.log_figure(scatter_figure(long, metrics), "plots/test_scatter.png")
        mlflow.log_artifact(str(EVALUATE_METRICS_FILE), "evaluate")
    promote, reason = promotion.promote(run.model_name, run.model_version, here, eligible=trained,
                                        rescore=lambda champion: rescore(champion, prepared, dataset, here))
    print(f"evaluate: test mean r {here.mean_r:.3f} [{metrics['mean']['pearson_r_ci_low']:.3f}, "
          f"{metrics['mean']['pearson_r_ci_high']:.3f}] | "
          + ", ".join(f"{a} {metrics[a]['pearson_r']:.2f}" for a in spec.attributes))
    print(f"evaluate: v{run.model_version} {'-> champion' if promote else 'not promoted'}: {reason}")
    return 0


if __name__ == "__main__":
    main()
