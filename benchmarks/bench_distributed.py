"""Data-parallel scaling of psyface's training loop (`train_epochs`, DDP as `torchrun` runs it).

CPU (always): training images/s of the same global batch at 1 process x 1 thread, 1 process x N
threads and N processes x 1 thread (gloo), side by side in one run on the same cores; scaling
efficiency = (N processes) / (N x 1 process x 1 thread). Defaults: the params.yaml network
(vgg16_bn, gap head, last_conv_stride 4) at 64 px, global batch 32.

GPU (when CUDA is present; otherwise it says so): VGG16 at 224 px, bf16 autocast, channels_last,
torch.compile, images/s and model-FLOPs utilisation against the GPU's dense bf16 peak (`--peak-tflops`,
else a table of known GPUs), for psyface's multi-task network and for the peer's loop (Xiao 2024:
fp32, batch 40, one VGG16 with the paper head per attribute, no compile). Model FLOPs per image are
counted with torch.utils.flop_counter on the forward pass, x3 for forward + backward.

    python benchmarks/bench_distributed.py [--processes 2] [--images 64] [--size 64]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from psyface.distributed import Context, DistributedParams, session  # noqa: E402
from psyface.model import build_model  # noqa: E402
from psyface.training import Data, TrainParams, TrainState, cpuinfo_field, train_epochs  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
                    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}
ATTRIBUTES = 7  # the default data's attribute count


def data(images: int, size: int, outputs: int) -> Data:
    rng = np.random.default_rng(0)
    return Data(rng.integers(0, 255, (images, size, size, 3), dtype=np.uint8),
                rng.standard_normal((images, outputs)).astype(np.float32))


def images_per_second(params: TrainParams, images: int, size: int, outputs: int, context: Context,
                      device: torch.device) -> float:
    """Images/s of the second of two epochs (the first pays for compilation and warm-up)."""
    torch.manual_seed(0)
    net = build_model(params.arch, params.head, outputs, params.last_conv_stride).to(
        device, memory_format=torch.channels_last)
    stamps: list[float] = []

    def stamp(state: TrainState) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    validation = data(context.world_size, size, outputs)  # one face per rank: validation costs ~nothing
    train_epochs(net, data(images, size, outputs), validation, params, TrainState(), device, on_epoch=stamp,
                 context=context)
    return images / (stamps[1] - stamps[0])


def cpu_rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo"})
    torch.set_num_threads(1)
    with session(DistributedParams()) as context:
        rate = images_per_second(cpu_params(args), args.images, args.size, ATTRIBUTES, context, torch.device("cpu"))
    if rank == 0:
        Path(out).write_text(str(rate))


def cpu_params(args: argparse.Namespace) -> TrainParams:
    return TrainParams(arch=args.arch, head="gap", last_conv_stride=args.last_conv_stride, epochs=2,
                       batch_size=args.batch_size, patience=10)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def bench_cpu(args: argparse.Namespace) -> None:
    import tempfile

    cores = os.cpu_count() or 1
    params = cpu_params(args)
    cpu = torch.device("cpu")
    torch.use_deterministic_algorithms(True)
    rates = {}
    for threads in (1, cores):
        torch.set_num_threads(threads)
        rates[f"1 process x {threads} thread(s)"] = images_per_second(params, args.images, args.size, ATTRIBUTES,
                                                                      Context(), cpu)
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "rate")
        torch.multiprocessing.spawn(cpu_rank, args=(args.processes, free_port(), args, out), nprocs=args.processes)
        rates[f"{args.processes} processes x 1 thread (gloo)"] = float(Path(out).read_text())
    model = cpuinfo_field("model name") or "unknown"
    bf16 = "native bf16" if (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()) else "fp32 path"
    print(f"CPU: {model} ({cores} cores, {bf16}, load average {os.getloadavg()[0]:.1f} at the end); {args.arch} at "
          f"{args.size} px, global batch {args.batch_size}, {args.images} images per epoch")
    for name, rate in rates.items():
        print(f"  {name:32s} {rate:8.1f} img/s")
    single = rates["1 process x 1 thread(s)"]
    ddp = rates[f"{args.processes} processes x 1 thread (gloo)"]
    print(f"  scaling efficiency {ddp / (args.processes * single):.0%} ({args.processes} processes vs "
          f"{args.processes} x 1 process, 1 thread each); vs 1 process x {cores} threads: "
          f"{ddp / rates[f'1 process x {cores} thread(s)']:.2f}x")


def training_flops_per_image(arch: str, head: str, outputs: int, size: int) -> float:
    """Model FLOPs of one training image: forward counted, x3 for forward + backward."""
    from torch.utils.flop_counter import FlopCounterMode

    net = build_model(arch, head, outputs)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(torch.zeros(1, 3, size, size))
    return 3.0 * counter.get_total_flops()


def peak_tflops(args: argparse.Namespace) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def bench_gpu(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        print("GPU: no CUDA device available on this machine; GPU images/s and MFU not measured")
        return
    device = torch.device("cuda")
    torch.use_deterministic_algorithms(False)  # the CPU part asked for it; cuBLAS would refuse without a workspace setting
    torch.backends.cudnn.benchmark = True
    peak = peak_tflops(args)
    print(f"GPU: {torch.cuda.get_device_name()}, bf16 peak {peak or 'unknown (pass --peak-tflops)'} TFLOP/s; "
          f"VGG16 at 224 px, {args.gpu_images} images per epoch")
    setups = {
        "psyface multi-task (bf16, channels_last, compile, batch 64)":
            (TrainParams(arch="vgg16", head="gap", epochs=2, batch_size=64, precision="bf16", compile=True, patience=10),
             ATTRIBUTES, 1),
        "peer per attribute (fp32, batch 40, paper head, x7 networks)":
            (TrainParams(arch="vgg16", head="paper", epochs=2, batch_size=40, precision="fp32", patience=10), 1,
             ATTRIBUTES),
    }
    for name, (params, outputs, networks) in setups.items():
        rate = images_per_second(params, args.gpu_images, 224, outputs, Context(device=device), device) / networks
        flops = training_flops_per_image(params.arch, params.head, outputs, 224) * networks
        mfu = f"{rate * flops / (peak * 1e12):.1%}" if peak else "n/a"
        print(f"  {name:62s} {rate:8.1f} faces/s (all attributes)  {rate * flops / 1e12:7.1f} TFLOP/s  MFU {mfu}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--arch", default="vgg16_bn")
    parser.add_argument("--last-conv-stride", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--gpu-images", type=int, default=2048)
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the GPU's dense bf16 peak, TFLOP/s")
    args = parser.parse_args()
    bench_cpu(args)
    bench_gpu(args)


if __name__ == "__main__":
    main()
