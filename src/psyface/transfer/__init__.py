"""Transfer learning from base tasks: `core` (bases, sweep), `maps` (heatmaps, heads), `stage` (CLI)."""
