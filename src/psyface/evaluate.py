"""Stage `evaluate`: test-set metrics per attribute, the reliability ceiling, and the promotion rule.

Metrics go to `reports/metrics.json` (`evaluate.test.<attribute>.<metric>`, stable keys for
`dvc metrics diff`), to `dvc plots` sources under `reports/evaluate/`, and into the training run.
Every test r carries a 95 % identity-grouped bootstrap interval (`pearson_r_ci_low/high`); with
`split.folds` the train stage's per-fold figures appear beside them as `evaluate.cv.<attribute>`.
The newly registered version becomes `champion` only if its test mean Pearson r beats the current
champion's on the same data and split (the champion is re-scored here when it was scored elsewhere);
the decision and its reason are tags on the version, and a failed or worse candidate never moves it.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import stats

from psyface.dataset.layout import DATA_DIR, DatasetSpec, load_dataset
from psyface.errors import PsyfaceError, entry_point
from psyface.io import write_csv_atomic, write_json_atomic
from psyface.model import AttributeEnsemble, AttributeNet, ModelSpec, predict_ratings
from psyface.prepare import PREPARED_DIR, Prepared, load_prepared
from psyface.resampling import face_groups, grouped_bootstrap_r

METRICS_FILE = Path("reports/metrics.json")
CV_FILE = Path("artifacts/train/cv.json")
BOOTSTRAP_RESAMPLES = 1000  # identities drawn with replacement per resample; fixed seed 0: reruns agree
CI_LEVEL = 0.95
PLOTS_DIR = Path("reports/evaluate")
METRIC_NAMES = ("pearson_r", "spearman_rho", "r2", "mae", "ceiling", "r_over_ceiling")
MEAN_R_TAG = "test_mean_pearson_r"


@dataclass(frozen=True)
class Score:
    """What promotion compares: a model's test mean r and where it was measured."""

    mean_r: float
    data_hash: str
    split_hash: str


def attribute_metrics(predicted: np.ndarray, rated: np.ndarray, reliability: float | None) -> dict[str, float]:
    """Pearson r, Spearman rho, R², MAE (rating units) and r relative to the reliability ceiling.

    The ceiling is sqrt(reliability): the highest correlation any predictor can reach against mean
    ratings whose split-half reliability is `reliability` (attenuation); NaN when unknown."""
    constant = np.ptp(predicted) == 0 or np.ptp(rated) == 0
    r = math.nan if constant else float(stats.pearsonr(predicted, rated).statistic)
    rho = math.nan if constant else float(stats.spearmanr(predicted, rated).statistic)
    residual = float(((rated - predicted) ** 2).sum())
    total = float(((rated - rated.mean()) ** 2).sum())
    ceiling = math.sqrt(reliability) if reliability and reliability > 0 else math.nan
    return {"pearson_r": r, "spearman_rho": rho, "r2": 1 - residual / total if total > 0 else math.nan,
            "mae": float(np.abs(rated - predicted).mean()), "ceiling": ceiling, "r_over_ceiling": r / ceiling}


def split_metrics(predicted: np.ndarray, rated: np.ndarray, attributes: list[str],
                 reliability: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per attribute metrics plus `mean` (the mean of each metric over attributes)."""
    table = {name: attribute_metrics(predicted[:, i], rated[:, i], reliability.get(name))
             for i, name in enumerate(attributes)}
    table["mean"] = {metric: float(np.mean([table[a][metric] for a in attributes])) for metric in METRIC_NAMES}
    return table


def score_tag(score: float) -> str:
    """A score as a version tag that reads back exactly (`repr` round-trips a float): the promotion
    rule compares it with a fresh score, and a rounded tag made an identical model look better."""
    return repr(float(score))


def decide(candidate: Score | None, champion: Score | None) -> tuple[bool, str]:
    """The promotion rule: (promote?, reason). Strictly better on the same data and split only."""
    if candidate is None or not math.isfinite(candidate.mean_r):
        return False, "candidate failed: no finite test mean r"
    if champion is None:
        return True, f"first champion (test mean r {candidate.mean_r:.4f})"
    if (champion.data_hash, champion.split_hash) != (candidate.data_hash, candidate.split_hash):
        return False, "champion was scored on other data or another split; not comparable"
    if candidate.mean_r > champion.mean_r:
        return True, f"test mean r {candidate.mean_r:.4f} beats champion's {champion.mean_r:.4f}"
    return False, f"test mean r {candidate.mean_r:.4f} does not beat champion's {champion.mean_r:.4f}"


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


def champion_score(name: str, prepared: Prepared, dataset: DatasetSpec, here: Score) -> Score | None:
    """The current champion's score on this data and split: from its tags, else re-scored here."""
    from psyface import tracking

    version = tracking.alias_version(name, tracking.CHAMPION)
    if version is None:
        return None
    tags = version.tags
    if tags.get("data_hash") == here.data_hash and tags.get("split_hash") == here.split_hash and MEAN_R_TAG in tags:
        return Score(float(tags[MEAN_R_TAG]), here.data_hash, here.split_hash)
    try:
        net, spec = tracking.load_model(f"models:/{name}/{version.version}")
        metrics, _ = score_model(net, spec, prepared, dataset)
    except PsyfaceError as error:
        print(f"evaluate: champion v{version.version} cannot be re-scored here ({error})")
        return Score(math.nan, str(tags.get("data_hash")), str(tags.get("split_hash")))
    return Score(metrics["mean"]["pearson_r"], here.data_hash, here.split_hash)


@entry_point
def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="psyface evaluate", description=__doc__.split("\n\n")[0]).parse_args(argv)
    import mlflow
    from mlflow.tracking import MlflowClient

    from psyface import tracking

    run = tracking.read_run_file()
    dataset = load_dataset(DATA_DIR)
    prepared = load_prepared(PREPARED_DIR)
    net, spec = tracking.load_model(run.model_uri, run.tracking_uri)
    metrics, long = score_model(net, spec, prepared, dataset)
    finite = {a: {m: v if math.isfinite(v) else None for m, v in values.items()} for a, values in metrics.items()}
    cv = json.loads(CV_FILE.read_text(encoding="utf-8")) if CV_FILE.is_file() else {"folds": 0}
    results: dict = {"test": finite}
    if cv["folds"]:
        results["cv"] = {"folds": cv["folds"], "recipe": cv["recipe"], **cv["summary"]}
    write_json_atomic({"evaluate": results}, METRICS_FILE)
    per_attribute = pd.DataFrame([{"attribute": a, **metrics[a]} for a in spec.attributes])
    write_csv_atomic(per_attribute, PLOTS_DIR / "per_attribute.csv")
    write_csv_atomic(long, PLOTS_DIR / "predictions.csv")

    tags = MlflowClient().get_run(run.run_id).data.tags
    here = Score(metrics["mean"]["pearson_r"], tags.get("data_hash", "untracked"), tags.get("split_hash", ""))
    trained = MlflowClient().get_run(run.run_id).info.status == "FINISHED"
    current = tracking.alias_version(run.model_name, tracking.CHAMPION)
    if current is not None and str(current.version) == run.model_version:
        promote, reason = True, "already the champion (re-evaluated)"
    else:
        promote, reason = decide(here if trained else None, champion_score(run.model_name, prepared, dataset, here))
    with tracking.open_run(run.run_id, run.tracking_uri):
        mlflow.log_metrics({f"test_{a}_{m}": v for a, values in metrics.items() for m, v in values.items()
                            if math.isfinite(v)})
        mlflow.log_figure(scatter_figure(long, metrics), "plots/test_scatter.png")
        mlflow.log_artifact(str(METRICS_FILE), "evaluate")
    tracking.tag_version(run.model_name, run.model_version, {
        MEAN_R_TAG: score_tag(here.mean_r), "promotion.decision": "champion" if promote else "rejected",
        "promotion.reason": reason})
    if promote:
        tracking.set_alias(run.model_name, tracking.CHAMPION, run.model_version)
    print(f"evaluate: test mean r {here.mean_r:.3f} [{metrics['mean']['pearson_r_ci_low']:.3f}, "
          f"{metrics['mean']['pearson_r_ci_high']:.3f}] | "
          + ", ".join(f"{a} {metrics[a]['pearson_r']:.2f}" for a in spec.attributes))
    print(f"evaluate: v{run.model_version} {'-> champion' if promote else 'not promoted'}: {reason}")
    return 0


if __name__ == "__main__":
    main()
