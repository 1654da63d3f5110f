"""`params.yaml` is the one source of defaults, and every value a user can mistype in it is one line
and exit 2 before a stage does any work."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
import yaml

from psyface.config import from_dict, load_section
from psyface.errors import PsyfaceError

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))

# section -> (dataclass, the stage entry that reads it, that entry's argv)
SECTIONS: dict[str, tuple[str, str, list[str]]] = {
    "validate": ("psyface.validate:ValidateParams", "psyface.validate", []),
    "split": ("psyface.split:SplitParams", "psyface.split", []),
    "prepare": ("psyface.prepare:PrepareParams", "psyface.prepare", []),
    "train": ("psyface.train:TrainParams", "psyface.train", []),
    "registry": ("psyface.train:RegistryParams", "psyface.train", []),
    "transfer": ("psyface.transfer.core:TransferParams", "psyface.transfer.stage", ["sweep"]),
    "landmarks": ("psyface.landmarks:LandmarksParams", "psyface.landmarks", []),
    "expressions": ("psyface.expressions.stage:ExpressionsParams", "psyface.expressions.stage", []),
    "ground_truth": ("psyface.ground_truth:GroundTruthParams", "psyface.ground_truth", []),
    "explain": ("psyface.explain.stage:ExplainParams", "psyface.explain.stage", []),
    "report": ("psyface.report.stage:ReportParams", "psyface.report.stage", []),
}

# Numbers for which 0 is a meaningful setting (everything else must be at least 1 or above 0).
ZERO_ALLOWED = {
    "split.seed", "split.folds", "train.freeze", "train.weight_decay", "train.warmup_epochs", "train.seed",
    "train.augmentation.rotation_deg", "train.augmentation.translate", "train.augmentation.brightness",
    "train.augmentation.contrast", "train.augmentation.saturation",
    "transfer.min_steps", "transfer.image_size", "transfer.seeds[0]", "transfer.train.freeze",
    "landmarks.max_problem_fraction", "expressions.seed", "expressions.tolerance",
    "expressions.training.weight_decay", "explain.max_images.integrated_gradients", "explain.max_images.lrp",
    "ground_truth.max_outside_r", "ground_truth.min_inside_r", "ground_truth.seed", "explain.max_images.occlusion", "explain.max_images.hirescam", "explain.max_images.gradcam_plusplus",
    "explain.max_images.layercam", "explain.max_images.smoothgrad", "explain.raw_maps_images", "explain.region_swap_images", "explain.sanity_threshold",
    "explain.rma_target", "explain.min_test_r", "explain.seed", "report.seed", "report.manifold.umap_min_dist",
    "report.fairness.min_abs_gap_sd",
}


def dataclass_of(section: str) -> type:
    module, name = SECTIONS[section][0].split(":")
    return getattr(importlib.import_module(module), name)


def leaves(value: Any, hint: Any, path: str) -> typing.Iterator[tuple[str, Any]]:
    """(dotted path, type hint) of every scalar a user writes in a section, as the YAML has it."""
    hint = typing.get_args(hint)[0] if typing.get_origin(hint) is Annotated else hint
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint, include_extras=True)
        for key, item in value.items():
            yield from leaves(item, hints[key], f"{path}.{key}")
    elif typing.get_origin(hint) is dict and isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, typing.get_args(hint)[1], f"{path}.{key}")
    elif typing.get_origin(hint) is list and isinstance(value, list) and value:
        yield from leaves(value[0], typing.get_args(hint)[0], f"{path}[0]")
    else:
        yield path, hint


def with_value(section_data: dict, path: str, value: Any) -> dict:
    """A deep copy of a section with the scalar at `path` (relative to the section) replaced."""
    data = json.loads(json.dumps(section_data))
    keys = path.replace("[0]", ".0").split(".")[1:]
    target = data
    for key in keys[:-1]:
        target = target[int(key)] if isinstance(target, list) else target[key]
    last = keys[-1]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return data


def mistakes() -> typing.Iterator[tuple[str, str, Any]]:
    """(section, path, bad value): wrong type and negative for every number, 0 where 0 means nothing,
    an unknown choice for every fixed-choice value."""
    for section, data in PARAMS.items():
        for path, hint in leaves(data, dataclass_of(section), section):
            if hint in (int, float):
                yield section, path, "text"
                yield section, path, -1
                if path not in ZERO_ALLOWED:
                    yield section, path, 0
            elif typing.get_origin(hint) is Literal:
                yield section, path, "no-such-choice"


def test_every_params_section_is_read_by_a_stage():
    assert set(PARAMS) == set(SECTIONS)


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_code_defaults_equal_params_yaml(section):
    """Deleting a key from params.yaml must not change a recipe: the dataclass default is the same value."""
    cls = dataclass_of(section)
    assert dataclasses.asdict(cls()) == dataclasses.asdict(from_dict(cls, PARAMS[section], section))
    assert [f.name for f in dataclasses.fields(cls) if f.name not in PARAMS[section]] == []


def nested_keys(data: dict[str, Any], cls: type, path: tuple[str, ...] = ()) -> typing.Iterator[tuple[str, ...]]:
    """Paths of the keys inside nested sections (a dataclass field written as a mapping)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for name, value in data.items():
        hint = typing.get_args(hints[name])[0] if typing.get_origin(hints[name]) is Annotated else hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            for key in value:
                yield (*path, name, key)
            yield from nested_keys(value, hint, (*path, name))


def test_deleting_a_nested_key_keeps_the_recipe_too():
    """A nested section starts from its parent's default: without `explain.options.gradcam_layer` the layer
    stays the stage's conv3_3, not MethodOptions' own default."""
    checked = []
    for section in SECTIONS:
        cls = dataclass_of(section)
        for path in nested_keys(PARAMS[section], cls):
            data = copy.deepcopy(PARAMS[section])
            parent = data
            for key in path[:-1]:
                parent = parent[key]
            del parent[path[-1]]
            assert dataclasses.asdict(from_dict(cls, data, section)) == dataclasses.asdict(cls()), (section, path)
            checked.append(".".join((section, *path)))
    assert {"explain.options.gradcam_layer", "explain.options.cam_layers", "train.augmentation.translate"} <= set(checked)


def test_zero_allowed_lists_only_real_numbers_that_accept_zero():
    numbers = {path for section, data in PARAMS.items() for path, hint in leaves(data, dataclass_of(section), section)
               if hint in (int, float)}
    assert ZERO_ALLOWED <= numbers
    for path in ZERO_ALLOWED:
        section = path.split(".")[0]
        from_dict(dataclass_of(section), with_value(PARAMS[section], path, 0), section)


@pytest.mark.parametrize(("section", "path", "bad"), list(mistakes()), ids=lambda v: str(v))
def test_every_mistyped_value_is_rejected_naming_its_key(section, path, bad):
    with pytest.raises(PsyfaceError) as raised:
        from_dict(dataclass_of(section), with_value(PARAMS[section], path, bad), section)
    assert path.split("[")[0].split(".")[-1] in str(raised.value)


def numeric_sections() -> list[str]:
    return sorted(section for section, data in PARAMS.items()
                  if any(hint in (int, float) for _, hint in leaves(data, dataclass_of(section), section)))


@pytest.mark.parametrize("section", numeric_sections())
def test_each_stage_stops_on_a_bad_value_with_one_line(section, tmp_path, monkeypatch, capsys):
    """The stage entry itself (as dvc.yaml calls it) reads its params before any data: exit 2, one line."""
    path, hint = next((p, h) for p, h in leaves(PARAMS[section], dataclass_of(section), section) if h in (int, float))
    params = {**PARAMS, section: with_value(PARAMS[section], path, -1)}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    _, module, argv = SECTIONS[section]
    with pytest.raises(SystemExit) as exited:
        importlib.import_module(module).main(argv)
    assert exited.value.code == 2
    stderr = capsys.readouterr().err.strip().splitlines()
    assert len(stderr) == 1 and stderr[0].startswith("psyface: error:") and path.split(".")[-1] in stderr[0]
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "artifacts").exists()


@pytest.mark.parametrize(("section", "value", "message"), [
    ("expressions", {"drop_per_step": 0}, "drop_per_step: 0 is out of range"),
    ("report", {"manifold": {"methods": ["pca"]}}, "is not one of ['tsne', 'umap']"),
    ("train", {"last_conv_stride": 2}, "is not one of [4, 8, 16]"),
    ("transfer", {"fractions": [0.0, 1.0]}, "fractions[0]: 0.0 is out of range"),
])
def test_mistakes_the_issue_found(section, value, message, tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({section: value}), encoding="utf-8")
    with pytest.raises(PsyfaceError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_section(section, dataclass_of(section), tmp_path / "params.yaml")
