"""The per-layer EfficientQ problem, solved by ADMM.

For one layer with float weights ``W0`` (``(groups, C_out/groups, K)``) and bias ``b0``, quantized input
patches ``Xq`` (with a row of ones for the bias), per-voxel attention ``H`` and float target ``Y``::

    minimise over [W b], W on the grid:  ‖([W b]·Xq − Y)·H^½‖² + (η/2)·‖[W b] − [W0 b0]‖²

:class:`LayerSolver` streams ``Xq``/``Y`` in chunk by chunk, keeping only the Gram matrices
``A = Xq·H·Xqᵀ`` and ``B = Y·H·Xqᵀ`` (or, when the output has fewer voxels than unknowns, the
``Xq``/``Y`` columns themselves, to solve through Woodbury), then solves once.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch

from .quantizer import UniformGrid, dequantize, fit_scale, project_to_grid
from .timing import PhaseTimer

__all__ = ["LayerSolver", "LayerSolution", "SolverSettings"]

logger = logging.getLogger(__name__)

#: An iterate that lowers the best error by less than this fraction does not reset the early-stop patience.
_MIN_IMPROVEMENT = 1e-4


@dataclass
class SolverSettings:
    """The ADMM settings of one layer (see :class:`~monai_efficientq.config.EfficientQConfig`)."""

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
    patience: int | None = None
    record_history: bool = False


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


class _ErrorTerms:
    """Gram statistics of one weighting: ``A = X·H·Xᵀ``, ``B = Y·H·Xᵀ``, ``yy = Σ H·Y²``.

    Each chunk's products are computed in the chunk's dtype (float32 for network activations: the
    costly part, as in GPTQ's Hessian) and summed over chunks in ``dtype`` (float64 by default), in which
    the ADMM solves.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.A: torch.Tensor | None = None
        self.B: torch.Tensor | None = None
        self.yy = 0.0
        self._a_fast: torch.Tensor | None = None

    def add(self, x: torch.Tensor, y: torch.Tensor, h: torch.Tensor | None) -> None:
        xh = x if h is None else x * h
        a = (xh @ x.transpose(1, 2)).to(self.dtype)
        b = ((y if h is None else y * h) @ x.transpose(1, 2)).to(self.dtype)
        self.A = a if self.A is None else self.A + a
        self.B = b if self.B is None else self.B + b
        self.yy += float(((y * y) if h is None else (y * y) * h).sum(dtype=torch.float64))
        self._a_fast = None

    def error(self, wb: torch.Tensor, exact: bool = True) -> float:
        """``‖[W b]·X − Y‖²_H`` from the statistics.

        Args:
            wb: the weights with the bias column.
            exact: evaluate the quadratic term in ``dtype``; ``False`` evaluates it in float32 (used to rank
                the ADMM iterates: one matrix product per iteration, as costly as the V-step, whose rounding,
                about 1e-6 of ``‖Y‖²``, is far below the differences between iterates that matter).
        """
        if exact:
            quad = float(((wb @ self.A) * wb).sum())
        else:
            if self._a_fast is None:
                self._a_fast = self.A.to(torch.float32)
            w32 = wb.to(torch.float32)
            quad = float(((w32 @ self._a_fast) * w32).sum(dtype=torch.float64))
        return quad - 2 * float((wb * self.B).sum()) + self.yy


class _ColumnTerms:
    """The interface of :class:`_ErrorTerms` over stored columns ``(X, Y, H)``: for layers with fewer output voxels
    than unknowns, where the columns are smaller than the Gram matrices."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.columns: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self.yy = 0.0
        self._fast: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] | None = None

    def add(self, x: torch.Tensor, y: torch.Tensor, h: torch.Tensor | None) -> None:
        x, y = x.to(self.dtype), y.to(self.dtype)
        h = h.to(self.dtype) if h is not None else None
        self.columns.append((x, y, h))
        self.yy += float(((y * y) if h is None else (y * y) * h).sum(dtype=torch.float64))
        self._fast = None

    def error(self, wb: torch.Tensor, exact: bool = True) -> float:
        """``‖[W b]·X − Y‖²_H`` over the stored columns (``exact=False``: in float32, as ``_ErrorTerms.error``)."""
        return self.errors(wb, exact)[0]

    def errors(self, wb: torch.Tensor, exact: bool = True) -> tuple[float, float]:
        """The squared error weighted by the stored ``H`` and unweighted, in one pass over the columns."""
        columns = self.columns
        if not exact:
            if self._fast is None:
                f32 = torch.float32
                self._fast = [(x.to(f32), y.to(f32), h.to(f32) if h is not None else None) for x, y, h in columns]
            columns, wb = self._fast, wb.to(torch.float32)
        weighted = unweighted = 0.0
        for x, y, h in columns:
            e2 = (wb @ x - y).pow_(2)
            plain = float(e2.sum(dtype=torch.float64))
            unweighted += plain
            weighted += plain if h is None else float((e2 * h).sum(dtype=torch.float64))
        return weighted, unweighted

    def yy_unweighted(self) -> float:
        return float(sum(float((y * y).sum(dtype=torch.float64)) for _, y, _ in self.columns))

    def scaled_columns(self) -> torch.Tensor:
        """``[X₁·√(2H₁), X₂·√(2H₂), …]``: the columns whose outer products sum to ``2A``."""
        return torch.cat([x * math.sqrt(2) if h is None else x * (2 * h).sqrt() for x, _, h in self.columns], dim=-1)

    @property
    def A(self) -> torch.Tensor:
        """``Σ X·H·Xᵀ`` (dense; only the reference solver needs it)."""
        return sum((x if h is None else x * h) @ x.transpose(1, 2) for x, _, h in self.columns)

    @property
    def B(self) -> torch.Tensor:
        """``Σ Y·H·Xᵀ``."""
        return sum((y if h is None else y * h) @ x.transpose(1, 2) for x, y, h in self.columns)


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
        timer: where the seconds of each phase are added (``gram``, ``scale_fit``, ``admm_*``, ``errors``).
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
        groups, _, k = self.w0.shape
        self.k1 = k + int(self.has_bias)
        mode = settings.solver
        if mode == "auto":  # the cheaper V-step: P columns through Woodbury, or the dense K×K inverse
            mode = "woodbury" if _woodbury_is_cheaper(num_columns, self.k1) else "cholesky"
        if mode == "woodbury" and settings.eta_factor == 0 and self.has_bias:
            mode = "cholesky"  # the diagonal part would be singular at the bias position
        self.mode = mode
        # the fitted columns' statistics: Gram matrices, or (Woodbury) the columns themselves
        self.weighted: _ErrorTerms | _ColumnTerms = _ColumnTerms(dtype) if mode == "woodbury" else _ErrorTerms(dtype)
        self.unweighted: _ErrorTerms | None = None
        self._y_sum = 0.0
        self._y_sq = 0.0
        self._y_count = 0
        self._h_sum = 0.0
        self._h_count = 0
        self._seen = 0
        self._uniform = True  # no attention weights streamed so far
        self.held: _ErrorTerms | _ColumnTerms | None = None  # held-out columns: rank the iterates, never fitted

    def _with_ones(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_bias:
            return x
        return torch.cat([x, x.new_ones(x.shape[0], 1, x.shape[2])], dim=1)

    @torch.no_grad()
    def add(self, x: torch.Tensor, y: torch.Tensor, h: torch.Tensor | None = None, held_out: bool = False) -> None:
        """Stream in one chunk.

        Args:
            x: quantized input patches ``(groups, K, P_chunk)`` (float32 or float64; the chunk's products
                are computed in this dtype).
            y: float targets of the same columns ``(groups, C_out/groups, P_chunk)``.
            h: attention weights of the same columns ``(P_chunk,)``, or ``None`` for all ones.
            held_out: these columns are not fitted; the ADMM iterate (or the round-to-nearest weights) with the
                lowest error on them is kept (weighted or not as ``best_iterate_error`` says).
        """
        if held_out:
            self._add_held_out(x, y, h)
            return
        if self.mode == "woodbury":  # the columns are kept: store them in the solve dtype
            x, y = x.to(self.dtype), y.to(self.dtype)
        else:  # products in the chunk's own dtype (float32 activations), summed in the solve dtype
            y = y.to(x.dtype)
        x = self._with_ones(x)
        hw = h.to(x.dtype) if h is not None else None
        self._uniform = self._uniform and hw is None
        self._y_sum += float(y.sum(dtype=torch.float64))
        self._y_sq += float((y * y).sum(dtype=torch.float64))
        self._y_count += y.numel()
        self._h_sum += float(hw.sum()) if hw is not None else float(y.shape[-1])
        self._h_count += y.shape[-1]
        self._seen += y.shape[-1]
        self.weighted.add(x, y, hw)
        if hw is not None and self.settings.best_iterate_error == "unweighted" and self.mode != "woodbury":
            if self.unweighted is None:
                self.unweighted = _ErrorTerms(self.dtype)
            self.unweighted.add(x, y, None)

    def _add_held_out(self, x: torch.Tensor, y: torch.Tensor, h: torch.Tensor | None) -> None:
        if self.held is None:
            self.held = _ColumnTerms(self.dtype) if self.mode == "woodbury" else _ErrorTerms(self.dtype)
        x = self._with_ones(x)
        weighted = h is not None and self.settings.best_iterate_error == "weighted"
        self.held.add(x, y.to(x.dtype), h.to(x.dtype) if weighted else None)
        self._seen += y.shape[-1]

    @property
    def _exact_rank(self) -> bool:
        """Rank in the solve dtype at 4 bits and more. The float32 quadratic term rounds at about 1e-7 of
        ``‖Y‖²``, near the differences between good 4-bit iterates (output errors ~3e-4 of ``‖Y‖²``): ranked in
        float32, the bundle SegResNet's W4 output error was 15 % higher. At 2-3 bits float32 ranks as well and
        costs half as much."""
        return self.grid.bits >= 4

    def _rank(self, wb: torch.Tensor) -> float:
        """The error that ranks candidate solutions: on the held-out columns when there are any, else the
        calibration error chosen by ``best_iterate_error`` (see ``_exact_rank`` for its precision)."""
        if self.held is not None:
            return self.held.error(wb, exact=self._exact_rank)
        err_w, err_u = self._errors(wb, exact=self._exact_rank)
        return err_w if self.settings.best_iterate_error == "weighted" else err_u

    # ----------------------------------------------------------------------------------------- solve
    def _scale_s(self, attention_mean: float) -> float:
        """``s = max(numel(Y)·std(Y) / (numel(W)·std(W)), 1) · mean(attention)``."""
        n = self._y_count
        var_y = max(self._y_sq / n - (self._y_sum / n) ** 2, 0.0) * n / max(n - 1, 1)
        std_w = float(self.w0.std()) if self.w0.numel() > 1 else 0.0
        ratio = n * math.sqrt(var_y) / (self.w0.numel() * std_w) if std_w > 0 else 1.0
        return max(ratio, 1.0) * attention_mean

    def _errors(self, wb: torch.Tensor, exact: bool = True) -> tuple[float, float]:
        """(weighted, unweighted) squared output errors of ``[W b]`` (``exact=False``: see ``_ErrorTerms.error``)."""
        if isinstance(self.weighted, _ColumnTerms):  # the columns give both in one pass
            return self.weighted.errors(wb, exact)
        weighted = self.weighted.error(wb, exact)
        if self.unweighted is not None:
            return weighted, self.unweighted.error(wb, exact)
        return weighted, weighted if self._uniform else math.nan

    def _yy(self) -> tuple[float, float]:
        yy_w = self.weighted.yy
        if isinstance(self.weighted, _ColumnTerms):
            return yy_w, self.weighted.yy_unweighted()
        if self.unweighted is not None:
            return yy_w, self.unweighted.yy
        return yy_w, yy_w if self._uniform else math.nan

    def _refine(self, v: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ADMM's projection of ``v`` onto the grid, its scale warm-started from ``scale``: ``(scale, codes, G)``."""
        if bool((scale > 0).all()):
            scale, codes, g = project_to_grid(v.reshape(-1, v.shape[-1]), self.grid, self.per_channel, scale)
            return scale, codes.reshape(v.shape), g.reshape(v.shape)
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

    def _make_inverse(self, rho: float, eta: float):
        """A function ``R ↦ R·(2A + ρD + ηI)⁻¹`` for this ρ (one factorization)."""
        lam = self._diag(rho, eta)
        if self.mode == "naive":
            a = self.weighted.A
            m = 2 * a + torch.diag_embed(lam).expand_as(a)
            return lambda r: torch.linalg.solve(m, r.transpose(1, 2)).transpose(1, 2)
        if self.mode == "woodbury":
            s = self.weighted.scaled_columns()
            s_scaled = s / lam[:, None]
            core = s.transpose(1, 2) @ s_scaled
            core.diagonal(dim1=-2, dim2=-1).add_(1.0)
            core_inv = torch.cholesky_inverse(_cholesky(core))

            def apply(r: torch.Tensor) -> torch.Tensor:
                r_lam = r / lam
                return r_lam - ((r_lam @ s) @ core_inv) @ s_scaled.transpose(1, 2)

            return apply
        a = self.weighted.A
        m = 2 * a
        m.diagonal(dim1=-2, dim2=-1).add_(lam)
        m_inv = torch.cholesky_inverse(_cholesky(m))
        return lambda r: r @ m_inv

    @torch.no_grad()
    def round_to_nearest(self) -> LayerSolution:
        """The round-to-nearest weights (same grid and scale fit), without any streamed statistics.

        The errors of the returned solution are ``nan``: the caller measures them (the network driver does,
        by a direct forward of the layer), which is far cheaper than accumulating Gram matrices for them.
        """
        t0 = time.perf_counter()
        rtn_w, rtn_scale, rtn_codes = self._project(self.w0, None)
        nan = math.nan
        return LayerSolution(
            codes=rtn_codes, scale=rtn_scale, weight=rtn_w, bias=self.b0, rtn_weight=rtn_w, rtn_error=nan,
            rtn_error_weighted=nan, error=nan, error_weighted=nan, best_iteration=-1, solver="rtn",
            seconds=time.perf_counter() - t0,
        )

    @torch.no_grad()
    def solve(self, attention_mean: float | None = None) -> LayerSolution:
        """Run ADMM (or RTN) on the accumulated statistics.

        Args:
            attention_mean: mean of this layer's attention map (default: the mean of the streamed weights).
        """
        if self._seen != self.num_columns:
            raise RuntimeError(f"LayerSolver got {self._seen} of {self.num_columns} output columns before solve().")
        t0 = time.perf_counter()
        st = self.settings
        if attention_mean is None:
            attention_mean = self._h_sum / max(self._h_count, 1)

        # round to nearest: the floor, and a candidate iterate ranked like the ADMM ones
        with self.timer("scale_fit"):
            rtn_w, rtn_scale, rtn_codes = self._project(self.w0, None)
        rtn = _Candidate(rtn_codes, rtn_scale, rtn_w, self.b0, iteration=-1)
        with self.timer("admm_rank"):
            rtn.err = self._rank(rtn.wb)
        s = self._scale_s(attention_mean)
        history: list[dict[str, torch.Tensor]] = []
        best, iterations_run = rtn, 0
        if st.method == "efficientq":
            found, iterations_run = self._admm(s, rtn if st.rtn_candidate else None, history, rtn_scale)
            best = found if found is not None else rtn
        with self.timer("errors"):
            solution = self._solution(best, rtn, s, history)
        solution.iterations_run = iterations_run
        solution.seconds = time.perf_counter() - t0
        self.weighted = _ColumnTerms(self.dtype) if self.mode == "woodbury" else _ErrorTerms(self.dtype)
        self.unweighted = None
        return solution

    def _solution(self, best: _Candidate, rtn: _Candidate, s: float, history: list) -> LayerSolution:
        """The chosen candidate with its errors (exact, relative to ``‖Y‖²``) and those of round-to-nearest."""
        yy_w, yy_u = self._yy()
        yy_w, yy_u = max(yy_w, 1e-300), max(yy_u, 1e-300) if not math.isnan(yy_u) else yy_u
        rtn_wb, best_wb = rtn.wb, best.wb
        rtn_err_w, rtn_err_u = self._errors(rtn_wb)
        best_err_w, best_err_u = self._errors(best_wb) if best is not rtn else (rtn_err_w, rtn_err_u)
        solution = LayerSolution(
            codes=best.codes.to(torch.int64), scale=best.scale, weight=best.weight, bias=best.bias, rtn_weight=rtn.weight,
            rtn_error=rtn_err_u / yy_u, rtn_error_weighted=rtn_err_w / yy_w,
            error=best_err_u / yy_u, error_weighted=best_err_w / yy_w,
            best_iteration=best.iteration, solver=self.mode if self.settings.method == "efficientq" else "rtn",
            seconds=0.0, s=s, history=history,
        )
        if self.held is not None:
            held_yy = max(self.held.yy, 1e-300)
            solution.held_out_rtn_error = self.held.error(rtn_wb) / held_yy
            solution.held_out_error = self.held.error(best_wb) / held_yy
            self.held = None
        return solution

    def _admm(
        self, s: float, best: _Candidate | None, history: list, start_scale: torch.Tensor
    ) -> tuple[_Candidate | None, int]:
        """ADMM from the float weights; returns the best candidate (``best``, e.g. the round-to-nearest weights,
        unless an iterate ranks lower; ``None`` if ``best`` was None and no iterate had a finite error) and the
        number of iterations run.

        With ``patience``, it stops once the best candidate's error has not fallen by more than
        ``_MIN_IMPROVEMENT`` (relative) for that many iterations.
        """
        st, timer = self.settings, self.timer
        eta, rho, rho_cap = st.eta_factor * s, st.rho_factor * s, st.rho_cap_factor * s
        b2_prior = 2 * self.weighted.B + _with_bias(self.w0, self.b0) * eta
        g, u = self.w0.clone(), torch.zeros_like(self.w0)
        inverse, inverse_rho = None, None
        scale, k = start_scale, self.w0.shape[-1]  # the scale fit is warm-started from the previous iterate
        last_better, reference = -1, best.err if best is not None else math.inf  # the last real improvement
        it = 0
        for it in range(st.iterations):
            t0 = time.perf_counter()
            step_rho = it % st.rho_step_every == 0
            if step_rho and st.rho_schedule == "before":
                rho, u = _double_rho(rho, rho_cap, u)
            if rho != inverse_rho:
                inverse, inverse_rho = self._make_inverse(rho, eta), rho  # one factorization per distinct ρ
            target = _with_bias(g - u, torch.zeros_like(self.b0) if self.has_bias else None)
            vb = inverse(b2_prior + rho * target)
            v, bias = vb[..., :k], (vb[..., k] if self.has_bias else None)
            t1 = time.perf_counter()
            scale, codes, g = self._refine(v + u, scale)
            u = u + v - g
            t2 = time.perf_counter()
            candidate = _Candidate(codes, scale, g, bias, iteration=it)
            candidate.err = self._rank(candidate.wb)
            timer.add("admm_solve", t1 - t0)
            timer.add("admm_project", t2 - t1)
            timer.add("admm_rank", time.perf_counter() - t2)
            if st.record_history:
                history.append({"v": vb.clone(), "codes": codes.clone(), "scale": scale.clone(), "rho": torch.tensor(rho)})
            if candidate.err < (best.err if best is not None else math.inf):
                best = candidate
                if best.err < reference * (1 - _MIN_IMPROVEMENT) or not math.isfinite(reference):
                    last_better, reference = it, best.err
            if step_rho and st.rho_schedule == "after":
                rho, u = _double_rho(rho, rho_cap, u)
            if st.patience is not None and it - last_better >= st.patience:
                break
        return best, it + 1


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


def _with_bias(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``[W b]``: the weights with the bias as a last column (``W`` alone for a layer without bias)."""
    return w if b is None else torch.cat([w, b.unsqueeze(-1)], dim=-1)


def _woodbury_is_cheaper(num_columns: int, k1: int) -> bool:
    """Per V-step and output channel, the dense inverse costs ``2K²`` flops and Woodbury over ``P`` columns
    ``4KP + 2P²``: Woodbury is cheaper when ``2P + P²/K < K`` (about ``P < 0.41·K``)."""
    return 2 * num_columns + num_columns**2 / k1 < k1


def _double_rho(rho: float, rho_cap: float, u: torch.Tensor) -> tuple[float, torch.Tensor]:
    """ρ doubles (at most ``rho_cap``) and the scaled dual ``U`` shrinks with it, keeping ``ρ·U``."""
    new_rho = min(2 * rho, rho_cap)
    return new_rho, u * (rho / new_rho)


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
