"""The networks and volumes the benchmark scripts share.

- the bundle's brain-tissue SegResNet (:data:`BUNDLE_SEGRESNET`, weights in :data:`BUNDLE_MODEL`, its calibration
  and evaluation volumes under :data:`BUNDLE_DATA`);
- the BraTS bundle's SegResNet at full width with random weights (:func:`brats_segresnet`), timed on a synthetic
  4-channel volume (:func:`synthetic_volume`).
"""

from __future__ import annotations

import os

import torch
from torch import nn

__all__ = [
    "BUNDLE_DATA",
    "BUNDLE_MODEL",
    "BUNDLE_ROOT",
    "BUNDLE_SEGRESNET",
    "brats_segresnet",
    "bundle_segresnet",
    "synthetic_volume",
]

BUNDLE_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundles",
                           "brain_tissue_mri_segmentation")
BUNDLE_MODEL = os.path.join(BUNDLE_ROOT, "models", "model.pt")
BUNDLE_DATA = os.path.join(BUNDLE_ROOT, "data")
BUNDLE_SEGRESNET = {
    "spatial_dims": 3, "in_channels": 1, "out_channels": 4, "init_filters": 8, "blocks_down": [1, 2, 2, 4],
    "blocks_up": [1, 1, 1], "dropout_prob": 0.0,
}
"""Constructor arguments of the brain-tissue bundle's ``monai.networks.nets.SegResNet`` (1 input, 4 classes)."""


def bundle_segresnet() -> nn.Module:
    """The brain-tissue bundle's SegResNet, untrained (load :data:`BUNDLE_MODEL` into it)."""
    from monai.networks.nets import SegResNet

    return SegResNet(**BUNDLE_SEGRESNET)


def brats_segresnet(seed: int = 0) -> nn.Module:
    """The BraTS bundle's SegResNet (blocks_down 1,2,2,4, init_filters 16, 4 in, 3 out), seeded random weights."""
    from monai.networks.nets import SegResNet

    torch.manual_seed(seed)
    return SegResNet(
        spatial_dims=3, in_channels=4, out_channels=3, init_filters=16, blocks_down=(1, 2, 2, 4),
        blocks_up=(1, 1, 1), dropout_prob=0.2,
    ).eval()


def synthetic_volume(size: int, channels: int = 4, seed: int = 0) -> torch.Tensor:
    """A ``(channels, size, size, size)`` volume: standard normal noise inside a centred ellipsoid (the "brain"),
    exact zeros outside.

    Args:
        size: side of the cube.
        channels: number of channels (modalities).
        seed: generator seed.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(channels, size, size, size, generator=gen)
    g = torch.linspace(-1, 1, size)
    zz, yy, xx = torch.meshgrid(g, g, g, indexing="ij")
    inside = (zz / 0.85) ** 2 + (yy / 0.75) ** 2 + (xx / 0.8) ** 2 <= 1
    return x * inside
