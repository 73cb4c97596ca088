from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_efficientq.io import build_network, load_calibration, load_float_weights, normalize_volume

from conftest import SEGRESNET_CLASS, SEGRESNET_KWARGS
from nets import tiny_segresnet

NET, KWARGS = SEGRESNET_CLASS, SEGRESNET_KWARGS


def test_bundle_config_network(tmp_path):
    cfg = tmp_path / "configs" / "inference.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({"network_def": {"_target_": NET, **json.loads(KWARGS)}}))
    net = build_network(config_file=str(cfg), network_id="network_def")
    assert type(net).__name__ == "SegResNet"
    with pytest.raises(KeyError, match="--network_id"):
        build_network(config_file=str(cfg), network_id="nope")


def test_checkpoint_that_does_not_match(files):
    net, ckpt, img, tmp = files
    other = build_network(NET, json.dumps({**json.loads(KWARGS), "init_filters": 16}))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_float_weights(other, str(ckpt))
    state = torch.load(ckpt)
    state["extra.weight"] = torch.zeros(1)
    del state["convInit.conv.weight"]
    torch.save({"model": state}, tmp / "bad.pt")
    with pytest.raises(ValueError, match="1 missing key.*1 unexpected key"):
        load_float_weights(tiny_segresnet(), str(tmp / "bad.pt"))


def test_calibration_label_is_cropped_with_the_volume(files):
    """The label gets the volume's crop box: the label marks the body, so it must cover the cropped body."""
    net, ckpt, img, tmp = files
    vol = np.asarray(nib.load(str(img)).dataobj)
    seg = tmp / "seg.nii.gz"
    nib.save(nib.Nifti1Image((vol > 0).astype(np.uint8), np.eye(4)), seg)
    volume, label = load_calibration(str(img), str(seg), roi_size=16, normalize="none")
    assert volume.shape == (1, 16, 16, 16) and label.shape == (1, 16, 16, 16)
    assert torch.equal(label.bool(), volume != 0)
    volume_alone, none = load_calibration(str(img), None, roi_size=16, normalize="none")
    assert none is None and torch.equal(volume_alone, volume)
    with pytest.raises(FileNotFoundError, match="calibration label not found"):
        load_calibration(str(img), str(tmp / "nope.nii.gz"))
    with pytest.raises(ValueError, match="--normalize='zscore'"):
        load_calibration(str(img), normalize="zscore")


def test_normalize_volume_is_channel_wise_over_nonzero_voxels():
    image = torch.zeros(2, 6, 6, 6)
    image[0, 1:5, 1:5, 1:5] = torch.rand(4, 4, 4) * 100 + 50
    image[1, 1:5, 1:5, 1:5] = torch.rand(4, 4, 4) * 0.01
    out = torch.as_tensor(normalize_volume(image, "nonzero"))
    for c in range(2):
        inside = out[c][image[c] != 0]
        assert abs(float(inside.mean())) < 1e-4 and abs(float(inside.std(unbiased=False)) - 1) < 1e-3
        assert bool((out[c][image[c] == 0] == 0).all())
    minmax = torch.as_tensor(normalize_volume(image, "minmax"))
    assert float(minmax.min()) == 0.0 and float(minmax.max()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="nonzero, all, minmax, none"):
        normalize_volume(image, "zscore")


def test_nan_and_constant_volumes_are_named_as_they_are(tmp_path):
    """Checked before the normalisation, which would spread one NaN over the body or turn a constant into zeros."""
    rng = np.random.default_rng(0)
    with_nan = rng.random((12, 12, 12)).astype(np.float32) + 1
    with_nan.reshape(-1)[:64] = np.nan
    nib.save(nib.Nifti1Image(with_nan, np.eye(4)), tmp_path / "nan.nii.gz")
    nib.save(nib.Nifti1Image(np.full((12, 12, 12), 5.0, np.float32), np.eye(4)), tmp_path / "const.nii.gz")
    with pytest.raises(ValueError, match=r"nan.nii.gz: .* 64 NaN/Inf voxel\(s\) of 1728"):
        load_calibration(str(tmp_path / "nan.nii.gz"))
    with pytest.raises(ValueError, match="the value 5 in every voxel"):
        load_calibration(str(tmp_path / "const.nii.gz"))
