"""The report stage: manifold view (manifold.py), bias audit (fairness.py), the HTML page (html.py)."""
