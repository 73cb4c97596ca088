from __future__ import annotations

import json

import torch

from monai_efficientq.report import LayerRecord, QuantizationReport
from monai_efficientq.solver import LayerSolution

#: The keys of one layer in a saved report (reports on disk and their readers use them).
LAYER_KEYS = [
    "name", "type", "shape", "weight_bits", "act_bits", "act_signed", "rtn_error", "error", "rtn_error_weighted",
    "error_weighted", "best_iteration", "solver", "seconds", "held_out_rtn_error", "held_out_error",
    "iterations_run", "phase_seconds",
]


def _solution() -> LayerSolution:
    w = torch.zeros(1, 2, 3)
    return LayerSolution(
        codes=w.long(), scale=torch.ones(2, 1), weight=w, bias=None, rtn_weight=w, rtn_error=0.5,
        rtn_error_weighted=0.4, error=0.25, error_weighted=0.2, best_iteration=7, solver="woodbury", seconds=99.0,
        s=3.0, held_out_rtn_error=0.6, held_out_error=0.3, iterations_run=12,
    )


def _record(**changes) -> LayerRecord:
    layer = dict(name="conv", type="Conv3d", shape=[2, 1, 3, 1, 1], weight_bits=2, act_bits=4, act_signed=False,
                 seconds=1.5, phase_seconds={"gram": 0.5})
    return LayerRecord.from_solution(_solution(), **{**layer, **changes})


def test_a_record_takes_the_solutions_results_and_the_layers_time():
    record = _record()
    assert (record.rtn_error, record.rtn_error_weighted, record.error, record.error_weighted) == (0.5, 0.4, 0.25, 0.2)
    assert (record.held_out_rtn_error, record.held_out_error) == (0.6, 0.3)
    assert (record.best_iteration, record.solver, record.iterations_run) == (7, "woodbury", 12)
    assert record.seconds == 1.5 and record.phase_seconds == {"gram": 0.5}  # the layer's, not the solve's 99 s
    assert _record(solver="rtn").solver == "rtn"  # a given field wins


def test_the_saved_layer_keys_and_a_round_trip():
    report = QuantizationReport(config={"weight_bits": 2}, layers=[_record()], float_bytes=400, packed_bytes=100)
    saved = json.loads(report.to_json())
    assert list(saved["layers"][0]) == LAYER_KEYS
    assert saved["compression"] == 4.0
    assert QuantizationReport.from_json(json.dumps(saved)) == report


def test_markdown_has_every_section_and_the_held_out_columns():
    report = QuantizationReport(
        config={"method": "efficientq", "act_bits": 2, "calib_augment": 2}, layers=[_record(), _record(name="out")],
        float_layers=[{"name": "norm", "type": "GroupNorm", "reason": "normalization/activation; float by design"}],
        phase_seconds={"gram": 1.0, "other": 0.5}, total_seconds=2.0, dice={"float": {"class0": 0.9}},
        float_bytes=400, packed_bytes=100,
    )
    text = report.to_markdown()
    for heading in ("## Dice", "## Where the time went", "## Layers", "## Left in float"):
        assert heading in text
    assert "held-out RTN error | held-out error |" in text and "| 0.6 | 0.3 |" in text
    assert "and 2 augmented copies of each" in text and "(4.0x smaller)" in text
    rows = [line for line in text.splitlines() if line.startswith("| 1 | `out`")]
    assert len(rows) == 1 and rows[0].count("|") == 15  # 14 columns with the held-out ones
