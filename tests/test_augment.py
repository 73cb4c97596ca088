from __future__ import annotations

import pytest
import torch

from monai_efficientq import EfficientQConfig, quantize_network
from monai_efficientq.augment import augmented_copies

from nets import tiny_segresnet, volume


def _body_volume() -> torch.Tensor:
    x = torch.zeros(1, 1, 24, 24, 24)
    x[:, :, 4:20, 6:18, 5:19] = torch.randn(1, 1, 16, 12, 14, generator=torch.Generator().manual_seed(0)) + 2
    return x


def test_copies_are_seeded_varied_and_keep_the_background():
    x = _body_volume()
    label = (x > 2).float()
    batch, lab, amap = augmented_copies(x, 3, seed=1, label=label)
    assert batch.shape == (4, 1, 24, 24, 24) and lab.shape == (4, 1, 24, 24, 24) and amap is None
    assert type(batch) is torch.Tensor and type(lab) is torch.Tensor  # plain tensors, not MetaTensors
    assert torch.equal(batch[0], x[0]) and torch.equal(lab[0], label[0])  # the original comes first
    for i in range(1, 4):
        assert not torch.allclose(batch[i], x[0])
        assert (batch[i] == 0).float().mean() > 0.4  # the background stays zero after intensity changes
        assert set(lab[i].unique().tolist()) <= {0.0, 1.0}  # labels moved by nearest neighbour
    again, _, _ = augmented_copies(x, 3, seed=1, label=label)
    other, _, _ = augmented_copies(x, 3, seed=2, label=label)
    assert torch.equal(again, batch) and not torch.equal(other, batch)
    same, same_label, _ = augmented_copies(x, 0, label=label)
    assert same is x and same_label is label


def test_quantize_network_calibrates_on_the_copies():
    net = tiny_segresnet()
    x = volume(16)
    cfg = dict(weight_bits=2, act_bits=4, iterations=5, progress=False)
    _, plain = quantize_network(net, x, EfficientQConfig(calib_augment=0, holdout=False, **cfg))
    _, augmented = quantize_network(net, x, EfficientQConfig(calib_augment=2, holdout=False, **cfg))
    assert plain.calibration_shape == augmented.calibration_shape == [1, 1, 16, 16, 16]  # the volume given
    assert [r.error for r in plain.layers] != [r.error for r in augmented.layers]
    assert augmented.config["calib_augment"] == 2


def test_holdout_selects_on_the_last_copy_and_never_loses_to_rounding_there():
    net = tiny_segresnet()
    x = volume(16)
    with pytest.raises(ValueError, match="calib_augment"):
        quantize_network(net, x, EfficientQConfig(calib_augment=0, holdout=True, progress=False))
    _, report = quantize_network(
        net, x, EfficientQConfig(weight_bits=2, act_bits=4, iterations=10, calib_augment=1, holdout=True, progress=False)
    )
    for r in report.layers:
        assert r.held_out_error is not None and r.held_out_rtn_error is not None
        assert r.held_out_error <= r.held_out_rtn_error * (1 + 1e-5)  # round-to-nearest is a candidate
    assert any(r.best_iteration >= 0 for r in report.layers)
    assert "held-out error" in report.to_markdown()
    _, plain = quantize_network(
        net, x, EfficientQConfig(weight_bits=2, act_bits=4, iterations=10, calib_augment=0, holdout=False, progress=False)
    )
    assert all(r.held_out_error is None for r in plain.layers) and "held-out" not in plain.to_markdown()
