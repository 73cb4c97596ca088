"""EfficientQ vs round-to-nearest on a SegResNet (init_filters 8) with one 64³ calibration volume, on CPU.

Each (setting, method) runs in a fresh subprocess so its peak memory (max RSS) is its own. Output error is
the relative squared error of the quantized logits vs the float logits (``‖q - f‖² / ‖f‖²``), on the
calibration crop and on a held-out crop of another volume; sizes are the float32 state dict vs the packed file.

    python benchmarks/segresnet_cpu.py --threads 2 --out benchmarks/results/segresnet_cpu.json

By default it uses the bundle's trained model and its calibration / first evaluation volume.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import tempfile
import time

import fire

HERE = os.path.dirname(os.path.abspath(__file__))
BUNDLE = os.path.join(HERE, "..", "bundles", "brain_tissue_mri_segmentation")
SETTINGS = {"W4": (4, None), "W3": (3, None), "W2": (2, None), "W2A2": (2, 2)}


def _network():
    from monai.networks.nets import SegResNet

    return SegResNet(spatial_dims=3, in_channels=1, out_channels=4, init_filters=8, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1))


def _volume(path: str, size: int):
    from monai_efficientq.io import load_calibration_volume

    return load_calibration_volume(path, roi_size=size, crop="foreground", divisible_by=16, normalize="nonzero")


def _one(args: dict, queue) -> None:
    import resource

    import torch

    from monai_efficientq import EfficientQConfig, quantize_network, save_quantized
    from monai_efficientq.io import load_float_weights

    torch.set_num_threads(args["threads"])
    net = _network()
    if args["checkpoint"]:
        load_float_weights(net, args["checkpoint"])
    else:
        torch.manual_seed(0)
    net.eval()
    calib = _volume(args["calib"], args["size"])
    held = _volume(args["held_out"], args["size"])
    bits, act = SETTINGS[args["setting"]]
    cfg = EfficientQConfig(weight_bits=bits, act_bits=act, method=args["method"], preset=args["preset"],
                           iterations=args["iterations"], progress=False)
    t0 = time.perf_counter()
    qnet, report = quantize_network(net, calib, cfg)
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "q.pt")
        save_quantized(qnet, path)
        size = os.path.getsize(path)
    errors = {}
    with torch.no_grad():
        for name, x in (("calib", calib[None]), ("held_out", held[None])):
            f, q = net(x), qnet(x)
            errors[name] = float((q - f).pow(2).sum() / f.pow(2).sum())
            agree = (q.argmax(1) == f.argmax(1)).float().mean().item()
            errors[name + "_label_agreement"] = agree
    queue.put({
        "setting": args["setting"], "method": args["method"], "preset": args["preset"], "seconds": round(seconds, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "rel_output_error_calib": errors["calib"], "rel_output_error_held_out": errors["held_out"],
        "voxel_agreement_held_out": errors["held_out_label_agreement"],
        "float_bytes": report.float_bytes, "packed_bytes": size, "compression": round(report.float_bytes / size, 2),
    })


def run(
    threads: int = 2,
    size: int = 64,
    iterations: int = 200,
    checkpoint: str | None = os.path.join(BUNDLE, "models", "model.pt"),
    calib: str = os.path.join(BUNDLE, "data", "calib", "calib_t1.nii.gz"),
    held_out: str = os.path.join(BUNDLE, "data", "eval", "case_000_t1.nii.gz"),
    settings: str = "W4,W3,W2,W2A2",
    methods: str = "rtn,efficientq",
    out: str | None = None,
) -> list:
    """Run every (setting, method) pair and print one JSON row each, then a Markdown table.

    Args:
        threads: torch threads per run.
        size: calibration crop (cube side).
        iterations: ADMM iterations per layer.
        checkpoint: float state dict (``None`` or a missing file: random weights).
        calib: calibration NIfTI.
        held_out: another NIfTI for the held-out error.
        settings: comma-separated subset of W4,W3,W2,W2A2.
        methods: comma-separated subset of rtn, efficientq, efficientq_original.
        out: optional JSON file for the rows.
    """
    if checkpoint and not os.path.isfile(checkpoint):
        print(f"{checkpoint} not found: using random weights")
        checkpoint = None
    settings = settings.split(",") if isinstance(settings, str) else list(settings)
    methods = methods.split(",") if isinstance(methods, str) else list(methods)
    ctx = mp.get_context("spawn")
    rows = []
    for setting in settings:
        for method in methods:
            preset = "original" if method.endswith("_original") else "default"
            args = {"threads": threads, "size": size, "iterations": iterations, "checkpoint": checkpoint,
                    "calib": calib, "held_out": held_out, "setting": setting,
                    "method": method.replace("_original", ""), "preset": preset}
            queue = ctx.Queue()
            proc = ctx.Process(target=_one, args=(args, queue))
            proc.start()
            row = queue.get()
            proc.join()
            row["method"] = method
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, threads {threads}; crop {size}^3, iterations {iterations}")
    print("| setting | method | seconds | peak RSS MB | rel. output error (calib) | rel. output error (held-out) | voxel agreement (held-out) | packed KiB | float/packed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['method']} | {r['seconds']} | {r['peak_rss_mb']} | {r['rel_output_error_calib']:.4f} | "
              f"{r['rel_output_error_held_out']:.4f} | {r['voxel_agreement_held_out']:.4f} | {r['packed_bytes'] / 1024:.0f} | {r['compression']} |")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    fire.Fire(run)
