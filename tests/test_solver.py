from __future__ import annotations

import pytest
import torch
from torch import nn

from monai_efficientq import ranking
from monai_efficientq.layers import input_patches, layer_forward, matrix_to_weight, output_matrix, weight_matrix
from monai_efficientq.quantizer import UniformGrid
from monai_efficientq.solver import LayerSolver, SolverSettings


def _problem(c_in=3, c_out=4, size=6, seed=0, bias=True):
    torch.manual_seed(seed)
    layer = nn.Conv3d(c_in, c_out, 3, padding=1, bias=bias).double()
    x = torch.randn(1, c_in, size, size, size, dtype=torch.float64)
    y = layer(x).detach()
    h = torch.rand(y[0, 0].numel(), dtype=torch.float64) * 3 + 0.5
    return layer, x, y, h


def _stream(layer, x, y, h, bits=2, per_channel=True, **kw):
    """A solver of ``layer`` with every chunk streamed in (no early stop unless ``patience`` is given)."""
    kw.setdefault("patience", None)
    settings = SolverSettings(**kw)
    w = weight_matrix(layer).detach()
    b = layer.bias.detach().reshape(w.shape[0], w.shape[1]) if layer.bias is not None else None
    y_mat = output_matrix(layer, y)
    solver = LayerSolver(w, b, UniformGrid(bits, "nozero"), per_channel, settings, y_mat.shape[-1])
    for cols, patches in input_patches(layer, x, 1 << 14, torch.float64):
        solver.add(patches, y_mat[..., cols], h[cols] if h is not None else None)
    return solver


def _solve(layer, x, y, h, bits=2, per_channel=True, **kw):
    solver = _stream(layer, x, y, h, bits, per_channel, **kw)
    return solver, solver.solve()


@pytest.mark.parametrize("attention", [True, False])
@pytest.mark.parametrize("fast, size", [("cholesky", 6), ("woodbury", 3)])
def test_fast_solver_gives_the_same_iterates_as_plain_solve(fast, size, attention):
    layer, x, y, h = _problem(size=size)
    h = h if attention else None
    kw = dict(iterations=60, rho_step_every=20, record_history=True, rtn_candidate=False)
    s_fast, sol_fast = _solve(layer, x, y, h, solver=fast, **kw)
    s_ref, sol_ref = _solve(layer, x, y, h, solver="naive", **kw)
    assert s_fast.mode == fast and s_ref.mode == "naive"
    assert len(sol_fast.history) == len(sol_ref.history) == 60
    for a, b in zip(sol_fast.history, sol_ref.history):
        assert torch.allclose(a["v"], b["v"], rtol=1e-7, atol=1e-9)
        assert torch.equal(a["codes"], b["codes"])
    if attention:
        assert sol_fast.best_iteration == sol_ref.best_iteration
    else:  # Woodbury ranks over the columns, the reference over Gram matrices: near-ties may go either way
        assert sol_fast.error == pytest.approx(sol_ref.error, rel=1e-5)


def test_auto_picks_the_cheaper_v_step():
    layer, x, y, h = _problem(c_in=8, size=3)  # P = 27, K + 1 = 217: Woodbury (4KP + 2P² < 2K²)
    solver, _ = _solve(layer, x, y, h, iterations=2)
    assert solver.mode == "woodbury"
    layer, x, y, h = _problem(c_in=8, size=5)  # P = 125 < K + 1 = 217, but the dense inverse is cheaper
    solver, _ = _solve(layer, x, y, h, iterations=2)
    assert solver.mode == "cholesky"
    layer, x, y, h = _problem(c_in=2, size=6)  # P = 216 > 55
    solver, _ = _solve(layer, x, y, h, iterations=2)
    assert solver.mode == "cholesky"


def test_one_factorization_per_distinct_rho():
    layer, x, y, h = _problem()
    solver = _stream(layer, x, y, h, iterations=200, record_history=True)
    calls = []
    original = solver.statistics.v_step

    def counting(lam):
        calls.append(float(lam[0]))
        return original(lam)

    solver.statistics.v_step = counting
    sol = solver.solve()
    assert len(calls) == len(set(calls)) == 4
    rhos = [float(it["rho"]) for it in sol.history]
    assert rhos[0] == pytest.approx(2 * 10 * sol.s)  # doubled at iteration 0
    assert rhos[49] == rhos[0] and rhos[50] == pytest.approx(2 * rhos[0]) and rhos[150] == pytest.approx(8 * rhos[0])


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_efficientq_layer_error_below_rtn(bits, seed):
    layer, x, y, h = _problem(c_in=4, c_out=6, size=6, seed=seed)
    _, sol = _solve(layer, x, y, None, bits=bits, iterations=100, rtn_candidate=False)
    assert sol.best_iteration >= 0
    assert sol.error < 0.9 * sol.rtn_error


def test_reported_error_matches_the_stored_codes_scale_and_bias():
    layer, x, y, h = _problem(c_in=4, c_out=5, seed=3)
    _, sol = _solve(layer, x, y, None, bits=2, iterations=80, per_channel=False, rtn_candidate=False)
    assert sol.scale.numel() == 1
    deq = sol.scale * UniformGrid(2, "nozero").levels(sol.codes, torch.float64)
    assert torch.allclose(deq, sol.weight)
    out = layer_forward(layer, x, matrix_to_weight(layer, deq), sol.bias.reshape(-1))
    rel = float((out - y).pow(2).sum() / y.pow(2).sum())
    assert rel == pytest.approx(sol.error, rel=1e-6)


def _direct_rel_error(layer, x, y, sol):
    out = layer_forward(layer, x, matrix_to_weight(layer, sol.weight), sol.bias.reshape(-1))
    return float((out - y).pow(2).sum() / y.pow(2).sum())


def test_best_iterate_uses_the_attention_weights():
    layer, x, y, h = _problem(seed=4)
    h = torch.ones_like(h)
    h[:20] = 50.0
    _, weighted = _solve(layer, x, y, h, best_iterate_error="weighted", rtn_candidate=False, iterations=60)
    _, unweighted = _solve(layer, x, y, h, best_iterate_error="unweighted", rtn_candidate=False, iterations=60)
    assert weighted.error_weighted <= unweighted.error_weighted + 1e-12
    assert unweighted.error == pytest.approx(_direct_rel_error(layer, x, y, unweighted), rel=1e-6)
    assert unweighted.error <= _direct_rel_error(layer, x, y, weighted) + 1e-12
    assert weighted.error != weighted.error  # nan: not accumulated; the network driver measures it directly


def test_prior_eta_keeps_underdetermined_layer_near_float():
    layer, x, y, h = _problem(c_in=8, size=3)  # more unknowns than voxels
    w0 = weight_matrix(layer).detach()
    dist = {}
    for eta in (1e-3, 1e3):
        _, sol = _solve(layer, x, y, None, bits=4, eta_factor=eta, iterations=40, rtn_candidate=False)
        dist[eta] = float((sol.weight - w0).norm())
    assert dist[1e3] < dist[1e-3]


def test_rtn_method_keeps_float_bias_and_rtn_weights():
    layer, x, y, h = _problem()
    _, sol = _solve(layer, x, y, h, method="rtn")
    assert sol.best_iteration == -1 and sol.error_weighted == sol.rtn_error_weighted
    assert torch.equal(sol.weight, sol.rtn_weight)
    assert torch.equal(sol.bias.reshape(-1), layer.bias.detach())


def test_layer_without_bias():
    layer, x, y, h = _problem(bias=False)
    _, sol = _solve(layer, x, y, h, iterations=30)
    assert sol.bias is None and sol.error_weighted <= sol.rtn_error_weighted


def test_float32_chunks_are_summed_in_the_solve_dtype():
    layer, x, y, h = _problem(c_in=4, c_out=5, size=8, seed=5)
    w = weight_matrix(layer).detach()
    b = layer.bias.detach().reshape(w.shape[0], w.shape[1])
    y_mat = output_matrix(layer, y)
    solvers = {}
    for dtype in (torch.float64, torch.float32):
        settings = SolverSettings(iterations=40, solver="cholesky")
        solver = LayerSolver(w, b, UniformGrid(2, "nozero"), True, settings, y_mat.shape[-1])
        for cols, patches in input_patches(layer, x.to(dtype), 1 << 12, dtype):
            solver.add(patches, y_mat[..., cols].to(dtype), h[cols].to(dtype))
        solvers[dtype] = solver
    a64, a32 = solvers[torch.float64].statistics.weighted.A, solvers[torch.float32].statistics.weighted.A
    assert a32.dtype == torch.float64  # float32 chunk products, float64 sums
    assert torch.allclose(a32, a64, rtol=1e-5, atol=1e-5 * float(a64.abs().max()))
    sol64, sol32 = solvers[torch.float64].solve(), solvers[torch.float32].solve()
    assert sol32.error_weighted == pytest.approx(sol64.error_weighted, rel=1e-3)
    assert (sol32.codes == sol64.codes).float().mean() > 0.95


def test_round_to_nearest_needs_no_statistics():
    layer, x, y, h = _problem()
    w = weight_matrix(layer).detach()
    solver = LayerSolver(w, None, UniformGrid(3, "nozero"), True, SolverSettings(method="rtn"), 10**6)
    sol = solver.round_to_nearest()  # nothing streamed in
    _, ref = _solve(layer, x, y, h, bits=3, method="rtn")
    assert torch.equal(sol.codes, ref.codes) and torch.equal(sol.weight, ref.weight)
    assert sol.error != sol.error and sol.solver == "rtn"  # nan: measured by the caller


@pytest.mark.parametrize("schedule", ["after", "before"])
def test_rho_schedule(schedule):
    layer, x, y, h = _problem()
    _, sol = _solve(layer, x, y, h, iterations=8, rho_step_every=3, rho_schedule=schedule, record_history=True)
    rho0 = 10.0 * sol.s
    rhos = [float(step["rho"]) / rho0 for step in sol.history]
    if schedule == "after":  # the published code: iteration 0 at rho0, then doubling after i = 0, 3, 6
        assert rhos == pytest.approx([1, 2, 2, 2, 4, 4, 4, 8])
    else:  # doubling before i = 0, 3, 6
        assert rhos == pytest.approx([2, 2, 2, 4, 4, 4, 8, 8])


@pytest.mark.parametrize("size, mode", [(6, "cholesky"), (3, "woodbury")])
def test_held_out_columns_choose_the_iterate_and_are_not_fitted(size, mode):
    layer, x, y, h = _problem(size=size, c_in=3 if mode == "cholesky" else 8)
    x2 = x.flip(2) * 1.3  # a second "volume": its columns are held out
    y2 = layer(x2).detach()
    w = weight_matrix(layer).detach()
    b = layer.bias.detach().reshape(w.shape[0], w.shape[1])
    y_fit, y_held = output_matrix(layer, y), output_matrix(layer, y2)
    settings = SolverSettings(iterations=30, rho_step_every=10, record_history=True, patience=None)
    solver = LayerSolver(w, b, UniformGrid(2, "nozero"), True, settings, 2 * y_fit.shape[-1])
    for (cols, patches), (cols2, patches2) in zip(
        input_patches(layer, x, 1 << 14, torch.float64), input_patches(layer, x2, 1 << 14, torch.float64)
    ):
        solver.add(patches, y_fit[..., cols], h[cols])
        solver.add(patches2, y_held[..., cols2], h[cols2], held_out=True)
    assert solver.mode == mode
    sol = solver.solve()

    def held_error(weight, bias):
        out = layer_forward(layer, x2, matrix_to_weight(layer, weight), bias.reshape(-1))
        return float(((out - y2).pow(2) * h.view(1, 1, *y2.shape[2:])).sum() / (y2.pow(2) * h.view(1, 1, *y2.shape[2:])).sum())

    k = w.shape[-1]
    candidates = [held_error(sol.rtn_weight, layer.bias.detach())]
    for step in sol.history:
        candidates.append(held_error(dequantize_rows(step["codes"], step["scale"]), step["v"][..., k]))
    chosen = sol.best_iteration + 1  # -1 (round to nearest) is candidate 0
    assert candidates[chosen] == pytest.approx(min(candidates), rel=1e-6)
    assert sol.held_out_error == pytest.approx(candidates[chosen], rel=1e-6)
    assert sol.held_out_rtn_error == pytest.approx(candidates[0], rel=1e-6)
    # the held-out columns are not fitted: the same fit columns alone give the same ADMM iterates
    _, alone = _solve(layer, x, y, h, iterations=30, rho_step_every=10, record_history=True)
    assert all(torch.equal(a["codes"], b["codes"]) for a, b in zip(alone.history, sol.history))


def dequantize_rows(codes, scale):
    from monai_efficientq.quantizer import dequantize

    rows = codes.reshape(-1, codes.shape[-1])
    per_row = scale.expand(rows.shape[0], 1) if scale.shape[0] == 1 else scale
    return dequantize(rows, per_row, UniformGrid(2, "nozero"), torch.float64).reshape(codes.shape)


def test_early_stop_returns_the_best_of_the_iterates_it_ran():
    layer, x, y, h = _problem(size=5)
    _, full = _solve(layer, x, y, h, iterations=120, rho_step_every=30, record_history=True, rtn_candidate=False)
    _, early = _solve(layer, x, y, h, iterations=120, rho_step_every=30, record_history=True, rtn_candidate=False,
                      patience=3)
    assert full.iterations_run == 120
    assert 3 < early.iterations_run < 120
    ran = early.iterations_run
    # the same iterates as the full run, up to where it stopped
    assert all(torch.equal(a["codes"], b["codes"]) for a, b in zip(early.history, full.history[:ran]))
    assert early.best_iteration <= ran - 1
    assert ran - 1 - early.best_iteration >= 3  # it waited `patience` iterations after the last real improvement
    assert early.error_weighted >= full.error_weighted - 1e-12  # never better than running them all


def test_column_terms_errors_match_the_direct_formula():
    torch.manual_seed(0)
    x, y = torch.randn(1, 30, 20, dtype=torch.float64), torch.randn(1, 4, 20, dtype=torch.float64)
    h = torch.rand(20, dtype=torch.float64)
    settings = SolverSettings(solver="woodbury")
    solver = LayerSolver(torch.randn(1, 4, 30), None, UniformGrid(2, "nozero"), True, settings, 20)
    assert solver.mode == "woodbury"
    solver.add(x, y, h)
    wb = torch.randn(1, 4, 30, dtype=torch.float64)
    weighted, unweighted = solver.statistics.errors(wb)
    e2 = (wb @ x - y).pow(2)
    assert weighted == pytest.approx(float((e2 * h).sum()), rel=1e-12)
    assert unweighted == pytest.approx(float(e2.sum()), rel=1e-12)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("mode", ["cholesky", "woodbury"])
@pytest.mark.parametrize("large", [False, True])
def test_ranking_precision(bits, mode, large, monkeypatch):
    """4-bit iterates differ by less than float32 rounding of ``‖Y‖²``-sized terms (a large input mean makes the
    cancellation visible): they are ranked at the solve dtype's precision, as are large layers at every width (whose
    products are updated where the codes change); small 2-3-bit layers take float32 products."""
    if large:
        monkeypatch.setattr(ranking, "DIRECT_BELOW", 0)
    torch.manual_seed(0)
    w = torch.randn(1, 6, 40, dtype=torch.float64)
    columns = 500 if mode == "cholesky" else 12
    x = torch.randn(1, 40, columns, dtype=torch.float32) + 3.0
    y = (w.float() @ x) * 1.001
    solver = LayerSolver(w, None, UniformGrid(bits, "nozero"), True, SolverSettings(solver=mode), columns)
    solver.add(x, y)
    assert solver.mode == mode
    rtn = solver._rtn_candidate()
    exact = solver.statistics.errors(rtn.wb)[0]
    ranked = solver._rank(rtn)
    if bits >= 4 or large:
        assert ranked == pytest.approx(exact, rel=1e-9)
    else:
        assert ranked != exact and ranked == pytest.approx(exact, rel=1e-3)


@pytest.mark.parametrize("mode", ["cholesky", "woodbury", "naive"])
@pytest.mark.parametrize("attention", [True, False])
def test_every_strategy_answers_the_same_questions(mode, attention):
    """Errors, ‖Y‖², B and the V-step of each strategy's statistics against the plain formulas on all columns."""
    layer, x, y, h = _problem(c_in=3, c_out=4, size=4, seed=6)
    h = h if attention else None
    solver = _stream(layer, x, y, h, solver=mode, best_iterate_error="unweighted")
    assert solver.mode == mode
    stats = solver.statistics
    _, patches = next(iter(input_patches(layer, x, 1 << 30, torch.float64)))
    xs = torch.cat([patches, torch.ones_like(patches[:, :1])], dim=1)  # all columns, with the bias row
    ys = output_matrix(layer, y)
    hs = h if h is not None else torch.ones(ys.shape[-1], dtype=torch.float64)
    wb = torch.randn(ys.shape[0], ys.shape[1], xs.shape[1], dtype=torch.float64)
    e2 = (wb @ xs - ys).pow(2)
    assert stats.errors(wb) == pytest.approx((float((e2 * hs).sum()), float(e2.sum())), rel=1e-9)
    assert stats.norms() == pytest.approx((float((ys * ys * hs).sum()), float((ys * ys).sum())), rel=1e-12)
    assert torch.allclose(stats.target_product(), (ys * hs) @ xs.transpose(1, 2), rtol=1e-10)
    lam = torch.rand(xs.shape[1], dtype=torch.float64) + 0.5
    normal = 2 * (xs * hs) @ xs.transpose(1, 2) + torch.diag(lam)
    r = torch.randn_like(wb)
    assert torch.allclose(stats.v_step(lam)(r), r @ torch.linalg.inv(normal), rtol=1e-7, atol=1e-10)


def test_settings_come_from_the_config_by_name():
    from monai_efficientq.config import EfficientQConfig

    assert SolverSettings.from_config(EfficientQConfig()) == SolverSettings()  # the same defaults
    original = SolverSettings.from_config(EfficientQConfig(preset="original", iterations=7, solver="naive"))
    assert (original.iterations, original.solver, original.rho_schedule) == (7, "naive", "after")
    assert original.rtn_candidate is False and original.best_iterate_error == "unweighted"
    assert SolverSettings.from_config(EfficientQConfig(), record_history=True).record_history


def test_solve_releases_the_statistics():
    layer, x, y, h = _problem(size=4)
    solver, sol = _solve(layer, x, y, h, iterations=5)
    assert solver.statistics.weighted.A is None and solver.held is None
    assert sol.iterations_run == 5 and len(sol.history) == 0


@pytest.mark.parametrize("size, c_in", [(6, 3), (3, 8)])  # Cholesky, Woodbury
def test_float32_solve_dtype_keeps_its_iterates_in_float32(size, c_in):
    layer, x, y, h = _problem(size=size, c_in=c_in, seed=7)
    w = weight_matrix(layer).detach()
    b = layer.bias.detach().reshape(w.shape[0], w.shape[1])
    y_mat = output_matrix(layer, y)
    half = y_mat.shape[-1] // 2  # the second half is held out
    solutions = {}
    for dtype in (torch.float64, torch.float32):
        settings = SolverSettings(iterations=30, rho_step_every=10, patience=None)
        solver = LayerSolver(w, b, UniformGrid(2, "nozero"), True, settings, y_mat.shape[-1], dtype=dtype)
        for cols, patches in input_patches(layer, x.to(dtype), 1 << 30, dtype):
            solver.add(patches[..., :half], y_mat[..., :half].to(dtype), h[:half].to(dtype))
            solver.add(patches[..., half:], y_mat[..., half:].to(dtype), h[half:].to(dtype), held_out=True)
        solutions[dtype] = solver.solve()
    sol32, sol64 = solutions[torch.float32], solutions[torch.float64]
    assert sol32.weight.dtype == torch.float32 and sol32.bias.dtype == torch.float32
    assert sol32.error_weighted == pytest.approx(sol64.error_weighted, rel=1e-2)
    assert sol32.held_out_error == pytest.approx(sol64.held_out_error, rel=1e-2)


def test_the_strategy_is_chosen_for_the_fitted_columns_alone():
    """Held-out columns never enter the V-step: 30 fitted columns of K = 100 unknowns take Woodbury even when 30
    more arrive held out (60 columns in all would take the dense inverse)."""
    w = torch.randn(1, 4, 99, dtype=torch.float64)
    b = torch.zeros(1, 4, dtype=torch.float64)
    assert LayerSolver(w, b, UniformGrid(2, "nozero"), True, SolverSettings(), 60).mode == "cholesky"
    solver = LayerSolver(w, b, UniformGrid(2, "nozero"), True, SolverSettings(), 60, held_out_columns=30)
    assert solver.mode == "woodbury"


@pytest.mark.parametrize("solver_name", ["woodbury", "cholesky"])
def test_chunks_from_a_reused_buffer_give_the_statistics_of_copied_chunks(solver_name):
    # input_patches yields views of one buffer that the next chunk overwrites: a strategy that keeps columns
    # (Woodbury, and held-out columns) must copy them
    layer, x, y, h = _problem(size=4)
    w = weight_matrix(layer).detach()
    b = layer.bias.detach().reshape(w.shape[0], w.shape[1])
    y_mat = output_matrix(layer, y)
    half = y_mat.shape[-1] // 2
    solvers = []
    for copy in (False, True):
        settings = SolverSettings(iterations=5, solver=solver_name)
        solver = LayerSolver(w, b, UniformGrid(2, "nozero"), True, settings, y_mat.shape[-1], held_out_columns=half)
        chunks = list if copy else iter
        for cols, patches in chunks(
            (c, p.clone() if copy else p) for c, p in input_patches(layer, x, 1 << 12, torch.float64, ones_row=True)
        ):
            held = cols.start >= y_mat.shape[-1] - half
            solver.add(patches, y_mat[..., cols], h[cols], held_out=held)
        solvers.append(solver)
    reused, copied = solvers
    assert len(list(input_patches(layer, x, 1 << 12, torch.float64))) > 2  # several chunks share the buffer
    assert torch.equal(reused.statistics.target_product(), copied.statistics.target_product())
    probe = torch.randn(w.shape[0], w.shape[1], w.shape[2] + 1, dtype=torch.float64)
    assert reused.held.error(probe) == pytest.approx(copied.held.error(probe), rel=1e-12)
    # the weighted error (Cholesky's statistics cannot give the unweighted one without attention-free columns)
    assert reused.statistics.errors(probe)[0] == pytest.approx(copied.statistics.errors(probe)[0], rel=1e-12)


def _code_problem(seed=0):
    """A layer whose input is 2-bit codes times a float32 step, its float32 target and the float64 patches."""
    torch.manual_seed(seed)
    layer = nn.Conv3d(3, 4, 3, padding=1)
    step = float(torch.tensor(0.37, dtype=torch.float32))
    codes = torch.randint(0, 4, (1, 3, 6, 6, 6), dtype=torch.int8)
    with torch.no_grad():
        y = layer(codes.float() * step)
    return layer.double(), codes, step, y


def _code_solver(layer, y, held_out_columns=0):
    w = weight_matrix(layer).detach()
    b = layer.bias.detach().reshape(w.shape[0], w.shape[1])
    settings = SolverSettings(iterations=5, solver="cholesky")
    return LayerSolver(w, b, UniformGrid(2, "nozero"), True, settings, y[0, 0].numel(), held_out_columns=held_out_columns)


@pytest.mark.parametrize("weights", ["none", "classes", "continuous"])
def test_int8_codes_give_the_gram_statistics_in_exact_sums(weights, monkeypatch):
    layer, codes, step, y = _code_problem()
    y_mat = output_matrix(layer, y)
    n = y_mat.shape[-1]
    h = {"none": None, "classes": torch.tensor([1.0, 2.5, 7.25])[torch.arange(n) % 3],
         "continuous": torch.rand(n) + 0.5}[weights]
    int_mm_calls = []
    int_mm = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: int_mm_calls.append(1) or int_mm(a, b))
    half = n // 2
    solvers = {}
    for kind in ("codes", "float64"):
        solver = _code_solver(layer, y, held_out_columns=half)
        x = codes if kind == "codes" else codes.double() * step
        for cols, patches in input_patches(layer, x, 1 << 12, x.dtype, ones_row=True):
            parts = [(slice(cols.start, min(cols.stop, n - half)), False), (slice(max(cols.start, n - half), cols.stop), True)]
            for part, held in parts:
                if part.stop <= part.start:
                    continue
                piece = patches[..., part.start - cols.start : part.stop - cols.start]
                solver.add(piece, y_mat[..., part], h[part] if h is not None else None, held_out=held,
                           x_scale=step if kind == "codes" else None)
        solvers[kind] = solver
    exact, reference = solvers["codes"], solvers["float64"]
    # exact integer sums (then one rounding per entry) agree with float64 sums to float64 precision; float32 chunk
    # products (the continuous weights' path, dequantized first) only to float32 precision
    rtol = 1e-5 if weights == "continuous" else 1e-12
    assert (len(int_mm_calls) == 0) == (weights == "continuous")
    for got, want in [(exact.statistics.weighted.A, reference.statistics.weighted.A), (exact.held.A, reference.held.A)]:
        assert got.dtype == torch.float64
        assert torch.allclose(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))
    b_got, b_want = exact.statistics.target_product(), reference.statistics.target_product()
    assert torch.allclose(b_got, b_want, rtol=1e-5, atol=1e-5 * float(b_want.abs().max()))  # float32 products of Y
    assert exact.statistics.norms()[0] == pytest.approx(reference.statistics.norms()[0], rel=1e-6)  # Y² in float32
    sol_exact, sol_ref = exact.solve(), reference.solve()
    assert sol_exact.error_weighted == pytest.approx(sol_ref.error_weighted, rel=1e-3)


def test_int8_code_gram_beyond_the_int32_column_limit_sums_in_int64(monkeypatch):
    from monai_efficientq import solver as solver_module

    torch.manual_seed(0)
    codes = torch.randint(-127, 128, (5, 1000), dtype=torch.int8)
    monkeypatch.setattr(solver_module, "CODE_GRAM_MAX_COLUMNS", 300)
    got = solver_module._code_gram(codes)
    assert got.dtype == torch.int64
    assert torch.equal(got, codes.long() @ codes.long().t())


def test_int8_codes_need_their_scale():
    layer, codes, step, y = _code_problem()
    solver = _code_solver(layer, y)
    patches = next(iter(input_patches(layer, codes, 1 << 12, torch.int8)))[1]
    with pytest.raises(ValueError, match="int8 codes with their x_scale"):
        solver.add(patches, output_matrix(layer, y)[..., : patches.shape[-1]])


@pytest.mark.parametrize("columns", [0, 1, 2, 7, 8, 9, 64])
def test_int8_code_gram_of_few_columns_is_exact(columns):
    # torch._int_mm on the CPU gives wrong sums for one column: _code_gram must not depend on it there
    from monai_efficientq.solver import _code_gram

    torch.manual_seed(columns)
    codes = torch.randint(-127, 128, (1728, columns), dtype=torch.int8)
    assert torch.equal(_code_gram(codes).long(), codes.long() @ codes.long().t())


def test_woodbury_columns_kept_in_float32_until_joined_give_the_same_solution(monkeypatch):
    """Float32 patches convert exactly to float64: kept as they come and joined into one float64 matrix when first
    read, they give the solution of columns converted as they arrive, bit for bit."""
    from monai_efficientq import solver as solver_module

    layer, x, y, h = _problem(c_in=8, size=3, seed=3)
    w = weight_matrix(layer).detach()
    b = layer.bias.detach().reshape(w.shape[0], w.shape[1])
    y_mat = output_matrix(layer, y).float()

    def solve():
        settings = SolverSettings(iterations=20, rho_step_every=5, patience=None, solver="woodbury")
        solver = LayerSolver(w, b, UniformGrid(2, "nozero"), True, settings, y_mat.shape[-1])
        for cols, patches in input_patches(layer, x.float(), 12, torch.float32):  # several chunks
            solver.add(patches, y_mat[..., cols], h[cols].float())
        kept = [c[0].dtype for c in solver.statistics.terms.columns]
        solver.statistics.terms.joined()  # both read one joined matrix (sums over chunks would round differently)
        return solver.solve(), kept

    kept_sol, kept_dtypes = solve()
    assert len(kept_dtypes) > 1 and set(kept_dtypes) == {torch.float32}
    monkeypatch.setattr(solver_module._ColumnStatistics, "patches_dtype", lambda self, dtype: self.dtype)
    converted_sol, converted_dtypes = solve()
    assert set(converted_dtypes) == {torch.float64}
    assert torch.equal(kept_sol.codes, converted_sol.codes) and torch.equal(kept_sol.weight, converted_sol.weight)
    assert torch.equal(kept_sol.bias, converted_sol.bias)
    assert (kept_sol.error, kept_sol.rtn_error) == (converted_sol.error, converted_sol.rtn_error)
