"""TargetStore and target_device="disk": same codes as in memory, files gone afterwards, also on error."""

from __future__ import annotations

import glob
import os
import tempfile

import pytest
import torch

from monai_efficientq import EfficientQConfig, LayerCalledTwiceError, quantize_network
from monai_efficientq.checkpoint import read_packed, save_quantized
from monai_efficientq.targets import TargetStore
from tests.nets import tiny_unet_bn


def test_store_round_trip_on_disk_and_in_memory(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    tempfile.tempdir = None  # read TMPDIR again
    try:
        for where in ("disk", "cpu"):
            store = TargetStore(where, torch.device("cpu"))
            out = torch.randn(2, 3, 4)
            original = out.clone()
            store.put("a", out)
            out.add_(1)  # the forward changes its output in place later: the stored target must not change
            assert "a" in store and len(store) == 1
            assert torch.equal(store["a"], original) and "a" in store  # read, kept
            assert torch.equal(store.pop("a"), original) and "a" not in store
            if where == "disk":
                assert len(glob.glob(str(tmp_path / "efficientq-targets-*"))) == 1
            store.put("b", out)
            store.close()
        assert glob.glob(str(tmp_path / "efficientq-targets-*")) == []
    finally:
        tempfile.tempdir = None


def _leftover_folders() -> list[str]:
    return glob.glob(os.path.join(tempfile.gettempdir(), "efficientq-targets-*"))


def test_disk_targets_give_the_same_quantized_network():
    torch.manual_seed(0)
    net = tiny_unet_bn().eval()
    calib = torch.randn(1, 16, 16, 16)
    before = set(_leftover_folders())
    settings = {"weight_bits": 2, "act_bits": 4, "iterations": 6, "progress": False, "calib_augment": 1}
    q_mem, rep_mem = quantize_network(net, calib, EfficientQConfig(**settings))
    q_disk, rep_disk = quantize_network(net, calib, EfficientQConfig(**settings, target_device="disk"))
    assert set(_leftover_folders()) == before
    assert [r.error for r in rep_mem.layers] == [r.error for r in rep_disk.layers]
    x = torch.randn(1, 1, 16, 16, 16)
    assert torch.equal(q_mem(x), q_disk(x))


def test_runtime_only_settings_do_not_change_the_packed_bytes(tmp_path):
    """Where the targets wait and whether a progress bar shows are not stored: same codes, same bytes (and so, under
    a size budget, the same widths)."""
    torch.manual_seed(0)
    net = tiny_unet_bn().eval()
    calib = torch.randn(1, 16, 16, 16)
    settings = {"weight_bits": 2, "iterations": 4, "calib_augment": 1}
    paths = []
    for i, extra in enumerate(({"progress": False}, {"progress": True, "target_device": "disk"})):
        qnet, _ = quantize_network(net, calib, EfficientQConfig(**settings, **extra))
        paths.append(str(tmp_path / f"q{i}.pt"))
        save_quantized(qnet, paths[-1])
    with open(paths[0], "rb") as a, open(paths[1], "rb") as b:
        assert a.read() == b.read()
    stored = read_packed(paths[0])["config"]
    assert "target_device" not in stored and "progress" not in stored and stored["weight_bits"] == 2


class _SharedConv(torch.nn.Module):
    """Calls one convolution twice: recording fails at the second call, after the first target was written."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.conv(x))


def test_disk_targets_removed_when_the_run_fails():
    torch.manual_seed(0)
    before = set(_leftover_folders())
    with pytest.raises(LayerCalledTwiceError):
        quantize_network(_SharedConv(), torch.randn(1, 8, 8, 8), EfficientQConfig(target_device="disk"))
    assert set(_leftover_folders()) == before
