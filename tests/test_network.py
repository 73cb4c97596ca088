from __future__ import annotations

import pytest
import torch
from torch import nn

from monai_efficientq import EfficientQConfig, LayerCalledTwiceError, quantize_network
from monai_efficientq.modules import QuantizedMixin
from monai_efficientq.network import _forward_by_volume, _TargetRecorder
from monai_efficientq.targets import TargetStore

from nets import tiny_basic_unet, tiny_segresnet, tiny_unet_bn, volume


def _rel_err(net, qnet, x):
    with torch.no_grad():
        ref = net(x)
        return float((qnet(x) - ref).pow(2).sum() / ref.pow(2).sum())


def _quantize(net, x, **kw):
    kw.setdefault("iterations", 40)
    kw.setdefault("progress", False)
    return quantize_network(net, x, EfficientQConfig(**kw))


@pytest.mark.parametrize("make", [tiny_segresnet, tiny_unet_bn])
@pytest.mark.parametrize("act_bits", [None, 2])
def test_end_to_end_output_error_below_rtn(make, act_bits):
    net = make()
    x = volume(16)
    q_rtn, rep_rtn = _quantize(net, x, weight_bits=2, act_bits=act_bits, method="rtn")
    q_eq, rep_eq = _quantize(net, x, weight_bits=2, act_bits=act_bits)
    err_rtn, err_eq = _rel_err(net, q_rtn, x), _rel_err(net, q_eq, x)
    assert err_eq < err_rtn
    # the held-out volume chooses between ADMM's best iterate and round-to-nearest: no layer is worse there; on the
    # fitted volumes an 8-bit edge layer may then be a rounding error above round-to-nearest (1e-5 relative)
    assert all(r.held_out_error <= r.held_out_rtn_error * (1 + 1e-6) for r in rep_eq.layers)
    assert all(r.error_weighted <= r.rtn_error_weighted * (1 + 1e-4) for r in rep_eq.layers)
    assert sum(r.error < 0.95 * r.rtn_error for r in rep_eq.layers) >= len(rep_eq.layers) // 2
    assert not any(isinstance(m, QuantizedMixin) for m in net.modules()), "input network must not change"


def test_unet_batchnorm_is_folded_and_convtranspose_quantized():
    net = tiny_unet_bn()
    qnet, report = _quantize(net, volume(16), weight_bits=3, iterations=5)
    n_bn = sum(isinstance(m, nn.BatchNorm3d) for m in net.modules())
    assert len(report.folded_batchnorm) == n_bn
    assert not any(isinstance(m, nn.BatchNorm3d) for m in qnet.modules())
    types = {r.type for r in report.layers}
    assert {"Conv3d", "ConvTranspose3d"} <= types


def test_basic_unet():
    net = tiny_basic_unet()
    qnet, report = _quantize(net, volume(32), weight_bits=4, act_bits=4, iterations=10)
    assert len(report.layers) == sum(isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)) for m in net.modules())
    assert _rel_err(net, qnet, volume(32)) < 0.2


def test_first_last_rule_and_bits():
    net = tiny_segresnet()
    _, report = _quantize(net, volume(16), weight_bits=3, act_bits=4, iterations=3)
    first, *inner, last = report.layers
    assert (first.weight_bits, first.act_bits) == (8, None)
    assert (last.weight_bits, last.act_bits) == (8, None)
    assert all(r.weight_bits == 3 and r.act_bits == 4 for r in inner)
    _, report = _quantize(net, volume(16), weight_bits=3, first_last_bits=None, iterations=3)
    assert all(r.weight_bits == 3 for r in report.layers)


@pytest.mark.parametrize("preset", ["default", "original"])
def test_every_layer_reading_the_image_is_a_first_layer(preset):
    # a MONAI UNet residual unit has two convolutions reading the image: both keep 8-bit weights, float input
    net = tiny_unet_bn(num_res_units=2)
    _, report = _quantize(net, volume(16), weight_bits=2, act_bits=2, iterations=3, preset=preset)
    bits = {r.name: (r.weight_bits, r.act_bits) for r in report.layers}
    assert bits["model.0.residual"] == bits["model.0.conv.unit0.conv"] == (8, None)
    assert bits["model.0.conv.unit1.conv"] == (2, 2)
    edges = {n for n, b in bits.items() if b == (8, None)}
    assert edges == {"model.0.residual", "model.0.conv.unit0.conv", "model.2.0.conv", "model.2.1.conv.unit0.conv"}


def test_signed_activations_where_inputs_are_negative_and_original_clips():
    net = tiny_segresnet()
    _, default = _quantize(net, volume(16), weight_bits=4, act_bits=4, iterations=3)
    _, original = _quantize(net, volume(16), weight_bits=4, act_bits=4, iterations=3, preset="original")
    signed = {r.name for r in default.layers if r.act_signed}
    assert signed and any("down_layers" in n and n.endswith(".0.conv") for n in signed)
    assert not any(r.act_signed for r in original.layers)
    assert original.config["weight_scale"] == "tensor" and default.config["weight_scale"] == "channel"


@pytest.mark.parametrize("where", ["cpu", "disk"])
def test_targets_are_copies_not_views(where):
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv3d(4, 2, 1))
    rec = _TargetRecorder({"0": net[0]}, TargetStore(where, torch.device("cpu")), net)
    with torch.no_grad():
        net(volume(8))
    rec.remove()
    assert float(rec.targets.pop("0").min()) < 0  # a view would have been clamped by the in-place ReLU
    rec.targets.close()


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 1, 3, padding=1)

    def forward(self, x):
        return self.conv(self.conv(x))


def test_layer_called_twice_is_an_error():
    with pytest.raises(LayerCalledTwiceError, match="called twice"):
        _quantize(_Shared(), volume(8))


class _WithUnsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.gain = _Gain()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)
        self.unused = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = self.conv2(self.gain(torch.relu(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))


class _Gain(nn.Module):
    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, 4, 1, 1))

    def forward(self, x):
        return x * self.alpha


def test_conv2d_linear_net_and_unsupported_layers_are_reported():
    torch.manual_seed(0)
    net = _WithUnsupported().eval()
    x = torch.randn(4, 2, 8, 8)
    qnet, report = _quantize(net, x, weight_bits=4, iterations=10)
    assert [r.name for r in report.layers] == ["conv1", "conv2", "head"]
    reasons = {f["name"]: f["reason"] for f in report.float_layers}
    assert "unsupported" in reasons["gain"]
    assert "never called" in reasons["unused"]
    assert "float_layers" in report.to_json() and "gain" in report.to_markdown()
    assert _rel_err(net, qnet, x) < 0.05


def test_conv1d_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(2, 8, 5, padding=2), nn.ReLU(), nn.Conv1d(8, 8, 3, dilation=2, padding=2),
                        nn.ReLU(), nn.Conv1d(8, 2, 1)).eval()
    x = torch.randn(2, 2, 64)
    qnet, report = _quantize(net, x, weight_bits=3)
    assert len(report.layers) == 3 and _rel_err(net, qnet, x) < 0.05


def test_sigmoid_multilabel_and_label_attention():
    net = tiny_segresnet(out_channels=3)
    x = volume(16)
    _, report = _quantize(net, x, weight_bits=4, iterations=3, prediction="sigmoid")
    assert len(report.layers) > 0
    label = torch.zeros(1, 1, 16, 16, 16)
    label[..., 4:8, 4:8, 4:8] = 2
    cfg = EfficientQConfig(weight_bits=4, iterations=3, attention="label", progress=False)
    _, report = quantize_network(net, x, cfg, label=label)
    assert len(report.layers) > 0
    with pytest.raises(ValueError, match="needs the calibration label"):
        _quantize(net, x, weight_bits=4, iterations=3, attention="label")


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.randn(1, 2, 16, 16, 16), "2 channel"),
        (torch.randn(16, 16), "channel-first"),
        (torch.zeros(1, 1, 16, 16, 16), "all zeros"),
    ],
)
def test_bad_calibration_volumes(bad, match):
    with pytest.raises(ValueError, match=match):
        _quantize(tiny_segresnet(), bad)


def test_nan_and_inf_calibration_volume():
    x = volume(16)
    x[0, 0, 5, 5, 5] = float("nan")
    x[0, 0, 6, 5, 5] = float("inf")
    with pytest.raises(ValueError, match="2 NaN/Inf"):
        _quantize(tiny_segresnet(), x)


def test_volume_the_network_cannot_take_gives_a_hint():
    with pytest.raises(RuntimeError, match="divisible"):
        _quantize(tiny_segresnet(), volume(15))


@pytest.mark.parametrize("field", ["weight_bits", "act_bits", "first_last_bits"])
@pytest.mark.parametrize("bits", [1, 9, 2.5])
def test_unsupported_bits(field, bits):
    with pytest.raises(ValueError, match="integer from 2 to 8"):
        EfficientQConfig(**{field: bits})


def test_numpy_and_unbatched_input_and_report():
    net = tiny_segresnet()
    x = volume(16)[0].numpy()
    _, report = _quantize(net, x, weight_bits=4, iterations=3)
    assert report.calibration_shape == [1, 1, 16, 16, 16]
    assert report.packed_bytes > 0 and report.float_bytes > report.packed_bytes
    assert set(report.calib_agreement_dice) == {"class0", "class1", "class2"}


def test_rtn_measures_errors_directly_without_gram_statistics(monkeypatch):
    from monai_efficientq.solver import LayerSolver

    net, x = tiny_segresnet(), volume(16)
    # the original preset accumulates unweighted statistics, so its RTN errors come from the Gram matrices
    _, rep_gram = _quantize(net, x, weight_bits=3, preset="original", iterations=2)

    def no_statistics(*args, **kwargs):
        raise AssertionError("RTN must not stream Gram statistics")

    monkeypatch.setattr(LayerSolver, "add", no_statistics)
    _, rep_rtn = _quantize(net, x, weight_bits=3, preset="original", method="rtn")
    first_gram, first_rtn = rep_gram.layers[0], rep_rtn.layers[0]  # same float input for both runs
    # an 8-bit layer's error is ~1e-5 of ‖Y‖²; the float32 chunk products of the Gram route are good to ~1e-7
    assert first_rtn.error == pytest.approx(first_gram.rtn_error, rel=2e-2)
    assert first_rtn.error_weighted == pytest.approx(first_gram.rtn_error_weighted, rel=2e-2)
    assert first_rtn.error != pytest.approx(first_rtn.error_weighted, rel=1e-3)  # the weighting is applied
    assert all(r.error == r.rtn_error and r.error > 0 for r in rep_rtn.layers)


def test_rtn_with_quantized_inputs_converts_no_input_to_codes(monkeypatch):
    from monai_efficientq.quantizer import ActQuantizer

    net, x = tiny_segresnet(), volume(16)
    _, before = _quantize(net, x, weight_bits=2, act_bits=2, method="rtn")

    def no_codes(self, values):
        raise AssertionError("round-to-nearest streams no statistics: its inputs need no codes")

    monkeypatch.setattr(ActQuantizer, "codes", no_codes)
    _, after = _quantize(net, x, weight_bits=2, act_bits=2, method="rtn")
    assert [r.error for r in after.layers] == [r.error for r in before.layers]


def test_output_aware_activation_range_is_the_best_of_the_factors():
    from monai_efficientq.layers import layer_forward
    from monai_efficientq.network import _choose_act_range
    from monai_efficientq.quantizer import ActQuantizer

    torch.manual_seed(0)
    layer = nn.Conv3d(2, 6, 3, padding=1)
    with torch.no_grad():  # channel 0: small values, large weights; channel 1: large values the layer ignores
        layer.weight[:, 1] *= 1e-3
    x = torch.rand(1, 2, 8, 8, 8)
    x[:, 1] *= 10  # the least-squares range follows channel 1, which is not what the output needs
    y = layer(x).detach()
    h_map = torch.rand(1, 8, 8, 8) + 0.5
    factors = (0.3, 0.5, 0.7, 1.0, 1.4)
    act = ActQuantizer(2).fit(x)
    step0 = float(act.step)

    def weighted_error(step):
        q = ActQuantizer(2)
        q.step.fill_(step)
        return float(((layer_forward(layer, q(x), layer.weight, layer.bias) - y).pow(2) * h_map[:, None]).sum())

    errors = {f: weighted_error(step0 * f) for f in factors}
    chosen = _choose_act_range(act, layer, x, y, h_map, factors)
    assert chosen == min(errors, key=errors.get)
    assert float(act.step) == pytest.approx(step0 * chosen)
    assert chosen < 1.0 and errors[chosen] < 0.8 * errors[1.0]


@pytest.mark.parametrize("shape, weighted", [((2, 3, 5, 6, 7), True), ((2, 3, 5, 6, 7), False), ((4, 5), False)])
def test_squared_error_sums_by_blocks_are_the_float64_sums(shape, weighted, monkeypatch):
    from monai_efficientq import layers as layers_module
    from monai_efficientq import network as network_module

    monkeypatch.setattr(layers_module, "_ERROR_BLOCK", 17)  # many blocks per volume, the last one partial
    torch.manual_seed(3)
    out, y = torch.randn(shape), torch.randn(shape)
    h_map = torch.rand(shape[:1] + shape[2:]) if weighted else None
    e2 = (out - y).double().pow(2)
    expected_weighted = float((e2 * h_map.double().unsqueeze(1)).sum()) if weighted else float(e2.sum())
    total, total_weighted = layers_module.squared_error_sums(out, y, h_map)
    assert total == pytest.approx(float(e2.sum()), rel=1e-6)  # float32 squares, float64 sums: the order differs
    assert total_weighted == pytest.approx(expected_weighted, rel=1e-6)
    assert layers_module.squared_error_sums(None, y, h_map)[0] == pytest.approx(float(y.double().pow(2).sum()), rel=1e-6)
    unweighted, relative = network_module._output_errors(out, y, h_map)
    assert unweighted == pytest.approx(float(e2.sum() / y.double().pow(2).sum()), rel=1e-6)
    if not weighted:
        assert relative == unweighted


def test_activation_fit_ignores_voxels_outside_the_body():
    from monai_efficientq.network import _inside_body

    x = torch.full((1, 2, 8, 8, 8), 7.0)
    x[..., 2:6, 2:6, 2:6] = torch.rand(1, 2, 4, 4, 4)
    body = torch.zeros(1, 16, 16, 16, dtype=torch.bool)
    body[:, 4:12, 4:12, 4:12] = True  # the input resolution is twice the layer's
    inside = _inside_body(x, body)
    assert inside.shape == (64, 2) and float(inside.max()) < 1.0
    assert _inside_body(x, None) is x


def test_act_fit_follows_the_preset_and_is_checked():
    assert EfficientQConfig(preset="original").act_fit == "ls"
    assert EfficientQConfig().act_fit == "output"
    with pytest.raises(ValueError, match="act_fit"):
        EfficientQConfig(act_fit="mse")
    with pytest.raises(ValueError, match="act_range_factors"):
        EfficientQConfig(act_range_factors=())


def test_original_preset_is_the_published_schedule_and_integer_weights(monkeypatch):
    original = EfficientQConfig(preset="original")
    assert (original.rho_schedule, original.class_weights) == ("after", "integer")
    assert (original.calib_augment, original.holdout) == (0, False)  # one volume, as published
    assert (EfficientQConfig().calib_augment, EfficientQConfig().holdout) == (2, True)
    assert EfficientQConfig(preset="original", class_weights="real").class_weights == "real"
    for field, bad in (("rho_schedule", "sometimes"), ("class_weights", "float"), ("calib_augment", -1),
                       ("holdout", "yes")):
        with pytest.raises(ValueError, match=field):
            EfficientQConfig(**{field: bad})
    import monai_efficientq.network as network

    seen = []

    class Recording(network.AttentionMaps):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs.get("integer"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(network, "AttentionMaps", Recording)
    _, report = _quantize(tiny_segresnet(), volume(16), preset="original", iterations=2)
    _quantize(tiny_segresnet(), volume(16), iterations=2)
    assert seen == [True, False]
    assert report.config["class_weights"] == "integer" and report.config["rho_schedule"] == "after"


def test_quantize_in_place_matches_the_copy_and_keeps_the_mode():
    from monai_efficientq import quantize_, quantization_info

    net, x = tiny_unet_bn(), volume(16)
    qnet, report = _quantize(net, x, weight_bits=2)
    holder = nn.ModuleDict({"model": net})  # e.g. an engine or a wrapper holding the same object
    net.train()
    report_ = quantize_(net, x, EfficientQConfig(weight_bits=2, iterations=40, progress=False))
    assert holder["model"] is net and net.training
    assert sum(isinstance(m, QuantizedMixin) for m in net.modules()) == len(report_.layers) == len(report.layers)
    assert not any(isinstance(m, nn.BatchNorm3d) for m in net.modules())
    assert quantization_info(net).folded_batchnorm == report.folded_batchnorm
    with torch.no_grad():
        assert torch.equal(net.eval()(x), qnet(x))


def test_a_bare_layer_is_quantized_on_a_copy_only():
    from monai_efficientq import quantize_

    conv = nn.Conv3d(2, 4, 3, padding=1)
    x = torch.randn(1, 2, 8, 8, 8)
    with pytest.raises(ValueError, match="use quantize_network"):
        quantize_(conv, x, EfficientQConfig(progress=False))
    qconv, report = quantize_network(conv, x, EfficientQConfig(first_last_bits=None, iterations=5, progress=False))
    assert isinstance(qconv, QuantizedMixin) and [r.name for r in report.layers] == [""]


def test_folding_that_changes_the_output_is_undone(monkeypatch):
    import monai_efficientq.network as network_mod
    from monai_efficientq.folding import fold_batchnorm

    def bad_fold(net, pairs):  # folds, then spoils one folded weight
        fold_batchnorm(net, pairs)
        net.get_submodule(pairs[0][0]).weight.mul_(3.0)

    monkeypatch.setattr(network_mod, "fold_batchnorm", bad_fold)
    net, x = tiny_unet_bn(), volume(16)
    n_bn = sum(isinstance(m, nn.BatchNorm3d) for m in net.modules())
    qnet, report = _quantize(net, x, weight_bits=4)
    assert report.folded_batchnorm == [] and n_bn > 0
    assert sum(isinstance(m, nn.BatchNorm3d) for m in qnet.modules()) == n_bn
    assert _rel_err(net, qnet, x) < 0.1


@pytest.mark.parametrize("make, forwards", [(tiny_segresnet, 2), (tiny_unet_bn, 3)])
def test_a_network_without_batchnorm_records_its_targets_in_the_folding_forward(make, forwards, monkeypatch):
    import monai_efficientq.network as network_mod

    from monai_efficientq import quantize_

    cfg = EfficientQConfig(weight_bits=2, act_bits=2, iterations=10, progress=False)
    net, x = make(), volume(16)
    calls: list[bool] = []
    net.register_forward_pre_hook(lambda module, args: calls.append(module is net))  # copies run hooks too
    report = quantize_(net, x, cfg)
    # the folding forward (with the targets when there is no BatchNorm), [the targets], the quantizing forward; each
    # one per calibration volume on the CPU (the volume and its two augmented copies)
    assert calls.count(True) == forwards * 3
    monkeypatch.setattr(network_mod, "has_batchnorm", lambda module: True)  # a separate targets forward
    net2 = make()
    report2 = quantize_(net2, x, cfg)
    assert [r.error for r in report.layers] == [r.error for r in report2.layers]
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), net2.state_dict().values()))


def test_held_out_volume_does_not_count_towards_the_solver_choice():
    """A wide layer on a small volume: 3 × 64 output voxels would take the dense K×K inverse (K = 433), the 128
    fitted ones take Woodbury; the held-out 64 only rank the iterates."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 16, 1), nn.ReLU(), nn.Conv3d(16, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1))
    x = torch.randn(1, 1, 4, 4, 4)
    _, report = _quantize(net, x, weight_bits=2, iterations=3, calib_augment=2, holdout=True, prediction="softmax")
    wide = next(r for r in report.layers if r.name == "2")
    assert wide.solver == "woodbury" and wide.held_out_error is not None
    _, report = _quantize(net, x, weight_bits=2, iterations=3, calib_augment=2, holdout=False, prediction="softmax")
    assert next(r for r in report.layers if r.name == "2").solver == "cholesky"


@pytest.mark.parametrize("act_bits", [None, 2])
def test_quantized_inputs_stream_their_int8_codes(act_bits, monkeypatch):
    # a layer whose input is quantized (unsigned, at most 7 bits) sums its Gram matrix from the integer codes
    calls = []
    int_mm = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(a.shape) or int_mm(a, b))
    _, report = _quantize(tiny_segresnet(), volume(16), weight_bits=2, act_bits=act_bits, iterations=3)
    quantized_inputs = [r for r in report.layers if r.act_bits is not None]
    assert bool(calls) == bool(quantized_inputs) == (act_bits is not None)


class _CallCounter(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.batches = inner, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        return self.inner(x)


@pytest.mark.parametrize("batch, volumes, calls", [(3, 3, [1, 1, 1]), (6, 3, [2, 2, 2]), (4, 3, [4]), (2, 1, [2])])
def test_the_quantizing_forward_runs_one_volume_at_a_time(batch, volumes, calls):
    torch.manual_seed(0)
    conv = nn.Conv3d(2, 3, 3, padding=1)
    counter = _CallCounter(conv)
    x = torch.randn(batch, 2, 5, 5, 5)
    out = _forward_by_volume(counter, x, volumes)
    assert counter.batches == calls  # rows of one volume per call; no multiple of the volumes: one call
    assert torch.allclose(out, conv(x), rtol=1e-5, atol=1e-6)
    for start in range(0, batch, batch // len(calls)):  # each volume's output is that of the volume alone
        part = slice(start, start + batch // len(calls))
        assert torch.equal(out[part], conv(x[part]))

