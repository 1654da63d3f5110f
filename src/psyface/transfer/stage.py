"""`psyface transfer {base COLUMN | sweep | maps}`: the stages of `experiments/transfer/dvc.yaml`."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from psyface.config import PARAMS_FILE, from_dict, read_yaml
from psyface.errors import entry_point
from psyface.transfer.core import TransferParams, run_sweep, train_base


def load_params(path: Path = PARAMS_FILE) -> TransferParams:
    """The `transfer:` section, its `train:` recipe being the train section's with `transfer.train`'s
    keys on top: one recipe in params.yaml, not a second copy of every training default."""
    params = read_yaml(path) if path.exists() else {}
    section = dict(params.get("transfer") or {})
    section["train"] = {**(params.get("train") or {}), **(section.get("train") or {})}
    return from_dict(TransferParams, section, f"{path}:transfer")


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="psyface transfer", description="base models from dataset columns; the transfer learning-curve sweep")
    commands = parser.add_subparsers(dest="command", required=True)
    base = commands.add_parser("base", help="train and register the base model of one dataset column")
    base.add_argument("column", help="a declared column: a sensitive feature, a label or an attribute")
    commands.add_parser("sweep", help="the learning-curve sweep: fractions x inits x seeds, nested runs")
    commands.add_parser("maps", help="LRP/Grad-CAM mean maps of bases and transferred models; binary vs k-class heads")
    args = parser.parse_args(argv)
    params = load_params()
    if args.command == "base":
        train_base(args.column, params)
    elif args.command == "sweep":
        print(summarise_text(run_sweep(params)))
    else:
        from psyface.transfer.maps import run_heads, run_maps

        print(summarise_text(run_maps(params, params.map_images)))
        print(summarise_text(run_heads(params, params.map_images)))
    return 0


def summarise_text(summary: pd.DataFrame) -> str:
    return summary.to_string(index=False, float_format=lambda v: f"{v:.3f}")


if __name__ == "__main__":
    main()
