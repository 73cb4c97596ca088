"""Uniform quantization grids, the joint least-squares scale fit, activation quantizers and bit packing.

Every grid here is uniform: ``level(k) = first + step · k`` for integer codes ``k`` in ``[0, 2^bits)``,
multiplied by a fitted scale ``a``. Codes are what the checkpoint stores (bit-packed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "UniformGrid",
    "fit_scale",
    "quantize_rtn",
    "ActQuantizer",
    "pack_codes",
    "unpack_codes",
]


@dataclass(frozen=True)
class UniformGrid:
    """A grid of ``2^bits`` evenly spaced normalised levels.

    Args:
        bits: number of bits (``2^bits`` levels).
        kind: ``"nozero"``: levels evenly on ``[-1, 1]`` (no zero for any bit width, e.g. 2 bits:
            ``{-1, -1/3, 1/3, 1}``); ``"int"``: the integers ``[-2^(b-1), 2^(b-1) - 1]`` (contains zero);
            ``"unsigned"``: evenly on ``[0, 1]``.
    """

    bits: int
    kind: str

    @property
    def num_levels(self) -> int:
        return 2**self.bits

    @property
    def first(self) -> float:
        return {"nozero": -1.0, "int": -float(2 ** (self.bits - 1)), "unsigned": 0.0}[self.kind]

    @property
    def step(self) -> float:
        last = self.num_levels - 1
        return {"nozero": 2.0 / last, "int": 1.0, "unsigned": 1.0 / last}[self.kind]

    @property
    def max_abs(self) -> float:
        return max(abs(self.first), abs(self.first + self.step * (self.num_levels - 1)))

    def codes(self, normalised: torch.Tensor) -> torch.Tensor:
        """Nearest code of each normalised value (``value / scale``), as int64."""
        return self.float_codes(normalised).to(torch.int64)

    def float_codes(self, normalised: torch.Tensor) -> torch.Tensor:
        """Nearest code of each normalised value, as whole numbers in ``normalised``'s dtype (no int copy)."""
        k = torch.round((normalised - self.first) * (1.0 / self.step))
        return k.clamp_(0, self.num_levels - 1)

    def levels(self, codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Normalised level of each code."""
        return codes.to(dtype) * self.step + self.first


def _rows(values: torch.Tensor, per_row: bool) -> torch.Tensor:
    return values.reshape(values.shape[0], -1) if per_row else values.reshape(1, -1)


class _SortedRows:
    """The rows of a ``(rows, n)`` tensor sorted once, with their prefix sums and those of their squares.

    The values of a row that a uniform grid at some scale rounds to one level form a contiguous run of the sorted
    row, so the count, sum and sum of squares of every level's values follow from a bisection at each boundary
    between levels. A step of an alternating least-squares fit then costs a few operations per level instead of
    quantizing every value (:func:`_best_of_starts`, :func:`_fit_affine`).
    """

    def __init__(self, values: torch.Tensor) -> None:
        self.ordered = values.sort(dim=-1).values
        zero = self.ordered.new_zeros(self.ordered.shape[0], 1)
        self.prefix = torch.cat([zero, self.ordered.cumsum(dim=-1)], dim=-1)
        self._prefix_squares: torch.Tensor | None = None

    def runs(
        self, boundaries: torch.Tensor, squares: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The count, sum and (with ``squares``, else ``None``) sum of squares of each run of each row,
        ``(rows, ..., L)`` each, for ascending ``boundaries`` ``(rows, ..., L − 1)`` between the runs; a value equal to
        a boundary is in the run above."""
        if squares and self._prefix_squares is None:
            cumulative = (self.ordered * self.ordered).cumsum(dim=-1)
            self._prefix_squares = torch.cat([cumulative.new_zeros(cumulative.shape[0], 1), cumulative], dim=-1)
        num_rows = boundaries.shape[0]
        inner = torch.searchsorted(self.ordered, boundaries.reshape(num_rows, -1).contiguous())
        inner = inner.reshape(boundaries.shape)
        edge = inner.new_zeros(*inner.shape[:-1], 1)
        bounds = torch.cat([edge, inner, edge + self.ordered.shape[-1]], dim=-1)
        flat = bounds.reshape(num_rows, -1)
        counts = bounds.diff(dim=-1).to(self.ordered.dtype)
        sums = self.prefix.gather(1, flat).reshape(bounds.shape).diff(dim=-1)
        if not squares:
            return counts, sums, None
        return counts, sums, self._prefix_squares.gather(1, flat).reshape(bounds.shape).diff(dim=-1)


def _best_of_sweep(
    v: torch.Tensor, unit: torch.Tensor, grid: UniformGrid, points: int, keep: int,
    sorted_rows: _SortedRows | None = None,
) -> torch.Tensor:
    """The ``keep`` best scales per row among ``points`` evenly spaced in ``(0, 1.5·unit]``: ``(keep, rows, 1)``
    (``sorted_rows``: see :func:`_sweep_errors`)."""
    fracs = torch.linspace(0.05, 1.5, points, dtype=torch.float64, device=v.device)
    err = _sweep_errors(v, fracs.view(-1, 1, 1) * unit, grid, sorted_rows)  # (points, rows, 1)
    idx = err.topk(min(keep, points), dim=0, largest=False).indices
    return fracs[idx] * unit


def _sweep_errors(
    v: torch.Tensor, scales: torch.Tensor, grid: UniformGrid, sorted_rows: _SortedRows | None = None
) -> torch.Tensor:
    """``‖v − a·level(v/a)‖²`` of each row of ``v`` (``(rows, n)``) for every scale ``a`` in ``scales``
    (``(points, rows, 1)``), without quantizing ``v`` once per scale: the two sums the error needs, ``⟨v, l⟩`` and
    ``⟨l, l⟩``, come from the runs of the sorted rows (``sorted_rows``, :class:`_SortedRows` of ``v``, built when
    not given) between the scaled midpoints of the levels."""
    sorted_rows = sorted_rows if sorted_rows is not None else _SortedRows(v)
    levels = grid.levels(torch.arange(grid.num_levels, device=v.device), v.dtype)
    midpoints = (levels[:-1] + levels[1:]) / 2
    counts, sums, _ = sorted_rows.runs(scales.permute(1, 0, 2) * midpoints)  # (rows, points, L)
    vl = (sums * levels).sum(dim=-1).transpose(0, 1).unsqueeze(-1)  # (points, rows, 1)
    ll = (counts * levels * levels).sum(dim=-1).transpose(0, 1).unsqueeze(-1)
    vv = (v * v).sum(dim=-1, keepdim=True)
    return vv - 2 * scales * vl + scales * scales * ll


def fit_scale(
    values: torch.Tensor,
    grid: UniformGrid,
    per_row: bool = False,
    init: torch.Tensor | None = None,
    max_iter: int = 30,
    rtol: float = 1e-5,
    coarse_points: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit scale(s) and codes jointly by alternating least squares, in float64.

    The alternation ``B = round_to_grid(v / a)``, ``a = <B, v> / <B, B>`` never increases the squared
    error but stops in a local optimum, so without ``init`` it runs from several starts at once:
    ``mean|v|`` and the 4 best of a sweep of ``coarse_points`` scales up to 1.5·``max|v|`` over the largest
    level; each start iterates until the relative change of the scales is below ``rtol`` or ``max_iter`` is
    reached, and the best scale seen is returned with its own codes. With ``init`` (a warm start, e.g. the
    previous ADMM iterate's scale) it runs the alternation from there alone until the codes stop changing
    (at most ``max_iter`` steps), which is what the ADMM projection needs each iteration. It never raises on
    non-convergence.

    Args:
        values: the tensor to quantize. With ``per_row`` its first dimension indexes the rows
            (output channels), each with its own scale.
        grid: the normalised grid.
        per_row: one scale per row of ``values`` instead of one for the whole tensor.
        init: a warm-start scale (a scalar or one per row).
        max_iter: iteration cap of the alternation.
        rtol: relative tolerance on the scale change.
        coarse_points: number of scales of the cold-start sweep (default: from 128 for small tensors down to
            16 for large ones, whose error curve over the scale is smooth).

    Returns:
        ``(scale, codes)``: scale of shape ``(rows, 1)`` (float64; 0 for an all-zero row) and int64 codes
        shaped like ``values``.
    """
    shape = values.shape
    v = _rows(values.detach(), per_row).to(torch.float64)
    absmax = v.abs().amax(dim=1, keepdim=True)
    zero_rows = absmax == 0
    safe_max = torch.where(zero_rows, torch.ones_like(absmax), absmax)

    if init is not None:
        init_t = torch.as_tensor(init, dtype=torch.float64, device=v.device).reshape(-1, 1).expand_as(absmax)
        start = torch.where((init_t > 0) & ~zero_rows, init_t, safe_max / grid.max_abs)
        scale, codes, _ = _alternate(v, start, grid, max_iter)
        scale = torch.where(zero_rows, torch.zeros_like(scale), scale)
        return scale, codes.to(torch.int64).reshape(shape)
    sorted_rows = _SortedRows(v)
    starts = [v.abs().mean(dim=1, keepdim=True)]
    points = coarse_points or int(min(128, max(16, 2**22 // max(v.numel(), 1))))
    starts += list(_best_of_sweep(v, safe_max / grid.max_abs, grid, points, keep=4, sorted_rows=sorted_rows))
    scale = torch.stack(starts)  # (starts, rows, 1)
    scale = torch.where(zero_rows | (scale <= 0), torch.ones_like(scale), scale)

    best_scale = _best_of_starts(v, scale, grid, max_iter, rtol, sorted_rows)
    best_scale = torch.where(zero_rows, torch.zeros_like(best_scale), best_scale)
    codes = grid.codes(v / torch.where(zero_rows, torch.ones_like(best_scale), best_scale))
    return best_scale, codes.reshape(shape)


def _codes_and_levels(v: torch.Tensor, scale: torch.Tensor, grid: UniformGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes (whole numbers in ``v``'s dtype) of the grid levels nearest to ``v / scale`` (``scale`` broadcast
    over rows), and those normalised levels (``first + step·code``)."""
    k = v * (1.0 / (scale * grid.step))
    k.sub_(grid.first / grid.step).round_().clamp_(0, grid.num_levels - 1)
    return k, torch.mul(k, grid.step).add_(grid.first)


def _best_of_starts(
    v: torch.Tensor, starts: torch.Tensor, grid: UniformGrid, max_iter: int, rtol: float,
    sorted_rows: _SortedRows | None = None,
) -> torch.Tensor:
    """Run the alternation from every start of every row (``starts``: ``(S, rows, 1)``) and return each row's
    scale with the lowest error seen, ``(rows, 1)``.

    Each (start, row) pair is computed until the pairs still moving (scale moved by more than ``rtol``, relative)
    fall below three quarters of those computed, which then continue alone, or until none moves or ``max_iter``
    updates. The error of a scale ``a`` with levels ``l`` is ``‖v‖² − 2a⟨v, l⟩ + a²⟨l, l⟩``. Both sums come
    from the runs of the sorted rows (``sorted_rows``, :class:`_SortedRows` of ``v``, built when not given): each
    step costs a bisection per level boundary instead of quantizing the values.
    """
    sorted_rows = sorted_rows if sorted_rows is not None else _SortedRows(v)
    levels = grid.levels(torch.arange(grid.num_levels, device=v.device), torch.float64)
    midpoints = (levels[:-1] + levels[1:]) / 2
    vv = (v * v).sum(dim=-1)  # (rows,)
    scale = starts.reshape(starts.shape[0], -1).t().clone()  # (rows, S): pair (row, start)
    best_err = torch.full_like(scale, math.inf)
    best_scale = scale.clone()
    active = torch.ones_like(scale, dtype=torch.bool)  # the pairs computed
    for it in range(max_iter + 1):
        counts, sums, _ = sorted_rows.runs(scale[..., None] * midpoints)  # (rows, S, L)
        vl = (sums * levels).sum(dim=-1)
        ll = (counts * levels * levels).sum(dim=-1)
        err = vv[:, None] - 2 * scale * vl + scale * scale * ll
        better = active & (err < best_err)
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if it == max_iter:
            break
        new_scale = vl / ll.clamp_min(1e-300)
        new_scale = torch.where((ll > 0) & (new_scale > 0), new_scale, scale)
        moving = active & ((new_scale - scale).abs() > rtol * scale)
        scale = torch.where(active, new_scale, scale)
        num_moving = int(moving.sum())
        if num_moving == 0:
            break
        if num_moving < 0.75 * int(active.sum()):  # compact to the pairs still moving
            active = moving
    which = best_err.argmin(dim=1, keepdim=True)
    return best_scale.gather(1, which)


def _alternate(
    v: torch.Tensor, scale: torch.Tensor, grid: UniformGrid, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The alternation of :func:`fit_scale` from one start per row (``v``: ``(rows, n)``, ``scale``: ``(rows, 1)``,
    positive), until the codes stop changing or ``max_iter`` scale updates.

    Both steps (nearest codes for the scale, least-squares scale for the codes) can only lower the squared
    error, so the last pair is the best one seen and needs no bookkeeping: the lean path for warm starts,
    which converge in a few steps.

    Returns:
        ``(scale, codes, levels)`` with the codes (whole numbers in ``v``'s dtype) nearest for that scale and their
        normalised levels.
    """
    codes, levels = _codes_and_levels(v, scale, grid)
    for _ in range(max_iter):
        denom = (levels * levels).sum(dim=-1, keepdim=True)
        new_scale = (levels * v).sum(dim=-1, keepdim=True) / denom.clamp_min(1e-300)
        scale = torch.where((denom > 0) & (new_scale > 0), new_scale, scale)
        new_codes, new_levels = _codes_and_levels(v, scale, grid)
        if torch.equal(new_codes, codes):
            break
        codes, levels = new_codes, new_levels
    return scale, codes, levels


def project_to_grid(
    values: torch.Tensor, grid: UniformGrid, per_row: bool, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The warm-started scale fit of :func:`fit_scale` (``init=scale``) without its checks and int copies: the
    per-iteration projection of ADMM. ``values`` must be float64 with rows first and ``scale`` positive.

    Returns:
        ``(scale, codes, projected)``: the refined scale ``(rows, 1)``, the codes as whole numbers in float64 and
        ``scale · level(codes)`` shaped like ``values``.
    """
    v = _rows(values, per_row)
    scale, codes, levels = _alternate(v, scale.reshape(-1, 1), grid, max_iter=30)
    projected = levels.mul_(scale)  # the levels of the codes, as ``first + step·code``
    return scale, codes.reshape(values.shape), projected.reshape(values.shape)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, grid: UniformGrid, dtype: torch.dtype) -> torch.Tensor:
    """``scale · level(codes)``, with ``scale`` of shape ``(rows, 1)`` broadcast over rows of ``codes``."""
    rows = codes.reshape(scale.shape[0], -1)
    return (scale.to(dtype) * grid.levels(rows, dtype)).reshape(codes.shape)


def quantize_rtn(
    values: torch.Tensor, grid: UniformGrid, per_row: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest quantization with the least-squares scale.

    Returns:
        ``(dequantized values, scale, codes)``.
    """
    scale, codes = fit_scale(values, grid, per_row=per_row)
    return dequantize(codes, scale, grid, values.dtype), scale, codes


#: Values converted at a time by :meth:`ActQuantizer.quantize` and :meth:`ActQuantizer.codes`: the four
#: element-wise passes of one block run while it is in the cache (a whole layer input at a time is memory-bound:
#: about twice slower on one CPU core at 96³), and the float temporary of the codes is 256 KB.
_CODES_BLOCK = 1 << 16


class ActQuantizer(nn.Module):
    """Per-tensor fake quantizer of a layer's input: ``x̂ = offset + step · clamp(round((x - offset)/step))``.

    An unsigned quantizer has ``offset = 0`` (grid ``{0, 1/(L-1), …, 1}·a``); an affine one fits both
    ``offset`` and ``step``. Fit it with :meth:`fit`; its state is two scalar buffers.

    Args:
        bits: bits of the activation codes (2..8).
        signed: affine grid (fits an offset) instead of the unsigned one.
    """

    def __init__(self, bits: int, signed: bool = False) -> None:
        super().__init__()
        self.bits = int(bits)
        self.signed = bool(signed)
        self.register_buffer("step", torch.ones(()))
        self.register_buffer("offset", torch.zeros(()))

    @property
    def num_levels(self) -> int:
        return 1 << self.bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting() or x.requires_grad:
            step = self.step.to(x.dtype)
            offset = self.offset.to(x.dtype)
            k = torch.clamp(torch.round((x - offset) / step), 0, self.num_levels - 1)
            return k * step + offset
        return self.quantize(x)

    @torch.jit.unused
    def quantize(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The forward without autograd, written into ``out`` when given (a buffer reused over many calls: a fresh
        one per call of a layer's whole input costs as much in page faults as the arithmetic)."""
        if out is None:
            out = torch.empty_like(x)
        if x.device.type != "cpu" or not (x.is_contiguous() and out.is_contiguous() and out.shape == x.shape):
            return self._quantize_into(x, out)
        values, result = x.reshape(-1), out.reshape(-1)
        for start in range(0, values.numel(), _CODES_BLOCK):  # the same element-wise operations, block by block
            self._quantize_into(values[start : start + _CODES_BLOCK], result[start : start + _CODES_BLOCK])
        return out

    def _quantize_into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        step = self.step.to(x.dtype)
        if not self.signed:  # an unsigned grid has offset 0
            return torch.div(x, step, out=out).round_().clamp_(0, self.num_levels - 1).mul_(step)
        offset = self.offset.to(x.dtype)
        return torch.sub(x, offset, out=out).div_(step).round_().clamp_(0, self.num_levels - 1).mul_(step).add_(offset)

    @property
    def has_int8_codes(self) -> bool:
        """Whether :meth:`codes` applies: an unsigned grid (zero is code 0, so zero padding stays on the grid) of at
        most 7 bits (codes up to 127)."""
        return not self.signed and self.bits <= 7

    @torch.jit.unused
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes ``k`` of :meth:`quantize` as int8, so that ``quantize(x) == k·step`` exactly (``k`` as
        float32 times the float32 step is the product :meth:`quantize` rounds). Only for :attr:`has_int8_codes`."""
        if not self.has_int8_codes:
            raise ValueError(f"int8 codes need an unsigned grid of at most 7 bits, not {self.extra_repr()}.")
        step = self.step.to(x.dtype)
        values = x.reshape(-1)
        codes = torch.empty(values.shape, dtype=torch.int8, device=x.device)
        block = _CODES_BLOCK  # a small float temporary, not one the size of a layer's whole input
        for start in range(0, values.numel(), block):
            part = torch.div(values[start : start + block], step).round_().clamp_(0, self.num_levels - 1)
            codes[start : start + block] = part
        return codes.reshape(x.shape)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, step={float(self.step):.4g}, offset={float(self.offset):.4g}"

    @torch.no_grad()
    def fit(self, x: torch.Tensor, max_samples: int = 2**20, seed: int = 0, max_iter: int = 50) -> ActQuantizer:
        """Fit ``step`` (and ``offset`` if signed) to ``x`` by alternating least squares in float64.

        Args:
            x: calibration activations (any shape).
            max_samples: fit on at most this many values, drawn with a seeded generator.
            seed: seed of the sub-sampling.
            max_iter: iteration cap of the alternation.
        """
        flat = x.detach().reshape(-1)
        if flat.numel() > max_samples:
            gen = torch.Generator(device="cpu").manual_seed(seed)
            idx = torch.randint(0, flat.numel(), (max_samples,), generator=gen).to(flat.device)
            flat = flat[idx]
        v = flat.to(torch.float64)
        if not self.signed:
            scale, _ = fit_scale(v.clamp_min(0), UniformGrid(self.bits, "unsigned"))
            step = float(scale) / (self.num_levels - 1)
            self.step.fill_(step if step > 0 else 1.0)
            self.offset.zero_()
            return self
        offset, step = _fit_affine(v, self.num_levels, max_iter)
        self.step.fill_(step)
        self.offset.fill_(offset)
        return self


def _fit_affine(v: torch.Tensor, num_levels: int, max_iter: int) -> tuple[float, float]:
    """Least-squares ``(offset, step)`` of ``v ≈ offset + step·k``, best of a few clipping ranges; the sums of each
    step come from the runs of the sorted sample (:class:`_SortedRows`)."""
    last = num_levels - 1
    lo_all, hi_all = float(v.min()), float(v.max())
    if hi_all <= lo_all:
        return lo_all, 1.0
    sample = _SortedRows(v.reshape(1, -1))
    sorted_v, n = sample.ordered[0], v.numel()
    codes = torch.arange(num_levels, dtype=torch.float64, device=v.device)
    sv = float(sample.prefix[0, -1])

    def terms(offset: float, step: float) -> tuple[float, torch.Tensor, torch.Tensor]:
        """The squared error of ``(offset, step)`` with each value at its nearest code, and the runs' counts and
        sums."""
        counts, sums, squares = sample.runs((offset + step * (codes[:-1] + 0.5))[None], squares=True)
        fitted = offset + step * codes
        return float((squares - 2 * fitted * sums + fitted * fitted * counts).sum()), counts, sums

    best = (math.inf, lo_all, (hi_all - lo_all) / last)
    for q in (0.0, 1e-4, 1e-3, 1e-2, 3e-2):
        i_lo = int(q * (n - 1))
        lo, hi = float(sorted_v[i_lo]), float(sorted_v[n - 1 - i_lo])
        step = (hi - lo) / last if hi > lo else (hi_all - lo_all) / last
        offset = lo
        for _ in range(max_iter):
            err, counts, sums = terms(offset, step)
            if err < best[0]:
                best = (err, offset, step)
            # 2x2 normal equations of v = offset + step * k
            sk, skk = float((codes * counts).sum()), float((codes * codes * counts).sum())
            skv = float((codes * sums).sum())
            det = n * skk - sk * sk
            if det <= 0:
                break
            new_offset = (skk * sv - sk * skv) / det
            new_step = (n * skv - sk * sv) / det
            if new_step <= 0:
                break
            moved = abs(new_step - step) / step + abs(new_offset - offset) / (abs(step) * last)
            offset, step = new_offset, new_step
            if moved < 1e-7:
                break
        err = terms(offset, step)[0]
        if err < best[0]:
            best = (err, offset, step)
    return best[1], best[2]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-pack integer codes in ``[0, 2^bits)`` into a flat uint8 tensor (little-endian bit order).

    Args:
        codes: integer tensor of any shape.
        bits: bits per code, 1..8.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} cannot be packed: use 1..8.")
    flat = codes.reshape(-1).to(torch.int64).cpu()
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits: [{int(flat.min())}, {int(flat.max())}].")
    if bits == 8:
        return flat.to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.int64)
    bit_stream = ((flat[:, None] >> shifts) & 1).reshape(-1)
    pad = (-bit_stream.numel()) % 8
    if pad:
        bit_stream = torch.cat([bit_stream, bit_stream.new_zeros(pad)])
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int64)
    return (bit_stream.reshape(-1, 8) * weights).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` codes as int64."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} cannot be unpacked: use 1..8.")
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError("packed codes must be a flat uint8 tensor.")
    needed = math.ceil(numel * bits / 8)
    if packed.numel() != needed:
        raise ValueError(f"{packed.numel()} packed bytes do not hold {numel} codes of {bits} bits ({needed} needed).")
    data = packed.to(torch.int64)
    if bits == 8:
        return data[:numel].clone()
    bit_stream = ((data[:, None] >> torch.arange(8, dtype=torch.int64)) & 1).reshape(-1)[: numel * bits]
    weights = torch.tensor([1 << i for i in range(bits)], dtype=torch.int64)
    return (bit_stream.reshape(numel, bits) * weights).sum(dim=1)
