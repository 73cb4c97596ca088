from __future__ import annotations

import pytest
import torch

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
