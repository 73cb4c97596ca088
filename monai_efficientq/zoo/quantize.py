""":func:`quantize_bundle`: a Model-Zoo bundle folder in, a new quantized bundle folder out."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..config import EfficientQConfig
from ..io import load_float_weights
from .calibration import calibration_item, missing_files, prepare_calibration
from .configs import (
    bundle_parser, inferer_roi, loads_packed_checkpoint, parsed_content, prediction_kind, quantized_config, read_config,
)
from .evaluation import BundleEvaluation, evaluation_items
from .layout import BundleLayout, check_bundle_packages, check_out_dir
from .writer import RunOutcome, write_bundle

__all__ = ["QUANTIZE_BUNDLE_CONFIG", "QuantizedBundle", "quantize_bundle"]

logger = logging.getLogger("monai_efficientq")

#: The ``python -m monai.bundle run`` config of :func:`quantize_bundle` shipped with the package.
QUANTIZE_BUNDLE_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "quantize_bundle.json"
)


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
    from ..handlers import resolve_config

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


def _rewritten_configs(layout: BundleLayout) -> dict[str, dict[str, Any]]:
    """``{name: config}`` of the quantized bundle's inference and evaluate configs (and its ``common`` config, whose
    checkpoint paths name the packed checkpoint too). An inference config that already loads a packed checkpoint
    with :class:`~monai_efficientq.handlers.QuantizedCheckpointLoader` is kept as it is."""
    rewritten = {}
    for name in ("common", "inference", "evaluate"):
        if name not in layout.configs:
            continue
        new, loaders = quantized_config(read_config(layout.configs[name]))
        if name == "inference" and loaders == 0 and not loads_packed_checkpoint(new):
            raise ValueError(
                f"{layout.configs[name]} loads its weights without a MONAI CheckpointLoader: the quantized bundle "
                f"needs one to replace (by monai_efficientq.handlers.QuantizedCheckpointLoader)."
            )
        rewritten[name] = new
    return rewritten


def _run_values(layout: BundleLayout, dataset_dir: Any, device: Any, workdir: str) -> dict[str, Any]:
    """The ids set in the bundle's configs for this run: its root, a scratch ``output_dir``, and what was asked."""
    values: dict[str, Any] = {"bundle_root": layout.root, "output_dir": workdir}
    if dataset_dir is not None:
        values["dataset_dir"] = os.path.abspath(os.fspath(dataset_dir))
    if device is not None:
        values["device"] = f"$torch.device({str(torch.device(device))!r})"
    return values


def _apply_overrides(parsers: Sequence[Any], overrides: Mapping[str, Any] | None) -> None:
    for config_id, value in (overrides or {}).items():
        top = str(config_id).split("#", 1)[0]
        holders = [p for p in parsers if top in p.config]
        if not holders:
            raise KeyError(f"override {config_id!r}: no config of the bundle has the id {top!r}.")
        for parser in holders:
            parser[config_id] = value


def _file_names(paths: Any) -> list[str]:
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths or [])
    return [os.path.basename(os.fspath(p)) for p in paths]


def _command_line(
    layout: BundleLayout, target: str, settings: Mapping[str, Any], calib: Any, dataset_dir: Any, roi_size: Any,
    max_eval_volumes: int | None,
) -> str:
    """The ``monai-efficientq quantize-bundle`` command of the run (``settings``: the run's config as a dict; only
    those that differ from the defaults are written)."""
    defaults = EfficientQConfig(weight_bits=settings["weight_bits"], preset=settings["preset"]).to_dict()
    act_bits = settings["act_bits"]
    parts = ["monai-efficientq quantize-bundle", os.path.basename(layout.root), os.path.basename(target),
             f"--weight_bits {settings['weight_bits']}", f"--act_bits {act_bits if act_bits is not None else 'none'}"]
    for name in ("first_last_bits", "method", "preset", "iterations", "patience", "attention", "prediction",
                 "calib_augment", "holdout"):
        if name == "preset" or settings[name] != defaults[name]:
            parts.append(f"--{name} {'none' if settings[name] is None else settings[name]}")
    if calib is not None:
        names = _file_names(calib.get("image") if isinstance(calib, Mapping) else calib)
        parts.append(f"--calib {names[0] if len(names) == 1 else json.dumps(names).replace(' ', '')}")
    if dataset_dir is not None:
        parts.append(f"--dataset_dir {os.path.basename(os.path.normpath(os.fspath(dataset_dir)))}")
    if roi_size is not None:
        parts.append(f"--roi_size {json.dumps(roi_size).replace(' ', '')}")
    if max_eval_volumes is not None:
        parts.append(f"--max_eval_volumes {max_eval_volumes}")
    return " ".join(parts)


@dataclasses.dataclass
class _Plan:
    """What a run will do, checked before it starts."""

    evaluation_parser: Any
    inference_parser: Any
    config: EfficientQConfig
    eval_items: list[dict[str, Any]]
    calib_item: dict[str, Any]
    calib_given: bool

    @property
    def parsers(self) -> list[Any]:
        return [p for p in (self.evaluation_parser, self.inference_parser) if p is not None]


def _plan(
    layout: BundleLayout, workdir: str, config: Any, calib: Any, calib_label: Any, dataset_dir: Any,
    max_eval_volumes: int | None, evaluate: bool, overrides: Mapping[str, Any] | None,
) -> _Plan:
    """Read the bundle's configs with this run's values, and check the settings and every data file."""
    device = config.device if isinstance(config, EfficientQConfig) else (config or {}).get("device")
    values = _run_values(layout, dataset_dir, device, workdir)
    files = layout.evaluation_files
    evaluation_parser = bundle_parser(files, layout.metadata, values) if files else None
    inference = layout.inference_files
    inference_parser = bundle_parser(inference, layout.metadata, values) if inference else None
    parsers = [p for p in (evaluation_parser, inference_parser) if p is not None]
    _apply_overrides(parsers, overrides)
    cfg = _efficientq_config(config, prediction_kind(parsers))
    evaluate = bool(evaluate) and "evaluate" in layout.configs
    needs_items = evaluation_parser is not None and (evaluate or calib is None)  # to evaluate, or for its first item
    items = evaluation_items(evaluation_parser, max_eval_volumes) if needs_items else []
    if evaluate and not items:
        raise ValueError(
            "the bundle's evaluation dataset is empty: pass --dataset_dir where its data are, or --evaluate False."
        )
    calib_item = calibration_item(calib, calib_label, items)
    if cfg.attention == "label" and "label" not in calib_item:
        raise ValueError("attention='label' needs a calibration label: pass --calib_label with --calib.")
    eval_items = items if evaluate else []
    missing = missing_files([calib_item, *eval_items])
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"data file not found: {missing[0]}{more}; pass --dataset_dir where the data are.")
    return _Plan(evaluation_parser, inference_parser, cfg, eval_items, calib_item, calib is not None)


def _quantize_and_measure(
    layout: BundleLayout, metadata: Mapping[str, Any], plan: _Plan, roi_size: Any, divisible_by: Any
) -> RunOutcome:
    """Load the float weights, evaluate, quantize in place on the calibration volume, evaluate again."""
    from ..network import quantize_

    evaluation = BundleEvaluation(plan.evaluation_parser, plan.eval_items, metadata) if plan.eval_items else None
    if evaluation is not None:
        net = evaluation.network
    else:
        net = parsed_content(plan.inference_parser or plan.evaluation_parser, "network", "network")
    load_float_weights(net, layout.checkpoint)
    calibration = prepare_calibration(
        plan.calib_item, plan.evaluation_parser, plan.inference_parser, net, roi_size, divisible_by,
        inferer_roi(plan.parsers),
    )
    float_metrics, float_dice = evaluation.run("float") if evaluation is not None else ({}, {})
    device = next(net.parameters()).device
    cfg = plan.config if plan.config.device is not None else dataclasses.replace(plan.config, device=str(device))
    report = quantize_(net, calibration.image, cfg, label=calibration.label if cfg.attention == "label" else None)
    net.to(device)
    quantized_metrics, quantized_dice = evaluation.run("quantized") if evaluation is not None else ({}, {})
    return RunOutcome(
        network=net,
        report=report,
        dice={"float": float_dice, "quantized": quantized_dice} if float_dice else {},
        metrics={m: {"float": v, "quantized": quantized_metrics[m]} for m, v in float_metrics.items()
                 if m in quantized_metrics},
        calibration={
            "image": _file_names(plan.calib_item.get("image")),
            "preprocessing": calibration.preprocessing,
            "roi_size": calibration.roi_size,
            "divisible_by": calibration.divisible_by,
            "in_evaluation": not plan.calib_given and evaluation is not None,
        },
        evaluation_volumes=evaluation.volumes if evaluation is not None else 0,
        calibration_image=calibration.image,
    )


def quantize_bundle(
    bundle_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: EfficientQConfig | Mapping[str, Any] | None = None,
    calib: Any = None,
    calib_label: str | None = None,
    dataset_dir: str | os.PathLike | None = None,
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
    network, the bundle's evaluation runs on it, the network is quantized in place
    (:func:`~monai_efficientq.network.quantize_`) on the calibration volume, the evaluation runs again, and the new
    bundle is written (see :mod:`monai_efficientq.zoo` for its content).

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
            ``roi_size``, at most 128 a side (:data:`~monai_efficientq.zoo.calibration.MAX_DEFAULT_ROI`) and no
            larger than the image.
        divisible_by: pad the crop to a multiple of this; default the network's down-sampling factor
            (:func:`~monai_efficientq.zoo.calibration.downsampling_factor`), else 16.
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
    layout = BundleLayout.find(bundle_dir)
    target = check_out_dir(out_dir, layout.root)
    metadata = layout.read_metadata()
    if check_packages:
        check_bundle_packages(metadata)
    rewritten = _rewritten_configs(layout)
    with tempfile.TemporaryDirectory(prefix="efficientq-eval-") as workdir:
        plan = _plan(layout, workdir, config, calib, calib_label, dataset_dir, max_eval_volumes, evaluate, overrides)
        outcome = _quantize_and_measure(layout, metadata, plan, roi_size, divisible_by)
    command = _command_line(layout, target, outcome.report.config, calib, dataset_dir, roi_size, max_eval_volumes)
    new_metadata = write_bundle(layout, target, metadata, rewritten, outcome, command)
    files = sorted(
        os.path.relpath(os.path.join(folder, name), target) for folder, _, names in os.walk(target) for name in names
    )
    logger.info("EfficientQ: wrote the quantized bundle %s (%d files)", target, len(files))
    return QuantizedBundle(target, files, outcome.report, outcome.metrics, new_metadata)
