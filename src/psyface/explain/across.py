"""`psyface verdicts`: which explanation to trust for each attribute across several runs (seeds).

    dvc exp run --queue -S train.seed=1 && dvc exp run --queue -S train.seed=2 && dvc queue start
    psyface verdicts                     # HEAD's committed run and every experiment of HEAD
    psyface verdicts exp-a exp-b run3/reports/explain/metrics.json --out verdicts.json

One run's verdict is a pick among noisy estimates: its method is the best of several on one training,
and on another seed the best is another method (README: Explanations that are measured). Here a
method is trusted only if it is trusted in every run (passes the run's randomisation and chance
checks for the attribute), and it is judged by its worst run; an attribute that any run does not
predict gets no method.

Reads each run's `reports/explain/metrics.json` (the explain stage's): a path to such a file, or a
Git revision / DVC experiment name whose committed file is read through DVC's API.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from psyface.arguments import unit_interval
from psyface.artifacts import EXPLAIN_METRICS_FILE
from psyface.config import PARAMS_FILE, read_yaml
from psyface.errors import PsyfaceError, entry_point
from psyface.io import write_json_atomic

WORKSPACE = "workspace"


def method_rma(run: dict[str, Any], method: str, attribute: str) -> float | None:
    """RMA of `method`'s maps of `attribute` in one run's explain metrics (None: not measured, or
    `method` is one of the block's other keys such as `test_r`)."""
    scores = run.get(method)
    scores = scores.get("localisation") if isinstance(scores, dict) else None
    scores = scores.get(attribute) if isinstance(scores, dict) else None
    return scores.get("relevance_mass_accuracy") if isinstance(scores, dict) else None


def passing_methods(run: dict[str, Any], attribute: str) -> set[str]:
    """Methods whose maps of `attribute` one run measured and that fail none of its checks."""
    measured = {method for method in run if method_rma(run, method, attribute) is not None}
    return measured - set(run["verdict"][attribute]["failing"])


def verdict_across(runs: dict[str, dict[str, Any]], target: float | None = None) -> dict[str, Any]:
    """Per attribute: the method trusted in every run with the best worst-run RMA, its RMA in each
    run, and why the rest were dropped (which run fails them). `runs`: name -> explain metrics."""
    if len(runs) < 2:
        raise PsyfaceError(f"a verdict across runs needs two or more runs, got {len(runs)}")
    attributes = list(next(iter(runs.values()))["verdict"])
    for name, run in runs.items():
        if list(run["verdict"]) != attributes:
            raise PsyfaceError(f"run {name!r} explains {list(run['verdict'])}, the first run {attributes}: "
                               "compare runs of one dataset")
    result = {}
    for attribute in attributes:
        unpredicted = [name for name, run in runs.items() if not run["verdict"][attribute]["predicted"]]
        invalid = [name for name, run in runs.items() if run["verdict"][attribute]["ground_truth"].startswith("not valid")]
        trusted = {name: set() if name in unpredicted or name in invalid else passing_methods(run, attribute)
                   for name, run in runs.items()}
        everywhere = set.intersection(*trusted.values())
        worst = {method: min(method_rma(run, method, attribute) for run in runs.values()) for method in everywhere}
        best = max(sorted(worst), key=worst.__getitem__, default=None)
        dropped = {method: [name for name, methods in trusted.items() if method not in methods]
                   for method in sorted(set.union(*trusted.values()) - everywhere)}
        entry: dict[str, Any] = {
            "trusted_method": best,
            "worst_rma": worst.get(best) if best else None,
            "rma_by_run": {name: method_rma(run, best, attribute) for name, run in runs.items()} if best else {},
            "trusted_by_run": {name: run["verdict"][attribute]["trusted_method"] for name, run in runs.items()},
            "not_trusted_in": dropped,
            "covering_score": lowest_covering_score(runs, best, attribute) if best else None,
            "model_region_share": lowest_region_share(runs, attribute),
        }
        if unpredicted:
            entry["verdict"] = f"not predicted in {unpredicted}: no method is trusted"
        elif invalid:
            entry["verdict"] = f"ground truth not valid in {invalid}: no method is trusted"
        elif best is None:
            entry["verdict"] = "no method is trusted in every run"
        else:
            entry["verdict"] = f"{best} is trusted in all {len(runs)} runs, RMA {entry['worst_rma']:.2f} in the worst"
            if entry["covering_score"] is not None:
                entry["verdict"] += f"; the mask on its grid scores {entry['covering_score']:.2f}"
            if entry["model_region_share"] is not None:
                entry["verdict"] += f"; the model's own region share is {entry['model_region_share']:.2f} in the lowest run"
        if target is not None and best is not None:
            entry["meets_target"] = entry["worst_rma"] >= target
        result[attribute] = entry
    return {"runs": list(runs), "target": target, "attributes": result}


def lowest_covering_score(runs: dict[str, dict[str, Any]], method: str, attribute: str) -> float | None:
    """What a map marking the whole region scores on `method`'s grid (the stage's `covering_score`), the
    lowest over the runs that report it: the most a right map of that layer can be expected to reach.
    None for pixel methods and for metrics written before the stage reported it."""
    values = [score for run in runs.values()
              if (score := run[method]["localisation"].get(attribute, {}).get("covering_score")) is not None]
    return min(values, default=None)


def lowest_region_share(runs: dict[str, dict[str, Any]], attribute: str) -> float | None:
    """How local the model itself is (the stage's `region_swap`, carried in its verdict), the lowest over
    the runs that report it: beside the worst run's RMA, it says whether the map or the model spreads.
    None for metrics written before the stage measured it."""
    values = [share for run in runs.values() if (share := run["verdict"][attribute].get("model_region_share")) is not None]
    return min(values, default=None)


def read_run(source: str) -> dict[str, Any]:
    """One run's explain metrics: `source` is a metrics file, `workspace`, or a revision / experiment."""
    path = Path(source)
    if source == WORKSPACE:
        path = EXPLAIN_METRICS_FILE
    if path.is_file():
        text = path.read_text()
    else:
        import dvc.api
        from dvc.exceptions import DvcException

        try:
            text = dvc.api.read(str(EXPLAIN_METRICS_FILE), rev=source)
        except (DvcException, FileNotFoundError) as error:
            raise PsyfaceError(f"{source!r} is neither a metrics file nor a revision with {EXPLAIN_METRICS_FILE} "
                               f"({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None
    try:
        return json.loads(text)["explain"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise PsyfaceError(f"{source}: not the explain stage's metrics (no 'explain' block)") from None


def experiments_of_head() -> list[str]:
    """HEAD (the committed run, the sweep's baseline) and every finished DVC experiment derived from
    it, sorted by name (`dvc exp show`'s rows); the workspace only when named, as after `dvc exp run` it
    holds a copy of the last experiment."""
    import dvc.api
    from dvc.exceptions import DvcException

    try:
        rows = dvc.api.exp_show()
    except DvcException as error:
        raise PsyfaceError(f"cannot list the DVC experiments here ({str(error).splitlines()[0]}): run in a DVC "
                           "project, or name the runs") from None
    unfinished = ("Queued", "Running", "Failed")
    return ["HEAD"] + sorted(row["Experiment"] for row in rows
                             if row["typ"] != "baseline" and row["Experiment"] and row.get("State") not in unfinished)


def table(verdicts: dict[str, Any]) -> str:
    """The verdict per attribute as aligned text: method, worst RMA, each run's RMA."""
    width = max(map(len, verdicts["attributes"]))
    lines = [f"runs: {', '.join(verdicts['runs'])}" + (f"; target RMA {verdicts['target']:g}" if verdicts["target"] is not None else "")]
    for attribute, entry in verdicts["attributes"].items():
        rmas = " / ".join(f"{value:.2f}" for value in entry["rma_by_run"].values())
        met = {True: "meets target", False: "misses target"}.get(entry.get("meets_target"), "")
        lines.append(f"  {attribute.ljust(width)}  {entry['trusted_method'] or 'none':<16} "
                     f"{rmas:<24} {met}  ({entry['verdict']})")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="psyface verdicts", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", metavar="RUN",
                        help="metrics file, 'workspace', Git revision or DVC experiment (default: HEAD and "
                             "every experiment of HEAD)")
    parser.add_argument("--target", type=unit_interval, default=None,
                        help="RMA the worst run must reach (default: params.yaml explain.rma_target)")
    parser.add_argument("--out", type=Path, default=None, help="also write the verdicts as JSON here")
    return parser.parse_args(argv)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    target = args.target
    if target is None and PARAMS_FILE.is_file():
        target = read_yaml(PARAMS_FILE).get("explain", {}).get("rma_target")
    names = args.runs or experiments_of_head()
    if not args.runs and len(names) < 2:
        raise PsyfaceError("HEAD has no finished DVC experiments to compare with: run seeds first "
                           "(`dvc exp run --queue -S train.seed=1 && dvc queue start`) or name the runs (experiments of an "
                           "earlier commit: `dvc exp ls --all-commits`)")
    if len(set(names)) != len(names):
        raise PsyfaceError(f"a run is named twice in {names}")
    verdicts = verdict_across({name: read_run(name) for name in names}, target)
    print(table(verdicts))
    if args.out:
        write_json_atomic(verdicts, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
