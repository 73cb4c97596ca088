"""Where the time of one quantization run goes, phase by phase, for a given network and calibration volume.

    # the bundle's SegResNet on its 96³ calibration crop, the bundle's settings (W2A2, attention none)
    python benchmarks/phase_times.py --threads 1 --weight_bits 2 --act_bits 2 --eq_options '{"attention": "none"}'
    # any network: a dotted class path and its kwargs, a float checkpoint (or random weights), a volume
    python benchmarks/phase_times.py --network monai.networks.nets.UNet --network_kwargs '{...}' \\
        --checkpoint benchmarks/models/unet_bn.pt --calib_image data.nii.gz --roi 96

Prints the report's phase table (seconds, share, what each phase holds) and the layers that took longest, and
writes the report as JSON when ``--out`` is given.
"""

from __future__ import annotations

import json
import os
import time

import fire
import torch

BUNDLE = os.path.join(os.path.dirname(__file__), "..", "bundles", "brain_tissue_mri_segmentation")
SEGRESNET = {
    "spatial_dims": 3, "in_channels": 1, "out_channels": 4, "init_filters": 8, "blocks_down": [1, 2, 2, 4],
    "blocks_up": [1, 1, 1], "dropout_prob": 0.0,
}


def run(
    network: str = "monai.networks.nets.SegResNet",
    network_kwargs: dict | str | None = None,
    checkpoint: str | None = os.path.join(BUNDLE, "models", "model.pt"),
    calib_image: str | None = os.path.join(BUNDLE, "data", "calib", "calib_t1.nii.gz"),
    roi: int = 96,
    random_shape: tuple[int, ...] | None = None,
    weight_bits: int = 2,
    act_bits: int | None = 2,
    method: str = "efficientq",
    eq_options: dict | str | None = None,
    threads: int | None = 1,
    out: str | None = None,
) -> dict:
    """Quantize once and print the time per phase.

    Args:
        network: dotted class path of the network.
        network_kwargs: its constructor arguments (dict or JSON; default: the bundle's SegResNet).
        checkpoint: float weights (``None``: seeded random weights).
        calib_image: calibration image, cropped by the bundle's protocol (``CalibrationCrop``, foreground-centred,
            padded to multiples of 16) to ``roi``; ignored with ``random_shape``.
        roi: side of the calibration crop.
        random_shape: a seeded random calibration volume of this shape ``(C, *S)`` instead of an image.
        weight_bits: weight bits of the inner layers.
        act_bits: activation bits (``None``: float activations).
        method: ``efficientq`` or ``rtn``.
        eq_options: more :class:`~monai_efficientq.config.EfficientQConfig` fields (dict or JSON).
        threads: torch CPU threads.
        out: write the report JSON here.
    """
    from monai_efficientq import EfficientQConfig, quantize_network
    from monai_efficientq.io import build_network, load_calibration_volume, load_float_weights

    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    kwargs = json.loads(network_kwargs) if isinstance(network_kwargs, str) else network_kwargs
    net = build_network(network, kwargs if kwargs is not None else SEGRESNET).eval()
    if checkpoint:
        load_float_weights(net, checkpoint)
    if random_shape:
        calib_volume = torch.randn(*random_shape, generator=torch.Generator().manual_seed(1))
    else:
        calib_volume = load_calibration_volume(calib_image, roi_size=roi)
    options = json.loads(eq_options) if isinstance(eq_options, str) else dict(eq_options or {})
    cfg = EfficientQConfig(weight_bits=weight_bits, act_bits=act_bits, method=method, progress=False, **options)
    start = time.perf_counter()
    _, report = quantize_network(net, calib_volume, cfg)
    seconds = time.perf_counter() - start
    print(f"{network} on {list(calib_volume.shape)}, W{weight_bits}A{act_bits}, {method}, {torch.get_num_threads()} "
          f"thread(s): {seconds:.1f} s")
    markdown = report.to_markdown()
    print(markdown[markdown.index("## Where the time went") :].split("\n## ")[0].strip())
    slowest = sorted(report.layers, key=lambda r: -r.seconds)[:5]
    print("slowest layers: " + ", ".join(f"{r.name} {r.seconds:.1f} s ({r.iterations_run} it.)" for r in slowest))
    if out:
        report.to_json(out)
    return {"seconds": round(seconds, 2), "phases": report.phase_seconds}


if __name__ == "__main__":
    fire.Fire(run)
