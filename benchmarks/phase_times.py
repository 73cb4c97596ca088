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

import os
import sys
from typing import Any

if __package__ in (None, ""):  # run as a file: import the benchmarks package from the repository
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import fire  # noqa: E402
import torch  # noqa: E402

from benchmarks.config import as_dict  # noqa: E402
from benchmarks.measure import Stopwatch  # noqa: E402
from benchmarks.networks import BUNDLE_DATA, BUNDLE_MODEL, BUNDLE_SEGRESNET  # noqa: E402
from monai_efficientq import EfficientQConfig, QuantizationReport, quantize_network  # noqa: E402
from monai_efficientq.io import build_network, load_calibration_volume, load_float_weights  # noqa: E402


def _print_phases(report: QuantizationReport) -> None:
    """The report's "Where the time went" table and the slowest layers."""
    markdown = report.to_markdown()
    print(markdown[markdown.index("## Where the time went") :].split("\n## ")[0].strip())
    slowest = sorted(report.layers, key=lambda r: -r.seconds)[:5]
    print("slowest layers: " + ", ".join(f"{r.name} {r.seconds:.1f} s ({r.iterations_run} it.)" for r in slowest))


def run(
    network: str = "monai.networks.nets.SegResNet",
    network_kwargs: dict | str | None = None,
    checkpoint: str | None = BUNDLE_MODEL,
    calib_image: str | None = os.path.join(BUNDLE_DATA, "calib", "calib_t1.nii.gz"),
    roi: int = 96,
    random_shape: tuple[int, ...] | None = None,
    weight_bits: int = 2,
    act_bits: int | None = 2,
    method: str = "efficientq",
    eq_options: Any = None,
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
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    kwargs = as_dict(network_kwargs) if network_kwargs is not None else BUNDLE_SEGRESNET
    net = build_network(network, kwargs).eval()
    if checkpoint:
        load_float_weights(net, checkpoint)
    if random_shape:
        calib_volume = torch.randn(*random_shape, generator=torch.Generator().manual_seed(1))
    else:
        calib_volume = load_calibration_volume(calib_image, roi_size=roi)
    cfg = EfficientQConfig(weight_bits=weight_bits, act_bits=act_bits, method=method, progress=False,
                           **as_dict(eq_options))
    with Stopwatch(torch.device("cpu")) as clock:
        _, report = quantize_network(net, calib_volume, cfg)
    print(f"{network} on {list(calib_volume.shape)}, W{weight_bits}A{act_bits}, {method}, {torch.get_num_threads()} "
          f"thread(s): {clock.seconds:.1f} s")
    _print_phases(report)
    if out:
        report.to_json(out)
    return {"seconds": round(clock.seconds, 2), "phases": report.phase_seconds}


if __name__ == "__main__":
    fire.Fire(run)
