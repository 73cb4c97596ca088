"""Small helpers that MONAI bundle configs call (``"$import monai_efficientq.bundle as eqb"``).

- :func:`default_bundle_root`: the bundle folder of the running config (so a bundle runs from any working
  directory without ``--bundle_root``).
- :func:`datalist_items`, :func:`inference_items`: absolute-path items from a bundle's ``datalist.json`` or
  from ``--input``.
- :func:`check_inputs`: validate files, output paths and the EfficientQ settings before anything runs or is
  written.
- :func:`dice_per_class`, :func:`write_results`: per-class Dice of MONAI evaluators; the report (with
  ``report.dice``), the packed checkpoint, a Dice CSV and the quantized model's metadata.
- :class:`QuantizedCheckpointLoader`: an ignite handler (in the place of MONAI's ``CheckpointLoader``) that
  loads a packed quantized checkpoint, or a float state dict, into the engine's network at ``STARTED``.
- :func:`load_network`: the same, outside an engine.

Nothing here imports ignite at module level.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .modules import quantization_info

__all__ = [
    "default_bundle_root",
    "cli_value",
    "datalist_items",
    "inference_items",
    "check_inputs",
    "dice_per_class",
    "write_results",
    "is_packed_checkpoint",
    "load_network",
    "export_torchscript",
    "QuantizedCheckpointLoader",
]

logger = logging.getLogger("monai_efficientq")


# -- paths ---------------------------------------------------------------------------------------------------


def default_bundle_root() -> str:
    """The bundle folder of the config being run: the folder above ``configs/`` of the first config file.

    MONAI's ``ConfigWorkflow`` (what ``python -m monai.bundle run`` and ``monai.bundle.run(...)`` create)
    knows the config files' folder but does not put it into the config; this looks the running workflow up
    on the call stack. Outside a workflow (e.g. ``verify_net_in_out`` or a bare ``ConfigParser``) it falls
    back to the current directory, MONAI's ``"bundle_root": "."``. An explicit ``--bundle_root`` always wins
    (it replaces this expression).
    """
    from monai.bundle.workflows import ConfigWorkflow

    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, ConfigWorkflow) and getattr(obj, "config_root_path", None) is not None:
            root = os.path.abspath(os.fspath(obj.config_root_path))
            return os.path.dirname(root) if os.path.basename(root) == "configs" else root
        frame = frame.f_back
    return os.getcwd()


_NONE_WORDS = ("none", "null", "float")


def _argv_sets_none(name: str, argv: Sequence[str]) -> bool:
    flag = f"--{name}"
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv) and argv[i + 1].strip().lower() in _NONE_WORDS:
            return True
        if arg.startswith(flag + "=") and arg[len(flag) + 1 :].strip().lower() in _NONE_WORDS:
            return True
    return False


def cli_value(name: str, value: Any, argv: Sequence[str] | None = None) -> Any:
    """``value``, or ``None`` where the user asked for None.

    MONAI's ``run`` drops every override whose value is ``None`` (``update_kwargs(ignore_none=True)``), so
    ``--act_bits None`` would silently keep the config's default. A config that writes
    ``"$eqb.cli_value('act_bits', @act_bits)"`` gets ``None`` when the command line holds ``--act_bits None``
    (or ``--act_bits=None``), and also when the value is one of the strings ``"none"``, ``"null"``,
    ``"float"`` (any case; for the Python API: ``monai.bundle.run(..., act_bits="none")``).

    Args:
        name: the config id, as written after ``--`` on the command line.
        value: the id's resolved value.
        argv: the command line to look at (default ``sys.argv``).
    """
    if isinstance(value, str) and value.strip().lower() in _NONE_WORDS:
        return None
    if _argv_sets_none(name, sys.argv[1:] if argv is None else argv):
        return None
    return value


def _abs(path: str, base: str) -> str:
    path = os.path.expanduser(os.fspath(path))
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


def datalist_items(
    datalist_file: str, section: str, base_dir: str | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    """The items of one section of a MONAI datalist JSON with absolute file paths.

    Args:
        datalist_file: the datalist (``{"training": [...], "evaluation": [...], "calibration": {...}}``).
        section: the key to read; a single dict item is returned as a one-item list.
        base_dir: relative paths are relative to this (default: the datalist's folder).
        limit: keep only the first ``limit`` items (``None``: all).
    """
    if not os.path.isfile(datalist_file):
        raise FileNotFoundError(f"datalist not found: {datalist_file} (set --dataset_dir or --datalist_file).")
    with open(datalist_file, encoding="utf-8") as f:
        datalist = json.load(f)
    if section not in datalist:
        raise KeyError(f"{datalist_file} has no section {section!r} (sections: {list(datalist)}).")
    items = datalist[section]
    items = [items] if isinstance(items, Mapping) else list(items)
    base = base_dir if base_dir is not None else os.path.dirname(os.path.abspath(datalist_file))
    out = []
    for item in items:
        if isinstance(item, str):
            item = {"image": item}
        out.append({k: _abs(v, base) if isinstance(v, str) else v for k, v in item.items()})
    if limit is not None:
        if int(limit) < 1:
            raise ValueError(f"limit={limit!r}: give a positive number of items (or None for all).")
        out = out[: int(limit)]
    return out


def inference_items(
    input: str | Sequence[str] | None, datalist_file: str | None = None, section: str = "evaluation"
) -> list[dict[str, str]]:
    """``[{"image": path}, ...]`` for inference: the ``input`` file(s) if given, else the datalist's images.

    Args:
        input: a NIfTI path, a list of paths or a folder (its ``*.nii``/``*.nii.gz`` files); ``None``: the datalist.
        datalist_file: datalist used when ``input`` is ``None``.
        section: datalist section used when ``input`` is ``None``.
    """
    if input is None:
        if datalist_file is None:
            raise ValueError("give --input (a NIfTI file, a list of files or a folder) or a datalist.")
        return [{"image": it["image"]} for it in datalist_items(datalist_file, section)]
    paths = [input] if isinstance(input, (str, os.PathLike)) else list(input)
    files: list[str] = []
    for p in paths:
        p = os.path.abspath(os.path.expanduser(os.fspath(p)))
        if os.path.isdir(p):
            found = sorted(os.path.join(p, n) for n in os.listdir(p) if n.endswith((".nii", ".nii.gz")))
            if not found:
                raise FileNotFoundError(f"--input folder {p} holds no .nii/.nii.gz file.")
            files += found
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"--input not found: {p}")
    return [{"image": f} for f in files]


# -- validation ----------------------------------------------------------------------------------------------


def _writable_target(path: str, what: str) -> str | None:
    """Why ``path`` could not be written (without creating anything), or ``None``."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        return f"{what}={path!r} is a directory; give a file path"
    folder = os.path.dirname(path)
    while not os.path.exists(folder):  # the first existing ancestor must let us create the rest
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    if not os.path.isdir(folder):
        return f"{what}={path!r}: {folder!r} is a file, not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{what}={path!r}: the folder {folder!r} is not writable"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return f"{what}={path!r} exists and is not writable"
    return None


def check_inputs(
    ckpt_path: str | None = None,
    calib_file: str | None = None,
    eval_files: Sequence[Mapping[str, Any]] | None = None,
    output_paths: Mapping[str, str] | None = None,
    efficientq: Mapping[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
) -> bool:
    """Fail early with one clear message, before any evaluation runs or any file is written.

    Args:
        ckpt_path: the float checkpoint that must exist.
        calib_file: the calibration image that must exist.
        eval_files: evaluation items whose file paths (every string value) must exist.
        output_paths: ``{name: path}`` of files the run will write; their folders must be creatable/writable.
            Nothing is created here.
        efficientq: fields of :class:`~monai_efficientq.config.EfficientQConfig` to validate (e.g. the
            command-line ``--weight_bits``).
        class_names: foreground class names of the Dice columns (checked to be non-empty).

    Returns:
        True (so a config can write ``"$eqb.check_inputs(...)"``).

    Raises:
        FileNotFoundError: a missing input file.
        ValueError: an invalid EfficientQ setting or an output path that cannot be written.
    """
    if ckpt_path is not None and not os.path.isfile(ckpt_path):
        raise FileNotFoundError(
            f"float checkpoint not found: {ckpt_path} (set --ckpt_path to the trained model's state dict)."
        )
    if calib_file is not None and not os.path.isfile(calib_file):
        raise FileNotFoundError(f"calibration volume not found: {calib_file} (set --calib_file).")
    if eval_files is not None:
        if len(eval_files) == 0:
            raise ValueError("no evaluation volume: the evaluation list is empty.")
        missing = [v for item in eval_files for v in item.values() if isinstance(v, str) and not os.path.isfile(v)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} evaluation file(s) not found, e.g. {missing[:3]}.")
    if efficientq is not None:
        from .handlers import resolve_config

        try:
            resolve_config(None, **dict(efficientq))
        except (ValueError, TypeError) as err:
            raise ValueError(f"invalid EfficientQ setting: {err}") from err
    if class_names is not None and len(class_names) == 0:
        raise ValueError("class_names is empty: give the foreground class names (e.g. ['csf', 'gm', 'wm']).")
    targets = {k: v for k, v in (output_paths or {}).items() if v is not None}
    problems = [p for p in (_writable_target(v, k) for k, v in targets.items()) if p]
    if problems:
        raise ValueError("cannot write the outputs: " + "; ".join(problems) + ". Choose another --output_dir.")
    return True


# -- results -------------------------------------------------------------------------------------------------


def _nanmean(values: Sequence[float]) -> float:
    vals = [float(v) for v in values if not math.isnan(float(v))]
    return sum(vals) / len(vals) if vals else float("nan")


def _metric_buffer(engine: Any, metric_name: str) -> torch.Tensor:
    details = getattr(getattr(engine, "state", None), "metric_details", None) or {}
    if metric_name not in details:
        raise KeyError(
            f"the evaluator has no per-case details of metric {metric_name!r} (has {list(details)}): run it first, "
            f"with a MeanDice(save_details=True) metric of that name."
        )
    buf = torch.as_tensor(details[metric_name]).detach().float().cpu()
    return buf.reshape(buf.shape[0], -1)


def dice_per_class(engine: Any, metric_name: str, class_names: Sequence[str]) -> dict[str, float]:
    """``{class: Dice, ..., "mean": mean over classes}`` from an evaluator's ``MeanDice`` details.

    Per class the mean over cases (NaN cases, i.e. class absent in prediction and label, ignored); ``mean`` is
    the mean of the per-class values (as ``DiceMetric(reduction="mean_batch")`` then a mean).
    """
    buf = _metric_buffer(engine, metric_name)
    if buf.shape[1] != len(class_names):
        raise ValueError(
            f"metric {metric_name!r} has {buf.shape[1]} class columns, class_names {list(class_names)} has "
            f"{len(class_names)} (is include_background=False set?)."
        )
    out = {name: _nanmean(buf[:, i].tolist()) for i, name in enumerate(class_names)}
    out["mean"] = _nanmean(list(out.values()))
    return out


def _case_name(item: Mapping[str, Any]) -> str:
    name = os.path.basename(str(item.get("image", "")))
    for ext in (".nii.gz", ".nii", ".mha", ".nrrd"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _rel(path: str, root: str | None) -> str:
    if root:
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
        if not rel.startswith(".."):
            return rel
    return os.path.abspath(path)


def _csv_text(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def write_results(
    network: nn.Module,
    handler: Any,
    evaluators: Mapping[str, Any],
    class_names: Sequence[str],
    quantized_path: str,
    report_path: str,
    csv_path: str,
    metric_name: str = "val_mean_dice",
    eval_files: Sequence[Mapping[str, Any]] | None = None,
    meta_file: str | None = None,
    metadata_path: str | None = None,
    calib_file: str | None = None,
    bundle_root: str | None = None,
) -> dict[str, dict[str, float]]:
    """Collect the Dice of the evaluators and write the run's outputs (each file atomically).

    Writes: the report JSON (+ ``.md`` beside it) with ``report.dice = {name: {class: Dice, "mean": ...}}``;
    the packed checkpoint again, now holding that report; a CSV with one row per model and case plus a
    ``mean`` row per model; and, if ``meta_file`` and ``metadata_path`` are given, a copy of the bundle
    metadata whose ``quantization`` section holds the settings and the measured Dice.

    Args:
        network: the (quantized in place) network of the quantized evaluator.
        handler: the :class:`~monai_efficientq.handlers.EfficientQHandler` that quantized it (holds the report).
        evaluators: ``{"float": evaluator, "quantized": evaluator}`` (any names), already run.
        class_names: the foreground class names, in the metric's channel order.
        quantized_path: the packed checkpoint path.
        report_path: the report JSON path.
        csv_path: the Dice CSV path.
        metric_name: name of the ``MeanDice`` key metric in the evaluators.
        eval_files: the evaluation items, in loader order (names the CSV's cases).
        meta_file: the bundle's ``metadata.json`` to copy.
        metadata_path: where the quantized model's metadata goes.
        calib_file: the calibration image (recorded in the metadata).
        bundle_root: paths inside it are recorded relative to it.

    Returns:
        the Dice dict stored in ``report.dice``.
    """
    from . import __version__
    from .checkpoint import save_quantized
    from .report import atomic_write_text

    report = getattr(handler, "report", None)
    if report is None:
        raise RuntimeError("the EfficientQ handler has no report: the quantized evaluator did not quantize.")
    dice: dict[str, dict[str, float]] = {}
    rows: list[dict[str, Any]] = []
    names = [_case_name(it) for it in eval_files] if eval_files is not None else None
    for model, engine in evaluators.items():
        dice[model] = dice_per_class(engine, metric_name, class_names)
        buf = _metric_buffer(engine, metric_name)
        for i, case in enumerate(buf.tolist()):
            case_name = names[i] if names is not None and i < len(names) else f"case_{i:03d}"
            row = {"model": model, "case": case_name, **{c: float(v) for c, v in zip(class_names, case)}}
            row["mean"] = _nanmean(case)
            rows.append(row)
        rows.append({"model": model, "case": "mean", **dice[model]})
    report.dice = dice
    save_quantized(network, quantized_path, report)
    report.packed_bytes = report.packed_bytes or os.path.getsize(quantized_path)
    report.to_json(report_path)
    report.to_markdown(os.path.splitext(os.fspath(report_path))[0] + ".md")
    atomic_write_text(csv_path, _csv_text(rows, ["model", "case", *class_names, "mean"]))
    if meta_file is not None and metadata_path is not None:
        meta: dict[str, Any] = {}
        if os.path.isfile(meta_file):
            with open(meta_file, encoding="utf-8") as f:
                meta = json.load(f)
        else:
            logger.warning("EfficientQ: metadata %s not found; writing the quantization section alone.", meta_file)
        cfg = report.config
        section = {  # replaces the template section of the bundle metadata: only what this run did
            "package": f"monai-efficientq {__version__}",
            "checkpoint": _rel(quantized_path, bundle_root),
            "report": _rel(report_path, bundle_root),
            "method": cfg.get("method"),
            "preset": cfg.get("preset"),
            "weight_bits": cfg.get("weight_bits"),
            "act_bits": cfg.get("act_bits"),
            "first_last_bits": cfg.get("first_last_bits"),
            "weight_scale": cfg.get("weight_scale"),
            "weight_grid": cfg.get("weight_grid"),
            "iterations": cfg.get("iterations"),
            "attention": cfg.get("attention"),
            "calibration_volume": _rel(calib_file, bundle_root) if calib_file else None,
            "calibration_shape": list(report.calibration_shape),
            "quantization_seconds": round(float(report.total_seconds), 1),
            "float_bytes": int(report.float_bytes),
            "packed_bytes": int(report.packed_bytes),
            "compression": round(float(report.compression), 2),
            "evaluation_volumes": len(eval_files) if eval_files is not None else None,
            "dice": {m: {k: round(v, 4) for k, v in d.items()} for m, d in dice.items()},
        }
        meta["quantization"] = section
        atomic_write_text(metadata_path, json.dumps(meta, indent=4) + "\n")
    for model, d in dice.items():
        logger.info("EfficientQ Dice %s: %s", model, ", ".join(f"{k} {v:.4f}" for k, v in d.items()))
    return dice


# -- loading -------------------------------------------------------------------------------------------------


def is_packed_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a packed checkpoint written by :func:`~monai_efficientq.checkpoint.save_quantized`."""
    from .checkpoint import FORMAT

    state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    return isinstance(state, dict) and state.get("format") == FORMAT


def load_network(net: nn.Module, path: str | os.PathLike, device: Any = None) -> nn.Module:
    """``net`` with the weights of ``path`` loaded IN PLACE: a packed checkpoint makes it the quantized network,
    a float state dict (or ``{"model": state_dict}``) is loaded as usual. Returns ``net`` in eval mode.
    """
    from .checkpoint import load_quantized_
    from .io import load_float_weights

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if device is not None:
        net.to(device)
    if is_packed_checkpoint(path):
        ref = next(iter(list(net.parameters()) + list(net.buffers())), None)
        load_quantized_(net, path, map_location=ref.device if ref is not None else "cpu")
    else:
        load_float_weights(net, path)
    return net.eval()


def export_torchscript(
    network: nn.Module,
    filepath: str | os.PathLike,
    input_shape: Sequence[int],
    meta_file: str | None = None,
    extra_files: Mapping[str, Any] | None = None,
) -> str:
    """Save ``network`` (e.g. the quantized one from :func:`load_network`) as TorchScript, by tracing.

    ``python -m monai.bundle ckpt_export`` cannot do this for a packed checkpoint: it loads the checkpoint as a
    state dict into ``network_def`` (a packed checkpoint is not one). Tracing is used because the quantized
    layers are not scriptable with ``torch.jit.script`` in this version; the traced graph holds the dequantized
    weights (float32) and the activation quantizers, so the file is float-sized, not packed. The bundle
    metadata (``meta_file``) and ``extra_files`` (name -> JSON-able object) are stored in the archive as
    MONAI's ``save_net_with_metadata`` does; load it with ``torch.jit.load`` or ``monai.data.load_net_with_metadata``.

    Returns:
        the path written.
    """
    from monai.data import save_net_with_metadata

    filepath = os.fspath(filepath)
    if not filepath.endswith(".ts"):
        raise ValueError(f"filepath={filepath!r}: give a path ending in .ts.")
    ref = next(iter(list(network.parameters()) + list(network.buffers())), None)
    device = ref.device if ref is not None else torch.device("cpu")
    was_training = network.training
    network.eval()
    with torch.no_grad():
        traced = torch.jit.trace(network, torch.rand(*[int(s) for s in input_shape], device=device))
    network.train(was_training)
    meta: dict[str, Any] = {}
    if meta_file is not None and os.path.isfile(meta_file):
        with open(meta_file, encoding="utf-8") as f:
            meta = json.load(f)
    quant_info = quantization_info(network)
    if quant_info is not None:
        meta["efficientq"] = {"config": quant_info.config}
    more = {k: json.dumps(v).encode("utf-8") for k, v in (extra_files or {}).items()}
    os.makedirs(os.path.dirname(os.path.abspath(filepath)) or ".", exist_ok=True)
    save_net_with_metadata(
        traced, filepath[: -len(".ts")], include_config_vals=False, append_timestamp=False, meta_values=meta,
        more_extra_files=more,
    )
    logger.info("EfficientQ: TorchScript (traced) saved to %s", filepath)
    return filepath


class QuantizedCheckpointLoader:
    """Load a packed quantized checkpoint (or a float state dict) into the engine's network at ``STARTED``.

    The bundle counterpart of MONAI's ``CheckpointLoader`` for models quantized with monai-efficientq:
    ``CheckpointLoader`` cannot read a packed checkpoint (its codes are not a state dict). The network is
    changed in place (:func:`load_network`), so inferers and metrics holding it see the quantized layers.

    Args:
        load_path: the packed checkpoint (``save_quantized``) or a float state dict.
        network: the network to load into (default ``engine.network``).
        name: logger name (default: the engine's logger).
    """

    def __init__(self, load_path: str, network: nn.Module | None = None, name: str | None = None) -> None:
        if load_path is None:
            raise ValueError("load_path is required: the packed checkpoint to load.")
        self.load_path = os.fspath(load_path)
        self.network = network
        self.logger = logging.getLogger(name) if name else logging.getLogger("monai_efficientq")
        self._name = name

    def attach(self, engine: Any) -> None:
        from monai.utils import IgniteInfo, min_version, optional_import

        events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
        if self._name is None:
            self.logger = engine.logger
        engine.add_event_handler(events.STARTED, self)

    def __call__(self, engine: Any) -> None:
        net = self.network if self.network is not None else getattr(engine, "network", None)
        if not isinstance(net, nn.Module):
            raise ValueError("the engine has no `network` module: pass network=... to QuantizedCheckpointLoader.")
        from .handlers import _unwrap

        load_network(_unwrap(net), self.load_path)
        kind = "quantized" if quantization_info(_unwrap(net)) is not None else "float"
        self.logger.info("Restored %s weights from %s.", kind, self.load_path)
