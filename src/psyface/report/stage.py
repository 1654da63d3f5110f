"""The `report` stage: manifold view, bias audit and the one self-contained HTML report.

Reads (declared in dvc.yaml): params.yaml `report:`, data/dataset.yaml, artifacts/prepared/,
artifacts/train/run.json (and through it the MLflow run and model), artifacts/train/history.csv,
reports/metrics.json, reports/validation/summary.json, reports/explain/{metrics.json,figures/}.
Writes: reports/index.html, reports/manifold/, reports/fairness/, reports/report_metrics.json, and logs
the same into the training run.
"""

from __future__ import annotations

import argparse
import json
import typing
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import mlflow
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from psyface import tracking
from psyface.artifacts import (
    EVALUATE_METRICS_FILE,
    EXPLAIN_FIGURES_DIR,
    EXPLAIN_METRICS_FILE,
    HISTORY_FILE,
    PREPARED_DIR,
    VALIDATION_SUMMARY_FILE,
    load_prepared,
)
from psyface.config import (
    Bound,
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitFloat,
    PositiveFloat,
    PositiveInt,
    load_section,
)
from psyface.dataset.layout import DATA_DIR, DatasetSpec, load_dataset
from psyface.errors import PsyfaceError, entry_point
from psyface.io import json_text, read_csv_checked, replace_dir_atomic, write_atomic
from psyface.model import AttributeNet, ModelSpec, predict_ratings
from psyface.report import fairness, html, manifold, plots

REPORT_HTML = Path("reports/index.html")
MANIFOLD_DIR = Path("reports/manifold")
FAIRNESS_DIR = Path("reports/fairness")
REPORT_METRICS = Path("reports/report_metrics.json")
FeatureSet = Literal["penultimate", "predictions"]
FEATURE_SETS: tuple[FeatureSet, ...] = typing.get_args(FeatureSet)
Split = Literal["train", "val", "test"]


@dataclass(frozen=True)
class ManifoldParams:
    feature_sets: list[FeatureSet] = field(default_factory=lambda: list(FEATURE_SETS))
    methods: list[Literal["tsne", "umap"]] = field(default_factory=lambda: ["tsne", "umap"])
    tsne_perplexity: PositiveFloat = 30.0
    tsne_max_iter: Annotated[int, Bound(250)] = 500  # scikit-learn's minimum
    umap_n_neighbors: Annotated[int, Bound(2)] = 40  # Xiao (2024)
    umap_min_dist: NonNegativeFloat = 0.1  # Xiao (2024)
    pca_components: PositiveInt = 50
    trustworthiness_k: PositiveInt = 10
    knn_k: PositiveInt = 30
    cv_folds: Annotated[int, Bound(2)] = 5
    score_splits: list[Split] = field(default_factory=lambda: ["val", "test"])  # held-out faces only


@dataclass(frozen=True)
class FairnessParams:
    splits: list[Split] = field(default_factory=lambda: ["val", "test"])
    n_boot: PositiveInt = 500
    ci: OpenUnitFloat = 0.95
    min_abs_gap_sd: NonNegativeFloat = 0.2
    familywise: bool = True
    min_group_size: PositiveInt = 20  # smaller groups (val+test faces) are reported with their numbers, never flagged
    reference: dict[str, str] = field(default_factory=dict)  # feature set -> reference group; absent: the largest


@dataclass(frozen=True)
class ReportParams:
    seed: NonNegativeInt = 42
    batch_size: PositiveInt = 64
    manifold: ManifoldParams = field(default_factory=ManifoldParams)
    fairness: FairnessParams = field(default_factory=FairnessParams)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PsyfaceError(f"{path} not found: run the stage that writes it first (`dvc repro`)")
    return json.loads(path.read_text(encoding="utf-8"))


def features_and_predictions(
    net: torch.nn.Module, model_spec: ModelSpec, images: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One forward pass: penultimate features (the inputs of every head's last layer, concatenated
    for per-attribute ensembles) and predictions on the rating scale."""
    heads = [module.last_layer for module in net.modules() if isinstance(module, AttributeNet)]
    captured: dict[int, list[np.ndarray]] = {id(head): [] for head in heads}

    def capture(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        captured[id(module)].append(inputs[0].detach().float().cpu().numpy())

    hooks = [head.register_forward_hook(capture) for head in heads]
    try:
        chunk = batch_size * 4
        predictions = np.concatenate([
            predict_ratings(net, model_spec, np.array(images[start:start + chunk]), batch_size)
            for start in tqdm(range(0, len(images), chunk), desc="report: features", unit="chunk")
        ])
    finally:
        for hook in hooks:
            hook.remove()
    features = np.concatenate([np.concatenate(captured[id(head)]) for head in heads], axis=1)
    return features, predictions


# ---------------------------------------------------------------------------------------------
# The work (pure given its inputs)
# ---------------------------------------------------------------------------------------------

@dataclass
class ManifoldResult:
    coordinates: pd.DataFrame  # id, split, and x/y per embedding
    numbers: dict[str, dict]  # "<feature set>/<method>" -> structure numbers
    figures: list[html.Figure]


def manifold_view(
    feature_sets: dict[str, np.ndarray], table: pd.DataFrame, spec: DatasetSpec, attributes: list[str],
    params: ManifoldParams, seed: int,
) -> ManifoldResult:
    """Embed each feature set with each method; plot and score every embedding."""
    settings = manifold.EmbeddingParams(params.tsne_perplexity, params.tsne_max_iter, params.umap_n_neighbors,
                                        params.umap_min_dist, params.pca_components, seed)
    colours = table[attributes + list(spec.sensitive_features) + ["split"]]
    scored = table["split"].isin(params.score_splits).to_numpy()
    groups = table[spec.identity_column].to_numpy() if spec.identity_column in table else None
    targets = {name: table[name].to_numpy(float) for name in attributes}
    coordinates = table[["id", "split"]].copy()
    numbers, figures = {}, []
    jobs = [(name, method) for name in params.feature_sets for method in params.methods]
    for name, method in tqdm(jobs, desc="report: t-SNE/UMAP", unit="embedding"):
        points = manifold.embed_2d(feature_sets[name], method, settings)  # type: ignore[arg-type]
        key = f"{name}/{method}"
        coordinates[f"{name}_{method}_x"], coordinates[f"{name}_{method}_y"] = points[:, 0], points[:, 1]
        numbers[key] = manifold.structure_numbers(
            feature_sets[name], points, targets, scored, groups,
            params.trustworthiness_k, params.knn_k, params.cv_folds, seed,
        )
        caption = (f"trustworthiness {numbers[key]['trustworthiness']:.3f}; "
                   f"{len(feature_sets[name][0])}-dimensional features of {len(points)} faces")
        figures.append(html.Figure(f"{method.upper()} of {name}", plots.embedding_panels(points, colours, key), caption))
    return ManifoldResult(coordinates, numbers, figures)


def manifold_table(numbers: dict[str, dict]) -> pd.DataFrame:
    rows = [
        {"embedding": key, "attribute": attribute, "trustworthiness": result["trustworthiness"], **scores}
        for key, result in numbers.items()
        for attribute, scores in result["attributes"].items()
    ]
    return pd.DataFrame(rows)


def accuracy_table(evaluate_metrics: dict, attributes: list[str]) -> pd.DataFrame:
    """evaluate's test Pearson r per attribute with its 95 % grouped bootstrap interval, next to its
    reliability ceiling, and the cross-validated mean ± SD over folds where `split.folds` was set."""
    test = evaluate_metrics.get("evaluate", {}).get("test", {})
    cv = evaluate_metrics.get("evaluate", {}).get("cv", {})
    missing = [name for name in attributes if name not in test]
    if missing:
        raise PsyfaceError(f"{EVALUATE_METRICS_FILE} has no evaluate.test metrics for {missing}: rerun `dvc repro evaluate`")
    keys = ("pearson_r", "pearson_r_ci_low", "pearson_r_ci_high", "ceiling", "r_over_ceiling")
    return pd.DataFrame([
        {"attribute": name, **{key: test[name].get(key) for key in keys},
         **({f"cv_{key}": cv[name][key] for key in ("pearson_r_mean", "pearson_r_sd")} if name in cv else {})}
        for name in attributes
    ])


def audit_data(table: pd.DataFrame, predictions: pd.DataFrame, spec: DatasetSpec, attributes: list[str],
               splits: list[str]) -> fairness.AuditData:
    audited = table["split"].isin(splits).to_numpy()
    if not audited.any():
        raise PsyfaceError(f"params.yaml report.fairness.splits {splits} selects no image")
    training = table["split"] == "train"
    features = list(spec.sensitive_features)
    missing = [column for column in features if column not in table]
    if missing:
        raise PsyfaceError(f"sensitive features {missing} are not columns of {PREPARED_DIR / 'table.csv'}")
    return fairness.AuditData(
        ratings=table.loc[audited, attributes].reset_index(drop=True),
        predictions=predictions.loc[audited, attributes].reset_index(drop=True),
        sensitive=table.loc[audited, features].reset_index(drop=True),
        categories=spec.sensitive_features,
        medians={name: float(table.loc[training, name].median()) for name in attributes},
        clusters=table.loc[audited, spec.identity_column].reset_index(drop=True)
        if spec.identity_column in table else None,
    )


def report_metrics(numbers: dict[str, dict], audit: fairness.AuditResult) -> dict:
    """The stage's few headline numbers for `dvc metrics` (stable keys; the tables hold the rest)."""
    gaps = audit.gaps
    per_attribute = {}
    for attribute, rows in gaps.groupby("attribute", sort=False):
        rows = rows[~rows["small_group"].astype(bool)]
        per_attribute[attribute] = {
            **{f"{kind}_flags": int(rows[f"{kind}_flag"].sum()) for kind in fairness.GAP_KINDS},
            "max_abs_rating_gap_sd": float(rows["rating_gap_sd"].abs().max()),
            "max_abs_prediction_gap_sd": float(rows["prediction_gap_sd"].abs().max()),
        }
    return {"report": {
        "manifold": {
            key.replace("/", "_"): {
                "trustworthiness": result["trustworthiness"],
                **{attribute: {"knn_r2_2d": scores["knn_r2_2d"], "knn_r2_full": scores["knn_r2_full"]}
                   for attribute, scores in result["attributes"].items()},
            }
            for key, result in numbers.items()
        },
        "fairness": {"flags": len(fairness.flagged_pairs(audit)), **per_attribute},
    }}


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------

NOT_AVAILABLE = "not available"
NO_SENSITIVE = "dataset.yaml declares no sensitive features"


def not_computed(spec: DatasetSpec, attributes: list[str], explain_metrics: dict) -> list[str]:
    """What this dataset did not allow, said once at the top of the report."""
    items = []
    unknown = [name for name in attributes if name not in spec.reliability]
    if unknown:
        items.append(f"reliability ceiling and r / ceiling for {', '.join(unknown)} (no reliability in dataset.yaml: "
                     "import with --ratings-long or --reliability)")
    localisation = explain_metrics.get("explain", {}).get("localisation")
    if isinstance(localisation, str):
        items.append(f"explanation localisation, {localisation} (faithfulness and sanity checks ran)")
    if not spec.has_landmarks:
        items.append("the landmark expression branch (dataset.yaml declares no landmarks; reports/landmarks/ says "
                     f"'{NOT_AVAILABLE}')")
    if not spec.sensitive_features:
        items.append(f"the bias audit ({NO_SENSITIVE})")
    return items


def data_summary(table: pd.DataFrame, spec: DatasetSpec, attributes: list[str]) -> list[html.Table]:
    counts = table["split"].value_counts().rename_axis("split").reset_index(name="images")
    described = pd.DataFrame([
        {"attribute": name, "scale": f"{spec.attributes[name].scale[0]:g}–{spec.attributes[name].scale[1]:g}",
         "mean": table[name].mean(), "sd": table[name].std(), "reliability": spec.reliability.get(name),
         "description": spec.attributes[name].description}
        for name in attributes
    ])
    groups = pd.DataFrame([
        {"feature": feature, "category": category, "images": int((table[feature] == category).sum())}
        for feature, categories in spec.sensitive_features.items() for category in categories
    ])
    return [html.Table("Images per split", counts), html.Table("Rated attributes", described),
            html.Table("Sensitive features", groups)]


def explanation_verdict(explain_metrics: dict) -> html.Table | None:
    """Per attribute: the method a researcher can trust (explain's verdict), its relevance mass
    accuracy with interval beside chance, and why every other method cannot be (None: explain wrote
    no verdict)."""
    verdict = explain_metrics.get("explain", {}).get("verdict")
    if not verdict:
        return None

    def interval(entry: dict) -> str:
        if entry["relevance_mass_accuracy"] is None:
            return "–"
        low, high = entry["relevance_mass_accuracy_ci_low"], entry["relevance_mass_accuracy_ci_high"]
        bounds = f" [{low:.2f}, {high:.2f}]" if low is not None and high is not None else ""
        return f"{entry['relevance_mass_accuracy']:.2f}{bounds} ({entry['best_method']})"

    rows = [{"attribute": name, "test r": entry["test_r"], "trusted method": entry["trusted_method"] or "none",
             "RMA [CI] (best method)": interval(entry), "chance": entry["chance"],
             "the mask on its grid": "–" if entry.get("covering_score") is None else f"{entry['covering_score']:.2f}",
             "the model's region share": "–" if entry.get("model_region_share") is None else f"{entry['model_region_share']:.2f}",
             "ground truth": entry["ground_truth"],
             "verdict": entry["verdict"],
             "why others fail": "; ".join(f"{method}: {reason}" for method, reason in entry["failing"].items()) or "–",
             "untrusted": not entry["trusted"]}
            for name, entry in verdict.items()]
    return html.Table("Which explanation to trust, per attribute", pd.DataFrame(rows), "untrusted")


def explanation_figures(folder: Path) -> list[html.Figure]:
    return [html.Figure(path.stem.replace("_", " "), path.read_bytes(), str(path.relative_to(folder)))
            for path in sorted(folder.glob("*.png"))]


def fairness_tables(audit: fairness.AuditResult) -> list[html.Table]:
    if audit.groups.empty:
        return [html.Table("Bias audit", pd.DataFrame({"result": [f"{NOT_AVAILABLE}: {NO_SENSITIVE}"]}))]
    flags = pd.DataFrame(fairness.flagged_pairs(audit))
    gap_columns = ["attribute", "feature", "group", "reference", "n_group", "n_reference", "small_group", "ci_level"] + [
        column for kind in fairness.GAP_KINDS for column in (f"{kind}_sd", f"{kind}_sd_lo", f"{kind}_sd_hi", f"{kind}_flag")
    ]
    gaps = audit.gaps[gap_columns].assign(flagged=audit.gaps[[f"{k}_flag" for k in fairness.GAP_KINDS]].any(axis=1))
    return [
        html.Table("Flagged gaps", flags if len(flags) else pd.DataFrame({"result": ["no gap flagged"]})),
        html.Table("Gaps against the reference group (in rating SDs) and bias amplification", gaps, "flagged"),
        html.Table("Per attribute and sensitive feature: Fairlearn differences (max − min over groups; "
                   "their bootstrap CIs lean upward, so flags use the signed gaps above), DPD/EOD, flags",
                   audit.summary, "flagged"),
        html.Table("Per group (Fairlearn MetricFrame, bootstrap CIs)", audit.groups),
    ]


def build_page(
    spec: DatasetSpec, table: pd.DataFrame, attributes: list[str], validation: dict, curves: pd.DataFrame,
    accuracy: pd.DataFrame, explain_metrics: dict, explain_figures: list[html.Figure], result: ManifoldResult,
    audit: fairness.AuditResult, params: ReportParams, lineage: dict[str, str],
) -> html.ReportContent:
    rule = params.fairness
    references = {row["feature"]: row["reference"] for row in audit.summary.to_dict("records")}
    small = {row["feature"]: row["small_groups"] for row in audit.summary.to_dict("records") if row["small_groups"]}
    content = html.ReportContent(
        title=f"psyface report — {spec.name}",
        generated_at=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )
    content.summaries["data"] = [f"{len(table)} rated faces, {len(attributes)} attributes; "
                                 f"sensitive features: {', '.join(spec.sensitive_features) or 'none'}.",
                                 *(f"Not computed: {item}." for item in not_computed(spec, attributes, explain_metrics))]
    content.tables["data"] = [*data_summary(table, spec, attributes), html.key_value_table("Validation outcome", validation)]
    content.figures["training"] = [html.Figure("Learning curves", plots.learning_curves(curves),
                                               f"{len(curves)} epochs; validation r per attribute")]
    content.figures["accuracy"] = [html.Figure("Test Pearson r per attribute", plots.accuracy_against_ceiling(accuracy),
                                               "bars: 95 % bootstrap interval over identities; "
                                               "ceiling = sqrt(split-half reliability of the mean ratings)")]
    content.tables["accuracy"] = [html.Table("Accuracy", accuracy)]
    content.figures["explanations"] = explain_figures
    verdict = explanation_verdict(explain_metrics)
    if verdict is not None:
        content.summaries["explanations"] = [
            "A method is trusted for an attribute when the model predicts it (test r ≥ explain.min_test_r), its "
            "maps pass cascading randomisation (rank correlation with the trained model's maps below "
            "explain.sanity_threshold once every layer is randomised), and its relevance mass accuracy's bootstrap "
            "interval over identities lies above chance (the mask's share of the image); a method on a layer grid "
            "must also be able to reach explain.rma_target there. The best such method (highest RMA) is named; "
            "for a layer-grid method, 'the mask on its grid' is what a map that marks the whole region evenly scores "
            "there, the blur of the grid being all it loses; "
            "an invalid ground truth (the ground_truth stage) keeps it reported but untrusted.",
            "This is the verdict of one training: on another seed the best method and its RMA can change. "
            "`psyface verdicts` compares the verdicts of several runs (e.g. `dvc exp run --queue -S train.seed=1`) "
            "and trusts only a method that every run trusts, judged by its worst run."]
    content.tables["explanations"] = [*([verdict] if verdict is not None else []),
                                      html.key_value_table("Explanation quality scores", explain_metrics)]
    content.summaries["manifold"] = [
        "Trustworthiness: how far the 2-D neighbourhoods respect those in the full features (1 = perfectly). "
        f"k-NN R² ({params.manifold.knn_k} neighbours, {params.manifold.cv_folds}-fold cross-validation by identity, "
        f"on {'/'.join(params.manifold.score_splits)} faces): how much of each rated attribute the 2-D map "
        "and the full features predict; share_kept = their ratio (blank where the features hold none of it)."
    ]
    content.figures["manifold"] = result.figures
    content.tables["manifold"] = [html.Table("Structure numbers", manifold_table(result.numbers))]
    content.summaries["fairness"] = [
        f"Audited: {'/'.join(rule.splits)} faces. A gap (group − reference group, in SDs of the rating) is "
        f"flagged when its bootstrap CI (nominal {rule.ci:.0%}"
        f"{', Bonferroni-widened over all comparisons' if rule.familywise else ''}; {rule.n_boot} resamples of identities) "
        f"excludes 0 and |gap| ≥ {rule.min_abs_gap_sd} SD. Rating gap = the raters' bias, prediction gap = the "
        "model's, amplification = prediction gap − rating gap (does the model widen the raters' bias?). "
        "Binarised view: rating above the training median. A rating gap is rater bias or a real "
        "difference between the groups' faces (as for age across age bands); the audit shows where, "
        "knowledge of the data says which.",
        f"Reference group: the largest group of each feature set unless report.fairness.reference names one "
        f"(used: {references or 'none'}). Groups with fewer than {rule.min_group_size} audited faces are listed with "
        f"their numbers (small_group) but never flagged, nor counted in the Bonferroni correction: "
        f"{small or 'none here'}.",
    ]
    content.tables["fairness"] = fairness_tables(audit)
    content.tables["lineage"] = [html.key_value_table("Lineage", lineage)]
    content.code["lineage"] = (
        f"git checkout {lineage.get('git.commit', 'HEAD')}\n"
        "make install && make data      # or: dvc pull\n"
        "dvc repro                      # reruns only what changed\n"
        f"mlflow ui --backend-store-uri {lineage.get('tracking_uri', '')}\n"
        f"# the model: psyface.tracking.load_model('{lineage.get('model_uri', '')}')"
    )
    return content


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------

def write_files(folder: Path, files: dict[str, bytes | str]) -> None:
    """Replace `folder` atomically by one holding `files` (name -> content)."""
    def fill(staging: Path) -> None:
        for name, data in files.items():
            target = staging / name
            target.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)

    replace_dir_atomic(folder, fill)


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda staging: staging.write_text(text, encoding="utf-8"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="psyface report", description=__doc__.split("\n\n")[0])
    return parser.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> int:
    parse_args(argv)
    params = load_section("report", ReportParams)
    spec = load_dataset(DATA_DIR)
    prepared = load_prepared()
    images, table = prepared.images, prepared.table
    run = tracking.read_run_file()
    net, model_spec = tracking.load_model(run.model_uri, run.tracking_uri)
    attributes = list(model_spec.attributes)

    features, predicted = features_and_predictions(net, model_spec, images, params.batch_size)
    predictions = pd.DataFrame(predicted, columns=attributes)
    result = manifold_view({"penultimate": features, "predictions": predicted}, table, spec, attributes,
                           params.manifold, params.seed)
    rule = fairness.FlagRule(params.fairness.ci, params.fairness.min_abs_gap_sd, params.fairness.familywise,
                             params.fairness.min_group_size)
    audit = fairness.audit(
        audit_data(table, predictions, spec, attributes, params.fairness.splits),
        fairness.feature_sets(spec.sensitive_features, spec.intersections), rule, params.fairness.n_boot, params.seed,
        references=params.fairness.reference,
    )
    curves = read_csv_checked(HISTORY_FILE)
    accuracy = accuracy_table(read_json(EVALUATE_METRICS_FILE), attributes)
    champion = tracking.alias_version(run.model_name, tracking.CHAMPION)
    lineage = {**tracking.git_tags(), "data.md5": tracking.data_hash(), **asdict(run),
               "champion_version": champion.version if champion else "none"}
    content = build_page(spec, table, attributes, read_json(VALIDATION_SUMMARY_FILE), curves, accuracy,
                         read_json(EXPLAIN_METRICS_FILE), explanation_figures(EXPLAIN_FIGURES_DIR), result, audit,
                         params, lineage)
    metrics = report_metrics(result.numbers, audit)

    write_files(MANIFOLD_DIR, {
        "coordinates.csv": result.coordinates.to_csv(index=False),
        "numbers.json": json_text(result.numbers),
        **{f"{figure.title.replace(' ', '_')}.png": figure.png for figure in result.figures},
    })
    write_files(FAIRNESS_DIR, {
        "predictions.csv": pd.concat([table[["id", "split"]], predictions.add_prefix("predicted_")], axis=1)
        .to_csv(index=False),
        "groups.csv": audit.groups.to_csv(index=False),
        "summary.csv": audit.summary.to_csv(index=False),
        "gaps.csv": audit.gaps.to_csv(index=False),
        "audit.json": json_text({"rule": asdict(rule), "n_boot": params.fairness.n_boot,
                               "splits": params.fairness.splits, "flags": fairness.flagged_pairs(audit),
                               "summary": audit.summary.to_dict("records"), "gaps": audit.gaps.to_dict("records"),
                               "groups": audit.groups.to_dict("records")}),
    })
    write_text(REPORT_METRICS, json_text(metrics))
    write_text(REPORT_HTML, html.render(content))

    with tracking.open_run(run.run_id, run.tracking_uri):
        mlflow.log_metrics(tracking.metric_values(metrics))
        mlflow.log_artifact(str(REPORT_HTML), "report")
        mlflow.log_artifacts(str(FAIRNESS_DIR), "report/fairness")
        mlflow.log_artifacts(str(MANIFOLD_DIR), "report/manifold")
    flags = fairness.flagged_pairs(audit)
    print(f"report: wrote {REPORT_HTML}; {len(flags)} flagged gap(s)"
          + "".join(f"\n  {f['attribute']} × {f['feature']}: {f['group']} vs {f['reference']} "
                    f"{f['kind']} {f['gap_sd']:+.2f} SD" for f in flags))
    return 0


if __name__ == "__main__":
    main()
