from __future__ import annotations

import math

import pytest
import torch

from monai_efficientq import quantizer as quantizer_module
from monai_efficientq.quantizer import ActQuantizer, UniformGrid, fit_scale, pack_codes, quantize_rtn, unpack_codes


def test_nozero_grid_levels():
    g = UniformGrid(2, "nozero")
    levels = g.levels(torch.arange(4), torch.float64)
    assert torch.allclose(levels, torch.tensor([-1, -1 / 3, 1 / 3, 1], dtype=torch.float64))
    assert 0.0 not in UniformGrid(3, "nozero").levels(torch.arange(8)).tolist()


def test_int_grid_has_zero():
    g = UniformGrid(3, "int")
    assert g.levels(torch.arange(8)).tolist() == [-4, -3, -2, -1, 0, 1, 2, 3]


def _brute_force_error(v: torch.Tensor, grid: UniformGrid, n: int = 4000) -> float:
    best = float("inf")
    vmax = float(v.abs().max())
    for a in torch.linspace(vmax / grid.max_abs * 0.02, vmax / grid.max_abs * 1.5, n, dtype=torch.float64):
        q = a * grid.levels(grid.codes(v / a), torch.float64)
        best = min(best, float((v - q).pow(2).sum()))
    return best


@pytest.mark.parametrize("kind", ["nozero", "int"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_scale_fit_at_least_as_good_as_brute_force(kind, bits):
    gen = torch.Generator().manual_seed(bits)
    grid = UniformGrid(bits, kind)
    for trial in range(4):
        v = torch.randn(40, generator=gen, dtype=torch.float64) * (trial + 1)
        if trial == 3:
            v = v ** 3  # heavy tails
        scale, codes = fit_scale(v, grid)
        ours = float((v - scale * grid.levels(codes, torch.float64)).pow(2).sum())
        assert ours <= _brute_force_error(v, grid) * (1 + 1e-9) + 1e-12


def test_scale_fit_per_row_and_zero_row():
    v = torch.randn(3, 50, dtype=torch.float64)
    v[1] = 0
    v[2] *= 100
    scale, codes = fit_scale(v, UniformGrid(2, "nozero"), per_row=True)
    assert scale.shape == (3, 1)
    assert scale[1, 0] == 0  # all-zero row is represented exactly
    assert scale[2, 0] > 30 * scale[0, 0]
    deq = scale * UniformGrid(2, "nozero").levels(codes, torch.float64)
    assert torch.equal(deq[1], torch.zeros(50, dtype=torch.float64))


def test_scale_fit_never_raises_on_nonconvergence():
    v = torch.randn(1000, dtype=torch.float64)
    scale, codes = fit_scale(v, UniformGrid(4, "int"), max_iter=1)
    assert scale.item() > 0 and codes.shape == v.shape


def test_rtn_returns_consistent_scale_and_codes():
    w = torch.randn(8, 27)
    deq, scale, codes = quantize_rtn(w, UniformGrid(3, "nozero"), per_row=True)
    assert torch.allclose(deq, (scale * UniformGrid(3, "nozero").levels(codes, torch.float64)).float())
    assert len(torch.unique(deq[0])) <= 8


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_pack_unpack_roundtrip(bits):
    gen = torch.Generator().manual_seed(bits)
    for numel in (1, 7, 8, 9, 1001):
        codes = torch.randint(0, 2**bits, (numel,), generator=gen)
        packed = pack_codes(codes, bits)
        assert packed.dtype == torch.uint8
        assert packed.numel() == (numel * bits + 7) // 8
        assert torch.equal(unpack_codes(packed, bits, numel), codes)


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([0, 4]), 2)
    with pytest.raises(ValueError, match="do not hold"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 2, 100)


def test_act_quantizer_unsigned_on_relu_input():
    x = torch.relu(torch.randn(10000))
    q = ActQuantizer(2).fit(x)
    out = q(x)
    assert float(q.offset) == 0.0
    assert len(torch.unique(out)) <= 4 and float(out.min()) == 0.0


def test_act_quantizer_signed_keeps_negative_signal():
    x = torch.randn(20000)
    unsigned = ActQuantizer(2, signed=False).fit(x)
    signed = ActQuantizer(2, signed=True).fit(x)
    err_u = float((unsigned(x) - x).pow(2).mean())
    err_s = float((signed(x) - x).pow(2).mean())
    assert float(signed(x).min()) < 0
    assert err_s < 0.6 * err_u


def _alternate_each_start(v, starts, grid, max_iter, rtol):
    """Reference for the multi-start scale fit: every start of every row iterated on its own, best kept."""
    best = torch.full((v.shape[0], 1), float("inf"), dtype=torch.float64)
    best_scale = torch.zeros_like(best)
    for start in starts:
        for r in range(v.shape[0]):
            a = float(start[r])
            for it in range(max_iter + 1):
                lv = grid.levels(grid.codes(v[r] / a), torch.float64)
                err = float(((v[r] - a * lv) ** 2).sum())
                if err < best[r]:
                    best[r], best_scale[r] = err, a
                if it == max_iter or float((lv * lv).sum()) == 0:
                    break
                new = float((lv * v[r]).sum() / (lv * lv).sum())
                if new <= 0 or abs(new - a) <= rtol * a:
                    break
                a = new
    return best_scale, best


@pytest.mark.parametrize("bits, kind", [(2, "nozero"), (3, "int"), (4, "nozero")])
def test_vectorised_multi_start_fit_matches_one_start_at_a_time(bits, kind):
    from monai_efficientq.quantizer import _best_of_starts

    torch.manual_seed(bits)
    v = (torch.randn(6, 200) * torch.rand(6, 1) * 3).double()
    grid = UniformGrid(bits, kind)
    starts = torch.stack([v.abs().mean(1, keepdim=True) * f for f in (0.5, 1.0, 2.0, 3.0)])
    scale = _best_of_starts(v, starts, grid, max_iter=30, rtol=1e-5)
    _, ref_err = _alternate_each_start(v, starts, grid, 30, 1e-5)
    err = ((v - scale * grid.levels(grid.codes(v / scale), torch.float64)) ** 2).sum(1, keepdim=True)
    assert torch.allclose(err, ref_err, rtol=1e-10)


def test_warm_projection_equals_the_warm_started_fit():
    from monai_efficientq.quantizer import project_to_grid

    torch.manual_seed(0)
    v = torch.randn(5, 40, dtype=torch.float64)
    grid = UniformGrid(2, "nozero")
    init = v.abs().mean(1, keepdim=True)
    scale, codes = fit_scale(v, grid, per_row=True, init=init)
    scale2, codes2, projected = project_to_grid(v, grid, True, init)
    assert torch.equal(scale, scale2) and torch.equal(codes, codes2.to(torch.int64))
    assert torch.allclose(projected, scale * grid.levels(codes, torch.float64))


@pytest.mark.parametrize("signed", [False, True])
def test_act_quantizer_writes_into_a_given_buffer(signed):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5) * 2
    quant = ActQuantizer(2, signed=signed).fit(x)
    out = torch.full_like(x, float("nan"))
    written = quant.quantize(x, out=out)
    assert written.data_ptr() == out.data_ptr()
    assert torch.equal(out, quant(x))
    assert torch.unique(out).numel() <= 4


@pytest.mark.parametrize("kind, bits, rows, n", [("unsigned", 2, 1, 5000), ("nozero", 2, 6, 433), ("int", 4, 3, 217)])
def test_sweep_errors_equal_a_direct_quantization(kind, bits, rows, n):
    from monai_efficientq.quantizer import _sweep_errors

    torch.manual_seed(3)
    grid = UniformGrid(bits, kind)
    v = torch.randn(rows, n, dtype=torch.float64)
    v = v.relu() if kind == "unsigned" else v
    scales = torch.linspace(0.05, 1.5, 40, dtype=torch.float64).view(-1, 1, 1) * v.abs().amax(1, keepdim=True)
    scales = scales / grid.max_abs
    # the direct error: every value rounded to its nearest level at every scale
    normalised = v / scales
    codes = torch.round((normalised - grid.first) / grid.step).clamp(0, grid.num_levels - 1)
    direct = (v - scales * (grid.first + codes * grid.step)).pow(2).sum(dim=-1, keepdim=True)
    swept = _sweep_errors(v, scales, grid)
    assert swept.shape == direct.shape == (40, rows, 1)
    assert torch.allclose(swept, direct, rtol=1e-10, atol=1e-12)
    assert torch.equal(swept.argmin(dim=0), direct.argmin(dim=0))


@pytest.mark.parametrize("bits, block", [(2, 1 << 22), (4, 1 << 22), (7, 1 << 22), (2, 7)])
def test_act_quantizer_codes_times_step_are_its_output(bits, block, monkeypatch):
    monkeypatch.setattr(quantizer_module, "_CODES_BLOCK", block)  # 7: many blocks, the last one partial
    torch.manual_seed(1)
    x = torch.rand(2, 3, 6, 6) * 5
    quant = ActQuantizer(bits).fit(x)
    codes = quant.codes(x)
    assert codes.dtype == torch.int8 and int(codes.min()) >= 0 and int(codes.max()) <= quant.num_levels - 1
    assert torch.equal(codes.float() * quant.step, quant(x))  # bit for bit: what the Gram sums stand for
    assert torch.equal(quant.codes(quant(x)), codes)  # the codes of an already quantized input are its own


@pytest.mark.parametrize("signed", [False, True])
def test_act_quantizer_quantize_by_blocks_is_the_whole_tensor_arithmetic(signed, monkeypatch):
    torch.manual_seed(2)
    x = torch.randn(2, 3, 5, 7) * 3
    quant = ActQuantizer(3, signed=signed).fit(x)
    whole = quant._quantize_into(x, torch.empty_like(x))  # the four element-wise passes over the whole tensor
    monkeypatch.setattr(quantizer_module, "_CODES_BLOCK", 7)  # many blocks, the last one partial
    assert torch.equal(quant.quantize(x), whole)
    buffer = torch.full_like(x, float("nan"))
    assert quant.quantize(x, out=buffer) is buffer and torch.equal(buffer, whole)
    channels_last = x.permute(0, 2, 3, 1)  # not contiguous: one pass over the whole tensor
    assert torch.equal(quant.quantize(channels_last), whole.permute(0, 2, 3, 1))
    assert len({float(v) for v in whole.unique()}) <= quant.num_levels


@pytest.mark.parametrize("bits, signed", [(8, False), (2, True)])
def test_act_quantizer_codes_need_an_unsigned_grid_of_at_most_7_bits(bits, signed):
    quant = ActQuantizer(bits, signed=signed).fit(torch.randn(100))
    assert not quant.has_int8_codes
    with pytest.raises(ValueError, match="unsigned grid of at most 7 bits"):
        quant.codes(torch.randn(10))


def _sample(kind: str, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    return {"relu": x.relu(), "shifted": 3 * x + 0.5, "cubed": torch.rand(n, generator=gen, dtype=torch.float64) ** 3,
            "lognormal": x.exp()}[kind]


def test_sorted_rows_runs_equal_direct_sums():
    from monai_efficientq.quantizer import _SortedRows

    v = torch.stack([_sample("shifted", 3001, 0), _sample("lognormal", 3001, 1)])
    v[0, :50] = 1.25  # values equal to a boundary belong to the run above it
    boundaries = torch.tensor([[[-2.0, 0.0, 1.25], [-10.0, -9.0, 10.0]], [[0.5, 1.0, 2.0], [0.1, 0.2, 9.0]]],
                              dtype=torch.float64)  # (rows, 2 sets, L - 1)
    counts, sums, squares = _SortedRows(v).runs(boundaries, squares=True)
    assert counts.shape == sums.shape == squares.shape == (2, 2, 4)
    for row in range(2):
        for k in range(2):
            edges = [-math.inf] + boundaries[row, k].tolist() + [math.inf]
            for j in range(4):
                inside = (v[row] >= edges[j]) & (v[row] < edges[j + 1])
                assert counts[row, k, j] == inside.sum()
                assert torch.isclose(sums[row, k, j], v[row][inside].sum(), rtol=1e-12, atol=1e-9)
                assert torch.isclose(squares[row, k, j], (v[row][inside] ** 2).sum(), rtol=1e-12, atol=1e-9)


def _direct_best_of_starts(v, starts, grid, max_iter, rtol):
    """The reference of _best_of_starts: the same alternation and compaction, every step quantizing the values."""
    num_starts, rows = starts.shape[0], v.shape[0]
    pair_v = v.repeat(num_starts, 1)
    pair_vv = (pair_v * pair_v).sum(dim=-1, keepdim=True)
    scale = starts.reshape(-1, 1).clone()
    best_err, best_scale = torch.full_like(scale, math.inf), scale.clone()
    active = torch.arange(scale.shape[0])
    for it in range(max_iter + 1):
        sv, sa = pair_v[active], scale[active]
        codes = torch.round((sv / sa - grid.first) / grid.step).clamp(0, grid.num_levels - 1)
        levels = grid.first + grid.step * codes
        vl, ll = (levels * sv).sum(-1, keepdim=True), (levels * levels).sum(-1, keepdim=True)
        err = pair_vv[active] - 2 * sa * vl + sa * sa * ll
        better = err < best_err[active]
        best_err[active] = torch.where(better, err, best_err[active])
        best_scale[active] = torch.where(better, sa, best_scale[active])
        if it == max_iter:
            break
        new = torch.where((ll > 0) & (vl / ll > 0), vl / ll.clamp_min(1e-300), sa)
        moving = ((new - sa).abs() > rtol * sa).squeeze(1)
        scale[active] = new
        if int(moving.sum()) == 0:
            break
        if int(moving.sum()) < 0.75 * active.numel():
            active = active[moving]
    which = best_err.reshape(num_starts, rows, 1).argmin(dim=0, keepdim=True)
    return best_scale.reshape(num_starts, rows, 1).gather(0, which).squeeze(0)


def _fit_scale_starts(v: torch.Tensor, grid: UniformGrid) -> torch.Tensor:
    """The starts fit_scale takes for rows ``v``: the mean magnitude and the 4 best of its sweep."""
    from monai_efficientq.quantizer import _best_of_sweep

    unit = v.abs().amax(1, keepdim=True) / grid.max_abs
    points = int(min(128, max(16, 2**22 // v.numel())))
    return torch.stack([v.abs().mean(1, keepdim=True)] + list(_best_of_sweep(v, unit, grid, points, keep=4)))


# unsigned single rows (activation samples) where stopping each start on its own instead of compacting picks
# another scale, and weight-like rows
@pytest.mark.parametrize("kind, bits, rows, n, seed, sample", [
    ("unsigned", 8, 1, 5000, 23, "relu"), ("unsigned", 8, 1, 1000, 28, "cubed"), ("unsigned", 8, 1, 5000, 29, "cubed"),
    ("unsigned", 8, 1, 5000, 35, "lognormal"), ("unsigned", 2, 1, 5000, 0, "relu"),
    ("nozero", 2, 16, 216, 1, "shifted"),
    ("nozero", 3, 8, 1729, 2, "lognormal"), ("int", 4, 5, 433, 3, "shifted"),
])
def test_scale_fit_from_sorted_runs_equals_the_fit_that_quantizes(kind, bits, rows, n, seed, sample):
    from monai_efficientq.quantizer import _best_of_starts

    grid = UniformGrid(bits, kind)
    v = torch.stack([_sample(sample, n, seed + 100 * r) for r in range(rows)])
    v = v - v.mean(1, keepdim=True) if kind != "unsigned" else v
    starts = _fit_scale_starts(v, grid)
    direct = _direct_best_of_starts(v, starts, grid, 30, 1e-5)
    assert torch.allclose(_best_of_starts(v, starts, grid, 30, 1e-5), direct, rtol=1e-12, atol=0)


def _direct_affine_fit(v: torch.Tensor, num_levels: int, max_iter: int) -> tuple[float, float]:
    """The reference of _fit_affine: every step rounds every value (written out here, independently)."""
    last = num_levels - 1
    lo_all, hi_all = float(v.min()), float(v.max())
    ordered = v.sort().values
    best = (math.inf, lo_all, (hi_all - lo_all) / last)
    for q in (0.0, 1e-4, 1e-3, 1e-2, 3e-2):
        i_lo = int(q * (v.numel() - 1))
        lo, hi = float(ordered[i_lo]), float(ordered[v.numel() - 1 - i_lo])
        offset, step = lo, (hi - lo) / last if hi > lo else (hi_all - lo_all) / last
        for _ in range(max_iter):
            k = torch.clamp(torch.round((v - offset) / step), 0, last)
            err = float((v - offset - step * k).pow(2).sum())
            if err < best[0]:
                best = (err, offset, step)
            n, sk, skk, sv, skv = v.numel(), float(k.sum()), float((k * k).sum()), float(v.sum()), float((k * v).sum())
            det = n * skk - sk * sk
            if det <= 0:
                break
            new_offset, new_step = (skk * sv - sk * skv) / det, (n * skv - sk * sv) / det
            if new_step <= 0:
                break
            moved = abs(new_step - step) / step + abs(new_offset - offset) / (abs(step) * last)
            offset, step = new_offset, new_step
            if moved < 1e-7:
                break
        k = torch.clamp(torch.round((v - offset) / step), 0, last)
        err = float((v - offset - step * k).pow(2).sum())
        if err < best[0]:
            best = (err, offset, step)
    return best[1], best[2]


@pytest.mark.parametrize("kind", ["shifted", "lognormal"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_affine_fit_equals_the_fit_that_quantizes_the_sample(kind, bits):
    from monai_efficientq.quantizer import _fit_affine

    for seed, n in ((0, 500), (1, 4000)):
        v = _sample(kind, n, seed)
        offset, step = _fit_affine(v, 2**bits, 50)
        ref_offset, ref_step = _direct_affine_fit(v, 2**bits, 50)
        assert step == pytest.approx(ref_step, rel=1e-9)
        assert offset == pytest.approx(ref_offset, rel=1e-9, abs=1e-9 * ref_step)
