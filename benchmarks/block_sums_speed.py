"""Element-wise work of the activation range choice, whole tensors against 65,536-value blocks (CPU, one thread).

Times, per shape of a layer's input/output (volumes, channels, edge): the fake quantization of the whole input at
once (``ActQuantizer._quantize_into``) against ``ActQuantizer.quantize`` (blocks), and the squared error with one
float64 sum over the whole output against ``layers.squared_error_sums`` (blocks, with and without voxel weights).
Median of ``--repeats`` calls, in ms.

    python benchmarks/block_sums_speed.py --repeats 5
"""

from __future__ import annotations

import statistics
import time

import fire
import torch

from monai_efficientq.layers import squared_error_sums
from monai_efficientq.quantizer import ActQuantizer

SHAPES = ((3, 16, 48), (3, 8, 96), (1, 8, 32))


def _ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(repeats: int = 5, threads: int = 1) -> None:
    """Print one Markdown row per shape.

    Args:
        repeats: timed calls per measurement.
        threads: ``torch.set_num_threads``.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    print("| volumes × channels × edge³ | quantize whole ms | blocks ms | float64 error sum whole ms | blocks ms | weighted, whole ms | blocks ms |")
    print("|---|---|---|---|---|---|---|")
    for n, c, edge in SHAPES:
        x = torch.relu(torch.randn(n, c, edge, edge, edge))
        out, y = torch.randn_like(x), torch.randn_like(x)
        h = torch.rand(n, edge, edge, edge)
        quant = ActQuantizer(2).fit(x, 2**16)
        buffer = torch.empty_like(x)

        def whole_sum() -> float:
            return float((out - y).pow_(2).sum(dtype=torch.float64))

        def whole_weighted() -> float:
            return float(((out - y).pow_(2) * h.unsqueeze(1)).sum(dtype=torch.float64))

        row = [
            _ms(lambda: quant._quantize_into(x, buffer), repeats), _ms(lambda: quant.quantize(x, out=buffer), repeats),
            _ms(whole_sum, repeats), _ms(lambda: squared_error_sums(out, y), repeats),
            _ms(whole_weighted, repeats), _ms(lambda: squared_error_sums(out, y, h), repeats),
        ]
        print(f"| {n} × {c} × {edge}³ | " + " | ".join(f"{v:.1f}" for v in row) + " |")


if __name__ == "__main__":
    fire.Fire(main)
