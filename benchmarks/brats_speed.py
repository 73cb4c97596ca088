"""Speed of EfficientQ W2A2 on the BraTS-config SegResNet (4.7 M parameters) with one 4×128³ volume.

Random weights (timing only). Prints total seconds and peak memory.

    python benchmarks/brats_speed.py --device cuda            # on a GPU (the H200 figure in BENCHMARKS.md)
    python benchmarks/brats_speed.py --device cpu --size 64   # a CPU-sized variant
"""

from __future__ import annotations

import json
import time

import fire
import torch
from monai.networks.nets import SegResNet

from monai_efficientq import EfficientQConfig, quantize_network


def run(device: str = "cuda", size: int = 128, iterations: int = 200, weight_bits: int = 2, act_bits: int | None = 2,
        solver_dtype: str = "float64", threads: int | None = None) -> None:
    """Quantize the BraTS-config SegResNet once and print the timing.

    Args:
        device: cuda or cpu.
        size: side of the 4-channel calibration cube.
        iterations: ADMM iterations per layer.
        weight_bits: weight bits of the inner layers.
        act_bits: activation bits of the inner layers (None: float).
        solver_dtype: float64 (default) or float32 Gram matrices and iterates.
        threads: torch CPU threads.
    """
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = SegResNet(spatial_dims=3, in_channels=4, out_channels=3, init_filters=16, blocks_down=(1, 2, 2, 4),
                    blocks_up=(1, 1, 1), dropout_prob=0.2).eval().to(device)
    x = torch.randn(1, 4, size, size, size, device=device)
    cfg = EfficientQConfig(weight_bits=weight_bits, act_bits=act_bits, iterations=iterations, prediction="sigmoid",
                           solver_dtype=solver_dtype, device=device, progress=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    _, report = quantize_network(net, x, cfg)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    slowest = sorted(report.layers, key=lambda r: -r.seconds)[:3]
    result = {
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
        "volume": [4, size, size, size], "setting": f"W{weight_bits}A{act_bits}", "iterations": iterations,
        "layers": len(report.layers), "total_seconds": round(seconds, 1),
        "peak_memory_mb": round(report.peak_memory_mb), "peak_memory_kind": report.peak_memory_kind,
        "slowest_layers": [(r.name, round(r.seconds, 2)) for r in slowest], "torch": torch.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    fire.Fire(run)
