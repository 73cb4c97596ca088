"""Quantization time and peak memory of the compared methods on the BraTS-config SegResNet (no Dice).

One synthetic ``4 x size^3`` volume, random weights; the methods run one after the other in this process, so on
CPU the peak RSS is cumulative. Ours runs with ``prediction="sigmoid"`` (the BraTS net is multi-label); the
Brevitas rows are set up as in the comparison.
"""

from __future__ import annotations

import copy
import json
import platform
import traceback
from typing import Any

import torch
from torch import nn

from .config import CompareConfig, Setting
from .measure import free_memory, peak_memory_mb, reset_peak, rss_now_mb
from .methods import Calibration, ready_method
from .networks import brats_segresnet, synthetic_volume
from .plan import float_plan
from .report import write_text

__all__ = ["time_methods"]


def _timed_row(name: str, net: nn.Module, calib: Calibration, setting: Setting, cfg: CompareConfig) -> dict[str, Any]:
    """Quantize with one method and print its time and peak memory; a failure is the row's status."""
    device = torch.device(cfg.device)
    rss_before = rss_now_mb()
    reset_peak(device)
    try:
        _, info = ready_method(name).quantize(net, calib, setting, cfg)
        peak = peak_memory_mb(device)
        row = {"method": name, "seconds": info["quant_seconds"], "peak_memory_mb": peak, "status": "ok",
               "layers_optimised": info.get("layers_optimised"), "layers_total": info.get("layers_total")}
        if info.get("phase_seconds"):  # ours: where the time went (the report's phases)
            row["phase_seconds"] = info["phase_seconds"]
        cumulative = "" if device.type == "cuda" else f" (process RSS, cumulative; was {rss_before:.0f} MB before)"
        print(f"{name:>24s} {setting.name}: {row['seconds']:8.1f} s   peak {peak:8.0f} MB{cumulative}"
              f"   layers optimised {row['layers_optimised']}/{row['layers_total']}", flush=True)
    except Exception as err:
        row = {"method": name, "status": f"failed: {type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=8)}
        print(f"{name:>24s} {setting.name}: FAILED {type(err).__name__}: {err}", flush=True)
    free_memory(device)
    return row


def time_methods(cfg: CompareConfig, size: int = 128) -> dict[str, Any]:
    """Time every method of ``cfg`` at its (first) setting on the BraTS-config SegResNet and one ``4 x size^3``
    synthetic volume; writes ``cfg.out`` (JSON) when given.

    Args:
        cfg: the methods, setting, iterations, device and threads (``prediction`` should be ``"sigmoid"``).
        size: side of the synthetic volume.
    """
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = torch.device(cfg.device)
    setting = cfg.setting_list[0]
    net = brats_segresnet()
    x = synthetic_volume(int(size))[None]
    with torch.no_grad():  # warm-up (CUDA context, cuDNN) outside the timed region
        copy.deepcopy(net).to(device)(x.to(device))
    plan = float_plan(copy.deepcopy(net).to(device), x.to(device), fold_bn=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    report: dict[str, Any] = {
        "network": "SegResNet(blocks_down=(1,2,2,4), init_filters=16, in 4, out 3), random weights",
        "parameters": sum(p.numel() for p in net.parameters()), "input": list(x.shape), "setting": setting.name,
        "device": str(device), "device_name": device_name, "threads": torch.get_num_threads(),
        "iterations": cfg.iterations, "lr_iterations": cfg.lr_iterations, "layers": len(plan.order), "rows": [],
    }
    print(f"timing: {report['network']}, {report['parameters'] / 1e6:.2f} M params, {report['layers']} layers, "
          f"input {tuple(x.shape)}, {setting.name}, on {device}", flush=True)
    calib = Calibration(x, None, plan)
    report["rows"] = [_timed_row(name, net, calib, setting, cfg) for name in cfg.methods]
    if cfg.out:
        write_text(cfg.out, json.dumps(report, indent=2))
    return report
