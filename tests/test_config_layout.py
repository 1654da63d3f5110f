import re
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pytest
import yaml

from psyface.config import load_section
from psyface.dataset.layout import load_dataset
from psyface.errors import PsyfaceError


@dataclass
class Inner:
    steps: int = 3


@dataclass
class Params:
    rate: float = 0.1
    mode: Literal["a", "b"] = "a"
    inner: Inner = field(default_factory=Inner)
    names: list[str] = field(default_factory=list)


def write_params(tmp_path, content):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def test_section_becomes_typed_dataclass(tmp_path):
    path = write_params(tmp_path, {"stage": {"rate": 1, "mode": "b", "inner": {"steps": 5}, "names": ["x"]}})
    params = load_section("stage", Params, path)
    assert params == Params(rate=1.0, mode="b", inner=Inner(5), names=["x"])
    assert isinstance(params.rate, float)
    assert load_section("missing", Params, path) == Params()


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"rat": 0.1}, r"unknown key\(s\) \['rat'\]"),
        ({"mode": "c"}, r"stage.mode: 'c' is not one of"),
        ({"inner": {"steps": "many"}}, r"stage.inner.steps: expected int"),
        ({"rate": True}, r"stage.rate: expected float"),
    ],
)
def test_mistakes_in_params_name_the_key(tmp_path, section, message):
    with pytest.raises(PsyfaceError, match=message):
        load_section("stage", Params, write_params(tmp_path, {"stage": section}))


def test_dataset_spec_round_trips_and_resolves_paths(synthetic_data):
    spec = load_dataset(synthetic_data)
    assert spec.image_path("p0000_0") == (synthetic_data / "images" / "p0000_0.png").resolve()
    for hostile in ("../../etc/passwd", "/etc/passwd", "a/../../b"):
        with pytest.raises(PsyfaceError, match="absolute path or contains '..'"):
            spec.image_path(hostile)
    bitfield = np.array([[0b1, 0b10, 0b11, 0b1000]], dtype=np.uint8)
    assert spec.attribute_mask(bitfield, "trustworthy").tolist() == [[True, True, True, False]]
    assert spec.attribute_mask(bitfield, "control").tolist() == [[False] * 4]


def test_inconsistent_dataset_yaml_is_reported(tmp_path, synthetic_data):
    raw = yaml.safe_load((synthetic_data / "dataset.yaml").read_text())
    raw["attributes"]["happy"]["regions"] = ["tail"]
    (tmp_path / "dataset.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(PsyfaceError, match=r"attributes.happy.regions \['tail'\]"):
        load_dataset(tmp_path)
    with pytest.raises(PsyfaceError, match="psyface synth"):
        load_dataset(tmp_path / "nowhere")


@pytest.mark.parametrize(("text", "message"), [
    (b"train: {epochs: [\n", r"params.yaml:2:1: not valid YAML: expected the node content, but found '<stream end>' \(while parsing a flow node\)$"),
    (b"train:\n  epochs: 3\n   lr: 1\n", r"params.yaml:3:6: not valid YAML: mapping values are not allowed here$"),
    (b"train: {seed: \xff}\n", r"params.yaml is not UTF-8 text \(byte 0xff at offset 14\); re-save it as UTF-8$"),
])
def test_a_params_file_that_is_not_yaml_is_one_line_with_its_position(tmp_path, text, message):
    path = tmp_path / "params.yaml"
    path.write_bytes(text)
    with pytest.raises(PsyfaceError) as raised:
        load_section("train", Params, path)
    assert "\n" not in str(raised.value)
    assert re.search(message, str(raised.value))
