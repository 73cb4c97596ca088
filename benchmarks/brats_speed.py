"""Speed of EfficientQ W2A2 on the BraTS-config SegResNet (4.7 M parameters) with one 4×128³ volume.

Random weights (timing only). Prints total seconds and peak memory.

    python benchmarks/brats_speed.py --device cuda            # on a GPU (the H200 figure in BENCHMARKS.md)
    python benchmarks/brats_speed.py --device cpu --size 64   # a CPU-sized variant
"""

from __future__ import annotations

import json
import os
import sys

if __package__ in (None, ""):  # run as a file: import the benchmarks package from the repository
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import fire  # noqa: E402
import torch  # noqa: E402

from benchmarks.measure import Stopwatch, synchronize  # noqa: E402
from benchmarks.networks import brats_segresnet  # noqa: E402
from monai_efficientq import EfficientQConfig, quantize_network  # noqa: E402


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
    net = brats_segresnet(seed=0).to(device)
    x = torch.randn(1, 4, size, size, size, device=device)  # drawn after the seeded weights, as before
    cfg = EfficientQConfig(weight_bits=weight_bits, act_bits=act_bits, iterations=iterations, prediction="sigmoid",
                           solver_dtype=solver_dtype, device=device, progress=False)
    synchronize(torch.device(device))
    with Stopwatch(torch.device(device)) as clock:
        _, report = quantize_network(net, x, cfg)
    slowest = sorted(report.layers, key=lambda r: -r.seconds)[:3]
    result = {
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
        "volume": [4, size, size, size], "setting": f"W{weight_bits}A{act_bits}", "iterations": iterations,
        "layers": len(report.layers), "total_seconds": round(clock.seconds, 1),
        "peak_memory_mb": round(report.peak_memory_mb), "peak_memory_kind": report.peak_memory_kind,
        "slowest_layers": [(r.name, round(r.seconds, 2)) for r in slowest], "torch": torch.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    fire.Fire(run)
