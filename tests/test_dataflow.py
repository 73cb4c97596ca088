"""Tests of monai_efficientq.dataflow.edge_layers: first/last layers read off the autograd data flow."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.networks.nets import DynUNet, SegResNet, UNet
from torch import nn

from monai_efficientq import dataflow
from monai_efficientq.dataflow import edge_layers

_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


def conv_layers(net: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in net.named_modules() if isinstance(m, _LAYER_TYPES)}


def call_order(net: nn.Module, x: torch.Tensor, layers: dict[str, nn.Module]) -> list[str]:
    order: list[str] = []
    handles = [m.register_forward_hook(lambda *_, n=n: order.append(n)) for n, m in layers.items()]
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()
    return order


def vol(channels: int = 1, size: int = 16) -> torch.Tensor:
    return torch.randn(1, channels, size, size, size, generator=torch.Generator().manual_seed(0))


@pytest.fixture(params=["real", "meta"])
def trace_device(request, monkeypatch):
    """Run a test with the small inputs traced on a real copy first (the default) or on the meta device first."""
    if request.param == "meta":
        monkeypatch.setattr(dataflow, "REAL_TRACE_MAX_VALUES", 0)
    return request.param


# ----------------------------------------------------------------------------------------------- MONAI networks


def test_unet_residual_units(trace_device):
    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8, 16), strides=(2, 2), num_res_units=2)
    layers = conv_layers(net)
    assert {"model.0.residual", "model.0.conv.unit0.conv", "model.2.0.conv", "model.2.1.conv.unit0.conv"} <= set(layers)
    x = vol()
    first, last = edge_layers(net, x, layers)
    # ResidualUnit.forward: res = residual(x); cx = conv(x); return cx + res -- both convs read the image.
    assert first == ["model.0.residual", "model.0.conv.unit0.conv"]
    # The top up-block is Sequential(Convolution(ConvTranspose3d + ADN), ResidualUnit(conv_only conv, Identity)):
    # output = conv(h) + h with h = PReLU(InstanceNorm(convT(...))), so the transposed conv is last too.
    assert last == ["model.2.0.conv", "model.2.1.conv.unit0.conv"]
    assert call_order(net, x, layers)[-1] in last


def test_unet_without_residual_units():
    net = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8, 16), strides=(2, 2), num_res_units=0)
    assert edge_layers(net, vol(), conv_layers(net)) == (["model.0.conv"], ["model.2.conv"])


def test_segresnet(trace_device):
    # init_filters=4 does not build with SegResNet's default GroupNorm(8 groups); 8 is the smallest that does.
    net = SegResNet(spatial_dims=3, in_channels=2, out_channels=3, init_filters=8, blocks_down=(1, 1), blocks_up=(1,))
    layers = conv_layers(net)
    assert {"convInit.conv", "conv_final.2.conv"} <= set(layers)
    first, last = edge_layers(net, vol(channels=2), layers)
    assert first == ["convInit.conv"]
    assert last == ["conv_final.2.conv"]  # ResBlock's in-place `x += identity` does not hide it


def test_segresnet_metatensor_input():
    net = SegResNet(spatial_dims=3, in_channels=1, out_channels=2, init_filters=8, blocks_down=(1, 1), blocks_up=(1,))
    x = MetaTensor(vol(), affine=torch.eye(4))
    assert edge_layers(net, x, conv_layers(net)) == (["convInit.conv"], ["conv_final.2.conv"])


@pytest.mark.parametrize("deep_supervision", [True, False])
def test_dynunet_res_block(deep_supervision):
    net = DynUNet(
        spatial_dims=3, in_channels=1, out_channels=2, kernel_size=[3, 3, 3], strides=[1, 2, 2],
        upsample_kernel_size=[2, 2], res_block=True, deep_supervision=deep_supervision,
    )
    layers = conv_layers(net)
    # UnetResBlock with in_channels != out_channels has a 1x1 residual conv3 that reads the input too.
    assert {"input_block.conv1.conv", "input_block.conv3.conv", "output_block.conv.conv"} <= set(layers)
    first, last = edge_layers(net, vol(), layers)
    assert first == ["input_block.conv1.conv", "input_block.conv3.conv"]
    assert last == ["output_block.conv.conv"]
    if deep_supervision:  # the heads only run in training mode: never called, in neither list
        assert "deep_supervision_heads.0.conv.conv" in layers


# -------------------------------------------------------------------------------------------- hand-written nets


class Branchy(nn.Module):
    """The input goes through non-layer ops, then into two convs; b also reads a's output; c only reads b's."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 2, 3, padding=1)
        self.b = nn.Conv2d(3, 2, 1)
        self.c = nn.Conv2d(2, 2, 1)
        self.unused = nn.Conv2d(2, 2, 1)
        self.norm = nn.InstanceNorm2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.pad(torch.relu(self.norm(x * 2)), (1, 1, 1, 1))[..., 1:-1, 1:-1].reshape(x.shape)
        ya = self.a(h)
        yb = self.b(torch.cat([h, ya[:, :2]], dim=1))
        return self.c(torch.sigmoid(yb))


def test_branches_after_non_layer_ops():
    net = Branchy()
    first, last = edge_layers(net, torch.randn(1, 1, 8, 8), conv_layers(net))
    assert first == ["a", "b"]  # b reads h directly (through cat) as well as a's output
    assert last == ["c"]


class SkipOut(nn.Module):
    """output = a(x) + b(a(x)): both are last; b, fed only by a, is not first."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 2, 3, padding=1)
        self.b = nn.Conv2d(2, 2, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ya = self.act(self.a(x))  # in-place ReLU stacks a node over a's output node
        if self.inplace:
            out = self.b(ya)
            out += ya
            return out
        return ya + self.b(ya)


@pytest.mark.parametrize("inplace", [False, True])
def test_output_sum_of_two_layers(inplace):
    net = SkipOut(inplace)
    first, last = edge_layers(net, torch.randn(1, 1, 8, 8), conv_layers(net))
    assert first == ["a"]
    assert last == ["a", "b"]


def test_only_given_layers_count():
    net = SkipOut(inplace=False)
    assert edge_layers(net, torch.randn(1, 1, 8, 8), {"b": net.b}) == (["b"], ["b"])
    assert edge_layers(net, torch.randn(1, 1, 8, 8), {}) == ([], [])


class DeepSupervised(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.enc = nn.Conv2d(1, 2, 3, padding=1)
        self.head = nn.Conv2d(2, 2, 1)
        self.aux = nn.Conv2d(2, 2, 1)
        self.kind = kind

    def forward(self, x: torch.Tensor):
        h = self.enc(x)
        aux = self.aux(h)  # called last, but not in the first output
        main = self.head(h)
        if self.kind == "tuple":
            return main, aux
        if self.kind == "list":
            return [main, [aux]]
        return {"pred": main, "aux": aux}


@pytest.mark.parametrize("kind", ["tuple", "list", "dict"])
def test_deep_supervision_output_uses_first_tensor(kind):
    net = DeepSupervised(kind)
    first, last = edge_layers(net, torch.randn(1, 1, 8, 8), conv_layers(net))
    assert first == ["enc"]
    assert last == ["head"]


def test_unknown_layer_name():
    net = SkipOut(inplace=False)
    with pytest.raises(KeyError, match="nope"):
        edge_layers(net, torch.randn(1, 1, 8, 8), {"nope": nn.Conv2d(1, 1, 1)})


# ------------------------------------------------------------------------------------ meta path and fallbacks


class DeviceSpy(nn.Module):
    """Records the device of every forward in a class-level list (shared by deep copies)."""

    devices: list[str] = []

    def __init__(self, needs_item: bool) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 2, 3, padding=1)
        self.b = nn.Conv2d(2, 1, 1)
        self.needs_item = needs_item

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        DeviceSpy.devices.append(x.device.type)
        scale = float(x.abs().max().item()) + 1.0 if self.needs_item else 1.0  # .item() fails on meta
        return self.b(self.a(x / scale))


def test_meta_path_leaves_net_untouched(monkeypatch):
    monkeypatch.setattr(DeviceSpy, "devices", [])
    monkeypatch.setattr(dataflow, "REAL_TRACE_MAX_VALUES", 0)
    net = DeviceSpy(needs_item=False).train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    calls: list[int] = []
    net.a.register_forward_pre_hook(lambda m, args: calls.append(args[0].device.type))
    assert edge_layers(net, torch.randn(1, 1, 8, 8), conv_layers(net)) == (["a"], ["b"])
    assert DeviceSpy.devices == ["meta"]
    assert set(calls) <= {"meta"}  # a hook copied with the net only ever sees meta tensors
    assert net.training and all(p.device.type == "cpu" and p.grad is None for p in net.parameters())
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert len(net.a._forward_hooks) == 0 and len(net.b._forward_hooks) == 0


def test_real_device_fallback_when_meta_fails(monkeypatch):
    monkeypatch.setattr(DeviceSpy, "devices", [])
    monkeypatch.setattr(dataflow, "REAL_TRACE_MAX_VALUES", 0)
    net = DeviceSpy(needs_item=True)
    assert edge_layers(net, torch.randn(1, 1, 8, 8), conv_layers(net)) == (["a"], ["b"])
    assert DeviceSpy.devices == ["meta", "cpu"]


def test_small_input_traced_on_a_real_copy_and_one_sample(monkeypatch):
    monkeypatch.setattr(DeviceSpy, "devices", [])
    net = DeviceSpy(needs_item=True).train()  # .item() would fail on the meta device
    state = {k: v.clone() for k, v in net.state_dict().items()}
    batches: list[int] = []
    net.a.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    assert edge_layers(net, torch.randn(3, 1, 8, 8), conv_layers(net)) == (["a"], ["b"])
    assert DeviceSpy.devices == ["cpu"]  # no meta forward
    assert batches == [1]  # one sample of the three
    assert net.training and all(p.grad is None for p in net.parameters())
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize("what", ["input", "weights"])
def test_large_input_or_network_traced_on_meta_first(monkeypatch, what):
    monkeypatch.setattr(DeviceSpy, "devices", [])
    monkeypatch.setattr(dataflow, "REAL_TRACE_MAX_VALUES" if what == "input" else "REAL_TRACE_MAX_WEIGHTS", 10)
    net = DeviceSpy(needs_item=False)
    assert edge_layers(net, torch.randn(1, 1, 8, 8), conv_layers(net)) == (["a"], ["b"])
    assert DeviceSpy.devices == ["meta"]


def test_meta_fallback_when_the_real_trace_fails(monkeypatch):
    class RealFails(DeviceSpy):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.device.type == "cpu":
                raise RuntimeError("no real forward")
            return super().forward(x)

    monkeypatch.setattr(DeviceSpy, "devices", [])
    net = RealFails(needs_item=False)
    assert edge_layers(net, torch.randn(1, 1, 8, 8), conv_layers(net)) == (["a"], ["b"])
    assert DeviceSpy.devices == ["meta"]


def test_inplace_on_input_and_inference_mode():
    class Clamp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(1, 1, 1)

        def forward(self, x):
            x.clamp_(min=0)
            return self.a(x)

    net = Clamp()
    with torch.inference_mode():
        assert edge_layers(net, torch.randn(1, 1, 4, 4), conv_layers(net)) == (["a"], ["a"])


class NonDifferentiable(nn.Module):
    def __init__(self, where: str) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 2, 1)
        self.b = nn.Conv2d(2, 2, 1)
        self.c = nn.Conv2d(2, 2, 1)
        self.where = where

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.where == "input":
            x = (x > 0).float()  # comparison: no grad edge from the input
        y = self.b(self.a(x)) + self.c(self.a(x).detach())
        if self.where == "output":
            y = torch.argmax(y, dim=1, keepdim=True).float()
        if self.where == "out_kwarg":
            buf = torch.empty_like(y)
            torch.mul(y, 2, out=buf)  # raises in the forward when y requires grad
            y = buf
        return y


@pytest.mark.parametrize(
    "where, expected",
    [
        ("input", (["a"], ["b", "c"])),  # first falls back to call order; last from the graph
        ("output", (["a"], ["c"])),  # last falls back to call order (c is called after b)
        ("out_kwarg", (["a"], ["c"])),  # no forward with grad at all: both from the call order
    ],
)
def test_call_order_fallback_warns(where, expected, caplog):
    net = NonDifferentiable(where)
    with caplog.at_level(logging.WARNING, logger="monai_efficientq"):
        assert edge_layers(net, torch.randn(1, 1, 4, 4), conv_layers(net)) == expected
    assert any("call order" in r.getMessage() for r in caplog.records)
