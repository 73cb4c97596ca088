"""Writing the quantized bundle folder: built in a temporary folder next to the target, checked (the written configs
and checkpoint load back to the quantized network), then renamed into place; on any error nothing is left."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import card
from .configs import NETWORK_DEF_ID, QUANTIZED_CHECKPOINT, config_text, has_id, parsed_content, with_export
from .layout import EVALUATION_ORDER, INFERENCE_ORDER, BundleLayout
from .multi_gpu import MULTI_GPU_EVALUATE, multi_gpu_evaluate_config

__all__ = ["RunOutcome", "write_bundle"]

logger = logging.getLogger("monai_efficientq")

REPORT_FILE = "docs/quantization_report.json"


@dataclasses.dataclass
class RunOutcome:
    """What a bundle quantization produced, for the writer.

    Attributes:
        network: the quantized network.
        report: its quantization report.
        dice: ``{"float": {...}, "quantized": {...}}`` Dice per class (empty if not measured).
        metrics: ``{metric: {"float": value, "quantized": value}}`` of the bundle's own evaluation.
        calibration: the metadata's calibration record (file names, preprocessing, crop).
        evaluation_volumes: how many volumes were evaluated (0: none).
        calibration_image: the calibration volume ``(C, *S)`` (the load-back check runs on it).
    """

    network: nn.Module
    report: Any
    dice: dict[str, dict[str, float]]
    metrics: dict[str, dict[str, float]]
    calibration: dict[str, Any]
    evaluation_volumes: int
    calibration_image: torch.Tensor


def _versions() -> dict[str, str]:
    import monai
    import numpy

    from .. import __version__

    return {"monai": monai.__version__, "torch": torch.__version__.split("+")[0], "numpy": numpy.__version__,
            "monai-efficientq": __version__}


def _write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _write_configs(
    layout: BundleLayout, staging: str, rewritten: Mapping[str, dict], export_shape: Sequence[int]
) -> dict[str, str]:
    """Write the quantized bundle's configs: the rewritten ones, ``train`` (unchanged) when ``evaluate`` layers on
    it, ``logging.conf``, the other files of ``configs/`` the written configs name (e.g. a datalist) and the
    distributed evaluation config (:func:`~monai_efficientq.zoo.multi_gpu.multi_gpu_evaluate_config`).

    Returns:
        ``{name: file name}`` of the bundle configs written.
    """
    folder = os.path.join(staging, "configs")
    names: dict[str, str] = {}
    texts = []
    for name, config in rewritten.items():
        if name == "inference":
            config = with_export(config, export_shape)
        names[name] = os.path.basename(layout.configs[name])
        texts.append(config_text(config, names[name]))
        _write_text(os.path.join(folder, names[name]), texts[-1])
    if "evaluate" in rewritten and "train" in layout.configs:
        names["train"] = os.path.basename(layout.configs["train"])
        shutil.copy2(layout.configs["train"], os.path.join(folder, names["train"]))
        with open(layout.configs["train"], encoding="utf-8") as f:
            texts.append(f.read())
    source = os.path.join(layout.root, "configs")
    for entry in sorted(os.listdir(source)):
        path = os.path.join(source, entry)
        if entry in names.values() or entry == "metadata.json" or not os.path.isfile(path):
            continue
        if entry == "logging.conf" or any(entry in text for text in texts):
            shutil.copy2(path, os.path.join(folder, entry))
    _write_multi_gpu_evaluate(folder, names)
    return names


def _write_multi_gpu_evaluate(folder: str, names: dict[str, str]) -> None:
    """Add ``multi_gpu_evaluate`` (the format of the ``evaluate`` config) layered on the written ``train`` and
    ``evaluate`` configs, and its file name to ``names``, when the evaluation can be distributed."""
    from .configs import bundle_parser

    if "evaluate" not in names:
        return
    layers = [os.path.join(folder, names[n]) for n in EVALUATION_ORDER if n in names]
    config = multi_gpu_evaluate_config(bundle_parser(layers, None, {}))
    if config is None:
        return
    name = MULTI_GPU_EVALUATE + os.path.splitext(names["evaluate"])[1]
    _write_text(os.path.join(folder, name), config_text(config, name))
    names[MULTI_GPU_EVALUATE] = name


def _copy_support_files(layout: BundleLayout, staging: str) -> str | None:
    """Copy ``LICENSE``, ``scripts/`` and ``docs/`` (but its README); return the source README's text, if any."""
    license_file = os.path.join(layout.root, "LICENSE")
    if os.path.isfile(license_file):
        shutil.copy2(license_file, os.path.join(staging, "LICENSE"))
    else:
        logger.warning("EfficientQ: the bundle has no LICENSE file; the quantized bundle has none either.")
    scripts = os.path.join(layout.root, "scripts")
    if os.path.isdir(scripts):
        shutil.copytree(scripts, os.path.join(staging, "scripts"), ignore=shutil.ignore_patterns("__pycache__"))
    docs = os.path.join(layout.root, "docs")
    if not os.path.isdir(docs):
        return None
    shutil.copytree(docs, os.path.join(staging, "docs"), ignore=shutil.ignore_patterns("README.md"), dirs_exist_ok=True)
    readme = os.path.join(docs, "README.md")
    if not os.path.isfile(readme):
        return None
    with open(readme, encoding="utf-8") as f:
        return f.read()


def _first_tensor(out: Any) -> torch.Tensor:
    while isinstance(out, (list, tuple)):
        out = out[0]
    return out


def _check_loads_back(staging: str, names: Mapping[str, str], outcome: RunOutcome) -> None:
    """The written configs' ``network_def`` with the written packed checkpoint give the quantized network's output
    on the calibration volume (a wrong rewrite or checkpoint is caught before the bundle is published)."""
    from ..handlers import load_network
    from .configs import bundle_parser

    order = [n for n in (INFERENCE_ORDER if "inference" in names else EVALUATION_ORDER) if n in names]
    parser = bundle_parser([os.path.join(staging, "configs", names[n]) for n in order], None, {"bundle_root": staging})
    if not has_id(parser, NETWORK_DEF_ID):
        logger.info("EfficientQ: the written configs have no %s; the load-back check is skipped.", NETWORK_DEF_ID)
        return
    device = next(outcome.network.parameters()).device
    fresh = parsed_content(parser, NETWORK_DEF_ID, "network").to(device)
    load_network(fresh, os.path.join(staging, "models", QUANTIZED_CHECKPOINT))
    x = outcome.calibration_image[None].to(device)
    with torch.no_grad():
        expected, got = _first_tensor(outcome.network.eval()(x)), _first_tensor(fresh(x))
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()) + 1e-6):
        raise RuntimeError(
            "the written bundle does not load back to the quantized network (its configs' network_def with "
            f"models/{QUANTIZED_CHECKPOINT} gives other outputs): please report this with the bundle's configs."
        )


def _save_model_and_report(staging: str, outcome: RunOutcome) -> str:
    """The packed checkpoint (with the report, Dice included) and the report as JSON and Markdown."""
    from ..bundle import save_with_dice
    from ..checkpoint import save_quantized

    packed = os.path.join(staging, "models", QUANTIZED_CHECKPOINT)
    report_json = os.path.join(staging, REPORT_FILE)
    if outcome.dice:
        save_with_dice(outcome.network, outcome.report, outcome.dice, packed, report_json)
    else:
        save_quantized(outcome.network, packed, outcome.report)
        outcome.report.to_json(report_json)
        outcome.report.to_markdown(os.path.splitext(report_json)[0] + ".md")
    return packed


def _make_staging_folder(target: str) -> str:
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp creates 0700; give the folder the usual permissions
    return staging


def write_bundle(
    layout: BundleLayout,
    target: str,
    metadata: Mapping[str, Any],
    rewritten: Mapping[str, dict],
    outcome: RunOutcome,
    command: str,
) -> dict[str, Any]:
    """Write the quantized bundle to ``target`` (new, or an empty folder), whole or not at all.

    Args:
        layout: the input bundle.
        target: the new bundle folder.
        metadata: the input bundle's metadata.
        rewritten: ``{"inference" | "evaluate": config}`` from :func:`~monai_efficientq.zoo.configs.quantized_config`.
        outcome: what the run produced.
        command: the command line that reproduces the run (for the README).

    Returns:
        the new metadata.
    """
    from ..report import atomic_write_text

    staging = _make_staging_folder(target)
    try:
        packed = _save_model_and_report(staging, outcome)
        source_readme = _copy_support_files(layout, staging)
        names = _write_configs(layout, staging, rewritten, list(outcome.calibration_image[None].shape))
        summary = card.QuantizationSummary(
            outcome.report, outcome.calibration, outcome.metrics, outcome.evaluation_volumes,
            os.path.getsize(layout.checkpoint), os.path.getsize(packed), command, names,
        )
        new_metadata = card.quantized_metadata(metadata, summary, _versions(), report_file=REPORT_FILE)
        atomic_write_text(os.path.join(staging, "configs", "metadata.json"), json.dumps(new_metadata, indent=4) + "\n")
        readme = card.quantized_readme(new_metadata, summary, source_readme)
        atomic_write_text(os.path.join(staging, "docs", "README.md"), readme)
        _check_loads_back(staging, names, outcome)
        if os.path.isdir(target):
            os.rmdir(target)  # an empty folder (checked before the work started)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return new_metadata
