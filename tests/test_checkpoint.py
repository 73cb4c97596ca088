from __future__ import annotations

import os

import pytest
import torch
from monai.networks.nets import SegResNet

from monai_efficientq import EfficientQConfig, load_quantized, quantize_network, save_dequantized, save_quantized
from monai_efficientq.checkpoint import CheckpointFormatError, atomic_write, packed_state

from nets import tiny_segresnet, tiny_unet_bn, volume


@pytest.fixture(scope="module")
def quantized_unet():
    net = tiny_unet_bn()
    qnet, report = quantize_network(net, volume(16), EfficientQConfig(weight_bits=3, act_bits=4, iterations=5, progress=False))
    return net, qnet, report


def test_roundtrip_weights_only_and_bit_exact(tmp_path, quantized_unet):
    net, qnet, report = quantized_unet
    path = tmp_path / "q.pt"
    save_quantized(qnet, path, report)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "monai-efficientq" and raw["format_version"] == 2 and len(raw["payload_sha256"]) == 64
    assert all(e["codes"].dtype == torch.uint8 for e in raw["layers"].values())
    loaded = load_quantized(tiny_unet_bn(seed=5), path)  # fresh float net with other weights
    x = volume(16, seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(x), qnet(x))
    assert raw["report"]["layers"][0]["name"] == report.layers[0].name


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_size_approaches_bits_over_32(tmp_path, bits):
    torch.manual_seed(0)
    net = SegResNet(spatial_dims=3, in_channels=1, out_channels=2, init_filters=32, blocks_down=(1, 2), blocks_up=(1,)).eval()
    qnet, report = quantize_network(net, volume(8), EfficientQConfig(weight_bits=bits, method="rtn", first_last_bits=None, progress=False))
    path = tmp_path / "q.pt"
    save_quantized(qnet, path)
    size = os.path.getsize(path)
    assert size == report.packed_bytes  # the report gives the size of the file, framing included
    weights = sum(m.weight.numel() for m in qnet.modules() if hasattr(m, "weight_codes"))
    assert size < weights * bits / 8 + 20_000  # codes plus small scales, biases, norms and the pickled index
    assert report.float_bytes / size > (32 / bits) * 0.85


def test_tensors_share_one_storage_per_dtype(tmp_path, quantized_unet):
    import zipfile

    net, qnet, report = quantized_unet
    path = tmp_path / "q.pt"
    save_quantized(qnet, path, report)
    raw = torch.load(path, weights_only=True)
    tensors = [e["codes"] for e in raw["layers"].values()] + list(raw["float_state"].values())
    dtypes = {t.dtype for t in tensors} | {e["scale"].dtype for e in raw["layers"].values()}
    records = [n for n in zipfile.ZipFile(path).namelist() if "/data/" in n and not n.endswith("serialization_id")]
    assert len(tensors) > 20 and len(records) == len(dtypes)  # one zip record per dtype, not per tensor
    flat_before = {k: v.clone() for k, v in packed_state(qnet)["float_state"].items()}
    assert all(torch.equal(raw["float_state"][k], v) for k, v in flat_before.items())


def test_dequantized_export_loads_into_the_original_definition(tmp_path):
    net = tiny_unet_bn()
    qnet, _ = quantize_network(net, volume(16), EfficientQConfig(weight_bits=4, iterations=5, progress=False))
    path = tmp_path / "deq.pt"
    save_dequantized(qnet, net, path)
    fresh = tiny_unet_bn(seed=9)
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = volume(16, seed=2)
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(x), qnet(x), rtol=1e-4, atol=1e-5)


def test_wrong_network_is_a_clear_error(tmp_path, quantized_unet):
    _, qnet, _ = quantized_unet
    path = tmp_path / "q.pt"
    save_quantized(qnet, path)
    with pytest.raises(CheckpointFormatError, match="does not fit this network"):
        load_quantized(tiny_segresnet(), path)
    from monai.networks.nets import UNet

    wider = UNet(3, 1, 3, channels=(8, 16, 32), strides=(2, 2), num_res_units=2, norm="batch")
    with pytest.raises(CheckpointFormatError, match="weight shape"):
        load_quantized(wider, path)


def test_float_state_dict_and_garbage_are_rejected(tmp_path):
    float_path = tmp_path / "float.pt"
    torch.save(tiny_unet_bn().state_dict(), float_path)
    with pytest.raises(CheckpointFormatError, match="looks like a float state dict"):
        load_quantized(tiny_unet_bn(), float_path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointFormatError, match="not a readable torch checkpoint"):
        load_quantized(tiny_unet_bn(), junk)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_quantized(tiny_unet_bn(), tmp_path / "missing.pt")


def test_newer_format_version_is_rejected(tmp_path, quantized_unet):
    _, qnet, _ = quantized_unet
    state = packed_state(qnet)
    state["format_version"] = 99
    path = tmp_path / "future.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointFormatError, match="Upgrade"):
        load_quantized(tiny_unet_bn(), path)


def test_failed_write_leaves_no_file(tmp_path):
    target = tmp_path / "out.pt"

    def broken(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_previous_file(tmp_path, quantized_unet, monkeypatch):
    _, qnet, _ = quantized_unet
    target = tmp_path / "q.pt"
    target.write_bytes(b"previous")

    def failing_save(obj, f):
        f.write(b"half")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(RuntimeError, match="interrupted"):
        save_quantized(qnet, target)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.pt"]


def test_written_files_get_the_usual_permissions(tmp_path, quantized_unet):
    _, qnet, _ = quantized_unet
    path = tmp_path / "q.pt"
    save_quantized(qnet, path)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def _record_data_offset(path, record_suffix: str) -> tuple[int, int]:
    """Offset and size of the stored bytes of the zip record whose name ends with ``record_suffix``."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(record_suffix))
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.compress_size


def _storage_records(path) -> list[str]:
    import zipfile

    with zipfile.ZipFile(path) as archive:
        return [i.filename for i in archive.infolist() if "/data/" in i.filename]


def test_flipped_bytes_and_truncation_are_caught(tmp_path, quantized_unet):
    net, qnet, report = quantized_unet
    path = tmp_path / "q.pt"
    save_quantized(qnet, path, report)
    clean = path.read_bytes()
    for record in _storage_records(path):  # every tensor storage: codes, scales, biases, float state
        offset, size = _record_data_offset(path, record)
        data = bytearray(clean)
        n = min(64, size)
        data[offset : offset + n] = bytes(b ^ 0xFF for b in data[offset : offset + n])
        path.write_bytes(bytes(data))
        with pytest.raises(CheckpointFormatError, match=r"q\.pt is corrupted.*checksum"):
            load_quantized(tiny_unet_bn(), path)
    path.write_bytes(clean[: len(clean) // 2])
    with pytest.raises(CheckpointFormatError, match="not a readable torch checkpoint"):
        load_quantized(tiny_unet_bn(), path)
    path.write_bytes(clean)
    load_quantized(tiny_unet_bn(), path)  # the intact file still loads


def test_version_1_files_without_checksum_still_load(tmp_path, quantized_unet):
    _, qnet, _ = quantized_unet
    state = packed_state(qnet)
    state["format_version"] = 1
    del state["payload_sha256"]
    torch.save(state, tmp_path / "v1.pt")
    x = volume(16, seed=3)
    with torch.no_grad():
        assert torch.equal(load_quantized(tiny_unet_bn(), tmp_path / "v1.pt")(x), qnet(x))


def test_same_inputs_and_settings_write_the_same_bytes(tmp_path):
    """Run times and memory stay out of the packed file (they are in the JSON report), so two runs match."""
    from monai_efficientq.cli import report as report_command

    cfg = EfficientQConfig(weight_bits=2, act_bits=4, iterations=5, progress=False)
    for run in range(2):
        qnet, report = quantize_network(tiny_unet_bn(), volume(16), cfg)
        save_quantized(qnet, tmp_path / f"q{run}.pt", report)
    assert (tmp_path / "q0.pt").read_bytes() == (tmp_path / "q1.pt").read_bytes()
    assert report.total_seconds > 0  # the run did measure its time: it is only kept out of the file
    text = report_command(str(tmp_path / "q0.pt"))
    assert "not stored in a packed checkpoint" in text and "| 0 | `" in text
