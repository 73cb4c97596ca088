"""Mixed-precision weights under a size budget: which width each layer gets so that the packed checkpoint fits.

A size-budgeted run (``EfficientQConfig(size_budget=...)``) chooses every inner layer's weight width from
``bits_choices`` before the EfficientQ pass, in three steps:

1. **Sensitivity** (:class:`SensitivityProbe`): one forward pass over the calibration batch in which every
   quantizable layer, when reached, quantizes its input (a least-squares fitted activation quantizer, when
   ``act_bits`` is set) and measures its output error at every width with round-to-nearest weights (the
   least-squares scale fit of :func:`~monai_efficientq.quantizer.fit_scale`): the attention-weighted
   ``‖layer_b(x̃) − Y‖² / ‖Y‖²`` of the paper's layer objective, on the input ``x̃`` that arrives through the
   layers before it, quantized at the width the budget affords on average (the widest uniform width that fits).
   The errors are measured on a regular sub-grid of output voxels (as the activation range choice does).
2. **Allocation** (:func:`choose_widths`): the widths that minimise the summed layer errors with the summed code
   bytes within the budget: a multiple-choice knapsack solved by dynamic programming over the bytes (costs
   rounded up to a unit of at most 1/32768 of the free bytes, so every solution it returns fits), with every
   uniform width that fits as a candidate too, so the allocation's summed error is never above a uniform
   network's of at most the same size.
3. **Exact size** (:class:`PackedSizer`): the packed checkpoint's size depends only on the widths (codes are
   bit-packed at a fixed length; scales, biases and the float state do not change), so it is measured exactly,
   before any weight is solved, by serialising the network with stand-in layers at the chosen widths; while it
   is over the budget (by the zip alignment and pickle framing the byte model leaves out), the widths are chosen
   again with that many bytes less. After the EfficientQ pass the real packed size is checked again
   (:func:`enforce_budget`: a safety net, the two sizes are equal).

Only the codes change size with the width: ``ceil(numel · bits / 8)`` bytes per layer (the layout of
:mod:`~monai_efficientq.checkpoint`). The widths may include 1 bit (the no-zero grid's ``{-a, a}`` per channel),
which lets a budget at or below the uniform 2-bit size buy more bits for the layers that need them.

The sensitivity pass costs about one round-to-nearest pass per width (a sub-sampled forward of each layer and a
warm-started scale fit, :func:`round_to_nearest`): on the bundle SegResNet (64³ crop, one CPU thread) 8-11 % of the
time of the rest of the run. Its errors are round-to-nearest's, not EfficientQ's: a variant with 20 ADMM iterations
per width there chose other widths with the same Dice (within 0.04 point) at about 8 times the cost.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .checkpoint import packed_size, packed_state, payload_digest
from .folding import set_submodule
from .layers import layer_forward, matrix_to_weight, sampled_output_step, subsampled_forward, weight_matrix
from .modules import QuantizedNetInfo, build_quantized
from .quantizer import ActQuantizer, UniformGrid, dequantize, fit_scale

if TYPE_CHECKING:
    from .attention import AttentionMaps
    from .config import EfficientQConfig
    from .report import LayerRecord

__all__ = [
    "LayerSensitivity",
    "WidthAllocation",
    "SensitivityProbe",
    "PackedSizer",
    "code_bytes",
    "choose_widths",
    "round_to_nearest",
    "allocate_widths",
    "enforce_budget",
]

_logger = logging.getLogger("monai_efficientq")

#: The knapsack's byte axis has at most this many steps (its memory: layers x steps bytes).
_MAX_UNITS = 2**15


def code_bytes(numel: int, bits: int) -> int:
    """Bytes of ``numel`` bit-packed codes of ``bits`` bits (as :func:`~monai_efficientq.quantizer.pack_codes`)."""
    return math.ceil(numel * bits / 8)


@dataclass
class LayerSensitivity:
    """One layer's output error at each width and the width it got.

    Attributes:
        name: the layer's name.
        type: its float type (``Conv3d``, ...).
        numel: number of weights.
        fixed: an edge layer whose width is ``first_last_bits``, not chosen.
        bits: the widths measured (``bits_choices``, or the fixed width).
        errors: the attention-weighted relative output error at each width (round to nearest, on the input through
            the layers before it).
        code_bytes: bytes of the packed codes at each width.
        chosen: the width it got.
    """

    name: str
    type: str
    numel: int
    fixed: bool
    bits: list[int]
    errors: list[float]
    code_bytes: list[int]
    chosen: int = 0

    def error_at(self, bits: int) -> float:
        """The measured error at ``bits``."""
        return self.errors[self.bits.index(bits)]

    def bytes_at(self, bits: int) -> int:
        """The code bytes at ``bits``."""
        return self.code_bytes[self.bits.index(bits)]

    def allocation_errors(self) -> list[float]:
        """The errors the allocation uses: non-increasing in the width (a lower error measured at fewer bits is
        taken as the calibration data's noise, so a wider layer never ranks worse)."""
        return list(np.minimum.accumulate(np.asarray(self.errors, dtype=np.float64)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class WidthAllocation:
    """The widths of a size-budgeted run and what they were chosen from.

    Attributes:
        size_budget: the budget as given (bytes, ``"400KiB"``, ``"16x"``).
        budget_bytes: the budget in bytes.
        bits_choices: the widths the inner layers were chosen from.
        carry_bits: the width at which the sensitivity pass passed each layer's output on.
        minimum_bytes: the smallest packed size the widths allow (every inner layer at the lowest width).
        packed_bytes: the packed size of the chosen widths (measured exactly before the EfficientQ pass).
        estimated_error: the summed layer errors of the chosen widths (the allocation's objective).
        uniform: for each width, the packed size (byte model) and summed error of every inner layer at that width.
        lowered_after_solve: layers lowered after the EfficientQ pass because the real file was over the budget.
        seconds: time of the sensitivity pass and the allocation.
        layers: one :class:`LayerSensitivity` per quantized layer, in execution order.
    """

    size_budget: int | str
    budget_bytes: int
    bits_choices: tuple[int, ...]
    carry_bits: int
    minimum_bytes: int
    packed_bytes: int = 0
    estimated_error: float = 0.0
    uniform: dict[str, dict[str, float]] = field(default_factory=dict)
    lowered_after_solve: list[str] = field(default_factory=list)
    seconds: float = 0.0
    layers: list[LayerSensitivity] = field(default_factory=list)

    @property
    def bits(self) -> dict[str, int]:
        """The chosen width of every layer, by name."""
        return {s.name: s.chosen for s in self.layers}

    def summary(self) -> dict[str, Any]:
        """Everything but the per-layer table, as primitives (the report's ``allocation``)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "layers"}
        d["bits_choices"] = list(self.bits_choices)
        return d

    def table(self) -> list[dict[str, Any]]:
        """The per-layer table as primitives (the report's ``sensitivity``)."""
        return [s.to_dict() for s in self.layers]


# --------------------------------------------------------------------------------------------- sensitivity
class _ProbeLayer(nn.Module):
    """Stands in for a float layer during the sensitivity pass: measures it when reached."""

    def __init__(self, name: str, layer: nn.Module, probe: SensitivityProbe) -> None:
        super().__init__()
        self.name = name
        self.layer = layer
        self.probe = probe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.probe.measure(self.name, self.layer, x)


class SensitivityProbe:
    """The sensitivity pass: every layer's output error at each width, on its input through the layers before it.

    Args:
        cfg: the run's settings (``bits_choices``, ``weight_grid``, ``weight_scale``, ``act_mode``,
            ``act_fit_volumes``, ``act_fit_samples``, ``seed``).
        targets: the float output of every layer (read, not consumed).
        attention: the attention maps, or ``None``.
        widths: the widths to measure, by layer (the choices, or an edge layer's fixed width).
        carry: the width whose output each layer passes on.
        act_bits: each layer's input bits (``None``: float input).
        given_volumes: how many of the calibration volumes were given (the rest are augmented copies).
    """

    def __init__(
        self,
        cfg: EfficientQConfig,
        targets: Mapping[str, torch.Tensor],
        attention: AttentionMaps | None,
        widths: Mapping[str, Sequence[int]],
        carry: Mapping[str, int],
        act_bits: Mapping[str, int | None],
        given_volumes: int,
    ) -> None:
        self.cfg = cfg
        self.targets = targets
        self.attention = attention
        self.widths = widths
        self.carry = carry
        self.act_bits = act_bits
        self.given_volumes = given_volumes
        self.results: dict[str, LayerSensitivity] = {}

    @torch.no_grad()
    def run(self, net: nn.Module, x: torch.Tensor, layers: Mapping[str, nn.Module]) -> list[LayerSensitivity]:
        """One forward pass of ``net`` on ``x`` with every layer of ``layers`` measured when reached; the float
        layers are put back afterwards. Returns the measurements in execution order."""
        for name, layer in layers.items():
            set_submodule(net, name, _ProbeLayer(name, layer, self))
        try:
            net(x)
        finally:
            for name, layer in layers.items():
                set_submodule(net, name, layer)
        missing = [name for name in layers if name not in self.results]
        if missing:
            raise RuntimeError(f"the sensitivity pass did not reach layers {missing[:5]}.")
        return list(self.results.values())

    def measure(self, name: str, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Measure ``layer`` at each of its widths on ``x``; return its output at the carried width."""
        cfg = self.cfg
        y = self.targets[name].to(x.device)
        xq = self._quantized_input(x, self.act_bits[name])
        step = sampled_output_step(layer, tuple(y.shape), cfg.act_fit_samples) if y.dim() > 2 else 1
        every = (slice(None),) * 2 + (slice(None, None, step),) * (y.dim() - 2)
        y_s = y[every].double()
        h = self._attention(layer, y)
        h_s = h[every[1:]].to(y.device, torch.float64).unsqueeze(1) if h is not None else None
        bias = layer.bias.detach() if layer.bias is not None else None
        widths = list(self.widths[name])
        errors, weights = [], {}
        for bits in widths:
            weights[bits] = self._rtn_weight(layer, bits)
            out = subsampled_forward(layer, xq, weights[bits], bias, step)
            errors.append(_relative_error(out.double(), y_s, h_s))
        numel = layer.weight.numel()
        self.results[name] = LayerSensitivity(
            name=name, type=type(layer).__name__, numel=numel, fixed=len(widths) == 1 and name not in self.carry,
            bits=widths, errors=errors, code_bytes=[code_bytes(numel, b) for b in widths],
        )
        carried = self.carry.get(name, widths[0])
        return layer_forward(layer, xq, weights[carried], bias)

    def _quantized_input(self, x: torch.Tensor, act_bits: int | None) -> torch.Tensor:
        """``x`` through a least-squares fitted input quantizer (``x`` itself for a float input)."""
        if act_bits is None:
            return x
        cfg = self.cfg
        n = self.given_volumes if cfg.act_fit_volumes == "given" else x.shape[0]
        signed = cfg.act_mode == "auto" and bool((x[:n] < 0).any())
        act = ActQuantizer(act_bits, signed=signed).fit(x[:n], cfg.act_fit_samples, cfg.seed).to(x.device)
        return act(x)

    def _attention(self, layer: nn.Module, y: torch.Tensor) -> torch.Tensor | None:
        if self.attention is None or isinstance(layer, nn.Linear) or y.dim() < 3:
            return None
        return self.attention.for_shape(y.shape[0], y.shape[2:])

    def _rtn_weight(self, layer: nn.Module, bits: int) -> torch.Tensor:
        """The layer's round-to-nearest weight at ``bits``, in its own layout and dtype."""
        w_mat = weight_matrix(layer).detach()
        rows = w_mat.reshape(-1, w_mat.shape[-1]).to(torch.float64)
        q = round_to_nearest(rows, UniformGrid(bits, self.cfg.weight_grid), self.cfg.weight_scale == "channel")[0]
        return matrix_to_weight(layer, q.reshape(w_mat.shape).to(layer.weight.dtype))


def round_to_nearest(
    rows: torch.Tensor, grid: UniformGrid, per_channel: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest with the least-squares scale, fitted from three warm starts (``mean|v|``, ``max|v|`` and
    half of it over the largest level) and the best kept per row: the alternation of
    :func:`~monai_efficientq.quantizer.fit_scale` without its sweep, several times faster and on the bundle
    SegResNet within 1 % of its weight error at 2 to 8 bits.

    Args:
        rows: float64 weights, one row per output channel.
        grid: the weight grid.
        per_channel: one scale per row (else one for all).

    Returns:
        ``(dequantized rows, scale (rows or 1, 1), codes)``.
    """
    v = rows if per_channel else rows.reshape(1, -1)
    top = v.abs().amax(dim=1, keepdim=True) / grid.max_abs
    best: tuple[torch.Tensor, ...] | None = None
    for start in (v.abs().mean(dim=1, keepdim=True), top, top / 2):
        scale, codes = fit_scale(v, grid, per_row=True, init=start)
        q = dequantize(codes, scale, grid, torch.float64)
        err = (q - v).pow(2).sum(dim=1, keepdim=True)
        if best is None:
            best = (q, scale, codes, err)
        else:
            better = err < best[3]
            best = (torch.where(better, q, best[0]), torch.where(better, scale, best[1]),
                    torch.where(better, codes, best[2]), torch.minimum(err, best[3]))
    q, scale, codes, _ = best
    return q.reshape(rows.shape), scale, codes.reshape(rows.shape)


def _relative_error(out: torch.Tensor, y: torch.Tensor, h: torch.Tensor | None) -> float:
    """``Σ h·(out − y)² / Σ h·y²`` (``h``: per-voxel weights broadcast over channels, or none)."""
    e2, y2 = (out - y).pow(2), y.pow(2)
    if h is not None:
        e2, y2 = e2 * h, y2 * h
    return float(e2.sum() / y2.sum().clamp_min(1e-300))


# --------------------------------------------------------------------------------------------- exact size
class PackedSizer:
    """The exact size of the packed checkpoint for given widths, before any weight is solved.

    The packed size depends on the widths only (codes are bit-packed at a fixed length per width; scales,
    biases, activation quantizers and the float state have fixed sizes), so a network with stand-in quantized
    layers (zero codes, unit scales) at those widths serialises to the same number of bytes as the solved one.

    Args:
        net: the float network (BatchNorm folded), its layers swapped for stand-ins during a measurement only.
        layers: the float layers that will be quantized, by name.
        act_bits: each layer's input bits (``None``: float input).
        cfg: the run's settings (grid and scale kind).
        info: what the quantized network will carry (folded BatchNorms, the config), stored in the checkpoint.
    """

    def __init__(
        self,
        net: nn.Module,
        layers: Mapping[str, nn.Module],
        act_bits: Mapping[str, int | None],
        cfg: EfficientQConfig,
        info: QuantizedNetInfo,
    ) -> None:
        self.net = net
        self.layers = layers
        self.act_bits = act_bits
        self.cfg = cfg
        self.info = info

    @torch.no_grad()
    def __call__(self, widths: Mapping[str, int]) -> int:
        """Bytes of :func:`~monai_efficientq.checkpoint.packed_size` with every layer at ``widths[name]``."""
        try:
            for name, layer in self.layers.items():
                set_submodule(self.net, name, self._stand_in(layer, widths[name], self.act_bits[name]))
            state = packed_state(self.net)
        finally:
            for name, layer in self.layers.items():
                set_submodule(self.net, name, layer)
        state["folded_batchnorm"] = [list(p) for p in self.info.folded_batchnorm]  # what the network will carry
        state["config"] = dict(self.info.config)
        state["payload_sha256"] = payload_digest(state)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.tell()

    def _stand_in(self, layer: nn.Module, bits: int, act_bits: int | None) -> nn.Module:
        shape = weight_matrix(layer).shape
        per_channel = self.cfg.weight_scale == "channel"
        scale = torch.ones(shape[0] * shape[1] if per_channel else 1, 1)
        act = ActQuantizer(act_bits) if act_bits is not None else None
        bias = layer.bias.detach() if layer.bias is not None else None
        codes = torch.zeros(shape, dtype=torch.int64)
        return build_quantized(layer, codes, scale, bias, bits, self.cfg.weight_grid, per_channel, act)


# --------------------------------------------------------------------------------------------- allocation
def choose_widths(
    costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], capacity: int, max_units: int = _MAX_UNITS
) -> list[int]:
    """The option of each item that minimises the summed error with the summed cost at most ``capacity``
    (multiple-choice knapsack, dynamic programming over the cost).

    Costs are rounded up to a unit of ``ceil(capacity / max_units)`` bytes, so the choice always fits; option 0
    of every item must cost 0 (the lowest width, counted in the fixed part). Among options of equal summed error
    the later (wider) one is kept.

    Args:
        costs: per item, the extra bytes of each option over option 0.
        errors: per item, the error of each option.
        capacity: the bytes available for the extras.
        max_units: the most steps of the cost axis.

    Returns:
        the chosen option index of every item.
    """
    if any(c[0] != 0 for c in costs):
        raise ValueError("option 0 of every item must cost nothing.")
    unit = max(1, math.ceil(capacity / max_units)) if capacity > 0 else 1
    cap = max(capacity, 0) // unit
    best = np.zeros(cap + 1)  # the lowest summed error of the items so far with cost <= c units
    picks = np.zeros((len(costs), cap + 1), dtype=np.int8)
    units = [[math.ceil(c / unit) for c in item] for item in costs]
    for i, (item_units, item_errors) in enumerate(zip(units, errors)):
        new = np.full(cap + 1, np.inf)
        for j in reversed(range(len(item_units))):  # wider first: a narrower option must be strictly better
            w = item_units[j]
            if w > cap:
                continue
            candidate = np.full(cap + 1, np.inf)
            candidate[w:] = best[: cap + 1 - w] + item_errors[j]
            better = candidate < new
            new[better] = candidate[better]
            picks[i, better] = j
        best = new
    chosen, c = [0] * len(costs), cap
    for i in reversed(range(len(costs))):
        chosen[i] = int(picks[i, c])
        c -= units[i][chosen[i]]
    return chosen


def _lowering_step(layers: Sequence[LayerSensitivity], choices: Sequence[int]) -> LayerSensitivity | None:
    """The chosen layer whose next lower width raises its error least per byte saved (``None``: all lowest)."""
    best, best_rate = None, math.inf
    for s in layers:
        if s.fixed or s.chosen == choices[0]:
            continue
        errors = dict(zip(s.bits, s.allocation_errors()))
        lower = choices[choices.index(s.chosen) - 1]
        saved = s.bytes_at(s.chosen) - s.bytes_at(lower)
        rate = (errors[lower] - errors[s.chosen]) / max(saved, 1)
        if saved > 0 and rate < best_rate:
            best, best_rate = s, rate
    return best


def _summed_error(layers: Sequence[LayerSensitivity], widths: Mapping[str, int]) -> float:
    return float(sum(dict(zip(s.bits, s.allocation_errors()))[widths[s.name]] for s in layers))


def allocate_widths(
    net: nn.Module,
    x: torch.Tensor,
    layers: Mapping[str, nn.Module],
    targets: Mapping[str, torch.Tensor],
    attention: AttentionMaps | None,
    edges: set[str] | None,
    cfg: EfficientQConfig,
    float_bytes: int,
    info: QuantizedNetInfo,
    given_volumes: int = 1,
    log: logging.Logger | None = None,
) -> WidthAllocation:
    """Choose every layer's weight width so that the packed checkpoint fits ``cfg.size_budget``.

    Args:
        net: the float network (BatchNorm folded).
        x: the calibration batch (with its augmented copies).
        layers: the layers to quantize, by name, in execution order.
        targets: their float outputs on ``x``.
        attention: the attention maps, or ``None``.
        edges: the layers that keep ``cfg.first_last_bits`` (``None``: none).
        cfg: the run's settings.
        float_bytes: the float network's size (a ratio budget such as ``"16x"`` refers to it).
        info: what the quantized network will carry (for its exact size).
        given_volumes: how many calibration volumes were given (the rest are augmented copies).
        log: where the allocation is logged.

    Returns:
        the allocation; :attr:`WidthAllocation.bits` are the widths to quantize with.

    Raises:
        ValueError: a budget below the smallest packed size the widths allow (the message gives that size).
    """
    from .config import parse_size_budget

    log = log or _logger
    budget = parse_size_budget(cfg.size_budget, float_bytes)
    choices = tuple(cfg.bits_choices)
    fixed = {n: cfg.first_last_bits for n in layers if edges and n in edges and cfg.first_last_bits is not None}
    act_bits = {n: (None if n in fixed else cfg.act_bits) for n in layers}
    sizer = PackedSizer(net, layers, act_bits, cfg, info)
    lowest = {n: fixed.get(n, choices[0]) for n in layers}
    minimum = sizer(lowest)
    if budget < minimum:
        hint = "allow fewer bits (bits_choices, first_last_bits)"
        if choices[0] > 1 and cfg.weight_grid == "nozero":
            one_bit = sizer({n: fixed.get(n, 1) for n in layers})
            hint = f"allow 1-bit layers (bits_choices=(1, ...): about {one_bit} bytes at least)"
        raise ValueError(
            f"size_budget={cfg.size_budget!r} ({budget} bytes) is below the smallest packed checkpoint these widths "
            f"allow: {minimum} bytes ({minimum / 2**10:.1f} KiB; every inner layer at {choices[0]} bits"
            + (f", the first/last layers at {cfg.first_last_bits}" if fixed else "")
            + f"). Give a budget of at least that, or {hint}."
        )
    numel = {n: m.weight.numel() for n, m in layers.items()}
    base = minimum - sum(code_bytes(numel[n], b) for n, b in lowest.items())  # everything but the codes

    def estimate(widths: Mapping[str, int]) -> int:
        return base + sum(code_bytes(numel[n], b) for n, b in widths.items())

    uniform = {b: {n: fixed.get(n, b) for n in layers} for b in choices}
    affordable = [b for b in choices if estimate(uniform[b]) <= budget]
    carry = affordable[-1] if affordable else choices[0]
    widths = {n: ([fixed[n]] if n in fixed else list(choices)) for n in layers}
    probe = SensitivityProbe(cfg, targets, attention, widths, {n: carry for n in layers if n not in fixed}, act_bits,
                             given_volumes)
    table = probe.run(net, x, layers)
    capacity = budget - minimum
    while True:  # the byte model leaves out the zip and pickle framing: choose again with less room while over
        chosen = _best_widths(table, choices, capacity, uniform, estimate, minimum + capacity)
        size = sizer(chosen)
        if size <= budget or capacity == 0:
            break
        capacity = max(capacity - (size - budget), 0)
    for s in table:
        s.chosen = chosen[s.name]
    allocation = WidthAllocation(
        size_budget=cfg.size_budget, budget_bytes=budget, bits_choices=choices, carry_bits=carry,
        minimum_bytes=minimum, packed_bytes=size, estimated_error=_summed_error(table, chosen),
        uniform={str(b): {"bytes": estimate(uniform[b]), "error": _summed_error(table, uniform[b])} for b in choices},
        layers=table,
    )
    counts = {b: sum(1 for s in table if not s.fixed and s.chosen == b) for b in choices}
    log.info(
        "Size budget %s (%d bytes): widths %s, packed %d bytes (at least %d possible), summed layer error %.4g.",
        cfg.size_budget, budget, ", ".join(f"{n} x W{b}" for b, n in counts.items() if n), size, minimum,
        allocation.estimated_error,
    )
    return allocation


def _best_widths(
    table: Sequence[LayerSensitivity], choices: tuple[int, ...], capacity: int,
    uniform: Mapping[int, Mapping[str, int]], estimate: Callable[[Mapping[str, int]], int], limit: int,
) -> dict[str, int]:
    """The knapsack's widths for ``capacity`` extra code bytes, or a uniform width whose estimated size is within
    ``limit`` with a lower summed error (the knapsack's rounding of the costs can leave one out)."""
    free_layers = [s for s in table if not s.fixed]
    costs = [[s.bytes_at(b) - s.bytes_at(choices[0]) for b in choices] for s in free_layers]
    errors = [s.allocation_errors() for s in free_layers]
    picks = choose_widths(costs, errors, capacity)
    chosen = {s.name: s.bits[0] for s in table}  # the fixed layers' width
    chosen.update({s.name: choices[j] for s, j in zip(free_layers, picks)})
    for widths in uniform.values():
        if estimate(widths) <= limit and _summed_error(table, widths) < _summed_error(table, chosen):
            chosen = dict(widths)
    return chosen


# --------------------------------------------------------------------------------------------- after the solve
@torch.no_grad()
def enforce_budget(
    net: nn.Module,
    layers: Mapping[str, nn.Module],
    allocation: WidthAllocation,
    cfg: EfficientQConfig,
    records: Sequence[LayerRecord],
    log: logging.Logger | None = None,
) -> int:
    """Check the solved network's real packed size against the budget; while it is over, requantize the layer whose
    error rises least per byte saved one width down (round to nearest from its float weights, keeping its input
    quantizer). The stand-in measurement makes this a safety net: the sizes agree.

    Args:
        net: the quantized network (changed in place when over).
        layers: the float layers by name.
        allocation: the allocation it was quantized with (updated: widths, ``packed_bytes``,
            ``lowered_after_solve``).
        cfg: the run's settings.
        records: the report's layer records (the lowered ones are updated).
        log: where a lowering is logged.

    Returns:
        the packed size, at most the budget.
    """
    log = log or _logger
    size = packed_size(net)
    by_name = {r.name: r for r in records}
    choices = tuple(allocation.bits_choices)
    while size > allocation.budget_bytes:
        step = _lowering_step(allocation.layers, choices)
        if step is None:
            raise RuntimeError(f"the packed checkpoint ({size} bytes) is over the budget ({allocation.budget_bytes} "
                               f"bytes) with every layer at its lowest width.")
        step.chosen = choices[choices.index(step.chosen) - 1]
        _requantize(net, step.name, layers[step.name], step.chosen, cfg)
        allocation.lowered_after_solve.append(step.name)
        if step.name in by_name:
            by_name[step.name].weight_bits = step.chosen
        log.warning("Packed size %d bytes over the budget %d: %s lowered to %d bits (round to nearest).", size,
                    allocation.budget_bytes, step.name, step.chosen)
        size = packed_size(net)
    allocation.packed_bytes = size
    allocation.estimated_error = _summed_error(allocation.layers, allocation.bits)
    return size


def _requantize(net: nn.Module, name: str, layer: nn.Module, bits: int, cfg: EfficientQConfig) -> None:
    """Replace the quantized layer ``name`` by ``layer``'s round-to-nearest weights at ``bits`` (same input
    quantizer and bias)."""
    current = net.get_submodule(name)
    w_mat = weight_matrix(layer).detach().to(torch.float64)
    per_channel = cfg.weight_scale == "channel"
    rows = w_mat.reshape(-1, w_mat.shape[-1])
    _, scale, codes = round_to_nearest(rows, UniformGrid(bits, cfg.weight_grid), per_channel)
    act = getattr(current, "act_quant", None)
    bias = current.bias.detach() if current.bias is not None else None
    q = build_quantized(layer, codes.reshape(w_mat.shape), scale.to(torch.float32), bias, bits, cfg.weight_grid,
                        per_channel, act)
    set_submodule(net, name, q)
