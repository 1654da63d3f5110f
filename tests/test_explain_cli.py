from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from psyface import tracking
from psyface.explain.methods import MethodOptions, attribute
from psyface.images import load_image
from psyface.model import ModelSpec, build_model, to_input
from tests.conftest import run_cli

pytestmark = pytest.mark.slow  # trains networks or runs stages in subprocesses

ATTRIBUTES = ["happy", "trustworthy"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> tuple[Path, str]:
    """(folder, tracking URI) with a VGG11 at 32 px registered as `faces@champion` (SQLite store)."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root}/mlflow.db"
    face = root / "face.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(face)
    torch.manual_seed(0)
    net = build_model("vgg11", "gap", len(ATTRIBUTES)).eval()
    spec = ModelSpec(arch="vgg11", attributes=ATTRIBUTES, image_size=32, target_mean=[4.0, 4.0], target_std=[1.0, 1.0])
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # the run's artifacts land under root/mlruns
        tracking.use_tracking(uri)
        with mlflow.start_run():
            version = tracking.log_model(net, spec, "faces", pd.DataFrame({"path": [str(face)]}))
        tracking.set_alias("faces", "champion", version.version)
    return root, uri


def test_cli_explains_any_image_from_the_registry_alone(registry, tmp_path):
    root, uri = registry
    rng = np.random.default_rng(1)
    files = [tmp_path / "a.png", tmp_path / "b.jpg"]
    for path in files:
        Image.fromarray(rng.integers(0, 256, (48, 56, 3), dtype=np.uint8)).save(path)

    result = run_cli("explain", "--model", "models:/faces@champion", "--method", "gradcam", "--attribute", "trustworthy",
                     *map(str, files), "--out", str(tmp_path / "maps"), cwd=root, env={"MLFLOW_TRACKING_URI": uri})

    assert result.returncode == 0, result.stderr
    net, _ = tracking.load_model("models:/faces@champion", uri)
    expected = attribute(net, to_input(np.stack([load_image(path, 32) for path in files])), "gradcam")
    for row, path in enumerate(files):
        raw = np.load(tmp_path / "maps" / f"{path.stem}_gradcam_trustworthy.npy")
        np.testing.assert_allclose(raw, expected[row, 1].numpy(), rtol=1e-4, atol=1e-7)
        with Image.open(tmp_path / "maps" / f"{path.stem}_gradcam_trustworthy.png") as overlay:
            assert overlay.size == (32, 32)
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == [
        "a_gradcam_trustworthy.npy", "a_gradcam_trustworthy.png", "b_gradcam_trustworthy.npy", "b_gradcam_trustworthy.png"
    ]


def test_cli_refuses_an_unknown_attribute_in_one_line(registry, tmp_path):
    root, uri = registry
    result = run_cli("explain", "--model", "models:/faces@champion", "--attribute", "honest", "face.png",
                     "--out", str(tmp_path), cwd=root, env={"MLFLOW_TRACKING_URI": uri})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "psyface: error: unknown attribute(s) ['honest']; models:/faces@champion predicts ['happy', 'trustworthy']"
    )


def test_cli_takes_the_cam_layers_of_the_projects_params_or_of_layer(registry, tmp_path):
    """In a project the maps are the explain stage's (its params.yaml layers); `--layer` overrides them."""
    root, uri = registry
    face = tmp_path / "face.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(face)
    (tmp_path / "params.yaml").write_text("explain:\n  options: {gradcam_layer: conv3_1, cam_layers: {hirescam: conv2_1}}\n")
    net, _ = tracking.load_model("models:/faces@champion", uri)
    inputs = to_input(load_image(face, 32)[None])

    def cli_map(*extra: str) -> np.ndarray:
        out = tmp_path / f"maps{len(extra)}"
        result = run_cli("explain", "--model", "models:/faces@champion", "--method", "hirescam", "--attribute", "happy",
                         *extra, str(face), "--out", str(out), cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri})
        assert result.returncode == 0, result.stderr
        return np.load(out / "face_hirescam_happy.npy")

    project = attribute(net, inputs, "hirescam", MethodOptions(gradcam_layer="conv3_1", cam_layers={"hirescam": "conv2_1"}))
    np.testing.assert_allclose(cli_map(), project[0, 0].numpy(), rtol=1e-4, atol=1e-7)
    chosen = attribute(net, inputs, "hirescam", MethodOptions(gradcam_layer="conv3_1"))
    np.testing.assert_allclose(cli_map("--layer", "conv3_1"), chosen[0, 0].numpy(), rtol=1e-4, atol=1e-7)
    assert not np.allclose(project[0, 0].numpy(), chosen[0, 0].numpy())
