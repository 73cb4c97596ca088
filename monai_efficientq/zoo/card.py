"""The metadata and README (the model card) of a quantized Model-Zoo bundle
(:func:`~monai_efficientq.zoo.quantize_bundle`).

Pure functions of what the run measured (:class:`QuantizationSummary`): :func:`quantized_metadata` gives the new
``configs/metadata.json`` (next version, changelog entry, packages, ``eval_metrics`` and the ``quantization``
section) and :func:`quantized_readme` the new ``docs/README.md``. Nothing here reads or writes files.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

from ..report import QuantizationReport

__all__ = ["SCHEMA_URL", "QuantizationSummary", "bits_label", "next_version", "quantized_metadata", "quantized_readme"]

#: The metadata schema the quantized bundle's ``metadata.json`` follows (it lists ``required_packages_version``).
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"


@dataclasses.dataclass
class QuantizationSummary:
    """What a bundle quantization did and measured.

    Attributes:
        report: the quantization report (``report.dice`` holds the per-class Dice when measured).
        calibration: ``{"image": file names, "preprocessing": config id, "roi_size", "divisible_by",
            "in_evaluation": whether the volume is also an evaluation volume}``.
        metrics: ``{metric: {"float": value, "quantized": value}}`` of the bundle's own evaluation metrics.
        evaluation_volumes: how many volumes the evaluation ran on (0: not evaluated).
        float_file_bytes: size of the float ``models/model.pt``.
        packed_file_bytes: size of ``models/model_quantized.pt``.
        command: the command line that reproduces the run.
        config_files: ``{"inference" | "evaluate" | "train" | "multi_gpu_evaluate": file name}`` of the quantized
            bundle's configs.
    """

    report: QuantizationReport
    calibration: dict[str, Any]
    metrics: dict[str, dict[str, float]]
    evaluation_volumes: int
    float_file_bytes: int
    packed_file_bytes: int
    command: str
    config_files: dict[str, str]


def bits_label(config: Mapping[str, Any]) -> str:
    """``"W2A2"``, or ``"W4"`` with float activations."""
    act = config.get("act_bits")
    return f"W{config.get('weight_bits')}" + (f"A{act}" if act is not None else "")


def next_version(version: str) -> str:
    """The next patch version: ``"0.5.9"`` → ``"0.5.10"`` (any suffix dropped; ``"0.0.1"`` if unreadable)."""
    match = re.match(r"^(\d+)\.(\d+)\.(\d+)", str(version))
    if not match:
        return "0.0.1"
    major, minor, patch = (int(g) for g in match.groups())
    return f"{major}.{minor}.{patch + 1}"


def _rounded(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 4) if isinstance(v, float) and not math.isnan(v) else v) for k, v in values.items()}


def _section(summary: QuantizationSummary, source: Mapping[str, Any], checkpoint: str, report_file: str) -> dict:
    from ..bundle import quantization_section

    report = summary.report
    section = quantization_section(report)
    section.update(
        {
            "source_bundle": {"name": source.get("name"), "version": source.get("version")},
            "checkpoint": checkpoint,
            "report": report_file,
            "packed_file_bytes": int(summary.packed_file_bytes),
            "float_file_bytes": int(summary.float_file_bytes),
            "calibration": dict(summary.calibration),
            "evaluation_volumes": int(summary.evaluation_volumes),
            "metrics": {m: _rounded(v) for m, v in summary.metrics.items()},
            "dice": {m: _rounded(v) for m, v in (report.dice or {}).items()},
        }
    )
    if source.get("eval_metrics"):
        section["source_eval_metrics"] = copy.deepcopy(source["eval_metrics"])
    return section


def quantized_metadata(
    source: Mapping[str, Any],
    summary: QuantizationSummary,
    versions: Mapping[str, str],
    checkpoint: str = "models/model_quantized.pt",
    report_file: str = "docs/quantization_report.json",
) -> dict[str, Any]:
    """The quantized bundle's metadata from the source bundle's.

    The version is the next patch version with a changelog entry; ``monai_version``, ``pytorch_version`` and
    ``numpy_version`` are those the run used (``versions``); ``required_packages_version`` merges the source's
    (and its older name ``optional_packages_version``) with monai-efficientq; ``eval_metrics`` holds the quantized
    network's measured metrics (the source's published ones move to ``quantization.source_eval_metrics``); the
    ``quantization`` section records the settings, calibration, sizes and the float vs quantized results.

    Args:
        source: the source bundle's metadata.
        summary: what the run did and measured.
        versions: ``{"monai", "torch", "numpy", "monai-efficientq"}`` versions of the run.
        checkpoint: the packed checkpoint, relative to the bundle.
        report_file: the report JSON, relative to the bundle.
    """
    config = summary.report.config
    label = bits_label(config)
    meta = copy.deepcopy(dict(source))
    old_version = str(meta.get("version", "0.0.0"))
    version = next_version(old_version)
    entry = (
        f"EfficientQ {label} post-training quantization (first/last layers {config.get('first_last_bits')}-bit) of "
        f"version {old_version} with monai-efficientq {versions['monai-efficientq']}: {checkpoint} (packed) replaces "
        f"models/model.pt, the inference and evaluate configs load it with QuantizedCheckpointLoader"
    )
    meta["version"] = version
    meta["changelog"] = {version: entry, **dict(meta.get("changelog") or {})}
    meta["schema"] = SCHEMA_URL
    meta["monai_version"] = versions["monai"]
    meta["pytorch_version"] = versions["torch"]
    meta["numpy_version"] = versions["numpy"]
    packages = dict(meta.pop("optional_packages_version", None) or {})
    packages.update(meta.get("required_packages_version") or {})
    packages["monai-efficientq"] = versions["monai-efficientq"]
    meta["required_packages_version"] = packages
    if meta.get("name"):
        meta["name"] = f"{meta['name']} (EfficientQ {label})"
    meta["description"] = (
        f"{meta.get('description', '').rstrip()} Post-training quantized with EfficientQ (monai-efficientq): "
        f"{label}, first and last layers {config.get('first_last_bits')}-bit, calibrated on one volume."
    ).strip()
    meta["quantization"] = _section(summary, source, checkpoint, report_file)
    meta.pop("eval_metrics", None)
    if summary.metrics:
        meta["eval_metrics"] = {m: round(v["quantized"], 4) for m, v in summary.metrics.items()}
    return meta


# -- README ----------------------------------------------------------------------------------------------------


def _number(value: Any) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _results_table(title: str, rows: Mapping[str, Mapping[str, float]]) -> list[str]:
    lines = [f"| {title} | float | quantized | difference |", "|---|---|---|---|"]
    for name, values in rows.items():
        f, q = values.get("float"), values.get("quantized")
        diff = q - f if isinstance(f, float) and isinstance(q, float) else None
        lines.append(f"| {name} | {_number(f)} | {_number(q)} | {'–' if diff is None else f'{diff:+.4f}'} |")
    return lines


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _config_list(files: list[str]) -> str:
    return files[0] if len(files) == 1 else "\"[" + ",".join(f"'{f}'" for f in files) + "]\""


def _multi_gpu_note(files: Mapping[str, str]) -> list[str]:
    """The README paragraph on the distributed evaluation config (none if the bundle has none)."""
    if "multi_gpu_evaluate" not in files:
        return []
    return [
        f"Quantization ran once, when this bundle was made; `configs/{files['multi_gpu_evaluate']}` only evaluates "
        "the packed model on several processes (`--nproc_per_node`: one per GPU, the NCCL backend; on a machine "
        "without CUDA, CPU processes with the gloo backend). Each process loads `models/model_quantized.pt` and "
        "evaluates its share of the evaluation data (`DistributedSampler`); the metrics and the `MetricsSaver` "
        "details are gathered across processes, so the figures equal a single-process run's; only the first "
        "process logs.",
        "",
    ]


def quantized_readme(metadata: Mapping[str, Any], summary: QuantizationSummary, source_readme: str | None) -> str:
    """The quantized bundle's ``docs/README.md``: what was quantized and how, the results (Dice per class and the
    bundle's metrics, float vs quantized), the sizes, the commands to run it, then the source README.

    Args:
        metadata: the quantized bundle's metadata (:func:`quantized_metadata`).
        summary: what the run did and measured.
        source_readme: the source bundle's ``docs/README.md`` text, if any.
    """
    q = metadata["quantization"]
    report = summary.report
    config = report.config
    label = bits_label(config)
    source = q["source_bundle"]
    lines = [
        f"# {metadata.get('name', 'Quantized bundle')}",
        "",
        f"{source.get('name') or 'The source bundle'} {source.get('version') or ''} with its network quantized after "
        f"training by EfficientQ (Zhang & Chung, Medical Image Analysis 97, 2024; monai-efficientq): {label}, the "
        f"first and last layers {config.get('first_last_bits')}-bit with float input, preset `{config.get('preset')}`, "
        f"method `{config.get('method')}`, {config.get('iterations')} ADMM iterations at most per layer, attention "
        f"`{config.get('attention')}`. The network definition, preprocessing, inferer and post-processing are the "
        f"source bundle's; only the weights are replaced.",
        "",
        "## Results",
        "",
    ]
    evaluated = summary.evaluation_volumes
    if evaluated:
        lines.append(
            f"Measured with the bundle's own evaluation (`validate#evaluator`: its inferer, post-processing and "
            f"metrics) on {evaluated} evaluation volume(s), float network first, then the same network quantized."
        )
        lines.append("")
        if report.dice:
            classes = list(report.dice.get("float", {}))
            rows = {c: {m: report.dice[m].get(c) for m in ("float", "quantized")} for c in classes}
            lines += _results_table("Dice", rows)
            lines.append("")
        if summary.metrics:
            lines += _results_table("bundle metric", summary.metrics)
            lines.append("")
    else:
        lines += ["Not evaluated (no evaluation data, or the evaluation was switched off).", ""]
    calibration = summary.calibration
    lines += [
        f"- Size: {_size(summary.float_file_bytes)} float `models/model.pt` → {_size(summary.packed_file_bytes)} "
        f"`models/model_quantized.pt` ({summary.float_file_bytes / max(summary.packed_file_bytes, 1):.1f}× smaller).",
        f"- Calibration: {', '.join(calibration.get('image') or [])} through the bundle's "
        f"`{calibration.get('preprocessing')}`,"
        f" cropped to {'×'.join(str(s) for s in report.calibration_shape[2:])} (roi {calibration.get('roi_size')}, "
        f"divisible by {calibration.get('divisible_by')})"
        + ("; this volume is also one of the evaluation volumes." if calibration.get("in_evaluation") else "."),
        f"- Quantization time: {report.total_seconds:.1f} s on {report.device or 'cpu'}. Per-layer errors and where "
        f"the time went: `docs/quantization_report.md`.",
        "",
        "## Use",
        "",
        "Needs `pip install monai-efficientq` (it provides `QuantizedCheckpointLoader`, which the configs use in "
        "place of `CheckpointLoader`). Set the data paths as the source bundle's README below describes "
        "(e.g. `--dataset_dir`).",
        "",
        "```bash",
    ]
    files = summary.config_files
    def config_list(*names: str) -> str:
        return _config_list([f"configs/{files[n]}" for n in ("common", *names) if n in files])

    if "inference" in files:
        lines.append(f"python -m monai.bundle run --config_file {config_list('inference')}")
    if "evaluate" in files:
        lines.append(f"python -m monai.bundle run --config_file {config_list('train', 'evaluate')}")
    if "multi_gpu_evaluate" in files:
        lines.append(f"torchrun --standalone --nnodes=1 --nproc_per_node=2 -m monai.bundle run --config_file "
                     f"{config_list('train', 'evaluate', 'multi_gpu_evaluate')}   # evaluation on 2 GPUs")
    if "inference" in files:
        lines.append(
            f"python -m monai.bundle run export --config_file {config_list('inference')}   "
            f"# TorchScript: models/model_quantized.ts"
        )
    lines += [
        "```",
        "",
        "The TorchScript file holds the dequantized float32 weights (float-sized); the packed checkpoint is the small "
        "file to share. `configs/train` is the source's, kept because `evaluate` layers on it; training with it "
        "trains a float network.",
        "",
        *_multi_gpu_note(files),
        "## How it was made",
        "",
        "```bash",
        summary.command,
        "```",
        "",
    ]
    if source_readme:
        lines += [
            "---",
            "",
            "The source bundle's README follows unchanged; its training, multi-GPU and TensorRT instructions refer "
            "to the float model.",
            "",
            source_readme.rstrip(),
            "",
        ]
    return "\n".join(lines)
