"""ActivationOffload: the storages of a paused owner go to a file and come back the same bytes."""

from __future__ import annotations

import glob
import os
import tempfile

import torch
from torch import nn

from monai_efficientq.offload import ActivationOffload


class _Keeper(nn.Module):
    """Two layers whose inputs and outputs the offload follows; the forward keeps a view of its input."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv3d(1, 4, 1)
        self.b = nn.Conv3d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def _followed(owner: int, offload: ActivationOffload, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    offload.owner = owner
    out = net(x)
    offload.owner = None
    return out


def test_store_frees_the_storages_and_restore_gives_back_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    tempfile.tempdir = None
    try:
        torch.manual_seed(0)
        net = _Keeper()
        weight = net.a.weight.detach().clone()
        offload = ActivationOffload(net, min_bytes=1024)
        with torch.no_grad():
            x = torch.randn(1, 1, 16, 16, 16)
            out = _followed(0, offload, net, x)
            small = _followed(1, offload, net, torch.randn(1, 1, 2, 2, 2))  # 32-byte storages: never moved
        view, expected, expected_x = out[:, 1:3], out.clone(), x.clone()
        freed = offload.store(0)
        assert freed == (x.numel() + out.numel()) * 4  # the input and the output; a's output is gone already
        assert out.untyped_storage().nbytes() == 0 and x.untyped_storage().nbytes() == 0
        assert len(glob.glob(str(tmp_path / "efficientq-activations-*" / "0.bin"))) == 1
        assert offload.store(1) == 0 and small.untyped_storage().nbytes() == small.numel() * 4
        assert torch.equal(net.a.weight, weight)  # parameters are never moved
        offload.restore(0)
        assert torch.equal(out, expected) and torch.equal(view, expected[:, 1:3]) and torch.equal(x, expected_x)
        assert glob.glob(str(tmp_path / "efficientq-activations-*" / "*.bin")) == []
        offload.close()
        assert glob.glob(str(tmp_path / "efficientq-activations-*")) == []
    finally:
        tempfile.tempdir = None


def test_a_failed_write_keeps_the_storages_in_memory(monkeypatch, caplog):
    net, x = _Keeper(), torch.randn(1, 1, 16, 16, 16)

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    failing = ActivationOffload(net, min_bytes=1024)
    failing.owner = 0
    with torch.no_grad():
        out = net(x)
    failing.owner = None
    expected = out.clone()
    monkeypatch.setattr(tempfile, "mkdtemp", no_space)
    with caplog.at_level("WARNING"):
        assert failing.store(0) == 0
        assert failing.store(0) == 0  # no second try, no second warning
    assert out.untyped_storage().nbytes() == out.numel() * 4 and torch.equal(out, expected)
    assert caplog.text.count("Could not write activations") == 1 and "TMPDIR" in caplog.text
    failing.close()
