from __future__ import annotations

import pytest

from benchmarks.pareto import choice_sets, int_list, plot_pareto, to_markdown


def test_width_sets_from_the_command_line():
    assert choice_sets("2,3,4,8;1,2,3,4,8") == [(2, 3, 4, 8), (1, 2, 3, 4, 8)]
    assert choice_sets((4, 2)) == [(2, 4)]  # fire parses 2,4 as a tuple
    assert choice_sets([[1, 2], "3,4"]) == [(1, 2), (3, 4)]
    assert int_list("2,3") == [2, 3] and int_list(4) == [4]
    with pytest.raises(ValueError, match="bits_choices"):
        choice_sets("2,9")


def test_table_and_plot_of_a_results_file(tmp_path):
    rows = [
        {"name": "float", "kind": "float", "packed_bytes": 4000, "mean_dice": 0.85, "status": "ok"},
        {"name": "uniform W2", "kind": "uniform", "bits": 2, "packed_bytes": 300, "mean_dice": 0.83, "status": "ok"},
        {"name": "uniform W3", "kind": "uniform", "bits": 3, "packed_bytes": 450, "mean_dice": 0.845, "status": "ok"},
        {"name": "mixed {1,2} at W2 size", "kind": "mixed", "bits_choices": [1, 2], "packed_bytes": 299,
         "mean_dice": 0.84, "status": "ok", "dice_gain_vs_uniform": 0.01, "width_counts": {"W1": 2, "W2": 3}},
        {"name": "mixed {2,3} at W2 size", "kind": "mixed", "bits_choices": [2, 3], "status": "not run: too small"},
        {"name": "brevitas_gptq W2", "kind": "brevitas", "method": "brevitas_gptq", "bits": 2, "packed_bytes": 300,
         "brevitas_file_bytes": 9000, "mean_dice": 0.7, "status": "ok", "layers_optimised": "3/3"},
    ]
    results = {"meta": {"network": "Net"}, "rows": rows}
    text = to_markdown(results)
    assert "| mixed {1,2} at W2 size | 299 |" in text and "W1: 2, W2: 3" in text and "not run: too small" in text
    assert "| brevitas_gptq W2 | 300 |" in text and "9000-byte float state dict" in text
    png = plot_pareto(results, str(tmp_path / "p.png"))
    with open(png, "rb") as f:
        assert f.read(4) == b"\x89PNG"
