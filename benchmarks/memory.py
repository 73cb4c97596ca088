"""Peak memory of a quantization run against a float forward on the same calibration volume (CPU, peak RSS).

    # the bundle SegResNet, its calibration volume cropped to 96³, the bundle's settings (W2A2, attention none)
    python benchmarks/memory.py --model segresnet --roi 96 --threads 1 --out benchmarks/results/memory_segresnet_96.json
    # 192³: the calibration volume resampled to 1 mm (x2, trilinear) first, as a 1 mm scan would be
    python benchmarks/memory.py --model segresnet --roi 192 --upsample 2 --threads 1 --out ...
    # the UNet with BatchNorm of BENCHMARKS.md (W2, float activations)
    python benchmarks/memory.py --model unet_bn --roi 96 --weight_bits 2 --act_bits none --threads 1 --out ...

Each measurement runs in a fresh process, so its peak resident set size is its own (it includes the Python, torch
and MONAI imports and the weights, measured separately as ``baseline``):

- ``float_forward_1``: ``net(x)`` under ``no_grad`` on the one calibration volume;
- ``float_forward_batch``: the same on the batch of the volume and its augmented copies in one call (what a batched
  pass holds; on the CPU the pass runs them one at a time);
- ``quantize``: :func:`monai_efficientq.quantize_` with the given settings (``--eq_options`` for more fields, e.g.
  ``'{"target_device": "disk"}'``).

Memory does not depend on the number of ADMM iterations (the solver's state is per layer), so ``--iterations``
may be lowered to shorten a run; the JSON records it.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Any

if __package__ in (None, ""):  # run as a file: import the benchmarks package from the repository
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import fire  # noqa: E402
import torch  # noqa: E402

from benchmarks.measure import rss_now_mb, run_in_fresh_process  # noqa: E402
from benchmarks.networks import BUNDLE_DATA, BUNDLE_MODEL, BUNDLE_SEGRESNET  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {
    "segresnet": ("monai.networks.nets.SegResNet", BUNDLE_SEGRESNET, BUNDLE_MODEL),
    "unet_bn": (
        "monai.networks.nets.UNet",
        {"spatial_dims": 3, "in_channels": 1, "out_channels": 4, "channels": [16, 32, 64, 128, 256],
         "strides": [2, 2, 2, 2], "num_res_units": 2, "norm": "batch"},
        os.path.join(REPO, "benchmarks", "models", "unet_bn.pt"),
    ),
}
CALIB_IMAGE = os.path.join(BUNDLE_DATA, "calib", "calib_t1.nii.gz")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _setup(model: str, roi: int, upsample: float, threads: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """The trained float network and the calibration volume ``(C, roi, roi, roi)``, in this process."""
    from monai_efficientq.io import build_network, load_calibration, load_float_weights
    from monai_efficientq.transforms import CalibrationCrop

    torch.set_num_threads(threads)
    cls, kwargs, checkpoint = MODELS[model]
    net = load_float_weights(build_network(cls, kwargs), checkpoint).eval()
    volume, _ = load_calibration(CALIB_IMAGE, roi_size=None)
    if upsample != 1:
        volume = torch.nn.functional.interpolate(volume[None], scale_factor=upsample, mode="trilinear")[0]
        volume[volume.abs() < 1e-6] = 0
    volume = CalibrationCrop([roi] * 3, mode="foreground", divisible_by=16)(volume)
    return net, torch.as_tensor(volume).float()


def _float_forward(model: str, roi: int, upsample: float, threads: int, copies: int) -> dict[str, float]:
    net, volume = _setup(model, roi, upsample, threads)
    batch = volume[None].repeat(1 + copies, *([1] * volume.dim()))
    baseline = rss_now_mb()
    with torch.no_grad():
        net(batch)
    return {"peak_rss_mb": _peak_mb(), "baseline_rss_mb": baseline, "volumes": 1 + copies}


def _quantize(model: str, roi: int, upsample: float, threads: int, options: dict[str, Any]) -> dict[str, Any]:
    from monai_efficientq import EfficientQConfig, quantize_

    net, volume = _setup(model, roi, upsample, threads)
    baseline = rss_now_mb()
    start = time.perf_counter()
    report = quantize_(net, volume, EfficientQConfig(**options, progress=False))
    return {
        "peak_rss_mb": _peak_mb(), "baseline_rss_mb": baseline, "seconds": time.perf_counter() - start,
        "calib_augment": report.config["calib_augment"], "layers": len(report.layers),
    }


def run(
    model: str = "segresnet", roi: int = 96, upsample: float = 1.0, weight_bits: int = 2, act_bits: Any = 2,
    iterations: int = 200, eq_options: Any = None, threads: int = 1, out: str | None = None,
) -> dict[str, Any]:
    """Measure and print the three peaks and their ratios; write them as JSON to ``out``.

    Args:
        model: ``segresnet`` (the bundle's trained SegResNet, bundle settings: attention none) or ``unet_bn``.
        roi: side of the cubic calibration crop.
        upsample: resample the calibration volume by this factor before cropping (2: 2 mm to 1 mm).
        weight_bits: weight bits of the inner layers.
        act_bits: activation bits, or ``none``.
        iterations: ADMM iterations per layer (at most).
        eq_options: JSON object of more ``EfficientQConfig`` fields.
        threads: torch CPU threads.
        out: JSON file to write.
    """
    act = None if str(act_bits).lower() in ("none", "null") else int(act_bits)
    options = {"weight_bits": weight_bits, "act_bits": act, "iterations": iterations}
    if model == "segresnet":
        options["attention"] = "none"  # the bundle's setting
    options.update(json.loads(eq_options) if isinstance(eq_options, str) else dict(eq_options or {}))
    quant = run_in_fresh_process(_quantize, model, roi, upsample, threads, options)
    one = run_in_fresh_process(_float_forward, model, roi, upsample, threads, 0)
    batch = run_in_fresh_process(_float_forward, model, roi, upsample, threads, int(quant["calib_augment"] or 0))
    result = {
        "model": model, "roi": roi, "upsample": upsample, "threads": threads, "options": options,
        "quantize": quant, "float_forward_1": one, "float_forward_batch": batch,
        "ratio_to_float_forward_1": quant["peak_rss_mb"] / one["peak_rss_mb"],
        "ratio_to_float_forward_batch": quant["peak_rss_mb"] / batch["peak_rss_mb"],
    }
    print(
        f"{model} {roi}^3 (x{upsample}): quantize peak {quant['peak_rss_mb']:.0f} MiB in {quant['seconds']:.0f} s; "
        f"float forward 1 volume {one['peak_rss_mb']:.0f} MiB ({result['ratio_to_float_forward_1']:.2f}x), "
        f"{batch['volumes']} volumes {batch['peak_rss_mb']:.0f} MiB ({result['ratio_to_float_forward_batch']:.2f}x); "
        f"baseline after imports and weights {one['baseline_rss_mb']:.0f} MiB"
    )
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    fire.Fire(run, serialize=lambda _: None)
