"""What MONAI bundle configs need from monai-efficientq besides the handlers (``"$import ... bundle as eqb"``).

Only the steps MONAI has no equivalent of; datalists, evaluation, per-case metric CSVs and checkpoint loading of
float weights are MONAI's own (``load_decathlon_datalist``, ``SupervisedEvaluator``, ``MeanDice``,
``MetricsSaver``, ``CheckpointLoader``); the packed checkpoint is loaded by
:class:`~monai_efficientq.handlers.QuantizedCheckpointLoader`.

- :func:`check_inputs`: validate input files, output paths and the EfficientQ settings before anything runs or
  is written.
- :func:`dice_by_class`, :func:`save_with_dice`: put the evaluators' per-class Dice into the quantization report
  and write the packed checkpoint and the report with it.
- :func:`write_quantized_metadata`: the bundle's ``metadata.json`` with a ``quantization`` section for the
  quantized model.
- :func:`export_torchscript`: TorchScript of the quantized network (``ckpt_export`` cannot read a packed
  checkpoint).

Nothing here imports ignite.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .distributed import is_other_rank
from .io import check_output_path
from .modules import quantization_info
from .report import QuantizationReport

__all__ = [
    "check_inputs",
    "dice_by_class",
    "save_with_dice",
    "quantization_section",
    "write_quantized_metadata",
    "export_torchscript",
]

logger = logging.getLogger("monai_efficientq")


# -- validation ----------------------------------------------------------------------------------------------


def _file_paths(value: Any) -> list[str]:
    """The file paths in ``value``: a path, a dict item (its string values) or a list of either."""
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    if isinstance(value, Mapping):
        return [os.fspath(v) for v in value.values() if isinstance(v, (str, os.PathLike))]
    return [path for element in value for path in _file_paths(element)]


def _writable_target(path: str, what: str) -> str | None:
    """Why ``path`` could not be written (:func:`~monai_efficientq.io.check_output_path`), or ``None``."""
    try:
        check_output_path(path, what)
    except ValueError as err:
        return str(err).rstrip(".")
    return None


def check_inputs(
    files: Mapping[str, Any] | None = None,
    output_paths: Mapping[str, Any] | None = None,
    efficientq: Mapping[str, Any] | None = None,
) -> bool:
    """Fail early with one clear message, before any evaluation runs or any file is written.

    Args:
        files: ``{what: paths}`` of inputs that must exist; ``paths`` is a path, a dict item (every string value
            is a path) or a list of either, e.g. ``{"float checkpoint": ckpt, "evaluation volume": items}``.
        output_paths: ``{name: path}`` of files the run will write; their folders must be creatable and
            writable. Nothing is created here.
        efficientq: fields of :class:`~monai_efficientq.config.EfficientQConfig` to validate.

    Returns:
        True (so a config can write ``"$eqb.check_inputs(...)"``).

    Raises:
        FileNotFoundError: a missing input file (``"<what> not found: <path>"``).
        ValueError: an empty input list, an invalid EfficientQ setting or an output path that cannot be written.
    """
    for what, value in (files or {}).items():
        paths = _file_paths(value)
        if not paths:
            raise ValueError(f"no {what}: the list is empty.")
        missing = [path for path in paths if not os.path.isfile(path)]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise FileNotFoundError(f"{what} not found: {missing[0]}{more}")
    if efficientq is not None:
        from .handlers import resolve_config

        try:
            resolve_config(None, **dict(efficientq))
        except (ValueError, TypeError) as err:
            raise ValueError(f"invalid EfficientQ setting: {err}") from err
    outputs = {name: path for name, path in (output_paths or {}).items() if path is not None}
    problems = [p for p in (_writable_target(path, name) for name, path in outputs.items()) if p]
    if problems:
        raise ValueError("cannot write the outputs: " + "; ".join(problems) + ". Choose another --output_dir.")
    return True


# -- results -------------------------------------------------------------------------------------------------



def dice_by_class(engine: Any, metric_name: str, class_names: Sequence[str]) -> dict[str, float]:
    """``{class: Dice, ..., "mean": mean over the classes}`` from an evaluator that has run with a per-class
    Dice metric, ``MeanDice(include_background=False, reduction="mean_batch")`` named ``metric_name``
    (per class, the mean over the cases where the class is present). NaN classes are left out of the mean.
    """
    metrics = engine.state.metrics
    if metric_name not in metrics:
        raise KeyError(f"the evaluator has no metric {metric_name!r} (has {list(metrics)}): has it run?")
    values = torch.as_tensor(metrics[metric_name]).flatten().tolist()
    if len(values) != len(class_names):
        raise ValueError(
            f"metric {metric_name!r} has {len(values)} values, class_names {list(class_names)} has "
            f"{len(class_names)}: use reduction='mean_batch' and include_background=False."
        )
    dice = {name: float(v) for name, v in zip(class_names, values)}
    present = [v for v in values if not math.isnan(v)]
    dice["mean"] = sum(present) / len(present) if present else float("nan")
    return dice


def save_with_dice(
    network: nn.Module,
    report: QuantizationReport,
    dice: Mapping[str, Mapping[str, float]],
    quantized_path: str,
    report_path: str,
) -> QuantizationReport:
    """Store ``dice`` (``{model: {class: Dice, "mean": ...}}``) in ``report.dice`` and write the packed checkpoint
    of ``network`` and the report (JSON, and Markdown beside it) holding it.

    Returns:
        the report.
    """
    from .checkpoint import save_quantized

    if report is None:
        raise RuntimeError("no quantization report: the quantized evaluation did not quantize the network.")
    report.dice = {model: dict(values) for model, values in dice.items()}
    if is_other_rank():  # a distributed run: rank 0 writes
        return report
    save_quantized(network, quantized_path, report)
    report.packed_bytes = report.packed_bytes or os.path.getsize(quantized_path)
    report.to_json(report_path)
    report.to_markdown(os.path.splitext(os.fspath(report_path))[0] + ".md")
    for model, values in report.dice.items():
        logger.info("EfficientQ Dice %s: %s", model, ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    logger.info(
        "EfficientQ wrote %s (%.2f MiB, %.1fx smaller), %s and %s", quantized_path,
        os.path.getsize(quantized_path) / 2**20, report.compression, report_path,
        os.path.splitext(os.fspath(report_path))[0] + ".md",
    )
    return report


def _bundle_path(path: str, bundle_root: str | None) -> str:
    """``path`` relative to the bundle root when inside it, else absolute."""
    path = os.path.abspath(path)
    if bundle_root is not None:
        relative = os.path.relpath(path, os.path.abspath(bundle_root))
        if not relative.startswith(".."):
            return relative
    return path


def _quantization_section(report: QuantizationReport) -> dict[str, Any]:
    from . import __version__

    settings = ("method", "preset", "weight_bits", "act_bits", "first_last_bits", "weight_scale", "weight_grid")
    return {
        "package": f"monai-efficientq {__version__}",
        **{key: report.config.get(key) for key in (*settings, "iterations", "attention")},
        "calibration_shape": list(report.calibration_shape),
        "quantization_seconds": round(float(report.total_seconds), 1),
        "float_bytes": int(report.float_bytes),
        "packed_bytes": int(report.packed_bytes),
        "compression": round(float(report.compression), 2),
    }


def quantization_section(report: QuantizationReport) -> dict[str, Any]:
    """The settings, calibration shape, time and sizes of a quantization run, as the ``quantization`` section of
    a bundle's metadata records them (:func:`write_quantized_metadata`)."""
    return _quantization_section(report)


def write_quantized_metadata(
    meta_file: str,
    metadata_path: str,
    report: QuantizationReport,
    paths: Mapping[str, str] | None = None,
    bundle_root: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Write a copy of the bundle metadata whose ``quantization`` section records the run: the settings, sizes
    and time from ``report``, its Dice (rounded to 4 digits), ``paths`` and ``fields``.

    Args:
        meta_file: the bundle's ``metadata.json`` (if missing, the section is written alone).
        metadata_path: where the quantized model's metadata goes.
        report: the quantization report (with ``dice``, see :func:`save_with_dice`).
        paths: ``{key: file}`` recorded relative to ``bundle_root`` when inside it (e.g. the checkpoint).
        bundle_root: the bundle folder.
        fields: more entries of the section (e.g. ``evaluation_volumes=6``).

    Returns:
        the metadata written.
    """
    from .report import atomic_write_text

    if is_other_rank():  # a distributed run: rank 0 writes
        return {}
    meta: dict[str, Any] = {}
    if os.path.isfile(meta_file):
        with open(meta_file, encoding="utf-8") as f:
            meta = json.load(f)
    else:
        logger.warning("EfficientQ: metadata %s not found; writing the quantization section alone.", meta_file)
    section = _quantization_section(report)
    section.update({key: _bundle_path(path, bundle_root) for key, path in (paths or {}).items()})
    section.update(fields)
    section["dice"] = {m: {k: round(v, 4) for k, v in d.items()} for m, d in (report.dice or {}).items()}
    meta["quantization"] = section  # replaces the template section: only what this run did
    atomic_write_text(metadata_path, json.dumps(meta, indent=4) + "\n")
    logger.info("EfficientQ wrote %s", metadata_path)
    return meta


# -- export --------------------------------------------------------------------------------------------------


def export_torchscript(
    network: nn.Module,
    filepath: str | os.PathLike,
    input_shape: Sequence[int] | None = None,
    meta_file: str | None = None,
) -> str:
    """Save ``network`` (e.g. the quantized one loaded by :func:`~monai_efficientq.handlers.load_network`) as
    TorchScript with the bundle metadata, as ``python -m monai.bundle ckpt_export`` does for float checkpoints.

    ``ckpt_export`` cannot do it for a packed checkpoint: it loads the checkpoint as a state dict into
    ``network_def``. The quantized layers are scriptable: the network is scripted with MONAI's
    ``convert_to_torchscript`` (checked against the network on a random input of ``input_shape`` when given).
    The archive holds the dequantized float32 weights and the activation quantizers, so it is float-sized, not
    packed. Load it with ``torch.jit.load`` or ``monai.data.load_net_with_metadata``.

    Args:
        network: the network to export.
        filepath: the ``.ts`` file to write.
        input_shape: shape of a test input, e.g. ``[1, 1, 64, 64, 64]`` (``None``: no check).
        meta_file: the bundle metadata stored in the archive (with the quantization settings added).

    Returns:
        the path written.
    """
    from monai.data import save_net_with_metadata
    from monai.networks import convert_to_torchscript

    filepath = os.fspath(filepath)
    if not filepath.endswith(".ts"):
        raise ValueError(f"filepath={filepath!r}: give a path ending in .ts.")
    device = next(iter(network.parameters())).device
    inputs = [torch.rand(*[int(s) for s in input_shape], device=device)] if input_shape else None
    scripted = convert_to_torchscript(network.eval(), verify=inputs is not None, inputs=inputs, device=device)
    meta: dict[str, Any] = {}
    if meta_file is not None and os.path.isfile(meta_file):
        with open(meta_file, encoding="utf-8") as f:
            meta = json.load(f)
    info = quantization_info(network)
    if info is not None:
        meta["efficientq"] = {"config": info.config}
    os.makedirs(os.path.dirname(os.path.abspath(filepath)), exist_ok=True)
    save_net_with_metadata(
        scripted, filepath[: -len(".ts")], include_config_vals=False, append_timestamp=False, meta_values=meta
    )
    logger.info("EfficientQ: TorchScript saved to %s", filepath)
    return filepath
