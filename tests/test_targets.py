"""TargetStore and target_device="disk": same codes as in memory, files gone afterwards, also on error."""

from __future__ import annotations

import glob
import os
import re
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


_SETTINGS = {"weight_bits": 2, "act_bits": 4, "iterations": 6, "progress": False, "calib_augment": 1}


def _tiny_case() -> tuple[torch.nn.Module, torch.Tensor]:
    """The seeded UNet with BatchNorm and calibration volume of the same-network tests."""
    torch.manual_seed(0)
    return tiny_unet_bn().eval(), torch.randn(1, 16, 16, 16)


def _assert_same_network(first: tuple, second: tuple) -> None:
    """Two ``quantize_network`` results give the same layer errors and the same outputs."""
    (q_a, rep_a), (q_b, rep_b) = first, second
    assert [r.error for r in rep_a.layers] == [r.error for r in rep_b.layers]
    x = torch.randn(1, 1, 16, 16, 16)
    assert torch.equal(q_a(x), q_b(x))


def test_disk_targets_give_the_same_quantized_network():
    net, calib = _tiny_case()
    before = set(_leftover_folders())
    in_memory = quantize_network(net, calib, EfficientQConfig(**_SETTINGS))
    on_disk = quantize_network(net, calib, EfficientQConfig(**_SETTINGS, target_device="disk"))
    assert set(_leftover_folders()) == before
    _assert_same_network(in_memory, on_disk)


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


def test_store_keeps_its_memory_budget_in_memory_and_the_rest_in_files(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    tempfile.tempdir = None
    try:
        outputs = {name: torch.randn(4, 8) for name in "abcd"}  # 128 bytes each
        store = TargetStore(torch.device("cpu"), torch.device("cpu"), memory_bytes=300)
        for name, out in outputs.items():
            store.put(name, out)
        assert store.files == 2 and len(store) == 4  # a and b fill 256 of the 300 bytes
        assert len(glob.glob(str(tmp_path / "efficientq-targets-*" / "*.pt"))) == 2
        for name, out in outputs.items():
            assert torch.equal(store.pop(name), out)
        assert store.files == 0 and len(store) == 0
        store.close()
        assert glob.glob(str(tmp_path / "efficientq-targets-*")) == []
        in_memory = TargetStore(torch.device("cpu"), torch.device("cpu"))  # no budget: no folder at all
        in_memory.put("a", outputs["a"])
        assert in_memory.files == 0 and glob.glob(str(tmp_path / "efficientq-targets-*")) == []
    finally:
        tempfile.tempdir = None


def test_store_keeps_targets_in_memory_when_no_file_can_be_written(monkeypatch, caplog):
    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    store = TargetStore(torch.device("cpu"), torch.device("cpu"), memory_bytes=0)
    with caplog.at_level("WARNING", logger="monai_efficientq"):
        store.put("a", torch.ones(3))
        store.put("b", torch.zeros(3))
    assert store.files == 0 and torch.equal(store.pop("a"), torch.ones(3)) and torch.equal(store.pop("b"), torch.zeros(3))
    assert "No space left on device" in caplog.text and "TMPDIR" in caplog.text and caplog.text.count("Could not") == 1
    store.close()
    with pytest.raises(OSError, match="No space"):  # target_device="disk" asked for files: the error stands
        TargetStore("disk", torch.device("cpu")).put("a", torch.ones(3))


def test_default_targets_beyond_the_memory_budget_give_the_same_quantized_network(monkeypatch, caplog):
    from monai_efficientq import network as network_module

    net, calib = _tiny_case()
    with monkeypatch.context() as all_in_memory:
        all_in_memory.setattr(network_module, "MEMORY_BUDGET", 2**40)
        in_memory = quantize_network(net, calib, EfficientQConfig(**_SETTINGS))
    monkeypatch.setattr(network_module, "MEMORY_BUDGET", 200_000)  # the first few targets, not all
    writes = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, path: (writes.append(path), real_save(obj, path)))
    before = set(_leftover_folders())
    with caplog.at_level("INFO", logger="monai_efficientq"):
        split = quantize_network(net, calib, EfficientQConfig(**_SETTINGS))
    assert 0 < len(writes) < len(split[1].layers)
    waiting = re.search(r"(\d+) of \d+ float targets wait in temporary files", caplog.text)
    assert waiting is not None and 0 < int(waiting.group(1)) <= len(writes)
    assert set(_leftover_folders()) == before
    _assert_same_network(in_memory, split)


@pytest.mark.parametrize("where", ["cpu", "disk"])
def test_a_target_put_in_parts_is_read_joined(where, tmp_path, monkeypatch):
    """One part per calibration volume (the forward volume by volume): read back as one batch, files removed."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    tempfile.tempdir = None
    try:
        store = TargetStore(where, torch.device("cpu"))
        parts = [torch.randn(1, 2, 3) for _ in range(3)]
        for part in parts:
            store.put("a", part)
        assert len(store) == 1 and store.files == (1 if where == "disk" else 0)
        assert torch.equal(store["a"], torch.cat(parts))
        assert torch.equal(store.pop("a"), torch.cat(parts)) and "a" not in store
        assert glob.glob(str(tmp_path / "efficientq-targets-*" / "*.pt")) == []
        store.close()
    finally:
        tempfile.tempdir = None
