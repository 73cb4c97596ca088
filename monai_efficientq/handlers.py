"""Ignite handlers: :class:`EfficientQHandler` quantizes an engine's network with EfficientQ, and
:class:`QuantizedCheckpointLoader` loads a packed quantized checkpoint into it.

Both are thin adapters in the manner of MONAI's ``TrtHandler`` and ``CheckpointLoader``: the work is done by
:func:`~monai_efficientq.network.quantize_` and :func:`~monai_efficientq.checkpoint.load_quantized_`, and ignite
is imported lazily (``monai.utils.optional_import``), so the core stays usable without it.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.utils import IgniteInfo, min_version, optional_import
from torch import nn

from .checkpoint import FORMAT, load_quantized_, read_packed, save_dequantized, save_quantized
from .config import EfficientQConfig
from .distributed import is_distributed, is_other_rank
from .io import check_output_path, load_float_weights
from .modules import quantization_info
from .network import quantize_
from .report import QuantizationReport

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = [
    "EfficientQHandler",
    "QuantizedCheckpointLoader",
    "load_network",
    "is_packed_checkpoint",
    "resolve_config",
    "none_from_text",
]

_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(EfficientQConfig))
# the fields that accept None (e.g. act_bits, patience); in the others "none" may be a value (attention="none")
_NULLABLE_FIELDS = frozenset(f.name for f in dataclasses.fields(EfficientQConfig) if "None" in str(f.type))
NONE_WORDS = ("none", "null")


# -- settings --------------------------------------------------------------------------------------------------


def none_from_text(value: Any) -> Any:
    """``None`` for the strings ``"none"`` and ``"null"`` (any case), ``value`` otherwise.

    MONAI's ``python -m monai.bundle run`` drops every command-line override whose value is ``None`` (``fire``
    reads ``--act_bits None`` as Python ``None``, then ``update_kwargs(ignore_none=True)`` removes it), so the
    config's default would silently stay. ``--act_bits none`` (or ``null``) reaches the config as a string, and
    :func:`resolve_config` turns it into ``None`` with this function. MONAI's expression syntax,
    ``--act_bits '$None'``, works as well.
    """
    if isinstance(value, str) and value.strip().lower() in NONE_WORDS:
        return None
    return value


def resolve_config(config: EfficientQConfig | Mapping | None = None, **overrides: Any) -> EfficientQConfig:
    """An :class:`EfficientQConfig` from a base config (or dict of fields) and field overrides.

    In the fields that accept ``None`` (``act_bits``, ``first_last_bits``, ``patience``, the preset-controlled
    ones, ...), the strings ``"none"``/``"null"`` mean ``None`` (:func:`none_from_text`); ``attention="none"``
    stays the string. Changing ``preset`` re-derives the preset-controlled fields the caller did not set
    (:meth:`EfficientQConfig.replace`).

    Raises:
        ValueError: an unknown field (the message lists the valid ones) or an invalid value.
    """
    if isinstance(config, Mapping):
        overrides = {**dict(config), **overrides}
        config = None
    overrides = {k: none_from_text(v) if k in _NULLABLE_FIELDS else v for k, v in overrides.items()}
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
    return config.replace(**overrides) if overrides else config


# -- networks and paths ----------------------------------------------------------------------------------------


def _unwrap(net: nn.Module) -> nn.Module:
    while isinstance(net, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        net = net.module
    return net


def _engine_network(engine: Engine, network: nn.Module | None, owner: str) -> nn.Module:
    """``network``, else ``engine.network`` (MONAI workflows set it after attaching their handlers), unwrapped."""
    net = network if network is not None else getattr(engine, "network", None)
    if not isinstance(net, nn.Module):
        raise ValueError(
            f"{type(engine).__name__} has no `network` module: pass network=... to {owner} or set engine.network."
        )
    return _unwrap(net)


def _module_device(net: nn.Module) -> torch.device:
    first = next(itertools.chain(net.parameters(), net.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def is_packed_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a packed checkpoint written by :func:`~monai_efficientq.checkpoint.save_quantized`."""
    state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    return isinstance(state, dict) and state.get("format") == FORMAT


def load_network(net: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load ``path`` into ``net`` IN PLACE and return it in eval mode: a packed checkpoint makes it the quantized
    network (:func:`~monai_efficientq.checkpoint.load_quantized_`, on the network's device); a float state dict
    (or ``{"model": state_dict}``) is loaded as usual (:func:`~monai_efficientq.io.load_float_weights`).

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if is_packed_checkpoint(path):
        load_quantized_(net, path, map_location=_module_device(net))
    else:
        load_float_weights(net, path)
    return net.eval()


# -- calibration data ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _CalibrationKeys:
    image: str
    label: str | None
    attention: str | None


def _first_items(data: Any, count: int) -> list[Any]:
    """The first ``count`` items of the calibration data (of a DataLoader or iterable: batches)."""
    if isinstance(data, (torch.Tensor, np.ndarray, Mapping)):
        return [data]
    indexable = hasattr(data, "__getitem__") and hasattr(data, "__len__")
    if indexable and not isinstance(data, torch.utils.data.DataLoader):
        items = [data[i] for i in range(min(count, len(data)))]
    elif hasattr(data, "__iter__"):
        items = list(itertools.islice(iter(data), count))
    else:
        raise TypeError(
            f"calib_data of type {type(data).__name__} is not supported: give a tensor/ndarray, a dict item, a "
            f"dataset or a DataLoader."
        )
    if not items:
        raise ValueError("calib_data is empty: give at least one calibration item.")
    return items


def _is_dict_transform(fn: Callable | None) -> bool:
    from monai.transforms import Compose, MapTransform

    if isinstance(fn, MapTransform):
        return True
    return isinstance(fn, Compose) and any(isinstance(t, MapTransform) for t in fn.transforms)


def _field(item: Mapping, key: str | None, what: str) -> Any:
    if key is None:
        return None
    if key not in item:
        raise KeyError(f"{what}={key!r} is not in the calibration item (keys: {list(item)}).")
    return item[key]


def _item_fields(item: Any, keys: _CalibrationKeys, preprocess: Callable | None) -> tuple[Any, Any, Any]:
    """``(image, label, attention map)`` of one calibration item, preprocessed.

    A list/tuple item (e.g. the crops of ``RandCropByPosNegLabeld``) gives its first element. A dictionary
    ``preprocess`` gets the whole dict item, so image, label and attention map stay aligned; any other
    callable gets the image only.
    """
    while isinstance(item, (list, tuple)):
        if not item:
            raise ValueError("a calibration item is an empty list.")
        item = item[0]
    dict_preprocess = _is_dict_transform(preprocess)
    if not isinstance(item, Mapping):
        if isinstance(item, (str, bytes)):
            raise TypeError(f"a calibration item is the string {item!r}: give tensors or dicts, not paths.")
        if keys.label is not None or keys.attention is not None or dict_preprocess:
            raise ValueError(
                "label_key, attention_key and a dictionary preprocess need dict calibration items, but calib_data "
                f"gives a {type(item).__name__}."
            )
        return (preprocess(item) if preprocess is not None else item), None, None
    if dict_preprocess:
        item = preprocess(item)
        item = item[0] if isinstance(item, (list, tuple)) else item
    image = _field(item, keys.image, "image_key")
    if preprocess is not None and not dict_preprocess:
        image = preprocess(image)
    return image, _field(item, keys.label, "label_key"), _field(item, keys.attention, "attention_key")


def _spatial_dims(net: nn.Module) -> int:
    """Spatial dimensions of the network's first convolution (0 without one)."""
    first = next((m for m in net.modules() if isinstance(getattr(m, "kernel_size", None), tuple)), None)
    return len(first.kernel_size) if first is not None else 0


def _check_aligned(image: Any, label: Any, attention: Any, spatial_dims: int) -> None:
    for name, value in (("label", label), ("attention map", attention)):
        if value is not None and tuple(value.shape[-spatial_dims:]) != tuple(image.shape[-spatial_dims:]):
            raise ValueError(
                f"the calibration {name} has shape {tuple(value.shape)}, the image {tuple(image.shape)}: their "
                f"spatial shapes must match (crop them together with a dictionary transform as preprocess, e.g. "
                f"CalibrationCropd(keys=['image', 'label'], ...))."
            )


def _as_batch(value: Any, spatial_dims: int) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    tensor = tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor  # MetaTensor -> plain tensor
    return (tensor if tensor.dim() == spatial_dims + 2 else tensor.unsqueeze(0)).float()


def _calibration_batch(parts: list[tuple[Any, Any, Any]], spatial_dims: int) -> tuple[Any, Any, Any]:
    """One calibration batch from several ``(image, label, attention)`` items (each a volume or a batch)."""
    if len(parts) == 1:
        return parts[0]
    shapes = sorted({tuple(image.shape[-spatial_dims:]) for image, _, _ in parts}) if spatial_dims else []
    if len(shapes) > 1:
        raise ValueError(
            f"the {len(parts)} calibration volumes have different spatial shapes {shapes}: crop them to one "
            f"size (e.g. preprocess with CalibrationCropd and a fixed roi_size) to calibrate on them together."
        )
    return tuple(
        None if any(v is None for v in column) else torch.cat([_as_batch(v, spatial_dims) for v in column])
        for column in zip(*parts)
    )


# -- handlers --------------------------------------------------------------------------------------------------


class EfficientQHandler:
    """EfficientQHandler acts as an Ignite handler that quantizes the engine's network post-training with
    EfficientQ (:func:`~monai_efficientq.network.quantize_`), once.

    The network (``engine.network``, or ``network``) is quantized IN PLACE, so every other handler, inferer or
    metric holding it sees the quantized network. The report is kept on ``self.report`` and
    ``engine.state.efficientq_report``; the packed checkpoint, the report (JSON and Markdown) and a dequantized
    float state dict are written when their paths are given.

    On an evaluator it quantizes at ``EPOCH_STARTED``: after every ``STARTED`` handler, so a
    ``CheckpointLoader`` has loaded the float weights whatever the order of the handler list, and before the
    first iteration, so the evaluation measures the quantized network. On a trainer it quantizes the trained
    network at ``COMPLETED``.

    In a distributed run (``torchrun``, ``torch.distributed`` initialised) only rank 0 quantizes; it writes
    ``save_path`` (then required) and the other ranks wait for it and load the packed checkpoint in place.

    Usage example (bundle config)::

        "val_handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$@ckpt_dir + '/model.pt'",
             "load_dict": {"model": "@network"}},
            {"_target_": "monai_efficientq.handlers.EfficientQHandler", "calib_data": "@calib_dataset",
             "weight_bits": 2, "act_bits": 2, "save_path": "$@bundle_root + '/models/model_w2a2.pt'"},
            {"_target_": "StatsHandler", "iteration_log": false}
        ]

    Args:
        calib_data: a tensor/MetaTensor/ndarray (channel-first ``(C, *S)`` or a batch), a dict item, a dataset
            (its first ``calib_volumes`` items) or a DataLoader / iterable (its first ``calib_volumes`` batches).
            It is read when the handler fires.
        config: the quantization settings (default ``EfficientQConfig()``), or a dict of its fields.
        image_key: key of the image in dict items.
        label_key: key of the calibration label in dict items (used with ``attention="label"``).
        attention_key: key of a precomputed attention map (e.g. from
            :class:`~monai_efficientq.transforms.AttentionMapd`).
        event: ``"auto"`` (``COMPLETED`` on a trainer, i.e. an engine with an ``optimizer`` or a MONAI
            ``Trainer``; ``EPOCH_STARTED`` otherwise), an ignite ``Events`` member or its name.
        save_path: where to save the packed checkpoint (:func:`~monai_efficientq.checkpoint.save_quantized`).
        report_path: where to write the report as JSON; the Markdown goes next to it with the ``.md`` suffix.
        dequantized_path: where to save a dequantized float state dict that the original network loads.
        preprocess: a callable applied to each calibration item. A ``MapTransform`` (or a ``Compose`` holding
            one) gets the whole dict item (e.g. :class:`~monai_efficientq.transforms.CalibrationCropd`), any
            other callable the image only.
        device: where to solve (default: ``config.device``, else ``engine.state.device``, else the network's
            device). The network is moved back to its own device afterwards.
        network: the network to quantize (default ``engine.network``).
        calib_volumes: how many items (or batches) to calibrate on together; after ``preprocess`` they must
            share one spatial shape.
        config_kwargs: fields of :class:`~monai_efficientq.config.EfficientQConfig` overriding ``config``
            (e.g. ``weight_bits=2, act_bits=2``); ``"none"``/``"null"`` mean ``None`` (:func:`none_from_text`).

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
        _check_arguments(calib_data, preprocess, report_path, calib_volumes)
        self.config = resolve_config(config, **config_kwargs)
        self.calib_data = calib_data
        self.keys = _CalibrationKeys(image_key, label_key, attention_key)
        self.event = event
        self.outputs = {"save_path": save_path, "report_path": report_path, "dequantized_path": dequantized_path}
        self.preprocess = preprocess
        self.device = device
        self.network = network
        self.calib_volumes = calib_volumes
        self.report: QuantizationReport | None = None
        self.logger = logging.getLogger("monai_efficientq")

    def attach(self, engine: Engine) -> None:
        """
        Args:
            engine: Ignite Engine, it can be a trainer, validator or evaluator.
        """
        self.logger = engine.logger
        if is_distributed() and self.outputs["save_path"] is None:
            raise ValueError(
                "in a distributed run only rank 0 quantizes and the other ranks load its packed checkpoint: give "
                "save_path."
            )
        for what, path in self.outputs.items():
            if path is not None and not is_other_rank():
                check_output_path(path, what)
        engine.add_event_handler(self._event_for(engine), self)

    def __call__(self, engine: Engine) -> None:
        """
        Args:
            engine: Ignite Engine, it can be a trainer, validator or evaluator.
        """
        if self.report is not None:
            return
        net = _engine_network(engine, self.network, type(self).__name__)
        if is_other_rank():
            self._load_from_rank_zero(net, engine)
            return
        config = self._solve_config(engine)
        image, label, attention = self.calibration_batch(net)
        self.logger.info(
            "EfficientQ: quantizing %s (W%s A%s, %s) on a calibration batch of shape %s", type(net).__name__,
            config.weight_bits, config.act_bits if config.act_bits is not None else "-", config.method,
            tuple(image.shape),
        )
        float_net = copy.deepcopy(net) if self.outputs["dequantized_path"] is not None else None
        device = _module_device(net)
        report = quantize_(net, image, config=config, label=label, attention_map=attention, logger=self.logger)
        net.to(device)
        self._save(net, float_net, report)
        self.report = report
        engine.state.efficientq_report = report
        if is_distributed():
            torch.distributed.barrier()  # the packed checkpoint is written: the other ranks may load it

    def _load_from_rank_zero(self, net: nn.Module, engine: Engine) -> None:
        """In a distributed run (``torchrun``) only rank 0 quantizes; the others wait for its packed checkpoint
        and load it into their network in place."""
        save_path = self.outputs["save_path"]
        torch.distributed.barrier()
        self.logger.info("EfficientQ: rank %d loads the network quantized by rank 0 from %s",
                         torch.distributed.get_rank(), os.fspath(save_path))
        load_quantized_(net, save_path, map_location=_module_device(net))
        self.report = QuantizationReport.from_dict(read_packed(save_path)["report"])
        engine.state.efficientq_report = self.report

    def calibration_batch(self, net: nn.Module) -> tuple[Any, Any, Any]:
        """``(image, label, attention map)`` to calibrate ``net`` on: the first ``calib_volumes`` items of
        ``calib_data``, preprocessed, checked and stacked into one batch (label and map ``None`` if not used)."""
        spatial_dims = _spatial_dims(net)
        items = _first_items(self.calib_data, self.calib_volumes)
        parts = [_item_fields(item, self.keys, self.preprocess) for item in items]
        if spatial_dims:
            for part in parts:
                _check_aligned(*part, spatial_dims)
        return _calibration_batch(parts, spatial_dims)

    def _event_for(self, engine: Engine) -> Any:
        if not isinstance(self.event, str):
            return self.event
        if self.event.lower() == "auto":
            trainer_cls, has_trainer = optional_import("monai.engines", name="Trainer")
            is_trainer = getattr(engine, "optimizer", None) is not None or (
                has_trainer and isinstance(engine, trainer_cls)
            )
            return Events.COMPLETED if is_trainer else Events.EPOCH_STARTED
        try:
            return Events[self.event.upper()]
        except KeyError:
            valid = ", ".join(e.name for e in Events)
            raise ValueError(f"event={self.event!r} is not an ignite event: use 'auto' or one of {valid}.") from None

    def _solve_config(self, engine: Engine) -> EfficientQConfig:
        config = self.config
        device = self.device or config.device or getattr(getattr(engine, "state", None), "device", None)
        if device is not None and str(device) != str(config.device):
            config = dataclasses.replace(config, device=str(torch.device(device)))
        return config

    def _save(self, net: nn.Module, float_net: nn.Module | None, report: QuantizationReport) -> None:
        save_path, report_path, dequantized_path = self.outputs.values()
        if save_path is not None:
            save_quantized(net, save_path, report)
            self.logger.info("EfficientQ: packed checkpoint saved to %s", os.fspath(save_path))
        if dequantized_path is not None:
            save_dequantized(net, float_net, dequantized_path)
            self.logger.info("EfficientQ: dequantized float state dict saved to %s", os.fspath(dequantized_path))
        if report_path is not None:
            report.to_json(report_path)
            report.to_markdown(os.path.splitext(os.fspath(report_path))[0] + ".md")
            self.logger.info("EfficientQ: report written to %s", os.fspath(report_path))


def _check_arguments(calib_data: Any, preprocess: Any, report_path: Any, calib_volumes: Any) -> None:
    if calib_data is None:
        raise ValueError("calib_data is required: a tensor, a dict item, a dataset or a DataLoader.")
    if isinstance(calib_data, (str, bytes, os.PathLike)):
        raise TypeError(
            "calib_data must be data (a tensor, a dict item, a dataset or a DataLoader), not a path: load it "
            "first, e.g. with a monai.data.Dataset and LoadImaged."
        )
    if preprocess is not None and not callable(preprocess):
        raise TypeError(f"preprocess must be callable, got {type(preprocess).__name__}.")
    if report_path is not None and os.fspath(report_path).lower().endswith(".md"):
        raise ValueError(f"report_path={os.fspath(report_path)!r}: give the .json path; the .md is written next to it.")
    if isinstance(calib_volumes, bool) or not isinstance(calib_volumes, int) or calib_volumes < 1:
        raise ValueError(f"calib_volumes={calib_volumes!r} must be a positive integer (e.g. 2).")


class QuantizedCheckpointLoader:
    """QuantizedCheckpointLoader acts as an Ignite handler that loads a packed quantized checkpoint (or a float
    state dict) into the engine's network at ``STARTED``, in the place of MONAI's ``CheckpointLoader``, which
    cannot read a packed checkpoint (its codes are not a state dict).

    The network is changed in place (:func:`load_network`), so inferers and metrics holding it see the
    quantized layers.

    Usage example (bundle config)::

        "val_handlers": [
            {"_target_": "monai_efficientq.handlers.QuantizedCheckpointLoader",
             "load_path": "$@ckpt_dir + '/model_quantized.pt'"},
            {"_target_": "StatsHandler", "iteration_log": false}
        ]

    Args:
        load_path: the packed checkpoint (``save_quantized``) or a float state dict.
        network: the network to load into (default ``engine.network``).
        name: logger name (default: the engine's logger).
    """

    def __init__(self, load_path: str | os.PathLike, network: nn.Module | None = None, name: str | None = None) -> None:
        if load_path is None:
            raise ValueError("load_path is required: the packed checkpoint to load.")
        self.load_path = os.fspath(load_path)
        self.network = network
        self.name = name
        self.logger = logging.getLogger(name or "monai_efficientq")

    def attach(self, engine: Engine) -> None:
        """
        Args:
            engine: Ignite Engine, it can be a trainer, validator or evaluator.
        """
        if self.name is None:
            self.logger = engine.logger
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        """
        Args:
            engine: Ignite Engine, it can be a trainer, validator or evaluator.
        """
        net = load_network(_engine_network(engine, self.network, type(self).__name__), self.load_path)
        kind = "quantized" if quantization_info(net) is not None else "float"
        self.logger.info("Restored %s weights from %s.", kind, self.load_path)
