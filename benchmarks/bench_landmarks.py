"""Inference cost of the landmark expression classifiers: all landmarks vs the reduced set.

Prints µs per face side by side (best of several repeats, one torch thread) for the classifier
alone at several batch sizes and for the served model (normalisation + five classifiers). Uses
the reduced sizes from reports/landmarks/metrics.json when the pipeline has run, else 30 %.

    PYTHONPATH=src python benchmarks/bench_landmarks.py
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from psyface.expressions.classifier import LandmarkClassifier, TrainingParams
from psyface.expressions.served import ExpressionClassifier, LandmarkExpressionModel
from psyface.shapes import coordinate_columns

N_POINTS = 38
EXPRESSIONS = ["neutral", "happy", "sad", "surprised", "angry"]
METRICS = Path("reports/landmarks/metrics.json")


def best_seconds(run: Callable[[], object], repeats: int = 30) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def classifier(n_landmarks: int, hidden: int) -> LandmarkClassifier:
    features = 2 * n_landmarks
    return LandmarkClassifier(torch.zeros(features), torch.ones(features), hidden).eval()


def reduced_sizes() -> dict[str, int]:
    if METRICS.is_file():
        metrics = json.loads(METRICS.read_text())["expressions"]
        return {e: metrics[e]["reduced"]["n_landmarks"] for e in EXPRESSIONS if e in metrics}
    return dict.fromkeys(EXPRESSIONS, round(0.3 * N_POINTS))


def main() -> None:
    torch.set_num_threads(1)
    hidden = TrainingParams().hidden
    sizes = reduced_sizes()
    n_reduced = max(sizes.values())
    rng = np.random.default_rng(0)
    print(f"landmark classifiers, hidden={hidden}: {N_POINTS} landmarks vs reduced (largest kept set: {n_reduced})")
    print(f"{'case':<44}{'full µs/face':>14}{'reduced µs/face':>17}{'ratio':>8}")
    full, reduced = classifier(N_POINTS, hidden), classifier(n_reduced, hidden)
    for batch in (1, 256, 4096):
        x_full = torch.as_tensor(rng.normal(size=(batch, 2 * N_POINTS)), dtype=torch.float32)
        x_reduced = x_full[:, : 2 * n_reduced].contiguous()
        with torch.inference_mode():
            t_full = best_seconds(lambda: full(x_full)) / batch
            t_reduced = best_seconds(lambda: reduced(x_reduced)) / batch
        print(f"{f'one classifier, batch {batch}':<44}{1e6 * t_full:>14.3f}{1e6 * t_reduced:>17.3f}{t_full / t_reduced:>8.2f}")
    reference = rng.normal(size=(N_POINTS, 2))
    anchors = np.arange(N_POINTS)
    served_full = LandmarkExpressionModel(
        reference, anchors, {e: ExpressionClassifier(classifier(N_POINTS, hidden), np.arange(N_POINTS)) for e in EXPRESSIONS}
    )
    served_reduced = LandmarkExpressionModel(
        reference, anchors, {e: ExpressionClassifier(classifier(n, hidden), np.arange(n)) for e, n in sizes.items()}
    )
    for batch in (1, 1024):
        faces = reference + rng.normal(scale=0.05, size=(batch, N_POINTS, 2))
        frame = pd.DataFrame(faces.reshape(batch, -1), columns=coordinate_columns(N_POINTS))
        t_full = best_seconds(lambda: served_full.predict(None, frame), repeats=10) / batch
        t_reduced = best_seconds(lambda: served_reduced.predict(None, frame), repeats=10) / batch
        label = f"served model (normalise + {len(sizes)} classifiers), batch {batch}"
        print(f"{label:<44}{1e6 * t_full:>14.3f}{1e6 * t_reduced:>17.3f}{t_full / t_reduced:>8.2f}")


if __name__ == "__main__":
    main()
