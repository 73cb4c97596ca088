from __future__ import annotations

import json

import pytest

from monai_efficientq.config import PRESETS, EfficientQConfig


def test_fields_hold_the_resolved_settings_and_the_config_remembers_the_callers():
    cfg = EfficientQConfig(preset="original", rtn_candidate=False, weight_scale="channel")
    assert cfg.weight_grid == "nozero" and cfg.rho_schedule == "after"  # filled by the preset
    assert cfg.preset_overrides == {"rtn_candidate": False, "weight_scale": "channel"}  # the first equals the preset's
    assert EfficientQConfig().preset_overrides == {}


def test_replace_keeps_the_callers_settings_across_presets():
    cfg = EfficientQConfig(preset="original", rtn_candidate=False, weight_bits=3)
    default = cfg.replace(preset="default")
    assert default.rtn_candidate is False  # set by the caller (to the original preset's value): kept
    assert default.weight_bits == 3 and default.preset == "default"
    for key, value in PRESETS["default"].items():  # everything else follows the new preset
        if key != "rtn_candidate":
            assert getattr(default, key) == value, key
    assert default.replace(preset="original").rho_schedule == "after"
    assert default.replace(rtn_candidate=None).rtn_candidate is True  # None: the preset's value again
    assert cfg.rtn_candidate is False and cfg.preset == "original"  # not changed


def test_a_value_assigned_after_creation_counts_as_the_callers():
    cfg = EfficientQConfig()
    cfg.holdout = False
    assert cfg.preset_overrides == {"holdout": False}
    assert cfg.replace(preset="original").holdout is False


@pytest.mark.parametrize("kwargs", [{}, {"preset": "original"}, {"preset": "original", "holdout": True, "act_bits": 2},
                                    {"weight_scale": "tensor", "act_range_factors": [0.5, 1.0], "skip_layers": ["a"]}])
def test_a_config_recreated_from_its_saved_dict_is_the_same_run(kwargs):
    cfg = EfficientQConfig(**kwargs)
    saved = json.loads(json.dumps(cfg.to_dict()))  # as a report or checkpoint stores it
    assert None not in [saved[key] for key in PRESETS[cfg.preset]]  # the dict shows what ran
    assert EfficientQConfig(**saved) == cfg
    assert EfficientQConfig(**saved).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("field, bad", [("weight_bits", 1), ("act_bits", 9), ("weight_scale", "row"),
                                        ("solver", "lu"), ("patience", 0), ("eta_factor", -1.0), ("preset", "fast")])
def test_invalid_values_are_refused(field, bad):
    with pytest.raises(ValueError, match=field):
        EfficientQConfig(**{field: bad})
    with pytest.raises(ValueError, match=field):
        EfficientQConfig().replace(**{field: bad})


def test_replace_refuses_unknown_fields():
    with pytest.raises(TypeError):
        EfficientQConfig().replace(bits=2)


def test_devices_this_torch_cannot_use_are_refused():
    import torch

    from monai_efficientq import EfficientQConfig

    with pytest.raises(ValueError, match="device='gpu0' is not a device: use cpu, cuda or cuda:N"):
        EfficientQConfig(device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="target_device='cuda'.*use cpu"):
            EfficientQConfig(target_device="cuda")
    assert EfficientQConfig(device="cpu").device == "cpu"
