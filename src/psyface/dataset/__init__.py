"""Datasets: the canonical on-disk layout, the synthetic generator and importers for real layouts."""
