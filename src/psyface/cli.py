"""The `psyface` command for humans: a thin dispatcher to each module's own `main(argv)`.

Modules are imported only when their command runs, so `psyface --help` stays instant (torch is slow
to import). Each entry: command -> (module, one-line help).
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("psyface.dataset.synth", "generate the deterministic synthetic face dataset"),
    "synth-real": ("psyface.dataset.real_layout", "the synthetic faces as a lab hands them over (JPEG, long ratings)"),
    "split": ("psyface.split", "stage: assign ids to train/val/test"),
    "prepare": ("psyface.prepare", "stage: decode and resize every image once into an array"),
    "validate": ("psyface.validate", "stage: check data/ against dataset.yaml (reports, quarantine)"),
    "import": ("psyface.dataset.importers", "convert a rated face collection (generic table, us10k) into data/"),
    "landmarks": ("psyface.landmarks", "stage: normalise landmark coordinates for position, scale and roll"),
    "expressions": ("psyface.expressions.stage", "stage: per-expression landmark classifiers, IG ranking, reduction"),
    "train": ("psyface.train", "stage: train the network, track it in MLflow, register a candidate"),
    "evaluate": ("psyface.evaluate", "stage: test metrics vs the reliability ceiling; promote to champion if better"),
    "predict": ("psyface.predict", "rate face images with a registered model (models:/NAME@ALIAS)"),
    "explain": ("psyface.explain.cli", "attribution maps (overlays + raw .npy) of a registered model for any images"),
    "verdicts": ("psyface.explain.across", "which explanation to trust per attribute across runs (seeds): trusted in all, judged by the worst"),
    "report": ("psyface.report.stage", "stage: manifold view, bias audit and the self-contained HTML report"),
    "transfer": ("psyface.transfer.stage", "base models from dataset columns; the transfer learning-curve sweep"),
    "server": ("psyface.server", "the team's MLflow server on PostgreSQL with users: init/start/stop/status/user/import"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "usage: psyface COMMAND [ARGS...]\n\ncommands:\n" + "\n".join(lines) + (
        "\n\n`psyface COMMAND --help` describes each command."
    )


def main(argv: list[str] | None = None) -> int | None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"psyface: error: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
