"""Quantize a MONAI bundle in the Model-Zoo layout into a new, shareable quantized bundle.

:func:`quantize_bundle` reads a bundle folder as the MONAI Model Zoo lays it out (configs ``train``, ``evaluate``
and ``inference`` in JSON or YAML, ``configs/metadata.json``, ``models/model.pt``, ``LICENSE``), calibrates on one
volume passed through the bundle's own preprocessing, runs the bundle's own evaluation (its
``validate#evaluator``: inferer, post-processing, metrics) on the float network and again on the same network
quantized in place by :func:`~monai_efficientq.network.quantize_`, and writes a new bundle folder:

- ``models/model_quantized.pt``: the packed checkpoint with its report. The float ``model.pt`` is not copied;
  nothing in the new bundle needs it.
- ``configs/inference`` and ``configs/evaluate`` (same names and formats as the originals): every
  ``CheckpointLoader`` of ``model.pt`` replaced by :class:`~monai_efficientq.handlers.QuantizedCheckpointLoader`
  of the packed checkpoint, and an ``export`` run id in ``inference`` that writes TorchScript. ``configs/train``
  is copied unchanged when ``evaluate`` layers on it (as in the zoo), with ``logging.conf``, the other files of
  ``configs/`` that these configs name (e.g. ``datalist.json``) and ``scripts/``.
- ``configs/metadata.json``: the next version with a changelog entry, ``required_packages_version`` naming
  monai-efficientq, ``eval_metrics`` of the quantized network and a ``quantization`` section (settings,
  calibration, sizes, Dice of the float and the quantized network).
- ``docs/README.md`` (the results, the commands, then the original README), ``docs/quantization_report.json``
  and ``.md``, the other files of ``docs/`` and the ``LICENSE``.

The folder is built next to ``out_dir`` and renamed into place at the end: a run that fails leaves nothing.

The same through MONAI's bundle runner, with the config this package ships (:data:`QUANTIZE_BUNDLE_CONFIG`; print
its path with ``python -c "import monai_efficientq.zoo as z; print(z.QUANTIZE_BUNDLE_CONFIG)"``)::

    python -m monai.bundle run --config_file /path/to/quantize_bundle.json \\
        --bundle_dir spleen_ct_segmentation --out_dir spleen_ct_segmentation_w2a2 --weight_bits 2 --act_bits 2
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .config import EfficientQConfig
from .io import check_image_values, load_float_weights

__all__ = [
    "QUANTIZE_BUNDLE_CONFIG",
    "QUANTIZED_CHECKPOINT",
    "BundleLayout",
    "QuantizedBundle",
    "MissingPackagesError",
    "quantize_bundle",
    "check_bundle_packages",
    "quantized_config",
    "downsampling_factor",
]

logger = logging.getLogger("monai_efficientq")

#: The ``python -m monai.bundle run`` config of :func:`quantize_bundle` shipped with the package.
QUANTIZE_BUNDLE_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "quantize_bundle.json")
#: File name of the packed checkpoint in the quantized bundle's ``models/``.
QUANTIZED_CHECKPOINT = "model_quantized.pt"
FLOAT_CHECKPOINT = "model.pt"
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
#: The calibration crop taken by default is the bundle's sliding-window size, at most this many voxels a side.
MAX_DEFAULT_ROI = 128
FALLBACK_DIVISIBLE_BY = 16

# ids of the Model-Zoo configs
EVALUATOR_ID = "validate#evaluator"
EVAL_DATA_ID = "validate#dataset#data"
EVAL_PREPROCESSING_ID = "validate#preprocessing"
INFERENCE_PREPROCESSING_ID = "preprocessing"
INFERER_IDS = ("validate#inferer", "inferer")
POSTPROCESSING_IDS = ("validate#postprocessing", "postprocessing")
NETWORK_DEF_ID = "network_def"
PER_CLASS_DICE = "efficientq_dice_per_class"

LOADER_TARGET = "monai_efficientq.handlers.QuantizedCheckpointLoader"
_FLOAT_NAME = re.compile(r"(?<![\w.-])model\.pt\b")
_PACKAGE_CONFIG_ORDER = ("train", "evaluate")


class MissingPackagesError(ImportError):
    """Packages a bundle's metadata lists that are not installed."""


# -- the input bundle ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BundleLayout:
    """The files of a bundle folder in the Model-Zoo layout.

    Attributes:
        root: the bundle folder (absolute).
        metadata: ``configs/metadata.json``.
        checkpoint: the float checkpoint ``models/model.pt``.
        configs: ``{"train" | "evaluate" | "inference": path}`` of the configs found (``.json``, ``.yaml`` or
            ``.yml``).
    """

    root: str
    metadata: str
    checkpoint: str
    configs: dict[str, str]

    @classmethod
    def find(cls, bundle_dir: str | os.PathLike) -> BundleLayout:
        """The layout of ``bundle_dir``.

        Raises:
            FileNotFoundError: no such folder, or no ``configs/metadata.json``, ``models/model.pt`` or inference
                or evaluate config in it.
            ValueError: a config given in two formats (e.g. ``inference.json`` and ``inference.yaml``).
        """
        if bundle_dir is None:
            raise ValueError("no bundle folder given: pass the bundle folder (--bundle_dir with python -m monai.bundle run).")
        root = os.path.abspath(os.fspath(bundle_dir))
        if not os.path.isdir(root):
            raise FileNotFoundError(f"bundle folder not found: {root}")
        metadata = os.path.join(root, "configs", "metadata.json")
        checkpoint = os.path.join(root, "models", FLOAT_CHECKPOINT)
        for what, path in (("metadata", metadata), ("float checkpoint", checkpoint)):
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"bundle {what} not found: {path} (a Model-Zoo bundle has configs/metadata.json and "
                    f"models/model.pt; download the weights first, e.g. python -m monai.bundle download)."
                )
        configs = {name: path for name in ("train", "evaluate", "inference") if (path := _config_file(root, name))}
        if "inference" not in configs and "evaluate" not in configs:
            raise FileNotFoundError(
                f"{root}/configs has no inference or evaluate config (.json, .yaml or .yml): is it a bundle folder?"
            )
        return cls(root, metadata, checkpoint, configs)

    @property
    def evaluation_files(self) -> list[str]:
        """The configs that define ``validate#...``, merged in the zoo's order (``evaluate`` layers on ``train``)."""
        return [self.configs[name] for name in _PACKAGE_CONFIG_ORDER if name in self.configs]

    def read_metadata(self) -> dict[str, Any]:
        with open(self.metadata, encoding="utf-8") as f:
            return json.load(f)


def _config_file(root: str, name: str) -> str | None:
    found = [p for s in CONFIG_SUFFIXES if os.path.isfile(p := os.path.join(root, "configs", name + s))]
    if len(found) > 1:
        raise ValueError(f"the bundle has {len(found)} '{name}' configs ({', '.join(found)}): keep one of them.")
    return found[0] if found else None


def check_bundle_packages(metadata: Mapping[str, Any]) -> None:
    """Check that the packages a bundle's metadata lists (``required_packages_version`` and its older name
    ``optional_packages_version``) are installed.

    Raises:
        MissingPackagesError: one line naming every missing package and the ``pip install`` that adds them.
    """
    listed: dict[str, Any] = {}
    for key in ("optional_packages_version", "required_packages_version"):
        listed.update(metadata.get(key) or {})
    missing = []
    for name in listed:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        raise MissingPackagesError(
            f"the bundle's metadata lists packages that are not installed: {', '.join(missing)}; install them "
            f"with `pip install {' '.join(missing)}` (or skip this check with --check_packages False)."
        )


def _check_out_dir(out_dir: str | os.PathLike, bundle_root: str) -> str:
    """``out_dir`` as an absolute path, checked: new (or an empty folder), outside the input bundle, creatable."""
    if out_dir is None:
        raise ValueError("no output folder given: pass the new bundle's folder (--out_dir with python -m monai.bundle run).")
    target = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise ValueError(f"the output folder {target} already exists: choose a new folder or remove it first.")
    if os.path.commonpath([target, bundle_root]) in (target, bundle_root):
        raise ValueError(f"the output folder {target} overlaps the input bundle {bundle_root}: choose a folder beside it.")
    parent = os.path.dirname(target)
    ancestor = parent
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"the output folder {target} cannot be created: {ancestor} is not a writable folder.")
    return target


# -- reading the bundle's configs ------------------------------------------------------------------------------


def _innermost(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _parser(files: Sequence[str], layout: BundleLayout, values: Mapping[str, Any]) -> Any:
    """A ``ConfigParser`` of ``files`` (merged in order) with the metadata and ``values`` set."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(list(files))
    parser.read_meta(layout.metadata)
    for config_id, value in values.items():
        parser[config_id] = value
    return parser


def _has_id(parser: Any, config_id: str) -> bool:
    try:
        parser[config_id]
    except (KeyError, IndexError, ValueError, TypeError):
        return False
    return True


def _raw(parser: Any, config_id: str) -> Any:
    """The raw config at ``config_id``, following ``@id`` and ``%id`` references."""
    value = parser[config_id]
    seen = {config_id}
    while isinstance(value, str) and value[:1] in ("@", "%") and value[1:] not in seen and _has_id(parser, value[1:]):
        seen.add(value[1:])
        value = parser[value[1:]]
    return value


def _parsed(parser: Any, config_id: str, what: str) -> Any:
    try:
        return parser.get_parsed_content(config_id)
    except Exception as err:
        cause = _innermost(err)
        raise ValueError(f"cannot build the bundle's {what} ({config_id}): {type(cause).__name__}: {cause}") from err


def _target_name(item: Any) -> str:
    target = item.get("_target_", "") if isinstance(item, Mapping) else ""
    return target.rsplit(".", 1)[-1] if isinstance(target, str) else ""


def _walk(config: Any) -> Iterator[Any]:
    yield config
    children = config.values() if isinstance(config, Mapping) else config if isinstance(config, list) else ()
    for child in children:
        yield from _walk(child)


def _prediction_kind(parsers: Sequence[Any]) -> str | None:
    """``"sigmoid"`` or ``"softmax"`` from the first ``Activations(d)`` of the bundle's post-processing."""
    for parser in parsers:
        for config_id in POSTPROCESSING_IDS:
            if not _has_id(parser, config_id):
                continue
            for item in _walk(_raw(parser, config_id)):
                if _target_name(item) in ("Activationsd", "Activations"):
                    for kind in ("sigmoid", "softmax"):
                        if item.get(kind) is True:
                            return kind
    return None


def _inferer_roi(parsers: Sequence[Any]) -> list[int] | None:
    """The ``roi_size`` of the bundle's ``SlidingWindowInferer`` (evaluation first, then inference), if any."""
    for parser in parsers:
        for config_id in INFERER_IDS:
            if _has_id(parser, config_id) and _target_name(_raw(parser, config_id)).startswith("SlidingWindowInferer"):
                roi = parser.get_parsed_content(f"{config_id}#roi_size")
                return [int(r) for r in (roi if isinstance(roi, Sequence) else [roi])]
    return None


def downsampling_factor(net: nn.Module) -> int | list[int] | None:
    """The factor every input size must be a multiple of for the MONAI networks whose structure says it (UNet,
    AttentionUnet, DynUNet: the product of the strides; SegResNet: ``2^(levels-1)``; BasicUNet: 16; SwinUNETR: 32);
    ``None`` for other networks."""
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


# -- the quantized bundle's configs ----------------------------------------------------------------------------


def _packed_name(value: Any) -> Any:
    """``value`` with every file name ``model.pt`` in its strings renamed to the packed checkpoint's (except in a
    ``CheckpointSaver``: it would overwrite the packed checkpoint with a state dict)."""
    if isinstance(value, str):
        return _FLOAT_NAME.sub(QUANTIZED_CHECKPOINT, value)
    if isinstance(value, Mapping) and _target_name(value) == "CheckpointSaver":
        return value
    if isinstance(value, Mapping):
        return {k: _packed_name(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_packed_name(v) for v in value]
    return value


def _is_checkpoint_loader(item: Any) -> bool:
    if _target_name(item) != "CheckpointLoader":
        return False
    module = item["_target_"].rpartition(".")[0]
    return module == "" or module.startswith("monai.handlers")


def _quantized_loader(loader: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`~monai_efficientq.handlers.QuantizedCheckpointLoader` entry replacing a ``CheckpointLoader``
    entry: same path (``model.pt`` renamed), the network of its ``load_dict`` (``model``, else the only one), and
    its ``_disabled_``/``_requires_``/``_desc_`` keys."""
    load_dict = loader.get("load_dict")
    network = None
    if isinstance(load_dict, Mapping) and load_dict:
        network = load_dict.get("model", next(iter(load_dict.values())) if len(load_dict) == 1 else None)
    new: dict[str, Any] = {"_target_": LOADER_TARGET, "load_path": loader.get("load_path")}
    if network is not None:
        new["network"] = network
    if loader.get("name") is not None:
        new["name"] = loader["name"]
    new.update({k: v for k, v in loader.items() if k.startswith("_") and k != "_target_"})
    return new


def quantized_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    """A bundle config that loads the packed checkpoint instead of the float one.

    Every string naming the file ``model.pt`` names ``model_quantized.pt`` instead (the checkpoint paths, and what
    refers to them, e.g. a ``_disabled_`` test of the file), and every MONAI ``CheckpointLoader`` entry becomes a
    :class:`~monai_efficientq.handlers.QuantizedCheckpointLoader` entry of the same path and network.

    Args:
        config: the raw config (as read from its JSON or YAML file).

    Returns:
        ``(new config, number of loaders replaced)``.
    """
    count = 0

    def rewrite(value: Any) -> Any:
        nonlocal count
        if _is_checkpoint_loader(value):
            count += 1
            return _quantized_loader(value)
        if isinstance(value, Mapping):
            return {k: rewrite(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rewrite(v) for v in value]
        return value

    new = rewrite(_packed_name(copy.deepcopy(dict(config))))
    return new, count


def _with_export(config: dict[str, Any], input_shape: Sequence[int]) -> dict[str, Any]:
    """``config`` with an ``export`` run id: the packed checkpoint loaded into a fresh ``network_def`` (the zoo's
    ``initialize`` may already have loaded it into ``network``) and saved as TorchScript
    (``models/model_quantized.ts``) with the bundle metadata, checked on an input of ``input_shape``."""
    if "export" in config or NETWORK_DEF_ID not in config:
        logger.warning("EfficientQ: the inference config has an 'export' id or no '%s'; no TorchScript export added.",
                       NETWORK_DEF_ID)
        return config
    imports = list(config.get("imports") or [])
    imports += [
        "$from monai_efficientq.handlers import load_network",
        "$from monai_efficientq.bundle import export_torchscript",
    ]
    stem = os.path.splitext(QUANTIZED_CHECKPOINT)[0]
    return {
        **config,
        "imports": imports,
        "efficientq_checkpoint": f"$@bundle_root + '/models/{QUANTIZED_CHECKPOINT}'",
        "efficientq_ts_path": f"$@bundle_root + '/models/{stem}.ts'",
        "efficientq_export_input_shape": [int(s) for s in input_shape],
        "efficientq_export_network": f"%{NETWORK_DEF_ID}",
        "export": [
            "$load_network(@efficientq_export_network, @efficientq_checkpoint)",
            "$export_torchscript(@efficientq_export_network, @efficientq_ts_path, @efficientq_export_input_shape, "
            "meta_file=@bundle_root + '/configs/metadata.json')",
        ],
    }


def _read_config(path: str) -> dict[str, Any]:
    from monai.bundle import ConfigParser

    return dict(ConfigParser.load_config_file(path))


def _config_text(config: Mapping[str, Any], path: str) -> str:
    if path.endswith(".json"):
        return json.dumps(config, indent=4) + "\n"
    import yaml

    return yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False, allow_unicode=True, width=120)


def _rewritten_configs(layout: BundleLayout) -> dict[str, dict[str, Any]]:
    """``{name: config}`` of the quantized bundle's inference and evaluate configs, checked before any work."""
    rewritten = {}
    for name in ("inference", "evaluate"):
        if name not in layout.configs:
            continue
        new, loaders = quantized_config(_read_config(layout.configs[name]))
        if name == "inference" and loaders == 0:
            raise ValueError(
                f"{layout.configs[name]} loads its weights without a MONAI CheckpointLoader: the quantized bundle "
                f"needs one to replace (by monai_efficientq.handlers.QuantizedCheckpointLoader)."
            )
        rewritten[name] = new
    return rewritten


# -- calibration -----------------------------------------------------------------------------------------------


def _calibration_item(calib: Any, calib_label: str | None, eval_items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The calibration data item: ``calib`` (a path, a list of paths for a multi-file image, or a dict item),
    with ``calib_label``; else the first item of the evaluation dataset."""
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
        raise ValueError(f"--calib={calib!r}: give an image path, a list of paths (one per channel file) or a dict item.")
    if calib_label is not None:
        item["label"] = os.fspath(calib_label)
    return item


def _missing_files(items: Sequence[Mapping[str, Any]]) -> list[str]:
    paths = []
    for item in items:
        for key in ("image", "label"):
            value = item.get(key)
            paths += [value] if isinstance(value, str) else [v for v in value or [] if isinstance(v, str)]
    return [p for p in paths if not os.path.isfile(p)]


@dataclasses.dataclass
class _Calibration:
    image: torch.Tensor
    label: torch.Tensor | None
    source: dict[str, Any]
    preprocessing: str
    roi_size: list[int]
    divisible_by: int | list[int]


def _preprocess(item: Mapping[str, Any], transform: Any, what: str) -> dict[str, Any]:
    try:
        out = transform(dict(item))
    except Exception as err:
        cause = _innermost(err)
        raise ValueError(
            f"cannot preprocess the calibration item {dict(item)} with the bundle's {what}: "
            f"{type(cause).__name__}: {cause}"
        ) from err
    out = out[0] if isinstance(out, (list, tuple)) else out
    check_image_values(out["image"])
    return out


def _calibration(
    item: Mapping[str, Any],
    evaluation: Any,
    inference: Any,
    net: nn.Module,
    roi_size: Any,
    divisible_by: Any,
    inferer_roi: list[int] | None,
) -> _Calibration:
    """The calibration volume through the bundle's own preprocessing (the evaluation's ``validate#preprocessing``
    for an item with a label, else the inference ``preprocessing``), cropped by
    :class:`~monai_efficientq.transforms.CalibrationCropd`."""
    from .transforms import CalibrationCropd

    use_inference = "label" not in item and inference is not None and _has_id(inference, INFERENCE_PREPROCESSING_ID)
    parser, config_id = (inference, INFERENCE_PREPROCESSING_ID) if use_inference else (evaluation, EVAL_PREPROCESSING_ID)
    if parser is None or not _has_id(parser, config_id):
        raise ValueError("the bundle has no preprocessing (validate#preprocessing or inference preprocessing) to calibrate with.")
    data = _preprocess(item, _parsed(parser, config_id, "preprocessing"), config_id)
    spatial = [int(s) for s in data["image"].shape[1:]]
    if divisible_by is None:
        divisible_by = downsampling_factor(net)
        if divisible_by is None:
            divisible_by = FALLBACK_DIVISIBLE_BY
            logger.info("EfficientQ: %s's down-sampling factor is unknown; the calibration crop is padded to a "
                        "multiple of %d (set --divisible_by).", type(net).__name__, divisible_by)
    if roi_size is None:  # the network's inference window, at most MAX_DEFAULT_ROI a side, no larger than the image
        window = inferer_roi or spatial
        roi = [min(int(w), MAX_DEFAULT_ROI, s) for w, s in zip(window, spatial)]
    else:
        roi = [int(roi_size)] * len(spatial) if isinstance(roi_size, (int, float)) else [int(r) for r in roi_size]
    keys = ["image", "label"] if "label" in data else ["image"]
    data = CalibrationCropd(keys, roi, divisible_by=divisible_by, source_key="image")(data)
    label = torch.as_tensor(data["label"]) if "label" in data else None
    image = torch.as_tensor(data["image"]).float()
    image = image.as_tensor() if hasattr(image, "as_tensor") else image
    logger.info("EfficientQ: calibration volume %s through the bundle's %s, cropped to %s", item.get("image"),
                config_id, tuple(image.shape))
    return _Calibration(image, label, dict(item), config_id, roi, divisible_by)


# -- evaluation ------------------------------------------------------------------------------------------------


def _without_checkpoint_handlers(parser: Any) -> None:
    """Drop the ``CheckpointLoader``/``CheckpointSaver`` entries of the evaluator's handler list: the float weights
    are loaded once by :func:`quantize_bundle`, a second load would undo the quantization and a saver would
    write into the input bundle."""
    handlers = parser[f"{EVALUATOR_ID}#val_handlers"] if _has_id(parser, f"{EVALUATOR_ID}#val_handlers") else None
    list_id = f"{EVALUATOR_ID}#val_handlers"
    if isinstance(handlers, str) and handlers[:1] in ("@", "%") and _has_id(parser, handlers[1:]):
        list_id, handlers = handlers[1:], parser[handlers[1:]]
    if isinstance(handlers, list):
        kept = [h for h in handlers if not (_is_checkpoint_loader(h) or _target_name(h) == "CheckpointSaver")]
        parser[list_id] = kept


def _per_class_dice_config(parser: Any) -> dict[str, Any] | None:
    """The bundle's key ``MeanDice`` metric with ``reduction="mean_batch"`` (its own output transform and
    ``include_background``), or ``None`` when its key metric is not a ``MeanDice``."""
    config_id = f"{EVALUATOR_ID}#key_val_metric"
    if not _has_id(parser, config_id):
        return None
    metrics = _raw(parser, config_id)
    if not isinstance(metrics, Mapping):
        return None
    for metric in metrics.values():
        metric = _raw_value(parser, metric)
        if _target_name(metric) == "MeanDice":
            return {**copy.deepcopy(dict(metric)), "reduction": "mean_batch"}
    return None


def _raw_value(parser: Any, value: Any) -> Any:
    if isinstance(value, str) and value[:1] in ("@", "%") and _has_id(parser, value[1:]):
        return _raw(parser, value[1:])
    return value


def _class_names(metadata: Mapping[str, Any], count: int, include_background: bool) -> list[str]:
    """Names of the ``count`` Dice values from the metadata's ``pred`` output channels (channel 0 skipped when the
    metric leaves the background out)."""
    outputs = metadata.get("network_data_format", {}).get("outputs", {})
    output = outputs.get("pred") or next(iter(outputs.values()), {})
    channels = output.get("channel_def") or {}
    names = [str(channels[k]) for k in sorted(channels, key=lambda k: int(k))] if channels else []
    if not include_background and len(names) == count + 1:
        names = names[1:]
    if len(names) != count or len(set(names)) != count or "mean" in names:
        names = [f"class{i}" for i in range(count)]
    return names


class _Evaluation:
    """The bundle's ``validate#evaluator`` on the (limited) evaluation dataset, run once per network state."""

    def __init__(self, parser: Any, items: list[dict[str, Any]], metadata: Mapping[str, Any]) -> None:
        parser[EVAL_DATA_ID] = items
        _without_checkpoint_handlers(parser)
        dice = _per_class_dice_config(parser)
        if dice is not None:
            parser[PER_CLASS_DICE] = dice
        self.evaluator = _parsed(parser, EVALUATOR_ID, "evaluator")
        self.per_class = None
        if dice is not None:
            _parsed(parser, PER_CLASS_DICE, "per-class Dice metric").attach(self.evaluator, PER_CLASS_DICE)
            self.per_class = dice.get("include_background", True)
        self.metadata = metadata
        self.volumes = len(items)

    @property
    def network(self) -> nn.Module:
        net = self.evaluator.network
        while isinstance(net, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            net = net.module
        return net

    def run(self, what: str) -> tuple[dict[str, float], dict[str, float]]:
        """Run the evaluation; ``(the bundle's scalar metrics, Dice per class and mean)``."""
        from .bundle import dice_by_class

        logger.info("EfficientQ: evaluating the %s network on %d volume(s)", what, self.volumes)
        self.evaluator.run()
        scalars = {}
        for name, value in self.evaluator.state.metrics.items():
            if name != PER_CLASS_DICE and torch.as_tensor(value).numel() == 1:
                scalars[name] = float(torch.as_tensor(value).item())
        dice = {}
        if self.per_class is not None:
            count = torch.as_tensor(self.evaluator.state.metrics[PER_CLASS_DICE]).numel()
            dice = dice_by_class(self.evaluator, PER_CLASS_DICE, _class_names(self.metadata, count, self.per_class))
        logger.info("EfficientQ: %s metrics %s", what, ", ".join(f"{k} {v:.4f}" for k, v in {**scalars, **dice}.items()))
        return scalars, dice


# -- writing the quantized bundle ------------------------------------------------------------------------------


@dataclasses.dataclass
class _Outcome:
    """What the run produced, for the writer."""

    network: nn.Module
    report: Any
    dice: dict[str, dict[str, float]]
    metrics: dict[str, dict[str, float]]
    calibration: dict[str, Any]
    evaluation_volumes: int
    calibration_image: torch.Tensor
    command: str


def _file_names(paths: Any) -> list[str]:
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths or [])
    return [os.path.basename(os.fspath(p)) for p in paths]


def _command_line(
    bundle_root: str, target: str, cfg: EfficientQConfig, calib: Mapping[str, Any] | None, dataset_dir: str | None,
    roi_size: Any, max_eval_volumes: int | None,
) -> str:
    """The ``monai-efficientq quantize-bundle`` command of the run (settings that differ from the defaults)."""
    defaults = EfficientQConfig(weight_bits=cfg.weight_bits, preset=cfg.preset)
    parts = ["monai-efficientq quantize-bundle", os.path.basename(bundle_root), os.path.basename(target)]
    parts += [f"--weight_bits {cfg.weight_bits}", f"--act_bits {cfg.act_bits if cfg.act_bits is not None else 'none'}"]
    for name in ("first_last_bits", "method", "preset", "iterations", "patience", "attention", "prediction",
                 "calib_augment", "holdout"):
        value = getattr(cfg, name)
        if name == "preset" or value != getattr(defaults, name):
            parts.append(f"--{name} {'none' if value is None else value}")
    if calib is not None:
        names = _file_names(calib.get("image"))
        parts.append(f"--calib {names[0] if len(names) == 1 else json.dumps(names).replace(' ', '')}")
    if dataset_dir is not None:
        parts.append(f"--dataset_dir {os.path.basename(os.path.normpath(os.fspath(dataset_dir)))}")
    if roi_size is not None:
        parts.append(f"--roi_size {json.dumps(roi_size).replace(' ', '')}")
    if max_eval_volumes is not None:
        parts.append(f"--max_eval_volumes {max_eval_volumes}")
    return " ".join(parts)


def _versions() -> dict[str, str]:
    import monai
    import numpy

    from . import __version__

    return {"monai": monai.__version__, "torch": torch.__version__.split("+")[0], "numpy": numpy.__version__,
            "monai-efficientq": __version__}


def _write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _write_configs(layout: BundleLayout, staging: str, rewritten: Mapping[str, dict], export_shape: Sequence[int]) -> dict[str, str]:
    """Write the quantized bundle's configs; ``{name: file name}`` of the bundle configs written."""
    folder = os.path.join(staging, "configs")
    names: dict[str, str] = {}
    texts = []
    for name, config in rewritten.items():
        if name == "inference":
            config = _with_export(config, export_shape)
        file_name = os.path.basename(layout.configs[name])
        text = _config_text(config, file_name)
        _write_text(os.path.join(folder, file_name), text)
        names[name] = file_name
        texts.append(text)
    if "evaluate" in rewritten and "train" in layout.configs:  # the zoo's evaluate layers on train
        names["train"] = os.path.basename(layout.configs["train"])
        shutil.copy2(layout.configs["train"], os.path.join(folder, names["train"]))
        with open(layout.configs["train"], encoding="utf-8") as f:
            texts.append(f.read())
    source = os.path.join(layout.root, "configs")
    for entry in sorted(os.listdir(source)):
        path = os.path.join(source, entry)
        if entry in names.values() or entry == "metadata.json" or not os.path.isfile(path):
            continue
        if entry == "logging.conf" or any(entry in text for text in texts):  # the files the configs name
            shutil.copy2(path, os.path.join(folder, entry))
    return names


def _copy_support_files(layout: BundleLayout, staging: str) -> str | None:
    """Copy ``LICENSE``, ``scripts/`` and ``docs/`` (but its README); the source README text, if any."""
    license_file = os.path.join(layout.root, "LICENSE")
    if os.path.isfile(license_file):
        shutil.copy2(license_file, os.path.join(staging, "LICENSE"))
    else:
        logger.warning("EfficientQ: the bundle has no LICENSE file; the quantized bundle has none either.")
    scripts = os.path.join(layout.root, "scripts")
    if os.path.isdir(scripts):
        shutil.copytree(scripts, os.path.join(staging, "scripts"), ignore=shutil.ignore_patterns("__pycache__"))
    docs = os.path.join(layout.root, "docs")
    readme = None
    if os.path.isdir(docs):
        shutil.copytree(docs, os.path.join(staging, "docs"), ignore=shutil.ignore_patterns("README.md"), dirs_exist_ok=True)
        if os.path.isfile(os.path.join(docs, "README.md")):
            with open(os.path.join(docs, "README.md"), encoding="utf-8") as f:
                readme = f.read()
    return readme


def _first_tensor(out: Any) -> torch.Tensor:
    while isinstance(out, (list, tuple)):
        out = out[0]
    return out


def _check_loads_back(staging: str, names: Mapping[str, str], outcome: _Outcome) -> None:
    """The written configs' ``network_def`` with the written packed checkpoint gives the quantized network's output
    on the calibration volume (a wrong rewrite or checkpoint is caught before the bundle is published)."""
    from monai.bundle import ConfigParser

    from .handlers import load_network

    order = ["inference"] if "inference" in names else [n for n in ("train", "evaluate") if n in names]
    parser = ConfigParser()
    parser.read_config([os.path.join(staging, "configs", names[n]) for n in order])
    parser["bundle_root"] = staging
    if not _has_id(parser, NETWORK_DEF_ID):
        logger.info("EfficientQ: the written configs have no %s; the load-back check is skipped.", NETWORK_DEF_ID)
        return
    device = next(outcome.network.parameters()).device
    fresh = load_network(_parsed(parser, NETWORK_DEF_ID, "network").to(device),
                         os.path.join(staging, "models", QUANTIZED_CHECKPOINT))
    x = outcome.calibration_image[None].to(device)
    with torch.no_grad():
        expected, got = _first_tensor(outcome.network.eval()(x)), _first_tensor(fresh(x))
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()) + 1e-6):
        raise RuntimeError(
            "the written bundle does not load back to the quantized network (its configs' network_def with "
            f"models/{QUANTIZED_CHECKPOINT} gives other outputs): please report this with the bundle's configs."
        )


def _write_bundle(
    layout: BundleLayout, target: str, metadata: Mapping[str, Any], rewritten: Mapping[str, dict], outcome: _Outcome
) -> dict[str, Any]:
    """Build the quantized bundle in a folder next to ``target`` and rename it into place; the new metadata."""
    from .bundle import save_with_dice
    from .checkpoint import save_quantized
    from .report import atomic_write_text
    from .zoo_metadata import QuantizationSummary, quantized_metadata, quantized_readme

    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp creates 0700
        packed = os.path.join(staging, "models", QUANTIZED_CHECKPOINT)
        report_json = os.path.join(staging, "docs", "quantization_report.json")
        report = outcome.report
        if outcome.dice:
            save_with_dice(outcome.network, report, outcome.dice, packed, report_json)
        else:
            save_quantized(outcome.network, packed, report)
            report.to_json(report_json)
            report.to_markdown(os.path.splitext(report_json)[0] + ".md")
        source_readme = _copy_support_files(layout, staging)
        names = _write_configs(layout, staging, rewritten, list(outcome.calibration_image[None].shape))
        summary = QuantizationSummary(
            report, outcome.calibration, outcome.metrics, outcome.evaluation_volumes,
            os.path.getsize(layout.checkpoint), os.path.getsize(packed), outcome.command, names,
        )
        new_metadata = quantized_metadata(metadata, summary, _versions())
        atomic_write_text(os.path.join(staging, "configs", "metadata.json"), json.dumps(new_metadata, indent=4) + "\n")
        atomic_write_text(os.path.join(staging, "docs", "README.md"), quantized_readme(new_metadata, summary, source_readme))
        _check_loads_back(staging, names, outcome)
        if os.path.isdir(target):
            os.rmdir(target)  # an empty folder (checked before the work started)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return new_metadata


# -- the API ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class QuantizedBundle:
    """What :func:`quantize_bundle` wrote.

    Attributes:
        path: the new bundle folder.
        files: its files, relative to ``path``, sorted.
        report: the quantization report (with ``dice`` when measured).
        metrics: ``{metric: {"float": value, "quantized": value}}`` of the bundle's own evaluation metrics.
        metadata: the new ``configs/metadata.json``.
    """

    path: str
    files: list[str]
    report: Any
    metrics: dict[str, dict[str, float]]
    metadata: dict[str, Any]


def _efficientq_config(config: EfficientQConfig | Mapping[str, Any] | None, kind: str | None) -> EfficientQConfig:
    """The run's settings; with a dict, an unset ``prediction`` follows the bundle's post-processing (``kind``)."""
    from .handlers import resolve_config

    if isinstance(config, EfficientQConfig):
        if kind is not None and config.prediction != kind:
            logger.warning("EfficientQ: prediction=%r, but the bundle's post-processing applies a %s.",
                           config.prediction, kind)
    else:
        fields = dict(config or {})
        if fields.get("prediction") is None:
            fields.pop("prediction", None)
            if kind is not None:
                fields["prediction"] = kind
        try:
            config = resolve_config(None, **fields)
        except TypeError as err:
            raise ValueError(f"invalid EfficientQ setting: {err}") from err
    if config.holdout and config.calib_augment < 1:  # one calibration volume: nothing left to hold out
        raise ValueError("holdout needs a second calibration volume: set calib_augment >= 1, or holdout False.")
    return config


def _evaluation_values(layout: BundleLayout, dataset_dir: str | None, device: str | None, workdir: str) -> dict:
    values: dict[str, Any] = {"bundle_root": layout.root, "output_dir": workdir}
    if dataset_dir is not None:
        values["dataset_dir"] = os.path.abspath(os.fspath(dataset_dir))
    if device is not None:
        values["device"] = f"$torch.device({str(torch.device(device))!r})"
    return values


def _apply_overrides(parsers: Sequence[Any], overrides: Mapping[str, Any] | None) -> None:
    for config_id, value in (overrides or {}).items():
        top = str(config_id).split("#", 1)[0]
        targets = [p for p in parsers if p is not None and top in p.config]
        if not targets:
            raise KeyError(f"override {config_id!r}: no config of the bundle has the id {top!r}.")
        for parser in targets:
            parser[config_id] = value


def _evaluation_items(parser: Any, max_eval_volumes: int | None) -> list[dict[str, Any]]:
    if not _has_id(parser, EVAL_DATA_ID):
        return []
    try:
        items = list(parser.get_parsed_content(EVAL_DATA_ID))
    except Exception as err:
        cause = _innermost(err)
        raise ValueError(
            f"cannot read the bundle's evaluation data ({EVAL_DATA_ID}): {type(cause).__name__}: {cause}; pass "
            f"--dataset_dir where the data are, or --evaluate False with --calib IMAGE."
        ) from err
    if max_eval_volumes is not None:
        if isinstance(max_eval_volumes, bool) or not isinstance(max_eval_volumes, int) or max_eval_volumes < 1:
            raise ValueError(f"--max_eval_volumes={max_eval_volumes!r}: give a positive number (or omit it for all).")
        items = items[:max_eval_volumes]
    return [dict(item) for item in items]


def quantize_bundle(
    bundle_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: EfficientQConfig | Mapping[str, Any] | None = None,
    calib: Any = None,
    calib_label: str | None = None,
    dataset_dir: str | None = None,
    roi_size: Any = None,
    divisible_by: int | Sequence[int] | None = None,
    max_eval_volumes: int | None = None,
    evaluate: bool = True,
    overrides: Mapping[str, Any] | None = None,
    check_packages: bool = True,
) -> QuantizedBundle:
    """Quantize the network of a Model-Zoo bundle and write a new, self-contained quantized bundle.

    Everything is checked before the work starts (the folders, the bundle's packages, its configs, the evaluation
    and calibration files, the settings). Then the float weights ``models/model.pt`` are loaded into the bundle's
    network; the bundle's evaluation runs on it; the network is quantized in place on the calibration volume; the
    evaluation runs again; and the new bundle is written (see the module docstring for its content).

    Args:
        bundle_dir: the bundle folder (Model-Zoo layout).
        out_dir: the new bundle folder; it must not exist (or be empty).
        config: the EfficientQ settings: an :class:`~monai_efficientq.config.EfficientQConfig` or a dict of its
            fields (``"none"`` for ``None``); with a dict, an unset ``prediction`` follows the bundle's
            post-processing (``sigmoid`` or ``softmax``).
        calib: the calibration image: a path, a list of paths (an image stored one file per channel, as BraTS) or
            a dict data item; default: the first item of the bundle's evaluation dataset.
        calib_label: the label of ``calib`` (for ``attention="label"``; the item then takes the evaluation's
            preprocessing).
        dataset_dir: the bundle's ``dataset_dir`` (where its data are), for the evaluation and its first item.
        roi_size: the calibration crop (an int or one per dimension); default the bundle's sliding-window
            ``roi_size``, at most :data:`MAX_DEFAULT_ROI` a side and no larger than the image.
        divisible_by: pad the crop to a multiple of this; default the network's down-sampling factor
            (:func:`downsampling_factor`), else 16.
        max_eval_volumes: evaluate on the first this many volumes of the evaluation dataset (default all).
        evaluate: run the bundle's evaluation (float and quantized); needs an evaluate config.
        overrides: ``{config id: value}`` set in the bundle's configs for this run only, as
            ``python -m monai.bundle run --id value`` does (e.g. ``{"validate#dataloader#num_workers": 0}``).
        check_packages: check that the packages listed in the bundle's metadata are installed.

    Returns:
        what was written (:class:`QuantizedBundle`).

    Raises:
        FileNotFoundError: the bundle, one of its required files, or a calibration/evaluation file is missing.
        MissingPackagesError: a package the bundle lists is not installed.
        ValueError: an invalid setting, an output folder that exists, configs that cannot be read or rewritten.
    """
    from .network import quantize_

    layout = BundleLayout.find(bundle_dir)
    target = _check_out_dir(out_dir, layout.root)
    metadata = layout.read_metadata()
    if check_packages:
        check_bundle_packages(metadata)
    rewritten = _rewritten_configs(layout)
    device = config.device if isinstance(config, EfficientQConfig) else (config or {}).get("device")
    with tempfile.TemporaryDirectory(prefix="efficientq-eval-") as workdir:
        values = _evaluation_values(layout, dataset_dir, device, workdir)
        evaluation_parser = _parser(layout.evaluation_files, layout, values) if layout.evaluation_files else None
        inference_parser = (
            _parser([layout.configs["inference"]], layout, values) if "inference" in layout.configs else None
        )
        parsers = [p for p in (evaluation_parser, inference_parser) if p is not None]
        _apply_overrides(parsers, overrides)
        cfg = _efficientq_config(config, _prediction_kind(parsers))
        evaluate = bool(evaluate) and "evaluate" in layout.configs
        items = _evaluation_items(evaluation_parser, max_eval_volumes) if evaluation_parser is not None else []
        if evaluate and not items:
            raise ValueError(
                "the bundle's evaluation dataset is empty: pass --dataset_dir where its data are, or --evaluate False."
            )
        calib_item = _calibration_item(calib, calib_label, items)
        missing = _missing_files([calib_item, *(items if evaluate else [])])
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise FileNotFoundError(f"data file not found: {missing[0]}{more}; pass --dataset_dir where the data are.")

        evaluation = _Evaluation(evaluation_parser, items, metadata) if evaluate else None
        net = evaluation.network if evaluation is not None else _parsed(inference_parser, "network", "network")
        load_float_weights(net, layout.checkpoint)
        calibration = _calibration(
            calib_item, evaluation_parser, inference_parser, net, roi_size, divisible_by, _inferer_roi(parsers)
        )
        float_scalars, float_dice = evaluation.run("float") if evaluation is not None else ({}, {})
        net_device = next(net.parameters()).device
        if cfg.device is None:
            cfg = dataclasses.replace(cfg, device=str(net_device))
        label = calibration.label if cfg.attention == "label" else None
        report = quantize_(net, calibration.image, cfg, label=label)
        net.to(net_device)
        quant_scalars, quant_dice = evaluation.run("quantized") if evaluation is not None else ({}, {})

    metrics = {name: {"float": v, "quantized": quant_scalars[name]} for name, v in float_scalars.items()
               if name in quant_scalars}
    calibration_record = {
        "image": _file_names(calib_item.get("image")),
        "preprocessing": calibration.preprocessing,
        "roi_size": calibration.roi_size,
        "divisible_by": calibration.divisible_by,
        "in_evaluation": calib is None and evaluation is not None,
    }
    outcome = _Outcome(
        net, report, {"float": float_dice, "quantized": quant_dice} if float_dice else {}, metrics, calibration_record,
        evaluation.volumes if evaluation is not None else 0, calibration.image,
        _command_line(layout.root, target, cfg, calib_item if calib is not None else None, dataset_dir, roi_size,
                      max_eval_volumes),
    )
    new_metadata = _write_bundle(layout, target, metadata, rewritten, outcome)
    files = sorted(
        os.path.relpath(os.path.join(folder, name), target) for folder, _, names in os.walk(target) for name in names
    )
    logger.info("EfficientQ: wrote the quantized bundle %s (%d files)", target, len(files))
    return QuantizedBundle(target, files, report, metrics, new_metadata)
