"""Our methods in the comparison: round-to-nearest and EfficientQ with its two presets.

``rtn`` is ``EfficientQConfig(method="rtn")``, ``eq_original`` ``preset="original"`` (the published settings),
``eq_default`` the default preset. Every row gets 8-bit first/last layers (``first_last_bits=8``), the run's
``iterations`` and ``prediction``, then the run's ``eq_options`` on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from monai_efficientq import EfficientQConfig, QuantizationReport, quantize_network, save_quantized

from .measure import Stopwatch

if TYPE_CHECKING:
    from .config import CompareConfig, Setting
    from .methods import Calibration

__all__ = ["OUR_METHODS", "EfficientQMethod", "report_summary"]


def _mean(values: list[float | None]) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def report_summary(report: QuantizationReport, optimising: bool) -> dict[str, Any]:
    """The figures of a :class:`~monai_efficientq.report.QuantizationReport` that a comparison row shows.

    A layer counts as optimised when its chosen solution is an ADMM iterate rather than the round-to-nearest
    candidate (``best_iteration >= 0``).

    Args:
        report: the report of one run.
        optimising: whether the method optimises at all (``False`` for round-to-nearest).
    """
    layers = report.layers
    optimised = [r.name for r in layers if r.best_iteration >= 0] if optimising else []
    return {
        "layers_total": len(layers),
        "layers_optimised": len(optimised),
        "layers_not_optimised": [f"{r.name} ({r.type})" for r in layers if r.name not in optimised] if optimising else [],
        "layers_left_float": len(report.float_layers),
        "calib_error_rtn_mean": _mean([r.rtn_error for r in layers]),
        "calib_error_mean": _mean([r.error for r in layers]),
        "held_out_error_mean": _mean([r.held_out_error for r in layers]),
        "held_out_rtn_error_mean": _mean([r.held_out_rtn_error for r in layers]),
        "layers_kept_rtn": sum(r.best_iteration < 0 for r in layers),
        "calibration_shape": list(report.calibration_shape),
        "phase_seconds": {k: round(v, 3) for k, v in (report.phase_seconds or {}).items()},
    }


@dataclass(frozen=True)
class EfficientQMethod:
    """One of our rows: :func:`~monai_efficientq.network.quantize_network` with one ``method`` and ``preset``.

    Attributes:
        name: the row's name.
        method: ``"efficientq"`` or ``"rtn"``.
        preset: ``"default"`` or ``"original"``.
    """

    name: str
    method: str
    preset: str = "default"
    checkpoint_kind: str = "save_quantized packed file"

    def missing_requirement(self) -> str | None:
        """Always runnable: the package is all it needs."""
        return None

    def config(self, setting: Setting, cfg: CompareConfig) -> EfficientQConfig:
        """The :class:`~monai_efficientq.config.EfficientQConfig` of this row at ``setting``."""
        device = str(torch.device(cfg.device))  # as torch names it (the packed file stores the config)
        options = {"iterations": cfg.iterations, "first_last_bits": 8, "prediction": cfg.prediction,
                   "device": device, "progress": False, **cfg.eq_options}
        return EfficientQConfig(weight_bits=setting.weight_bits, act_bits=setting.act_bits, method=self.method,
                                preset=self.preset, **options)

    def quantize(
        self, net: nn.Module, calib: Calibration, setting: Setting, cfg: CompareConfig
    ) -> tuple[nn.Module, dict[str, Any]]:
        """Quantize a copy of ``net`` on the calibration batch (and its label, for ``attention="label"``)."""
        eq_config = self.config(setting, cfg)
        with Stopwatch(torch.device(cfg.device)) as clock:
            qnet, report = quantize_network(net, calib.image, eq_config, label=calib.label)
        return qnet, {"quant_seconds": clock.seconds, **report_summary(report, self.method != "rtn")}

    def save(self, qnet: nn.Module, path: str) -> None:
        """The packed file of :func:`~monai_efficientq.checkpoint.save_quantized`."""
        save_quantized(qnet, path)


OUR_METHODS = (
    EfficientQMethod("rtn", "rtn"),
    EfficientQMethod("eq_original", "efficientq", "original"),
    EfficientQMethod("eq_default", "efficientq", "default"),
)
