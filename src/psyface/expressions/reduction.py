"""Iterative landmark reduction: fit, rank, drop the k least relevant, refit, until a floor.

Pure bookkeeping around a `fit` callable, so the loop is testable without any model: `fit(kept)`
trains on the landmarks `kept` and returns scores plus one relevance per kept landmark.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Fitted:
    """One model trained on a landmark subset: its scores, per-landmark relevance, the model."""

    scores: dict[str, float]
    relevance: np.ndarray  # aligned with the `kept` it was fitted on
    model: Any = None


@dataclass(frozen=True)
class ReductionStep:
    kept: np.ndarray  # sorted landmark indices the model used
    fitted: Fitted

    @property
    def n_landmarks(self) -> int:
        return len(self.kept)


def reduce_landmarks(
    n_points: int, fit: Callable[[np.ndarray], Fitted], drop_per_step: int, min_landmarks: int
) -> list[ReductionStep]:
    """Start from all landmarks; after each fit drop the `drop_per_step` least relevant ones."""
    if drop_per_step < 1 or not 1 <= min_landmarks <= n_points:
        raise ValueError(f"need drop_per_step >= 1 and 1 <= min_landmarks <= {n_points}")
    kept = np.arange(n_points)
    steps: list[ReductionStep] = []
    while True:
        fitted = fit(kept)
        if len(fitted.relevance) != len(kept):
            raise ValueError(f"fit returned {len(fitted.relevance)} relevances for {len(kept)} landmarks")
        steps.append(ReductionStep(kept, fitted))
        if len(kept) <= min_landmarks:
            return steps
        n_drop = min(drop_per_step, len(kept) - min_landmarks)
        least_relevant = np.argsort(fitted.relevance, kind="stable")[:n_drop]
        kept = np.delete(kept, least_relevant)


def count_steps(n_points: int, drop_per_step: int, min_landmarks: int) -> int:
    """How many fits `reduce_landmarks` will make (for progress bars)."""
    return 1 + -(-max(n_points - min_landmarks, 0) // drop_per_step)


def choose_step(steps: list[ReductionStep], loss: str, tolerance: float) -> int:
    """Index of the fewest-landmark step whose `loss` exceeds the full model's by at most `tolerance`.

    A loss (validation log loss), not accuracy: on a few hundred faces accuracy moves in steps of
    several tenths of a point and hides a degrading model until it flips predictions. Absolute, not
    relative: an easy expression's tiny loss would make a relative band narrower than the noise.
    """
    ceiling = steps[0].fitted.scores[loss] + tolerance
    eligible = [i for i, step in enumerate(steps) if step.fitted.scores[loss] <= ceiling]
    return min(eligible, key=lambda i: (steps[i].n_landmarks, i))


@dataclass(frozen=True)
class ExpressionResult:
    """One expression's reduction path and the step chosen as its reduced landmark set."""

    expression: str
    steps: list[ReductionStep]
    chosen: int

    @property
    def full(self) -> ReductionStep:
        return self.steps[0]

    @property
    def reduced(self) -> ReductionStep:
        return self.steps[self.chosen]
