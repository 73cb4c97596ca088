"""MONAI transforms that prepare EfficientQ calibration data.

- :class:`CalibrationCrop` / :class:`CalibrationCropd`: a region of interest centred on the body (or the image
  centre), padded so the network accepts it.
- :class:`AttentionMap` / :class:`AttentionMapd`: the self-adaptive, class-balanced per-voxel weights of the
  method (Zhang & Chung 2024, the self-adaptive attention) from a label or a prediction, to pass to
  :func:`~monai_efficientq.network.quantize_network` as ``attention_map`` (the handler's ``attention_key``).

Both follow MONAI's conventions: channel-first inputs, numpy or torch in and the same type out, MetaTensor
metadata kept (the crop and pads are MONAI's own, so the affine follows the crop), and dictionary versions
with the ``D``/``Dict`` aliases.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import DivisiblePad, MapTransform, SpatialCrop, SpatialPad, Transform
from monai.transforms.utils import generate_spatial_bounding_box
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor, ensure_tuple_rep

from .attention import AttentionMaps, label_to_scores

__all__ = [
    "CalibrationCrop",
    "CalibrationCropd",
    "CalibrationCropD",
    "CalibrationCropDict",
    "AttentionMap",
    "AttentionMapd",
    "AttentionMapD",
    "AttentionMapDict",
]

CROP_MODES = ("foreground", "center")


def _nonzero(x: NdarrayOrTensor) -> NdarrayOrTensor:
    return x != 0


class CalibrationCrop(Transform):
    """Crop a calibration region of interest and pad it to a size the network accepts.

    The ROI is centred on the foreground (the centre of the bounding box of ``select_fn`` over all
    channels, by default the body where the input is non-zero) or on the image centre, and moved inside
    the image where it would stick out. It is then zero-padded symmetrically to at least ``roi_size``
    (where the image is smaller than the ROI) and to a multiple of ``divisible_by`` in every spatial
    dimension (the down-sampling factor of the network, e.g. 16 for a UNet with four stride-2 levels).

    Without foreground (``select_fn`` selects nothing) the crop falls back to the image centre.

    Args:
        roi_size: spatial size of the ROI; an entry ``None`` or ``<= 0`` (or ``roi_size=None``) means the
            full extent of that dimension. A single int applies to every spatial dimension.
        mode: ``"foreground"`` (centre on the bounding box of ``select_fn``) or ``"center"`` (image centre).
        divisible_by: every spatial size of the output is a multiple of this (int or one per dimension);
            ``None`` or 1 for no such padding.
        select_fn: selects the foreground voxels (applied to all channels, a voxel counts if any channel is
            selected). Default: input ``!= 0``.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        roi_size: Sequence[int | None] | int | None,
        mode: str = "foreground",
        divisible_by: Sequence[int] | int | None = 16,
        select_fn: Callable = _nonzero,
    ) -> None:
        if mode not in CROP_MODES:
            raise ValueError(f"mode={mode!r} is not supported: choose 'foreground' or 'center'.")
        if divisible_by is not None:
            div = ensure_tuple_rep(divisible_by, 1) if isinstance(divisible_by, int) else tuple(divisible_by)
            if any(int(k) < 1 for k in div):
                raise ValueError(f"divisible_by={divisible_by!r} must be positive integers (or None).")
        self.roi_size = roi_size
        self.mode = mode
        self.divisible_by = divisible_by
        self.select_fn = select_fn

    def _roi(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """The requested ROI size per dimension, full extent where unspecified."""
        nd = len(spatial)
        if self.roi_size is None:
            req: tuple = (None,) * nd
        elif isinstance(self.roi_size, (int, np.integer)):
            req = (int(self.roi_size),) * nd
        else:
            req = tuple(self.roi_size)
            if len(req) != nd:
                raise ValueError(
                    f"roi_size={tuple(self.roi_size)} has {len(req)} entries, the image {nd} spatial dims."
                )
        return tuple(int(s) if r is None or int(r) <= 0 else int(r) for r, s in zip(req, spatial))

    def compute_box(self, img: NdarrayOrTensor) -> tuple[list[int], list[int], tuple[int, ...]]:
        """The crop box of ``img`` (channel-first) and the size to pad to before the divisibility padding.

        Returns:
            ``(start, end, pad_size)``: the crop is ``img[:, start[0]:end[0], ...]``, then padded to ``pad_size``.
        """
        spatial = [int(s) for s in img.shape[1:]]
        roi = self._roi(spatial)
        size = [min(r, s) for r, s in zip(roi, spatial)]
        centre = [s // 2 for s in spatial]
        if self.mode == "foreground":
            box_start, box_end = generate_spatial_bounding_box(img, self.select_fn)
            if any(int(e) > int(b) for b, e in zip(box_start, box_end)):
                centre = [(int(b) + int(e)) // 2 for b, e in zip(box_start, box_end)]
        start = [min(max(c - n // 2, 0), s - n) for c, n, s in zip(centre, size, spatial)]
        end = [b + n for b, n in zip(start, size)]
        return start, end, roi

    def crop_with_box(
        self, img: NdarrayOrTensor, start: Sequence[int], end: Sequence[int], pad_size: Sequence[int]
    ) -> NdarrayOrTensor:
        """Crop ``img`` to ``[start, end)``, pad to ``pad_size`` then to the divisibility (zeros, symmetric)."""
        out = SpatialCrop(roi_start=list(start), roi_end=list(end))(img)
        out = SpatialPad(spatial_size=list(pad_size), method="symmetric", mode="constant")(out)
        if self.divisible_by is not None:
            out = DivisiblePad(k=self.divisible_by, method="symmetric", mode="constant")(out)
        # numpy in -> numpy out, plain tensor in -> plain tensor out; a MetaTensor keeps MONAI's updated metadata
        return out if isinstance(img, MetaTensor) else convert_to_dst_type(out, dst=img)[0]

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """Crop and pad ``img`` (channel-first ``(C, *S)``, numpy or torch; MetaTensor metadata kept)."""
        if img.ndim < 2:
            raise ValueError(f"CalibrationCrop needs a channel-first image (C, *S), got shape {tuple(img.shape)}.")
        start, end, pad_size = self.compute_box(img)
        return self.crop_with_box(img, start, end, pad_size)


class CalibrationCropd(MapTransform):
    """Dictionary-based wrapper of :class:`CalibrationCrop`.

    All ``keys`` are cropped with the same box, computed from the first key (or ``source_key``), so an
    image and its label stay aligned. They must have the same spatial shape.

    Args:
        keys: keys of the items to crop.
        roi_size: see :class:`CalibrationCrop`.
        mode: see :class:`CalibrationCrop`.
        divisible_by: see :class:`CalibrationCrop`.
        select_fn: see :class:`CalibrationCrop`.
        source_key: the item the box is computed from (default: the first of ``keys``).
        allow_missing_keys: don't raise an exception if a key is missing.
    """

    backend = CalibrationCrop.backend

    def __init__(
        self,
        keys: KeysCollection,
        roi_size: Sequence[int | None] | int | None,
        mode: str = "foreground",
        divisible_by: Sequence[int] | int | None = 16,
        select_fn: Callable = _nonzero,
        source_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.cropper = CalibrationCrop(roi_size, mode, divisible_by, select_fn)
        self.source_key = source_key

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        source = self.source_key if self.source_key is not None else self.first_key(d)
        if source == [] or source not in d:
            if self.allow_missing_keys and self.source_key is None:
                return d
            raise KeyError(f"CalibrationCropd: source key {source!r} is not in the data (keys: {list(d)}).")
        ref = d[source]
        start, end, pad_size = self.cropper.compute_box(ref)
        for key in self.key_iterator(d):
            if tuple(d[key].shape[1:]) != tuple(ref.shape[1:]):
                raise ValueError(
                    f"CalibrationCropd: '{key}' has spatial shape {tuple(d[key].shape[1:])}, '{source}' has "
                    f"{tuple(ref.shape[1:])}; all keys must share one spatial grid to be cropped with one box."
                )
        for key in self.key_iterator(d):
            d[key] = self.cropper.crop_with_box(d[key], start, end, pad_size)
        return d


class AttentionMap(Transform):
    """The self-adaptive attention map of EfficientQ from a label or a prediction.

    Every voxel gets the weight of its class, ``w_c = (n_max / n_c)^power`` from the voxel counts ``n_c`` of
    the classes in this volume (1 for absent classes); with ``multi_label`` a voxel in several classes gets
    the largest weight and a voxel in none is background. Voxels outside the body (``image`` zero in every
    channel, when an image is given) get 1. The output is ``(1, *S)`` float32, the same type as the input
    (MetaTensor metadata of the input kept); pass it to ``quantize_network(..., attention_map=...)``.

    Args:
        num_classes: number of classes of a class-index label (default: its maximum + 1).
        power: the exponent ``p`` of the class weights.
        multi_label: the input is multi-label (one-hot channels or sigmoid logits: a channel is on where it
            is > 0, i.e. sigmoid > 0.5) instead of multi-class (class indices ``(1, *S)``, one-hot or softmax
            logits ``(C, *S)``: one argmax class per voxel).
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, num_classes: int | None = None, power: float = 0.5, multi_label: bool = False) -> None:
        if num_classes is not None and int(num_classes) < 1:
            raise ValueError(f"num_classes={num_classes!r} must be a positive integer (or None).")
        self.num_classes = num_classes
        self.power = float(power)
        self.multi_label = bool(multi_label)

    def __call__(self, label: NdarrayOrTensor, image: NdarrayOrTensor | None = None) -> NdarrayOrTensor:
        """
        Args:
            label: class indices ``(1, *S)``, a one-hot label or logits ``(C, *S)`` (channel-first).
            image: optionally the image ``(C', *S)``: voxels where it is zero in every channel get weight 1.
        """
        if label.ndim < 2 or label.ndim > 4:
            raise ValueError(
                f"AttentionMap needs a channel-first (C, *S) input with 1-3 spatial dims, got {tuple(label.shape)}."
            )
        lab = convert_to_tensor(label, track_meta=False).float()
        if self.multi_label or lab.shape[0] > 1:
            scores = lab[None]
        else:
            scores = label_to_scores(lab[None], self.num_classes)
        body = None
        if image is not None:
            img = convert_to_tensor(image, track_meta=False)
            if tuple(img.shape[1:]) != tuple(lab.shape[1:]):
                raise ValueError(
                    f"AttentionMap: image spatial shape {tuple(img.shape[1:])} differs from the label's "
                    f"{tuple(lab.shape[1:])}."
                )
            body = (img != 0).any(dim=0)[None].to(scores.device)
        weights = AttentionMaps(scores, body, self.multi_label, self.power).full_resolution()
        out = weights.to(torch.float32)  # (1, *S)
        return convert_to_dst_type(out, dst=label, dtype=torch.float32)[0]


class AttentionMapd(MapTransform):
    """Dictionary-based wrapper of :class:`AttentionMap`: writes the map of each key to its output key.

    Args:
        keys: keys of the labels or predictions to derive the map from.
        output_key: where the map is stored (one per key, or one for a single key).
        image_key: key of the image whose zero voxels (outside the body) get weight 1; ``None``: no such rule.
        num_classes: see :class:`AttentionMap`.
        power: see :class:`AttentionMap`.
        multi_label: see :class:`AttentionMap`.
        allow_missing_keys: don't raise an exception if a key is missing.
    """

    backend = AttentionMap.backend

    def __init__(
        self,
        keys: KeysCollection,
        output_key: str | Sequence[str] = "attention",
        image_key: str | None = None,
        num_classes: int | None = None,
        power: float = 0.5,
        multi_label: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_keys = ensure_tuple_rep(output_key, len(self.keys))
        if len(set(self.output_keys)) != len(self.output_keys):
            raise ValueError(
                f"AttentionMapd: {len(self.keys)} keys {self.keys} would all write to {output_key!r}; give one output "
                f"key per key."
            )
        self.image_key = image_key
        self.mapper = AttentionMap(num_classes, power, multi_label)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = None
        if self.image_key is not None:
            if self.image_key not in d:
                raise KeyError(f"AttentionMapd: image_key {self.image_key!r} is not in the data (keys: {list(d)}).")
            image = d[self.image_key]
        for key, out_key in self.key_iterator(d, self.output_keys):
            d[out_key] = self.mapper(d[key], image)
        return d


CalibrationCropD = CalibrationCropDict = CalibrationCropd
AttentionMapD = AttentionMapDict = AttentionMapd
