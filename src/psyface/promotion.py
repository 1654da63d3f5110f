"""The promotion rule, one implementation for every registered model (the attribute network in
`evaluate`, the transfer base models): a version becomes `champion` only if its test score beats the
current champion's on the same data and split; the decision and its reason become tags on the version.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mlflow.entities.model_registry import ModelVersion

from psyface import tracking

# The version tag holding the score a model is ranked by (test mean Pearson r; accuracy for a class task).
SCORE_TAG = "test_mean_pearson_r"


@dataclass(frozen=True)
class Score:
    """What promotion compares: a model's test score and where it was measured."""

    mean_r: float
    data_hash: str
    split_hash: str


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


def tagged_score(version: ModelVersion, here: Score) -> Score | None:
    """A version's score from its tags when it was measured on `here`'s data and split, else None."""
    tags = version.tags
    if tags.get("data_hash") == here.data_hash and tags.get("split_hash") == here.split_hash and SCORE_TAG in tags:
        return Score(float(tags[SCORE_TAG]), here.data_hash, here.split_hash)
    return None


def promote(name: str, version: str, here: Score, eligible: bool = True,
            rescore: Callable[[ModelVersion], Score] | None = None, tags: Mapping[str, str] | None = None,
            score_name: str = "mean r") -> tuple[bool, str]:
    """Decide whether version `version` of `name` (scored `here`; `eligible` False for a failed
    training) replaces the champion, tag the decision on the version and move the alias if so.

    The champion's score comes from its tags when it was measured on the same data and split, else
    from `rescore` (the champion scored here); without `rescore` it stays unknown (NaN), which never
    loses to a candidate on the same data. The decision holds the registry lock, so two evaluations
    at once (two machines, one server) never leave `champion` on the worse version."""
    with tracking.registry_lock(name):  # read-compare-write of `champion`: one decision at a time, across machines
        current = tracking.alias_version(name, tracking.CHAMPION)
        if current is not None and str(current.version) == str(version):
            promoted, reason = True, "already the champion (re-evaluated)"
        else:
            champion = None
            if current is not None:
                champion = tagged_score(current, here) or (rescore(current) if rescore else Score(
                    math.nan, str(current.tags.get("data_hash")), str(current.tags.get("split_hash"))))
            promoted, reason = decide(here if eligible else None, champion)
        reason = reason.replace("mean r", score_name)
        tracking.tag_version(name, version, {**(tags or {}), SCORE_TAG: score_tag(here.mean_r),
                                             "promotion.decision": "champion" if promoted else "rejected",
                                             "promotion.reason": reason})
        if promoted:
            tracking.set_alias(name, tracking.CHAMPION, version)
    return promoted, reason
