"""The quantization report: per-layer results, totals and (when measured) Dice, as JSON and Markdown."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["LayerRecord", "QuantizationReport", "atomic_write_text"]

_logger = logging.getLogger("monai_efficientq")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never a half-written file)."""
    from .checkpoint import atomic_write

    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


@dataclass
class LayerRecord:
    """One quantized layer.

    Errors are squared output errors on the calibration volume relative to ``‖Y‖²``;
    ``*_weighted`` use the attention map; ``held_out_*`` are measured on the held-out calibration volume
    (``holdout=True``) and chose the layer's solution.
    """

    name: str
    type: str
    shape: list[int]
    weight_bits: int
    act_bits: int | None
    act_signed: bool | None
    rtn_error: float
    error: float
    rtn_error_weighted: float
    error_weighted: float
    best_iteration: int
    solver: str
    seconds: float | None = None
    held_out_rtn_error: float | None = None
    held_out_error: float | None = None
    iterations_run: int = 0
    phase_seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_solution(cls, solution: Any, **layer: Any) -> LayerRecord:
        """The record of a layer's :class:`~monai_efficientq.solver.LayerSolution`: every field of the same name
        (errors, best iteration, solver, iterations run) from ``solution``, except ``seconds``, which is the
        layer's whole time (input quantizer, statistics, solve, forward), not the solve's.

        Args:
            solution: the solver's solution.
            layer: the other fields (``name``, ``type``, ``shape``, bits, ``seconds``, ``phase_seconds``).
        """
        shared = {f.name for f in dataclasses.fields(cls)} & {f.name for f in dataclasses.fields(solution)}
        shared -= {"seconds", *layer}
        return cls(**{name: getattr(solution, name) for name in shared}, **layer)


RUN_METADATA = ("total_seconds", "phase_seconds", "peak_memory_mb", "peak_memory_kind")
LAYER_RUN_METADATA = ("seconds", "phase_seconds")


@dataclass
class QuantizationReport:
    """What a quantization run did and measured.

    Attributes:
        config: the :class:`~monai_efficientq.config.EfficientQConfig` as a dict.
        layers: one :class:`LayerRecord` per quantized layer, in execution order.
        float_layers: layers left in float, each ``{"name", "type", "reason"}``.
        folded_batchnorm: ``[conv_name, bn_name]`` pairs that were folded.
        total_seconds: wall time of the whole run.
        phase_seconds: where that time went, seconds per phase (see :data:`~monai_efficientq.timing.PHASES`;
            ``other`` is the rest: the float layers of the quantizing forward pass, logging).
        peak_memory_mb: peak memory (``peak_memory_kind`` says which: CUDA allocated or process RSS).
        float_bytes: bytes of the float32 state dict.
        packed_bytes: bytes of the tensors the packed checkpoint stores (bit-packed codes, scales, biases and the
            float state; the file :func:`~monai_efficientq.checkpoint.save_quantized` writes adds a few KB of
            zip and pickle framing).
        calibration_shape: shape of the calibration volume.
        calib_agreement_dice: per-class Dice of the quantized vs the float prediction on the calibration volume.
        dice: evaluation Dice, filled by an evaluator (e.g. ``{"float": {...}, "quantized": {...}}``).
        size_budget: the size budget in bytes (``None``: uniform widths); ``packed_bytes`` is at most this.
        allocation: under a size budget, how the widths were chosen (see
            :class:`~monai_efficientq.mixed.WidthAllocation`: the budget, the widths offered, the smallest possible
            size, the summed layer error of the choice and of each uniform width, the seconds it took).
        sensitivity: under a size budget, one entry per layer: its output error and code bytes at each width
            (``bits``, ``errors``, ``code_bytes``), whether its width was fixed (an edge layer) and the ``chosen`` one.
    """

    config: dict[str, Any] = field(default_factory=dict)
    layers: list[LayerRecord] = field(default_factory=list)
    float_layers: list[dict[str, str]] = field(default_factory=list)
    folded_batchnorm: list[list[str]] = field(default_factory=list)
    total_seconds: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)
    peak_memory_mb: float = 0.0
    peak_memory_kind: str = ""
    float_bytes: int = 0
    packed_bytes: int = 0
    calibration_shape: list[int] = field(default_factory=list)
    device: str = ""
    calib_agreement_dice: dict[str, float] = field(default_factory=dict)
    dice: dict[str, Any] = field(default_factory=dict)
    size_budget: int | None = None
    allocation: dict[str, Any] = field(default_factory=dict)
    sensitivity: list[dict[str, Any]] = field(default_factory=list)

    @property
    def compression(self) -> float:
        """Float size over packed size."""
        return self.float_bytes / self.packed_bytes if self.packed_bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["compression"] = self.compression
        return d

    def reproducible_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` without what changes from run to run of the same inputs and settings (times, memory):
        the report stored inside a packed checkpoint, so that such runs write the same bytes."""
        d = self.to_dict()
        for key in RUN_METADATA:
            d.pop(key, None)
        d["layers"] = [{k: v for k, v in rec.items() if k not in LAYER_RUN_METADATA} for rec in d["layers"]]
        d["allocation"] = {k: v for k, v in d["allocation"].items() if k != "seconds"}
        return d

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The report as JSON text; also written (atomically) to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantizationReport:
        d = dict(d)
        d.pop("compression", None)
        d["layers"] = [LayerRecord(**rec) for rec in d.get("layers", [])]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> QuantizationReport:
        """Read a report from JSON text or a JSON file."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            with open(text_or_path, encoding="utf-8") as f:
                text = f.read()
        return cls.from_dict(json.loads(text))

    def to_markdown(self, path: str | os.PathLike | None = None) -> str:
        """The report as Markdown; also written (atomically) to ``path`` if given."""
        lines = ["# EfficientQ quantization report", ""] + self._summary_lines()
        lines += _dice_table(self.dice)
        lines += _phase_table(self.phase_seconds, self.total_seconds)
        lines += _layer_table(self.layers)
        lines += _sensitivity_table(self.sensitivity, self.allocation)
        if self.float_layers:
            lines += ["", "## Left in float", "", "| layer | type | reason |", "|---|---|---|"]
            lines += [f"| `{f['name']}` | {f['type']} | {f['reason']} |" for f in self.float_layers]
        text = "\n".join(lines) + "\n"
        if path is not None:
            atomic_write_text(path, text)
        return text

    def _summary_lines(self) -> list[str]:
        """The bullet list at the top: the settings, the calibration data, time, memory and size."""
        cfg = self.config
        act = cfg.get("act_bits")
        first_last = cfg.get("first_last_bits")
        copies = f" and {cfg['calib_augment']} augmented copies of each" if cfg.get("calib_augment") else ""
        weights = f"W{cfg.get('weight_bits')}"
        if self.size_budget is not None:
            weights = "mixed widths from {" + ", ".join(map(str, self.allocation.get("bits_choices", []))) + "}"
        lines = [
            f"- method: `{cfg.get('method')}`, preset: `{cfg.get('preset')}`, weights {weights}"
            f", activations {'A' + str(act) if act else 'float'}, first/last layers "
            f"{'W' + str(first_last) + ' float input' if first_last else 'as the others'}",
            f"- scale: per {cfg.get('weight_scale')}, grid: {cfg.get('weight_grid')}, ADMM iterations: "
            f"{cfg.get('iterations')}, ρ doubles {cfg.get('rho_schedule')} the solve at every "
            f"{cfg.get('rho_step_every')}th iteration, η factor {cfg.get('eta_factor')}",
            f"- attention: {cfg.get('attention')}, class weights {cfg.get('class_weights')}; activation range fit: "
            f"{cfg.get('act_fit')}; calibration augmentation: {cfg.get('calib_augment') or 'none'}",
            f"- calibration volume: {self.calibration_shape}{copies}, device: {self.device}",
            f"- total time: {self.total_seconds:.1f} s, peak memory: {self.peak_memory_mb:.0f} MB ({self.peak_memory_kind})"
            if self.peak_memory_kind
            else "- time and memory: not stored in a packed checkpoint (they change from run to run); see the JSON "
            "report written beside it",
            f"- size: float {self.float_bytes / 2**20:.2f} MiB, packed {self.packed_bytes / 2**20:.2f} MiB"
            f" ({self.compression:.1f}x smaller)",
        ]
        if self.size_budget is not None:
            lines.append(_budget_line(self.size_budget, self.packed_bytes, self.allocation))
        if self.folded_batchnorm:
            lines.append(f"- folded BatchNorm: {len(self.folded_batchnorm)}")
        if self.calib_agreement_dice:
            agree = ", ".join(f"{k} {v:.4f}" for k, v in self.calib_agreement_dice.items())
            lines.append(f"- Dice of quantized vs float prediction on the calibration volume: {agree}")
        return lines

    def plot_sensitivity(self, path: str | os.PathLike) -> str | None:
        """Draw the per-layer sensitivity of a size-budgeted run (PNG, matplotlib): each layer's output error at
        every width, the chosen width marked, and the bytes each layer takes at its width.

        Args:
            path: the PNG to write.

        Returns:
            ``path``, or ``None`` when matplotlib is not installed (logged; nothing written).

        Raises:
            ValueError: the report has no sensitivity table (the run had no ``size_budget``).
        """
        if not self.sensitivity:
            raise ValueError("this report has no sensitivity table: only a run with a size_budget measures one.")
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            _logger.warning("matplotlib is not installed: no sensitivity plot written (pip install matplotlib).")
            return None
        fig = Figure(figsize=(max(8.0, 0.28 * len(self.sensitivity) + 3), 7.5))
        FigureCanvasAgg(fig)
        _draw_sensitivity(fig, self.sensitivity, self.allocation, self.size_budget, self.packed_bytes)
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
        fig.savefig(os.fspath(path), dpi=110)
        return os.fspath(path)


def _budget_line(budget: int, packed: int, allocation: dict[str, Any]) -> str:
    """The summary line of a size-budgeted run: the budget, the packed file and the smallest possible size."""
    given = allocation.get("size_budget")
    as_given = f" (`{given}`)" if isinstance(given, str) else ""
    line = (f"- size budget: {budget} bytes{as_given}, packed file {packed} bytes ({100 * packed / budget:.1f} % of "
            f"it); the smallest these widths allow: {allocation.get('minimum_bytes')} bytes")
    if allocation.get("lowered_after_solve"):
        line += f"; lowered after the solve to fit: {', '.join(allocation['lowered_after_solve'])}"
    return line


def _sensitivity_table(rows: list[dict[str, Any]], allocation: dict[str, Any]) -> list[str]:
    """The "Width allocation" section: each layer's error and bytes at each width, and the one it got."""
    if not rows:
        return []
    widths = list(allocation.get("bits_choices") or sorted({b for r in rows for b in r["bits"]}))
    head = "| # | layer | weights | " + " | ".join(f"error W{b}" for b in widths) + " | W | bytes |"
    lines = ["", "## Width allocation", "", head, "|---" * (len(widths) + 5) + "|"]
    for i, r in enumerate(rows):
        errors = dict(zip(r["bits"], r["errors"]))
        cells = " | ".join(_fmt_err(errors.get(b)) if b in errors else "" for b in widths)
        chosen_bytes = dict(zip(r["bits"], r["code_bytes"])).get(r["chosen"])
        width = f"{r['chosen']}{' (edge)' if r['fixed'] else ''}"
        lines.append(f"| {i} | `{r['name']}` | {r['numel']} | {cells} | {width} | {chosen_bytes} |")
    uniform = allocation.get("uniform", {})
    lines += ["", "Errors: each layer's `‖q − f‖² / ‖f‖²` (attention-weighted) with round-to-nearest weights at that "
              "width, on its input through the layers before it (those at "
              f"W{allocation.get('carry_bits')}); the widths minimise their sum with the packed file within the "
              "budget. bytes: the layer's bit-packed codes.",
              "", f"Summed layer error of the allocation: {_fmt_err(allocation.get('estimated_error'))}"
              + "".join(f"; uniform W{b}: {_fmt_err(u['error'])} ({u['bytes']} bytes)" for b, u in uniform.items())
              + "."]
    return lines


def _draw_sensitivity(fig: Any, rows: list[dict[str, Any]], allocation: dict[str, Any], budget: int | None,
                      packed: int) -> None:
    """Errors per layer and width (top, log scale, the chosen width circled) and chosen bytes per layer (bottom)."""
    widths = list(allocation.get("bits_choices") or sorted({b for r in rows for b in r["bits"]}))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    index = list(range(len(rows)))
    colors = {b: f"C{i}" for i, b in enumerate(sorted({b for r in rows for b in r["bits"]}))}
    for b in widths:
        pts = [(i, dict(zip(r["bits"], r["errors"]))[b]) for i, r in zip(index, rows) if b in r["bits"]]
        top.plot([p[0] for p in pts], [max(p[1], 1e-12) for p in pts], marker=".", color=colors[b], label=f"W{b}")
    chosen = [(i, dict(zip(r["bits"], r["errors"]))[r["chosen"]]) for i, r in zip(index, rows)]
    top.scatter([c[0] for c in chosen], [max(c[1], 1e-12) for c in chosen], s=90, facecolors="none",
                edgecolors="black", label="chosen", zorder=3)
    top.set_yscale("log")
    top.set_ylabel("layer output error (relative)")
    top.legend(fontsize=8, ncol=len(widths) + 1)
    top.grid(alpha=0.3)
    used = [dict(zip(r["bits"], r["code_bytes"]))[r["chosen"]] / 1024 for r in rows]
    bottom.bar(index, used, color=[colors[r["chosen"]] for r in rows])
    bottom.set_ylabel("code KiB at the chosen width")
    bottom.set_xticks(index)
    bottom.set_xticklabels([r["name"] for r in rows], rotation=90, fontsize=6)
    title = f"size budget {budget} bytes, packed {packed} bytes" if budget else "sensitivity"
    top.set_title(title, fontsize=10)


def _dice_table(dice: dict[str, Any]) -> list[str]:
    """The "Dice" section: one row per model, one column per class."""
    if not dice:
        return []
    cols = _dice_columns(dice)
    lines = ["", "## Dice", "", "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for model, values in dice.items():
        lines.append(f"| {model} | " + " | ".join(_fmt(values.get(c)) for c in cols) + " |")
    return lines


def _layer_table(layers: list[LayerRecord]) -> list[str]:
    """The "Layers" section: bits, errors, the chosen iterate and time of each quantized layer."""
    held = any(r.held_out_error is not None for r in layers)
    head = "| # | layer | type | shape | W | A | RTN error | EfficientQ error |"
    head += " held-out RTN error | held-out error |" if held else ""
    lines = ["", "## Layers", "", head + " best it. | iterations | solver | seconds |", "|---" * (12 + 2 * held) + "|"]
    for i, r in enumerate(layers):
        a = "float" if r.act_bits is None else f"{r.act_bits}{'s' if r.act_signed else 'u'}"
        held_cells = f" {_fmt_err(r.held_out_rtn_error)} | {_fmt_err(r.held_out_error)} |" if held else ""
        lines.append(
            f"| {i} | `{r.name}` | {r.type} | {'x'.join(map(str, r.shape))} | {r.weight_bits} | {a} | "
            f"{r.rtn_error:.4g} | {r.error:.4g} |{held_cells} {r.best_iteration} | {r.iterations_run} | {r.solver} | "
            f"{'-' if r.seconds is None else f'{r.seconds:.2f}'} |"
        )
    lines += ["", "Errors: `‖q − f‖² / ‖f‖²` of the layer's output on the calibration data, with the quantized layers "
              "before it as input (RTN: round to nearest, the baseline). W/A: weight and input-activation bits (`u`: "
              "an unsigned grid, `s`: a signed one where the input has negative values). best it.: the ADMM "
              "iteration kept; iterations: how many ran before the early stop."]
    if held:
        lines += ["", "Held-out errors: on the last calibration volume, which the fit did not see; the layer kept "
                  "the candidate (an ADMM iterate, or round-to-nearest: best it. -1) with the lowest one."]
    return lines


def _phase_table(phases: dict[str, float], total: float) -> list[str]:
    """The "where the time went" section: seconds and share of each phase, with what it holds."""
    if not phases:
        return []
    from .timing import PHASES

    legend = dict(PHASES, other="the rest: the float layers of the quantizing forward pass, logging")
    lines = ["", "## Where the time went", "", "| phase | seconds | share | what |", "|---|---|---|---|"]
    for phase, seconds in phases.items():
        share = 100 * seconds / total if total > 0 else 0.0
        lines.append(f"| {phase} | {seconds:.2f} | {share:.0f} % | {legend.get(phase, '')} |")
    return lines


def _fmt_err(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def _dice_columns(dice: dict[str, Any]) -> list[str]:
    cols: list[str] = []
    for values in dice.values():
        for key in values:
            if key not in cols:
                cols.append(key)
    return cols


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else ("" if value is None else str(value))
