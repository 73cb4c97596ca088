"""Networks found in MONAI Model-Zoo bundles beyond UNet and SegResNet, in tiny configurations: DynUNet (with and
without deep supervision, plain and residual blocks), SwinUNETR (patch embedding, window attention, LayerNorm,
Linear layers on token tensors), BasicUNet and 2-D UNet, DynUNet and SwinUNETR.

Each is quantized from seeded random weights on a random volume; the tests check what is quantized, what is left
float and why, that the packed checkpoint rebuilds the same network, and that 8-bit stays close to float.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch
from monai.networks.nets import BasicUNet, DynUNet, SwinUNETR, UNet
from torch import nn

from monai_efficientq import EfficientQConfig, quantize_network
from monai_efficientq.checkpoint import load_quantized, save_quantized
from monai_efficientq.modules import QuantizedMixin

_LAYER_TYPES = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


def _dynunet(spatial_dims: int = 3, deep_supervision: bool = False, res_block: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    strides = [1, 2, 2, 2] if deep_supervision else [1, 2, 2]
    return DynUNet(
        spatial_dims, 1, 2, kernel_size=[3] * len(strides), strides=strides, upsample_kernel_size=strides[1:],
        filters=[4, 8, 8, 16][: len(strides)], deep_supervision=deep_supervision,
        deep_supr_num=2 if deep_supervision else 1, res_block=res_block,
    ).eval()


def _swin_unetr(spatial_dims: int = 3, seed: int = 0) -> nn.Module:
    """3-D: BatchNorm in the conv blocks (InstanceNorm cannot normalise the 1-voxel bottleneck of a 32^3 input)
    and gradient checkpointing, as in the BTCV bundle; 2-D: the default InstanceNorm on a 64^2 input."""
    pytest.importorskip("einops")  # SwinUNETR rearranges its tensors with einops
    torch.manual_seed(seed)
    norm = "batch" if spatial_dims == 3 else "instance"
    net = SwinUNETR(
        in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=4,
        spatial_dims=spatial_dims, norm_name=norm, use_checkpoint=spatial_dims == 3,
    )
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
        if hasattr(m, "relative_position_bias_table"):
            nn.init.normal_(m.relative_position_bias_table, std=0.5, generator=gen)
    return net.eval()


def _basic_unet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return BasicUNet(3, 1, 2, features=(4, 4, 8, 8, 16, 4)).eval()


def _unet_2d(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return UNet(2, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1).eval()


# name: (network factory taking a seed, calibration shape, skip_layers)
FAMILIES: dict[str, tuple[Callable[..., nn.Module], tuple[int, ...], list[str]]] = {
    "dynunet": (lambda seed=0: _dynunet(seed=seed), (1, 1, 16, 16, 16), []),
    "dynunet_deep_supervision_res": (
        lambda seed=0: _dynunet(deep_supervision=True, res_block=True, seed=seed), (1, 1, 16, 16, 16), [],
    ),
    "dynunet_2d_deep_supervision": (lambda seed=0: _dynunet(2, deep_supervision=True, seed=seed), (1, 1, 32, 32), []),
    # the two 192-channel bottleneck convolutions (and their BatchNorms) stay float, to keep the test fast
    "swin_unetr": (
        lambda seed=0: _swin_unetr(seed=seed), (1, 1, 32, 32, 32),
        ["encoder10.layer.conv1.conv", "encoder10.layer.conv2.conv"],
    ),
    "swin_unetr_2d": (lambda seed=0: _swin_unetr(2, seed=seed), (1, 1, 64, 64), []),
    "basic_unet": (_basic_unet, (1, 1, 32, 32, 32), []),
    "unet_2d": (_unet_2d, (1, 1, 32, 32), []),
}


def _calibration(shape: tuple[int, ...]) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    x[:, :, :2] = 0  # a little background outside the "body"
    return x


def _called_layers(net: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of the Conv/ConvTranspose/Linear layers the float network calls on ``x`` (eval mode)."""
    called: list[str] = []
    handles = [
        m.register_forward_hook(lambda *_, name=name: called.append(name))
        for name, m in net.named_modules()
        if isinstance(m, _LAYER_TYPES)
    ]
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()
    return called


def _rel_l2(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_w2a2_quantizes_every_called_layer_reports_the_rest_and_round_trips(family, tmp_path):
    make, shape, skip = FAMILIES[family]
    net, x = make(), _calibration(shape)
    called = _called_layers(net, x)
    # the default preset (calibration with augmented copies, one held out) but for the 32^3 SwinUNETR: its
    # full-resolution layers would take most of this file's time
    fast = {"calib_augment": 0, "holdout": False} if family == "swin_unetr" else {}
    cfg = EfficientQConfig(weight_bits=2, act_bits=2, iterations=3, skip_layers=skip, progress=False, **fast)
    qnet, report = quantize_network(net, x, cfg)

    # every Conv/ConvTranspose/Linear the forward calls is quantized, but those skipped by the configuration
    assert sorted(r.name for r in report.layers) == sorted(set(called) - set(skip))
    assert all(isinstance(qnet.get_submodule(r.name), QuantizedMixin) for r in report.layers)
    # everything else that holds parameters is left float and listed with a reason
    reasons = {f["name"]: f["reason"] for f in report.float_layers}
    holders = {
        name for name, m in qnet.named_modules()
        if not isinstance(m, QuantizedMixin) and next(m.parameters(recurse=False), None) is not None
    }
    assert set(reasons) == holders
    for name in skip:
        assert reasons[name] == "skipped by config"
    norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.modules.batchnorm._BatchNorm)
    for name, m in qnet.named_modules():
        if isinstance(m, norms) and name in holders:
            assert "float by design" in reasons[name]
    folded = {bn for _, bn in report.folded_batchnorm}
    for name, m in qnet.named_modules():  # every BatchNorm is folded but those after a skipped conv
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert name not in folded and name.replace("norm", "conv") + ".conv" in skip

    path = save_quantized(qnet, tmp_path / "q.pt")
    loaded = load_quantized(make(seed=7), path)  # a fresh float network with other weights
    with torch.no_grad():
        assert torch.equal(loaded(x), qnet(x))


@pytest.mark.parametrize("family", ["dynunet", "unet_2d"])  # BasicUNet: test_network.py
def test_8_bit_is_close_to_float(family):
    make, shape, _ = FAMILIES[family]
    net, x = make(), _calibration(shape)
    cfg = EfficientQConfig(weight_bits=8, act_bits=8, iterations=3, calib_augment=0, holdout=False, progress=False)
    qnet, _ = quantize_network(net, x, cfg)
    with torch.no_grad():
        assert _rel_l2(net(x), qnet(x)) < 0.06


def test_swin_unetr_attention_tables_are_reported_its_linear_layers_quantized_and_8_bit_close_to_float():
    make, shape, _ = FAMILIES["swin_unetr_2d"]
    net, x = make(), _calibration(shape)
    cfg = EfficientQConfig(weight_bits=8, act_bits=8, iterations=3, calib_augment=0, holdout=False, progress=False)
    qnet, report = quantize_network(net, x, cfg)
    attention = [f for f in report.float_layers if f["type"] == "WindowAttention"]
    assert len(attention) == 4
    assert all("relative_position_bias_table" in f["reason"] for f in attention)
    linear = [r.name for r in report.layers if r.type == "Linear"]
    assert {n.rpartition(".")[2] for n in linear} == {"qkv", "proj", "linear1", "linear2", "reduction"}
    assert all(isinstance(qnet.get_submodule(n), nn.Linear) for n in linear)
    with torch.no_grad():
        assert _rel_l2(net(x), qnet(x)) < 0.06


def test_deep_supervision_heads_are_quantized_and_run_in_train_mode():
    make, shape, _ = FAMILIES["dynunet_deep_supervision_res"]
    net, x = make(), _calibration(shape)
    cfg = EfficientQConfig(weight_bits=4, iterations=3, calib_augment=0, holdout=False, progress=False)
    qnet, report = quantize_network(net, x, cfg)
    heads = [n for n, m in net.named_modules() if n.startswith("deep_supervision_heads.") and isinstance(m, nn.Conv3d)]
    assert len(heads) == 2 and set(heads) <= {r.name for r in report.layers}
    with torch.no_grad():
        main = qnet(x)
        assert main.shape == (1, 2, *shape[2:])  # eval: the main output only
        stacked = qnet.train()(x)
        ref = net.train()(x)
    assert stacked.shape == (1, 3, 2, *shape[2:])  # train: main output and the two heads, stacked
    assert torch.allclose(stacked[:, 0], main, atol=1e-6)
    for i in (1, 2):
        assert _rel_l2(ref[:, i], stacked[:, i]) < 0.5


class _TrainOnlyHead(nn.Module):
    """A deep-supervision head that only training calls (as some bundle networks have)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.InstanceNorm3d(4, affine=True), nn.ReLU())
        self.out = nn.Conv3d(4, 2, 1)
        self.aux = nn.Conv3d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        features = self.body(x)
        if self.training:
            return [self.out(features), self.aux(features)]
        return self.out(features)


def test_a_head_called_only_in_training_is_left_float_and_still_runs(tmp_path):
    torch.manual_seed(0)
    net, x = _TrainOnlyHead().eval(), _calibration((1, 1, 8, 8, 8))
    qnet, report = quantize_network(net, x, EfficientQConfig(weight_bits=4, iterations=3, progress=False))
    reasons = {f["name"]: f["reason"] for f in report.float_layers}
    assert "never called" in reasons["aux"] and "float by design" in reasons["body.1"]
    assert sorted(r.name for r in report.layers) == ["body.0", "out"]
    loaded = load_quantized(net, save_quantized(qnet, tmp_path / "q.pt"))
    with torch.no_grad():
        main, aux = qnet.train()(x)
        loaded_main, loaded_aux = loaded.train()(x)
        float_aux = net.aux(net.body(x))  # the head sees the quantized features, with its float weights
    assert not isinstance(qnet.aux, QuantizedMixin) and torch.equal(qnet.aux.weight, net.aux.weight)
    assert torch.equal(loaded_main, main) and torch.equal(loaded_aux, aux)
    assert _rel_l2(float_aux, aux) < 0.05


class _TokenLinear(nn.Module):
    """A Linear over the channels of a ``(B, C, H, W)`` map, applied as SwinUNETR applies its Linear layers: on
    channel-last maps ``(B, H, W, C)`` (its MLPs) or on window-partitioned tokens ``(B·windows, tokens, C)``
    (its attention)."""

    def __init__(self, linear: nn.Linear, layout: str, window: int = 4) -> None:
        super().__init__()
        self.linear, self.layout, self.window = linear, layout, window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = x.permute(0, 2, 3, 1)
        if self.layout == "channels_last":
            return self.linear(t).permute(0, 3, 1, 2)
        k = self.window
        windows = t.reshape(b, h // k, k, w // k, k, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, k * k, c)
        out = self.linear(windows).reshape(b, h // k, w // k, k, k, -1).permute(0, 1, 3, 2, 4, 5)
        return out.reshape(b, h, w, -1).permute(0, 3, 1, 2)


@pytest.mark.parametrize("setting", [{"holdout": True, "calib_augment": 1}, {"act_fit_volumes": "given"}])
def test_a_linear_layer_gives_the_same_result_on_windows_and_channel_last_maps(setting):
    """Which voxels are held out, fitted or inside the body must not depend on how the tokens are laid out."""
    torch.manual_seed(0)
    linear = nn.Linear(4, 6)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    x[0, :, :4] = 0  # background rows in the first volume
    x[1] *= 3  # the second volume (held out, or an augmented copy) differs from the first
    kw = {"holdout": False, "calib_augment": 1 if "act_fit_volumes" in setting else 0, **setting}
    cfg = EfficientQConfig(weight_bits=3, act_bits=3, first_last_bits=None, iterations=5, progress=False, **kw)
    results = {}
    for layout in ("channels_last", "windows"):
        qnet, report = quantize_network(_TokenLinear(linear, layout), x, cfg)
        (record,) = report.layers
        results[layout] = (qnet.linear, record)
    (q_cl, r_cl), (q_win, r_win) = results["channels_last"], results["windows"]
    assert float(q_win.act_quant.step) == pytest.approx(float(q_cl.act_quant.step), rel=1e-5)
    assert float(q_win.act_quant.offset) == pytest.approx(float(q_cl.act_quant.offset), rel=1e-5, abs=1e-7)
    assert torch.allclose(q_win.weight, q_cl.weight, atol=1e-5)
    assert r_win.error == pytest.approx(r_cl.error, rel=1e-4)
    if setting.get("holdout"):
        assert r_cl.held_out_error is not None
        assert r_win.held_out_error == pytest.approx(r_cl.held_out_error, rel=1e-4)


def test_a_skipped_conv_keeps_its_batchnorm_and_the_checkpoint_loads(tmp_path):
    """Folding a BatchNorm into a conv that then stays float gave it a bias the float network has not: the packed
    checkpoint could not be loaded."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1, bias=False), nn.BatchNorm3d(4), nn.ReLU(),
        nn.Conv3d(4, 4, 3, padding=1, bias=False), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 2, 1),
    )
    for bn in (net[1], net[4]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    net.eval()
    x = _calibration((1, 1, 8, 8, 8))
    cfg = EfficientQConfig(weight_bits=4, iterations=3, skip_layers=["3"], progress=False)
    qnet, report = quantize_network(net, x, cfg)
    assert report.folded_batchnorm == [["0", "1"]]
    assert qnet[3].bias is None and isinstance(qnet[4], nn.BatchNorm3d)
    loaded = load_quantized(net, save_quantized(qnet, tmp_path / "q.pt"))
    with torch.no_grad():
        assert torch.equal(loaded(x), qnet(x))


class _SequenceFirstLinear(nn.Module):
    """A Linear on ``(tokens, B, C)`` (sequence-first, as ``nn.TransformerEncoderLayer`` without ``batch_first``)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).permute(2, 0, 1)
        return self.linear(tokens).permute(1, 2, 0).reshape(b, -1, h, w)


def test_a_layer_whose_volumes_cannot_be_told_apart_is_fitted_on_all_of_them_with_a_warning(caplog):
    """Batched (``target_device="cpu"``), a sequence-first layer mixes the volumes in its leading dimension; one volume
    at a time (the CPU default) their outputs are joined volume after volume, and the last one is held out."""
    torch.manual_seed(0)
    x = torch.randn(1, 4, 5, 5, generator=torch.Generator().manual_seed(0))  # 25 tokens: no multiple of 2 volumes
    settings = {"weight_bits": 4, "act_bits": 4, "first_last_bits": None, "iterations": 3, "calib_augment": 1,
                "progress": False}
    with caplog.at_level(logging.WARNING, logger="monai_efficientq"):
        _, report = quantize_network(_SequenceFirstLinear().eval(), x, EfficientQConfig(**settings, target_device="cpu"))
    assert any("linear" in r.getMessage() and "cannot be told apart" in r.getMessage() for r in caplog.records)
    assert report.layers[0].held_out_error is None
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="monai_efficientq"):
        _, report = quantize_network(_SequenceFirstLinear().eval(), x, EfficientQConfig(**settings))
    assert not any("cannot be told apart" in r.getMessage() for r in caplog.records)
    assert report.layers[0].held_out_error is not None
