"""The rows of a comparison run: the float reference, then every (setting, method), each measured alike.

Every method gets the same float network, calibration batch, float plan and evaluator. A row quantizes, saves the
quantized network as the method ships it (for its size), reads the peak memory and evaluates; on CPU each row runs
by default in a fresh process (:func:`~benchmarks.measure.run_in_fresh_process`) so the peak RSS is the row's own.
"""

from __future__ import annotations

import copy
import importlib
import io
import logging
import os
import platform
import shutil
import sys
import tempfile
import traceback
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .brevitas_methods import BREVITAS_NOTES
from .config import CompareConfig, Setting, spatial_size
from .evaluation import Evaluator
from .measure import free_memory, peak_memory_mb, reset_peak, rss_now_mb, run_in_fresh_process
from .methods import FLOAT, Calibration, Method, get_method, ready_method
from .plan import FloatPlan, float_plan
from .report import ResultsWriter, fmt

if TYPE_CHECKING:
    from .data import RunData

__all__ = ["RowJob", "compare", "run_row"]

logger = logging.getLogger("benchmarks")
MIN_LEARNED_ROUND_ITERATIONS = 200


@dataclass
class RowJob:
    """One quantized row, picklable so that it can run in a fresh process.

    Attributes:
        method: the method's name.
        setting: the setting's name (``W2A2``).
        net: the float network (on CPU).
        calib: the calibration batch and the float plan.
        cfg: the run's settings.
        evaluator: the run's evaluator, with the float predictions as its reference.
        workdir: where the quantized checkpoint is written.
        isolated: whether the row runs in a fresh process (for the record).
    """

    method: str
    setting: str
    net: nn.Module
    calib: Calibration
    cfg: CompareConfig
    evaluator: Evaluator
    workdir: str
    isolated: bool = False


def _checkpoint(method: Method, qnet: nn.Module, job: RowJob) -> dict[str, Any]:
    """Save ``qnet`` as ``method`` ships it; its size (the file removed unless ``keep_checkpoints``)."""
    path = os.path.join(job.workdir, f"{method.name}_{job.setting}.pt")
    method.save(qnet, path)
    size = os.path.getsize(path)
    if not job.cfg.keep_checkpoints:
        os.remove(path)
    return {"checkpoint_bytes": size, "checkpoint_kind": method.checkpoint_kind,
            "checkpoint_path": path if job.cfg.keep_checkpoints else None}


def _memory(device: torch.device, rss_before: float, isolated: bool) -> dict[str, Any]:
    """The peak memory of the row and what it measures."""
    if device.type == "cuda":
        return {"peak_memory_mb": peak_memory_mb(device),
                "memory_kind": "CUDA max_memory_allocated during quantization"}
    kind = ("peak RSS of a fresh spawn child, read right after quantization" if isolated
            else "process peak RSS so far (cumulative over rows)")
    return {"peak_memory_mb": peak_memory_mb(device), "rss_before_mb": rss_before, "memory_kind": kind}


def run_row(job: RowJob) -> dict[str, Any]:
    """Quantize (one method, one setting), save, measure and evaluate; a failure is the row's status, not raised."""
    cfg = job.cfg
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    setting, device = Setting.parse(job.setting), torch.device(cfg.device)
    row: dict[str, Any] = {"method": job.method, "setting": setting.name, "weight_bits": setting.weight_bits,
                           "act_bits": setting.act_bits, "isolated": job.isolated}
    try:
        rss_before = rss_now_mb()
        reset_peak(device)
        method = ready_method(job.method)  # what it imports counts in the row's peak, not in its time
        qnet, info = method.quantize(job.net, job.calib, setting, cfg)
        info.update(_checkpoint(method, qnet, job))
        row.update(_memory(device, rss_before, job.isolated))
        row.update(info)
        row.update(job.evaluator.evaluate(qnet)[0])
        row["status"] = "ok"
    except Exception as err:  # one failing row must not lose the others
        row["status"] = f"failed: {type(err).__name__}: {err}"
        row["traceback"] = traceback.format_exc(limit=8)
    finally:
        free_memory(device)
    return row


def _float_row(net: nn.Module, evaluator: Evaluator, cfg: CompareConfig, checkpoint_bytes: int) -> dict[str, Any]:
    """Evaluate the float network and make its predictions the evaluator's reference."""
    scores, predictions = evaluator.evaluate(copy.deepcopy(net).to(torch.device(cfg.device)))
    evaluator.set_reference(predictions)
    return {
        "method": FLOAT, "setting": FLOAT, "weight_bits": 32, "act_bits": None, "status": "ok",
        "checkpoint_bytes": checkpoint_bytes, "checkpoint_kind": "torch.save(state_dict)", "quant_seconds": 0.0,
        **scores, "dice_vs_float": {k: 1.0 for k in scores.get("dice", {})} or None, "mean_dice_vs_float": 1.0,
    }


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("monai", "brevitas", "monai_efficientq"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                versions[name] = importlib.import_module(name).__version__
        except Exception:
            versions[name] = None
    return versions


def _memory_note(cfg: CompareConfig) -> str:
    if cfg.device.startswith("cuda"):
        return "CUDA max_memory_allocated of the quantization step (reset before each row)"
    if cfg.isolated:
        return ("CPU: peak RSS of a fresh spawn child per row, read right after quantization (rss_before_mb: the "
                "child's RSS before quantizing)")
    return "CPU: process peak RSS, cumulative over rows (run with --isolate True for a clean per-row peak)"


def _given(cfg: CompareConfig, data: RunData) -> dict[str, Any]:
    """What the run was given: the network, its weights, the data and the command line."""
    return {
        "network": cfg.network or f"{','.join(cfg.config_file or [])}#{cfg.network_id}",
        "network_kwargs": cfg.network_kwargs if not cfg.config_file else None, "checkpoint": cfg.checkpoint,
        "calib_image": ",".join(data.calib_images), "calib_label": ",".join(data.calib_labels) or None,
        "eval_datalist": cfg.eval_datalist, "normalize": cfg.normalize, "eval_images": data.eval_images,
        "command": " ".join(sys.argv),
    }


def run_meta(cfg: CompareConfig, net: nn.Module, data: RunData, plan: FloatPlan, workdir: str) -> dict[str, Any]:
    """The ``meta`` of the results: the run's settings, the crop, versions, sizes and the float plan."""
    state = net.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    roi = spatial_size(cfg.roi_size, data.calibration.image.dim() - 2)
    return {
        **_given(cfg, data),
        "methods": cfg.methods, "settings": cfg.settings, "device": cfg.device, "threads": torch.get_num_threads(),
        "iterations": cfg.iterations, "lr_iterations": cfg.lr_iterations, "prediction": cfg.prediction,
        "roi_size": list(roi), "overlap": cfg.overlap, "sw_batch_size": cfg.sw_batch_size,
        "include_background": cfg.prediction == "sigmoid", "calib_crop": data.calibration.box,
        "calib_shape": list(data.calibration.image.shape), "eval_cases": len(data.cases),
        "class_names": data.class_names, "isolate": cfg.isolated, "memory_note": _memory_note(cfg),
        "versions": _versions(), "float_bytes": sum(t.numel() * t.element_size() for t in state.values()),
        "quantized_layers": plan.order, "edge_layers": plan.edges, "folded_batchnorm": plan.bn_pairs,
        "brevitas_fold_bn": bool(cfg.brevitas_fold_bn), "brevitas_weight_scale": cfg.brevitas_weight_scale,
        "brevitas_act_scale": cfg.brevitas_act_scale, "brevitas_notes": BREVITAS_NOTES,
        "checkpoint_dir": workdir if cfg.keep_checkpoints else None, "eq_options": cfg.eq_options,
        "float_checkpoint_bytes": buffer.tell(),
    }


def _quantized_row(job: RowJob) -> dict[str, Any]:
    """The row of ``job``: "not run" where the method cannot run here, else run (in a fresh process if isolated)."""
    missing = get_method(job.method).missing_requirement()
    if missing:
        return {"method": job.method, "setting": job.setting, "status": f"not run: {missing}"}
    logger.info("%s %s ...", job.method, job.setting)
    row = run_in_fresh_process(run_row, job) if job.isolated else run_row(job)
    logger.info("%s %s: %s mean Dice %s vs float %s in %s s", job.method, job.setting, row["status"][:200],
                fmt(row.get("mean_dice")), fmt(row.get("mean_dice_vs_float")), fmt(row.get("quant_seconds"), 1))
    return row


def compare(cfg: CompareConfig, net: nn.Module, data: RunData, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the comparison of ``cfg`` on a loaded network and data; writes ``cfg.out`` and its Markdown.

    Args:
        cfg: the run's settings.
        net: the float network.
        data: the calibration batch and the evaluation cases.
        meta: entries to add to (or override in) the results' ``meta``.

    Returns:
        ``{"meta": ..., "rows": [...]}``, as written to ``cfg.out``.
    """
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    if cfg.lr_iterations < MIN_LEARNED_ROUND_ITERATIONS and "brevitas_learned_round" in cfg.methods:
        logger.warning("learned rounding with %d iterations per layer (< %d, the benchmark's minimum)",
                       cfg.lr_iterations, MIN_LEARNED_ROUND_ITERATIONS)
    net = net.eval().cpu()
    x = data.calibration.image
    plan = float_plan(net, x, fold_bn=True)
    calib = Calibration(x, data.calibration.label, plan if cfg.brevitas_fold_bn else float_plan(net, x, fold_bn=False))
    roi = spatial_size(cfg.roi_size, x.dim() - 2)
    evaluator = Evaluator(data.cases, roi, cfg.overlap, cfg.sw_batch_size, cfg.prediction, data.class_names, cfg.device)
    workdir = cfg.checkpoint_dir or tempfile.mkdtemp(prefix="compare_ckpt_")
    os.makedirs(workdir, exist_ok=True)
    results: dict[str, Any] = {"meta": {**run_meta(cfg, net, data, plan, workdir), **(meta or {})}, "rows": []}
    writer = ResultsWriter(cfg.out, cfg.markdown_path)
    try:
        logger.info("float evaluation on %d case(s)", len(data.cases))
        results["rows"].append(_float_row(net, evaluator, cfg, results["meta"]["float_checkpoint_bytes"]))
        writer.write(results)
        logger.info("float: mean Dice %s", fmt(results["rows"][0].get("mean_dice")))
        for setting in cfg.settings:
            for name in (m for m in cfg.methods if m != FLOAT):
                job = RowJob(name, setting, net, calib, cfg, evaluator, workdir, cfg.isolated)
                results["rows"].append(_quantized_row(job))
                writer.write(results)
        return results
    finally:
        if cfg.checkpoint_dir is None and not cfg.keep_checkpoints:
            shutil.rmtree(workdir, ignore_errors=True)
