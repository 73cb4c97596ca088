"""Tiny networks shared by the tests."""

from __future__ import annotations

import torch
from monai.networks.nets import BasicUNet, SegResNet, UNet
from torch import nn


def tiny_segresnet(out_channels: int = 3, in_channels: int = 1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SegResNet(
        spatial_dims=3, in_channels=in_channels, out_channels=out_channels, init_filters=8,
        blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1),
    ).eval()


def random_batchnorm_statistics(net: nn.Module, seed: int) -> nn.Module:
    """Seeded running statistics in every BatchNorm3d (fresh ones are 0 and 1: folding them would be trivial)."""
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return net


def tiny_unet_bn(seed: int = 0, out_channels: int = 3, num_res_units: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    net = UNet(3, 1, out_channels, channels=(4, 8, 16), strides=(2, 2), num_res_units=num_res_units, norm="batch").eval()
    return random_batchnorm_statistics(net, seed)


def tiny_basic_unet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return BasicUNet(3, 1, 2, features=(4, 4, 8, 8, 16, 4)).eval()


def volume(size: int = 16, channels: int = 1, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, channels, size, size, size, generator=gen)
    x[..., :2, :, :] = 0  # some background outside the "body"
    return x
