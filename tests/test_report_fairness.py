"""Bias audit: an injected rater bias is flagged, a bias-free attribute is not, amplification is seen."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from psyface.errors import PsyfaceError
from psyface.report import fairness

CATEGORIES = {"group": ["A", "B"], "gender": ["feminine", "masculine"], "age_band": ["young", "middle", "older"]}
FEATURES = fairness.feature_sets(CATEGORIES, [["group", "gender"]])


def faces(n_people: int = 200, images: int = 2, seed: int = 0) -> tuple[pd.DataFrame, pd.Series, np.ndarray]:
    """Sensitive features and identity per image, plus a per-person face signal."""
    rng = np.random.default_rng(seed)
    people = pd.DataFrame({name: rng.choice(values, n_people) for name, values in CATEGORIES.items()})
    sensitive = people.loc[np.repeat(np.arange(n_people), images)].reset_index(drop=True)
    identity = pd.Series(np.repeat(np.arange(n_people), images))
    face = np.repeat(rng.normal(size=n_people), images) + 0.3 * rng.normal(size=n_people * images)
    return sensitive, identity, face


def run_audit(ratings: pd.DataFrame, predictions: pd.DataFrame, sensitive: pd.DataFrame, identity: pd.Series,
              rule: fairness.FlagRule = fairness.FlagRule(), references: dict[str, str] | None = None
              ) -> fairness.AuditResult:
    data = fairness.AuditData(ratings, predictions, sensitive, CATEGORIES, ratings.median().to_dict(), identity)
    return fairness.audit(data, FEATURES, rule, n_boot=200, seed=1, progress=False, references=references)


@pytest.fixture(scope="module")
def biased() -> tuple[fairness.AuditResult, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Raters mark group B down on `trustworthy`; the model copies that; `control` is pure noise."""
    sensitive, identity, face = faces()
    rng = np.random.default_rng(5)
    is_b = (sensitive["group"] == "B").to_numpy()
    ratings = pd.DataFrame({"trustworthy": 4 + face - 0.6 * is_b + 0.3 * rng.normal(size=len(face)),
                            "control": 4 + np.repeat(rng.normal(size=len(face) // 2), 2)})
    predictions = pd.DataFrame({"trustworthy": 4 + face - 0.6 * is_b,
                                "control": 4 + 0.02 * rng.normal(size=len(face))})
    return run_audit(ratings, predictions, sensitive, identity, references={"group": "A"}), ratings, predictions, sensitive


def test_injected_rater_bias_is_flagged_and_control_is_not(biased) -> None:
    result, *_ = biased
    summary = result.summary.set_index(["attribute", "feature"])
    assert summary.loc[("trustworthy", "group"), "rating_gap_flag"]
    assert summary.loc[("trustworthy", "group"), "prediction_gap_flag"]
    assert not summary.loc[("trustworthy", "group"), "amplification_flag"]  # the model copies, not widens
    assert not summary.loc[("trustworthy", "gender"), "flagged"]
    assert not summary.loc["control", "flagged"].any()

    gap = result.gaps.set_index(["attribute", "feature", "group"]).loc[("trustworthy", "group", "B")]
    assert gap["reference"] == "A"
    assert gap["rating_gap"] == pytest.approx(-0.6, abs=0.25)
    assert gap["rating_gap_lo"] < gap["rating_gap"] < gap["rating_gap_hi"] < 0
    flags = fairness.flagged_pairs(result)
    assert {(f["attribute"], f["feature"], f["kind"]) for f in flags} >= {("trustworthy", "group", "rating_gap")}
    assert all(f["attribute"] == "trustworthy" for f in flags)


def test_group_table_matches_plain_pandas(biased) -> None:
    result, ratings, predictions, sensitive = biased
    groups = result.groups.set_index(["attribute", "feature", "group"]).sort_index()
    by_group = ratings["trustworthy"].groupby(sensitive["group"])
    for group in ("A", "B"):
        row = groups.loc[("trustworthy", "group", group)]
        assert row["count"] == by_group.size()[group]
        assert row["mean_rating"] == pytest.approx(by_group.mean()[group])
        assert row["mean_rating_lo"] < row["mean_rating"] < row["mean_rating_hi"]
        mask = sensitive["group"] == group
        assert row["mae"] == pytest.approx((ratings["trustworthy"] - predictions["trustworthy"])[mask].abs().mean())
    intersection = groups.loc[("trustworthy", "group & gender")]
    assert set(intersection.index) == {"A & feminine", "A & masculine", "B & feminine", "B & masculine"}
    summary = result.summary.set_index(["attribute", "feature"]).loc[("trustworthy", "group")]
    assert summary["demographic_parity_difference"] > 0.15  # B is predicted above the median less often
    assert 0 <= summary["equalized_odds_difference"] <= 1


def test_a_model_that_widens_the_gap_is_flagged_for_amplification() -> None:
    sensitive, identity, face = faces(seed=3)
    is_b = (sensitive["group"] == "B").to_numpy()
    ratings = pd.DataFrame({"trustworthy": 4 + face - 0.3 * is_b})
    predictions = pd.DataFrame({"trustworthy": 4 + face - 1.2 * is_b})
    gaps = run_audit(ratings, predictions, sensitive, identity, references={"group": "A"}).gaps.set_index(["feature", "group"])
    row = gaps.loc[("group", "B")]
    assert row["amplification"] == pytest.approx(-0.9, abs=1e-9)
    assert row["amplification_flag"]


def test_identity_clusters_widen_the_interval() -> None:
    """Ten copies of each person are not ten independent faces: the clustered CI must be wider."""
    rng = np.random.default_rng(4)
    labels = np.repeat(np.array(["A", "B"] * 20), 10)
    values = np.repeat(rng.normal(size=40), 10)
    width = {}
    for name, clusters in {"image": np.arange(400), "person": np.repeat(np.arange(40), 10)}.items():
        weights = fairness.cluster_weights(labels, clusters, 500, np.random.default_rng(0))
        assert (weights[:, labels == "A"].sum(axis=1) == 200).all()  # stratified: group sizes kept
        means = fairness.weighted_statistics(weights[:, labels == "A"], values[labels == "A"], values[labels == "A"])
        low, high = fairness.interval(means["mean_rating"], 0.95)
        width[name] = high - low
    assert width["person"] > 2 * width["image"]


def test_weighted_statistics_equal_the_plain_ones_for_unit_weights() -> None:
    rng = np.random.default_rng(6)
    y_true, y_pred = rng.normal(size=50), rng.normal(size=50)
    stats = fairness.weighted_statistics(np.ones((1, 50)), y_true, y_pred)
    assert stats["pearson_r"][0] == pytest.approx(fairness.pearson_r(y_true, y_pred))
    assert stats["mae"][0] == pytest.approx(np.abs(y_true - y_pred).mean())
    constant = fairness.weighted_statistics(np.ones((1, 50)), y_true, np.zeros(50))
    assert np.isnan(constant["pearson_r"][0])


def test_flag_rule() -> None:
    rule = fairness.FlagRule(ci=0.95, min_abs_gap_sd=0.2)
    assert fairness.flag(-0.5, -0.8, -0.2, rule)
    assert not fairness.flag(-0.5, -0.9, 0.1, rule)  # CI includes 0
    assert not fairness.flag(0.1, 0.05, 0.15, rule)  # too small to matter
    assert rule.flag_ci(5) == pytest.approx(0.99)
    assert fairness.FlagRule(familywise=False).flag_ci(5) == 0.95


def test_reference_is_configurable_and_defaults_to_the_largest_group() -> None:
    labels = pd.Series(["B & feminine"] * 3 + ["A & masculine"] * 5 + ["A & feminine"] * 5)
    assert fairness.reference_group(CATEGORIES, ["group", "gender"], labels) == "A & feminine"  # tie: declared order
    assert fairness.reference_group(CATEGORIES, ["group", "gender"], labels, "B & feminine") == "B & feminine"
    with pytest.raises(PsyfaceError, match=r"reference.group & gender: 'B & masculine' is not a group"):
        fairness.reference_group(CATEGORIES, ["group", "gender"], labels, "B & masculine")
    with pytest.raises(PsyfaceError, match="no declared category"):
        fairness.reference_group(CATEGORIES, ["group"], pd.Series(["C"]))


def test_small_groups_are_reported_never_flagged() -> None:
    """A 7-category feature where three categories have a handful of faces, one of them with a huge gap."""
    rng = np.random.default_rng(7)
    sizes = {"w": 300, "b": 120, "a": 80, "h": 60, "x": 6, "y": 4, "z": 3}
    race = np.concatenate([[name] * n for name, n in sizes.items()])
    sensitive = pd.DataFrame({"race": race})
    face = rng.normal(size=len(race))
    shift = np.select([race == "b", race == "x"], [-0.8, -3.0], 0.0)
    ratings = pd.DataFrame({"trustworthy": 4 + face + shift})
    data = fairness.AuditData(ratings, ratings.copy(), sensitive, {"race": sorted(sizes)}, ratings.median().to_dict())
    result = fairness.audit(data, [["race"]], fairness.FlagRule(min_group_size=20), n_boot=200, seed=1, progress=False)
    gaps = result.gaps.set_index("group")
    assert set(gaps["reference"]) == {"w"}  # the largest, not the alphabetically first ("a")
    assert gaps.loc["b", "rating_gap_flag"] and not gaps.loc["b", "small_group"]
    assert gaps.loc["x", "small_group"] and gaps.loc["x", "n_group"] == 6 and gaps.loc["x", "rating_gap"] < -2
    assert not gaps.loc[["x", "y", "z"], [f"{k}_flag" for k in fairness.GAP_KINDS]].to_numpy().any()
    [summary] = result.summary.to_dict("records")
    assert summary["small_groups"] == {"x": 6, "y": 4, "z": 3}
    groups = result.groups.set_index("group")
    assert groups.loc["z", "count"] == 3 and groups.loc["z", "small_group"] and not groups.loc["w", "small_group"]
    assert fairness.flaggable(sensitive["race"], "w", 20) == 3  # Bonferroni counts b, a, h only


def test_no_sensitive_feature_gives_an_empty_audit_the_report_can_show() -> None:
    from psyface.report.stage import fairness_tables, report_metrics

    ratings = pd.DataFrame({"trust": [1.0, 2.0, 3.0]})
    data = fairness.AuditData(ratings, ratings, pd.DataFrame(index=ratings.index), {}, {"trust": 2.0})
    result = fairness.audit(data, [], fairness.FlagRule(), n_boot=10, seed=0, progress=False)
    assert result.groups.empty and result.gaps.empty and fairness.flagged_pairs(result) == []
    [table] = fairness_tables(result)
    assert table.frame["result"].tolist() == ["not available: dataset.yaml declares no sensitive features"]
    assert report_metrics({}, result)["report"]["fairness"] == {"flags": 0}
