"""Per-expression classifiers, IG landmark ranking and the reduction loop's bookkeeping."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from psyface.expressions.classifier import (
    TrainingParams,
    binary_scores,
    predict_proba,
    train_classifier,
)
from psyface.expressions.reduction import (
    Fitted,
    choose_step,
    count_steps,
    reduce_landmarks,
)
from psyface.expressions.relevance import baselines_for, landmark_relevance, ranking
from psyface.expressions.served import (
    ExpressionClassifier,
    LandmarkExpressionModel,
    feature_columns,
)
from psyface.expressions.stage import region_share
from psyface.shapes import coordinate_columns


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models: a second thread only adds hand-off cost (and thrashes on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


FAST = TrainingParams(hidden=16, epochs=150, batch_size=256, learning_rate=0.02, weight_decay=0.0)


def faces_where_two_landmarks_decide(n: int = 240, n_points: int = 8, used: tuple[int, int] = (3, 6)):
    """Flattened faces: the label is 1 when landmark used[0] sits above landmark used[1] (y axis)."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(n, 2 * n_points))
    labels = features[:, 2 * used[0] + 1] - features[:, 2 * used[1] + 1] > 0
    return features, labels


def test_a_classifier_trains_on_a_tiny_set_deterministically() -> None:
    features, labels = faces_where_two_landmarks_decide()
    first = train_classifier(features[:160], labels[:160], FAST, seed=3)
    again = train_classifier(features[:160], labels[:160], FAST, seed=3)
    held_out = predict_proba(first, features[160:])
    assert binary_scores(labels[160:], held_out)["accuracy"] >= 0.9
    np.testing.assert_array_equal(held_out, predict_proba(again, features[160:]))


def test_integrated_gradients_rank_the_only_two_used_landmarks_first() -> None:
    n_points, used = 8, (3, 6)
    weights = torch.zeros(2 * n_points)
    weights[feature_columns(np.array(used))] = torch.tensor([0.5, -1.0, 1.0, 2.0])
    model = nn.Sequential(nn.Linear(2 * n_points, 1), nn.Tanh(), nn.Flatten(0))
    with torch.no_grad():
        model[0].weight.copy_(weights[None])
        model[0].bias.zero_()
    inputs = np.random.default_rng(1).normal(size=(30, 2 * n_points))
    relevance = landmark_relevance(model, inputs, inputs.mean(axis=0, keepdims=True))
    assert set(ranking(relevance)[:2]) == set(used)
    np.testing.assert_array_equal(np.delete(relevance, used), 0.0)


def test_a_trained_classifier_is_ranked_by_the_landmarks_its_labels_depend_on() -> None:
    features, labels = faces_where_two_landmarks_decide(used=(1, 5))
    model = train_classifier(features, labels, FAST, seed=0)
    names = np.where(labels, "up", "down")
    baselines = baselines_for("other_class", features, names, "up", ["up", "down"])
    relevance = landmark_relevance(model, features[labels], baselines)
    assert set(ranking(relevance)[:2]) == {1, 5}


def test_other_class_baselines_are_the_most_typical_face_of_each_other_class() -> None:
    features = np.array([[0.0, 0], [1, 1], [10, 10], [11, 11], [12, 12], [-5, 0], [-7, 0], [-6, 0.1]])
    labels = np.array(["a", "a", "b", "b", "b", "c", "c", "c"])
    np.testing.assert_array_equal(baselines_for("other_class", features, labels, "a", ["a", "b", "c"]),
                                  [[11, 11], [-6, 0.1]])
    np.testing.assert_allclose(baselines_for("mean_face", features, labels, "a", ["a", "b", "c"]),
                               [features.mean(axis=0)])


def test_reduction_drops_the_least_relevant_landmarks_and_records_every_step() -> None:
    relevance_of = np.array([5.0, 0.1, 9.0, 0.3, 7.0, 0.2, 8.0, 0.4, 6.0, 3.0])
    loss_of = {10: 0.20, 7: 0.19, 4: 0.205, 2: 0.30}
    calls = []

    def fit(kept: np.ndarray) -> Fitted:
        calls.append(kept.copy())
        return Fitted({"val_log_loss": loss_of[len(kept)]}, relevance_of[kept])

    steps = reduce_landmarks(10, fit, drop_per_step=3, min_landmarks=2)

    assert [s.n_landmarks for s in steps] == [10, 7, 4, 2] == [len(c) for c in calls]
    assert len(steps) == count_steps(10, 3, 2)
    assert steps[1].kept.tolist() == [0, 2, 4, 6, 7, 8, 9]  # dropped 1, 5, 3: relevance 0.1, 0.2, 0.3
    assert steps[2].kept.tolist() == [2, 4, 6, 8]  # dropped 7, 9, 0: 0.4, 3.0, 5.0
    assert steps[3].kept.tolist() == [2, 6]  # dropped 4, 8: 7.0, 6.0
    assert all(set(b.kept) < set(a.kept) for a, b in zip(steps, steps[1:]))
    assert choose_step(steps, "val_log_loss", tolerance=0.01) == 2  # 0.205 <= 0.20 + 0.01; 0.30 is not
    assert choose_step(steps, "val_log_loss", tolerance=0.0) == 1


def test_reduction_rejects_a_fit_that_ranks_the_wrong_landmarks() -> None:
    with pytest.raises(ValueError, match="3 relevances for 5 landmarks"):
        reduce_landmarks(5, lambda kept: Fitted({}, np.ones(3)), drop_per_step=1, min_landmarks=1)


def test_region_share_counts_kept_landmarks_inside_the_expression_regions() -> None:
    regions = {"mouth": [4, 5, 6], "brows": [0, 1], "jaw": [2, 3]}
    assert region_share(np.array([0, 4, 5, 2]), ["mouth", "brows"], regions) == 0.75


def test_served_model_takes_pixel_coordinates_and_uses_only_kept_landmarks() -> None:
    """The registered model normalises raw coordinates itself, so a posed copy predicts the same."""
    n_points, kept = 8, np.array([1, 5])
    features, labels = faces_where_two_landmarks_decide(n_points=n_points, used=(1, 5))
    model = train_classifier(features[:, feature_columns(kept)], labels, FAST, seed=0)
    reference = np.random.default_rng(2).normal(size=(n_points, 2))
    served = LandmarkExpressionModel(reference, np.arange(n_points), {"up": ExpressionClassifier(model, kept),
                                                 "down": ExpressionClassifier(model, kept)})
    faces = reference + np.random.default_rng(3).normal(scale=0.1, size=(6, n_points, 2))
    posed = 40 * faces + 17.0
    columns = coordinate_columns(n_points)
    out = served.predict(None, pd.DataFrame(faces.reshape(6, -1), columns=columns))
    out_posed = served.predict(None, pd.DataFrame(posed.reshape(6, -1), columns=columns))
    assert list(out.columns) == ["p_up", "p_down", "expression"]
    np.testing.assert_allclose(out["p_up"], out_posed["p_up"], rtol=1e-5)
