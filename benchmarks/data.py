"""The float network, the evaluation volumes and the calibration batch of a comparison run.

Everything is read through :mod:`monai_efficientq.io` (the network, its weights, the volumes with the intensity
normalisation the network was trained with) and the datalist through :func:`monai_efficientq.io.load_datalist`;
the calibration crop is the package's :class:`~monai_efficientq.transforms.CalibrationCropd`, so the benchmarks
calibrate on the bundle's crop.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from monai_efficientq.io import load_datalist
from monai_efficientq.io import build_network, load_calibration, load_float_weights
from monai_efficientq.transforms import CalibrationCropd

from .config import CompareConfig, spatial_size
from .evaluation import Case

__all__ = ["CalibrationSet", "RunData", "load_float_network", "load_run_data", "load_volume", "calibration_set"]

logger = logging.getLogger("benchmarks")


@dataclass
class CalibrationSet:
    """The calibration batch every method quantizes from.

    Attributes:
        image: ``(N, C, *S)`` cropped calibration volumes.
        label: ``(N, 1, *S)`` their labels cropped with the same boxes, or ``None``.
        box: the crop of the first volume: ``start``, ``end``, ``size`` (after padding), ``volume`` (before) and
            ``transform`` (the crop transform and its arguments).
    """

    image: torch.Tensor
    label: torch.Tensor | None
    box: dict[str, Any]


@dataclass
class RunData:
    """The data of one comparison run.

    Attributes:
        calibration: the cropped calibration batch.
        cases: the evaluation volumes (the whole first calibration volume when there is no datalist).
        class_names: names of the network's output channels (``None``: ``class<i>``).
        calib_images: the calibration image paths.
        calib_labels: the calibration label paths.
        eval_images: the evaluation image paths.
    """

    calibration: CalibrationSet
    cases: list[Case]
    class_names: list[str] | None
    calib_images: list[str]
    calib_labels: list[str] = field(default_factory=list)
    eval_images: list[str] = field(default_factory=list)


def load_float_network(cfg: CompareConfig) -> nn.Module:
    """The float network of ``cfg`` with its checkpoint loaded (random weights, with a warning, without one)."""
    net = build_network(cfg.network, cfg.network_kwargs, cfg.config_file, cfg.network_id, cfg.bundle_root)
    if cfg.checkpoint:
        return load_float_weights(net, cfg.checkpoint)
    logger.warning("no --checkpoint: the network keeps its random initial weights")
    return net.eval()


def load_volume(image: str, label: str | None = None, normalize: str = "nonzero") -> Case:
    """One whole volume ``(C, *S)`` float32, normalised, and its label ``(1, *S)`` (or ``None``)."""
    return load_calibration(image, label, roi_size=None, divisible_by=None, normalize=normalize)


def calibration_set(volumes: list[Case], roi: tuple[int, ...] | None, divisor: int) -> CalibrationSet:
    """Crop every calibration volume (and label) by the bundle's protocol and stack them into one batch.

    Args:
        volumes: whole calibration volumes with their labels (all with labels, or the labels are dropped).
        roi: the crop size (``None``: the whole volume), padded up to it and to multiples of ``divisor``.
        divisor: the network's down-sampling factor.
    """
    crop = CalibrationCropd(["image", "label"], roi, mode="foreground", divisible_by=divisor, source_key="image",
                            allow_missing_keys=True)
    with_labels = all(label is not None for _, label in volumes)
    items = [crop({"image": image, "label": label} if with_labels else {"image": image}) for image, label in volumes]
    start, end, _ = crop.cropper.compute_box(volumes[0][0])
    box = {
        "start": list(start), "end": list(end), "size": list(items[0]["image"].shape[1:]),
        "volume": list(volumes[0][0].shape[1:]),
        "transform": f"CalibrationCrop(roi_size={roi}, mode='foreground', divisible_by={divisor})",
    }
    label = torch.stack([item["label"] for item in items]) if with_labels else None
    return CalibrationSet(torch.stack([item["image"] for item in items]), label, box)


def _datalist(cfg: CompareConfig) -> tuple[list[dict[str, Any]], dict[str, Any], list[str] | None]:
    """The evaluation items, the calibration item and the class names of ``cfg.eval_datalist`` (if any)."""
    if not cfg.eval_datalist:
        return [], {}, None
    items = load_datalist(cfg.eval_datalist, cfg.datalist_key, cfg.data_root, cfg.max_eval_cases)
    with open(cfg.eval_datalist, encoding="utf-8") as f:
        sections = json.load(f)
    calibration = load_datalist(cfg.eval_datalist, "calibration", cfg.data_root)[0] if "calibration" in sections else {}
    labels = sections.get("labels")
    names = [labels.get(str(i), f"class{i}") for i in range(len(labels))] if isinstance(labels, dict) else None
    return items, calibration, names


def load_run_data(cfg: CompareConfig) -> RunData:
    """The calibration batch, the evaluation cases and the class names of ``cfg``."""
    items, calib_item, datalist_names = _datalist(cfg)
    images = cfg.calib_image or ([calib_item["image"]] if calib_item.get("image") else [])
    labels = cfg.calib_label or ([calib_item["label"]] if not cfg.calib_image and calib_item.get("label") else [])
    if not images:
        raise ValueError("give --calib_image (or a datalist with a 'calibration' entry).")
    if labels and len(labels) != len(images):
        raise ValueError(f"{len(images)} calibration images but {len(labels)} labels: give one label per image.")
    volumes = [load_volume(image, label, cfg.normalize) for image, label in zip(images, labels or [None] * len(images))]
    roi = spatial_size(cfg.calib_roi, volumes[0][0].dim() - 1)
    calibration = calibration_set(volumes, roi, cfg.divisor)
    cases = [load_volume(it["image"], it.get("label"), cfg.normalize) for it in items]
    if not cases:
        logger.warning("no --eval_datalist: evaluating on the whole calibration volume")
        cases = [volumes[0]]
    return RunData(calibration, cases, cfg.class_names or datalist_names, images, labels,
                   [it["image"] for it in items])
