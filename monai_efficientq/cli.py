"""Command line: ``monai-efficientq quantize ...`` and ``monai-efficientq report PATH`` (python-fire).

Run ``monai-efficientq quantize --help`` for every flag.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["quantize", "report", "build_network", "load_float_weights", "load_calibration_volume", "main"]

logger = logging.getLogger("monai_efficientq")


def _parse_mapping(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    try:
        parsed = json.loads(value)
    except (TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"{what} must be a JSON object, e.g. '{{\"in_channels\": 1}}'; got {value!r}.") from err
    if not isinstance(parsed, dict):
        raise ValueError(f"{what} must be a JSON object; got {value!r}.")
    return parsed


def build_network(
    network: str | None = None,
    network_kwargs: Any = None,
    config_file: str | Sequence[str] | None = None,
    network_id: str = "network_def",
    bundle_root: str | None = None,
) -> nn.Module:
    """The float network: from a dotted class path plus kwargs, or from a MONAI bundle config and the id of
    its network definition.

    Args:
        network: dotted class path, e.g. ``monai.networks.nets.SegResNet``.
        network_kwargs: constructor arguments (a dict or JSON text).
        config_file: a bundle config file (or a list merged left to right).
        network_id: id of the network definition in the config.
        bundle_root: value of ``bundle_root`` in the config (default: the folder above the config's folder).
    """
    if (network is None) == (config_file is None):
        raise ValueError("give either --network (a dotted class path) or --config_file (a bundle config), not both.")
    if config_file is not None:
        from monai.bundle import ConfigParser

        files = [config_file] if isinstance(config_file, str) else list(config_file)
        for f in files:
            if not os.path.isfile(f):
                raise FileNotFoundError(f"bundle config not found: {f}")
        parser = ConfigParser()
        parser.read_config(files)
        root = bundle_root or os.path.dirname(os.path.dirname(os.path.abspath(files[0])))
        parser["bundle_root"] = root
        if network_id not in parser:
            raise KeyError(f"{files[0]} has no id '{network_id}': pass --network_id with the id of the network definition.")
        return parser.get_parsed_content(network_id)
    module_name, _, class_name = network.rpartition(".")
    if not module_name:
        raise ValueError(f"--network must be a dotted path like monai.networks.nets.SegResNet, got {network!r}.")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import network class {network!r}: {err}") from err
    kwargs = _parse_mapping(network_kwargs, "--network_kwargs")
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"cannot build {network} with {kwargs}: {err}") from err


def load_float_weights(net: nn.Module, checkpoint: str) -> nn.Module:
    """Load a float checkpoint (a state dict, or a dict holding one under ``model``/``state_dict``/``network``)
    into ``net``, with a clear error for missing or unexpected keys and shape mismatches.
    """
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"float checkpoint not found: {checkpoint}")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{checkpoint} is not a readable torch checkpoint of tensors: {err}") from err
    if isinstance(state, dict) and state.get("format") == "monai-efficientq":
        raise ValueError(f"{checkpoint} is already a packed quantized checkpoint: load it with load_quantized.")
    for key in ("model", "state_dict", "network"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ValueError(f"{checkpoint} does not hold a state dict (got {type(state).__name__}).")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}  # saved from DataParallel
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs network {tuple(v.shape)}"
              for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es) (e.g. {shapes[:2]})")
        raise ValueError(
            f"{checkpoint} does not match the network {type(net).__name__}: " + "; ".join(parts)
            + ". Check the network definition and its arguments (e.g. channels, init_filters)."
        )
    net.load_state_dict(state)
    return net.eval()


def load_calibration_volume(
    path: str,
    roi_size: Any = None,
    crop: str = "foreground",
    divisible_by: int = 16,
    normalize: str = "nonzero",
) -> torch.Tensor:
    """Read a calibration image (NIfTI or anything MONAI ``LoadImage`` reads) channel-first, normalise and crop it.

    Args:
        path: image file.
        roi_size: crop size (int or per-dimension list; ``None`` = the full volume).
        crop: ``"foreground"`` (centred on the body, input ≠ 0) or ``"center"``.
        divisible_by: pad each spatial size to a multiple of this (the network's down-sampling factor).
        normalize: one of :data:`NORMALIZE_MODES` (see :func:`normalize_volume`; default z-score over the
            non-zero voxels of each channel).
    """
    from monai.transforms import LoadImage

    from .transforms import CalibrationCrop

    if not os.path.isfile(path):
        raise FileNotFoundError(f"calibration volume not found: {path}")
    image = normalize_volume(LoadImage(image_only=True, ensure_channel_first=True)(path), normalize)
    image = CalibrationCrop(roi_size, mode=crop, divisible_by=divisible_by)(image)
    return torch.as_tensor(image).float()


NORMALIZE_MODES = ("nonzero", "all", "minmax", "none")


def normalize_volume(image: Any, normalize: str = "nonzero") -> Any:
    """Intensity-normalise a channel-first image as the networks were trained.

    Args:
        image: channel-first image (MetaTensor, tensor or numpy array).
        normalize: ``"nonzero"`` (z-score over the non-zero voxels of each channel, as
            ``NormalizeIntensity(nonzero=True, channel_wise=True)``), ``"all"`` (z-score over every voxel of
            each channel), ``"minmax"`` (scale to [0, 1]) or ``"none"``.
    """
    from monai.transforms import NormalizeIntensity, ScaleIntensity

    if normalize == "nonzero":
        return NormalizeIntensity(nonzero=True, channel_wise=True)(image)
    if normalize == "all":
        return NormalizeIntensity(channel_wise=True)(image)
    if normalize == "minmax":
        return ScaleIntensity()(image)
    if normalize != "none":
        raise ValueError(f"--normalize={normalize!r} is not supported: use {', '.join(NORMALIZE_MODES)}.")
    return image


def quantize(
    checkpoint: str,
    calib: str,
    network: str | None = None,
    network_kwargs: Any = None,
    config_file: Any = None,
    network_id: str = "network_def",
    bundle_root: str | None = None,
    output: str = "model_quantized.pt",
    report_path: str | None = None,
    dequantized: str | None = None,
    calib_label: str | None = None,
    roi_size: Any = None,
    crop: str = "foreground",
    divisible_by: int = 16,
    normalize: str = "nonzero",
    weight_bits: int = 2,
    act_bits: int | None = None,
    first_last_bits: int | None = 8,
    method: str = "efficientq",
    preset: str = "default",
    iterations: int = 200,
    patience: int | None = 60,
    attention: str = "prediction",
    prediction: str = "softmax",
    calib_augment: int | None = None,
    holdout: bool | None = None,
    device: str | None = None,
    quiet: bool = False,
) -> None:
    """Quantize a trained float network from one calibration volume and write the packed checkpoint and report.

    Example:
        monai-efficientq quantize --network monai.networks.nets.SegResNet \\
            --network_kwargs '{"in_channels": 1, "out_channels": 4, "init_filters": 8}' \\
            --checkpoint model.pt --calib t1.nii.gz --roi_size 96 --weight_bits 2 --act_bits 2

    Args:
        checkpoint: float checkpoint (state dict) of the network.
        calib: calibration image (NIfTI), one volume, no label needed.
        network: dotted class path of the network, e.g. monai.networks.nets.SegResNet (or use --config_file).
        network_kwargs: JSON object of the network's constructor arguments.
        config_file: MONAI bundle config holding the network definition (instead of --network).
        network_id: id of the network definition in --config_file (default network_def).
        bundle_root: bundle_root for --config_file (default: the folder above the config folder).
        output: packed checkpoint to write (written atomically).
        report_path: report JSON to write (default: OUTPUT with .json; a .md is written beside it).
        dequantized: optional path of a dequantized float state dict the original network loads.
        calib_label: optional label image of the calibration volume (used with --attention label).
        roi_size: calibration crop size, an int or a list like [96,96,96]; default the whole volume.
        crop: foreground (centre the crop on the body, input != 0) or center.
        divisible_by: pad the crop to a multiple of this (the network's down-sampling factor).
        normalize: intensity normalisation the network was trained with: nonzero (z-score of non-zero voxels), minmax or none.
        weight_bits: weight bits of the inner layers, 2..8.
        act_bits: input-activation bits of the inner layers, 2..8; omit for float activations.
        first_last_bits: weight bits of the first and last layer (their input stays float); None = like the others.
        method: efficientq (ADMM reconstruction) or rtn (round to nearest, the baseline).
        preset: default (ours) or original (the published code's choices).
        iterations: ADMM iterations per layer (at most).
        patience: stop a layer's ADMM once its best iterate has not improved for this many iterations (``None``:
            run all ``iterations``).
        attention: prediction (class-balanced, from the float prediction), label (needs --calib_label) or none.
        prediction: softmax (multi-class) or sigmoid (multi-label) network output.
        calib_augment: augmented copies of the calibration volume calibrated on with it (default: the preset's, 2
            for default, 0 for original).
        holdout: choose each layer's solution on the last copy, which the fit does not see (default: the preset's).
        device: cpu, cuda or cuda:N (default cpu).
        quiet: no progress bar or per-layer log.
    """
    from .checkpoint import save_dequantized, save_quantized
    from .config import EfficientQConfig
    from .network import quantize_network

    cfg = EfficientQConfig(
        weight_bits=weight_bits, act_bits=act_bits, first_last_bits=first_last_bits, method=method,
        preset=preset, iterations=iterations, patience=patience, attention=attention, prediction=prediction,
        device=device, progress=not quiet, calib_augment=calib_augment, holdout=holdout,
    )
    out_dir = os.path.dirname(os.path.abspath(output))
    os.makedirs(out_dir, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise PermissionError(f"cannot write to {out_dir}: choose another --output.")
    report_path = report_path or os.path.splitext(output)[0] + ".json"
    if not quiet:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    net = build_network(network, network_kwargs, config_file, network_id, bundle_root)
    load_float_weights(net, checkpoint)
    calib_volume = load_calibration_volume(calib, roi_size, crop, divisible_by, normalize)
    label = None
    if calib_label is not None:
        if roi_size is not None:
            raise ValueError("--calib_label with --roi_size is not supported here: crop both with the CalibrationCropd transform.")
        from monai.transforms import LoadImage

        label = LoadImage(image_only=True, ensure_channel_first=True)(calib_label)
        label = torch.as_tensor(label)
        if list(label.shape[1:]) != list(calib_volume.shape[1:]):
            raise ValueError(f"--calib_label shape {list(label.shape[1:])} differs from the calibration volume {list(calib_volume.shape[1:])}.")
    qnet, rep = quantize_network(net, calib_volume, cfg, label=label)
    save_quantized(qnet, output, rep)
    rep.to_json(report_path)
    rep.to_markdown(os.path.splitext(report_path)[0] + ".md")
    if dequantized:
        save_dequantized(qnet, net, dequantized)
    print(
        f"wrote {output} ({os.path.getsize(output) / 2**20:.2f} MiB, {rep.compression:.1f}x smaller than float) "
        f"and {report_path}; {len(rep.layers)} layers in {rep.total_seconds:.1f} s"
    )


def report(path: str) -> str:
    """A saved report as Markdown (printed by the command).

    Args:
        path: a report JSON written by `quantize`, or a packed checkpoint saved with its report.
    """
    from .checkpoint import _read
    from .report import QuantizationReport

    if not os.path.isfile(path):
        raise FileNotFoundError(f"report not found: {path}")
    if path.endswith(".json"):
        rep = QuantizationReport.from_json(path)
    else:
        state = _read(path, "cpu")
        if "report" not in state:
            raise ValueError(f"{path} was saved without a report; look for the .json written beside it.")
        rep = QuantizationReport.from_dict(state["report"])
    return rep.to_markdown()


def main() -> None:
    """Entry point of the ``monai-efficientq`` command."""
    import sys

    import fire

    from .checkpoint import CheckpointFormatError

    try:
        fire.Fire({"quantize": quantize, "report": report}, name="monai-efficientq")
    except (ValueError, KeyError, FileNotFoundError, PermissionError, CheckpointFormatError) as err:
        print(f"monai-efficientq: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
