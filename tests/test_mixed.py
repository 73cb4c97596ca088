from __future__ import annotations

import itertools
import json
import logging
import os
import random
import sys

import numpy as np
import pytest
import torch
from torch import nn

from monai_efficientq import EfficientQConfig, load_quantized, quantize_network, save_quantized
from monai_efficientq.checkpoint import packed_size, read_packed
from monai_efficientq.config import parse_size_budget
from monai_efficientq.mixed import PackedSizer, choose_widths
from monai_efficientq.report import QuantizationReport

from nets import volume


def small_net(seed: int = 0) -> nn.Module:
    """Six convolutions of different sizes: two edges and four inner layers to share a budget."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 8, 3, padding=1), nn.ReLU(),
        nn.Conv3d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv3d(16, 8, 3, padding=1), nn.ReLU(),
        nn.Conv3d(8, 8, 1), nn.ReLU(), nn.Conv3d(8, 3, 1),
    ).eval()


INNER = ["2", "4", "6", "8"]


def _run(net, budget=None, **kw):
    kw.setdefault("iterations", 4)
    kw.setdefault("calib_augment", 1)
    kw.setdefault("progress", False)
    return quantize_network(net, volume(16), EfficientQConfig(size_budget=budget, **kw))


def _minimum(net, **kw) -> int:
    """The smallest file a budgeted run says it can make (from the error a budget of one byte raises)."""
    with pytest.raises(ValueError, match="below the smallest packed checkpoint") as err:
        _run(net, 1, **kw)
    return int(str(err.value).split("allow: ")[1].split(" bytes")[0])


@pytest.fixture(scope="module")
def uniform_sizes():
    """Packed sizes of the small net at uniform widths (W8 edges), by the uniform path."""
    net = small_net()
    return {b: _run(net, weight_bits=b, method="rtn")[1].packed_bytes for b in (2, 3, 4, 8)}


# ------------------------------------------------------------------------------------------------ budget parsing
@pytest.mark.parametrize("text, expected", [
    (409600, 409600), ("400KiB", 400 * 1024), ("400 kib", 400 * 1024), ("1.5MB", 1_500_000), ("2MiB", 2 * 2**20),
    ("300000B", 300_000), ("0.5KB", 500), ("16x", 1_000_000 // 16), ("2.5x", 400_000),
])
def test_budget_units_and_ratios(text, expected):
    assert parse_size_budget(text, float_bytes=1_000_000) == expected


@pytest.mark.parametrize("bad, match", [
    ("400 kilobytes", "not a size"), ("1e5", "not a size"), ("", "not a size"), (0, "positive"), (-5, "positive"),
    (2.5, "not a size"), (True, "not a size"), ("0x", "positive"), ("0.5x", "below 1x"), ("0.1B", "less than one"),
])
def test_bad_budgets_are_refused_when_the_config_is_made(bad, match):
    with pytest.raises(ValueError, match=match):
        EfficientQConfig(size_budget=bad)


@pytest.mark.parametrize("bad", [(2, 9), (0, 2), "two", (), (2.5, 3)])
def test_bad_bits_choices_are_refused(bad):
    with pytest.raises(ValueError, match="bits_choices"):
        EfficientQConfig(bits_choices=bad)
    with pytest.raises(ValueError, match="integer grid"):
        EfficientQConfig(bits_choices=(1, 2), weight_grid="int")
    assert EfficientQConfig(bits_choices="8,2, 3").bits_choices == (2, 3, 8)
    cfg = EfficientQConfig(size_budget="16x", bits_choices=[4, 2])
    assert EfficientQConfig(**json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_a_budget_below_the_smallest_file_says_the_minimum(uniform_sizes):
    net = small_net()
    smallest = _minimum(net)
    # about the uniform W2 file (the stored config differs by the budget), and exactly the boundary
    assert abs(smallest - uniform_sizes[2]) <= 128
    _, report = _run(net, smallest, method="rtn")
    assert report.packed_bytes == smallest and {r.weight_bits for r in report.layers} == {2, 8}
    with pytest.raises(ValueError, match=f"allow: {smallest} bytes"):
        _run(net, smallest - 1)
    with pytest.raises(ValueError, match="below the smallest") as err:
        _run(net, "1000x")
    one_bit = int(str(err.value).split("bits_choices=(1, ...): about ")[1].split(" bytes")[0])  # the hint
    assert one_bit < smallest and abs(_minimum(net, bits_choices=(1, 2)) - one_bit) <= 128  # the config differs


# ------------------------------------------------------------------------------------------------ the budget holds
def test_the_file_fits_every_budget_and_the_byte_accounting_is_exact(uniform_sizes, tmp_path):
    net = small_net()
    lo, hi = _minimum(net), uniform_sizes[8]
    for i, budget in enumerate([lo, lo + 100, (lo + hi) // 2, uniform_sizes[4] - 1, hi]):
        qnet, report = _run(net, budget, method="rtn")
        path = tmp_path / f"q{i}.pt"
        save_quantized(qnet, path)
        assert report.packed_bytes == packed_size(qnet) == os.path.getsize(path) <= budget
        # the widths and size chosen before any weight was solved are those of the solved network
        assert report.allocation["packed_bytes"] == report.packed_bytes
        assert {r["name"]: r["chosen"] for r in report.sensitivity} == {r.name: r.weight_bits for r in report.layers}
        assert report.allocation["lowered_after_solve"] == []


def test_tight_budget_gives_the_lowest_widths_and_a_loose_one_the_highest(uniform_sizes):
    net = small_net()
    _, tight = _run(net, _minimum(net) + 5)  # the cheapest step up (64 weights, 2 -> 3 bits) costs 8 bytes
    _, loose = _run(net, uniform_sizes[8] + 10_000)
    assert {r.name: r.weight_bits for r in tight.layers} == {"0": 8, **{n: 2 for n in INNER}, "10": 8}
    assert {r.name: r.weight_bits for r in loose.layers} == {"0": 8, **{n: 8 for n in INNER}, "10": 8}
    _, one_bit = _run(net, uniform_sizes[2] - 1, bits_choices=(1, 2))  # one byte less than all at 2 bits
    assert one_bit.packed_bytes < uniform_sizes[2] and 1 in {r.weight_bits for r in one_bit.layers}


def test_between_budgets_the_allocation_beats_uniform_and_random_widths(uniform_sizes):
    budget = uniform_sizes[3] + 128  # room for uniform W3 with this run's config stored in the file
    _, report = _run(small_net(), budget, method="rtn")
    rows = [r for r in report.sensitivity if not r["fixed"]]
    # the objective: the summed layer errors, each made non-increasing in the width
    errors = [dict(zip(r["bits"], np.minimum.accumulate(r["errors"]))) for r in rows]
    costs = [dict(zip(r["bits"], r["code_bytes"])) for r in rows]
    chosen = [r["chosen"] for r in rows]
    assert len(set(chosen)) > 1, "a budget between the uniform sizes should mix widths"
    ours = sum(e[b] for e, b in zip(errors, chosen))
    assert ours <= sum(e[3] for e in errors)  # uniform W3 fits the budget too
    used = sum(c[b] for c, b in zip(costs, chosen))
    gen, tried = random.Random(0), 0
    for _ in range(300):  # random widths with no more code bytes do no better
        widths = [gen.choice([2, 3, 4, 8]) for _ in rows]
        if sum(c[b] for c, b in zip(costs, widths)) <= used:
            tried += 1
            assert ours <= sum(e[b] for e, b in zip(errors, widths)) + 1e-12
    assert tried > 20


def test_the_knapsack_finds_the_best_choice():
    gen = random.Random(1)
    for _ in range(30):
        n = gen.randint(1, 5)
        costs = [[0] + sorted(gen.randint(1, 400) for _ in range(3)) for _ in range(n)]
        errors = [sorted((gen.random() for _ in range(4)), reverse=True) for _ in range(n)]
        capacity = gen.randint(0, 900)
        picks = choose_widths(costs, errors, capacity)
        assert sum(c[j] for c, j in zip(costs, picks)) <= capacity
        best = min(sum(e[j] for e, j in zip(errors, combo)) for combo in itertools.product(range(4), repeat=n)
                   if sum(c[j] for c, j in zip(costs, combo)) <= capacity)
        assert sum(e[j] for e, j in zip(errors, picks)) == pytest.approx(best)


def test_an_underestimated_size_is_corrected_after_the_solve(uniform_sizes, monkeypatch, caplog):
    real = PackedSizer.__call__
    monkeypatch.setattr(PackedSizer, "__call__", lambda self, widths: real(self, widths) - 1500)
    budget = (uniform_sizes[3] + uniform_sizes[4]) // 2
    with caplog.at_level(logging.WARNING, logger="monai_efficientq"):
        qnet, report = _run(small_net(), budget)
    assert report.allocation["lowered_after_solve"], "the real file was over the budget: a layer must go down"
    assert report.packed_bytes == packed_size(qnet) <= budget
    lowered = report.allocation["lowered_after_solve"][0]
    assert {r.name: r.weight_bits for r in report.layers}[lowered] == qnet.get_submodule(lowered).weight_bits
    assert "over the budget" in caplog.text


# ------------------------------------------------------------------------------------------------ files and report
def test_a_mixed_network_with_a_1_bit_layer_saves_and_loads(uniform_sizes, tmp_path):
    net = small_net()
    qnet, report = _run(net, uniform_sizes[2], bits_choices=(1, 3, 4))  # 2 bits on average: some 1, some more
    widths = {r.name: r.weight_bits for r in report.layers}
    assert 1 in widths.values() and len(set(widths.values()) - {8}) > 1
    path = save_quantized(qnet, tmp_path / "mixed.pt", report)
    assert os.path.getsize(path) <= report.size_budget
    loaded = load_quantized(small_net(seed=1), path)
    assert {n: loaded.get_submodule(n).weight_bits for n in widths} == widths
    x = volume(16, seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(x), qnet(x))
        one_bit = next(n for n, b in widths.items() if b == 1)
        levels = loaded.get_submodule(one_bit).weight.reshape(loaded.get_submodule(one_bit).out_channels, -1)
        assert all(len(set(row.abs().tolist())) == 1 for row in levels)  # {-a, a} per channel


def test_the_report_is_stored_only_when_the_file_still_fits(uniform_sizes, tmp_path):
    net = small_net()
    qnet, report = _run(net, _minimum(net) + 50)
    tight = save_quantized(qnet, tmp_path / "tight.pt", report)
    assert os.path.getsize(tight) <= report.size_budget and "report" not in read_packed(tight)
    qnet, report = _run(net, uniform_sizes[8] + 100_000)
    loose = save_quantized(qnet, tmp_path / "loose.pt", report)
    assert read_packed(loose)["report"]["sensitivity"] == report.sensitivity


def test_the_report_has_the_sensitivity_table_and_plot(uniform_sizes, tmp_path, monkeypatch, caplog):
    budget = uniform_sizes[3]
    _, report = _run(small_net(), budget)
    text = report.to_markdown()
    assert "## Width allocation" in text and f"size budget: {budget} bytes" in text
    assert f"packed file {report.packed_bytes} bytes" in text
    for row in report.sensitivity:
        line = next(line for line in text.splitlines() if line.startswith(f"| ") and f"`{row['name']}`" in line
                    and "error" not in line and line.count("|") == 10)
        assert f" {row['chosen']}" in line.split("|")[-3]
        assert len(row["errors"]) == (1 if row["fixed"] else 4) and all(e >= 0 for e in row["errors"])
    again = QuantizationReport.from_json(report.to_json())
    assert again.sensitivity == report.sensitivity and again.size_budget == budget
    assert again.to_markdown() == text
    png = report.plot_sensitivity(tmp_path / "s.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with caplog.at_level(logging.WARNING, logger="monai_efficientq"):
        assert report.plot_sensitivity(tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists() and "matplotlib is not installed" in caplog.text
    with pytest.raises(ValueError, match="no sensitivity table"):
        _run(small_net(), None, weight_bits=3)[1].plot_sensitivity(tmp_path / "x.png")


def test_command_line_size_budget(files, capsys):
    from monai_efficientq.cli import main

    from conftest import SEGRESNET_CLASS, SEGRESNET_KWARGS

    _, ckpt, img, tmp = files
    out = tmp / "q.pt"
    main(["quantize", "--network", SEGRESNET_CLASS, "--network_kwargs", SEGRESNET_KWARGS, "--checkpoint", str(ckpt),
          "--calib", str(img), "--roi_size", "16", "--size_budget", "12x", "--bits_choices", "2,4", "--iterations", "3",
          "--calib_augment", "1", "--method", "rtn", "--output", str(out), "--quiet"])
    report = QuantizationReport.from_json(tmp / "q.json")
    assert report.size_budget == report.float_bytes // 12 and os.path.getsize(out) <= report.size_budget
    assert {r.weight_bits for r in report.layers} <= {2, 4, 8}
    assert (tmp / "q_sensitivity.png").exists() and "q_sensitivity.png" in capsys.readouterr().out
