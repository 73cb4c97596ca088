from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from monai_efficientq.layers import (
    conv_transpose_as_conv,
    input_patches,
    matrix_to_weight,
    output_matrix,
    weight_matrix,
)

TRANSPOSED_CASES = [
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, output_padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=2, stride=2),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=(1, 2, 3), padding=(0, 1, 2), dilation=(1, 2, 1), groups=2),
    dict(in_channels=3, out_channels=3, kernel_size=1, stride=1),
    dict(in_channels=2, out_channels=4, kernel_size=3, stride=3, padding=2, output_padding=2, dilation=2),
]


@pytest.mark.parametrize("kwargs", TRANSPOSED_CASES)
def test_conv_transpose_rewrite_reproduces_conv_transpose3d(kwargs):
    torch.manual_seed(0)
    layer = nn.ConvTranspose3d(**kwargs).double()
    x = torch.randn(2, kwargs["in_channels"], 4, 5, 3, dtype=torch.float64)
    ref = F.conv_transpose3d(
        x, layer.weight, layer.bias, layer.stride, layer.padding, layer.output_padding, layer.groups, layer.dilation
    )
    out = conv_transpose_as_conv(layer, x)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)


def test_conv_transpose2d_rewrite():
    layer = nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1).double()
    x = torch.randn(1, 3, 6, 7, dtype=torch.float64)
    assert torch.allclose(conv_transpose_as_conv(layer, x), layer(x), atol=1e-12)


LAYERS = [
    lambda: nn.Conv3d(4, 6, 3, padding=1),
    lambda: nn.Conv3d(4, 6, 3, stride=2, dilation=1, groups=2, bias=False),
    lambda: nn.Conv3d(4, 4, (3, 1, 3), stride=(1, 2, 1), padding=(2, 0, 1), dilation=(2, 1, 1), groups=4),
    lambda: nn.Conv3d(2, 3, 3, padding=1, padding_mode="reflect"),
    lambda: nn.Conv2d(3, 5, 3, padding="same"),
    lambda: nn.Conv1d(3, 4, 5, stride=2, padding=2),
    lambda: nn.ConvTranspose3d(4, 2, 2, stride=2),
    lambda: nn.ConvTranspose3d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
    lambda: nn.Linear(7, 5),
]


@pytest.mark.parametrize("make", LAYERS)
@pytest.mark.parametrize("chunk_bytes", [64, 1 << 30])
def test_patches_times_weight_matrix_is_the_layer_output(make, chunk_bytes):
    torch.manual_seed(1)
    layer = make().double()
    if isinstance(layer, nn.Linear):
        x = torch.randn(2, 3, 7, dtype=torch.float64)
    else:
        nd = len(layer.kernel_size)
        x = torch.randn(2, layer.in_channels, *[7, 6, 5][:nd], dtype=torch.float64)
    y = layer(x)
    w = weight_matrix(layer)
    y_mat = output_matrix(layer, y)
    bias = layer.bias.reshape(w.shape[0], w.shape[1], 1) if layer.bias is not None else 0
    seen = 0
    for cols, patches in input_patches(layer, x, chunk_bytes, torch.float64):
        assert torch.allclose(w @ patches + bias, y_mat[..., cols], atol=1e-10)
        seen += patches.shape[-1]
    assert seen == y_mat.shape[-1]


@pytest.mark.parametrize("make", LAYERS)
def test_weight_matrix_roundtrip(make):
    layer = make()
    assert torch.equal(matrix_to_weight(layer, weight_matrix(layer)), layer.weight)


def test_chunks_stay_bounded():
    layer = nn.Conv3d(8, 8, 3, padding=1)
    x = torch.randn(1, 8, 16, 16, 16)
    sizes = [p.numel() * 8 for _, p in input_patches(layer, x, 2**20, torch.float64)]
    assert len(sizes) > 1
    assert max(sizes) <= 2**20


@pytest.mark.parametrize("stride, dilation, step", [(1, 1, 2), (2, 1, 3), (1, 2, 2), (1, 1, (3, 1, 2)), (2, 1, (1, 2, 1))])
def test_subsampled_forward_is_every_step_th_output_voxel(stride, dilation, step):
    from monai_efficientq.layers import layer_forward, subsampled_forward

    torch.manual_seed(0)
    layer = nn.Conv3d(3, 4, 3, stride=stride, padding=dilation, dilation=dilation)
    x = torch.randn(2, 3, 13, 12, 11)
    full = layer_forward(layer, x, layer.weight, layer.bias)
    sub = subsampled_forward(layer, x, layer.weight, layer.bias, step)
    d, h, w = (step,) * 3 if isinstance(step, int) else step
    assert torch.allclose(sub, full[..., ::d, ::h, ::w], atol=1e-6)


def test_sampled_output_steps_per_axis_keep_enough_voxels_and_no_more_than_needed():
    from monai_efficientq.layers import sampled_output_step, sampled_output_steps

    conv = nn.Conv3d(2, 2, 3, padding=1)
    for shape, min_voxels in [((3, 2, 48, 48, 48), 2**16), ((3, 2, 96, 96, 96), 2**16), ((2, 2, 40, 40, 40), 2000),
                              ((1, 2, 13, 7, 30), 50)]:
        steps = sampled_output_steps(conv, shape, min_voxels)
        kept = torch.zeros(shape[2:])[::steps[0], ::steps[1], ::steps[2]].numel() * shape[0]
        assert kept >= min_voxels
        assert min(steps) >= sampled_output_step(conv, shape, min_voxels)  # never more voxels than one step for all
        for axis in range(3):  # no axis could take one more step
            more = list(steps)
            more[axis] += 1
            assert torch.zeros(shape[2:])[::more[0], ::more[1], ::more[2]].numel() * shape[0] < min_voxels
    assert sampled_output_steps(conv, (3, 2, 48, 48, 48), 2**16) == (2, 2, 1)  # 82,944 voxels instead of 331,776
    assert sampled_output_steps(conv, (3, 2, 24, 24, 24), 2**16) == (1, 1, 1)  # fewer than 2^16 in all
    assert sampled_output_steps(nn.ConvTranspose3d(2, 2, 2, stride=2), (1, 2, 40, 40, 40), 10) == (1, 1, 1)
    assert sampled_output_steps(conv, (1, 2, 40, 40, 40), 0) == (1, 1, 1)


def test_sampled_output_step_keeps_enough_voxels_and_skips_what_it_cannot_sample():
    from monai_efficientq.layers import sampled_output_step

    conv = nn.Conv3d(2, 2, 3, padding=1)
    assert sampled_output_step(conv, (2, 2, 40, 40, 40), 2000) == 4  # 2·10³ ≥ 2000 > 2·(40/5)³
    assert sampled_output_step(conv, (1, 2, 8, 8, 8), 2000) == 1
    assert sampled_output_step(nn.ConvTranspose3d(2, 2, 2, stride=2), (1, 2, 40, 40, 40), 10) == 1
    assert sampled_output_step(nn.Conv3d(2, 2, 3, padding=1, padding_mode="reflect"), (1, 2, 40, 40, 40), 10) == 1


@pytest.mark.parametrize("make", LAYERS)
def test_patches_with_the_ones_row(make):
    layer = make().double()
    x = torch.randn(2, 3, 7, dtype=torch.float64) if isinstance(layer, nn.Linear) else None
    if x is None:
        nd = len(layer.kernel_size)
        x = torch.randn(2, layer.in_channels, *[7, 6, 5][:nd], dtype=torch.float64)
    plain = [(c, p.clone()) for c, p in input_patches(layer, x, 1 << 8, torch.float64)]
    with_ones = [(c, p.clone()) for c, p in input_patches(layer, x, 1 << 8, torch.float64, ones_row=True)]
    assert len(plain) == len(with_ones) > 1
    for (cols, p), (cols1, p1) in zip(plain, with_ones):
        assert cols == cols1 and p1.shape[1] == p.shape[1] + 1
        assert torch.equal(p1[:, :-1], p) and bool((p1[:, -1] == 1).all())


@pytest.mark.parametrize("make", LAYERS)
def test_patches_of_int8_codes_and_a_column_cap(make):
    layer = make().double()
    if isinstance(layer, nn.Linear):
        codes = torch.randint(0, 4, (2, 30, 7), dtype=torch.int8)
    else:
        nd = len(layer.kernel_size)
        codes = torch.randint(0, 4, (2, layer.in_channels, *[7, 6, 5][:nd]), dtype=torch.int8)
    floats = [(c, p.clone()) for c, p in input_patches(layer, codes.double(), 1 << 20, torch.float64, True)]
    capped = [(c, p.clone()) for c, p in input_patches(layer, codes, 1 << 20, torch.int8, True, max_columns=40)]
    assert all(p.dtype == torch.int8 for _, p in capped)
    assert len(capped) >= len(floats)
    if isinstance(layer, nn.Linear):  # rows are columns: capped exactly
        assert all(p.shape[-1] <= 40 for _, p in capped) and len(capped) > len(floats)
    joined = torch.cat([p for _, p in capped], dim=-1)
    assert torch.equal(joined.double(), torch.cat([p for _, p in floats], dim=-1))
    assert [c.stop for c, _ in capped][-1] == [c.stop for c, _ in floats][-1]


@pytest.mark.parametrize("transposed", [False, True])
def test_patches_pad_one_sample_at_a_time(transposed, monkeypatch):
    """The padded (zero-inserted) input is built per sample, so it never holds a copy of the whole batch."""
    from monai_efficientq import layers

    torch.manual_seed(0)
    conv = (nn.ConvTranspose3d(2, 3, 3, stride=2, padding=1) if transposed else nn.Conv3d(2, 3, 3, padding=1)).double()
    x = torch.randn(3, 2, 4, 4, 4, dtype=torch.float64)
    batches = []
    original = layers.equivalent_conv_input
    monkeypatch.setattr(layers, "equivalent_conv_input", lambda m, v: batches.append(v.shape[0]) or original(m, v))
    columns = torch.cat([p.clone() for _, p in layers.input_patches(conv, x, 1 << 12, torch.float64)], dim=-1)
    assert batches == [1, 1, 1]
    out = (layers.weight_matrix(conv).detach() @ columns).reshape(-1)  # one group
    assert torch.allclose(out, (layers.output_matrix(conv, conv(x) - conv.bias.view(1, -1, 1, 1, 1))).reshape(-1))
