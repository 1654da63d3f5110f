"""Training cost, like for like: what each of psyface's choices buys, and how close the step gets to
the machine's limit.

Every row compares two loops that differ in ONE factor, timed side by side in this process on the
same images, for the same optimiser steps, at the params.yaml image size and network (`train`,
`prepare.image_size`), fp32 unless the row is about precision:

- data path: images decoded and resized by PIL every epoch (the published peer's DataLoader) vs the
  prepared uint8 array (`prepare`);
- networks: one multi-task network for every attribute vs one network per attribute (the peer's
  protocol), per epoch over all attributes;
- memory format: channels_last vs contiguous;
- precision: bf16 autocast vs fp32 (only where the CPU has native bf16: AVX-512 BF16 or AMX);
- last block: VGG16's block 5 at `last_conv_stride` 8 (one max-pool fewer) vs 16 (as published), in
  fp32 and in bf16 where native: what the finer block costs on each precision path;
- the peer as published (224 px, VGG16 with its 4096-wide classifier, PIL decoding, fp32, one network
  per attribute) vs psyface's default, as a separate row: every factor at once.

Then the physical limit: the default train step's achieved FLOP/s (FLOPs counted by
`torch.utils.flop_counter`) as a share of this machine's measured peak (the higher of a matmul and a large 3x3
convolution; fp32, and bf16 where native). Goal: >= 50 % on the default network.

    python benchmarks/bench_train.py [--images 64] [--steps 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from psyface.config import load_section
from psyface.dataset.layout import DATA_DIR, load_dataset
from psyface.model import build_model, normalise, to_unit
from psyface.prepare import PrepareParams
from psyface.training import TrainParams, augment, cpuinfo_field, uses_bf16

PEER_SIZE = 224


def decoded_batch(paths: list[Path], size: int) -> np.ndarray:
    """The peer's data path for one batch: open, decode and resize every file (PIL), every epoch."""
    from PIL import Image

    return np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR)) for p in paths])


def time_training(net: torch.nn.Module, batches: Callable[[int], np.ndarray], targets: torch.Tensor, steps: int,
                  params: TrainParams, bf16: bool, channels_last: bool = True) -> float:
    """Seconds per optimiser step (after one warm-up step) of augment + forward + backward + AdamW."""
    net = net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    generator = torch.Generator().manual_seed(0)

    def step(index: int) -> None:
        batch = normalise(augment(to_unit(batches(index)), params.augmentation, generator))
        batch = batch.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.mse_loss(net(batch).float(), targets[: len(batch), : net.last_layer.out_features])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step(0)
    start = time.perf_counter()
    for index in range(steps):
        step(index)
    return (time.perf_counter() - start) / steps


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 8) -> float:
    """This machine's dense matmul rate (FLOP/s) at `dtype` (torch.mm: MKL's GEMM for fp32)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def convolution_peak(dtype: torch.dtype, repeats: int = 4) -> float:
    """The rate (FLOP/s) of one large 3x3 convolution (256 -> 256 channels, 32x32, batch 32,
    channels_last) through oneDNN, the kernels VGG's convolutions run on. Needed beside the matmul:
    on an AMD EPYC MKL's fp32 GEMM measured 158 GFLOP/s and this convolution 344, so a matmul-only
    peak made the train step look faster than the machine (159 %)."""
    images = torch.randn(32, 256, 32, 32).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(256, 256, 3, 3).to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        F.conv2d(images, weight, padding=1)
        start = time.perf_counter()
        for _ in range(repeats):
            F.conv2d(images, weight, padding=1)
    return 2 * 256 * 256 * 9 * 32 * 32 * 32 * repeats / (time.perf_counter() - start)


def step_flops(net: torch.nn.Module, batch: int, size: int) -> int:
    """FLOPs of one forward + backward pass (torch's own counter: convolutions and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    images = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    with FlopCounterMode(display=False) as counter:
        net(images).sum().backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64, help="default-data images the batches cycle over")
    parser.add_argument("--steps", type=int, default=4, help="timed optimiser steps per loop (after 1 warm-up)")
    args = parser.parse_args()
    params = load_section("train", TrainParams)
    size = load_section("prepare", PrepareParams).image_size
    spec = load_dataset(DATA_DIR)
    table = spec.read_ratings().iloc[: args.images]
    attributes = spec.attribute_names
    paths = [spec.image_path(i) for i in table[spec.id_column]]
    batch = params.batch_size
    targets = torch.as_tensor(np.random.default_rng(0).standard_normal((batch, len(attributes))), dtype=torch.float32)
    array = np.stack([decoded_batch([p], size)[0] for p in paths])  # what `prepare` writes, decoded once

    def cycle(index: int) -> np.ndarray:
        rows = [(index * batch + k) % len(paths) for k in range(batch)]
        return array[rows]

    def decoding(index: int, at: int = size) -> np.ndarray:
        return decoded_batch([paths[(index * batch + k) % len(paths)] for k in range(batch)], at)

    def network(outputs: int = len(attributes), arch: str = params.arch, head: str = params.head,
                stride: int = params.last_conv_stride) -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(arch, head, outputs, stride)

    auto_bf16 = uses_bf16("auto", torch.device("cpu"))  # psyface's default precision on this CPU
    amx = torch.cpu._is_amx_tile_supported()
    native_bf16 = torch.cpu._is_avx512_bf16_supported() or amx
    cpu = cpuinfo_field("model name") or "unknown CPU"
    print(f"bench_train: {params.arch} head={params.head} last_conv_stride={params.last_conv_stride}, {size} px, "
          f"batch {batch}, {args.steps} timed steps per loop, {torch.get_num_threads()} threads; {cpu}, "
          f"native bf16: {'AMX' if amx else 'AVX-512 BF16 only' if native_bf16 else 'no'}, "
          f"train.precision auto -> {'bf16' if auto_bf16 else 'fp32'}")
    steps = args.steps
    rows: list[tuple[str, str, float, str, float]] = []

    def row(factor: str, slow_name: str, slow: float, fast_name: str, fast: float) -> None:
        rows.append((factor, slow_name, slow, fast_name, fast))
        print(f"  {factor:28s} {slow_name:30s} {slow * 1000:9.0f} ms | {fast_name:30s} {fast * 1000:9.0f} ms | {slow / fast:5.2f}x")

    print("  (ms per optimiser step of one network unless the row says per epoch of all attributes)")
    row("data path", "PIL decode every epoch", time_training(network(), decoding, targets, steps, params, False),
        "prepared array", time_training(network(), cycle, targets, steps, params, False))
    single = time_training(network(1), cycle, targets, steps, params, False)
    multi = time_training(network(), cycle, targets, steps, params, False)
    row("networks (all attributes)", f"{len(attributes)} nets, one per attribute", single * len(attributes),
        "one multi-task net", multi)
    row("memory format", "contiguous", time_training(network(), cycle, targets, steps, params, False, channels_last=False),
        "channels_last", multi)
    if native_bf16:
        bf16 = time_training(network(), cycle, targets, steps, params, True)
        row("precision", "fp32", multi, "bf16 autocast", bf16)
    else:
        print("  precision: this CPU has no native bf16 (AVX-512 BF16 / AMX): bf16 would be emulated, not timed")
    finer = 8 if params.last_conv_stride == 16 else params.last_conv_stride  # against VGG16 as published (16)
    for name, bf16_on, default_time in (("fp32", False, multi), *((("bf16", True, bf16),) if native_bf16 else ())):
        timed = {params.last_conv_stride: default_time}  # the default network's step is already timed above
        for stride in (finer, 16):
            if stride not in timed:
                timed[stride] = time_training(network(stride=stride), cycle, targets, steps, params, bf16_on)
        row(f"last block ({name})", f"last_conv_stride {finer}", timed[finer], "last_conv_stride 16 (published)", timed[16])
    peer_params = dataclasses.replace(params, augmentation=dataclasses.replace(params.augmentation, translate=0.0))
    peer = time_training(network(1, "vgg16", "paper", 16), lambda i: decoding(i, PEER_SIZE), targets, max(1, steps // 2),
                         peer_params, False) * len(attributes)
    default = time_training(network(), cycle, targets, steps, params, auto_bf16)
    row("the peer as published", f"224 px, {len(attributes)} paper-head VGG16s, PIL", peer,
        f"default ({'bf16' if auto_bf16 else 'fp32'})", default)

    flops = step_flops(network(), batch, size)
    for name, dtype, seconds in (("fp32", torch.float32, multi), *((("bf16", torch.bfloat16, bf16),) if native_bf16 else ())):
        matmul, convolution = matmul_peak(dtype), convolution_peak(dtype)
        peak = max(matmul, convolution)
        achieved = flops / seconds
        print(f"  physical limit ({name}): train step {flops / 1e9:.1f} GFLOP (fwd+bwd, counted), "
              f"{achieved / 1e9:.0f} GFLOP/s achieved vs {peak / 1e9:.0f} GFLOP/s peak (the higher of matmul "
              f"{matmul / 1e9:.0f} and 3x3 convolution {convolution / 1e9:.0f}): "
              f"{100 * achieved / peak:.0f} % (goal >= 50 %)")


if __name__ == "__main__":
    main()
