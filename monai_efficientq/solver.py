"""The per-layer EfficientQ problem, solved by ADMM.

For one layer with float weights ``W0`` (``(groups, C_out/groups, K)``) and bias ``b0``, quantized input
patches ``Xq`` (with a row of ones for the bias), per-voxel attention ``H`` and float target ``Y``::

    minimise over [W b], W on the grid:  ‖([W b]·Xq − Y)·H^½‖² + (η/2)·‖[W b] − [W0 b0]‖²

(Zhang & Chung, Medical Image Analysis 97, 2024: the layer-wise reconstruction with attention, solved by ADMM.)
:class:`LayerSolver` streams ``Xq``/``Y`` in chunk by chunk into the statistics of one solver strategy, chosen
once per layer: the Gram matrices ``A = Xq·H·Xqᵀ`` and ``B = Y·H·Xqᵀ`` (Cholesky, or the plain solve used
as a reference), or, when the output has fewer voxels than unknowns, the ``Xq``/``Y`` columns themselves
(Woodbury). Either answers the same questions: the output errors of a candidate ``[W b]``, ``‖Y‖²``, ``B`` and
the V-step ``R ↦ R·(2A + ρD + ηI)⁻¹``. The ADMM loop then runs once on them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
import torch

from .config import EfficientQConfig
from .layers import squared_error_sums
from .quantizer import UniformGrid, dequantize, fit_scale, project_to_grid
from .ranking import ColumnRanker, GramRanker
from .timing import PhaseTimer

__all__ = ["LayerSolver", "LayerSolution", "SolverSettings"]

logger = logging.getLogger(__name__)

#: An iterate that lowers the best error by less than this fraction does not reset the early-stop patience.
_MIN_IMPROVEMENT = 1e-4

#: Columns of one int8 Gram product whose int32 sums cannot overflow: 2**17 · 127² < 2**31 (codes in [-127, 127];
#: the bias's row of ones sums to at most the column count).
CODE_GRAM_MAX_COLUMNS = 2**17

#: Fewer columns than this do not go to ``torch._int_mm``: on the CPU (torch 2.13) it returns wrong sums for a
#: single column.
_INT_MM_MIN_COLUMNS = 8

#: At most this many distinct attention weights in a chunk of codes: each but the most frequent one gets its own
#: exact integer Gram product of its gathered columns.
CODE_GRAM_MAX_WEIGHTS = 16

#: Bytes of the float block into which a chunk of codes is converted, block by block, for ``B = Y·Xᵀ``.
_DEQUANTIZED_BLOCK_BYTES = 16 * 2**20


@dataclass
class SolverSettings:
    """The settings of :class:`~monai_efficientq.config.EfficientQConfig` that the ADMM of one layer reads
    (same names, same defaults as the default preset; :meth:`from_config` takes them from a config), plus
    ``record_history``: keep every iterate in :attr:`LayerSolution.history`."""

    iterations: int = 200
    rho_step_every: int = 50
    rho_schedule: str = "before"
    rho_factor: float = 10.0
    eta_factor: float = 1.0
    rho_cap_factor: float = 1000.0
    best_iterate_error: str = "weighted"
    rtn_candidate: bool = True
    solver: str = "auto"
    method: str = "efficientq"
    patience: int | None = 60
    record_history: bool = False

    @classmethod
    def from_config(cls, config: EfficientQConfig, record_history: bool = False) -> SolverSettings:
        """The settings of the same name of ``config`` (an :class:`~monai_efficientq.config.EfficientQConfig`).

        Args:
            config: the run's configuration (presets resolved).
            record_history: keep every iterate.
        """
        names = [f.name for f in dataclasses.fields(cls) if f.name != "record_history"]
        return cls(**{name: getattr(config, name) for name in names}, record_history=record_history)


@dataclass
class LayerSolution:
    """What the solver found for one layer.

    ``codes`` (int64, ``(groups, C_out/groups, K)``) and ``scale`` (``(rows, 1)``) belong to the same
    iterate; ``weight`` is their dequantized product in the same layout; ``bias`` is float.
    Errors are squared output errors on the calibration data relative to ``‖Y‖²`` (weighted by the
    attention map, and unweighted). The unweighted ones come from the Gram statistics only when those were
    accumulated (unweighted best-iterate selection, or no attention); otherwise they are ``nan`` and the
    caller measures them (the network driver does, by a direct forward of the layer). With held-out columns,
    ``held_out_*`` are the errors there (relative, weighted as the ranking), which chose the solution.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    rtn_weight: torch.Tensor
    rtn_error: float
    rtn_error_weighted: float
    error: float
    error_weighted: float
    best_iteration: int
    solver: str
    seconds: float
    s: float = 0.0
    history: list[dict[str, torch.Tensor]] = field(default_factory=list)
    held_out_rtn_error: float | None = None
    held_out_error: float | None = None
    iterations_run: int = 0


# --------------------------------------------------------------------------------------------- error terms
class _GramTerms:
    """Gram statistics of one weighting: ``A = X·H·Xᵀ``, ``B = Y·H·Xᵀ``, ``yy = Σ H·Y²``.

    Each chunk's products are computed in the chunk's dtype (float32 for network activations: the
    costly part, as in GPTQ's Hessian) and summed over chunks in ``dtype`` (float64 by default), in which
    the ADMM solves. A chunk of int8 activation codes gives its ``A`` from exact int32 sums (:func:`_code_gram`;
    with attention weights, see :func:`_weighted_code_gram`), several times faster than the float32 product.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.A: torch.Tensor | None = None
        self.B: torch.Tensor | None = None
        self.yy = 0.0
        self._dequantized: torch.Tensor | None = None  # a reused float block of a code chunk, for B

    def add(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        h: torch.Tensor | None,
        scratch: torch.Tensor | None = None,
        row_scale: torch.Tensor | None = None,
    ) -> None:
        """Add a chunk; ``scratch`` (shaped like ``x``, or ``None``) receives ``X·H``: a buffer its owner reuses over
        the chunks, since a fresh multi-MB one per chunk costs about as much in page faults as the product.

        With ``row_scale`` (``(K,)``, float64), ``x`` holds int8 codes (on the CPU) and the patches are
        ``row_scale[:, None]·x``; ``h`` then takes at most :data:`CODE_GRAM_MAX_WEIGHTS` distinct values.
        """
        if row_scale is not None:
            a, b = self._code_products(x, y, h, row_scale)
        else:
            xh = x if h is None else torch.mul(x, h, out=scratch)
            a = xh @ x.transpose(1, 2)
            b = (y if h is None else y * h) @ x.transpose(1, 2)
        # summed in place: a K×K float64 Gram matrix of a wide layer is hundreds of MB, so no second copy
        self.A = a.to(self.dtype) if self.A is None else self.A.add_(a)
        self.B = b.to(self.dtype) if self.B is None else self.B.add_(b)
        self.yy += _weighted_square_sum(y, h)

    def _code_products(
        self, codes: torch.Tensor, y: torch.Tensor, h: torch.Tensor | None, row_scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of a chunk of int8 codes: ``A`` from exact integer sums (:func:`_weighted_code_gram`; the
        class-balanced attention takes a few distinct weights), weighted and scaled in ``dtype``; ``B`` over column
        blocks dequantized (exactly) into one small reused float buffer, in ``y``'s dtype."""
        scale = row_scale.to(self.dtype)
        a = _weighted_code_gram(codes, h, self.dtype)
        a.mul_(scale[:, None]).mul_(scale)
        if h is not None:
            y = y * h
        width = max(1024, _DEQUANTIZED_BLOCK_BYTES // (codes.shape[1] * y.element_size()))
        b = None
        for start in range(0, codes.shape[-1], width):
            block = self._dequantized_block(codes[..., start : start + width], y.dtype)
            part = y[..., start : start + width] @ block.transpose(1, 2)
            b = part if b is None else b.add_(part)
        if b is None:  # no columns
            b = y.new_zeros(y.shape[0], y.shape[1], codes.shape[1])
        return a, b.to(self.dtype).mul_(scale)

    def _dequantized_block(self, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``codes`` converted to ``dtype`` (exact: int8 values) in the reused buffer."""
        buf = self._dequantized
        if buf is None or buf.shape[:-1] != codes.shape[:-1] or buf.shape[-1] < codes.shape[-1] or buf.dtype != dtype:
            buf = self._dequantized = torch.empty(codes.shape, dtype=dtype, device=codes.device)
        return buf[..., : codes.shape[-1]].copy_(codes)

    def error(self, wb: torch.Tensor) -> float:
        """``‖[W b]·X − Y‖²_H`` from the statistics (``wb``: the weights with the bias column), in ``dtype``."""
        quad = float(((wb @ self.A) * wb).sum())
        return quad - 2 * float((wb * self.B).sum()) + self.yy

    def ranker(
        self, grid: UniformGrid, has_bias: bool, weighted: bool = True, float32_small: bool = False
    ) -> GramRanker:
        """The incremental error of ADMM candidates on ``grid`` over these statistics (``weighted`` is theirs: ``A``
        holds it; ``float32_small``: see :class:`~monai_efficientq.ranking.GramRanker`)."""
        return GramRanker(self, grid, has_bias, float32_small)


class _ColumnTerms:
    """The interface of :class:`_GramTerms` over stored columns ``(X, Y, H)``: for layers with fewer output voxels
    than unknowns, where the columns are smaller than the Gram matrices.

    Args:
        dtype: the solve dtype, in which the columns are read.
        keep_float32: store float32 patches ``X`` as they come (they convert exactly to a wider solve dtype), and
            convert them into one joined matrix when first read (:meth:`joined`): the chunks then take half the
            memory of float64 copies, and the join adds half a copy at most instead of a whole one.
    """

    def __init__(self, dtype: torch.dtype, keep_float32: bool = False) -> None:
        self.dtype = dtype
        self.keep_float32 = keep_float32
        self.columns: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self.yy = 0.0

    def add(self, x: torch.Tensor, y: torch.Tensor, h: torch.Tensor | None, scratch: torch.Tensor | None = None) -> None:
        """Store a chunk (``scratch`` is unused: the interface of :meth:`_GramTerms.add`)."""
        # copies: the chunks may be views of buffers their producer reuses (``layers.input_patches``)
        stored = x.dtype if self.keep_float32 and x.dtype == torch.float32 else self.dtype
        x, y = x.to(stored, copy=True), y.to(self.dtype, copy=True)
        h = h.to(self.dtype, copy=True) if h is not None else None
        self.columns.append((x, y, h))
        self.yy += _weighted_square_sum(y, h)

    def _readable(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """The columns, joined first if any chunk is still in its float32 form."""
        if any(x.dtype != self.dtype for x, _, _ in self.columns):
            self.joined()
        return self.columns

    def error(self, wb: torch.Tensor) -> float:
        """``‖[W b]·X − Y‖²_H`` over the stored columns."""
        return self.errors(wb)[0]

    def errors(self, wb: torch.Tensor) -> tuple[float, float]:
        """The squared error weighted by the stored ``H`` and unweighted, in one pass over the columns."""
        weighted = unweighted = 0.0
        for x, y, h in self._readable():
            e2 = (wb @ x - y).pow_(2)
            plain = float(e2.sum(dtype=torch.float64))
            unweighted += plain
            weighted += plain if h is None else float((e2 * h).sum(dtype=torch.float64))
        return weighted, unweighted

    def ranker(
        self, grid: UniformGrid, has_bias: bool, weighted: bool = True, float32_small: bool = False
    ) -> ColumnRanker:
        """The incremental error of ADMM candidates on ``grid`` over these columns, weighted by their ``H`` or not."""
        self._readable()  # the ranker reads the columns in the solve dtype
        return ColumnRanker(self, grid, has_bias, weighted, float32_small)

    def yy_unweighted(self) -> float:
        return float(sum(float((y * y).sum(dtype=torch.float64)) for _, y, _ in self.columns))

    def joined(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """All columns as one ``X`` (``(groups, K, P)``, in the solve dtype) and their weights ``H`` (``None``: all
        ones). The chunks are replaced by the joined matrix, each freed once copied in, so it is held once."""
        if len(self.columns) > 1 or self.columns[0][0].dtype != self.dtype:
            chunks, self.columns = self.columns, []
            _, ys, hs = zip(*chunks)
            joined_h = None
            if any(h is not None for h in hs):  # a chunk without weights has weight 1
                joined_h = torch.cat([h if h is not None else y.new_ones(y.shape[-1]) for y, h in zip(ys, hs)])
            first = chunks[0][0]
            joined_x = torch.empty(
                (*first.shape[:-1], sum(x.shape[-1] for x, _, _ in chunks)), dtype=self.dtype, device=first.device
            )
            start = 0
            while chunks:
                x = chunks.pop(0)[0]
                joined_x[..., start : start + x.shape[-1]].copy_(x)  # float32 to float64: exact
                start += x.shape[-1]
                del x
            self.columns = [(joined_x, torch.cat(ys, dim=-1), joined_h)]
        x, _, h = self.columns[0]
        return x, h

    @property
    def A(self) -> torch.Tensor:
        """``Σ X·H·Xᵀ``."""
        return sum((x if h is None else x * h) @ x.transpose(1, 2) for x, _, h in self._readable())

    @property
    def B(self) -> torch.Tensor:
        """``Σ Y·H·Xᵀ``."""
        return sum((y if h is None else y * h) @ x.transpose(1, 2) for x, y, h in self._readable())


# --------------------------------------------------------------------------------------------- strategies
class _Statistics(ABC):
    """The fitted columns' statistics of one solver strategy and the V-step they give.

    Args:
        dtype: the solve dtype (sums, iterates).
        keep_unweighted: also keep what gives the unweighted errors exactly (for unweighted best-iterate
            selection).
    """

    name = ""
    #: whether :meth:`add` takes int8 codes with a ``row_scale`` (summed exactly); else they come dequantized
    takes_codes = False
    #: whether :meth:`add` uses a ``scratch`` buffer (for ``X·H``)
    uses_scratch = True

    def __init__(self, dtype: torch.dtype, keep_unweighted: bool) -> None:
        self.dtype = dtype
        self.keep_unweighted = keep_unweighted

    @abstractmethod
    def chunk_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype in which a chunk arriving in ``dtype`` is added."""

    def patches_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype in which a chunk's patches arriving in ``dtype`` are added (its targets: :meth:`chunk_dtype`)."""
        return self.chunk_dtype(dtype)

    @abstractmethod
    def add(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        h: torch.Tensor | None,
        scratch: torch.Tensor | None,
        row_scale: torch.Tensor | None = None,
    ) -> None:
        """Add a chunk: patches ``x`` (with the ones row), targets ``y``, attention ``h`` or ``None``; ``scratch``
        and ``row_scale`` as :meth:`_GramTerms.add` (codes only where :attr:`takes_codes`)."""

    @abstractmethod
    def errors(self, wb: torch.Tensor) -> tuple[float, float]:
        """``(weighted, unweighted)`` squared output errors of ``[W b]``; the unweighted one is ``nan`` when
        these statistics cannot give it."""

    @abstractmethod
    def ranker(self, grid: UniformGrid, has_bias: bool, weighted: bool, float32_small: bool) -> GramRanker | ColumnRanker:
        """The incremental weighted (or, with ``keep_unweighted``, unweighted) error of ADMM candidates
        (``float32_small``: see :class:`~monai_efficientq.ranking.GramRanker`)."""

    @abstractmethod
    def norms(self) -> tuple[float, float]:
        """``(Σ H·Y², Σ Y²)``, ``nan`` for the second as in :meth:`errors`."""

    @abstractmethod
    def target_product(self) -> torch.Tensor:
        """``B = Y·H·Xᵀ``."""

    @abstractmethod
    def v_step(self, lam: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """``R ↦ R·(2A + diag(lam))⁻¹``, factorised once."""

    @abstractmethod
    def held_out_terms(self) -> _GramTerms | _ColumnTerms:
        """Empty terms of the same kind, for held-out columns (ranked, never fitted)."""


class _GramStatistics(_Statistics):
    """Gram matrices; the V-step through one Cholesky factorisation per ρ."""

    name = "cholesky"
    takes_codes = True

    def __init__(self, dtype: torch.dtype, keep_unweighted: bool) -> None:
        super().__init__(dtype, keep_unweighted)
        self.weighted = _GramTerms(dtype)
        self.unweighted: _GramTerms | None = None
        self.uniform = True  # no attention weights streamed so far: the weighted terms are the unweighted ones

    def chunk_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype  # products in the chunk's own dtype (float32 activations), summed in the solve dtype

    def add(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        h: torch.Tensor | None,
        scratch: torch.Tensor | None,
        row_scale: torch.Tensor | None = None,
    ) -> None:
        self.uniform = self.uniform and h is None
        self.weighted.add(x, y, h, scratch, row_scale)
        if h is not None and self.keep_unweighted:
            if self.unweighted is None:
                self.unweighted = _GramTerms(self.dtype)
            self.unweighted.add(x, y, None, None, row_scale)

    def errors(self, wb: torch.Tensor) -> tuple[float, float]:
        weighted = self.weighted.error(wb)
        if self.unweighted is not None:
            return weighted, self.unweighted.error(wb)
        return weighted, weighted if self.uniform else math.nan

    def ranker(self, grid: UniformGrid, has_bias: bool, weighted: bool, float32_small: bool) -> GramRanker:
        if weighted or self.unweighted is None:  # without attention the weighted terms are the unweighted ones
            return self.weighted.ranker(grid, has_bias, float32_small=float32_small)
        return self.unweighted.ranker(grid, has_bias, float32_small=float32_small)

    def norms(self) -> tuple[float, float]:
        yy_w = self.weighted.yy
        if self.unweighted is not None:
            return yy_w, self.unweighted.yy
        return yy_w, yy_w if self.uniform else math.nan

    def target_product(self) -> torch.Tensor:
        return self.weighted.B

    def v_step(self, lam: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        m = 2 * self.weighted.A
        m.diagonal(dim1=-2, dim2=-1).add_(lam)
        factor = _cholesky(m)
        del m  # at most two K×K matrices alive besides the Gram matrix: the factor, then the inverse
        m_inv = torch.cholesky_inverse(factor)
        return lambda r: r @ m_inv

    def held_out_terms(self) -> _GramTerms:
        return _GramTerms(self.dtype)


class _PlainSolveStatistics(_GramStatistics):
    """Gram matrices; the V-step by a fresh ``torch.linalg.solve`` every iteration (the reference)."""

    name = "naive"

    def v_step(self, lam: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        a = self.weighted.A
        m = 2 * a + torch.diag_embed(lam).expand_as(a)
        return lambda r: torch.linalg.solve(m, r.transpose(1, 2)).transpose(1, 2)


class _ColumnStatistics(_Statistics):
    """The columns themselves (in the solve dtype); the V-step through the Woodbury identity on
    ``2A = S·Sᵀ``: one ``P×P`` Cholesky factorisation per ρ."""

    name = "woodbury"
    uses_scratch = False  # the columns are stored, not multiplied

    def __init__(self, dtype: torch.dtype, keep_unweighted: bool) -> None:
        super().__init__(dtype, keep_unweighted)
        self.terms = _ColumnTerms(dtype, keep_float32=True)

    def chunk_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.dtype  # the targets and weights are kept in the solve dtype

    def patches_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype if dtype == torch.float32 else self.dtype  # float32 patches stay float32 until joined

    def add(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        h: torch.Tensor | None,
        scratch: torch.Tensor | None,
        row_scale: torch.Tensor | None = None,
    ) -> None:
        self.terms.add(x, y, h)  # the columns are stored (dequantized, as takes_codes is False): no product

    def errors(self, wb: torch.Tensor) -> tuple[float, float]:
        return self.terms.errors(wb)  # the columns give both in one pass

    def ranker(self, grid: UniformGrid, has_bias: bool, weighted: bool, float32_small: bool) -> ColumnRanker:
        return self.terms.ranker(grid, has_bias, weighted, float32_small)

    def norms(self) -> tuple[float, float]:
        return self.terms.yy, self.terms.yy_unweighted()

    def target_product(self) -> torch.Tensor:
        return self.terms.B

    def v_step(self, lam: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """With ``S = X·diag(√(2H))`` (``2A = S·Sᵀ``) and ``Λ = diag(lam)``:
        ``R·(SSᵀ + Λ)⁻¹ = RΛ⁻¹ − RΛ⁻¹·S·(I + SᵀΛ⁻¹S)⁻¹·SᵀΛ⁻¹``. ``S`` is never formed: its column weights are
        applied to the ``P``-wide products, so the V-step holds only the stored columns and two ``P×P`` matrices."""
        x, h = self.terms.joined()
        root = (2 * h).sqrt() if h is not None else x.new_full((x.shape[-1],), math.sqrt(2))
        core = _weighted_inner(x, 1 / lam)
        core.mul_(root[:, None]).mul_(root)
        core.diagonal(dim1=-2, dim2=-1).add_(1.0)
        core_inv = torch.cholesky_inverse(_cholesky(core))
        del core

        def apply(r: torch.Tensor) -> torch.Tensor:
            r_lam = r / lam
            inner = ((r_lam @ x) * root) @ core_inv
            return r_lam - ((inner * root) @ x.transpose(1, 2)) / lam

        return apply

    def held_out_terms(self) -> _ColumnTerms:
        return _ColumnTerms(self.dtype)


_STRATEGIES: dict[str, type[_Statistics]] = {
    "cholesky": _GramStatistics,
    "naive": _PlainSolveStatistics,
    "woodbury": _ColumnStatistics,
}


def _choose_strategy(requested: str, num_columns: int, k1: int, eta_factor: float, has_bias: bool) -> str:
    """The solver strategy: ``requested``, or for ``"auto"`` the cheaper V-step (the ``P = num_columns`` fitted
    columns through Woodbury, or the dense ``K×K`` inverse); never Woodbury when ``η = 0`` with a bias (the
    diagonal part would be singular at the bias position)."""
    mode = requested
    if mode == "auto":
        mode = "woodbury" if _woodbury_is_cheaper(num_columns, k1) else "cholesky"
    if mode == "woodbury" and eta_factor == 0 and has_bias:
        mode = "cholesky"
    return mode


@dataclass
class _TargetMoments:
    """Running sums over the fitted columns: of ``Y`` and ``Y²`` (in float64) and of the attention weights."""

    y_sum: float = 0.0
    y_sq: float = 0.0
    y_count: int = 0
    h_sum: float = 0.0
    h_count: int = 0

    def add(self, y: torch.Tensor, h: torch.Tensor | None) -> None:
        self.y_sum += float(y.sum(dtype=torch.float64))
        self.y_sq += float((y * y).sum(dtype=torch.float64))
        self.y_count += y.numel()
        self.h_sum += float(h.sum()) if h is not None else float(y.shape[-1])
        self.h_count += y.shape[-1]

    def attention_mean(self) -> float:
        return self.h_sum / max(self.h_count, 1)

    def y_std(self) -> float:
        """The sample standard deviation of ``Y``."""
        n = self.y_count
        var_y = max(self.y_sq / n - (self.y_sum / n) ** 2, 0.0) * n / max(n - 1, 1)
        return math.sqrt(var_y)


# --------------------------------------------------------------------------------------------- ADMM state
@dataclass
class _Candidate:
    """One candidate solution: round-to-nearest (``iteration`` -1) or an ADMM iterate, with its ranking error."""

    codes: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    iteration: int
    err: float = math.inf

    @property
    def wb(self) -> torch.Tensor:
        return _with_bias(self.weight, self.bias)


@dataclass
class _AdmmResult:
    """What an ADMM run returns: the best candidate (``None`` if none had a finite error and no starting
    candidate was given), the number of iterations run and the recorded iterates."""

    best: _Candidate | None
    iterations_run: int
    history: list[dict[str, torch.Tensor]]


@dataclass
class _Selection:
    """The best candidate so far and the early-stop bookkeeping: the iteration of the last improvement of more
    than ``_MIN_IMPROVEMENT`` (relative) and the error it reached."""

    best: _Candidate | None
    last_better: int = -1
    reference: float = field(init=False)

    def __post_init__(self) -> None:
        self.reference = self.best.err if self.best is not None else math.inf

    def offer(self, candidate: _Candidate, iteration: int) -> None:
        """Keep ``candidate`` if it ranks lower than the best one."""
        if candidate.err < (self.best.err if self.best is not None else math.inf):
            self.best = candidate
            if candidate.err < self.reference * (1 - _MIN_IMPROVEMENT) or not math.isfinite(self.reference):
                self.last_better, self.reference = iteration, candidate.err

    def stalled(self, iteration: int, patience: int | None) -> bool:
        """No real improvement for ``patience`` iterations (never with ``patience=None``)."""
        return patience is not None and iteration - self.last_better >= patience


@dataclass
class _AdmmState:
    """The ADMM variables: penalty ``ρ``, grid point ``G``, scaled dual ``U`` and the scale of ``G``."""

    rho: float
    g: torch.Tensor
    u: torch.Tensor
    scale: torch.Tensor

    def double_rho(self, rho_cap: float) -> None:
        """ρ doubles (at most ``rho_cap``) and the scaled dual ``U`` shrinks with it, keeping ``ρ·U``."""
        new_rho = min(2 * self.rho, rho_cap)
        self.rho, self.u = new_rho, self.u * (self.rho / new_rho)


# --------------------------------------------------------------------------------------------- the solver
class LayerSolver:
    """Accumulates one layer's statistics chunk by chunk, then solves it once.

    Args:
        weight: float weights ``W0`` as ``(groups, C_out/groups, K)``.
        bias: float bias ``b0`` as ``(groups, C_out/groups)``, or ``None`` (then no bias is fitted).
        grid: the weight grid.
        per_channel: one scale per output channel instead of one per tensor.
        settings: ADMM settings.
        num_columns: ``P``, the number of output voxels that will be streamed in.
        dtype: dtype of the statistics and iterates.
        timer: where the seconds of each phase are added (``scale_fit``, ``admm_*``, ``errors``).
        held_out_columns: how many of the ``num_columns`` will arrive ``held_out``: they only rank iterates, so
            the solver strategy (dense inverse or Woodbury) is chosen for the fitted ones alone.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        grid: UniformGrid,
        per_channel: bool,
        settings: SolverSettings,
        num_columns: int,
        dtype: torch.dtype = torch.float64,
        timer: PhaseTimer | None = None,
        held_out_columns: int = 0,
    ) -> None:
        self.timer = timer if timer is not None else PhaseTimer()
        self.w0 = weight.detach().to(dtype)
        self.has_bias = bias is not None
        self.b0 = bias.detach().to(dtype) if bias is not None else None
        self.grid = grid
        self.per_channel = per_channel
        self.settings = settings
        self.dtype = dtype
        self.num_columns = num_columns
        self.k1 = self.w0.shape[-1] + int(self.has_bias)
        fitted_columns = num_columns - held_out_columns
        self.mode = _choose_strategy(settings.solver, fitted_columns, self.k1, settings.eta_factor, self.has_bias)
        self.statistics = self._new_statistics()
        self.held: _GramTerms | _ColumnTerms | None = None  # held-out columns: rank the iterates, never fitted
        self._moments = _TargetMoments()
        self._seen = 0
        self._scratch: torch.Tensor | None = None  # X·H of a chunk: one buffer for all of them, freed by solve()
        self._ranker: GramRanker | ColumnRanker | None = None  # made by the first _rank(), released by solve()

    def _new_statistics(self) -> _Statistics:
        return _STRATEGIES[self.mode](self.dtype, self.settings.best_iterate_error == "unweighted")

    def _with_ones(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with the bias's row of ones, unless there is no bias or the row is already there."""
        if not self.has_bias or x.shape[1] == self.k1:
            return x
        return torch.cat([x, x.new_ones(x.shape[0], 1, x.shape[2])], dim=1)

    @torch.no_grad()
    def add(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        h: torch.Tensor | None = None,
        held_out: bool = False,
        x_scale: float | None = None,
    ) -> None:
        """Stream in one chunk.

        Args:
            x: quantized input patches ``(groups, K, P_chunk)`` (float32 or float64; the chunk's products
                are computed in this dtype), or ``(groups, K + 1, P_chunk)`` with the bias's row of ones already
                last (``input_patches(..., ones_row=True)``); or the same patches as int8 codes (see
                ``x_scale``). Only read during the call: the caller may reuse it.
            y: float targets of the same columns ``(groups, C_out/groups, P_chunk)``.
            h: attention weights of the same columns ``(P_chunk,)``, or ``None`` for all ones.
            held_out: these columns are not fitted; the ADMM iterate (or the round-to-nearest weights) with the
                lowest error on them is kept (weighted or not as ``best_iterate_error`` says).
            x_scale: for int8 codes ``x`` (in [-127, 127]; a ones row stays 1): the patches are ``x_scale·x``
                (``ActQuantizer.codes`` and its step). On the CPU, with at most :data:`CODE_GRAM_MAX_WEIGHTS`
                distinct weights in ``h``, the Gram matrix then comes from exact integer sums, several times
                faster; other chunks are dequantized first, to the float32 values of the fake-quantized input.
        """
        self._seen += y.shape[-1]
        if held_out and self.settings.best_iterate_error != "weighted":
            h = None  # held-out columns rank by the unweighted error
        row_scale = None
        if not x.is_floating_point():
            x, row_scale = self._codes_with_ones(x, x_scale)
            if not self._sums_codes(x, h):
                x, row_scale = _dequantize_codes(x, row_scale, y.dtype), None
        if held_out:
            self._add_held_out(x, y, h, row_scale)
            return
        work = self.statistics.chunk_dtype(x.dtype if row_scale is None else y.dtype)
        x = self._with_ones(x if row_scale is not None else x.to(self.statistics.patches_dtype(x.dtype)))
        y = y.to(work)
        hw = h.to(work) if h is not None else None
        self._moments.add(y, hw)
        scratch = self._scratch_for(x, hw) if row_scale is None and self.statistics.uses_scratch else None
        self.statistics.add(x, y, hw, scratch, row_scale)

    def _sums_codes(self, codes: torch.Tensor, h: torch.Tensor | None) -> bool:
        """Whether a chunk of codes with weights ``h`` goes to the exact integer Gram products: Gram statistics on
        the CPU (``torch._int_mm``), with at most :data:`CODE_GRAM_MAX_WEIGHTS` distinct weights."""
        if not self.statistics.takes_codes or codes.device.type != "cpu":
            return False
        return h is None or torch.unique(h).numel() <= CODE_GRAM_MAX_WEIGHTS

    def _codes_with_ones(self, codes: torch.Tensor, x_scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Int8 codes with the bias's ones row, and the scale of each row (``x_scale``; 1 for the ones row)."""
        if x_scale is None or codes.dtype != torch.int8:
            raise ValueError(f"Integer patches must be int8 codes with their x_scale, not {codes.dtype} with {x_scale}.")
        codes = self._with_ones(codes)
        row_scale = torch.full((codes.shape[1],), float(x_scale), dtype=torch.float64, device=codes.device)
        if self.has_bias:
            row_scale[-1] = 1.0
        return codes, row_scale

    def _scratch_for(self, x: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor | None:
        """The reused ``X·H`` buffer, shaped like the chunk ``x`` (``None`` without weights: nothing to form)."""
        if h is None:
            return None
        buf = self._scratch
        if buf is None or buf.shape[:-1] != x.shape[:-1] or buf.shape[-1] < x.shape[-1] or buf.dtype != x.dtype:
            buf = self._scratch = torch.empty_like(x, memory_format=torch.contiguous_format)
        return buf[..., : x.shape[-1]]

    def _add_held_out(
        self, x: torch.Tensor, y: torch.Tensor, h: torch.Tensor | None, row_scale: torch.Tensor | None
    ) -> None:
        if self.held is None:
            self.held = self.statistics.held_out_terms()
        x = self._with_ones(x)
        work = y.dtype if row_scale is not None else x.dtype
        h = h.to(work) if h is not None else None
        if row_scale is not None:
            self.held.add(x, y, h, None, row_scale)  # codes: only Gram terms take them
        else:
            self.held.add(x, y.to(work), h, self._scratch_for(x, h))

    def _rank(self, candidate: _Candidate) -> float:
        """The error that ranks candidate solutions: on the held-out columns when there are any, else the
        calibration error chosen by ``best_iterate_error``; from a :mod:`~monai_efficientq.ranking` ranker, which
        updates its product with the statistics only where the candidate's codes differ from the last one's."""
        if self._ranker is None:
            weighted = self.settings.best_iterate_error == "weighted"
            terms = self.held if self.held is not None else self.statistics
            # float32 products for small layers below 4 bits: 4-bit iterates differ by less than float32 rounding of
            # ‖Y‖²-sized terms (ranked in float32, the bundle SegResNet's W4 output error was 15 % higher)
            self._ranker = terms.ranker(self.grid, self.has_bias, weighted or self.held is not None, self.grid.bits < 4)
        return self._ranker.error(candidate.codes, candidate.scale, candidate.bias, candidate.wb)

    # ----------------------------------------------------------------------------------------- solve
    def _scale_s(self, attention_mean: float) -> float:
        """``s = max(numel(Y)·std(Y) / (numel(W)·std(W)), 1) · mean(attention)``."""
        n = self._moments.y_count
        std_w = float(self.w0.std()) if self.w0.numel() > 1 else 0.0
        ratio = n * self._moments.y_std() / (self.w0.numel() * std_w) if std_w > 0 else 1.0
        return max(ratio, 1.0) * attention_mean

    def _refine(self, v: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ADMM's projection of ``v`` onto the grid, its scale warm-started from ``scale``: ``(scale, codes, G)``,
        ``G`` in ``v``'s dtype (the projection itself runs in float64)."""
        if bool((scale > 0).all()):
            rows = v.reshape(-1, v.shape[-1]).to(torch.float64)
            scale, codes, g = project_to_grid(rows, self.grid, self.per_channel, scale)
            return scale, codes.reshape(v.shape), g.reshape(v.shape).to(v.dtype)
        g, scale, codes = self._project(v, scale)  # a zero row: the checked path
        return scale, codes, g

    def _project(self, v: torch.Tensor, init: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = v.reshape(-1, v.shape[-1])
        scale, codes = fit_scale(rows, self.grid, per_row=self.per_channel, init=init)
        per_row_scale = scale.expand(rows.shape[0], 1) if not self.per_channel else scale
        g = dequantize(codes, per_row_scale, self.grid, v.dtype).reshape(v.shape)
        return g, scale, codes.reshape(v.shape)

    def _diag(self, rho: float, eta: float) -> torch.Tensor:
        """Diagonal ``ρ·D + η·I`` (``D`` is 0 at the bias position)."""
        lam = torch.full((self.k1,), rho + eta, dtype=self.dtype, device=self.w0.device)
        if self.has_bias:
            lam[-1] = eta
        return lam

    def _rtn_candidate(self) -> _Candidate:
        rtn_w, rtn_scale, rtn_codes = self._project(self.w0, None)
        return _Candidate(rtn_codes, rtn_scale, rtn_w, self.b0, iteration=-1)

    @torch.no_grad()
    def round_to_nearest(self) -> LayerSolution:
        """The round-to-nearest weights (same grid and scale fit), without any streamed statistics.

        The errors of the returned solution are ``nan``: the caller measures them (the network driver does,
        by a direct forward of the layer), which is far cheaper than accumulating Gram matrices for them.
        """
        t0 = time.perf_counter()
        rtn = self._rtn_candidate()
        nan = math.nan
        return LayerSolution(
            codes=rtn.codes, scale=rtn.scale, weight=rtn.weight, bias=self.b0, rtn_weight=rtn.weight, rtn_error=nan,
            rtn_error_weighted=nan, error=nan, error_weighted=nan, best_iteration=-1, solver="rtn",
            seconds=time.perf_counter() - t0,
        )

    @torch.no_grad()
    def solve(self, attention_mean: float | None = None) -> LayerSolution:
        """Run ADMM (or RTN) on the accumulated statistics, then release them.

        Args:
            attention_mean: mean of this layer's attention map (default: the mean of the streamed weights).
        """
        if self._seen != self.num_columns:
            raise RuntimeError(f"LayerSolver got {self._seen} of {self.num_columns} output columns before solve().")
        t0 = time.perf_counter()
        self._scratch = None
        if attention_mean is None:
            attention_mean = self._moments.attention_mean()
        with self.timer("scale_fit"):  # round to nearest: the floor, and a candidate ranked like the ADMM iterates
            rtn = self._rtn_candidate()
        with self.timer("admm_rank"):
            rtn.err = self._rank(rtn)
        s = self._scale_s(attention_mean)
        result = _AdmmResult(rtn, 0, [])
        if self.settings.method == "efficientq":
            result = self._admm(s, rtn if self.settings.rtn_candidate else None, rtn.scale)
        with self.timer("errors"):
            solution = self._solution(result, rtn, s, t0)
        self.statistics, self.held, self._ranker = self._new_statistics(), None, None
        return solution

    def _solution(self, result: _AdmmResult, rtn: _Candidate, s: float, t0: float) -> LayerSolution:
        """The best candidate with its errors (exact, relative to ``‖Y‖²``) and those of round-to-nearest."""
        best = result.best if result.best is not None else rtn
        yy_w, yy_u = (_floor(yy) for yy in self.statistics.norms())
        rtn_err_w, rtn_err_u = self.statistics.errors(rtn.wb)
        best_err_w, best_err_u = self.statistics.errors(best.wb) if best is not rtn else (rtn_err_w, rtn_err_u)
        held_rtn, held_best = self._held_out_errors(rtn, best)
        return LayerSolution(
            codes=best.codes.to(torch.int64), scale=best.scale, weight=best.weight, bias=best.bias,
            rtn_weight=rtn.weight, rtn_error=rtn_err_u / yy_u, rtn_error_weighted=rtn_err_w / yy_w,
            error=best_err_u / yy_u, error_weighted=best_err_w / yy_w, best_iteration=best.iteration,
            solver=self.mode if self.settings.method == "efficientq" else "rtn", seconds=time.perf_counter() - t0,
            s=s, history=result.history, held_out_rtn_error=held_rtn, held_out_error=held_best,
            iterations_run=result.iterations_run,
        )

    def _held_out_errors(self, rtn: _Candidate, best: _Candidate) -> tuple[float | None, float | None]:
        """The exact relative errors of round-to-nearest and of ``best`` on the held-out columns, if any."""
        if self.held is None:
            return None, None
        held_yy = max(self.held.yy, 1e-300)
        return self.held.error(rtn.wb) / held_yy, self.held.error(best.wb) / held_yy

    def _admm(self, s: float, start: _Candidate | None, start_scale: torch.Tensor) -> _AdmmResult:
        """ADMM from the float weights. The best candidate is ``start`` (e.g. the round-to-nearest weights) unless
        an iterate ranks lower; the grid projection's scale fit is warm-started from ``start_scale``, then from
        the previous iterate's.

        With ``patience``, it stops once the best candidate's error has not fallen by more than
        ``_MIN_IMPROVEMENT`` (relative) for that many iterations.
        """
        st = self.settings
        eta, rho_cap = st.eta_factor * s, st.rho_cap_factor * s
        state = _AdmmState(st.rho_factor * s, self.w0.clone(), torch.zeros_like(self.w0), start_scale)
        v_step = _VStepCache(self.statistics, lambda rho: self._diag(rho, eta))
        b2_prior = 2 * self.statistics.target_product() + _with_bias(self.w0, self.b0) * eta
        selection, history = _Selection(start), []
        it = 0
        for it in range(st.iterations):
            t0 = time.perf_counter()
            step_rho = it % st.rho_step_every == 0
            if step_rho and st.rho_schedule == "before":
                state.double_rho(rho_cap)
            candidate, vb = self._admm_iteration(state, v_step(state.rho), b2_prior, it, t0)
            if st.record_history:
                history.append({"v": vb.clone(), "codes": candidate.codes.clone(), "scale": state.scale.clone(),
                                "rho": torch.tensor(state.rho)})
            selection.offer(candidate, it)
            if step_rho and st.rho_schedule == "after":
                state.double_rho(rho_cap)
            if selection.stalled(it, st.patience):
                break
        return _AdmmResult(selection.best, it + 1, history)

    def _admm_iteration(
        self, state: _AdmmState, inverse: Callable[[torch.Tensor], torch.Tensor], b2_prior: torch.Tensor,
        iteration: int, t0: float,
    ) -> tuple[_Candidate, torch.Tensor]:
        """One ADMM iteration from ``state`` (updated in place): the V-step, the projection onto the grid and the
        ranking of the new iterate, timed from ``t0``. Returns the ranked candidate and ``[V b]``."""
        k = self.w0.shape[-1]
        target = _with_bias(state.g - state.u, torch.zeros_like(self.b0) if self.has_bias else None)
        vb = inverse(b2_prior + state.rho * target)
        v, bias = vb[..., :k], (vb[..., k] if self.has_bias else None)
        t1 = time.perf_counter()
        state.scale, codes, state.g = self._refine(v + state.u, state.scale)
        state.u = state.u + v - state.g
        t2 = time.perf_counter()
        candidate = _Candidate(codes, state.scale, state.g, bias, iteration=iteration)
        candidate.err = self._rank(candidate)
        self.timer.add("admm_solve", t1 - t0)
        self.timer.add("admm_project", t2 - t1)
        self.timer.add("admm_rank", time.perf_counter() - t2)
        return candidate, vb


class _VStepCache:
    """The V-step of the current ρ: factorised again only when ρ changes (one factorisation per distinct ρ)."""

    def __init__(self, statistics: _Statistics, diagonal: Callable[[float], torch.Tensor]) -> None:
        self.statistics = statistics
        self.diagonal = diagonal
        self.rho: float | None = None
        self.inverse: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __call__(self, rho: float) -> Callable[[torch.Tensor], torch.Tensor]:
        if rho != self.rho:
            self.inverse = None  # the previous ρ's inverse is freed before the next one is computed
            self.inverse, self.rho = self.statistics.v_step(self.diagonal(rho)), rho
        return self.inverse


def _weighted_square_sum(y: torch.Tensor, h: torch.Tensor | None) -> float:
    """``Σ h·Y²`` of a chunk ``y`` ``(groups, rows, P)`` with column weights ``h`` ``(P,)`` (``None``: all 1): squares
    and weights in ``y``'s dtype, summed in float64 (:func:`~monai_efficientq.layers.squared_error_sums`)."""
    if h is None:
        return squared_error_sums(None, y)[0]
    return squared_error_sums(None, y, h.expand(y.shape[0], y.shape[-1]))[1]


def _weighted_inner(x: torch.Tensor, row_weights: torch.Tensor, rows_per_block: int = 1024) -> torch.Tensor:
    """``Xᵀ·diag(row_weights)·X`` for ``X`` of shape ``(groups, K, P)``, over blocks of rows (no second ``K×P``)."""
    out = x.new_zeros(x.shape[0], x.shape[-1], x.shape[-1])
    for start in range(0, x.shape[1], rows_per_block):
        block = x[:, start : start + rows_per_block]
        out.add_(block.transpose(1, 2) @ (block * row_weights[start : start + rows_per_block, None]))
    return out


def _dequantize_codes(codes: torch.Tensor, row_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``row_scale[:, None]·codes`` in ``dtype``: the same rounding as the fake quantizer's ``k·step``."""
    return codes.to(dtype).mul_(row_scale.to(dtype)[:, None])


def _weighted_code_gram(codes: torch.Tensor, h: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``Σ_p h_p·c_p·c_pᵀ`` over the columns ``c_p`` of int8 codes ``(groups, K, P)`` in ``dtype`` (``h=None``: all
    weights 1), from exact integer sums: every column at the most frequent weight ``w0``, plus, for each other
    weight ``w``, ``(w − w0)`` times the sums of its own columns (gathered: the few tumour or tissue voxels)."""
    all_columns = torch.stack([_code_gram(group) for group in codes]).to(dtype)
    if h is None:
        return all_columns
    values, which, counts = torch.unique(h, return_inverse=True, return_counts=True)
    major = int(counts.argmax())
    total = all_columns.mul_(float(values[major]))
    for i, value in enumerate(values.tolist()):
        if i != major:
            columns = codes.index_select(-1, (which == i).nonzero().squeeze(1))
            part = torch.stack([_code_gram(group) for group in columns]).to(dtype)
            total.add_(part, alpha=value - float(values[major]))
    return total


def _code_gram(codes: torch.Tensor) -> torch.Tensor:
    """``codes·codesᵀ`` of int8 codes ``(K, P)`` in exact integer sums (int32 products of at most
    :data:`CODE_GRAM_MAX_COLUMNS` columns, summed in int64 beyond)."""
    if codes.shape[-1] < _INT_MM_MIN_COLUMNS:  # exact in float64 too: at most 7 products of at most 127²
        wide = codes.to(torch.float64)
        return (wide @ wide.t()).to(torch.int64)
    if codes.shape[-1] <= CODE_GRAM_MAX_COLUMNS:
        return torch._int_mm(codes, codes.t())
    total = torch.zeros(codes.shape[0], codes.shape[0], dtype=torch.int64, device=codes.device)
    for start in range(0, codes.shape[-1], CODE_GRAM_MAX_COLUMNS):
        block = codes[:, start : start + CODE_GRAM_MAX_COLUMNS]
        total.add_(torch._int_mm(block, block.t()))
    return total


def _floor(norm: float) -> float:
    """A squared norm floored away from zero for division (``nan`` stays ``nan``)."""
    return norm if math.isnan(norm) else max(norm, 1e-300)


def _with_bias(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``[W b]``: the weights with the bias as a last column (``W`` alone for a layer without bias)."""
    return w if b is None else torch.cat([w, b.unsqueeze(-1)], dim=-1)


def _woodbury_is_cheaper(num_columns: int, k1: int) -> bool:
    """Per V-step and output channel, the dense inverse costs ``2K²`` flops and Woodbury over ``P`` columns
    ``4KP + 2P²``: Woodbury is cheaper when ``2P + P²/K < K`` (about ``P < 0.41·K``)."""
    return 2 * num_columns + num_columns**2 / k1 < k1


def _cholesky(m: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of a batch of SPD matrices, retrying with a growing diagonal jitter."""
    factor, info = torch.linalg.cholesky_ex(m)
    if not bool((info > 0).any()):
        return factor
    base = float(m.diagonal(dim1=-2, dim2=-1).abs().mean()) or 1.0
    for exponent in range(-12, 0, 2):
        jitter = base * 10.0**exponent
        logger.debug("Cholesky failed; retrying with jitter %.3g", jitter)
        m_j = m.clone()
        m_j.diagonal(dim1=-2, dim2=-1).add_(jitter)
        factor, info = torch.linalg.cholesky_ex(m_j)
        if not bool((info > 0).any()):
            return factor
    raise RuntimeError("The layer's normal matrix is not positive definite even with jitter; check for NaN inputs.")
