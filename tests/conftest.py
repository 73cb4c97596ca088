from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

# The suite must stay fast on 2 CPU cores: one intra-op thread avoids oversubscription.
torch.set_num_threads(1)


# The tiny SegResNet of nets.tiny_segresnet as the command line names it.
SEGRESNET_CLASS = "monai.networks.nets.SegResNet"
SEGRESNET_KWARGS = json.dumps({"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "init_filters": 8,
                               "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1]})


@pytest.fixture()
def files(tmp_path):
    """A tiny SegResNet, its float checkpoint and a 20x22x18 NIfTI calibration volume with a body inside zeros."""
    from nets import tiny_segresnet

    net = tiny_segresnet()
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)
    vol = np.zeros((20, 22, 18), dtype=np.float32)
    vol[3:17, 4:18, 2:16] = np.random.default_rng(0).random((14, 14, 14)) * 100 + 50
    img = tmp_path / "calib.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), img)
    return net, ckpt, img, tmp_path
