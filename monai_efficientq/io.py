"""Reading what a quantization run starts from: the float network, its weights and the calibration volume.

The CLI, the bundle scripts, the handler's users and the benchmarks all load through these functions, so every
entry point builds the same network and calibrates on the same crop.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "NORMALIZE_MODES",
    "build_network",
    "load_float_weights",
    "calibration_transform",
    "load_calibration",
    "load_calibration_volume",
    "normalization_transform",
    "normalize_volume",
    "check_output_path",
    "check_image_values",
    "CalibrationImageError",
    "load_datalist",
]


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
    if network is None and config_file is None:
        raise ValueError("no network given: pass --network (a dotted class path) or --config_file (a bundle config).")
    if network is not None and config_file is not None:
        raise ValueError("--network and --config_file both give the network: pass only one of them.")
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
    except Exception as err:  # torch's own message may advise weights_only=False, which we never do
        raise ValueError(
            f"{checkpoint} is not a readable float checkpoint ({type(err).__name__}): give a state dict saved with "
            f"torch.save(net.state_dict(), path) (or a dict holding one under 'model', 'state_dict' or 'network')."
        ) from None
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


def calibration_transform(
    roi_size: Any = None,
    crop: str = "foreground",
    divisible_by: int = 16,
    normalize: str = "nonzero",
    with_label: bool = False,
) -> Any:
    """The MONAI pipeline that reads a calibration image (and its label) from ``{"image": path, "label": path}``:
    ``LoadImaged`` channel-first, the intensity normalisation of :func:`normalization_transform` on the image,
    and :class:`~monai_efficientq.transforms.CalibrationCropd` on both with the box of the image.

    Args:
        roi_size: crop size (int or per-dimension list; ``None`` = the full volume).
        crop: ``"foreground"`` (centred on the body, input ≠ 0) or ``"center"``.
        divisible_by: pad each spatial size to a multiple of this (the network's down-sampling factor).
        normalize: one of :data:`NORMALIZE_MODES`.
        with_label: also load and crop ``"label"``.
    """
    from monai.transforms import Compose, EnsureTyped, Lambdad, LoadImaged

    from .transforms import CalibrationCropd

    if crop not in ("foreground", "center"):
        raise ValueError(f"--crop={crop!r} is not supported: use foreground or center.")
    keys = ["image", "label"] if with_label else ["image"]
    return Compose(
        [
            LoadImaged(keys, image_only=True, ensure_channel_first=True),
            Lambdad("image", check_image_values),  # before the normalisation spreads a NaN or hides a constant
            normalization_transform("image", normalize),
            CalibrationCropd(keys, roi_size, mode=crop, divisible_by=divisible_by, source_key="image"),
            EnsureTyped(keys, data_type="tensor", track_meta=False),
        ]
    )


def load_calibration(
    path: str,
    label_path: str | None = None,
    roi_size: Any = None,
    crop: str = "foreground",
    divisible_by: int = 16,
    normalize: str = "nonzero",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read a calibration image (NIfTI or anything MONAI ``LoadImage`` reads) and optionally its label, normalise
    the image and crop both with one box (see :func:`calibration_transform` for the arguments).

    Returns:
        ``(volume (C, *S) float32, label (1, *S) or None)``.
    """
    for what, file in (("calibration volume", path), ("calibration label", label_path)):
        if file is not None and not os.path.isfile(file):
            raise FileNotFoundError(f"{what} not found: {file}")
    data = {"image": path} if label_path is None else {"image": path, "label": label_path}
    transform = calibration_transform(roi_size, crop, divisible_by, normalize, with_label=label_path is not None)
    try:
        out = transform(data)
    except Exception as err:
        if isinstance(err.__cause__, CalibrationImageError):  # raised by check_image_values inside the pipeline
            raise CalibrationImageError(f"{path}: {err.__cause__}") from None
        raise ValueError(_unreadable_image_message(path, label_path, err)) from None
    label = out.get("label")
    return torch.as_tensor(out["image"]).float(), None if label is None else torch.as_tensor(label)


class CalibrationImageError(ValueError):
    """A calibration image that was read but cannot be calibrated on (NaN/Inf voxels, one value everywhere)."""


def check_image_values(image: Any) -> Any:
    """Refuse an image with NaN/Inf voxels or one value everywhere (no signal to calibrate on); return it unchanged.

    Args:
        image: the image as read (before any normalisation).

    Raises:
        CalibrationImageError: naming how many voxels are not finite, or the constant value.
    """
    values = torch.as_tensor(image)
    bad = int((~torch.isfinite(values)).sum())
    if bad:
        raise CalibrationImageError(
            f"the calibration volume has {bad} NaN/Inf voxel(s) of {values.numel()}: clean it (e.g. replace them "
            f"with 0) or use another volume."
        )
    if values.numel() and bool((values == values.reshape(-1)[0]).all()):
        raise CalibrationImageError(
            f"the calibration volume has the value {float(values.reshape(-1)[0]):g} in every voxel: it carries no "
            f"signal to calibrate on; use a real image."
        )
    return image


def _unreadable_image_message(path: str, label_path: str | None, err: Exception) -> str:
    """One line for a calibration image (or label) MONAI could not read or crop, from the transform's error."""
    cause = err.__cause__ if err.__cause__ is not None else err
    first_line = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if "LoadImage" in str(err) or isinstance(cause, (OSError, RuntimeError)) and "reader" in str(cause).lower():
        files = path if label_path is None else f"{path} or {label_path}"
        return (
            f"cannot read {files} as an image ({first_line[:200]}): give a NIfTI (.nii, .nii.gz) or another format "
            f"MONAI LoadImage reads."
        )
    return f"cannot prepare the calibration volume {path}: {first_line[:300]}"


def load_calibration_volume(
    path: str,
    roi_size: Any = None,
    crop: str = "foreground",
    divisible_by: int = 16,
    normalize: str = "nonzero",
) -> torch.Tensor:
    """The calibration volume alone, channel-first and float32 (see :func:`load_calibration`)."""
    return load_calibration(path, None, roi_size, crop, divisible_by, normalize)[0]


NORMALIZE_MODES = ("nonzero", "all", "minmax", "none")


def normalization_transform(keys: Any, normalize: str = "nonzero") -> Any:
    """The dictionary transform of an intensity normalisation the networks were trained with.

    Args:
        keys: the keys to normalise.
        normalize: ``"nonzero"`` (z-score over the non-zero voxels of each channel, as
            ``NormalizeIntensityd(nonzero=True, channel_wise=True)``), ``"all"`` (z-score over every voxel of
            each channel), ``"minmax"`` (scale to [0, 1]) or ``"none"``.
    """
    from monai.transforms import Identityd, NormalizeIntensityd, ScaleIntensityd

    if normalize == "nonzero":
        return NormalizeIntensityd(keys, nonzero=True, channel_wise=True)
    if normalize == "all":
        return NormalizeIntensityd(keys, channel_wise=True)
    if normalize == "minmax":
        return ScaleIntensityd(keys)
    if normalize == "none":
        return Identityd(keys)
    raise ValueError(f"--normalize={normalize!r} is not supported: use {', '.join(NORMALIZE_MODES)}.")


def normalize_volume(image: Any, normalize: str = "nonzero") -> Any:
    """Intensity-normalise a channel-first image (see :func:`normalization_transform` for the modes)."""
    return normalization_transform("image", normalize)({"image": image})["image"]


def check_output_path(path: str | os.PathLike, what: str) -> str:
    """Check, before any work, that a file can be written at ``path``; nothing is left behind.

    The folders that do not exist yet are created when the file is written (atomically, see
    :func:`~monai_efficientq.checkpoint.atomic_write`), so a run that fails leaves none behind.

    Args:
        path: the file to be written.
        what: how the user named it (e.g. ``"--output"``), for the message.

    Returns:
        the path as a string.

    Raises:
        ValueError: ``path`` is a folder, an existing file that is not writable, or lies under a file or a folder
            that is not writable.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a folder: give a file path in it, e.g. {os.path.join(path, 'model.pt')!r}.")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ValueError(f"{what} {path!r} exists and is not writable: choose another path or change its permissions.")
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ValueError(f"{what} {path!r} cannot be created: {ancestor!r} is a file, not a folder.")
    if not os.access(ancestor, os.W_OK | os.X_OK) or not _can_create_file_in(ancestor):
        raise ValueError(f"{what} {path!r} cannot be created: the folder {ancestor!r} is not writable.")
    return path


def _can_create_file_in(folder: str) -> bool:
    """Whether a file can really be created in ``folder`` (``os.access`` says yes to root on read-only mounts and
    on pseudo file systems such as /proc): a probe file is created and removed at once."""
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(prefix=".efficientq-probe-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.remove(probe)
    return True


def load_datalist(
    datalist_file: str, section: str, base_dir: str | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    """The items of one section of a MONAI datalist JSON, with absolute paths (MONAI's ``load_decathlon_datalist``;
    a section holding one item as a dict, such as ``"calibration": {"image": ..., "label": ...}``, reads as a
    one-item list).

    Args:
        datalist_file: the datalist.
        section: the key to read (e.g. ``"evaluation"``, ``"calibration"``).
        base_dir: relative paths are relative to this (default: the datalist's folder).
        limit: keep only the first ``limit`` items (``None``: all).
    """
    from monai.data import load_decathlon_datalist

    if not os.path.isfile(datalist_file):
        raise FileNotFoundError(f"datalist not found: {datalist_file}")
    with open(datalist_file, encoding="utf-8") as f:
        sections = json.load(f)
    if section not in sections:
        raise KeyError(f"{datalist_file} has no section {section!r} (sections: {list(sections)}).")
    if limit is not None and int(limit) < 1:
        raise ValueError(f"limit={limit!r}: give a positive number of items (or None for all).")
    base = base_dir if base_dir is not None else os.path.dirname(os.path.abspath(datalist_file))
    if isinstance(sections[section], dict):  # one item
        item = sections[section]
        return [{k: os.path.join(base, v) if k in ("image", "label") and isinstance(v, str) else v for k, v in item.items()}]
    items = load_decathlon_datalist(datalist_file, True, section, base)
    return items[: int(limit)] if limit is not None else items
