"""The quantizing pass volume by volume: the same quantized network as one batched pass, with the waiting volumes'
activations in files; errors unwind every volume's forward."""

from __future__ import annotations

import glob
import os
import tempfile
import gc

import greenlet
import pytest
import torch
from torch import nn

from monai_efficientq import EfficientQConfig, VolumesDivergedError, quantize_network
from monai_efficientq import network as network_module
from monai_efficientq import offload as offload_module
from tests.nets import tiny_segresnet, tiny_unet_bn

_SETTINGS = {"weight_bits": 2, "act_bits": 4, "iterations": 6, "progress": False, "calib_augment": 1}


def _paused_forwards() -> list[greenlet.greenlet]:
    """Greenlets started and not finished, but the one running this test."""
    gc.collect()
    here = greenlet.getcurrent()
    return [g for g in gc.get_objects() if isinstance(g, greenlet.greenlet) and g and not g.dead and g is not here]


def _leftover_folders() -> list[str]:
    return glob.glob(os.path.join(tempfile.gettempdir(), "efficientq-activations-*"))


@pytest.mark.parametrize("make", [tiny_unet_bn, tiny_segresnet])
def test_volume_by_volume_matches_one_batch_and_files_change_nothing(make, monkeypatch, caplog):
    """Volume by volume against one batched forward (``target_device="cpu"``): the convolutions block one volume
    differently from a batch, so the errors agree to the last digits, not bit for bit. With the activations in files
    against in memory (both volume by volume): the same network bit for bit."""
    torch.manual_seed(0)
    net, calib = make().eval(), torch.randn(1, 16, 16, 16)
    _, rep_batch = quantize_network(net, calib, EfficientQConfig(**_SETTINGS, target_device="cpu"))
    with monkeypatch.context() as in_memory:
        in_memory.setattr(offload_module, "MIN_BYTES", 2**40)  # no storage goes to the file
        q_memory, rep_memory = quantize_network(net, calib, EfficientQConfig(**_SETTINGS))
    monkeypatch.setattr(offload_module, "MIN_BYTES", 0)  # every waiting volume's activations to a file
    folders = set(_leftover_folders())
    with caplog.at_level("INFO", logger="monai_efficientq"):
        q_files, rep_files = quantize_network(net, calib, EfficientQConfig(**_SETTINGS))
    assert "went through temporary files" in caplog.text
    assert _paused_forwards() == [] and set(_leftover_folders()) == folders
    assert [r.error for r in rep_files.layers] == [r.error for r in rep_memory.layers]
    for a, b in zip(q_files.state_dict().values(), q_memory.state_dict().values()):
        assert torch.equal(a, b)
    assert [r.name for r in rep_files.layers] == [r.name for r in rep_batch.layers]
    # the first layers' inputs differ in the last bits only; a weight code that flips with them changes the inputs of
    # every later layer (W2 on a random tiny network: the later errors move by up to half)
    errors, batch_errors = [r.error for r in rep_files.layers], [r.error for r in rep_batch.layers]
    assert errors[:8] == pytest.approx(batch_errors[:8], rel=1e-4)


def test_an_error_in_the_pass_unwinds_every_volume(monkeypatch):
    torch.manual_seed(0)
    net, calib = tiny_unet_bn().eval(), torch.randn(1, 16, 16, 16)
    monkeypatch.setattr(offload_module, "MIN_BYTES", 0)
    solved = []
    real_solve = network_module._QuantizingRun._solve_weights

    def failing_solve(self, *args, **kwargs):
        if len(solved) == 3:
            raise RuntimeError("solver failed on purpose")
        solved.append(1)
        return real_solve(self, *args, **kwargs)

    monkeypatch.setattr(network_module._QuantizingRun, "_solve_weights", failing_solve)
    folders = set(_leftover_folders())
    with pytest.raises(RuntimeError, match="on purpose"):
        quantize_network(net, calib, EfficientQConfig(**_SETTINGS))
    assert _paused_forwards() == [] and set(_leftover_folders()) == folders


class _ByMean(nn.Module):
    """Takes one of two convolutions by the sign of its input's mean: volumes of opposite means part ways."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv3d(1, 4, 3, padding=1)
        self.up = nn.Conv3d(4, 2, 1)
        self.down = nn.Conv3d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.head(x)) if float(x.mean()) > 0 else self.down(self.head(x))


def test_volumes_that_take_different_paths_are_refused_with_the_reason():
    torch.manual_seed(0)
    calib = torch.stack([torch.rand(1, 8, 8, 8) + 1, -torch.rand(1, 8, 8, 8) - 0.5])  # means of opposite signs
    with pytest.raises(VolumesDivergedError, match="different path through the network .*layer 'down' where the first called 'up'"):
        quantize_network(_ByMean(), calib, EfficientQConfig(weight_bits=4, iterations=2, progress=False,
                                                            calib_augment=0, holdout=False))
    assert _paused_forwards() == []
