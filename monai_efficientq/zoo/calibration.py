"""The calibration volume of a bundle quantization: one data item through the bundle's own preprocessing, cropped
by :class:`~monai_efficientq.transforms.CalibrationCropd` to a size the network accepts."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..io import check_image_values
from ..workflow import unwrap_config_error
from .configs import EVAL_PREPROCESSING_ID, INFERENCE_PREPROCESSING_ID, has_id, parsed_content

__all__ = [
    "MAX_DEFAULT_ROI",
    "FALLBACK_DIVISIBLE_BY",
    "Calibration",
    "calibration_item",
    "missing_files",
    "downsampling_factor",
    "prepare_calibration",
]

logger = logging.getLogger("monai_efficientq")

#: The calibration crop taken by default is the bundle's sliding-window size, at most this many voxels a side.
MAX_DEFAULT_ROI = 128
#: The crop's divisibility when the network's down-sampling factor is unknown.
FALLBACK_DIVISIBLE_BY = 16


@dataclasses.dataclass
class Calibration:
    """The calibration volume and how it was made.

    Attributes:
        image: the cropped volume ``(C, *S)``, float32.
        label: its cropped label, if the item had one.
        item: the data item it came from.
        preprocessing: the config id of the bundle preprocessing it went through.
        roi_size: the crop size asked of ``CalibrationCropd``.
        divisible_by: the padding multiple of the crop.
    """

    image: torch.Tensor
    label: torch.Tensor | None
    item: dict[str, Any]
    preprocessing: str
    roi_size: list[int]
    divisible_by: int | list[int]


def calibration_item(calib: Any, calib_label: Any, eval_items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The calibration data item: ``calib`` (a path, a list of paths for an image stored one file per channel, or a
    dict item) with ``calib_label``; else the first item of the evaluation dataset.

    Raises:
        ValueError: no ``calib`` and no evaluation item, or a ``calib`` of another kind.
    """
    if calib is None:
        if calib_label is not None:
            raise ValueError("--calib_label needs --calib: give the calibration image it labels.")
        if not eval_items:
            raise ValueError(
                "no calibration volume: pass --calib IMAGE (the bundle has no evaluation dataset to take its first "
                "item from; pass --dataset_dir if its data live elsewhere)."
            )
        return dict(eval_items[0])
    if isinstance(calib, Mapping):
        item = dict(calib)
    elif isinstance(calib, (str, os.PathLike)):
        item = {"image": os.fspath(calib)}
    elif isinstance(calib, Sequence) and calib and all(isinstance(c, (str, os.PathLike)) for c in calib):
        item = {"image": [os.fspath(c) for c in calib]}
    else:
        raise ValueError(
            f"--calib={calib!r}: give an image path, a list of paths (one file per channel) or a dict data item."
        )
    if calib_label is not None:
        item["label"] = os.fspath(calib_label)
    return item


def missing_files(items: Sequence[Mapping[str, Any]]) -> list[str]:
    """The ``image``/``label`` files of ``items`` that do not exist (a value may be a path or a list of paths)."""
    paths: list[str] = []
    for item in items:
        for key in ("image", "label"):
            value = item.get(key)
            paths += [value] if isinstance(value, str) else [v for v in value or [] if isinstance(v, str)]
    return [p for p in paths if not os.path.isfile(p)]


def downsampling_factor(net: nn.Module) -> int | list[int] | None:
    """The factor every input size must be a multiple of, for the MONAI networks whose structure says it (UNet,
    AttentionUnet, DynUNet: the product of the strides, per dimension when they differ; SegResNet:
    ``2^(levels-1)``; BasicUNet: 16; SwinUNETR: 32); ``None`` for other networks."""
    from monai.networks import nets

    strides = getattr(net, "strides", None)
    if isinstance(net, (nets.UNet, nets.AttentionUnet, nets.DynUNet)) and strides is not None:
        dims = max((len(s) for s in strides if isinstance(s, Sequence)), default=1)
        factor = [1] * dims
        for stride in strides:
            per_dim = list(stride) if isinstance(stride, Sequence) else [stride] * dims
            factor = [f * int(s) for f, s in zip(factor, per_dim)]
        return factor[0] if len(set(factor)) == 1 else factor
    if isinstance(net, (nets.SegResNet, nets.SegResNetVAE)):
        return 2 ** (len(net.blocks_down) - 1)
    if isinstance(net, nets.BasicUNet):
        return 16
    if isinstance(net, nets.SwinUNETR):
        return 32
    return None


def _preprocess(item: Mapping[str, Any], transform: Any, what: str) -> dict[str, Any]:
    try:
        out = transform(dict(item))
    except Exception as err:
        cause = unwrap_config_error(err)
        raise ValueError(
            f"cannot preprocess the calibration item {dict(item)} with the bundle's {what}: "
            f"{type(cause).__name__}: {cause}"
        ) from err
    out = out[0] if isinstance(out, (list, tuple)) else out
    check_image_values(out["image"])
    return out


def _default_roi(window: Sequence[int] | None, spatial: Sequence[int]) -> list[int]:
    """The network's inference window (else the image), at most :data:`MAX_DEFAULT_ROI` a side and no larger than
    the image."""
    window = window or spatial
    return [min(int(w), MAX_DEFAULT_ROI, int(s)) for w, s in zip(window, spatial)]


def prepare_calibration(
    item: Mapping[str, Any],
    evaluation: Any,
    inference: Any,
    net: nn.Module,
    roi_size: Any = None,
    divisible_by: Any = None,
    window: Sequence[int] | None = None,
) -> Calibration:
    """The calibration volume through the bundle's own preprocessing, then cropped.

    An item with a label goes through the evaluation's ``validate#preprocessing`` (which loads the label too), an
    image alone through the inference ``preprocessing`` (else the evaluation's).

    Args:
        item: the data item.
        evaluation: the parser of the evaluation configs (or ``None``).
        inference: the parser of the inference config (or ``None``).
        net: the network (for its down-sampling factor).
        roi_size: the crop; default the bundle's sliding window ``window``, see :func:`_default_roi`.
        divisible_by: the crop's padding multiple; default :func:`downsampling_factor`, else
            :data:`FALLBACK_DIVISIBLE_BY`.
        window: the ``roi_size`` of the bundle's sliding-window inferer, if any.
    """
    from ..transforms import CalibrationCropd

    use_inference = "label" not in item and inference is not None and has_id(inference, INFERENCE_PREPROCESSING_ID)
    if use_inference:
        parser, config_id = inference, INFERENCE_PREPROCESSING_ID
    else:
        parser, config_id = evaluation, EVAL_PREPROCESSING_ID
    if parser is None or not has_id(parser, config_id):
        raise ValueError(
            "the bundle has no preprocessing to calibrate with (validate#preprocessing, or preprocessing in its "
            "inference config)."
        )
    data = _preprocess(item, parsed_content(parser, config_id, "preprocessing"), config_id)
    spatial = [int(s) for s in data["image"].shape[1:]]
    if divisible_by is None:
        divisible_by = downsampling_factor(net)
        if divisible_by is None:
            divisible_by = FALLBACK_DIVISIBLE_BY
            logger.info("EfficientQ: %s's down-sampling factor is unknown; the calibration crop is padded to a "
                        "multiple of %d (set --divisible_by).", type(net).__name__, divisible_by)
    if roi_size is None:
        roi = _default_roi(window, spatial)
    else:
        roi = [int(roi_size)] * len(spatial) if isinstance(roi_size, (int, float)) else [int(r) for r in roi_size]
    keys = ["image", "label"] if "label" in data else ["image"]
    data = CalibrationCropd(keys, roi, divisible_by=divisible_by, source_key="image")(data)
    image = torch.as_tensor(data["image"]).float()
    image = image.as_tensor() if hasattr(image, "as_tensor") else image  # a plain tensor, not a MetaTensor
    label = torch.as_tensor(data["label"]) if "label" in data else None
    logger.info("EfficientQ: calibration volume %s through the bundle's %s, cropped to %s", item.get("image"),
                config_id, tuple(image.shape))
    return Calibration(image, label, dict(item), config_id, roi, divisible_by)
