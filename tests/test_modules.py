from __future__ import annotations

import torch
from torch import nn

from monai_efficientq import EfficientQConfig, quantize_network
from monai_efficientq.modules import QuantizedConv3d, QuantizedConvTranspose3d, QuantizedMixin

from nets import tiny_unet_bn, volume


def test_quantized_layers_are_float_layer_subclasses_and_scriptable():
    net = tiny_unet_bn()
    x = volume(16)
    qnet, report = quantize_network(net, x, EfficientQConfig(weight_bits=2, act_bits=2, iterations=2, progress=False))
    qmods = [m for m in qnet.modules() if isinstance(m, QuantizedMixin)]
    assert len(qmods) == len(report.layers)
    assert any(isinstance(m, QuantizedConvTranspose3d) and isinstance(m, nn.ConvTranspose3d) for m in qmods)
    assert all(isinstance(m, QuantizedConv3d) == isinstance(m, nn.Conv3d) for m in qmods)
    with torch.no_grad():
        assert torch.equal(torch.jit.script(qnet)(x), qnet(x))


def test_cached_weight_is_the_dequantized_codes():
    net = tiny_unet_bn()
    qnet, _ = quantize_network(net, volume(16), EfficientQConfig(weight_bits=3, iterations=2, progress=False))
    for m in qnet.modules():
        if isinstance(m, QuantizedMixin):
            assert m.weight_codes.dtype == torch.uint8 and int(m.weight_codes.max()) < 2**m.weight_bits
            distinct = torch.unique(m.weight.detach()).numel()
            assert distinct <= (2**m.weight_bits) * m.weight_scale.numel()
