"""Unit tests of the benchmarks package's pieces: settings, config, method registry, evaluator, plan, report."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
from torch import nn

from benchmarks.config import CompareConfig, Setting, as_dict, as_list, command_signature, spatial_size
from benchmarks.data import load_run_data
from benchmarks.evaluation import Evaluator, nanmean
from benchmarks.measure import run_in_fresh_process
from benchmarks.methods import METHODS, get_method, method_names
from benchmarks.plan import float_plan
from benchmarks.report import to_markdown

ALL_METHODS = ["float", "rtn", "eq_original", "eq_default", "brevitas_rtn", "brevitas_biascorr", "brevitas_gptq",
               "brevitas_gpfq", "brevitas_learned_round"]


@pytest.mark.parametrize(
    "name, expected",
    [("W2", ("W2", 2, None)), ("w4a4", ("W4A4", 4, 4)), (" W3A2 ", ("W3A2", 3, 2)), ("W8", ("W8", 8, None))],
)
def test_setting_parse(name, expected):
    setting = Setting.parse(name)
    assert (setting.name, setting.weight_bits, setting.act_bits) == expected


@pytest.mark.parametrize("name", ["A2", "W", "W2A", "WxA2", "2", "W2B2"])
def test_setting_parse_rejects_other_text(name):
    with pytest.raises(ValueError, match="W<bits>"):
        Setting.parse(name)


def test_flag_parsers():
    assert as_list("rtn, eq_default") == ["rtn", "eq_default"]
    assert as_list("[W2,'W4']") == ["W2", "W4"]
    assert as_list(("float", "rtn")) == ["float", "rtn"]  # fire parses a,b into a tuple
    assert as_list(None) == []
    assert as_dict({"holdout": "false", "x": "null", "n": 2}) == {"holdout": False, "x": None, "n": 2}
    assert as_dict('{"holdout": true}') == {"holdout": True}
    assert as_dict(None) == {} and as_dict("") == {}
    with pytest.raises(ValueError, match="JSON object"):
        as_dict("[1, 2]")
    assert spatial_size(96, 3) == (96, 96, 96)
    assert spatial_size("64,32,16", 3) == (64, 32, 16)
    assert spatial_size([48], 3) == (48, 48, 48)
    assert spatial_size("full", 3) is None and spatial_size(None, 2) is None
    with pytest.raises(ValueError, match="expected 3 sizes"):
        spatial_size((64, 32), 3)


def test_registry_lists_every_method_and_unknown_names_fail_clearly():
    assert method_names() == ALL_METHODS
    assert get_method("eq_default").name == "eq_default"
    with pytest.raises(ValueError) as err:
        get_method("gptq")
    message = str(err.value)
    assert "unknown method 'gptq'" in message
    assert all(name in message for name in ALL_METHODS)
    with pytest.raises(ValueError, match="unknown method 'nope'.*brevitas_gptq"):
        CompareConfig(methods="float,rtn,nope")


def test_every_method_follows_the_protocol():
    for name, method in METHODS.items():
        assert method.name == name and method.checkpoint_kind
        assert callable(method.quantize) and callable(method.save)
        assert method.missing_requirement() is None or "pip install" in method.missing_requirement()
    assert get_method("rtn").missing_requirement() is None  # ours needs nothing but the package


def test_our_methods_build_their_configs():
    cfg = CompareConfig(iterations=7, prediction="sigmoid", eq_options='{"attention": "none", "patience": null}')
    w2a2 = Setting.parse("W2A2")
    rtn = get_method("rtn").config(w2a2, cfg)
    assert (rtn.method, rtn.preset, rtn.weight_bits, rtn.act_bits) == ("rtn", "default", 2, 2)
    original = get_method("eq_original").config(Setting.parse("W4"), cfg)
    assert (original.method, original.preset, original.act_bits) == ("efficientq", "original", None)
    for eq in (rtn, original):
        assert (eq.iterations, eq.prediction, eq.first_last_bits, eq.progress) == (7, "sigmoid", 8, False)
        assert eq.attention == "none" and eq.patience is None  # the run's eq_options override the preset


def test_config_normalises_the_flags():
    cfg = CompareConfig(methods=("float", "rtn"), settings="w2,W4a4", class_names="bg,a", out="run/results.json")
    assert cfg.methods == ["float", "rtn"] and cfg.settings == ["W2", "W4A4"]
    assert [s.act_bits for s in cfg.setting_list] == [None, 4]
    assert cfg.class_names == ["bg", "a"] and cfg.eq_options == {}
    assert cfg.markdown_path == os.path.join("run", "results.md")
    assert CompareConfig(markdown="t.md").markdown_path == "t.md"
    assert CompareConfig().methods == ALL_METHODS and CompareConfig().settings == ["W4", "W3", "W2", "W4A4", "W3A3", "W2A2"]
    assert CompareConfig(device="cpu").isolated and not CompareConfig(device="cuda").isolated
    assert not CompareConfig(isolate=False).isolated and not CompareConfig(isolate="False").isolated
    assert CompareConfig(device="cuda", isolate=True).isolated


def test_config_rejects_bad_values_with_the_valid_ones():
    with pytest.raises(ValueError, match="no_such_field.*valid: .*eta_factor"):
        CompareConfig(eq_options={"no_such_field": 1})
    with pytest.raises(ValueError, match="softmax, sigmoid"):
        CompareConfig(prediction="argmax")
    with pytest.raises(ValueError, match="stats, mse"):
        CompareConfig(brevitas_weight_scale="minmax")
    with pytest.raises(ValueError, match="2 calibration images but 1 labels"):
        load_run_data(CompareConfig(calib_image="a.nii,b.nii", calib_label="a_label.nii", out=None))
    with pytest.raises(ValueError, match="give --calib_image"):
        load_run_data(CompareConfig(out=None))


def test_command_signature_is_the_config_fields():
    params = command_signature().parameters
    fields = dataclasses.fields(CompareConfig)
    assert list(params) == [f.name for f in fields]
    assert all(params[f.name].default == f.default for f in fields)


def test_nanmean_skips_missing_values():
    assert nanmean([None, math.nan, 1.0, 2.0]) == 1.5
    assert nanmean([None, math.nan]) is None


class _FixedLogits(nn.Module):
    """Returns the same logits whatever the input (one sliding window covers the volume)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], *self.logits.shape[1:])


def _one_hot_logits(classes: torch.Tensor, channels: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(classes.long(), channels).movedim(-1, 0)[None].float() * 10


def test_evaluator_dice_equals_the_hand_computed_value():
    label = torch.zeros(1, 4, 4, 4)
    label[0, :2, :2, :2] = 1  # class a: 8 voxels
    label[0, 2:, 2:, 2:] = 2  # class b: 8 voxels
    pred = torch.zeros(4, 4, 4)
    pred[0] = 1  # class a predicted on the z=0 plane: 16 voxels, 4 of them in the label's a
    pred[2:, 2:, 2:] = 2  # class b exactly; class c (channel 3) absent from prediction and label
    net = _FixedLogits(_one_hot_logits(pred, 4))
    evaluator = Evaluator([(torch.zeros(1, 4, 4, 4), label)], (4, 4, 4), class_names=["bg", "a", "b"])
    scores, predictions = evaluator.evaluate(net)
    assert list(scores["dice"]) == ["a", "b", "class3"]  # background left out, missing names filled in
    assert scores["dice"]["a"] == pytest.approx(2 * 4 / (8 + 16))
    assert scores["dice"]["b"] == pytest.approx(1.0)
    # a class absent from every label: DiceMetric leaves each case out (NaN), and mean_batch of no case gives 0
    assert scores["dice"]["class3"] == 0.0
    assert scores["mean_dice"] == pytest.approx((1 / 3 + 1.0 + 0.0) / 3)
    assert "dice_vs_float" not in scores and scores["cases"] == 1
    assert predictions[0].shape == (1, 4, 4, 4, 4) and predictions[0].dtype == torch.uint8

    evaluator.set_reference(predictions)
    again, _ = evaluator.evaluate(net)
    assert again["dice_vs_float"] == {"a": 1.0, "b": 1.0, "class3": 0.0}
    assert again["mean_dice_vs_float"] == pytest.approx(2 / 3)


def test_evaluator_multi_label_scores_every_channel():
    label = torch.zeros(2, 2, 2, 2)
    label[0, 0] = 1  # channel 0 on in 4 voxels
    label[1] = 1  # channel 1 on everywhere (8)
    logits = torch.full((1, 2, 2, 2, 2), -5.0)
    logits[0, 0, 0, 0] = 5.0  # channel 0 on in 2 voxels, inside the label's 4
    logits[0, 1] = 5.0
    evaluator = Evaluator([(torch.zeros(1, 2, 2, 2), label)], (2, 2, 2), prediction="sigmoid", class_names=["tc", "wt"])
    scores, _ = evaluator.evaluate(_FixedLogits(logits))
    assert scores["dice"]["tc"] == pytest.approx(2 * 2 / (2 + 4))
    assert scores["dice"]["wt"] == pytest.approx(1.0)


def test_float_plan_orders_layers_and_reads_input_signs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 4, 3, padding=1),
                        nn.ReLU(), nn.Conv3d(4, 2, 1)).eval()
    plan = float_plan(net, torch.randn(1, 1, 8, 8, 8))
    assert plan.order == ["0", "3", "5"]
    assert plan.edges == ["0", "5"]  # first and last by data flow
    assert plan.bn_pairs == [["0", "1"]]
    assert plan.signed_input == {"0": True, "3": False, "5": False}  # raw input signed, after ReLU not
    assert plan.types == {"0": "Conv3d", "3": "Conv3d", "5": "Conv3d"} and plan.unreached == []
    assert isinstance(net[1], nn.BatchNorm3d)  # the network itself is not folded


def test_markdown_report_shows_rows_and_cuts_long_layer_lists():
    many = [f"layer{i} (Conv3d)" for i in range(14)]
    results = {
        "meta": {"network": "Net", "calib_crop": {"size": [16, 16, 16]}, "brevitas_notes": ["how it is built"]},
        "rows": [
            {"method": "float", "setting": "float", "status": "ok", "dice": {"a": 0.9}, "mean_dice": 0.9},
            {"method": "eq_default", "setting": "W2", "status": "ok", "dice": {"a": 0.85}, "mean_dice": 0.85,
             "quant_seconds": 12.34, "checkpoint_bytes": 2048, "layers_optimised": 3, "layers_total": 17,
             "layers_not_optimised": many},
            {"method": "brevitas_gptq", "setting": "W2", "status": "failed: RuntimeError: a|b"},
        ],
    }
    text = to_markdown(results)
    assert "| eq_default | W2 | 0.8500 | 0.8500 | – | 12.3 | – | 2.0 | 3/17 | ok |" in text
    assert "| brevitas_gptq | W2 | – |" in text and "failed: RuntimeError: a/b" in text
    assert "layer11 (Conv3d) …" in text and "layer12" not in text
    assert text.rstrip().endswith("- how it is built")


def test_run_in_fresh_process_runs_elsewhere():
    assert run_in_fresh_process(os.getpid) != os.getpid()
