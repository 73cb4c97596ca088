"""The output errors that rank ADMM iterates, kept up to date where their codes change.

Every ADMM iteration of :class:`~monai_efficientq.solver.LayerSolver` gives a candidate ``[G b]`` with
``G = diag(a)·L`` (``L``: the normalised grid levels of its codes, ``a``: one scale per row or one in all) and a float
bias ``b``, ranked by its squared output error ``‖[G b]·X − Y‖²_H``. Evaluated directly that is a product as costly
as the V-step (``G·A`` over a ``K×K`` Gram matrix, or ``G·X`` over the columns). Between two iterations only a few
codes change (well under 1 % on average once ADMM has started: the grid projection moves little), so
the rankers here keep ``L·A`` (or ``L·X``) and add ``δ·A[j]`` for each changed level ``δ`` at position ``j``; the
scale and the bias enter in ``O(rows·K)`` (or ``O(rows·P)``) per iteration. The kept product is recomputed in full
when many codes changed and every :data:`REFRESH_EVERY` updates, so rounding cannot build up.
"""

from __future__ import annotations

import torch

from .quantizer import UniformGrid

__all__ = ["GramRanker", "ColumnRanker", "DIRECT_BELOW", "REFRESH_EVERY"]

#: Updates of the kept product between two full recomputations.
REFRESH_EVERY = 64

#: Below this many multiply-adds (levels × columns of ``A``, or × stored columns) the product is recomputed for every
#: candidate: for small layers that is cheaper than finding and applying the changes.
DIRECT_BELOW = 1 << 24

#: A candidate with more than this fraction of its levels changed gets the product recomputed in full.
_FULL_FRACTION = 1 / 16


class _LevelTracker:
    """The levels ``L`` (``(groups, rows, K)``) of the last candidate and the positions and changes of the next one."""

    def __init__(self) -> None:
        self.levels: torch.Tensor | None = None
        self.updates = 0

    def changes(self, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(positions (n, 3), changes (n,))`` from the last levels to ``levels``, or ``None`` when the kept
        product must be recomputed in full (the first candidate, another shape, many changes, or a refresh due)."""
        previous = self.levels
        self.levels = levels
        if previous is None or previous.shape != levels.shape or self.updates >= REFRESH_EVERY:
            self.updates = 0
            return None
        diff = levels - previous
        positions = diff.nonzero()
        if positions.shape[0] > _FULL_FRACTION * levels.numel():
            self.updates = 0
            return None
        self.updates += 1
        return positions, diff[positions[:, 0], positions[:, 1], positions[:, 2]]


def _row_scale(scale: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The scale as ``(groups, rows, 1)``: one per row (``(groups·rows, 1)``) or one in all (``(1, 1)``)."""
    if scale.numel() == 1:
        return scale.reshape(1, 1, 1).to(levels.dtype)
    return scale.reshape(levels.shape[0], levels.shape[1], 1).to(levels.dtype)


def _levels(codes: torch.Tensor, grid: UniformGrid, dtype: torch.dtype) -> torch.Tensor:
    """The normalised levels ``first + step·code`` of ``codes`` in ``dtype`` (as the grid projection forms them)."""
    return codes.to(dtype) * grid.step + grid.first


def _with_bias(weight: torch.Tensor, bias: torch.Tensor | None, has_bias: bool) -> torch.Tensor:
    """``[W b]`` (``W`` alone without a bias)."""
    return torch.cat([weight, bias.to(weight.dtype).unsqueeze(-1)], dim=-1) if has_bias and bias is not None else weight


def _squared_sum(residual: torch.Tensor, h: torch.Tensor | None) -> float:
    """``Σ H·r²`` (``h=None``: all ones), summed in float64; ``residual`` is overwritten."""
    e2 = residual.pow_(2)
    return float((e2 * h).sum(dtype=torch.float64) if h is not None else e2.sum(dtype=torch.float64))


def _same_chunks(kept: list[torch.Tensor], columns: list) -> bool:
    """Whether ``kept`` are the ``X`` of the stored ``(X, Y, H)`` chunks ``columns``, the same objects in order (a
    join of the chunks makes new ones)."""
    return len(kept) == len(columns) and all(c is x for c, (x, _, _) in zip(kept, columns))


def _add_rows(product: torch.Tensor, positions: torch.Tensor, changes: torch.Tensor, source: torch.Tensor) -> None:
    """``product[g, r] += δ · source[g, j]`` for each changed level ``δ`` at ``(g, r, j)`` (in place), as the product
    of the sparse changes with ``source`` (gathering the rows first is several times slower on the CPU)."""
    if positions.shape[0] == 0:
        return
    for group in range(product.shape[0]):  # one for all but grouped convolutions
        mine = positions[:, 0] == group if product.shape[0] > 1 else slice(None)
        # nonzero() lists the positions in row-major order, unique: already coalesced
        delta = torch.sparse_coo_tensor(
            positions[mine, 1:].t(), changes[mine].to(source.dtype), (product.shape[1], source.shape[1]),
            is_coalesced=True, check_invariants=False,
        )
        product[group].add_(torch.sparse.mm(delta, source[group]))


class GramRanker:
    """``‖[G b]·X − Y‖²_H`` from Gram statistics ``A = X·H·Xᵀ`` (``(groups, K1, K1)``), ``B = Y·H·Xᵀ`` and
    ``yy = Σ H·Y²``, keeping ``L·A`` over the weight rows of ``A`` (all its columns).

    Args:
        terms: an object with the Gram statistics as attributes ``A``, ``B`` and ``yy`` (read at each call: they are
            complete before the first candidate is ranked).
        has_bias: the last row and column of ``A`` belong to the bias.
        float32_small: below :data:`DIRECT_BELOW`, compute the quadratic term's product in float32 (half the time;
            its rounding, about 1e-7 of ``‖Y‖²``, is far below the differences between 2-3-bit iterates that matter).
    """

    def __init__(self, terms, grid: UniformGrid, has_bias: bool, float32_small: bool = False) -> None:
        self.terms = terms
        self.grid = grid
        self.has_bias = has_bias
        self.float32_small = float32_small
        self._tracker = _LevelTracker()
        self._product: torch.Tensor | None = None  # L·A[:, :K, :]
        self._a32: torch.Tensor | None = None  # A in float32, for float32_small

    def error(
        self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, wb: torch.Tensor | None = None
    ) -> float:
        """The squared output error of ``[diag(scale)·L, bias]``, ``L`` the normalised levels of ``codes``.

        Args:
            codes: the candidate's codes on ``grid``, ``(groups, rows, K)`` (whole numbers, any dtype).
            scale: its scale, ``(groups·rows, 1)`` or ``(1, 1)``.
            bias: its bias ``(groups, rows)``, or ``None`` without a bias.
            wb: the same candidate as ``[W b]``, if at hand (small layers use it instead of forming it).
        """
        a, b = self.terms.A, self.terms.B
        k = codes.shape[-1]
        if codes.numel() * a.shape[-1] < DIRECT_BELOW:  # a small product: cheaper than any bookkeeping
            if wb is None:
                levels = _levels(codes, self.grid, a.dtype)
                wb = _with_bias(levels * _row_scale(scale, levels), bias, self.has_bias)
            return self._direct_error(wb)
        levels = _levels(codes, self.grid, a.dtype)
        weight_rows = a[..., :k, :]
        update = self._tracker.changes(levels)
        if update is None or self._product is None:
            self._product = levels @ weight_rows
        else:
            _add_rows(self._product, *update, weight_rows)
        s = _row_scale(scale, levels).squeeze(-1)
        quad = (self._product[..., :k] * levels).sum(-1)  # (groups, rows): L·A·Lᵀ per row
        lin = (levels * b[..., :k]).sum(-1)
        per_row = s * (s * quad - 2 * lin)
        if self.has_bias and bias is not None:
            bias = bias.to(a.dtype)
            cross = self._product[..., k]  # L·A[:K, bias]
            per_row += bias * (2 * s * cross + bias * a[..., k, k].unsqueeze(-1) - 2 * b[..., k])
        return float(per_row.sum(dtype=torch.float64)) + self.terms.yy

    def _direct_error(self, wb: torch.Tensor) -> float:
        a, b = self.terms.A, self.terms.B
        if self.float32_small:
            if self._a32 is None:
                self._a32 = a.to(torch.float32)
            w32 = wb.to(torch.float32)
            quad = float(((w32 @ self._a32) * w32).sum(dtype=torch.float64))
        else:
            quad = float(((wb @ a) * wb).sum())
        return quad - 2 * float((wb * b).sum()) + self.terms.yy


class ColumnRanker:
    """``‖[G b]·X − Y‖²_H`` over stored columns ``(X, Y, H)`` (``X``: ``(groups, K1, P)`` with the bias's ones row
    last), keeping ``L·X`` of each stored chunk of columns.

    Args:
        terms: an object whose ``columns`` attribute lists the stored ``(X, Y, H)`` chunks (read at each call: the
            solver joins them into one once its V-step starts, and the kept products follow).
        has_bias: the last row of ``X`` belongs to the bias.
        weighted: weight the squared errors by the stored ``H`` (``False``: all ones).
        float32_small: below :data:`DIRECT_BELOW`, compute the outputs in float32 (as :class:`GramRanker`).
    """

    def __init__(
        self, terms, grid: UniformGrid, has_bias: bool, weighted: bool = True, float32_small: bool = False
    ) -> None:
        self.terms = terms
        self.grid = grid
        self.has_bias = has_bias
        self.weighted = weighted
        self.float32_small = float32_small
        self._columns32: tuple[list, list] | None = None  # (the stored chunks, their float32 copies)
        self._tracker = _LevelTracker()
        self._products: list[torch.Tensor] = []  # L·X of each chunk over the weight rows
        self._chunks: list[torch.Tensor] = []  # the X they were computed from (identity, to notice a join)

    def error(
        self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, wb: torch.Tensor | None = None
    ) -> float:
        """The squared output error of ``[diag(scale)·L, bias]`` (arguments as :meth:`GramRanker.error`)."""
        columns = self.terms.columns
        k = codes.shape[-1]
        dtype = columns[0][0].dtype
        if codes.numel() * sum(x.shape[-1] for x, _, _ in columns) < DIRECT_BELOW:
            if wb is None:
                levels = _levels(codes, self.grid, dtype)
                wb = _with_bias(levels * _row_scale(scale, levels), bias, self.has_bias)
            if self.float32_small:
                columns, wb = self._float32(columns), wb.to(torch.float32)
            return sum(_squared_sum(wb @ x - y, h if self.weighted else None) for x, y, h in columns)
        levels = _levels(codes, self.grid, dtype)
        update = self._tracker.changes(levels)
        if update is None or not _same_chunks(self._chunks, columns):
            self._products = [levels @ x[:, :k] for x, _, _ in columns]
            self._chunks = [x for x, _, _ in columns]
        else:
            for product, (x, _, _) in zip(self._products, columns):
                _add_rows(product, *update, x[:, :k])
        s = _row_scale(scale, levels)
        total = 0.0
        for product, (x, y, h) in zip(self._products, columns):
            out = product * s
            if self.has_bias and bias is not None:
                out.addcmul_(bias.to(out.dtype).unsqueeze(-1), x[:, k : k + 1])
            total += _squared_sum(out.sub_(y), h if self.weighted else None)
        return total

    def _float32(self, columns: list) -> list:
        """Float32 copies of the stored chunks (made again if the chunks changed)."""
        if self._columns32 is None or not _same_chunks(self._columns32[0], columns):
            f32 = torch.float32
            copies = [(x.to(f32), y.to(f32), h.to(f32) if h is not None else None) for x, y, h in columns]
            self._columns32 = ([x for x, _, _ in columns], copies)
        return self._columns32[1]
