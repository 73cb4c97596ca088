"""Each quantizable layer as a matrix problem: ``Y = W · X + b`` with ``W`` of shape ``(groups, C_out/groups, K)``.

Convolutions become matrix products over im2col patches, built chunk by chunk with ``Tensor.unfold`` so
memory stays bounded. A transposed convolution is the same problem on the zero-inserted input with the
flipped, transposed kernel (stride 1), which :func:`conv_transpose_as_conv` implements and the tests check
against ``F.conv_transpose*d``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "QUANTIZABLE_TYPES",
    "is_quantizable",
    "weight_matrix",
    "matrix_to_weight",
    "output_matrix",
    "input_patches",
    "equivalent_conv_input",
    "conv_transpose_as_conv",
    "layer_forward",
    "num_output_voxels",
]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
QUANTIZABLE_TYPES = _CONVS + _TRANSPOSED + (nn.Linear,)


def is_quantizable(module: nn.Module) -> bool:
    """Whether ``module`` is a layer type the solver handles (exact types, not arbitrary subclasses)."""
    return type(module) in QUANTIZABLE_TYPES or (
        isinstance(module, QUANTIZABLE_TYPES) and type(module).forward is _base_type(module).forward
    )


def _base_type(module: nn.Module) -> type:
    for t in QUANTIZABLE_TYPES:
        if isinstance(module, t):
            return t
    raise TypeError(f"{type(module).__name__} is not a quantizable layer.")


def _groups(module: nn.Module) -> int:
    return 1 if isinstance(module, nn.Linear) else int(module.groups)


def weight_matrix(module: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The layer weight as ``(groups, C_out/groups, K)`` in equivalent-convolution layout.

    Args:
        module: a quantizable layer.
        weight: a weight in ``module``'s own layout (default: ``module.weight``).
    """
    w = module.weight if weight is None else weight
    g = _groups(module)
    if isinstance(module, nn.Linear):
        return w.reshape(1, w.shape[0], w.shape[1])
    if isinstance(module, _TRANSPOSED):
        c_in, c_out_g = w.shape[:2]
        spatial = tuple(range(3, w.dim() + 1))
        w = w.reshape(g, c_in // g, c_out_g, *w.shape[2:]).transpose(1, 2).flip(spatial)
        return w.reshape(g, c_out_g, -1)
    return w.reshape(g, w.shape[0] // g, -1)


def matrix_to_weight(module: nn.Module, matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`weight_matrix`: a ``(groups, C_out/groups, K)`` matrix in ``module``'s layout."""
    shape = module.weight.shape
    if isinstance(module, nn.Linear):
        return matrix.reshape(shape)
    g = _groups(module)
    if isinstance(module, _TRANSPOSED):
        c_in, c_out_g = shape[:2]
        kernel = shape[2:]
        w = matrix.reshape(g, c_out_g, c_in // g, *kernel)
        w = w.flip(tuple(range(3, w.dim()))).transpose(1, 2)
        return w.reshape(shape)
    return matrix.reshape(shape)


def output_matrix(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """A layer output as ``(groups, C_out/groups, P)``, ``P`` = batch × output voxels (or rows for Linear)."""
    g = _groups(module)
    if isinstance(module, nn.Linear):
        return y.reshape(-1, y.shape[-1]).t().reshape(1, y.shape[-1], -1)
    c_out = y.shape[1]
    return y.transpose(0, 1).reshape(g, c_out // g, -1)


def num_output_voxels(module: nn.Module, y: torch.Tensor) -> int:
    """``P``: the number of columns of :func:`output_matrix`."""
    return y.numel() // (y.shape[-1] if isinstance(module, nn.Linear) else y.shape[1])


def equivalent_conv_input(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """The padded input of the stride/dilation-equivalent plain convolution of ``module``.

    Returns:
        ``(padded input, stride, dilation)`` of a convolution with padding 0 that, with the weight of
        :func:`weight_matrix`, gives ``module``'s output.
    """
    nd = x.dim() - 2
    if isinstance(module, _TRANSPOSED):
        stride, dil = module.stride, module.dilation
        kernel, pad, out_pad = module.kernel_size, module.padding, module.output_padding
        # zero insertion: stride-1 zeros between input samples
        shape = [x.shape[0], x.shape[1]] + [(n - 1) * s + 1 for n, s in zip(x.shape[2:], stride)]
        z = x.new_zeros(shape)
        z[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride)] = x
        pads: list[int] = []
        for i in reversed(range(nd)):
            edge = dil[i] * (kernel[i] - 1) - pad[i]
            pads += [edge, edge + out_pad[i]]
        return _pad_or_crop(z, pads), (1,) * nd, tuple(dil)
    pads = list(module._reversed_padding_repeated_twice)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    xp = F.pad(x, pads, mode=mode) if any(pads) else x
    return xp, tuple(module.stride), tuple(module.dilation)


def _pad_or_crop(x: torch.Tensor, pads: list[int]) -> torch.Tensor:
    """``F.pad`` with negative entries meaning a crop (as ``F.pad`` does for constant mode)."""
    return F.pad(x, pads) if any(pads) else x


def _output_size(n: int, k: int, s: int, d: int) -> int:
    return (n - d * (k - 1) - 1) // s + 1


def input_patches(
    module: nn.Module,
    x: torch.Tensor,
    chunk_bytes: int,
    dtype: torch.dtype,
    ones_row: bool = False,
    max_columns: int | None = None,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(columns, patches)`` chunks of the layer's im2col matrix.

    ``patches`` has shape ``(groups, K, P_chunk)`` and dtype ``dtype``; ``columns`` is the slice of the
    ``P`` output columns (see :func:`output_matrix`) it covers. At most about ``chunk_bytes`` are built
    at a time. Every chunk is a view of one buffer that the next chunk overwrites (fresh multi-MB buffers
    per chunk cost as much time in page faults as the copies themselves): use or copy each chunk before
    taking the next.

    Args:
        module: a quantizable layer.
        x: its input.
        chunk_bytes: memory bound of one chunk.
        dtype: dtype of the patches (an integer dtype for integer codes).
        ones_row: give each group's patches a last row of ones (the bias's input), ``(groups, K + 1, P_chunk)``;
            it is written once, not per chunk.
        max_columns: at most this many columns per chunk as well (a convolution's chunks hold whole rows of its
            first output axis, so one is still wider when a single row is).
    """
    g = _groups(module)
    extra = int(ones_row)
    if isinstance(module, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
        step = max(1, chunk_bytes // (rows.shape[1] * rows.element_size() * 2))
        step = min(step, max_columns) if max_columns else step
        buffer = _patch_buffer(1, rows.shape[1], extra, min(step, rows.shape[0]), dtype, x.device)
        for start in range(0, rows.shape[0], step):
            chunk = rows[start : start + step]
            out = buffer[..., : chunk.shape[0]]
            out[0, : rows.shape[1]].copy_(chunk.t())
            yield slice(start, start + chunk.shape[0]), out
        return
    # one sample at a time: the padded (for a transposed convolution, zero-inserted) input exists for one volume
    xp, stride, dil = equivalent_conv_input(module, x[:1])
    kernel = module.kernel_size
    n_batch, c_in = x.shape[0], xp.shape[1]
    out_sizes = [_output_size(n, k, s, d) for n, k, s, d in zip(xp.shape[2:], kernel, stride, dil)]
    rest = math.prod(out_sizes[1:])
    k_total = c_in * math.prod(kernel)
    bytes_per_row = k_total * rest * dtype.itemsize * 2
    rows_per_chunk = min(max(1, chunk_bytes // max(bytes_per_row, 1)), max(out_sizes[0], 1))
    if max_columns:
        rows_per_chunk = min(rows_per_chunk, max(1, max_columns // max(rest, 1)))
    buffer = _patch_buffer(g, k_total // g, extra, rows_per_chunk * rest, dtype, x.device)
    nd = len(kernel)
    # (1, C, o1..on, k1..kn) -> (C, k1..kn, 1, o1..on), then C split into (groups, C/groups)
    perm = [1] + list(range(2 + nd, 2 + 2 * nd)) + [0] + list(range(2, 2 + nd))
    offset = 0
    for n in range(n_batch):
        if n:
            xp = None  # the previous sample's is freed before the next one is built
            xp = equivalent_conv_input(module, x[n : n + 1])[0]
        for start in range(0, out_sizes[0], rows_per_chunk):
            stop = min(start + rows_per_chunk, out_sizes[0])
            lo = start * stride[0]
            hi = (stop - 1) * stride[0] + dil[0] * (kernel[0] - 1) + 1
            patch = xp[:, :, lo:hi]
            for i in range(nd):
                span = dil[i] * (kernel[i] - 1) + 1
                patch = patch.unfold(2 + i, span, stride[i])
                if dil[i] > 1:
                    patch = patch[..., :: dil[i]]
            source = patch.permute(perm).unflatten(0, (g, c_in // g))
            width = (stop - start) * rest
            out = buffer[..., :width]
            out[:, : k_total // g].view(source.shape).copy_(source)
            yield slice(offset, offset + width), out
            offset += width


def _patch_buffer(
    groups: int, rows: int, ones_rows: int, width: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The reused chunk buffer of :func:`input_patches`: ``(groups, rows + ones_rows, width)``, its last
    ``ones_rows`` rows set to one."""
    buffer = torch.empty(groups, rows + ones_rows, width, dtype=dtype, device=device)
    buffer[:, rows:] = 1
    return buffer


def conv_transpose_as_conv(module: nn.Module, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """A transposed convolution computed as a plain convolution of the zero-inserted input (for tests)."""
    xp, stride, dil = equivalent_conv_input(module, x)
    w = weight_matrix(module, weight)
    g, c_out_g = w.shape[:2]
    kernel = module.kernel_size
    conv_w = w.reshape(g * c_out_g, -1, *kernel)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(kernel)]
    return conv(xp, conv_w, module.bias, stride=stride, dilation=dil, groups=g)


def sampled_output_step(module: nn.Module, output_shape: tuple[int, ...], min_voxels: int) -> int:
    """The largest step ``m`` such that every ``m``-th output voxel along each spatial axis still leaves
    ``min_voxels`` voxels (over the batch), for a layer whose output :func:`subsampled_forward` can compute
    directly; 1 for the others (Linear, transposed convolutions, non-zero padding modes, string padding)."""
    if not _subsamples_directly(module):
        return 1
    voxels = math.prod(output_shape[2:]) * output_shape[0]
    step = 1
    while voxels // (step + 1) ** (len(output_shape) - 2) >= min_voxels:
        step += 1
    return step


def _subsamples_directly(module: nn.Module) -> bool:
    """Whether :func:`subsampled_forward` computes ``module``'s sub-sampled output as one strided convolution."""
    return isinstance(module, _CONVS) and module.padding_mode == "zeros" and not isinstance(module.padding, str)


def sampled_output_steps(module: nn.Module, output_shape: tuple[int, ...], min_voxels: int) -> tuple[int, ...]:
    """One step per spatial axis: :func:`sampled_output_step`'s ``m`` on every axis, then each axis's step in turn
    raised by one while every step-th output voxel still leaves ``min_voxels`` (over the batch), until none can be.
    The sub-grid then has between ``min_voxels`` and about twice as many voxels, where one step for all axes can
    leave up to ``(m + 1)³/m³`` times as many (5× for three 48³ volumes and 2^16 voxels). All ones for the layers
    :func:`sampled_output_step` does not sub-sample, and for ``min_voxels`` below 1."""
    spatial = tuple(output_shape[2:])
    if min_voxels < 1 or not _subsamples_directly(module):
        return (1,) * len(spatial)
    steps = [sampled_output_step(module, output_shape, min_voxels)] * len(spatial)

    def voxels(candidate: list[int]) -> int:
        return output_shape[0] * math.prod(-(-size // step) for size, step in zip(spatial, candidate))

    grown = True
    while grown:
        grown = False
        for axis in range(len(steps)):
            candidate = steps[:axis] + [steps[axis] + 1] + steps[axis + 1 :]
            if voxels(candidate) >= min_voxels:
                steps, grown = candidate, True
    return tuple(steps)


def subsampled_forward(
    module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, step: int | tuple[int, ...]
) -> torch.Tensor:
    """``layer_forward(module, x, weight, bias)[..., ::step, ::step, ::step]`` computed directly (a convolution
    with ``step`` times the stride; ``step`` one for all spatial axes or one per axis), for the layers
    :func:`sampled_output_step` accepts."""
    if step == 1 or (not isinstance(step, int) and all(m == 1 for m in step)):
        return layer_forward(module, x, weight, bias)
    steps = (step,) * len(module.kernel_size) if isinstance(step, int) else tuple(step)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(module.kernel_size)]
    stride = tuple(s * m for s, m in zip(module.stride, steps))
    return fn(x, weight, bias, stride, module.padding, module.dilation, module.groups)


def layer_forward(
    module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``module``'s forward with another weight and bias (in ``module``'s own layout)."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(module, _TRANSPOSED):
        fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[len(module.kernel_size)]
        return fn(x, weight, bias, module.stride, module.padding, module.output_padding, module.groups, module.dilation)
    return module._conv_forward(x, weight, bias)


#: Values per block of :func:`squared_error_sums` on the CPU: a block's difference, square and weight stay in the
#: cache, and its float64 sum is one of few values (one float64 sum over a whole layer output is several times slower).
_ERROR_BLOCK = 1 << 16


def squared_error_sums(
    out: torch.Tensor | None, y: torch.Tensor, h_map: torch.Tensor | None = None
) -> tuple[float, float]:
    """``Σ (out − y)²`` and ``Σ h·(out − y)²``: squares in ``y``'s dtype, summed in float64 (block by block on the
    CPU, where the order of the sums is the only difference).

    Args:
        out: the layer's output, ``y``'s shape; ``None`` for zeros (the sums of ``y²``).
        y: the target ``(N, C, *S)`` (any shape when there is no ``h_map``).
        h_map: one weight per output voxel of every channel, ``(N, *S)``; ``None``: the first sum twice.
    """
    h = h_map.to(y.device, y.dtype) if h_map is not None else None
    by_blocks = y.device.type == "cpu" and y.dim() >= 2 and (h is None or h.shape == y.shape[:1] + y.shape[2:])
    if not by_blocks:
        e2 = (out - y).pow_(2) if out is not None else y * y
        total = float(e2.sum(dtype=torch.float64))
        return total, (float(e2.mul_(h.unsqueeze(1)).sum(dtype=torch.float64)) if h is not None else total)
    n, c = y.shape[:2]
    target = y.reshape(n, c, -1)
    output = out.reshape(n, c, -1) if out is not None else None
    weights = h.reshape(n, 1, -1) if h is not None else None
    width = max(_ERROR_BLOCK // c, 1)
    total, weighted = 0.0, 0.0
    for i in range(n):
        for start in range(0, target.shape[2], width):
            part = slice(start, start + width)
            t = target[i, :, part]
            e2 = torch.sub(output[i, :, part], t).pow_(2) if output is not None else t * t
            total += float(e2.sum(dtype=torch.float64))
            if weights is not None:
                weighted += float(e2.mul_(weights[i, :, part]).sum(dtype=torch.float64))
    return total, (weighted if weights is not None else total)
