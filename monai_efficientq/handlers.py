"""Ignite/MONAI handler that quantizes an engine's network with EfficientQ: :class:`EfficientQHandler`.

A thin adapter over :func:`~monai_efficientq.network.quantize_network`; ignite is imported lazily, as in
MONAI's own handlers, so the core stays usable without it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.utils import IgniteInfo, min_version, optional_import
from torch import nn

from .checkpoint import save_dequantized, save_quantized
from .config import PRESETS, EfficientQConfig
from .network import quantize_
from .report import QuantizationReport

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["EfficientQHandler", "resolve_config", "install_quantized"]

_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(EfficientQConfig))


def resolve_config(config: EfficientQConfig | Mapping | None = None, **overrides: Any) -> EfficientQConfig:
    """An :class:`EfficientQConfig` from a base config (or dict of fields) and field overrides.

    Changing ``preset`` re-derives the preset-controlled fields that were not overridden explicitly and
    still hold the old preset's value.

    Raises:
        ValueError: an unknown field (the message lists the valid ones) or an invalid value.
    """
    if isinstance(config, Mapping):
        overrides = {**dict(config), **overrides}
        config = None
    unknown = sorted(k for k in overrides if k not in _CONFIG_FIELDS)
    if unknown:
        raise ValueError(
            f"unknown EfficientQ config field(s) {unknown}; valid fields are: {', '.join(_CONFIG_FIELDS)}."
        )
    if config is None:
        return EfficientQConfig(**overrides)
    if not isinstance(config, EfficientQConfig):
        raise TypeError(
            f"config must be an EfficientQConfig, a dict of its fields or None, got {type(config).__name__}."
        )
    if not overrides:
        return config
    values = config.to_dict()
    new_preset = overrides.get("preset", config.preset)
    if new_preset != config.preset and config.preset in PRESETS:
        for key, old in PRESETS[config.preset].items():
            if key not in overrides and values.get(key) == old:
                values[key] = None  # let the new preset fill it
    values.update(overrides)
    return EfficientQConfig(**values)


def _is_dict_transform(fn: Any) -> bool:
    from monai.transforms import Compose, MapTransform

    if isinstance(fn, MapTransform):
        return True
    return isinstance(fn, Compose) and any(isinstance(t, MapTransform) for t in fn.transforms)


def _unwrap(net: nn.Module) -> nn.Module:
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while isinstance(net, wrappers):
        net = net.module
    return net


def _module_device(net: nn.Module) -> torch.device | None:
    for t in list(net.parameters()) + list(net.buffers()):
        return t.device
    return None


def _check_writable(path: str | os.PathLike, what: str) -> str:
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{what}={path!r} is a directory; give a file path.")
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{what}: cannot create the folder {folder!r} ({err}).") from err
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: the folder {folder!r} is not writable.")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ValueError(f"{what}: {path!r} exists and is not writable.")
    return path


def _spatial_dims(net: nn.Module) -> int:
    """Spatial dimensions of the network's first convolution (0 without one)."""
    first = next((m for m in net.modules() if isinstance(getattr(m, "kernel_size", None), tuple)), None)
    return len(first.kernel_size) if first is not None else 0


def _check_spatial(net: nn.Module, image: Any, label: Any, attention: Any) -> None:
    nd = _spatial_dims(net)
    if not nd:
        return
    for name, value in (("label", label), ("attention map", attention)):
        if value is not None and tuple(value.shape[-nd:]) != tuple(image.shape[-nd:]):
            raise ValueError(
                f"the calibration {name} has shape {tuple(value.shape)}, the image {tuple(image.shape)}: their "
                f"spatial shapes must match (crop them together with a dictionary transform as preprocess, e.g. "
                f"CalibrationCropd(keys=['image', 'label'], ...))."
            )


def _batch(net: nn.Module, parts: list[tuple[Any, Any, Any]]) -> tuple[Any, Any, Any]:
    """One calibration batch from several ``(image, label, attention)`` items (each a volume or a batch)."""
    if len(parts) == 1:
        return parts[0]
    nd = _spatial_dims(net)
    shapes = {tuple(p[0].shape[-nd:]) for p in parts} if nd else set()
    if len(shapes) > 1:
        raise ValueError(
            f"the {len(parts)} calibration volumes have different spatial shapes {sorted(shapes)}: crop them to one "
            f"size (e.g. preprocess with CalibrationCropd and a fixed roi_size) to calibrate on them together."
        )

    def batched(value: Any) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(value) if isinstance(value, np.ndarray) else value)
        t = t.as_tensor() if hasattr(t, "as_tensor") else t
        return t if t.dim() == nd + 2 else t.unsqueeze(0)

    columns = list(zip(*parts))
    return tuple(
        None if any(v is None for v in values) else torch.cat([batched(v).float() for v in values])
        for values in columns
    )


class EfficientQHandler:
    """EfficientQHandler acts as an Ignite handler that quantizes the engine's network post-training with
    EfficientQ (:func:`~monai_efficientq.network.quantize_network`) when an event fires, once.

    The network (``engine.network``, or ``network``) is changed IN PLACE: its layers are replaced by the
    quantized ones, so every other handler, inferer or metric holding the same module object sees the
    quantized network. Folded BatchNorms become ``nn.Identity``. The report is kept on ``self.report`` and
    ``engine.state.efficientq_report``; the packed checkpoint, the report (JSON and Markdown) and a dequantized
    float state dict are written when their paths are given (atomically).

    Attach it to an evaluator to quantize at ``STARTED`` (then the evaluation measures the quantized network),
    or to a trainer to quantize the trained network at ``COMPLETED``.

    Note:
        In an evaluator's ``val_handlers`` list it must come AFTER ``CheckpointLoader``: handlers on
        ``STARTED`` fire in attach (list) order, and the float weights must be loaded before quantizing.
        A ``CheckpointLoader`` found on ``STARTED`` after this handler raises an error when the event fires.

    Usage example (bundle config)::

        "val_handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$@ckpt_dir + '/model.pt'",
             "load_dict": {"model": "@network"}},
            {"_target_": "monai_efficientq.handlers.EfficientQHandler", "calib_data": "@calib_dataset",
             "weight_bits": 2, "act_bits": 2, "save_path": "$@bundle_root + '/models/model_w2a2.pt'",
             "report_path": "$@bundle_root + '/eval/efficientq_report.json'"},
            {"_target_": "StatsHandler", "iteration_log": false}
        ]

    Args:
        calib_data: the calibration data: a tensor/MetaTensor/ndarray (channel-first ``(C, *S)`` or a batch),
            a dict item, a dataset (its first ``calib_volumes`` items are used) or a DataLoader / iterable (its
            first ``calib_volumes`` batches). From a
            dict the fields named by ``image_key``, ``label_key`` and ``attention_key`` are taken; from a
            list/tuple item its first element (a dict, or the image). It is read when the event fires.
        config: the quantization settings (default ``EfficientQConfig()``), or a dict of its fields.
        image_key: key of the image in dict items.
        label_key: key of the calibration label in dict items, passed as ``label`` (used with
            ``attention="label"``).
        attention_key: key of a precomputed attention map (e.g. from
            :class:`~monai_efficientq.transforms.AttentionMapd`), passed as ``attention_map``.
        event: ``"auto"`` (``COMPLETED`` on a trainer, i.e. an engine with an ``optimizer`` or a MONAI
            ``Trainer``; ``STARTED`` otherwise), an ignite ``Events`` member or its name (e.g. ``"STARTED"``).
        save_path: where to save the packed checkpoint (:func:`~monai_efficientq.checkpoint.save_quantized`).
        report_path: where to write the report as JSON; the Markdown goes next to it with the ``.md`` suffix.
        dequantized_path: where to save a dequantized float state dict that the original network loads.
        preprocess: a callable applied to the calibration item before quantizing, e.g. a MONAI transform. A
            ``MapTransform`` (or a ``Compose`` containing one) gets the whole dict item (so image, label and
            attention map stay aligned, e.g. :class:`~monai_efficientq.transforms.CalibrationCropd`); any other
            callable gets the image only.
        device: where to solve (default: ``config.device``, else ``engine.state.device``, else the network's
            device). The quantized network is moved back to the network's device.
        network: the network to quantize (default ``engine.network``).
        calib_volumes: how many items of a dataset (batches of a DataLoader) to calibrate on together; each is
            preprocessed, they must then share one spatial shape, and each volume gets its own attention map.
        config_kwargs: fields of :class:`~monai_efficientq.config.EfficientQConfig` overriding ``config``
            (e.g. ``weight_bits=2, act_bits=2``), so bundle configs can write them directly.

    Raises:
        ValueError: an unknown config field (the message lists the valid ones), an invalid value (e.g.
            ``weight_bits=9``), an unknown event, or an output path that cannot be written.
    """

    def __init__(
        self,
        calib_data: Any,
        config: EfficientQConfig | Mapping | None = None,
        image_key: str = "image",
        label_key: str | None = None,
        attention_key: str | None = None,
        event: Any = "auto",
        save_path: str | os.PathLike | None = None,
        report_path: str | os.PathLike | None = None,
        dequantized_path: str | os.PathLike | None = None,
        preprocess: Callable | None = None,
        device: str | torch.device | None = None,
        network: nn.Module | None = None,
        calib_volumes: int = 1,
        **config_kwargs: Any,
    ) -> None:
        if calib_data is None:
            raise ValueError("calib_data is required: a tensor, a dict item, a dataset or a DataLoader.")
        if isinstance(calib_data, (str, bytes, os.PathLike)):
            raise TypeError(
                "calib_data must be data (a tensor, a dict item, a dataset or a DataLoader), not a path: load it "
                "first, e.g. with a monai.data.Dataset and LoadImaged."
            )
        if preprocess is not None and not callable(preprocess):
            raise TypeError(f"preprocess must be callable, got {type(preprocess).__name__}.")
        self.config = resolve_config(config, **config_kwargs)
        self.calib_data = calib_data
        self.image_key = image_key
        self.label_key = label_key
        self.attention_key = attention_key
        self.event = event
        self.save_path = save_path
        self.report_path = report_path
        self.dequantized_path = dequantized_path
        if report_path is not None and os.fspath(report_path).lower().endswith(".md"):
            raise ValueError(
                f"report_path={os.fspath(report_path)!r}: give the .json path; the .md is written next to it."
            )
        if isinstance(calib_volumes, bool) or not isinstance(calib_volumes, int) or calib_volumes < 1:
            raise ValueError(f"calib_volumes={calib_volumes!r} must be a positive integer (e.g. 2).")
        self.calib_volumes = calib_volumes
        self.preprocess = preprocess
        self.device = device
        self.network = network
        self.report: QuantizationReport | None = None
        self.quantized = False
        self.logger = logging.getLogger("monai_efficientq")

    # -- ignite interface -------------------------------------------------------------------------------------

    def attach(self, engine: Engine) -> None:
        """
        Args:
            engine: Ignite Engine, it can be a trainer, validator or evaluator.
        """
        self.logger = engine.logger
        for what in ("save_path", "report_path", "dequantized_path"):
            if getattr(self, what) is not None:
                _check_writable(getattr(self, what), what)
        engine.add_event_handler(self._resolve_event(engine), self)

    def __call__(self, engine: Engine) -> None:
        """
        Args:
            engine: Ignite Engine, it can be a trainer, validator or evaluator.
        """
        if self.quantized:
            return
        self._check_handler_order(engine)
        # MONAI workflows attach their handlers before they set `engine.network`: look it up now
        net = self.network if self.network is not None else getattr(engine, "network", None)
        if not isinstance(net, nn.Module):
            raise ValueError(
                f"{type(engine).__name__} has no `network` module: pass network=... to EfficientQHandler or set "
                f"engine.network."
            )
        net = _unwrap(net)
        net_device = _module_device(net) or torch.device("cpu")
        cfg = self.config
        solve_device = self.device or cfg.device or getattr(getattr(engine, "state", None), "device", None)
        if solve_device is not None and str(solve_device) != str(cfg.device):
            cfg = dataclasses.replace(cfg, device=str(torch.device(solve_device)))
        parts = self._calibration_items()
        for part in parts:
            _check_spatial(net, *part)
        image, label, attention = _batch(net, parts)
        self.logger.info(
            "EfficientQ: quantizing %s (W%s A%s, %s) on a calibration volume of shape %s",
            type(net).__name__, cfg.weight_bits, cfg.act_bits if cfg.act_bits is not None else "-", cfg.method,
            tuple(image.shape),
        )
        float_net = copy.deepcopy(net) if self.dequantized_path is not None else None  # the keys to export to
        report = quantize_(net, image, config=cfg, label=label, attention_map=attention, logger=self.logger)
        net.to(net_device)
        if self.save_path is not None:
            save_quantized(net, self.save_path, report)
            self.logger.info("EfficientQ: packed checkpoint saved to %s", os.fspath(self.save_path))
        if self.dequantized_path is not None:
            save_dequantized(net, float_net, self.dequantized_path)
            self.logger.info("EfficientQ: dequantized float state dict saved to %s", os.fspath(self.dequantized_path))
        if self.report_path is not None:
            report.to_json(self.report_path)
            report.to_markdown(os.path.splitext(os.fspath(self.report_path))[0] + ".md")
            self.logger.info("EfficientQ: report written to %s", os.fspath(self.report_path))
        self.report = report
        self.quantized = True
        engine.state.efficientq_report = report

    # -- helpers -----------------------------------------------------------------------------------------------

    def _resolve_event(self, engine: Engine) -> Any:
        event = self.event
        if isinstance(event, str):
            if event.lower() == "auto":
                return Events.COMPLETED if self._is_trainer(engine) else Events.STARTED
            try:
                return Events[event.upper()]
            except KeyError:
                valid = ", ".join(e.name for e in Events)
                raise ValueError(f"event={event!r} is not an ignite event: use 'auto' or one of {valid}.") from None
        return event

    @staticmethod
    def _is_trainer(engine: Engine) -> bool:
        trainer_cls, has_trainer = optional_import("monai.engines", name="Trainer")
        return getattr(engine, "optimizer", None) is not None or (has_trainer and isinstance(engine, trainer_cls))

    def _check_handler_order(self, engine: Engine) -> None:
        from monai.handlers import CheckpointLoader

        handlers = [h for h, _, _ in getattr(engine, "_event_handlers", {}).get(Events.STARTED, [])]
        if self not in handlers:
            return
        later = handlers[handlers.index(self) + 1 :]
        if any(isinstance(h, CheckpointLoader) for h in later):
            raise RuntimeError(
                "EfficientQHandler is attached before a CheckpointLoader on STARTED: it would quantize the "
                "network before its float weights are loaded, and the loader would then overwrite the quantized "
                "weights. List EfficientQHandler AFTER CheckpointLoader in the handlers."
            )

    def _items(self) -> list[Any]:
        """The first ``calib_volumes`` calibration items (of a DataLoader: batches)."""
        data = self.calib_data
        if isinstance(data, (torch.Tensor, np.ndarray, Mapping)):
            return [data]
        if hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(
            data, torch.utils.data.DataLoader
        ):
            if len(data) == 0:
                raise ValueError("calib_data is empty: give at least one calibration item.")
            if isinstance(data, (list, tuple)) and not isinstance(data[0], (Mapping, torch.Tensor, np.ndarray)):
                raise TypeError(
                    f"calib_data is a {type(data).__name__} of {type(data[0]).__name__}: give tensors or dicts."
                )
            return [data[i] for i in range(min(self.calib_volumes, len(data)))]
        if not hasattr(data, "__iter__"):
            raise TypeError(
                f"calib_data of type {type(data).__name__} is not supported: give a tensor/ndarray, a dict item, a "
                f"dataset or a DataLoader."
            )
        items: list[Any] = []
        for batch in data:
            items.append(batch)
            if len(items) >= self.calib_volumes:
                break
        if not items:
            raise ValueError("calib_data is empty: give at least one calibration item.")
        return items[: self.calib_volumes]

    def _calibration_items(self) -> list[tuple[Any, Any, Any]]:
        """``(image, label, attention map)`` of each calibration item, preprocessed."""
        return [self._one_item(item) for item in self._items()]

    def _one_item(self, item: Any) -> tuple[Any, Any, Any]:
        while isinstance(item, (list, tuple)):  # e.g. a list of crops from RandCropByPosNegLabeld, (image, label)
            if not item:
                raise ValueError("the first calibration item is an empty list.")
            item = item[0]
        dict_pre = self.preprocess is not None and _is_dict_transform(self.preprocess)
        if isinstance(item, Mapping):
            if dict_pre:
                item = self.preprocess(item)
                if isinstance(item, (list, tuple)):
                    item = item[0]
            image = self._field(item, self.image_key, "image_key")
            label = self._field(item, self.label_key, "label_key") if self.label_key is not None else None
            attention = None
            if self.attention_key is not None:
                attention = self._field(item, self.attention_key, "attention_key")
        else:
            if self.label_key is not None or self.attention_key is not None or dict_pre:
                raise ValueError(
                    "label_key, attention_key and a dictionary preprocess need dict calibration items, but calib_data "
                    f"gives a {type(item).__name__}."
                )
            image, label, attention = item, None, None
        if self.preprocess is not None and not dict_pre:
            image = self.preprocess(image)
        return image, label, attention

    @staticmethod
    def _field(item: Mapping, key: str, what: str) -> Any:
        if key not in item:
            raise KeyError(f"{what}={key!r} is not in the calibration item (keys: {list(item)}).")
        return item[key]
