"""The evaluate stage's pure parts: metrics against known values and the promotion rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from psyface.evaluate import attribute_metrics
from psyface.promotion import Score, decide, score_tag


def test_promotion_rule():
    here = Score(0.8, "d1", "s1")
    assert decide(here, None) == (True, "first champion (test mean r 0.8000)")
    assert decide(here, Score(0.7, "d1", "s1"))[0]
    assert not decide(here, Score(0.8, "d1", "s1"))[0]  # a tie is not better
    assert not decide(here, Score(0.9, "d1", "s1"))[0]
    assert not decide(Score(math.nan, "d1", "s1"), None)[0]
    assert not decide(None, Score(0.1, "d1", "s1"))[0]
    assert "not comparable" in decide(here, Score(0.1, "d2", "s1"))[1]


def test_a_champion_read_back_from_its_tag_ties_with_the_same_score():
    score = 0.82791528341  # a rerun of the same model scores exactly this again
    champion = Score(float(score_tag(score)), "d1", "s1")
    assert champion.mean_r == score
    assert not decide(Score(score, "d1", "s1"), champion)[0]


def test_attribute_metrics_against_known_values():
    rated = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    metrics = attribute_metrics(rated * 2, rated, reliability=0.81)
    assert metrics["pearson_r"] == pytest.approx(1) and metrics["spearman_rho"] == pytest.approx(1)
    assert metrics["mae"] == pytest.approx(3.0) and metrics["ceiling"] == pytest.approx(0.9)
    assert metrics["r_over_ceiling"] == pytest.approx(1 / 0.9)
    assert metrics["r2"] == pytest.approx(1 - 55 / 10)
    assert math.isnan(attribute_metrics(np.ones(5), rated, None)["pearson_r"])
