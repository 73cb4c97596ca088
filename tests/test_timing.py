from __future__ import annotations

import time

import pytest

from monai_efficientq import EfficientQConfig, quantize_network
from monai_efficientq.timing import PHASES, PhaseTimer

from nets import tiny_segresnet, volume


def test_phase_timer_adds_per_phase_and_reports_the_difference():
    timer = PhaseTimer()
    with timer("gram"):
        time.sleep(0.01)
    before = timer.snapshot()
    with timer("admm_solve"):
        time.sleep(0.01)
    timer.add("gram", 0.5)
    assert before["gram"] >= 0.01 and "admm_solve" not in before
    since = timer.since(before)
    assert set(since) == {"gram", "admm_solve"} and since["gram"] == pytest.approx(0.5)
    assert list(timer.snapshot()) == ["gram", "admm_solve"]  # in PHASES order
    with pytest.raises(KeyError), timer("setup"):
        raise KeyError("the phase is charged even when its body fails")
    assert timer.seconds["setup"] >= 0


@pytest.mark.parametrize("method", ["efficientq", "rtn"])
def test_report_splits_the_run_into_phases(method):
    cfg = EfficientQConfig(weight_bits=2, act_bits=4, iterations=5, method=method, progress=False)
    _, report = quantize_network(tiny_segresnet(), volume(16), cfg)
    phases = report.phase_seconds
    assert set(phases) <= set(PHASES) | {"other"}
    expected = {"setup", "targets", "act_fit", "scale_fit", "errors"}
    expected |= {"gram", "admm_solve", "admm_project", "admm_rank"} if method == "efficientq" else set()
    assert expected <= set(phases)
    if method == "rtn":
        assert not {"gram", "admm_solve"} & set(phases)
    assert sum(phases.values()) == pytest.approx(report.total_seconds, rel=0.02, abs=0.01)
    assert all(s >= 0 for s in phases.values())
    # each layer's own split covers what it spent in the solver
    for record in report.layers:
        assert sum(record.phase_seconds.values()) <= record.seconds + 1e-3
    text = report.to_markdown()
    assert "## Where the time went" in text and "| act_fit |" in text and PHASES["act_fit"] in text
    assert "| iterations |" in text
