"""`psyface verdicts`: a method is trusted across runs only if every run trusts it, judged by its worst run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import SRC, run_cli, run_dvc

from psyface.errors import PsyfaceError
from psyface.explain.across import read_run, verdict_across

RANDOMISATION = "fails randomisation (rank correlation 0.60 >= 0.2 with every layer randomised)"


def run_metrics(rma: dict[str, dict[str, float]], failing: dict[str, dict[str, str]] | None = None,
                unpredicted: tuple[str, ...] = ()) -> dict[str, Any]:
    """An explain `metrics.json` block as the stage writes it: per-method RMA per attribute and, per
    attribute, the verdict's `failing` methods; the trusted method is the best that does not fail."""
    failing = failing or {}
    attributes = sorted({name for scores in rma.values() for name in scores})
    run: dict[str, Any] = {method: {"localisation": {name: {"relevance_mass_accuracy": value} for name, value in scores.items()}}
                           for method, scores in rma.items()}
    run |= {"aligned": True, "test_images": 300, "test_r": {name: .9 for name in attributes}}  # the block's other keys
    run["verdict"] = {}
    for name in attributes:
        passing = [m for m in rma if name in rma[m] and m not in failing.get(name, {})]
        best = max(passing, key=lambda m: rma[m][name], default=None) if name not in unpredicted else None
        run["verdict"][name] = {"predicted": name not in unpredicted, "ground_truth": "valid",
                                "trusted_method": best, "failing": failing.get(name, {})}
    return run


def test_a_method_failing_in_one_run_is_not_trusted_and_the_best_worst_run_wins():
    runs = {
        "seed0": run_metrics({"lrp": {"happy": .9}, "gradcam_plusplus": {"happy": .80}, "hirescam": {"happy": .62}}),
        "seed1": run_metrics({"lrp": {"happy": .9}, "gradcam_plusplus": {"happy": .40}, "hirescam": {"happy": .60}},
                             failing={"happy": {"lrp": RANDOMISATION}}),
    }
    assert runs["seed0"]["verdict"]["happy"]["trusted_method"] == "lrp"  # each run alone trusts another method
    assert runs["seed1"]["verdict"]["happy"]["trusted_method"] == "hirescam"
    happy = verdict_across(runs, target=0.7)["attributes"]["happy"]
    # Grad-CAM++ is better on average (.60 vs .61) but HiResCAM's worst run is better (.60 vs .40)
    assert happy["trusted_method"] == "hirescam"
    assert happy["worst_rma"] == pytest.approx(.60)
    assert happy["rma_by_run"] == {"seed0": pytest.approx(.62), "seed1": pytest.approx(.60)}
    assert happy["trusted_by_run"] == {"seed0": "lrp", "seed1": "hirescam"}
    assert happy["not_trusted_in"] == {"lrp": ["seed1"]}
    assert happy["meets_target"] is False
    assert "all 2 runs" in happy["verdict"] and "0.60" in happy["verdict"]


def test_two_copies_of_the_committed_run_give_its_own_verdict():
    """On the explain stage's real output: the same run twice trusts what the run trusts, at its RMA."""
    committed = read_run(str(SRC.parent / "reports" / "explain" / "metrics.json"))
    across = verdict_across({"a": committed, "b": committed})["attributes"]
    assert list(across) == list(committed["verdict"])
    for name, verdict in committed["verdict"].items():
        assert across[name]["trusted_method"] == verdict["trusted_method"], name
        if verdict["trusted_method"]:
            assert across[name]["worst_rma"] == verdict["relevance_mass_accuracy"]
    assert any(entry["trusted_method"] is None for entry in across.values())  # the control
    for name, entry in across.items():  # the CAM methods' grid: the mask on it, as the stage scored it
        method = entry["trusted_method"]
        if method:
            assert entry["covering_score"] == committed[method]["localisation"][name]["covering_score"]
            assert f"the mask on its grid scores {entry['covering_score']:.2f}" in entry["verdict"]
            assert entry["model_region_share"] == committed["verdict"][name]["model_region_share"]


def test_the_mask_on_its_grid_is_the_lowest_any_run_reports_and_absent_for_pixel_methods():
    runs = {name: run_metrics({"hirescam": {"warm": .5}, "lrp": {"happy": .6}}) for name in ("a", "b", "old")}
    runs["a"]["hirescam"]["localisation"]["warm"]["covering_score"] = .74
    runs["b"]["hirescam"]["localisation"]["warm"]["covering_score"] = .72  # "old" predates the score
    attributes = verdict_across(runs)["attributes"]
    assert attributes["warm"]["covering_score"] == pytest.approx(.72)
    assert attributes["warm"]["verdict"].endswith("the mask on its grid scores 0.72")
    assert attributes["happy"]["covering_score"] is None and "grid" not in attributes["happy"]["verdict"]


def test_the_model_region_share_is_the_lowest_any_run_reports():
    runs = {name: run_metrics({"hirescam": {"warm": .5}}) for name in ("a", "b", "old")}
    runs["a"]["verdict"]["warm"]["model_region_share"] = .73
    runs["b"]["verdict"]["warm"]["model_region_share"] = .65  # "old" predates the measure
    warm = verdict_across(runs)["attributes"]["warm"]
    assert warm["model_region_share"] == pytest.approx(.65)
    assert warm["verdict"].endswith("the model's own region share is 0.65 in the lowest run")
    for run in runs.values():
        run["verdict"]["warm"].pop("model_region_share", None)
    assert verdict_across(runs)["attributes"]["warm"]["model_region_share"] is None


def test_the_target_is_met_only_when_the_worst_run_reaches_it():
    runs = {name: run_metrics({"hirescam": {"age": value}}) for name, value in (("a", .78), ("b", .71), ("c", .74))}
    age = verdict_across(runs, target=0.7)["attributes"]["age"]
    assert age["meets_target"] is True and age["worst_rma"] == pytest.approx(.71)
    assert verdict_across(runs, target=0.72)["attributes"]["age"]["meets_target"] is False
    assert "meets_target" not in verdict_across(runs)["attributes"]["age"]


def test_an_attribute_one_run_does_not_predict_gets_no_method():
    runs = {"a": run_metrics({"hirescam": {"warm": .8}}), "b": run_metrics({"hirescam": {"warm": .8}}, unpredicted=("warm",))}
    warm = verdict_across(runs)["attributes"]["warm"]
    assert warm["trusted_method"] is None and warm["worst_rma"] is None and warm["rma_by_run"] == {}
    assert warm["verdict"] == "not predicted in ['b']: no method is trusted"


def test_no_method_trusted_everywhere_is_said_so():
    runs = {"a": run_metrics({"hirescam": {"dominant": .6}, "lrp": {"dominant": .8}}, failing={"dominant": {"lrp": RANDOMISATION}}),
            "b": run_metrics({"hirescam": {"dominant": .6}, "lrp": {"dominant": .8}}, failing={"dominant": {"hirescam": "x"}})}
    dominant = verdict_across(runs)["attributes"]["dominant"]
    assert dominant["trusted_method"] is None
    assert dominant["verdict"] == "no method is trusted in every run"
    assert dominant["not_trusted_in"] == {"hirescam": ["b"], "lrp": ["a"]}


def test_one_run_or_runs_of_different_attributes_are_refused():
    one = run_metrics({"hirescam": {"age": .7}})
    with pytest.raises(PsyfaceError, match="two or more runs"):
        verdict_across({"a": one})
    with pytest.raises(PsyfaceError, match="one dataset"):
        verdict_across({"a": one, "b": run_metrics({"hirescam": {"happy": .7}})})


def test_outside_a_dvc_project_the_default_runs_are_one_clear_error(tmp_path):
    done = run_cli("verdicts", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("psyface: error: cannot list the DVC experiments here"), done.stderr


def test_a_file_that_is_not_explain_metrics_is_one_clear_error(tmp_path):
    (tmp_path / "other.json").write_text(json.dumps({"evaluate": {}}))
    with pytest.raises(PsyfaceError, match="not the explain stage's metrics"):
        read_run(str(tmp_path / "other.json"))


# ---------------------------------------------------------------- DVC experiments, for real

WRITE_METRICS = '''
import json, yaml
params = yaml.safe_load(open("params.yaml"))["explain"]
runs = json.load(open("template.json"))
json.dump({"explain": runs[str(params["seed"])]}, open("reports/explain/metrics.json", "w"))
'''


def git(root: Path, *args: str, env: dict[str, str]) -> str:
    return subprocess.run(["git", *args], cwd=root, env=env, check=True, capture_output=True, text=True).stdout


@pytest.mark.slow
def test_verdicts_of_head_and_its_dvc_experiments(tmp_path):
    """A DVC project whose stage writes explain metrics chosen by `explain.seed`: HEAD's committed run
    and two `dvc exp run -S explain.seed=...` experiments, read back through DVC by default."""
    root = tmp_path / "project"
    (root / "reports" / "explain").mkdir(parents=True)
    template = {
        "0": run_metrics({"hirescam": {"age": .78}, "gradcam_plusplus": {"age": .90}}),
        "1": run_metrics({"hirescam": {"age": .72}, "gradcam_plusplus": {"age": .95}}, failing={"age": {"gradcam_plusplus": "x"}}),
        "2": run_metrics({"hirescam": {"age": .75}, "gradcam_plusplus": {"age": .60}}),
    }
    (root / "template.json").write_text(json.dumps(template))
    (root / "write_metrics.py").write_text(WRITE_METRICS)
    (root / "params.yaml").write_text(yaml.safe_dump({"explain": {"seed": 0, "rma_target": 0.7}}))
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"explain": {
        "cmd": f"{sys.executable} write_metrics.py", "deps": ["template.json", "write_metrics.py"],
        "params": ["explain.seed"], "metrics": [{"reports/explain/metrics.json": {"cache": False}}]}}}))
    env = {**os.environ, "PYTHONPATH": str(SRC), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}
    git(root, "init", "-q", env=env)
    run_dvc(root, "init", "-q", env=env)
    run_dvc(root, "repro", "-q", env=env)
    git(root, "add", "-A", env=env)
    git(root, "commit", "-qm", "seed 0", env=env)
    alone = run_cli("verdicts", cwd=root, env=env)
    assert alone.returncode == 2 and "no finished DVC experiments" in alone.stderr.strip().splitlines()[-1], alone.stderr
    for seed in (1, 2):
        run_dvc(root, "exp", "run", "-S", f"explain.seed={seed}", "-n", f"seed-{seed}", env=env)

    shown = run_cli("verdicts", "--out", "verdicts.json", cwd=root, env=env)
    assert shown.returncode == 0, shown.stderr[-2000:]
    verdicts = json.loads((root / "verdicts.json").read_text())
    assert verdicts["runs"] == ["HEAD", "seed-1", "seed-2"] and verdicts["target"] == 0.7
    age = verdicts["attributes"]["age"]
    assert age["trusted_method"] == "hirescam" and age["worst_rma"] == pytest.approx(.72) and age["meets_target"]
    assert age["trusted_by_run"] == {"HEAD": "gradcam_plusplus", "seed-1": "hirescam", "seed-2": "hirescam"}
    assert age["not_trusted_in"] == {"gradcam_plusplus": ["seed-1"]}
    assert "hirescam" in shown.stdout and "0.78 / 0.72 / 0.75" in shown.stdout

    named = run_cli("verdicts", "seed-2", "reports/explain/metrics.json", cwd=root, env=env)  # the workspace: seed 2's copy
    assert named.returncode == 0 and "0.75 / 0.75" in named.stdout, named.stderr[-2000:]
    missing = run_cli("verdicts", "HEAD", "no-such-experiment", cwd=root, env=env)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1].startswith("psyface: error: 'no-such-experiment' is neither"), missing.stderr
