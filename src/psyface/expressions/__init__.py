"""Landmark-based expression classifiers, dataset-level Integrated Gradients and landmark reduction.

The Di Luzio et al. method: one binary (one-vs-rest) classifier per expression on normalised
landmark coordinates, a per-landmark relevance from Integrated Gradients aggregated over a data set,
and an iterative loop that drops the least relevant landmarks and retrains.
"""
