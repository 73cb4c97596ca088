from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from monai_efficientq import ranking
from monai_efficientq.ranking import ColumnRanker, GramRanker
from monai_efficientq.quantizer import UniformGrid

GRID = UniformGrid(2, "nozero")


def _columns(groups=2, rows=3, k=7, p=50, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(groups, k, p, generator=g, dtype=torch.float64)
    if bias:
        x = torch.cat([x, torch.ones(groups, 1, p, dtype=torch.float64)], dim=1)
    y = torch.randn(groups, rows, p, generator=g, dtype=torch.float64)
    h = torch.rand(p, generator=g, dtype=torch.float64) + 0.5
    return x, y, h


def _candidates(groups, rows, k, count, per_row=True, seed=1):
    """A walk of candidates: random codes, then one or two codes changed per step, a full reshuffle at step 5."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 4, (groups, rows, k), generator=g).double()
    walk = []
    for step in range(count):
        if step == 5:
            codes = torch.randint(0, 4, codes.shape, generator=g).double()
        elif step:
            codes = codes.clone()
            for _ in range(int(torch.randint(0, 3, (1,), generator=g))):
                i = [int(torch.randint(0, n, (1,), generator=g)) for n in codes.shape]
                codes[i[0], i[1], i[2]] = float(torch.randint(0, 4, (1,), generator=g))
        scale = torch.rand(groups * rows if per_row else 1, 1, generator=g, dtype=torch.float64) + 0.2
        bias = torch.randn(groups, rows, generator=g, dtype=torch.float64)
        walk.append((codes, scale, bias))
    return walk


def _direct(x, y, h, codes, scale, bias):
    levels = GRID.levels(codes, torch.float64)
    weight = levels * (scale.reshape(levels.shape[0], levels.shape[1], 1) if scale.numel() > 1 else scale)
    wb = torch.cat([weight, bias.unsqueeze(-1)], dim=-1) if bias is not None else weight
    e2 = (wb @ x - y).pow(2)
    return float((e2 * h).sum()) if h is not None else float(e2.sum())


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("per_row", [True, False])
def test_gram_ranker_follows_a_walk_of_candidates(bias, per_row, monkeypatch):
    monkeypatch.setattr(ranking, "REFRESH_EVERY", 6)  # a refresh inside the walk, besides the reshuffle at step 5
    monkeypatch.setattr(ranking, "DIRECT_BELOW", 0)  # these small layers would be recomputed every time
    x, y, h = _columns(bias=bias)
    xh = x * h
    terms = SimpleNamespace(A=xh @ x.transpose(1, 2), B=(y * h) @ x.transpose(1, 2), yy=float((y * y * h).sum()))
    ranker = GramRanker(terms, GRID, has_bias=bias)
    updates = 0
    for codes, scale, b in _candidates(2, 3, 7, 20, per_row):
        b = b if bias else None
        assert ranker.error(codes, scale, b) == pytest.approx(_direct(x, y, h, codes, scale, b), rel=1e-10)
        updates += ranker._tracker.updates > 0
        product = ranker._product
        assert torch.allclose(product, GRID.levels(codes, torch.float64) @ terms.A[..., :7, :], rtol=1e-12, atol=1e-12)
    assert updates >= 10  # most steps were incremental updates, not recomputations


@pytest.mark.parametrize("weighted", [True, False])
def test_column_ranker_follows_a_walk_and_a_join_of_its_chunks(weighted, monkeypatch):
    monkeypatch.setattr(ranking, "DIRECT_BELOW", 0)
    x, y, h = _columns(p=60)
    chunks = [(x[..., :25], y[..., :25], h[:25]), (x[..., 25:], y[..., 25:], h[25:])]
    terms = SimpleNamespace(columns=list(chunks))
    ranker = ColumnRanker(terms, GRID, has_bias=True, weighted=weighted)
    for step, (codes, scale, b) in enumerate(_candidates(2, 3, 7, 12)):
        if step == 7:  # the solver joins its chunks once the V-step starts
            terms.columns = [(x, y, h)]
        expected = _direct(x, y, h if weighted else None, codes, scale, b)
        assert ranker.error(codes, scale, b) == pytest.approx(expected, rel=1e-10)
    assert len(ranker._products) == 1 and ranker._chunks[0] is x


def test_many_changed_codes_recompute_the_product(monkeypatch):
    monkeypatch.setattr(ranking, "DIRECT_BELOW", 0)
    x, y, h = _columns()
    terms = SimpleNamespace(A=x @ x.transpose(1, 2), B=y @ x.transpose(1, 2), yy=float((y * y).sum()))
    ranker = GramRanker(terms, GRID, has_bias=True)
    walk = _candidates(2, 3, 7, 6)
    for codes, scale, b in walk[:5]:
        ranker.error(codes, scale, b)
    assert ranker._tracker.updates > 0
    ranker.error(*walk[5])  # every code redrawn
    assert ranker._tracker.updates == 0


def test_small_layers_recompute_the_product_every_time():
    x, y, h = _columns()
    terms = SimpleNamespace(A=x @ x.transpose(1, 2), B=y @ x.transpose(1, 2), yy=float((y * y).sum()))
    ranker = GramRanker(terms, GRID, has_bias=True)
    for codes, scale, b in _candidates(2, 3, 7, 4):
        assert ranker.error(codes, scale, b) == pytest.approx(_direct(x, y, None, codes, scale, b), rel=1e-10)
    assert ranker._tracker.levels is None  # no bookkeeping below DIRECT_BELOW
