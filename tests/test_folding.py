from __future__ import annotations

import torch
from monai.networks.nets import UNet
from torch import nn

from monai_efficientq.folding import find_conv_bn_pairs, fold_batchnorm


def _randomize_bn(net: nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen))


def test_fold_unet_batchnorm_is_exact():
    net = UNet(3, 1, 3, channels=(4, 8, 16), strides=(2, 2), num_res_units=2, norm="batch").double().eval()
    _randomize_bn(net)
    x = torch.randn(1, 1, 16, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        pairs, ref = find_conv_bn_pairs(net, x)
        n_bn = sum(isinstance(m, nn.BatchNorm3d) for m in net.modules())
        assert len(pairs) == n_bn > 0
        fold_batchnorm(net, pairs)
        assert not any(isinstance(m, nn.BatchNorm3d) for m in net.modules())
        out = net(x)
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-10)


def test_fold_creates_bias_and_handles_transposed_groups():
    net = nn.Sequential(
        nn.ConvTranspose3d(4, 6, 3, stride=2, groups=2, bias=False), nn.BatchNorm3d(6), nn.ReLU(),
        nn.Conv3d(6, 5, 3), nn.BatchNorm3d(5),
    ).double().eval()
    _randomize_bn(net)
    x = torch.randn(2, 4, 5, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        pairs, ref = find_conv_bn_pairs(net, x)
        assert pairs == [("0", "1"), ("3", "4")]
        fold_batchnorm(net, pairs)
        assert net[0].bias is not None
        assert torch.allclose(net(x), ref, rtol=1e-10, atol=1e-10)


def test_bn_not_after_conv_is_not_folded():
    net = nn.Sequential(nn.Conv3d(2, 4, 1), nn.ReLU(), nn.BatchNorm3d(4)).eval()
    pairs, _ = find_conv_bn_pairs(net, torch.randn(1, 2, 4, 4, 4))
    assert pairs == []
