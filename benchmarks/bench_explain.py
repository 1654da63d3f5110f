"""Grad-CAM for every attribute: psyface's batched path vs. the peer's per-image, per-attribute loop.

Same network (VGG16, GAP head, one output per attribute, fixed random weights: the cost does not
depend on training), same faces, same maps (asserted). Also prints what IG and occlusion cost per
image with the stage's default options. Target: batched >= 10x faster than the loop.

    PYTHONPATH=src python benchmarks/bench_explain.py [--images 32] [--size 64]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam

from psyface.artifacts import PREPARED_DIR, load_prepared
from psyface.explain.methods import MethodOptions, attribute
from psyface.model import build_model, to_input

N_ATTRIBUTES = 7  # the default synthetic data set's attributes


def faces(n_images: int, size: int) -> tuple[np.ndarray, str]:
    """Prepared test faces when `dvc repro prepare` has run at this size, otherwise uniform noise."""
    if (PREPARED_DIR / "meta.json").is_file():
        prepared = load_prepared()
        rows = prepared.split("test")[:n_images]
        if prepared.images.shape[1] == size and len(rows) == n_images:
            return np.asarray(prepared.images[rows]), f"{PREPARED_DIR} test faces"
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n_images, size, size, 3), dtype=np.uint8), "uniform noise images"


def per_image_loop(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The notebook way: one Captum call per image and attribute."""
    maps = torch.zeros(len(inputs), N_ATTRIBUTES, *inputs.shape[-2:])
    gradcam = LayerGradCam(model, model.last_conv)
    for i in range(len(inputs)):
        for target in range(N_ATTRIBUTES):
            cam = gradcam.attribute(inputs[i : i + 1], target=target, relu_attributions=True)
            maps[i, target] = LayerAttribution.interpolate(cam, tuple(inputs.shape[-2:]), interpolate_mode="bilinear")[0, 0].detach()
    return maps


def seconds(function, *args, repeats: int = 3) -> tuple[float, object]:  # noqa: ANN001 - any callable
    """Best of `repeats` wall-clock runs (the machine is shared: the minimum is the least disturbed)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function(*args)
        best = min(best, time.perf_counter() - started)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="the stage's explain.batch_size")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model("vgg16", "gap", N_ATTRIBUTES).eval()
    images, source = faces(args.images, args.size)
    inputs = to_input(images).contiguous()
    print(f"{args.images} {source} at {args.size} px, VGG16, {N_ATTRIBUTES} attributes, {torch.get_num_threads()} threads")

    def batched() -> torch.Tensor:
        return torch.cat([attribute(model, batch, "gradcam") for batch in inputs.split(args.batch_size)])

    loop_s, loop_maps = seconds(per_image_loop, model, inputs, repeats=1)
    batched_s, batched_maps = seconds(batched)
    torch.testing.assert_close(batched_maps, loop_maps, rtol=1e-3, atol=1e-5 * float(loop_maps.abs().max()))
    ratio = loop_s / batched_s
    print(f"{'Grad-CAM, all attributes':<34}{'per-image loop':>16}{'psyface batched':>17}{'ratio':>8}")
    print(f"{'seconds for ' + str(args.images) + ' images':<34}{loop_s:>16.2f}{batched_s:>17.2f}{ratio:>7.1f}x"
          f"   (target >= 10x: {'met' if ratio >= 10 else 'NOT met'}; maps equal)")

    options = MethodOptions()
    few = inputs[:2]
    for method, detail in (
        ("integrated_gradients", f"{options.ig_steps} steps, {options.ig_baseline} baseline"),
        ("occlusion", f"window {options.occlusion_window}, stride {options.occlusion_stride}"),
        ("lrp", "VGG composite"),
    ):
        took, _ = seconds(attribute, model, few, method, options, repeats=1)
        print(f"{method:<22} {took / len(few):7.2f} s per image, all {N_ATTRIBUTES} attributes ({detail})")
    print(f"{'gradcam':<22} {batched_s / len(inputs):7.3f} s per image, all {N_ATTRIBUTES} attributes (batched)")


if __name__ == "__main__":
    main()
