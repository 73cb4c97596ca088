"""EfficientQ vs round-to-nearest on a SegResNet (init_filters 8) with one 64³ calibration volume, on CPU.

Each (setting, method) runs in a fresh process so its peak memory (max RSS) is its own. Output error is the relative
squared error of the quantized logits vs the float logits (``‖q - f‖² / ‖f‖²``), on the calibration crop and on a
held-out crop of another volume; sizes are the float32 state dict vs the packed file.

    python benchmarks/segresnet_cpu.py --threads 2 --out benchmarks/results/segresnet_cpu.json

By default it uses the bundle's trained model and its calibration / first evaluation volume, both cropped by the
bundle's protocol (:func:`monai_efficientq.io.load_calibration_volume`).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from typing import Any

if __package__ in (None, ""):  # run as a file: import the benchmarks package from the repository
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import fire  # noqa: E402

from benchmarks.config import Setting, as_list  # noqa: E402
from benchmarks.measure import Stopwatch, peak_memory_mb, run_in_fresh_process  # noqa: E402
from benchmarks.networks import BUNDLE_DATA, BUNDLE_MODEL  # noqa: E402

SETTINGS = ("W4", "W3", "W2", "W2A2")
METHODS = ("rtn", "efficientq", "efficientq_original")


def _errors(net: Any, qnet: Any, volumes: dict[str, Any]) -> dict[str, float]:
    """Relative output error and voxel agreement of ``qnet`` vs ``net`` on each volume."""
    import torch

    errors = {}
    with torch.no_grad():
        for name, x in volumes.items():
            f, q = net(x[None]), qnet(x[None])
            errors[name] = float((q - f).pow(2).sum() / f.pow(2).sum())
            errors[name + "_label_agreement"] = (q.argmax(1) == f.argmax(1)).float().mean().item()
    return errors


def _one(args: dict[str, Any]) -> dict[str, Any]:
    """Quantize once (in a fresh process) and measure; one row of the table."""
    import torch

    from benchmarks.networks import bundle_segresnet
    from monai_efficientq import EfficientQConfig, quantize_network, save_quantized
    from monai_efficientq.io import load_calibration_volume, load_float_weights

    torch.set_num_threads(args["threads"])
    torch.manual_seed(0)
    net = bundle_segresnet()
    if args["checkpoint"]:
        load_float_weights(net, args["checkpoint"])
    net.eval()
    volumes = {name: load_calibration_volume(args[name], roi_size=args["size"]) for name in ("calib", "held_out")}
    setting = Setting.parse(args["setting"])
    method, _, original = args["method"].partition("_")
    cfg = EfficientQConfig(weight_bits=setting.weight_bits, act_bits=setting.act_bits, method=method,
                           preset=original or "default", iterations=args["iterations"], progress=False,
                           seed=args.get("seed", 0))
    with Stopwatch(torch.device("cpu")) as clock:
        qnet, report = quantize_network(net, volumes["calib"], cfg)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "q.pt")
        save_quantized(qnet, path)
        size = os.path.getsize(path)
    errors = _errors(net, qnet, volumes)
    return {
        "setting": setting.name, "method": args["method"], "preset": original or "default", "seed": args.get("seed", 0),
        "seconds": round(clock.seconds, 1), "peak_rss_mb": round(peak_memory_mb(torch.device("cpu"))),
        "rel_output_error_calib": errors["calib"], "rel_output_error_held_out": errors["held_out"],
        "voxel_agreement_held_out": errors["held_out_label_agreement"],
        "float_bytes": report.float_bytes, "packed_bytes": size, "compression": round(report.float_bytes / size, 2),
    }


def _print_table(rows: list[dict[str, Any]], threads: int, size: int, iterations: int) -> None:
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, threads {threads}; crop {size}^3, iterations {iterations}")
    print("| setting | method | seconds | peak RSS MB | rel. output error (calib) | rel. output error (held-out) | "
          "voxel agreement (held-out) | packed KiB | float/packed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['method']} | {r['seconds']} | {r['peak_rss_mb']} | {r['rel_output_error_calib']:.4f} | "
              f"{r['rel_output_error_held_out']:.4f} | {r['voxel_agreement_held_out']:.4f} | {r['packed_bytes'] / 1024:.0f} | "
              f"{r['compression']} |")


def run(
    threads: int = 2,
    size: int = 64,
    iterations: int = 200,
    checkpoint: str | None = BUNDLE_MODEL,
    calib: str = os.path.join(BUNDLE_DATA, "calib", "calib_t1.nii.gz"),
    held_out: str = os.path.join(BUNDLE_DATA, "eval", "case_000_t1.nii.gz"),
    settings: Any = ",".join(SETTINGS),
    methods: Any = "rtn,efficientq",
    out: str | None = None,
    seed: int = 0,
) -> list:
    """Run every (setting, method) pair and print one JSON row each, then a Markdown table.

    Args:
        threads: torch threads per run.
        size: calibration crop (cube side).
        iterations: ADMM iterations per layer.
        checkpoint: float state dict (``None`` or a missing file: seeded random weights).
        calib: calibration NIfTI.
        held_out: another NIfTI for the held-out error.
        settings: comma-separated subset of W4,W3,W2,W2A2.
        methods: comma-separated subset of rtn, efficientq, efficientq_original.
        out: optional JSON file for the rows.
        seed: ``EfficientQConfig.seed`` (the augmented copies and the activation sub-sampling): another seed is
            another draw of the same method, which shows how far a result moves with its last bits.
    """
    if checkpoint and not os.path.isfile(checkpoint):
        print(f"{checkpoint} not found: using random weights")
        checkpoint = None
    rows = []
    for setting in as_list(settings):
        for method in as_list(methods):
            args = {"threads": threads, "size": size, "iterations": iterations, "checkpoint": checkpoint,
                    "calib": calib, "held_out": held_out, "setting": setting, "method": method, "seed": seed}
            rows.append(run_in_fresh_process(_one, args))
            print(json.dumps(rows[-1]), flush=True)
    _print_table(rows, threads, size, iterations)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    fire.Fire(run)
